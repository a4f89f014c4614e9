"""Benchmark: does the diffusion model carry its conditions, against training minutes?

Trains the run's diffusion model once per variant (plain MSE, and Min-SNR-gamma weighting;
Hang et al. 2023) for the same number of steps on the same data, and at every checkpoint
scores generated images with the audit's judge (notebook 03's real-only classifier): macro
AUROC of the judge on synthetic images against their conditions, sex- and view-probe
AUROCs, recall and coverage (so that a gain in fidelity bought with diversity shows), beside
the same judge on real validation images. One table, so the demo's step count, loss
weighting and guidance are chosen by measurement:

    python benchmarks/bench_diffusion_fidelity.py --params params/demo.yaml \\
        --steps 2000 --every 500 --images 400 --guidance 0 1

Needs the run's manifest and cache (notebook 01). Trains or loads the judge in the run folder
(as notebook 03 does); the diffusion checkpoints go to a temporary folder. Minutes are wall
time of training steps on this machine; the line above the table names the machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import pandas as pd
import torch

from cxrlib.audit_run import audit_reference, real_row, score_setting, sweep_conditions
from cxrlib.config import load_params
from cxrlib.data import load_cohort
from cxrlib.diffusion import train_diffusion
from cxrlib.hardware import cpu_bf16_units, describe_precision, resolve_precision
from cxrlib.imagecache import ImageCache
from cxrlib.layout import RunLayout
from cxrlib.network import checkpoint_dirs, load_weights, noise_scheduler, read_checkpoint_state
from cxrlib.samplers import generate


def _stamp(stamps: dict[int, float], step: int) -> None:
    stamps[step] = time.perf_counter()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params/demo.yaml")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=500, help="score a checkpoint every N steps")
    ap.add_argument("--images", type=int, default=400, help="generated images per score")
    ap.add_argument("--guidance", type=float, nargs="+", default=[0.0, 1.0],
                    help="guidance w values (0: the plain conditional model)")
    ap.add_argument("--snr-gamma", type=float, default=5.0)
    ap.add_argument("--variants", nargs="+", default=["plain", "min-snr"],
                    choices=["plain", "min-snr"])
    ap.add_argument("--out", help="also write the table to this CSV file")
    args = ap.parse_args()

    params = load_params(args.params)
    layout = RunLayout.open(params, create=False)
    cohort = load_cohort(params, layout)
    cache = ImageCache(cohort.cache_dir)
    ref = audit_reference(params, cohort.manifest, cache, layout, progress=False)
    spec = params.diffusion
    rows, cond, seeds, labels = sweep_conditions(params, ref, args.images,
                                                 spec.condition_on_view, key="fidelity")
    print(f"machine: {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, bf16 units "
          f"{', '.join(cpu_bf16_units()) or 'none'}, cuda {torch.cuda.is_available()}; "
          f"{describe_precision(spec.mixed_precision, resolve_precision(spec.mixed_precision))}")
    print(f"{len(rows)} conditions from training rows; macro over {len(labels)} labels: "
          f"{', '.join(labels)}")
    table = [{"variant": "real validation images", "step": 0, "minutes": 0.0,
              "guidance": float("nan"), **real_row(ref, len(rows), labels)}]
    sched = noise_scheduler(spec)
    for variant in args.variants:
        gamma = args.snr_gamma if variant == "min-snr" else None
        run = params.model_copy(update={"diffusion": spec.model_copy(update={
            "snr_gamma": gamma, "max_steps": args.steps, "checkpoint_every": args.every,
            "keep_checkpoints": args.steps // args.every + 1, "sample_every": 10**9,
            "resume": "never"})})
        stamps: dict[int, float] = {}
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            scratch = replace(layout, root=Path(tmp))
            train_diffusion(run, cohort.manifest, cache, scratch, progress=True,
                            on_step=partial(_stamp, stamps))
            for ckpt in checkpoint_dirs(scratch.checkpoints):
                step = read_checkpoint_state(ckpt)["step"]
                model = load_weights(ckpt)
                for g in args.guidance:
                    images = generate(model, sched, cond, seeds, params.sampling.sampler,
                                      params.sampling.steps, g, params.sampling.guidance_rescale,
                                      params.sampling.batch_size)
                    table.append({"variant": variant if gamma is None
                                  else f"{variant} (gamma {gamma:g})", "step": step,
                                  "minutes": (stamps[step] - started) / 60, "guidance": g,
                                  **score_setting(ref, rows, images, labels)})
                    print(pd.DataFrame(table[-1:]).to_string(index=False, header=False),
                          flush=True)
    out = pd.DataFrame(table)
    cols = ["variant", "step", "minutes", "guidance", "fidelity_macro_auroc", "fidelity_ci_low",
            "fidelity_ci_high", "sex_auroc", "view_auroc", "recall", "coverage", "fid"]
    with pd.option_context("display.width", 200, "display.precision", 3):
        print(out[cols].to_string(index=False))
    if args.out:
        out.to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
