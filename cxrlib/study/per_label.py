"""Per finding: which of the 14 findings the generator's images help, which they hurt, and
whether that follows the generator's conditional fidelity (notebook 05).

The macro AUROC averages findings whose synthetic images may differ in quality: a generator
can draw cardiomegaly well and pneumothorax badly. So each finding of a test set's macro gets
its own paired comparison: the arm's AUROC on that finding against its baseline's, per seed and
under the same patient-bootstrap replicates as every contrast (:func:`cxrlib.stats.contrast`),
and, where that finding's own real-only learning curve is steep enough to invert
(:data:`cxrlib.study.exchange.MAX_SLOPE_CV`), the real images one extra image is worth for it.
Across findings, the gains are set against the audit's per-finding conditional fidelity (the
judge's AUROC on synthetic images over its AUROC on real ones, notebook 03) with a Spearman
correlation whose CI resamples findings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxrlib.core.kinds import Kind
from cxrlib.core.layout import RunLayout
from cxrlib.core.schema import StatsSpec
from cxrlib.stats import (
    coded_test_sets,
    contrast,
    label_rule,
    patient_bootstrap_weights,
    seed_macros_of,
    spearman_ci,
)
from cxrlib.study.exchange import MIN_SIZES, curve_arms, exchange_rates

#: Notebook 03's table of the judge's AUROC per finding on real and synthetic images.
FIDELITY_TABLE = "conditional_fidelity_per_label"


def label_worth(predictions: pd.DataFrame, grid: pd.DataFrame, spec: StatsSpec, test_set: str,
                arms: list[str]) -> pd.DataFrame:
    """Per finding of ``test_set``'s macro and per arm: the paired AUROC gain over the arm's
    baseline (95% CI, two-level as every contrast) and, where the finding's real-only curve
    can be inverted, its exchange rate. Columns: label, experiment, baseline, gain, ci_low,
    ci_high, rate, rate_ci_low, rate_ci_high, note."""
    found = [t for t in coded_test_sets(predictions, ("experiment", "seed")) if t.name == test_set]
    if not found:
        raise ValueError(f"no predictions on test set {test_set!r}")
    ts = found[0]
    weights = patient_bootstrap_weights(ts.patient_ids, spec.n_boot, spec.seed)
    allowed = label_rule(ts.targets, spec.min_positives)
    recipes = grid.drop_duplicates("experiment").set_index("experiment")
    curve = len(curve_arms(grid)) >= MIN_SIZES
    rows = []
    for j in np.flatnonzero(allowed):
        used = np.zeros(len(ts.labels), dtype=bool)
        used[j] = True
        sm = seed_macros_of(ts, used, weights)
        rates = (exchange_rates({test_set: sm}, grid, spec).set_index("experiment") if curve
                 else pd.DataFrame())
        for arm in arms:
            r = recipes.loc[arm]
            base = Kind(r["kind"]).baseline_name(r["real_fraction"], r["train_site"])
            gain = contrast(sm, {arm: 1.0, base: -1.0}, spec.alpha)
            rate = rates.loc[arm] if arm in rates.index else None
            rows.append({"label": ts.labels[j], "experiment": arm, "baseline": base,
                         "gain": gain.estimate, "ci_low": gain.ci_low, "ci_high": gain.ci_high,
                         "rate": np.nan if rate is None else rate["rate"],
                         "rate_ci_low": np.nan if rate is None else rate["ci_low"],
                         "rate_ci_high": np.nan if rate is None else rate["ci_high"],
                         "note": "no learning curve" if rate is None else rate["note"]})
    return pd.DataFrame(rows)


def label_fidelity(run: RunLayout, strategy: str = "replicas") -> pd.Series:
    """Per finding, the judge's AUROC on ``strategy``'s synthetic images over its AUROC on real
    ones (notebook 03's :data:`FIDELITY_TABLE`); an error names the file when it is absent."""
    path = fidelity_path(run)
    if not path.exists():
        raise FileNotFoundError(f"no per-finding fidelity at {path}; run notebook 03 first")
    table = pd.read_csv(path, header=[0, 1], index_col=0)
    if strategy not in table.columns.get_level_values(0):
        raise KeyError(f"{path} has no cohort {strategy!r}")
    part = table[strategy]
    return (part["synthetic_auroc"] / part["real_auroc"]).rename("fidelity")


def gain_and_fidelity(worth: pd.DataFrame, fidelity: pd.Series, arm: str,
                      seed: int = 0) -> tuple[pd.DataFrame, dict[str, float]]:
    """The arm's per-finding gains beside the findings' fidelity, and the Spearman correlation
    between them with a percentile CI over resampled findings (:func:`cxrlib.stats.spearman_ci`)."""
    both = worth[worth["experiment"] == arm].set_index("label").join(fidelity, how="inner")
    both = both.dropna(subset=["gain", "fidelity"])
    rho = spearman_ci(both["fidelity"].to_numpy(), both["gain"].to_numpy(), seed)
    return both.reset_index(), {**{k: rho[k] for k in ("rho", "ci_low", "ci_high")},
                                "n_labels": rho["n"]}


def label_sentences(worth: pd.DataFrame, arm: str, correlation: dict[str, float] | None = None
                    ) -> list[str]:
    """Which findings the arm's extra images help (gain CI above 0), which they hurt (below
    0), how many neither, and the correlation with fidelity."""
    rows = worth[worth["experiment"] == arm]
    helps = rows.loc[rows["ci_low"] > 0, "label"].tolist()
    hurts = rows.loc[rows["ci_high"] < 0, "label"].tolist()
    said = [f"{arm} against its baseline, finding by finding ({len(rows)} findings; 95% CIs "
            f"not adjusted across findings): helps {', '.join(helps) or 'none'}; hurts "
            f"{', '.join(hurts) or 'none'}; {len(rows) - len(helps) - len(hurts)} with a CI "
            "that includes 0."]
    if correlation is not None and np.isfinite(correlation["rho"]):
        said.append(f"Across {correlation['n_labels']} findings, the gain against the "
                    f"generator's conditional fidelity: Spearman rho {correlation['rho']:+.2f} "
                    f"(95% CI {correlation['ci_low']:+.2f} to {correlation['ci_high']:+.2f}).")
    return said


def fidelity_path(run: RunLayout) -> Path:
    """Where :func:`label_fidelity` reads from."""
    return run.stage("03_sampling_explorer") / f"{FIDELITY_TABLE}.csv"
