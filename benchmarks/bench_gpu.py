"""GPU check (issue 20, item 5): the paper's UNet at 256 px, training and sampling images/s.

    python benchmarks/bench_gpu.py --out reports/benchmarks/gpu [--steps 20] [--images 8]
    python benchmarks/bench_gpu.py --tiny --out /tmp/x   # any machine: the code path, tiny

The smoke cohort's three phantom sites rendered at 256 px are the data; the diffusion settings
are ``params/chexpert.yaml``'s (``preset: paper``: 128 base channels, 6 levels, attention at
32, 16 and 8 px; batch 36 per GPU, Lion). Training: each precision (fp32, bf16 and fp16
autocast) runs cxrlib's trainer (:func:`cxrlib.diffusion.training.train_diffusion`) in its own
process (Accelerate fixes the precision once per process; peak memory is its own), timed over
``--steps`` steps after ``--warmup`` untimed ones. Sampling: ``--images`` images from
randomly initialised weights (the time does not depend on the weights) with the paper's DDIM
200 steps and DPM-Solver++ 20 steps at guidance w 0 (the authors' setting, one model call per
step), in fp32 as cxrlib samples today and under bf16 autocast, each after a short untimed
warm-up. Writes ``gpu_unet.txt`` (what it prints) and ``gpu_unet.json`` under ``--out``.

Without a CUDA device it exits with status 2 and says so, unless ``--tiny`` (the demo preset
at 32 px, a few steps: the code path on any machine). ``benchmarks/gpu_check.sh`` runs it
before the whole demo, then ``--demo-stages PARAMS``: the minutes and precision of each stage
that finished, recorded into the run's ``summary.json`` (even when the demo was stopped) and
written as ``demo_stages.txt`` and ``demo_summary.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext, suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "params" / "smoke.yaml"
PAPER = ROOT / "params" / "chexpert.yaml"
#: Accelerate's ``mixed_precision`` of each timed training variant.
PRECISIONS: dict[str, str] = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
#: The sampling settings timed: (sampler, steps) at full size and under ``--tiny``.
SAMPLERS: dict[bool, tuple[tuple[str, int], ...]] = {
    False: (("ddim", 200), ("dpmpp", 20)), True: (("ddim", 4), ("dpmpp", 2))}


class _Timed(Exception):
    """Raised after the last timed step: the benchmark needs no final checkpoint."""


def bench_params(tiny: bool, mixed_precision: str = "no"):
    """The smoke cohort at 256 px with the paper's diffusion settings (``tiny``: 32 px and the
    smoke UNet), the step cadences moved out of the timed steps' way."""
    from cxrlib.core.config import load_params

    resolution = 32 if tiny else 256
    sites = yaml.safe_load(SMOKE.read_text())["data"]["sites"]
    for site in sites:
        site["phantom"]["image_size"] = resolution
    diffusion = yaml.safe_load((SMOKE if tiny else PAPER).read_text())["diffusion"]
    return load_params(SMOKE, {
        "run.name": f"gpu-check-{resolution}", "data.resolution": resolution,
        "data.sites": sites, "data.workers": os.cpu_count() or 1,
        "diffusion": {**diffusion, "mixed_precision": mixed_precision,
                      "checkpoint_every": 10**9, "sample_every": 10**9, "sample_steps": 1,
                      "resume": "never"}})


