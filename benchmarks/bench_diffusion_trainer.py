"""Benchmark: the cxrlib diffusion trainer's speed-ups, and its overhead over a bare loop.

Same UNet (the params' diffusion preset), batch size and data (the run's image cache); each
variant runs in its own subprocess so peak memory is its own, and the variants alternate over
``--rounds`` so a noisy machine affects them alike. Prints images per second of each:

- ``bare fp32``: the loop a diffusers example would write, fp32, eager;
- ``fp32 eager``: the cxrlib trainer the same way (target: >= 0.95x the bare loop);
- channels_last, ``torch.compile`` and bf16 autocast, alone and together: the trainer's
  speed-ups, each as a ratio to fp32 eager (target on a CPU with bf16 units: >= 2x).

On a CPU without bf16 units, ``bf16`` resolves to fp32 (``cxrlib.hardware``) and the line says
so. ``torch.compile`` compiles during the warm-up steps, which are not timed.

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
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


#: Trainer settings of each variant (keys of ``diffusion:``), fp32 eager first.
VARIANTS: dict[str, dict[str, object]] = {
    "fp32 eager": {"mixed_precision": "no", "channels_last": False, "compile": False},
    "fp32 + channels_last": {"mixed_precision": "no", "channels_last": True, "compile": False},
    "fp32 + channels_last + compile": {"mixed_precision": "no", "channels_last": True,
                                       "compile": True},
    "bf16": {"mixed_precision": "bf16", "channels_last": False, "compile": False},
    "bf16 + channels_last": {"mixed_precision": "bf16", "channels_last": True, "compile": False},
    "bf16 + channels_last + compile": {"mixed_precision": "bf16", "channels_last": True,
                                       "compile": True},
}
BARE = "bare fp32"


def _setup(params_file: str, steps: int, variant: dict[str, object] | None = None):
    from cxrlib.core.config import load_params
    from cxrlib.core.layout import RunLayout
    from cxrlib.data.imagecache import ImageCache
    from cxrlib.data.readers import load_cohort

    params = load_params(params_file)
    spec = params.diffusion.model_copy(update={
        "max_steps": steps, "checkpoint_every": 10**9, "sample_every": 10**9,
        "sample_steps": 1, "resume": "never", **(variant or VARIANTS["fp32 eager"])})
    params = params.model_copy(update={"diffusion": spec})
    run = RunLayout.open(params, create=False)
    cohort = load_cohort(params, run)
    return params, run, cohort.manifest, ImageCache(cohort.cache_dir)


def run_cxrlib(params_file: str, steps: int, warmup: int, variant: str) -> dict:
    from cxrlib.diffusion.training import train_diffusion
    from cxrlib.hardware import resolve_precision

    params, run, manifest, cache = _setup(params_file, steps, VARIANTS[variant])
    stamps: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        train_diffusion(params, manifest, cache, replace(run, root=Path(tmp)), progress=False,
                        on_step=lambda s: stamps.__setitem__(s, time.perf_counter()))
    first, last = warmup, steps - 1
    imgs = (last - first) * params.diffusion.batch_size
    return {"img_per_s": imgs / (stamps[last] - stamps[first]), "peak_mb": _peak_memory_mb(),
            "precision": resolve_precision(params.diffusion.mixed_precision)}


def run_bare(params_file: str, steps: int, warmup: int) -> dict:
    """The loop a diffusers example would write: same model, data, optimiser, EMA."""
    import timm.optim
    from diffusers.training_utils import EMAModel

    from cxrlib.core.cohort import diffusion_rows
    from cxrlib.diffusion.condition import encode_conditions
    from cxrlib.diffusion.network import ConditionalUNet, noise_scheduler, unet_config

    params, _, manifest, cache = _setup(params_file, steps)
    spec = params.diffusion
    rows = diffusion_rows(params, manifest)
    index = cache.rows_for(rows["image_id"])
    cond_all = torch.from_numpy(encode_conditions(rows, spec.nan_label_value,
                                                  spec.condition_on_view))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = ConditionalUNet(**unet_config(spec, params.data.resolution)).to(device)
    opt = timm.optim.create_optimizer_v2(model, opt=spec.optimizer, lr=spec.lr,
                                         weight_decay=spec.weight_decay)
    ema = EMAModel(model.parameters(), decay=spec.ema_decay)
    sched = noise_scheduler(spec)
    dtype = None  # fp32, as VARIANTS["fp32 eager"]
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
    return {"img_per_s": imgs / (stamps[last] - stamps[first]), "peak_mb": _peak_memory_mb(),
            "precision": "no"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params/demo.yaml")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="alternating runs of each variant")
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        out = (run_bare(args.params, args.steps, args.warmup) if args.mode == BARE
               else run_cxrlib(args.params, args.steps, args.warmup, args.mode))
        print(json.dumps(out))
        return
    from cxrlib.hardware import cpu_bf16_units

    modes = [BARE, *VARIANTS]
    results: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for mode in modes:
            out = subprocess.run([sys.executable, __file__, "--mode", mode, "--params",
                                  args.params, "--steps", str(args.steps), "--warmup",
                                  str(args.warmup)], capture_output=True, text=True, check=True)
            results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = {m: max(r["img_per_s"] for r in rs) for m, rs in results.items()}
    peak = {m: max(r["peak_mb"] for r in rs) for m, rs in results.items()}
    device = "cuda" if torch.cuda.is_available() else (
        f"cpu ({torch.get_num_threads()} threads; bf16 units: "
        f"{', '.join(cpu_bf16_units()) or 'none'})")
    print(f"device {device}; {args.steps} steps ({args.warmup} warm-up, not timed), "
          f"best of {args.rounds}")
    ref = best["fp32 eager"]
    for m in modes:
        runs = ", ".join(f"{r['img_per_s']:.1f}" for r in results[m])
        ran = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}[results[m][0]["precision"]]
        print(f"{m:31s} {best[m]:7.1f} img/s  x{best[m] / ref:4.2f} of fp32 eager  (ran {ran}; "
              f"runs: {runs}); peak memory {peak[m]:.0f} MiB")
    ratio = ref / best[BARE]
    print(f"trainer overhead: fp32 eager / bare fp32 = {ratio:.3f}x "
          f"({'PASS' if ratio >= 0.95 else 'FAIL'}: target >= 0.95x)")
    fastest = max(VARIANTS, key=best.__getitem__)
    speedup = best[fastest] / ref
    print(f"fastest: {fastest}, {speedup:.2f}x fp32 eager "
          f"({'PASS' if speedup >= 2 else 'FAIL'}: target >= 2x on a CPU with bf16 units)")


if __name__ == "__main__":
    main()
