"""Findings written from the study's tables (:mod:`cxrlib.study.plan`): every sentence carries
its numbers and states the rule behind its verdict, so nothing in notebook 05's findings is
written by hand. No computation here beyond formatting."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from cxrlib.core.kinds import Kind
from cxrlib.core.schema import StatsSpec
from cxrlib.core.vocabulary import kind_labels, verdict_word
from cxrlib.experiments.diagnostics import KEPT_STEPS_DIFFER
from cxrlib.stats import seeds_for_mde
from cxrlib.study.claims import CONTRADICTED, INCONCLUSIVE, NOT_TESTED, SUPPORTED


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


def _mde(row: dict) -> str:
    """The MDE from t at the comparison's df, and at its family's first Holm level."""
    df = f"t at {row['df']:.1f} df" if np.isfinite(row["df"]) else "infinite df"
    text = f"MDE {row['mde']:.3f} (80% power, {df}"
    if row["family_size"] > 1:
        text += f"; {row['mde_holm']:.3f} at Holm's first level, alpha/{row['family_size']:.0f}"
    return text + ")"


def _delta(row: dict, spec: StatsSpec) -> str:
    """Levels, delta, CI, unadjusted p and MDE of one comparison row."""
    return (f"macro AUROC {row['auroc']:.3f} vs {row['baseline_auroc']:.3f}, delta "
            f"{row['delta']:+.3f} ({_ci(row, spec)}, {_p(row['p'])}, {_mde(row)}; "
            f"{_seed_note(int(row['n_seeds']))})")


def comparison_sentence(row: dict, spec: StatsSpec, what: str = "") -> str:
    """One comparison: delta, CI, p, MDE and the verdict with its rule."""
    label = f"{row['experiment']}{f' ({what})' if what else ''}"
    return (f"On {row['test_set']}, {label} vs {row['baseline']}: {_delta(row, spec)}: "
            f"{_verdict_text(row, spec)}.")


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
    """The pre-specified hypotheses (Holm over the primary comparisons of one test set)."""
    return [comparison_sentence(row, spec) for row in primary.to_dict("records")]


def check_sentences(checks: pd.DataFrame, spec: StatsSpec) -> list[str]:
    """The manipulation checks: each control against its baseline, what was expected and
    why, and whether it held (each check judged on its own CI, outside the Holm families)."""
    out = []
    for row in checks.to_dict("records"):
        if row["expected"] == "reported":
            outcome = f"reported, no outcome expected ({row['verdict']} on its own CI)"
        elif pd.isna(row["held"]):
            outcome = "not testable (no macro AUROC under the label rule)"
        else:
            outcome = (f"{row['verdict']} (judged alone, outside the Holm families): the "
                       f"check {'held' if row['held'] else 'FAILED'}")
        out.append(f"Manipulation check ({row['check']}; expected {row['expected']}, since "
                   f"{row['why']}): on {row['test_set']}, {row['experiment']} vs "
                   f"{row['baseline']}: {_delta(row, spec)}: {outcome}.")
    return out


def dose_sentences(dose: pd.DataFrame, spec: StatsSpec) -> list[str]:
    """The dose-response tests: does the gain grow with k (k = 0, the baseline, included)?"""
    out = []
    for row in dose.to_dict("records"):
        where = f"On {row['test_set']}, {row['kind']} at {row['real_fraction']:.0%} real data"
        if row["reason"] != "-":
            out.append(f"{where}: no dose-response slope, {row['reason']}.")
            continue
        trend = ("rises" if row["slope_per_k"] > 0 else "falls") if row["p_holm"] < spec.alpha \
            else "shows no trend"
        out.append(f"{where} {trend} with k ({row['k_values']}, k = 0 the baseline): slope "
                   f"{row['slope_per_k']:+.4f} macro AUROC per +1 k ({_ci(row, spec)}, "
                   f"Holm-adjusted {_p(row['p_holm'])}, {_mde(row)}; "
                   f"{'primary' if row['primary'] else 'secondary'}; "
                   f"{_seed_note(int(row['n_seeds']))}).")
    return out


def secondary_sentences(comparisons: pd.DataFrame, spec: StatsSpec) -> list[str]:
    """Synthetic-only experiments (equivalence to real), then a count of the other secondary
    comparisons (neither hypotheses nor controls) that were better or worse, naming them."""
    secondary = comparisons[~comparisons["primary"] & ~comparisons["control"]]
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


def flag_sentences(flags: pd.DataFrame) -> list[str]:
    """Compared pairs whose kept steps differ more than two-fold, and arms that did not
    converge: a comparison of them measures training as well as data."""
    out = []
    for row in flags.to_dict("records"):
        if row["flag"] == KEPT_STEPS_DIFFER:
            out.append(f"Flag: {row['experiment']} kept step {row['kept_step']:.0f} against "
                       f"{row['baseline_kept_step']:.0f} for {row['baseline']} (means over "
                       f"seeds): the {row['flag']}, so their comparison also measures how long "
                       f"each trained.")
        else:
            out.append(f"Flag: {row['experiment']} {row['flag']} in "
                       f"{row['seeds_not_converged']:.0f} of {row['n_seeds']:.0f} seeds (it ran "
                       f"its whole step budget under protocol converged and may still have "
                       f"been improving).")
    return out


def _claim_estimate(row: dict, spec: StatsSpec) -> str:
    return f"{row['tested']}, delta {row['delta']:+.3f} ({_ci(row, spec)})"


def claims_summary(claims: pd.DataFrame, spec: StatsSpec) -> list[str]:
    """One sentence per claim of the paper: its verdict on each test set it was tested on."""
    out = []
    for number, g in claims.groupby("claim", sort=True):
        head = f"Claim {number} ({g['statement'].iloc[0]})"
        if (g["verdict"] == NOT_TESTED).all():
            out.append(f"{head}: {NOT_TESTED} ({g['tested'].iloc[0]}).")
            continue
        parts = [f"{row['verdict']} on {row['test_set']} by {_claim_estimate(row, spec)}"
                 if row["verdict"] != NOT_TESTED else f"not tested {row['scope']}ly "
                 f"({row['tested']})" for row in g.to_dict("records")]
        out.append(f"{head}: " + "; ".join(parts) + ".")
    return out


def _seeds_needed(row: dict, spec: StatsSpec) -> str:
    """What would make a comparison detect the equivalence margin: more training seeds (how
    many, from its own variance terms), or more test patients where no seed count would."""
    margin = spec.equivalence_margin
    if not (row.get("mde", math.inf) > margin and np.isfinite(row.get("n_seeds", np.nan))):
        return ""
    n = seeds_for_mde(row["seed_se"], row["patient_se"], int(row["n_seeds"]), margin,
                      spec.alpha)
    if n is None:
        return (f"; no number of training seeds would bring it to {margin:g}: the test set's "
                "own variance is too large")
    return f"; {n} training seeds (not {int(row['n_seeds'])}) would detect {margin:g}"


def _claim_rule(row: dict, spec: StatsSpec) -> str:
    """Why a claim row got its verdict, with the MDE where it is inconclusive."""
    margin = spec.equivalence_margin
    ci90 = f"90% CI {row['ci90_low']:+.3f} to {row['ci90_high']:+.3f}"
    holm = f"Holm-adjusted {_p(row['p_holm'])}"
    mde = f"the comparison detects {row['mde']:.3f} with 80% power" + (
        f" ({row['mde_holm']:.3f} at its family's first Holm level)"
        if row["family_size"] > 1 else "")
    if row["test"] == "gain":
        worse = row["p_holm"] < spec.alpha
        return {SUPPORTED: f"a gain ({holm} < {spec.alpha:g})",
                CONTRADICTED: f"no gain: worse ({holm} < {spec.alpha:g})" if worse else
                              f"no gain as large as the margin: equivalent ({ci90} inside "
                              f"+/-{margin:g})",
                INCONCLUSIVE: f"neither a gain nor its absence is shown ({holm}); {mde}, so "
                              f"a smaller gain may be missed{_seeds_needed(row, spec)}"
                }[row["verdict"]]
    return {SUPPORTED: f"equivalent ({ci90} inside +/-{margin:g}) or better",
            CONTRADICTED: f"worse beyond the margin ({holm}, {ci90})",
            INCONCLUSIVE: f"the {ci90} is not inside +/-{margin:g} and the arm is not shown "
                          f"worse; {mde}"}[row["verdict"]]


def claim_sentences(claims: pd.DataFrame, spec: StatsSpec) -> list[str]:
    """The claims table as sentences: each tested row with its estimate, verdict and rule,
    the synthetic arm's exchange rate where one was given, and the confounds not removed."""
    out = []
    for row in claims[claims["verdict"] != NOT_TESTED].to_dict("records"):
        text = (f"Claim {row['claim']} on {row['test_set']}: {_claim_estimate(row, spec)}: "
                f"{row['verdict']}, {_claim_rule(row, spec)}.")
        if np.isfinite(row["exchange_rate"]):
            beyond = (", extrapolated beyond the learning curve"
                      if row["exchange_extrapolated"] else "")
            text += (f" One synthetic image is worth {row['exchange_rate']:.2f} real images "
                     f"({round(100 * (1 - spec.alpha))}% CI {row['exchange_ci_low']:.2f} to "
                     f"{row['exchange_ci_high']:.2f}{beyond}).")
        out.append(text + f" Confounds not removed: {row['confounds']}.")
    return out