def _peak_mib() -> float:
    """Peak GPU memory allocated, or on a CPU the process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train_rate(tiny: bool, precision: str, steps: int, warmup: int) -> dict[str, Any]:
    """Training images/s of one precision through cxrlib's trainer (this process only)."""
    from cxrlib.core.layout import RunLayout
    from cxrlib.data.imagecache import ImageCache
    from cxrlib.data.readers import load_cohort
    from cxrlib.diffusion.training import train_diffusion
    from cxrlib.hardware import precision_label, resolve_precision

    params = bench_params(tiny, PRECISIONS[precision])
    params = params.model_copy(update={"diffusion": params.diffusion.model_copy(
        update={"max_steps": warmup + steps + 1})})
    run = RunLayout.open(params, create=False)
    cohort = load_cohort(params, run)
    stamps: dict[int, float] = {}
    last = warmup + steps

    def stamp(step: int) -> None:
        stamps[step] = time.perf_counter()
        if step == last:
            raise _Timed

    with tempfile.TemporaryDirectory() as tmp, suppress(_Timed):
        train_diffusion(params, cohort.manifest, ImageCache(cohort.cache_dir),
                        replace(run, root=Path(tmp)), progress=False, on_step=stamp)
    images = steps * params.diffusion.batch_size
    return {"img_per_s": images / (stamps[last] - stamps[warmup]), "peak_mib": _peak_mib(),
            "ran": precision_label(resolve_precision(params.diffusion.mixed_precision)),
            "batch": params.diffusion.batch_size}


def sample_rates(tiny: bool, images: int) -> list[dict[str, Any]]:
    """Sampling images/s of each (sampler, steps), fp32 and under bf16 autocast."""
    from cxrlib.core.cohort import training_rows
    from cxrlib.core.layout import RunLayout
    from cxrlib.data.readers import load_cohort
    from cxrlib.diffusion.condition import encode_conditions
    from cxrlib.diffusion.network import ConditionalUNet, noise_scheduler, unet_config
    from cxrlib.diffusion.samplers import generate

    params = bench_params(tiny)
    spec = params.diffusion
    cohort = load_cohort(params, RunLayout.open(params, create=False))
    rows = training_rows(params, cohort.manifest).head(images)
    cond = encode_conditions(rows, spec.nan_label_value, spec.condition_on_view)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = ConditionalUNet(**unet_config(spec, params.data.resolution)).to(device).eval()
    out = []
    for dtype in ("fp32", "bf16"):
        autocast = (torch.autocast(device, dtype=torch.bfloat16) if dtype == "bf16"
                    else nullcontext())
        for sampler, steps in SAMPLERS[tiny]:
            with autocast:
                generate(model, noise_scheduler(spec), cond, list(range(len(rows))), sampler,
                         2, batch_size=len(rows))  # warm-up: kernels, allocator
                start = time.perf_counter()
                generate(model, noise_scheduler(spec), cond, list(range(len(rows))), sampler,
                         steps, batch_size=len(rows))
                seconds = time.perf_counter() - start
            out.append({"sampler": sampler, "steps": steps, "precision": dtype,
                        "images": len(rows), "img_per_s": len(rows) / seconds,
                        "seconds": seconds})
    return out


