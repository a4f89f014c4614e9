"""Benchmark: sampler speed against quality, measured side by side in one run.

For each sampler (DDPM, DDIM, DPM-Solver++) and step count, generates the same conditions and
seeds with the run's trained model (EMA weights) and prints images per second, macro
conditional fidelity (the judge's AUROC against the conditions, with its patient-bootstrap
CI), precision / recall / density / coverage and FID/KID against real **validation** images
(never test images), beside the real-vs-real floor at the same n, and the texture's
high-frequency power ratio and the detectability AUROC. Then answers: how few
DPM-Solver++ steps match the paper's DDIM-200 (fidelity at least DDIM's CI lower bound, and
recall and coverage no more than ``audit.diversity_tolerance`` below DDIM's), and at what
speed-up? FID decides nothing: at n below the feature dimension it favours collapsed sets.

With ``--precisions no bf16`` every setting also runs with the UNet in bf16 autocast
(``sampling.mixed_precision``) on the same seeds: its speed over fp32, the change in every
score, and the mean absolute difference from the fp32 images in grey levels (0-255).

    python benchmarks/bench_sampling.py --params params/demo.yaml [--n 200]
        [--ddim-steps 25 200] [--dpmpp-steps 10] [--sde-dpmpp-steps 10 25]
        [--ddim-eta-steps 25] [--precisions no bf16] [--guidance 1]

Needs a run that went through notebooks 01-03 (the model and the judge).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import pandas as pd

from cxrlib.core.config import load_params
from cxrlib.core.layout import RunLayout
from cxrlib.data.imagecache import ImageCache
from cxrlib.data.readers import load_cohort
from cxrlib.diffusion.checkpoints import load_weights, trained_checkpoint
from cxrlib.diffusion.network import noise_scheduler
from cxrlib.diffusion.samplers import timed_generate
from cxrlib.hardware import cpu_bf16_units
from cxrlib.synthetic.audit.run import audit_reference, real_row, score_setting, sweep_conditions

COLUMNS = ["sampler", "steps", "unet_precision", "img_per_s", "fidelity_macro_auroc",
           "fidelity_ci_low", "precision", "recall", "density", "coverage", "fid", "kid_mean",
           "texture_hf_ratio", "detectability_auroc", "grey_levels_from_fp32"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params/demo.yaml")
    ap.add_argument("--n", type=int, default=64, help="images per setting")
    ap.add_argument("--ddim-steps", type=int, nargs="*", default=[25, 50, 100, 200])
    ap.add_argument("--dpmpp-steps", type=int, nargs="*", default=[5, 10, 15, 25, 50])
    ap.add_argument("--ddpm-steps", type=int, nargs="*", default=[100, 200])
    ap.add_argument("--sde-dpmpp-steps", type=int, nargs="*", default=[10, 25])
    ap.add_argument("--ddim-eta-steps", type=int, nargs="*", default=[25, 50])
    ap.add_argument("--precisions", nargs="+", default=["no"], choices=["no", "bf16"],
                    help="UNet precision while sampling (no = fp32)")
    ap.add_argument("--guidance", type=float, default=0.0, help="guidance w (0: conditional)")
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, CPU bf16 units "
          f"{', '.join(cpu_bf16_units()) or 'none'}; n {args.n}, guidance w {args.guidance}")
    params = load_params(args.params)
    run = RunLayout.open(params, create=False)
    cohort = load_cohort(params, run)
    ref = audit_reference(params, cohort.manifest, ImageCache(cohort.cache_dir), run,
                          progress=False)
    model = load_weights(trained_checkpoint(run))
    sched = noise_scheduler(params.diffusion)
    rows, cond, seeds, labels = sweep_conditions(params, ref, args.n, model.conditions_on_view,
                                                 key="bench")
    real = real_row(ref, len(rows), labels)
    print(f"real vs real (n={real['n']}, d={real['dim']}, {params.audit.floor_splits} splits): "
          f"FID {real['fid']:.4g}  recall {real['recall']:.3f}  coverage {real['coverage']:.3f}; "
          f"judge on real validation images: macro AUROC {real['fidelity_macro_auroc']:.3f} over "
          f"{', '.join(labels) or 'no label (too few positives)'}", flush=True)
    results = []
    plan = {"ddpm": args.ddpm_steps, "ddim": args.ddim_steps, "dpmpp": args.dpmpp_steps,
            "sde_dpmpp": args.sde_dpmpp_steps, "ddim_eta": args.ddim_eta_steps}
    for sampler, step_list in plan.items():
        for steps in step_list:
            fp32 = None
            for precision in args.precisions:
                images, sec = timed_generate(model, sched, cond, seeds, sampler, steps,
                                             args.guidance, params.sampling.guidance_rescale,
                                             params.sampling.batch_size, precision=precision)
                fp32 = images if precision == "no" else fp32
                diff = (np.abs(images.astype(float) - fp32).mean() if fp32 is not None
                        else np.nan)
                res = {"sampler": sampler, "steps": steps, "unet_precision": precision,
                       "img_per_s": 1 / sec, "grey_levels_from_fp32": float(diff),
                       **score_setting(ref, rows, images, labels)}
                results.append(res)
                print(" ".join(f"{k}={res[k]:.4g}" if isinstance(res[k], float)
                               else f"{k}={res[k]}" for k in COLUMNS), flush=True)
    table = pd.DataFrame(results)
    print("\n" + table[COLUMNS].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if len(args.precisions) > 1:
        precision_verdict(table)
    table = table[table.unet_precision == args.precisions[0]]
    if not args.ddim_steps or not args.dpmpp_steps:
        return
    tol = params.audit.diversity_tolerance
    ref_row = table[(table.sampler == "ddim") & (table.steps == max(args.ddim_steps))].iloc[0]
    match = table[(table.sampler == "dpmpp")
                  & (table.fidelity_macro_auroc >= ref_row.fidelity_ci_low)
                  & (table.recall >= ref_row.recall - tol)
                  & (table.coverage >= ref_row.coverage - tol)].sort_values("steps")
    print(f"\nreference: DDIM-{int(ref_row.steps)}: macro fidelity "
          f"{ref_row.fidelity_macro_auroc:.3f} (CI low {ref_row.fidelity_ci_low:.3f}), recall "
          f"{ref_row.recall:.3f}, coverage {ref_row.coverage:.3f}, {ref_row.img_per_s:.1f} img/s")
    if len(match):
        best = match.iloc[0]
        print(f"DPM-Solver++ matches it at {int(best.steps)} steps: fidelity "
              f"{best.fidelity_macro_auroc:.3f}, recall {best.recall:.3f}, coverage "
              f"{best.coverage:.3f}, {best.img_per_s:.1f} img/s = "
              f"{best.img_per_s / ref_row.img_per_s:.1f}x faster")
    else:
        print("DPM-Solver++ did not match DDIM's fidelity without losing recall or coverage at "
              "the step counts tried")


def precision_verdict(table: pd.DataFrame) -> None:
    """Per setting: the other precisions' speed and scores against the first one's."""
    first = table.unet_precision.iloc[0]
    scores = ["fidelity_macro_auroc", "recall", "coverage", "texture_hf_ratio",
              "detectability_auroc"]
    base = table[table.unet_precision == first].set_index(["sampler", "steps"])
    other = table[table.unet_precision != first].set_index(["sampler", "steps"])
    out = other[["unet_precision"]].assign(
        speed_up=other.img_per_s / base.img_per_s,
        **{f"d_{s}": other[s] - base[s] for s in scores},
        grey_levels=other.grey_levels_from_fp32)
    print(f"\nagainst {first} on the same seeds (d_: difference in the score):")
    print(out.reset_index().to_string(index=False, float_format=lambda v: f"{v:+.3f}"))
    ci = (table.fidelity_macro_auroc - table.fidelity_ci_low).median()
    print(f"(a fidelity CI's lower half-width here: {ci:.3f})")


if __name__ == "__main__":
    main()
