"""The study's tables from per-image predictions (notebook 05): each experiment's macro AUROC,
the pre-specified primary analysis, every other comparison with its verdict, dose-response,
per-label deltas, subgroups, calibration, per-label metrics, seed spread and compute.
:mod:`cxrlib.findings` writes their sentences.

The statistics beneath them (the label rule, seeds as a random effect, the patient bootstrap,
clustered DeLong, TOST, Holm) are :mod:`cxrlib.stats`, whose notes state the rules; this module
decides what is compared with what, so that no comparison is chosen after seeing results:

* **Baselines** follow from an experiment's recipe (:meth:`cxrlib.kinds.Kind.baseline_name`).
* **The primary analysis** is every k of the hypotheses of ``stats.primary.kinds`` (its kinds
  that are not controls, :attr:`cxrlib.kinds.Kind.control`) at the primary real fraction
  against its real-only baseline; the subgroup analysis compares one pre-specified pair.
* **Manipulation checks** (:func:`manipulation_checks`): every control arm against its
  baseline, and each real-only fraction against the next smaller one, with the outcome known
  in advance (:data:`CHECK_EXPECTATIONS`). A check tests the instrument, not a hypothesis, so
  it stays outside the hypotheses' Holm families and is judged on its own CI.
* **Verdicts**: better or worse when the Holm-adjusted p is below alpha; "matches" only when
  the 90% CI of delta lies inside +/- ``stats.equivalence_margin`` (TOST); otherwise not
  shown equivalent. Every comparison carries its minimum detectable effect from t at its
  Satterthwaite df (``mde``) and at its family's first Holm level, alpha / m (``mde_holm``).
* **Holm families**: the primary comparisons of one test set; the dose-response tests of one
  test set; the other comparisons of one baseline and test set; the labels of one
  comparison; the subgroup contrasts of one test set. Each manipulation check is a family of
  one.
* **The paper's claims** (:func:`claims_table`) are answered from these rows, each with the
  confounds the run could not remove.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score

from cxrlib.cohort import AGE_BANDS, SUBGROUPS, age_band
from cxrlib.config import StatsSpec
from cxrlib.grid import unconverged
from cxrlib.kinds import Kind
from cxrlib.labels import RACE_GROUPS, RACE_OTHER, RACE_UNKNOWN, SEXES, VIEWS
from cxrlib.stats import (
    CodedTestSet,
    Estimate,
    SeedMacros,
    adjust_holm,
    calibration_metrics,
    cluster_covariance,
    clustered_influence,
    coded_test_sets,
    contrast,
    label_rule,
    macro_and_replicates,
    minimum_detectable_effect,
    patient_bootstrap_weights,
    seed_estimate,
    seed_macros,
    seed_macros_of,
)

_GROUP_ORDER: dict[str, tuple[str, ...]] = {
    "sex": SEXES, "age_band": AGE_BANDS, "race": RACE_GROUPS, "view": VIEWS,
}
_GRID_COLUMNS = ("kind", "k", "real_fraction", "train_site")


# --- Levels, comparisons, the primary analysis --------------------------------------------

def experiment_info(grid: pd.DataFrame) -> pd.DataFrame:
    """One row per experiment of :func:`cxrlib.grid.grid_results` with its recipe columns
    (kind, k, real_fraction, train_site, and n_real/n_synthetic where present), and its
    baseline (:meth:`cxrlib.kinds.Kind.baseline_name`, rendered from the recipe)."""
    extra = [c for c in ("n_real", "n_synthetic") if c in grid.columns]
    info = grid.drop_duplicates("experiment")[["experiment", *_GRID_COLUMNS, *extra]]
    baseline = [Kind(kind).baseline_name(f, site) for kind, f, site in
                info[["kind", "real_fraction", "train_site"]].itertuples(index=False)]
    return info.assign(baseline=baseline).reset_index(drop=True)


def primary_fraction(info: pd.DataFrame, spec: StatsSpec) -> float:
    """The real-data fraction of the primary analysis: ``stats.primary.real_fraction``, or the
    largest fraction with a real-only baseline."""
    fractions = info.loc[info["kind"] == Kind.REAL_ONLY, "real_fraction"].astype(float)
    if fractions.empty:
        raise ValueError("the grid has no real_only experiment, so no primary baseline")
    wanted = spec.primary.real_fraction
    if wanted is None:
        return float(fractions.max())
    if not np.isclose(fractions, wanted).any():
        raise ValueError(f"stats.primary.real_fraction {wanted} is not a real fraction of the "
                         f"grid ({sorted(fractions)})")
    return float(wanted)


def primary_experiments(info: pd.DataFrame, spec: StatsSpec) -> list[str]:
    """The pre-specified hypotheses: every k of the kinds of ``stats.primary.kinds`` that are
    not controls, at the primary fraction, in grid order. Controls named there are reported
    as manipulation checks (:func:`manipulation_checks`), outside the hypotheses' family."""
    at = np.isclose(info["real_fraction"].astype(float), primary_fraction(info, spec))
    hypotheses = [k for k in spec.primary.kinds if not Kind(k).control]
    return info.loc[at & info["kind"].isin(hypotheses), "experiment"].tolist()


