"""How the grid's arms trained: where each stopped, whether it converged, its compute, and the
spread of its seeds.

Notebook 04 shows these beside the training; the statistics stage reads them back to flag
comparisons whose arms differ in compute or did not converge (:mod:`cxrlib.study.claims`). No
torch here.
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np
import pandas as pd

from cxrlib.stats import (
    coded_test_sets,
    label_rule,
    macro_and_replicates,
)


def stopping_table(results: pd.DataFrame) -> pd.DataFrame:
    """Where each arm stopped, mean over seeds: optimizer steps run (the budget unless early
    stopping ended it), the step whose weights were kept, passes over its training set, and
    seconds. Arms that differ here differ in compute, not only in data."""
    frame = results.assign(
        passes=results["images_seen"] / (results["n_real"] + results["n_synthetic"]),
        stopped_early=results["stopped_early"].astype(float))
    cols = ["optimizer_steps", "best_step", "images_seen", "passes",
            "passes_per_real_image", "stopped_early", "train_seconds"]
    frame = frame.assign(**{c: frame.get(c, np.nan) for c in cols})
    return (frame.groupby("experiment", sort=False)[cols].mean(numeric_only=True)
            .rename(columns={"stopped_early": "share stopped early",
                             "passes": "passes over its data",
                             "passes_per_real_image": "passes per real image"}).round(2))


def unconverged(results: pd.DataFrame) -> pd.DataFrame:
    """Seeds of arms that ran their whole step budget under protocol converged (early
    stopping never ended them, so they may still have been improving)."""
    if "converged" not in results:
        return results.iloc[:0]
    flag = results["converged"].astype("boolean")
    return results[(results["protocol"] == "converged") & ~flag.fillna(True)]



def seed_spread(predictions: pd.DataFrame, min_positives: int = 1) -> pd.DataFrame:
    """Spread of the per-seed macro AUROC per experiment and test set (no bootstrap), over the
    labels with ``min_positives`` positives and negatives (notebook 05 passes the stats rule).

    Columns: experiment, test_set, n_seeds, macro_auroc_mean, macro_auroc_min, macro_auroc_max.
    """
    if "seed" not in predictions.columns:
        raise ValueError("predictions lack the column 'seed'")
    rows = []
    for ts in coded_test_sets(predictions, keys=("experiment", "seed")):
        used = label_rule(ts.targets, min_positives)
        per_experiment: dict[Hashable, list[float]] = {}
        for (experiment, _seed), scores in ts.scores.items():
            macro = macro_and_replicates(ts.labels, ts.targets, scores, used, None)[0]
            per_experiment.setdefault(experiment, []).append(macro)
        for experiment, macros in per_experiment.items():
            values = np.asarray(macros)
            rows.append({"experiment": experiment, "test_set": ts.name, "n_seeds": len(values),
                         "macro_auroc_mean": values.mean(), "macro_auroc_min": values.min(),
                         "macro_auroc_max": values.max()})
    return pd.DataFrame(rows)


def compute_table(grid: pd.DataFrame) -> pd.DataFrame:
    """Compute per experiment from :func:`cxrlib.experiments.grid.grid_results`: seeds, the
    protocol, and the mean per seed of optimizer steps, the kept step (``best_step``, whose weights
    were evaluated), images seen, passes per unique real image and training wall time (NaN where
    older runs did not record a column), with the wall time of all seeds together."""
    columns = ("protocol", "optimizer_steps", "best_step", "images_seen",
               "passes_per_real_image", "train_seconds")
    frame = grid.assign(**{c: grid.get(c, np.nan) for c in columns})
    table = frame.groupby("experiment", sort=False).agg(
        kind=("kind", "first"), k=("k", "first"), real_fraction=("real_fraction", "first"),
        n_seeds=("seed", "nunique"), protocol=("protocol", "first"),
        optimizer_steps=("optimizer_steps", "mean"), kept_step=("best_step", "mean"),
        images_seen=("images_seen", "mean"),
        passes_per_real_image=("passes_per_real_image", "mean"),
        train_seconds=("train_seconds", "mean"),
        train_seconds_all_seeds=("train_seconds", "sum"))
    return table.reset_index()


#: Two compared arms whose mean kept steps differ by more than this factor are flagged.
KEPT_STEP_RATIO = 2.0


KEPT_STEPS_DIFFER = f"kept steps differ more than {KEPT_STEP_RATIO:g}-fold"


NOT_CONVERGED = "did not converge"


def training_flags(grid: pd.DataFrame, *tables: pd.DataFrame) -> pd.DataFrame:
    """Where a comparison may measure training rather than data: each (experiment, baseline)
    pair of ``tables`` whose mean kept steps (:func:`compute_table`) differ more than
    :data:`KEPT_STEP_RATIO`-fold, then each arm with seeds that ran their whole budget under
    protocol converged (:func:`unconverged`). Columns: experiment, baseline (None for an arm),
    flag, kept_step, baseline_kept_step, seeds_not_converged, n_seeds."""
    compute = compute_table(grid).set_index("experiment")
    kept = compute["kept_step"].astype(float)
    pairs = dict.fromkeys((e, b) for t in tables
                          for e, b in zip(t["experiment"], t["baseline"], strict=True))
    rows = []
    for experiment, baseline in pairs:
        if experiment not in kept.index or baseline not in kept.index:
            continue
        low, high = sorted((kept[experiment], kept[baseline]))
        if np.isfinite(low) and high > KEPT_STEP_RATIO * low:
            rows.append({"experiment": experiment, "baseline": baseline,
                         "flag": KEPT_STEPS_DIFFER, "kept_step": kept[experiment],
                         "baseline_kept_step": kept[baseline]})
    for experiment, g in unconverged(grid).groupby("experiment", sort=False):
        rows.append({"experiment": experiment, "baseline": None, "flag": NOT_CONVERGED,
                     "seeds_not_converged": g["seed"].nunique(),
                     "n_seeds": int(compute.loc[experiment, "n_seeds"])})
    return pd.DataFrame(rows, columns=["experiment", "baseline", "flag", "kept_step",
                                       "baseline_kept_step", "seeds_not_converged", "n_seeds"])