def study_findings(summary: pd.DataFrame, primary: pd.DataFrame, dose: pd.DataFrame,
                   comparisons: pd.DataFrame, did: pd.DataFrame, spec: StatsSpec, *,
                   claims: pd.DataFrame, checks: pd.DataFrame,
                   flags: pd.DataFrame) -> list[str]:
    """All sentences of notebook 05 in reading order: the paper's claims (one summary
    sentence each, then the claims table's rows), design, primary, manipulation checks,
    dose-response, secondary, training flags, subgroups.

    Args:
        summary: per experiment and test set (:func:`cxrlib.study.plan.experiment_summary`):
            seeds and the labels in the macro, for the design sentences.
        primary: the pre-specified comparisons (:func:`cxrlib.study.plan.primary_analysis`);
            rows without a delta are left out.
        dose: the dose-response slopes (:func:`cxrlib.study.plan.dose_response`); may be empty.
        comparisons: every comparison (:func:`cxrlib.study.plan.compare_experiments`); those
            neither primary nor control, with a delta, give the secondary sentences.
        did: subgroup differences-in-differences
            (:func:`cxrlib.study.secondary.subgroup_analysis`); may be empty.
        spec: the statistics settings (alpha, equivalence margin, label rule, bootstrap size)
            quoted in the sentences.
        claims: the paper's claims (:func:`cxrlib.study.claims.claims_table`).
        checks: the manipulation checks (:func:`cxrlib.study.plan.manipulation_checks`).
        flags: training flags (:func:`cxrlib.experiments.diagnostics.training_flags`).
    """
    out = claims_summary(claims, spec) + claim_sentences(claims, spec)
    out += design_sentences(summary, spec) + primary_sentences(_testable(primary), spec)
    out += check_sentences(checks, spec) + (dose_sentences(dose, spec) if len(dose) else [])
    out += secondary_sentences(_testable(comparisons), spec) + flag_sentences(flags)
    return out + (subgroup_sentences(did, spec) if len(did) else [])


