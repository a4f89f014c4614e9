"""Findings written from the study's tables (:mod:`cxrlib.study_tables`): every sentence carries
its numbers and states the rule behind its verdict, so nothing in notebook 05's findings is
written by hand. No computation here beyond formatting."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxrlib.config import StatsSpec
from cxrlib.kinds import Kind


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _ci(row: dict, spec: StatsSpec, low: str = "ci_low", high: str = "ci_high") -> str:
    return f"{round(100 * (1 - spec.alpha))}% CI {row[low]:+.3f} to {row[high]:+.3f}"


def _seed_note(n_seeds: int) -> str:
    return ("one training seed: training variance is not estimated, so the CI covers test-set "
            "sampling only" if n_seeds < 2 else f"{n_seeds} seeds paired by seed")


def _verdict_text(row: dict, spec: StatsSpec) -> str:
    """The verdict with its rule: Holm-adjusted p for better/worse, the 90% CI for matches."""
    margin = spec.equivalence_margin
    ci90 = f"90% CI {row['ci90_low']:+.3f} to {row['ci90_high']:+.3f}"
    if row["verdict"].startswith(("better", "worse")):
        return (f"{row['verdict']} (Holm-adjusted {_p(row['p_holm'])} < {spec.alpha:g})")
    if row["verdict"] == "matches":
        return f"matches (TOST: {ci90} lies inside +/-{margin:g})"
    if row["verdict"] == "n/a":
        return "not testable (no macro AUROC under the label rule)"
    return (f"not shown equivalent (Holm-adjusted {_p(row['p_holm'])} >= {spec.alpha:g}, and "
            f"the {ci90} is not inside +/-{margin:g})")


def comparison_sentence(row: dict, spec: StatsSpec, what: str = "") -> str:
    """One comparison: delta, CI, p, MDE and the verdict with its rule."""
    label = f"{row['experiment']}{f' ({what})' if what else ''}"
    return (f"On {row['test_set']}, {label} vs {row['baseline']}: macro AUROC "
            f"{row['auroc']:.3f} vs {row['baseline_auroc']:.3f}, delta {row['delta']:+.3f} "
            f"({_ci(row, spec)}, {_p(row['p'])}, MDE {row['mde']:.3f}; "
            f"{_seed_note(int(row['n_seeds']))}): {_verdict_text(row, spec)}.")


def design_sentences(summary: pd.DataFrame, spec: StatsSpec) -> list[str]:
    """How the numbers were made: seeds, and which labels enter the macro on each test set."""
    seeds = int(summary["n_seeds"].max())
    out = [f"Seeds: each comparison pairs seed s of an experiment with seed s of its baseline "
           f"on the same test images; CIs and p-values combine the variance between seeds "
           f"with the patient bootstrap ({spec.n_boot} replicates) and use t with "
           f"Satterthwaite df; p-values are analytic (no bootstrap floor)."]
    if seeds < 2:
        out.append("With one training seed per experiment, training variance is not "
                   "estimated: every CI and p-value below covers test-set sampling only.")
    for test_set, g in summary.groupby("test_set", sort=False):
        first = g.iloc[0]
        out.append(f"On {test_set}, the macro AUROC averages {first['labels_used']} labels with "
                   f"at least {spec.min_positives} positives and {spec.min_positives} negatives "
                   f"(the one label rule of every table); left out: {first['left_out']}.")
    return out


def primary_sentences(primary: pd.DataFrame, spec: StatsSpec) -> list[str]:
    """The pre-specified comparisons, each real + synthetic row followed by its controls at
    the same k (Holm over the primary comparisons of one test set)."""
    out = []
    for (_test_set, _k), g in primary.groupby(["test_set", "k"], sort=False):
        rows = g.to_dict("records")
        for row in sorted(rows, key=lambda r: Kind(r["kind"]).control):
            kind = Kind(row["kind"])
            out.append(comparison_sentence(row, spec, kind.description if kind.control else ""))
    return out


def dose_sentences(dose: pd.DataFrame, spec: StatsSpec) -> list[str]:
    """The dose-response tests: does the gain grow with k?"""
    out = []
    for row in dose.to_dict("records"):
        trend = ("rises" if row["slope_per_k"] > 0 else "falls") if row["p_holm"] < spec.alpha \
            else "shows no trend"
        out.append(f"On {row['test_set']}, {row['kind']} at {row['real_fraction']:.0%} real data "
                   f"{trend} with k ({row['k_values']}): slope {row['slope_per_k']:+.4f} macro "
                   f"AUROC per +1 k ({_ci(row, spec)}, Holm-adjusted {_p(row['p_holm'])}; "
                   f"{'primary' if row['primary'] else 'secondary'}; "
                   f"{_seed_note(int(row['n_seeds']))}).")
    return out


def secondary_sentences(comparisons: pd.DataFrame, spec: StatsSpec) -> list[str]:
    """Synthetic-only experiments (equivalence to real), then a count of the other secondary
    comparisons that were better or worse, naming them."""
    secondary = comparisons[~comparisons["primary"]]
    alone = secondary["kind"] == Kind.SYNTHETIC_ONLY
    out = [comparison_sentence(row, spec, Kind.SYNTHETIC_ONLY.description)
           for row in secondary[alone].to_dict("records")]
    for test_set, g in secondary[~alone].groupby(
            "test_set", sort=False):
        better = g.loc[g["verdict"].str.startswith("better"), "experiment"].tolist()
        worse = g.loc[g["verdict"].str.startswith("worse"), "experiment"].tolist()
        out.append(f"On {test_set}, of {len(g)} secondary comparisons (Holm within each "
                   f"baseline and test set, alpha {spec.alpha:g}), {len(better)} were better "
                   f"({', '.join(better) or 'none'}) and {len(worse)} worse "
                   f"({', '.join(worse) or 'none'}).")
    return out


def subgroup_sentences(did: pd.DataFrame, spec: StatsSpec) -> list[str]:
    """Difference-in-differences between subgroups for the pre-specified comparison."""
    out = []
    for row in did.to_dict("records"):
        clear = row["p_holm"] < spec.alpha
        out.append(f"On {row['test_set']}, by {row['by']}: {row['experiment']} changed macro "
                   f"AUROC by {row['delta_group']:+.3f} in {row['group']} and "
                   f"{row['delta_reference']:+.3f} in {row['reference']} (the largest group), "
                   f"on {row['labels_used']} labels common to the groups; difference-in-"
                   f"differences {row['did']:+.3f} ({_ci(row, spec)}, Holm-adjusted "
                   f"{_p(row['p_holm'])}): "
                   + ("the change differs between the groups." if clear else
                      "no evidence that the change differs between the groups."))
    return out


def study_findings(summary: pd.DataFrame, primary: pd.DataFrame, dose: pd.DataFrame,
                   comparisons: pd.DataFrame, did: pd.DataFrame, spec: StatsSpec) -> list[str]:
    """All sentences of notebook 05 in reading order: design, primary, dose-response,
    secondary, subgroups."""
    out = design_sentences(summary, spec) + primary_sentences(_testable(primary), spec)
    out += dose_sentences(dose, spec) if len(dose) else []
    out += secondary_sentences(_testable(comparisons), spec)
    return out + (subgroup_sentences(did, spec) if len(did) else [])


def _testable(table: pd.DataFrame) -> pd.DataFrame:
    """Rows with a delta (a test set with no label passing the rule has none)."""
    return table[np.isfinite(table["delta"].to_numpy(dtype=float))]
