"""Benchmark: the cxrlib diffusion trainer against a bare diffusers training loop.

Same UNet (the params' diffusion preset), batch size, precision and data (the run's image
cache); each side runs in its own subprocess so peak memory is its own. Prints images per
second of both, their ratio (target: cxrlib >= 0.95x the bare loop) and peak memory.

    python benchmarks/bench_diffusion_trainer.py --params params/demo.yaml [--steps 40]

Needs the run's manifest and cache (notebook 01, or ``make demo``). Timing starts after
``--warmup`` steps and stops before the final checkpoint and preview grid, so only training
steps are compared.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _setup(params_file: str, steps: int):
    from cxrlib.config import load_params, run_dir
    from cxrlib.data import load_cohort
    from cxrlib.imagecache import ImageCache

    params = load_params(params_file)
    spec = params.diffusion.model_copy(update={
        "max_steps": steps, "checkpoint_every": 10**9, "sample_every": 10**9,
        "sample_steps": 1, "resume": "never"})
    params = params.model_copy(update={"diffusion": spec})
    cohort = load_cohort(params, run_dir(params, create=False))
    return params, cohort.manifest, ImageCache(cohort.cache_dir)


def run_cxrlib(params_file: str, steps: int, warmup: int) -> dict:
    from cxrlib.diffusion import train_diffusion

    params, manifest, cache = _setup(params_file, steps)
    stamps: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        train_diffusion(params, manifest, cache, Path(tmp), progress=False,
                        on_step=lambda s: stamps.__setitem__(s, time.perf_counter()))
    first, last = warmup, steps - 1
    imgs = (last - first) * params.diffusion.batch_size
    return {"img_per_s": imgs / (stamps[last] - stamps[first]), "peak_mb": _peak_memory_mb()}


def run_bare(params_file: str, steps: int, warmup: int) -> dict:
    """The loop a diffusers example would write: same model, data, optimiser, EMA."""
    import timm.optim
    from diffusers.training_utils import EMAModel

    from cxrlib.condition import encode_conditions
    from cxrlib.diffusion import ConditionalUNet, noise_scheduler, training_rows, unet_config

    params, manifest, cache = _setup(params_file, steps)
    spec = params.diffusion
    rows = training_rows(params, manifest)
    index = cache.rows_for(rows["image_id"])
    cond_all = torch.from_numpy(encode_conditions(rows, spec.nan_label_value))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = ConditionalUNet(unet_config(spec, params.data.resolution)).to(device)
    opt = timm.optim.create_optimizer_v2(model, opt=spec.optimizer, lr=spec.lr,
                                         weight_decay=spec.weight_decay)
    ema = EMAModel(model.parameters(), decay=spec.ema_decay)
    sched = noise_scheduler(spec)
    dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[spec.mixed_precision]
    rng = np.random.default_rng(0)
    stamps = {}
    for step in range(steps):
        pick = np.sort(rng.choice(len(index), spec.batch_size, replace=False))
        x0 = torch.from_numpy(np.asarray(cache.images[index[pick]])).unsqueeze(1)
        x0 = x0.float().div_(127.5).sub_(1.0).to(device)
        cond = cond_all[pick].to(device)
        noise = torch.randn_like(x0)
        t = torch.randint(0, spec.num_train_timesteps, (len(pick),), device=device)
        drop = torch.rand(len(pick), device=device) < spec.cond_dropout
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            pred = model(sched.add_noise(x0, noise, t), t, cond, drop)
        loss = torch.nn.functional.mse_loss(pred.float(), sched.get_velocity(x0, noise, t))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(model.parameters())
        stamps[step + 1] = time.perf_counter()
    first, last = warmup, steps - 1
    imgs = (last - first) * spec.batch_size
    return {"img_per_s": imgs / (stamps[last] - stamps[first]), "peak_mb": _peak_memory_mb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params/demo.yaml")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="alternating runs of each side")
    ap.add_argument("--mode", choices=["cxrlib", "bare"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        fn = run_cxrlib if args.mode == "cxrlib" else run_bare
        print(json.dumps(fn(args.params, args.steps, args.warmup)))
        return
    results: dict[str, list[dict]] = {"cxrlib": [], "bare": []}
    for _ in range(args.rounds):
        for mode in ("bare", "cxrlib"):
            out = subprocess.run([sys.executable, __file__, "--mode", mode, "--params",
                                  args.params, "--steps", str(args.steps), "--warmup",
                                  str(args.warmup)], capture_output=True, text=True, check=True)
            results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = {m: max(r["img_per_s"] for r in rs) for m, rs in results.items()}
    peak = {m: max(r["peak_mb"] for r in rs) for m, rs in results.items()}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {device}; {args.steps} steps ({args.warmup} warm-up), best of {args.rounds}")
    for m in ("bare", "cxrlib"):
        runs = ", ".join(f"{r['img_per_s']:.1f}" for r in results[m])
        print(f"{m:7s}: {best[m]:7.1f} img/s (runs: {runs}); peak memory {peak[m]:.0f} MiB")
    ratio = best["cxrlib"] / best["bare"]
    print(f"ratio cxrlib / bare: {ratio:.3f}x ({'PASS' if ratio >= 0.95 else 'FAIL'}: "
          "target >= 0.95x)")


if __name__ == "__main__":
    main()