def experiment_summary(macros: dict[str, SeedMacros], grid: pd.DataFrame,
                       spec: StatsSpec) -> pd.DataFrame:
    """Macro AUROC per experiment and test set: the mean over seeds of each seed's macro with
    its two-level CI, the seed SD, and, secondary and labelled as such, the macro AUROC of the
    seed ensemble (scores averaged over seeds). Columns for the figures: macro_auroc, ci_low,
    ci_high, and the grid's kind, k, real_fraction, train_site."""
    rows = []
    for sm in macros.values():
        for experiment in sm.point:
            est = contrast(sm, {experiment: 1.0}, spec.alpha)
            rows.append({"experiment": experiment, "test_set": sm.test_set,
                         "macro_auroc": est.estimate, "ci_low": est.ci_low,
                         "ci_high": est.ci_high, "n_seeds": est.n_seeds, "seed_sd": est.seed_sd,
                         "ensemble_macro_auroc (secondary)": sm.ensemble[experiment],
                         "labels_used": len(sm.labels), "left_out": ", ".join(sm.left_out) or "-",
                         "n_images": sm.n_images, "n_patients": sm.n_patients})
    return pd.DataFrame(rows).merge(experiment_info(grid), on="experiment", how="left")


def internal_baseline(summary: pd.DataFrame, test_set: str,
                      real_fraction: float | None = None) -> pd.Series:
    """The :func:`experiment_summary` row of the real-only baseline on ``test_set``
    (:func:`cxrlib.cohort.headline_test_set`) at ``real_fraction``, the primary analysis's
    (``stats.primary.real_fraction``; None = the largest): the run's headline baseline, the
    arm its primary comparisons are made against rather than the top of the learning curve."""
    real = summary[(summary["kind"] == Kind.REAL_ONLY) & (summary["test_set"] == test_set)]
    if real.empty:
        raise ValueError(f"no real_only result on the test set {test_set}")
    fractions = real["real_fraction"].astype(float)
    if real_fraction is None:
        return real.loc[fractions.idxmax()]
    at = real[np.isclose(fractions, real_fraction)]
    if at.empty:
        raise ValueError(f"stats.primary.real_fraction {real_fraction} has no real_only result "
                         f"on {test_set} (real fractions run: {sorted(set(fractions))})")
    return at.iloc[0]


def _verdict(row: dict, alpha: float, margin: float) -> str:
    """better / worse (Holm-adjusted p < alpha), else matches (90% CI inside +/- margin), else
    not shown equivalent."""
    if not np.isfinite(row["p_holm"]):
        return "n/a"
    inside = -margin < row["ci90_low"] and row["ci90_high"] < margin
    if row["p_holm"] < alpha:
        word = "better" if row["delta"] > 0 else "worse"
        return word + (" (within the equivalence margin)" if inside else "")
    return "matches" if inside else "not shown equivalent"


def _comparison_row(sm: SeedMacros, experiment: str, baseline: str, spec: StatsSpec) -> dict:
    """One experiment against its baseline on one test set (per-seed paired macro deltas)."""
    est = contrast(sm, {experiment: 1.0, baseline: -1.0}, spec.alpha)
    level = contrast(sm, {experiment: 1.0}, spec.alpha).estimate
    base = contrast(sm, {baseline: 1.0}, spec.alpha).estimate
    return {"experiment": experiment, "baseline": baseline, "test_set": sm.test_set,
            "auroc": level, "baseline_auroc": base, "delta": est.estimate,
            "ci_low": est.ci_low, "ci_high": est.ci_high, "ci90_low": est.ci90_low,
            "ci90_high": est.ci90_high, "se": est.se, "df": est.df, "p": est.p,
            "p_floor": 0.0, "p_equivalence": est.equivalence_p(spec.equivalence_margin),
            "mde": est.mde, "n_seeds": est.n_seeds, "seed_sd": est.seed_sd,
            "seed_se": est.seed_se, "patient_se": est.patient_se,
            "ensemble_delta (secondary)": sm.ensemble[experiment] - sm.ensemble[baseline],
            "labels_used": len(sm.labels), "left_out": ", ".join(sm.left_out) or "-"}


def compare_to_baseline(macros: dict[str, SeedMacros], baseline: str,
                        experiments: Sequence[str], spec: StatsSpec,
                        family: str | None = None) -> pd.DataFrame:
    """``experiments`` against ``baseline`` on every test set: per-seed paired macro deltas
    with two-level CIs, analytic p, Holm within ``family`` + test set (default: the baseline),
    TOST p and the verdict (better, worse, matches, not shown equivalent)."""
    rows = []
    for sm in macros.values():
        if baseline not in sm.point:
            raise ValueError(f"baseline {baseline!r} has no predictions on test set "
                             f"{sm.test_set!r}; finish the grid (notebook 04) first")
        for experiment in experiments:
            row = _comparison_row(sm, experiment, baseline, spec)
            rows.append({**row, "family": f"{family or baseline}: {sm.test_set}"})
    if not rows:
        raise ValueError(f"no experiment to compare with {baseline!r}")
    return _judge(pd.DataFrame(rows), spec)