def _testable(table: pd.DataFrame) -> pd.DataFrame:
    """Rows with a delta (a test set with no label passing the rule has none)."""
    return table[np.isfinite(table["delta"].to_numpy(dtype=float))]


def summary_names(summary: dict[str, Any]) -> dict[str, str]:
    """Identifiers -> labels for a run's ``summary.json``: its arms and test sets (notebook
    05 writes them under ``labels``) and every experiment kind."""
    labels = summary.get("labels") or {}
    return {**kind_labels(), **labels.get("arms", {}), **labels.get("test_sets", {})}


def control_held(summary: dict[str, Any]) -> dict[tuple[str, str], Any]:
    """(test set, baseline) -> whether the perfect-generator control against that baseline
    showed its gain there (None: not judged): what a result on the same test set is read
    against."""
    return {(c["test_set"], c["baseline"]): c.get("held")
            for c in summary.get("manipulation_checks") or []
            if c.get("check") == Kind.REAL_PLUS_ORACLE.label}


def _control_note(row: dict[str, Any], held: dict[tuple[str, str], Any]) -> str:
    """What the perfect-generator control against the same baseline on the same test set
    says about this result."""
    control = held.get((row["test_set"], row["baseline"]))
    if control is None:
        return ""
    gain = row["verdict"].startswith("better")
    if control:
        return "" if gain else ", while the perfect generator did show its gain there"
    return (", though the perfect generator did not show its own gain there" if gain
            else ", and the perfect generator did not show its gain there either")


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def headline(summary: dict[str, Any]) -> list[str]:
    """Two or three sentences a collaborator reads first, from a run's ``summary.json``:
    each primary comparison on every test set with its CI and verdict, what the
    perfect-generator control showed on the same test set, and what one extra image is
    worth in real images. Identifiers are shown as the run's labels where it has them."""
    names = summary_names(summary)
    primary = summary.get("primary") or []
    held = control_held(summary)
    sentences = []
    for (arm, baseline), rows in _by_arm(primary).items():
        parts = []
        for row in rows:
            verdict = verdict_word(row["verdict"].split(" (")[0])
            mde = (f" (only a difference above {row['mde']:.3f} could be detected)"
                   if verdict == "inconclusive" and row.get("mde") is not None else "")
            parts.append(f"{names.get(row['test_set'], row['test_set'])} "
                         f"{_signed(row['delta'])} ({_signed(row['ci_low'])} to "
                         f"{_signed(row['ci_high'])}), {verdict}{mde}{_control_note(row, held)}")
        sentences.append(
            f"{names.get(arm, arm)} against {names.get(baseline, baseline)}, a pre-specified "
            "comparison, as the difference in macro AUROC with its 95% CI: "
            + "; ".join(parts) + ".")
    rates = {arm: r for arm, r in (summary.get("exchange_rate") or {}).items()
             if r.get("rate") is not None}
    if rates:
        worth = [f"{names.get(arm, arm)} {r['rate']:.3f}"
                 + (f" ({r['ci_low']:.3f} to {r['ci_high']:.3f})"
                    if r.get("ci_low") is not None and r.get("ci_high") is not None else "")
                 for arm, r in rates.items()]
        sentences.append("What one extra image is worth in real images, on the internal "
                         "learning curve: " + "; ".join(worth) + ".")
    for arm, r in (summary.get("worth_vs_perfect") or {}).items():
        if r.get("ratio") is None:
            continue
        ci = (f" (95% CI {r['ratio_ci_low']:.2f} to {r['ratio_ci_high']:.2f})"
              if r.get("ratio_ci_low") is not None else
              " (no interval: the perfect generator's own CI reaches 0)")
        sentences.append(f"Against the perfect generator at the same dose "
                         f"({names.get(r['reference'], r['reference'])}), an image of "
                         f"{names.get(arm, arm)} is worth {r['ratio']:.2f}{ci} of one of its "
                         "images: the share of the attainable worth the generator delivers.")
    return sentences


def _by_arm(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Rows grouped by (arm, baseline), in their order."""
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault((row["experiment"], row["baseline"]), []).append(row)
    return out
