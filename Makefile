# Two commands for a new user: `make demo` and `make test`. Both bootstrap .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cxrlib-installed
PARAMS ?= params/demo.yaml

.PHONY: setup demo test lint benchmark clean-runs

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24,<26.2"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (cxrlib)" >/dev/null
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m cxrlib run --params $(PARAMS)

test: $(STAMP)
	$(PY) -m ruff check cxrlib tests benchmarks notebooks
	$(PY) -m pytest --durations=15 tests

lint: $(STAMP)
	$(PY) -m ruff check cxrlib tests benchmarks notebooks

benchmark: $(STAMP)
	$(PY) benchmarks/bench_phantom.py
	$(PY) benchmarks/bench_classifier.py --params $(PARAMS)
	$(PY) -m cxrlib run --params $(PARAMS) --stage 01_data_prep
	$(PY) benchmarks/bench_diffusion_trainer.py --params $(PARAMS)
	$(PY) -m cxrlib run --params $(PARAMS) --stage 02_diffusion_training --stage 03_sampling_explorer
	$(PY) benchmarks/bench_sampling.py --params $(PARAMS)

clean-runs:
	rm -rf runs/smoke