def _holm_with_mde(table: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Holm within each ``family`` (``p_holm``), the family's size m (its tested rows) and
    ``mde_holm``: the minimum detectable effect at Holm's first level, alpha / m, where the
    family's smallest p is judged (from the rows' ``se`` and ``df``)."""
    table = adjust_holm(table)
    m = table.groupby("family", sort=False)["p"].transform("count")
    table["family_size"] = m
    table["mde_holm"] = [minimum_detectable_effect(se, df, alpha / max(n, 1)) for se, df, n in
                         zip(table["se"], table["df"], m, strict=True)]
    return table


def _judge(table: pd.DataFrame, spec: StatsSpec) -> pd.DataFrame:
    """Holm within each ``family`` (with ``mde_holm``), then each comparison's verdict from
    its adjusted p."""
    table = _holm_with_mde(table, spec.alpha)
    table["verdict"] = [_verdict(r, spec.alpha, spec.equivalence_margin)
                        for r in table.to_dict("records")]
    return table


def _check_family(experiment: str, baseline: str) -> str:
    """The Holm family of one manipulation check: itself alone."""
    return f"check: {experiment} vs {baseline}"


def compare_experiments(macros: dict[str, SeedMacros], grid: pd.DataFrame,
                        spec: StatsSpec) -> pd.DataFrame:
    """Every experiment against its baseline (:func:`experiment_info`), with ``primary``
    marking the pre-specified hypotheses and ``control`` the manipulation checks. Holm
    families: the primary comparisons of one test set; each control alone; the others of one
    baseline and test set."""
    info = experiment_info(grid)
    primary = set(primary_experiments(info, spec))
    present = set().union(*(sm.point for sm in macros.values()))
    info = info[info["experiment"].isin(present) & (info["experiment"] != info["baseline"])]
    control = info["kind"].map(lambda kind: Kind(kind).control)
    parts = [compare_to_baseline(macros, row.baseline, [row.experiment], spec,
                                 _check_family(row.experiment, row.baseline))
             for row in info[control].itertuples(index=False)]
    for baseline, group in info[~control].groupby("baseline", sort=False):
        for is_primary, members in group.groupby(group["experiment"].isin(primary), sort=False):
            parts.append(compare_to_baseline(
                macros, str(baseline), members["experiment"].tolist(), spec,
                "primary" if is_primary else None))
    if not parts:
        raise ValueError("the grid has no experiment to compare with a baseline")
    table = pd.concat(parts, ignore_index=True)
    table = table.assign(primary=table["experiment"].isin(primary),
                         control=table["experiment"].isin(info.loc[control, "experiment"]))
    table = table.merge(info[["experiment", *_GRID_COLUMNS]], on="experiment", how="left")
    return _judge(table, spec)  # a family may span baselines: adjust within each again


def primary_analysis(data: pd.DataFrame | dict[str, SeedMacros], grid: pd.DataFrame,
                     spec: StatsSpec) -> pd.DataFrame:
    """The pre-specified primary comparisons, one row each: every k of the primary hypotheses
    (e.g. real + synthetic; its controls are :func:`manipulation_checks`) at the primary
    fraction against its real-only baseline on every test set. ``data`` is the predictions
    frame or :func:`seed_macros`' result.

    Columns include experiment, baseline, test_set, delta, ci_low, ci_high, se, df, p
    (unadjusted, analytic), p_holm (Holm over the primary comparisons of the test set), mde
    (the minimum detectable effect at 80% power and level alpha, from t at the comparison's
    df), mde_holm (the same at Holm's first level, alpha / family_size), n_seeds, verdict,
    kind and k.
    """
    info = experiment_info(grid)
    wanted = primary_experiments(info, spec)
    if not wanted:
        kinds = ", ".join(k.value for k in spec.primary.kinds if not Kind(k).control)
        raise ValueError(f"the grid has no experiment of the primary hypotheses ("
                         f"{kinds or 'none: every kind of stats.primary.kinds is a control'}) "
                         f"at real fraction {primary_fraction(info, spec)}")
    if isinstance(data, pd.DataFrame):
        keep = set(wanted) | set(info.loc[info["experiment"].isin(wanted), "baseline"])
        data = seed_macros(data[data["experiment"].isin(keep)], spec)
    parts = [compare_to_baseline(data, str(b), g["experiment"].tolist(), spec, "primary")
             for b, g in info[info["experiment"].isin(wanted)].groupby("baseline", sort=False)]
    table = _judge(pd.concat(parts, ignore_index=True), spec).assign(primary=True,
                                                                     control=False)
    return table.merge(info[["experiment", *_GRID_COLUMNS]], on="experiment", how="left")


#: What each control arm must show against its baseline for the instrument to be trusted:
#: "better" (CI above 0), "not better" (CI not above 0), "not worse" (CI not below 0), or
#: "reported" (no outcome is known in advance; the estimate is informative).
CHECK_EXPECTATIONS: dict[Kind, str] = {
    Kind.REAL_PLUS_ORACLE: "better",
    Kind.REAL_PLUS_ORACLE_SMOOTH: "better",
    Kind.ORACLE_ONLY: "not worse",
    Kind.REAL_PLUS_SHUFFLED: "not better",
    Kind.REAL_REPEATED: "not better",
    Kind.EXTERNAL_PLUS_REAL: "reported",
}
#: Why each expectation holds, for the table and the findings.
_CHECK_REASONS: dict[Kind, str] = {
    Kind.REAL_PLUS_ORACLE: "fresh images of the same rows are what a perfect generator returns",
    Kind.REAL_PLUS_ORACLE_SMOOTH: "a perfect generator without detector noise; a loss against "
                                  "real + oracle is the cost of the missing noise",
    Kind.ORACLE_ONLY: "as many or more fresh images of the same rows as the real rows",
    Kind.REAL_PLUS_SHUFFLED: "images whose labels carry no information",
    Kind.REAL_REPEATED: "repeating the rows leaves each real image's chance of being drawn "
                        "unchanged, so it matches by construction",
    Kind.EXTERNAL_PLUS_REAL: "as many internal real images as the synthetic arm adds synthetic "
                             "ones: what the synthetic arm's gain is to be read against",
}
MORE_REAL = "more real data beats less"


def _held(verdict: str, expected: str) -> bool | None:
    """Whether a check's outcome (its own verdict, a family of one) is what was expected."""
    if expected == "reported" or verdict == "n/a":
        return None
    if expected == "better":
        return verdict.startswith("better")
    if expected == "not better":
        return not verdict.startswith("better")
    return not verdict.startswith("worse")


def manipulation_checks(macros: dict[str, SeedMacros], grid: pd.DataFrame,
                        spec: StatsSpec) -> pd.DataFrame:
    """The manipulation checks, each against its baseline on every test set, outside the
    hypotheses' Holm families (each is a family of one, so its verdict follows its own CI):
    every control arm of the grid (:attr:`cxrlib.kinds.Kind.control`, expected outcome in
    :data:`CHECK_EXPECTATIONS`), then each real-only fraction against the next smaller one at
    the same seeds (expected better). Columns: those of :func:`compare_to_baseline` and the
    grid's recipe, ``check`` (what it is), ``expected``, ``why`` and ``held`` (None where
    nothing is expected)."""
    info = experiment_info(grid)
    present = set().union(*(sm.point for sm in macros.values()))
    info = info[info["experiment"].isin(present)]
    controls = info[info["kind"].map(lambda kind: Kind(kind).control)]
    pairs = [(r.experiment, r.baseline, Kind(r.kind).label, CHECK_EXPECTATIONS[Kind(r.kind)],
              _CHECK_REASONS[Kind(r.kind)]) for r in controls.itertuples(index=False)]
    real = info[info["kind"] == Kind.REAL_ONLY].sort_values("real_fraction")
    pairs += [(larger, smaller, MORE_REAL, "better",
               "a larger real subset, nothing synthetic")
              for smaller, larger in pairwise(real["experiment"])]
    columns = ["experiment", "baseline", "check", "expected", "why", "test_set", "delta",
               "ci_low", "ci_high", "verdict", "held"]
    if not pairs:
        return pd.DataFrame(columns=columns)
    parts = [compare_to_baseline(macros, baseline, [experiment], spec,
                                 _check_family(experiment, baseline))
             .assign(check=check, expected=expected, why=why)
             for experiment, baseline, check, expected, why in pairs]
    table = pd.concat(parts, ignore_index=True)
    table["held"] = [_held(v, e) for v, e in zip(table["verdict"], table["expected"],
                                                 strict=True)]
    return table.merge(info[["experiment", *_GRID_COLUMNS]], on="experiment", how="left")


#: A dose-response slope needs this many distinct doses, k = 0 (the baseline) included.
MIN_DOSES = 3


def dose_response(macros: dict[str, SeedMacros], grid: pd.DataFrame,
                  spec: StatsSpec) -> pd.DataFrame:
    """Trend of macro AUROC on k for each family of ``stats.primary.dose_response_kinds`` at
    each real fraction, with its baseline as dose k = 0: the least-squares slope (per +1 k,
    i.e. per 100% synthetic) as a per-seed contrast with the two-level SE, its mde and
    mde_holm. A family with fewer than :data:`MIN_DOSES` distinct doses gets no slope (two
    doses make it a plain difference) and a row whose ``reason`` says so. ``primary`` marks the
    primary fraction; Holm over the slopes of one test set."""
    info = experiment_info(grid)
    fraction = primary_fraction(info, spec)
    rows = []
    for (kind, f, _site), fam in info[info["kind"].isin(spec.primary.dose_response_kinds)
                                      ].groupby(["kind", "real_fraction", "train_site"],
                                                sort=False):
        arms = {str(fam["baseline"].iloc[0]): 0.0,
                **dict(zip(fam["experiment"], fam["k"].astype(float), strict=True))}
        ks = np.array(list(arms.values()))
        doses = np.unique(ks)
        reason = (f"only {len(doses)} dose(s) (k = {', '.join(str(int(k)) for k in doses)}; "
                  f"k = 0 is {next(iter(arms))}): a slope needs at least {MIN_DOSES}"
                  if len(doses) < MIN_DOSES else "")
        w = (ks - ks.mean()) / ((ks - ks.mean()) ** 2).sum()
        for sm in macros.values():
            if not set(arms) <= set(sm.point):
                continue
            est = (Estimate.missing(0) if reason
                   else contrast(sm, dict(zip(arms, w, strict=True)), spec.alpha))
            rows.append({"kind": kind, "real_fraction": f, "test_set": sm.test_set,
                         "k_values": ", ".join(str(int(k)) for k in doses),
                         "n_doses": len(doses), "slope_per_k": est.estimate,
                         "ci_low": est.ci_low, "ci_high": est.ci_high, "se": est.se,
                         "df": est.df, "p": est.p, "p_floor": 0.0, "mde": est.mde,
                         "n_seeds": est.n_seeds, "primary": bool(np.isclose(f, fraction)),
                         "reason": reason or "-", "family": f"dose-response: {sm.test_set}"})
    table = pd.DataFrame(rows)
    return _holm_with_mde(table, spec.alpha) if len(table) else table


def compare_labels(predictions: pd.DataFrame, pairs: Sequence[tuple[str, str]],
                   spec: StatsSpec) -> pd.DataFrame:
    """Per-label AUROC deltas of each (experiment, baseline) pair on every test set, for the
    labels that pass the label rule. Per seed paired deltas; the patient level is the
    clustered DeLong variance (Obuchowski 1997) the seeds share, so each label's CI and p come
    from one method. Holm over the labels of one comparison and test set."""
    needed = {e for pair in pairs for e in pair}
    rows = []
    for ts in coded_test_sets(predictions[predictions["experiment"].isin(needed)],
                              ("experiment", "seed")):
        used = label_rule(ts.targets, spec.min_positives)
        seeds: dict[str, set] = {}
        for experiment, seed in ts.scores:
            seeds.setdefault(experiment, set()).add(seed)
        for experiment, baseline in pairs:
            common = sorted(seeds.get(experiment, set()) & seeds.get(baseline, set()), key=str)
            if not common:
                raise ValueError(f"{experiment} and {baseline} share no seed on {ts.name!r}")
            for j in np.flatnonzero(used):
                known = ~np.isnan(ts.targets[:, j])
                stack = np.vstack([ts.scores[(e, s)][known, j]
                                   for s in common for e in (experiment, baseline)])
                aucs, psi = clustered_influence(ts.targets[known, j], stack,
                                                ts.patient_ids[known])
                values = aucs[0::2] - aucs[1::2]
                est = seed_estimate(values, cluster_covariance(psi[0::2] - psi[1::2]),
                                    spec.alpha)
                rows.append({"experiment": experiment, "baseline": baseline,
                             "test_set": ts.name, "label": ts.labels[j],
                             "n_pos": int((ts.targets[known, j] == 1).sum()),
                             "n_neg": int((ts.targets[known, j] == 0).sum()),
                             "auroc": float(aucs[0::2].mean()),
                             "baseline_auroc": float(aucs[1::2].mean()), "delta": est.estimate,
                             "ci_low": est.ci_low, "ci_high": est.ci_high, "p": est.p,
                             "p_floor": 0.0, "n_seeds": est.n_seeds,
                             "test": "clustered DeLong + seeds",
                             "family": f"{experiment}: {ts.name}"})
    table = pd.DataFrame(rows)
    return adjust_holm(table) if len(table) else table


# --- Subgroups ------------------------------------------------------------------------------

def _group_values(ts: CodedTestSet, by: str) -> tuple[pd.Series, list[str]]:
    """Each image's group for ``by`` (NaN = in no group) and the groups in display order."""
    column = "age" if by == "age_band" else by
    if column not in ts.attributes.columns:
        raise ValueError(f"test set {ts.name!r}: predictions lack the column {column!r}")
    values = ts.attributes[column]
    if by == "age_band":
        values = age_band(values).astype(object)
    elif by == "race":
        values = values.where(~values.isin([RACE_UNKNOWN, RACE_OTHER]))
    present = set(values.dropna().unique())
    preferred = _GROUP_ORDER[by]
    order = [g for g in preferred if g in present] + sorted(present - set(preferred), key=str)
    return values, order


def _common_labels(ts: CodedTestSet, members: dict[str, np.ndarray],
                   min_positives: int) -> tuple[np.ndarray, list[str], list[str]]:
    """The label set shared by the groups of one attribute: labels passing the rule in every
    group kept. Groups are dropped smallest first until at least one label is common.
    Returns the label mask, the groups kept (display order) and the groups dropped."""
    kept = list(members)
    while len(kept) >= 2:
        used = np.logical_and.reduce([label_rule(ts.targets[members[g]], min_positives)
                                      for g in kept])
        if used.any():
            return used, kept, [g for g in members if g not in kept]
        kept.remove(min(kept, key=lambda g: len(members[g])))
    return np.zeros(len(ts.labels), dtype=bool), [], list(members)


def subgroup_analysis(predictions: pd.DataFrame, experiment: str, baseline: str,
                      spec: StatsSpec) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The pre-specified subgroup comparison: ``experiment`` against ``baseline`` within each
    group of ``stats.subgroups``, and difference-in-differences between groups.

    Per test set and attribute, every group's macro uses one common label set
    (:func:`_common_labels`). The reference group is the largest; for each other group the
    contrast is (experiment - baseline in the group) - (experiment - baseline in the
    reference), per seed, with the two-level SE and Holm over the test set's contrasts.
    Returns (groups, did): groups has experiment, test_set, by, group, macro_auroc, ci_low,
    ci_high (two-level), n_images, n_patients, labels_used, left_out, dropped_groups.
    """
    unknown = [b for b in spec.subgroups if b not in SUBGROUPS]
    if unknown:
        raise ValueError(f"unknown subgroup(s) {unknown}; choose from {SUBGROUPS}")
    pair = predictions[predictions["experiment"].isin([experiment, baseline])]
    groups, did = [], []
    for ts in coded_test_sets(pair, ("experiment", "seed")):
        weights = patient_bootstrap_weights(ts.patient_ids, spec.n_boot, spec.seed)
        for by in spec.subgroups:
            values, order = _group_values(ts, by)
            members = {g: np.flatnonzero((values == g).to_numpy()) for g in order}
            used, kept, dropped = _common_labels(ts, members, spec.min_positives)
            if not kept:
                continue
            parts = [seed_macros_of(ts, used, weights, members[g], g) for g in kept]
            sm = SeedMacros(ts.name, parts[0].labels, parts[0].left_out, len(ts.image_ids),
                            len(pd.unique(ts.patient_ids)),
                            {k: v for p in parts for k, v in p.point.items()},
                            {k: v for p in parts for k, v in p.replicates.items()},
                            {k: v for p in parts for k, v in p.ensemble.items()})
            common = {"test_set": ts.name, "by": by, "labels_used": len(sm.labels),
                      "left_out": ", ".join(sm.left_out) or "-",
                      "dropped_groups": ", ".join(dropped) or "-"}
            for g, part in zip(kept, parts, strict=True):
                for e in (baseline, experiment):
                    est = contrast(sm, {(e, g): 1.0}, spec.alpha)
                    groups.append({"experiment": e, "group": g, "macro_auroc": est.estimate,
                                   "ci_low": est.ci_low, "ci_high": est.ci_high,
                                   "n_images": part.n_images, "n_patients": part.n_patients,
                                   **common})
            ref = max(kept, key=lambda g: len(members[g]))
            for g in kept:
                if g == ref:
                    continue
                delta_g = contrast(sm, {(experiment, g): 1.0, (baseline, g): -1.0}, spec.alpha)
                delta_r = contrast(sm, {(experiment, ref): 1.0, (baseline, ref): -1.0},
                                   spec.alpha)
                est = contrast(sm, {(experiment, g): 1.0, (baseline, g): -1.0,
                                    (experiment, ref): -1.0, (baseline, ref): 1.0}, spec.alpha)
                did.append({"experiment": experiment, "baseline": baseline, "group": g,
                            "reference": ref, "delta_group": delta_g.estimate,
                            "delta_reference": delta_r.estimate, "did": est.estimate,
                            "ci_low": est.ci_low, "ci_high": est.ci_high, "p": est.p,
                            "p_floor": 0.0, "n_seeds": est.n_seeds,
                            "family": f"subgroups: {ts.name}", **common})
    did_table = pd.DataFrame(did)
    return pd.DataFrame(groups), adjust_holm(did_table) if len(did_table) else did_table


def subgroup_pair(grid: pd.DataFrame, spec: StatsSpec) -> tuple[str, str]:
    """The pre-specified (experiment, baseline) of the subgroup analysis:
    ``stats.primary.subgroup_kind`` at ``subgroup_k`` (None = its largest k) at the primary
    fraction, never a choice made on test results."""
    info = experiment_info(grid)
    at = np.isclose(info["real_fraction"].astype(float), primary_fraction(info, spec))
    pool = info[at & (info["kind"] == spec.primary.subgroup_kind)]
    k = spec.primary.subgroup_k
    chosen = pool[pool["k"] == (pool["k"].max() if k is None else k)]
    if chosen.empty:
        raise ValueError(f"the grid has no {spec.primary.subgroup_kind} experiment with "
                         f"k = {k} at the primary real fraction")
    row = chosen.iloc[0]
    return str(row["experiment"]), str(row["baseline"])


# --- Calibration, per-label metrics, seeds and compute -------------------------------------

def calibration_table(predictions: pd.DataFrame, spec: StatsSpec) -> pd.DataFrame:
    """Calibration per experiment and test set over the labels passing the label rule: Brier
    and ECE averaged over labels, the calibration slope's median over labels (a slope can be
    huge on a nearly separable label), each the mean over seeds (the seed's own model)."""
    rows = []
    for ts in coded_test_sets(predictions, ("experiment", "seed")):
        used = np.flatnonzero(label_rule(ts.targets, spec.min_positives))
        per_seed: dict[Hashable, list[tuple[float, float, float]]] = {}
        for (experiment, _seed), scores in ts.scores.items():
            metrics = []
            for j in used:
                known = ~np.isnan(ts.targets[:, j])
                metrics.append(calibration_metrics(ts.targets[known, j], scores[known, j],
                                                   spec.calibration_bins))
            m = np.array(metrics).reshape(-1, 3)
            summary = (m[:, 0].mean(), m[:, 1].mean(), np.median(m[:, 2])) if len(m) else (
                math.nan,) * 3
            per_seed.setdefault(experiment, []).append(summary)
        for experiment, values in per_seed.items():
            brier, ece, slope = np.mean(values, axis=0)
            rows.append({"experiment": experiment, "test_set": ts.name, "brier": brier,
                         "ece": ece, "calibration_slope (median)": slope,
                         "n_seeds": len(values), "labels_used": len(used)})
    return pd.DataFrame(rows)


def label_metrics(predictions: pd.DataFrame, spec: StatsSpec) -> pd.DataFrame:
    """AUROC and AUPRC per experiment, test set and label (means over seeds), with the
    label's counts, prevalence, whether it enters the macro and whether it is rare
    (prevalence below ``stats.rare_prevalence``; AUPRC's chance level is the prevalence)."""
    rows = []
    for ts in coded_test_sets(predictions, ("experiment", "seed")):
        used = label_rule(ts.targets, spec.min_positives)
        cells: dict[tuple[Hashable, int], list[tuple[float, float]]] = {}
        for (experiment, _seed), scores in ts.scores.items():
            for j in range(len(ts.labels)):
                known = ~np.isnan(ts.targets[:, j])
                y = ts.targets[known, j]
                if 0 < y.sum() < len(y):
                    cells.setdefault((experiment, j), []).append(
                        (roc_auc_score(y, scores[known, j]),
                         average_precision_score(y, scores[known, j])))
        for (experiment, j), values in cells.items():
            known = ts.targets[~np.isnan(ts.targets[:, j]), j]
            prevalence = float(known.mean())
            auroc, auprc = np.mean(values, axis=0)
            rows.append({"experiment": experiment, "test_set": ts.name, "label": ts.labels[j],
                         "n_pos": int(known.sum()), "n_neg": int(len(known) - known.sum()),
                         "prevalence": prevalence, "in_macro": bool(used[j]),
                         "rare": prevalence < spec.rare_prevalence, "auroc": auroc,
                         "auprc": auprc, "n_seeds": len(values)})
    return pd.DataFrame(rows)


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
    """Compute per experiment from :func:`cxrlib.grid.grid_results`: seeds, the protocol, and
    the mean per seed of optimizer steps, the kept step (``best_step``, whose weights were
    evaluated), images seen, passes per unique real image and training wall time (NaN where
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


# --- Training that differs beyond the data, and the paper's claims --------------------------

#: Two compared arms whose mean kept steps differ by more than this factor are flagged.
KEPT_STEP_RATIO = 2.0
KEPT_STEPS_DIFFER = f"kept steps differ more than {KEPT_STEP_RATIO:g}-fold"
NOT_CONVERGED = "did not converge"


def training_flags(grid: pd.DataFrame, *tables: pd.DataFrame) -> pd.DataFrame:
    """Where a comparison may measure training rather than data: each (experiment, baseline)
    pair of ``tables`` whose mean kept steps (:func:`compute_table`) differ more than
    :data:`KEPT_STEP_RATIO`-fold, then each arm with seeds that ran their whole budget under
    protocol converged (:func:`cxrlib.grid.unconverged`). Columns: experiment, baseline (None
    for an arm), flag, kept_step, baseline_kept_step, seeds_not_converged, n_seeds."""
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


@dataclass(frozen=True)
class Claim:
    """One of the paper's claims and the comparisons of the grid that test it: every
    experiment of ``kind`` (at the primary fraction for internal kinds; k in ``ks`` unless
    None) against its baseline on every test set; ``test`` is what supports it, a gain
    (better) or an equivalence (TOST); ``confounds`` what the design cannot remove."""

    number: int
    statement: str
    kind: Kind
    ks: tuple[int, ...] | None
    test: Literal["gain", "equivalence"]
    confounds: tuple[str, ...]
    #: Test-set scopes the claim names (:func:`test_set_scope`); one without a row is
    #: reported as not tested.
    scopes: tuple[str, ...] = ()


#: The distillation confound, by what the generator learned from (``diffusion.train_on``).
DISTILLATION: dict[str, str] = {
    "all": "distillation: the generator was trained on all internal training patients, so "
           "synthetic images can carry information from patients outside the arm's real subset",
    "sources": "distillation, narrowed: the generator learned only from the source patients "
               "(diffusion.train_on: sources); an arm whose real subset is smaller than the "
               "source draw still gets images from a generator that saw the other source "
               "patients",
}
_DISTILLATION = "distillation"  # where CLAIMS name it; claims_table fills in the run's text
#: The paper's three claims (issue 18, item 7).
CLAIMS: tuple[Claim, ...] = (
    Claim(1, "synthetic supplementation improves performance internally and externally",
          Kind.REAL_PLUS_SYNTHETIC, None, "gain",
          (_DISTILLATION, "label coverage: replicas repeat their source rows' label "
                          "combinations, so no unseen combination is added"),
          scopes=("internal", "external")),
    Claim(2, "synthetic-only training matches real training at +200-300% (k = 2-3)",
          Kind.SYNTHETIC_ONLY, (2, 3), "equivalence",
          (_DISTILLATION, "the synthetic images are replicas of the same real rows, so the "
                          "arm is bounded by the generator's fidelity (the oracle_only check "
                          "shows what a perfect generator reaches)")),
    Claim(3, "an external site's data plus synthetic images beats the external site alone "
             "(the cross-site gain)",
          Kind.EXTERNAL_PLUS_SYNTHETIC, None, "gain",
          (_DISTILLATION, "label coverage: labels the external site does not annotate are "
                          "carried by the synthetic images only (the site's blank policy)",
           "internal-site data: the synthetic images add the internal site's style and "
           "patients, which external_plus_real controls for with real images")),
)
#: A claim's verdicts (:func:`claim_verdict`), and the one for a claim without its arms.
SUPPORTED = "supported"
CONTRADICTED = "contradicted"
INCONCLUSIVE = "inconclusive"
NOT_TESTED = "not tested in this run"


def claim_verdict(test: str, verdict: str, ci90_low: float, ci90_high: float,
                  margin: float) -> str:
    """supported / contradicted / inconclusive from a comparison's verdict. A gain: supported
    when better (Holm), contradicted when worse or shown equivalent (TOST: no gain as large as
    the margin), else inconclusive (the MDE says what could have been missed). An
    equivalence: supported when the 90% CI lies inside +/- margin or the arm is better,
    contradicted when worse beyond the margin, else inconclusive."""
    if test == "gain":
        if verdict.startswith("better"):
            return SUPPORTED
        return CONTRADICTED if verdict.startswith("worse") or verdict == "matches" \
            else INCONCLUSIVE
    if verdict.startswith("better") or -margin < ci90_low and ci90_high < margin:
        return SUPPORTED
    return CONTRADICTED if verdict == "worse" else INCONCLUSIVE


def test_set_scope(test_set: str) -> str:
    """internal or external, from the test set's name (:func:`cxrlib.cohort.test_sets` names
    them ``<site> (internal|external)``)."""
    return "external" if test_set.endswith("(external)") else "internal"


def _pair_confounds(grid: pd.DataFrame, row: dict) -> list[str]:
    """What differs between a compared pair's training beyond the data: the step-matched
    protocol (passes per real image), kept steps more than two-fold apart, arms that did not
    converge."""
    compute = compute_table(grid).set_index("experiment")
    arms = [row["experiment"], row["baseline"]]
    out = []
    protocols = set(compute.loc[arms, "protocol"].dropna())
    if not protocols:
        out.append("training protocol not recorded")
    elif "steps" in protocols:
        passes = compute.loc[arms, "passes_per_real_image"].astype(float)
        out.append(f"protocol steps: one step budget, so the arms see each real image "
                   f"{passes.iloc[0]:.1f} vs {passes.iloc[1]:.1f} times")
    flags = training_flags(grid, pd.DataFrame([row]))
    for flag in flags.to_dict("records"):
        if flag["flag"] == KEPT_STEPS_DIFFER:
            out.append(f"{KEPT_STEPS_DIFFER} ({flag['kept_step']:.0f} vs "
                       f"{flag['baseline_kept_step']:.0f})")
        elif flag["experiment"] in arms:
            out.append(f"{flag['experiment']} {NOT_CONVERGED} in {flag['seeds_not_converged']} "
                       f"of {flag['n_seeds']} seeds")
    return out


def claims_table(comparisons: pd.DataFrame, grid: pd.DataFrame, spec: StatsSpec,
                 exchange: pd.DataFrame | None = None,
                 train_on: Literal["all", "sources"] = "all") -> pd.DataFrame:
    """The paper's claims (:data:`CLAIMS`) answered by this run: one row per comparison that
    tests a claim (from :func:`compare_experiments`, Holm as there), or one row saying
    "not tested in this run" when the grid lacks its arms. Columns: claim, statement, scope
    (internal / external test set), test_set, tested (experiment vs baseline, or why not),
    experiment, baseline, k, delta, ci_low, ci_high, ci90_low, ci90_high, p_holm, mde,
    mde_holm (t-based, at the family's first Holm level), family_size, test (gain /
    equivalence), verdict (supported / contradicted / inconclusive / not tested in this run;
    also for a scope the claim names without a test set), confounds ("; "), and
    the experiment's exchange rate where ``exchange`` (columns experiment, test_set, rate,
    ci_low, ci_high, extrapolated) gives one. ``train_on`` (``diffusion.train_on``) words
    the distillation confound."""
    fraction = primary_fraction(experiment_info(grid), spec)
    rates = (exchange.set_index(["experiment", "test_set"]) if exchange is not None
             else pd.DataFrame(columns=["rate", "ci_low", "ci_high", "extrapolated"]))
    rows = []
    for claim in CLAIMS:
        chosen = comparisons[comparisons["kind"] == claim.kind]
        if not claim.kind.external:
            chosen = chosen[np.isclose(chosen["real_fraction"].astype(float), fraction)]
        if claim.ks is not None:
            chosen = chosen[chosen["k"].isin(claim.ks)]
        common = {"claim": claim.number, "statement": claim.statement, "test": claim.test}
        if chosen.empty:
            ks = f" with k = {', '.join(map(str, claim.ks))}" if claim.ks else ""
            where = "" if claim.kind.external else f" at {fraction:.0%} real data"
            rows.append({**common, "scope": "-", "test_set": "-", "verdict": NOT_TESTED,
                         "tested": f"no {claim.kind.value} arm{ks}{where} in the grid",
                         "confounds": "-"})
            continue
        scopes = set(chosen["test_set"].map(test_set_scope))
        rows += [{**common, "scope": scope, "test_set": "-", "verdict": NOT_TESTED,
                  "tested": f"no {scope} test set in this run", "confounds": "-"}
                 for scope in claim.scopes if scope not in scopes]
        for row in chosen.to_dict("records"):
            key = (row["experiment"], row["test_set"])
            rate = rates.loc[key] if key in rates.index else None
            rows.append({
                **common, "scope": test_set_scope(row["test_set"]),
                "tested": f"{row['experiment']} vs {row['baseline']}",
                **{c: row[c] for c in ("test_set", "experiment", "baseline", "k", "delta",
                                       "ci_low", "ci_high", "ci90_low", "ci90_high",
                                       "p_holm", "mde", "mde_holm", "family_size")},
                # the variance terms that say how many seeds would reach the margin
                **{c: row.get(c, math.nan) for c in ("n_seeds", "seed_se", "patient_se")},
                "verdict": claim_verdict(claim.test, row["verdict"], row["ci90_low"],
                                         row["ci90_high"], spec.equivalence_margin),
                "confounds": "; ".join([*(DISTILLATION[train_on] if c == _DISTILLATION
                                          else c for c in claim.confounds),
                                        *_pair_confounds(grid, row)]),
                "exchange_rate": math.nan if rate is None else rate["rate"],
                "exchange_ci_low": math.nan if rate is None else rate["ci_low"],
                "exchange_ci_high": math.nan if rate is None else rate["ci_high"],
                "exchange_extrapolated": None if rate is None else bool(rate["extrapolated"])})
    columns = ["claim", "statement", "scope", "test_set", "tested", "experiment", "baseline",
               "k", "delta", "ci_low", "ci_high", "ci90_low", "ci90_high", "p_holm", "mde",
               "mde_holm", "family_size", "n_seeds", "seed_se", "patient_se", "test", "verdict",
               "confounds", "exchange_rate",
               "exchange_ci_low",
               "exchange_ci_high", "exchange_extrapolated"]
    return pd.DataFrame(rows).reindex(columns=columns)
