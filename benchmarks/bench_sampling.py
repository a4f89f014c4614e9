"""Benchmark: sampler speed and quality against cost, measured side by side in one run.

For each sampler (DDPM, DDIM, DPM-Solver++) and step count, generates the same conditions and
seeds with the run's trained model (EMA weights), and prints images per second and FID/KID to
real test images in the judge's feature space. Then answers: how few DPM-Solver++ steps reach
the FID of the paper's DDIM-200 within 5%, and at what speed-up?

    python benchmarks/bench_sampling.py --params params/demo.yaml [--n 200]

Needs a run that went through notebooks 01-03 (the model and the judge).
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from cxrlib.audit import fid_kid, sample_rows
from cxrlib.classify import load_classifier
from cxrlib.condition import encode_conditions
from cxrlib.config import load_params, run_dir
from cxrlib.data import load_cohort
from cxrlib.diffusion import latest_checkpoint, load_weights, noise_scheduler, training_rows
from cxrlib.imagecache import ImageCache
from cxrlib.sampling import image_seed, timed_generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params/demo.yaml")
    ap.add_argument("--n", type=int, default=64, help="images per setting")
    ap.add_argument("--ddim-steps", type=int, nargs="+", default=[25, 50, 100, 200])
    ap.add_argument("--dpmpp-steps", type=int, nargs="+", default=[5, 10, 15, 25, 50])
    ap.add_argument("--ddpm-steps", type=int, nargs="+", default=[100, 200])
    ap.add_argument("--guidance", type=float, default=0.0)
    args = ap.parse_args()
    params = load_params(args.params)
    folder = run_dir(params, create=False)
    cohort = load_cohort(params, folder)
    cache = ImageCache(cohort.cache_dir)
    model = load_weights(latest_checkpoint(folder / "02_diffusion" / "checkpoints"))
    judge = load_classifier(folder / "classifiers" / "real_only").model
    sched = noise_scheduler(params.diffusion)
    rows = sample_rows(training_rows(params, cohort.manifest), args.n, 11)
    cond = encode_conditions(rows, params.diffusion.nan_label_value)
    seeds = [image_seed(params.run.seed, f"bench/{i}", 0) for i in range(len(rows))]
    test = cohort.manifest[(cohort.manifest["split"] == "test")
                           & cohort.manifest["site"].isin(set(rows["site"]))]
    real = cache.load(sample_rows(test, 2 * args.n, 12)["image_id"])
    real_a, real_b = real[: args.n], real[args.n: 2 * args.n]
    floor = fid_kid(judge, real_a, real_b, params.data.resolution)
    print(f"real vs real (n={args.n}): FID {floor['fid']:.4g}  KID {floor['kid_mean']:.4g}  "
          "(the noise floor at this size)", flush=True)
    results = []
    plan = {"ddpm": args.ddpm_steps, "ddim": args.ddim_steps, "dpmpp": args.dpmpp_steps}
    for sampler, step_list in plan.items():
        for steps in step_list:
            images, sec = timed_generate(model, sched, cond, seeds, sampler, steps,
                                         args.guidance, params.sampling.guidance_rescale,
                                         params.sampling.batch_size)
            dist = fid_kid(judge, real_a, images, params.data.resolution)
            results.append({"sampler": sampler, "steps": steps, "img_per_s": 1 / sec,
                            "fid": dist["fid"], "kid": dist["kid_mean"]})
            print(f"{sampler:6s} {steps:4d} steps: {1 / sec:8.1f} img/s  FID {dist['fid']:.4g}  "
                  f"KID {dist['kid_mean']:.4g}", flush=True)
    table = pd.DataFrame(results)
    print("\n" + table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    ref = table[(table.sampler == "ddim") & (table.steps == max(args.ddim_steps))].iloc[0]
    dpm = table[(table.sampler == "dpmpp") & (table.fid <= 1.05 * ref.fid)].sort_values("steps")
    print(f"\nreference: DDIM-{int(ref.steps)}: FID {ref.fid:.4g} at {ref.img_per_s:.1f} img/s")
    if len(dpm):
        best = dpm.iloc[0]
        print(f"DPM-Solver++ reaches it within 5% at {int(best.steps)} steps: FID {best.fid:.4g}, "
              f"{best.img_per_s:.1f} img/s = {best.img_per_s / ref.img_per_s:.1f}x faster")
    else:
        print("DPM-Solver++ did not reach DDIM's FID within 5% at the step counts tried")
    fastest = table.sort_values("img_per_s", ascending=False).iloc[0]
    print(f"speed ratio fastest/slowest setting: "
          f"{fastest.img_per_s / table.img_per_s.min():.1f}x; rows: {len(np.unique(seeds))} "
          "distinct seeds per setting")


if __name__ == "__main__":
    main()
