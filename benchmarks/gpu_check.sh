#!/usr/bin/env bash
# The GPU check of issue 20 (item 5), as one command on a machine with an NVIDIA GPU:
#
#     bash benchmarks/gpu_check.sh
#
# 1. benchmarks/bench_gpu.py: the paper preset's UNet at 256 px on phantom images rendered at
#    256 px: training images/s in fp32, bf16 and fp16 (20 timed steps each), sampling images/s
#    for DDIM-200 and DPM-Solver++ 20 (8 images, fp32 and bf16 autocast);
# 2. the whole demo (python -m cxrlib run --params params/demo.yaml) in a scratch folder, timed
#    per stage (the run's summary.json: minutes_per_stage, and the precision of each stage),
#    stopped when the check's time is up (stages not finished are named).
#
# Everything goes to $OUT if set, else reports/benchmarks/gpu/: gpu_check.log (all output),
# gpu_unet.txt and .json, demo_summary.json, demo_stages.txt. The check ends within
# GPU_CHECK_SECONDS (default 540, about 9 minutes; on an H200 the UNet part takes about 2).
# Python: $PYTHON, else .venv/bin/python where there is one, else python3. Wheels of packages
# the machine lacks, put in .whl/, are installed into /tmp/site first (no network needed).
# Exit status: 0 all done, 1 a part failed or did not finish, 2 no CUDA device, 3 cxrlib's
# dependencies are missing (the message names them).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-reports/benchmarks/gpu}"
BUDGET="${GPU_CHECK_SECONDS:-540}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
PY="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

# What the UNet part and the demo import (pyproject.toml's dependencies, by module name).
missing() { "$PY" - "$@" <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
}
BENCH_MISSING=$(missing torch diffusers accelerate timm safetensors numpy pandas pyarrow scipy \
  sklearn PIL pydantic yaml tqdm filelock)
DEMO_MISSING=$(missing torchvision torchmetrics torchxrayvision matplotlib seaborn ipykernel \
  ipywidgets papermill nbconvert nbformat)
if [ -n "$BENCH_MISSING" ]; then
  echo "gpu_check: $PY lacks modules cxrlib needs: $BENCH_MISSING; install the project" \
       "(pip install -e .) or put their wheels in .whl/" >&2
  exit 3
fi

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False for $PY);" \
       "this check measures a GPU: run it on a machine with an NVIDIA GPU" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

status=0
echo "== the paper's UNet at 256 px"
timeout -s INT -k 20 $((BUDGET / 2)) "$PY" benchmarks/bench_gpu.py --out "$OUT" || status=1

echo "== the whole demo, timed per stage"
if [ -n "$DEMO_MISSING" ]; then
  echo "gpu_check: the demo needs modules $PY lacks: $DEMO_MISSING; skipped" >&2
  exit 1
fi
SCRATCH=$(mktemp -d)
mkdir -p "$SCRATCH/params"
cp params/demo.yaml "$SCRATCH/params/"  # its reports go to $SCRATCH/reports, not the checkout's
export CXRLIB_RUNS_DIR="$SCRATCH/runs"
LEFT=$((BUDGET - SECONDS - 30))
echo "demo: $LEFT s left of the check's $BUDGET"
timeout -s INT -k 30 "$LEFT" "$PY" -m cxrlib run --params "$SCRATCH/params/demo.yaml" \
  || { rc=$?; status=1; echo "gpu_check: the demo stopped (exit $rc; 124: time up)"; }
"$PY" benchmarks/bench_gpu.py --demo-stages "$SCRATCH/params/demo.yaml" --out "$OUT" || status=1
echo "gpu_check: done in $SECONDS s; files in $OUT"
exit $status