def measure(args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    """Render the cohort once, time each precision's training in its own process, then the
    samplers here; returns the printed lines and the numbers."""
    from cxrlib.core.layout import RunLayout
    from cxrlib.data.readers import prepare_cohort
    from cxrlib.diffusion.training import model_summary
    from cxrlib.hardware import cpu_bf16_units

    params = bench_params(args.tiny)
    prepare_cohort(params, RunLayout.open(params), progress=False)
    lines = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    device = (f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA "
              f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; fp32 convolutions "
              f"in TF32: {torch.backends.cudnn.allow_tf32}, matmuls: "
              f"{torch.backends.cuda.matmul.allow_tf32})" if torch.cuda.is_available() else
              f"CPU ({os.cpu_count()} cores, bf16 units: {', '.join(cpu_bf16_units()) or 'none'})")
    spec = params.diffusion
    n_params = model_summary(params).attrs["parameters"]
    say(f"device: {device}")
    say(f"UNet: preset {spec.preset}, {params.data.resolution} px, {n_params:,} parameters, "
        f"batch {spec.batch_size}, {spec.optimizer}; {args.steps} timed training steps after "
        f"{args.warmup} untimed, each precision in its own process")
    train = {}
    for name in PRECISIONS:
        cmd = [sys.executable, __file__, "--train", name, "--steps", str(args.steps),
               "--warmup", str(args.warmup), *(["--tiny"] if args.tiny else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            say(f"train {name:5s} FAILED: {proc.stderr.strip()[-600:]}")
            continue
        train[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, r in train.items():
        ratio = r["img_per_s"] / train["fp32"]["img_per_s"] if "fp32" in train else float("nan")
        say(f"train {name:5s} {r['img_per_s']:8.1f} img/s  x{ratio:4.2f} of fp32  "
            f"peak {r['peak_mib']:7.0f} MiB  (ran {r['ran']})")
    samples = sample_rates(args.tiny, args.images)
    for r in samples:
        say(f"sample {r['sampler']:5s} x{r['steps']:<3d} {r['precision']:4s} "
            f"{r['img_per_s']:8.2f} img/s  ({r['images']} images in {r['seconds']:.1f} s, "
            f"guidance w 0)")
    return lines, {"device": device, "parameters": n_params,
                   "resolution": params.data.resolution, "batch": spec.batch_size,
                   "train": train, "sample": samples}


def demo_stages(params_file: Path, out: Path) -> int:
    """The stages of a (possibly stopped) run that finished: their minutes and precision
    recorded into its summary (:func:`cxrlib.notebook_runner.record_stage_times`), printed and
    written under ``out``; 1 unless every stage finished."""
    from cxrlib.core.config import load_params
    from cxrlib.core.files import atomic_write_text
    from cxrlib.core.layout import STAGES, RunLayout
    from cxrlib.core.lock import hold
    from cxrlib.notebook_runner import record_stage_times

    run = RunLayout.open(load_params(params_file))
    with hold(run, "stage times"):
        summary = record_stage_times(run)
    minutes, precision = summary["minutes_per_stage"], summary["precision"]
    lines = [f"{s:27s} {minutes[s]:6.2f} min  {precision.get(s, '')}" if s in minutes
             else f"{s:27s} not finished" for s in STAGES]
    lines.append(f"{'total':27s} {summary['minutes_total']:6.2f} min")
    print("\n".join(lines))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "demo_stages.txt", "\n".join(lines) + "\n")
    atomic_write_text(out / "demo_summary.json", json.dumps(summary, indent=1, sort_keys=True))
    return 0 if len(minutes) == len(STAGES) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "benchmarks" / "gpu")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed training steps first")
    ap.add_argument("--images", type=int, default=8, help="images per sampling run")
    ap.add_argument("--tiny", action="store_true", help="32 px, smoke UNet, any device")
    ap.add_argument("--demo-stages", type=Path, metavar="PARAMS",
                    help="only record and write the stage times of this run")
    ap.add_argument("--train", choices=list(PRECISIONS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.demo_stages:
        return demo_stages(args.demo_stages, args.out)
    if args.train:  # a worker: the scratch run folder comes from the parent's environment
        print(json.dumps(train_rate(args.tiny, args.train, args.steps, args.warmup)))
        return 0
    if not torch.cuda.is_available() and not args.tiny:
        print("bench_gpu: no CUDA device here (torch.cuda.is_available() is False); this "
              "benchmark measures a GPU: run it on a machine with an NVIDIA GPU, or with "
              "--tiny to check the code path", file=sys.stderr)
        return 2
    from cxrlib.core.files import atomic_write_text
    from cxrlib.core.layout import RUNS_DIR_ENV

    with tempfile.TemporaryDirectory(prefix="cxrlib-gpu-bench-") as runs:
        os.environ[RUNS_DIR_ENV] = runs  # a scratch run, inherited by the workers
        lines, numbers = measure(args)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "gpu_unet.txt", "\n".join(lines) + "\n")
    atomic_write_text(args.out / "gpu_unet.json", json.dumps(numbers, indent=1))
    return 0 if len(numbers["train"]) == len(PRECISIONS) else 1


if __name__ == "__main__":
    raise SystemExit(main())
