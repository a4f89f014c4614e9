"""Project-level checks: parameter files, notebooks kept clean, run folders, the runner."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import nbformat
import pytest
import yaml

from cxrlib.config import Params, ParamsError, load_params, run_dir
from cxrlib.pipeline import STAGES, run_stage

ROOT = Path(__file__).resolve().parent.parent
PARAM_FILES = sorted((ROOT / "params").glob("*.yaml"))
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_expected_files_exist():
    assert {p.name for p in PARAM_FILES} >= {"smoke.yaml", "demo.yaml", "chexpert.yaml",
                                             "mimic.yaml"}
    assert [n.stem for n in NOTEBOOKS][: len(STAGES)] == list(STAGES)


@pytest.mark.parametrize("path", PARAM_FILES, ids=lambda p: p.name)
def test_every_params_file_matches_the_schema(path):
    params = Params.model_validate(yaml.safe_load(path.read_text()))
    assert Params.from_json(params.to_json()) == params  # round-trips through JSON


@pytest.mark.parametrize("name", ["chexpert.yaml", "mimic.yaml"])
def test_real_data_presets_name_the_placeholder_path(name):
    with pytest.raises(ParamsError, match=r"data\.sites\[0\]\.root.*does not exist") as err:
        load_params(ROOT / "params" / name)
    assert name in str(err.value)


def test_run_folder_refuses_other_parameters(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRLIB_RUNS_DIR", str(tmp_path))
    folder = run_dir(load_params(ROOT / "params" / "smoke.yaml"))
    assert json.loads((folder / "params.json").read_text())["run"]["name"] == "smoke"
    other = load_params(ROOT / "params" / "smoke.yaml", {"data.resolution": 48})
    with pytest.raises(ParamsError, match=r"keys differ: data\.resolution"):
        run_dir(other)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_stripped_and_parameterised(path):
    """Outputs stay out of git (except the reference output of NBVAL_CHECK_OUTPUT cells), and
    the cell tagged ``parameters`` holds plain literal assignments only."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    for cell in code:
        if "NBVAL_CHECK_OUTPUT" in cell.source:
            assert cell.outputs, f"{path.name}: NBVAL_CHECK_OUTPUT cell lacks its reference"
            continue
        assert cell.execution_count is None, f"{path.name}: execution count kept"
        assert not cell.outputs, f"{path.name}: outputs kept in cell {cell.source[:40]!r}"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
    for stmt in ast.parse(tagged[0].source).body:
        assert isinstance(stmt, ast.Assign), f"{path.name}: parameters cell has {stmt!r}"
        ast.literal_eval(stmt.value)  # raises on anything but a plain literal


def test_runner_executes_a_stage_and_renders_html(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRLIB_RUNS_DIR", str(tmp_path / "runs"))
    executed = run_stage("01_data_prep", ROOT / "params" / "smoke.yaml",
                         reports_root=tmp_path / "reports")
    nb = nbformat.read(executed, as_version=4)
    assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
    html = (tmp_path / "reports" / "smoke" / "01_data_prep.html").read_text()
    assert "Figure E1" in html and "<img" in html
    assert "params_file =" not in html  # code hidden
    figures = {p.name for p in (tmp_path / "runs" / "smoke" / "01_data_prep").iterdir()}
    assert {"cooccurrence.png", "samples_per_label.png", "check_macro_auroc.csv"} <= figures
