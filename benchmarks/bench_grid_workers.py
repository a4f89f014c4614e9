"""Benchmark: the classifier grid one arm after another against ``experiments.workers`` arms
at once, side by side in one run.

    python benchmarks/bench_grid_workers.py --params params/demo.yaml [--arms 4] [--workers 2]

Trains the first ``--arms`` experiments of the preset's grid (the order notebook 04 trains them
in) into temporary folders, as notebook 04 does (:func:`cxrlib.experiments.runner.run_grid`, early
stopping, predictions on every test set), once with ``experiments.workers`` 1 (every torch
thread on one arm) and once with ``--workers`` arms at a time (each in a spawned process with
an equal share of the threads), in alternating order over ``--rounds`` rounds. Prints the
machine (CPU flags, torch threads), the wall-clock seconds and images/s of each way's fastest
round (training images seen over seconds, validation and test predictions included: the
reference figure is the one-at-a-time way's), their ratio, and per arm
the kept step and internal test macro AUROC of each way (the same seeds; only the float sums
of another thread count differ, which a training of 100+ steps carries on).

Needs the run folder through notebook 03 (manifest, cache, synthetic cohorts).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from cxrlib.core.config import load_params
from cxrlib.core.layout import RunLayout
from cxrlib.core.schema import Params
from cxrlib.experiments.runner import grid_data, run_grid, training_sets
from cxrlib.hardware import cpu_bf16_units
from cxrlib.stats import auroc_table, macro_auroc


def internal_macro(preds: pd.DataFrame) -> float:
    """Macro AUROC of one arm's predictions on the internal test set."""
    table = macro_auroc(auroc_table(preds)).set_index("test_set")["macro_auroc"]
    return float(table[[t for t in table.index if "internal" in t][0]])


def with_workers(params: Params, workers: int) -> Params:
    return params.model_copy(update={"experiments": params.experiments.model_copy(
        update={"workers": workers})})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params/demo.yaml")
    ap.add_argument("--arms", type=int, default=4, help="the grid's first N experiments")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", help="also write what is printed to this file")
    args = ap.parse_args()

    params = load_params(args.params)
    layout = RunLayout.open(params, create=False)
    data = grid_data(params, layout)
    training = dict(list(training_sets(params, data).items())[:args.arms])
    ways = {"one at a time": 1, f"{args.workers} at a time": args.workers}
    timed: dict[str, list[tuple[float, float]]] = {w: [] for w in ways}  # (seconds, images)
    results: dict[str, pd.DataFrame] = {}
    preds: dict[str, dict[str, pd.DataFrame]] = {}
    for r in range(args.rounds):
        for way in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
            with tempfile.TemporaryDirectory() as tmp:
                scratch = replace(layout, root=Path(tmp))
                t0 = time.perf_counter()
                results[way] = run_grid(with_workers(params, ways[way]), data, scratch,
                                        training, progress=False)
                timed[way].append((time.perf_counter() - t0,
                                   float(results[way]["images_seen"].sum())))
                preds[way] = {f"{e.name} seed {e.seed}": pd.read_parquet(
                    scratch.experiment(e.name, e.seed).predictions) for e in training}
            print(f"round {r + 1}: {way}: {timed[way][-1][0]:.1f} s", flush=True)

    flags = sorted({f for f in Path("/proc/cpuinfo").read_text().split()
                    if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")})
    lines = [f"machine: {os.cpu_count()} CPUs ({', '.join(flags)}), {torch.get_num_threads()} "
             f"torch threads, bf16 units {', '.join(cpu_bf16_units()) or 'none'}; preset "
             f"{args.params}: {len(training)} arms ({', '.join(preds[next(iter(ways))])}), "
             f"best of {args.rounds} round(s)"]
    # each way's fastest round in images/s: the arms' kept steps, so their images, differ
    best = {w: max(timed[w], key=lambda t: t[1] / t[0]) for w in ways}
    base = best["one at a time"][1] / best["one at a time"][0]
    table = pd.DataFrame([{"way": w, "threads per arm": max(1, torch.get_num_threads() // n),
                           "seconds": best[w][0], "images": int(best[w][1]),
                           "img_per_s": best[w][1] / best[w][0],
                           "x one at a time (img/s)": best[w][1] / best[w][0] / base}
                          for w, n in ways.items()])
    lines.append("reference figure: one arm at a time, every thread, "
                 f"{base:.0f} images/s (validation and test predictions included)")
    lines.append(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    one, many = (results[w].set_index(["experiment", "seed"])["best_step"] for w in ways)
    first, other = (preds[w] for w in ways)
    arms = pd.DataFrame([{
        "arm": f"{e.name} seed {e.seed}",
        "kept step, one at a time": int(one[(e.name, e.seed)]),
        "kept step, at once": int(many[(e.name, e.seed)]),
        "internal AUROC, one at a time": internal_macro(first[f"{e.name} seed {e.seed}"]),
        "internal AUROC, at once": internal_macro(other[f"{e.name} seed {e.seed}"])}
        for e in training])
    diff = arms["internal AUROC, at once"] - arms["internal AUROC, one at a time"]
    lines.append(arms.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    lines.append(f"internal macro AUROC, at once less one at a time: mean {diff.mean():+.4f}, "
                 f"sd {diff.std():.4f} over {len(diff)} arms (the same seeds; another thread "
                 "count changes the float sums, and a trajectory of 100+ steps carries that "
                 "on, as a new training seed would)")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
