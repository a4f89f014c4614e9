"""Compare one grid arm between two runs that differ in one setting, seed by seed.

    python benchmarks/compare_runs.py --params params/demo.yaml --run demo --run demo-sde
        [--arm real_plus_synthetic_x2.f5] [--baseline real_only.f5]

Two runs of the same preset with the same seeds train the same real subsets; when they share
notebooks 01 and 02 (run B's folder started from copies of run A's) and differ in one setting
(``--set`` on ``cxrlib run``), the baseline arms reproduce exactly and the arm's difference
between the runs is that setting's effect. Per test set it prints each run's macro AUROC per
seed (as notebook 05 computes it from the predictions), each run's delta against the
baseline, and B - A with a t interval over the seeds (paired by seed: same real subset, same
training seed). It first checks that the baseline arm's predictions are the same in both runs,
and says so when they are not (then B - A also carries the run-to-run variance).
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
from scipy import stats as st

from cxrlib.core.config import load_params
from cxrlib.core.layout import RunLayout
from cxrlib.experiments.grid import load_predictions
from cxrlib.stats import SeedMacros, seed_macros


def per_seed(macros: dict[str, SeedMacros], arm: str) -> pd.DataFrame:
    """Macro AUROC of one arm per test set (rows) and seed (columns), under notebook 05's
    label rule (:func:`cxrlib.stats.seed_macros`)."""
    if arm not in next(iter(macros.values())).point:
        raise SystemExit(f"no predictions of arm '{arm}'")
    return pd.DataFrame({name: m.point[arm] for name, m in macros.items()}).T


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params/demo.yaml")
    ap.add_argument("--run", action="append", required=True, help="run name (twice: A, B)")
    ap.add_argument("--arm", default="real_plus_synthetic_x2.f5")
    ap.add_argument("--baseline", default="real_only.f5")
    args = ap.parse_args()
    if len(args.run) != 2:
        raise SystemExit("give --run twice: the reference run A and the variant B")
    preds, macros = {}, {}
    for name in args.run:
        params = load_params(args.params, {"run.name": name})
        preds[name] = load_predictions(RunLayout.open(params, create=False))
        spec = params.stats.model_copy(update={"n_boot": 100})  # point estimates only
        macros[name] = seed_macros(preds[name], spec)
    a, b = args.run
    base = {r: preds[r][preds[r]["experiment"] == args.baseline].sort_values(
        ["seed", "test_set", "image_id", "label"])["score"].to_numpy() for r in args.run}
    same = len(base[a]) == len(base[b]) and np.allclose(base[a], base[b])
    print(f"baseline {args.baseline}: "
          + ("the same predictions in both runs, so B - A is the changed setting's effect"
             if same else "predictions differ between the runs: B - A includes run-to-run "
             "variance"))
    arm = {r: per_seed(macros[r], args.arm) for r in args.run}
    ref = {r: per_seed(macros[r], args.baseline) for r in args.run}
    rows = []
    for test in arm[a].index:
        diff = arm[b].loc[test] - arm[a].loc[test]
        n = diff.notna().sum()
        half = st.t.ppf(0.975, n - 1) * diff.std(ddof=1) / np.sqrt(n)
        rows.append({"test set": test, "seeds": int(n),
                     f"{a} delta": (arm[a].loc[test] - ref[a].loc[test]).mean(),
                     f"{b} delta": (arm[b].loc[test] - ref[b].loc[test]).mean(),
                     "B - A": diff.mean(), "ci_low": diff.mean() - half,
                     "ci_high": diff.mean() + half,
                     "p (paired t)":
                         f"{st.ttest_rel(arm[b].loc[test], arm[a].loc[test]).pvalue:.3f}"})
        print(f"{test}: {args.arm} per seed, {a} "
              f"{np.round(arm[a].loc[test].to_numpy(), 4).tolist()}, {b} "
              f"{np.round(arm[b].loc[test].to_numpy(), 4).tolist()}")
    print(f"\n{args.arm} against {args.baseline} (delta: mean over seeds), and run B ({b}) "
          f"against run A ({a}):")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:+.4f}"))


if __name__ == "__main__":
    main()
