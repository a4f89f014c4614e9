"""The analysis plan (notebook 05): each experiment's macro AUROC, the pre-specified primary
analysis, every other comparison with its verdict, the manipulation checks and dose-response.
Per-label, subgroup and calibration tables are :mod:`cxrlib.study.secondary`, the paper's
claims :mod:`cxrlib.study.claims`; :mod:`cxrlib.study.findings` writes their sentences.

The statistics beneath them (the label rule, seeds as a random effect, the patient bootstrap,
clustered DeLong, TOST, Holm) are :mod:`cxrlib.stats`, whose notes state the rules; this module
decides what is compared with what, so that no comparison is chosen after seeing results:

* **Baselines** follow from an experiment's recipe (:meth:`cxrlib.core.kinds.Kind.baseline_name`).
* **The primary analysis** is every k of the hypotheses of ``stats.primary.kinds`` (its kinds
  that are not controls, :attr:`cxrlib.core.kinds.Kind.control`) at the primary real fraction
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
* **The paper's claims** (:func:`cxrlib.study.claims.claims_table`) are answered from these
  rows, each with the confounds the run could not remove.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import numpy as np
import pandas as pd

from cxrlib.core.kinds import Kind
from cxrlib.core.schema import StatsSpec
from cxrlib.stats import (
    Estimate,
    SeedMacros,
    adjust_holm,
    contrast,
    minimum_detectable_effect,
    seed_macros,
)

_GRID_COLUMNS = ("kind", "k", "real_fraction", "train_site")


def experiment_info(grid: pd.DataFrame) -> pd.DataFrame:
    """One row per experiment of :func:`cxrlib.experiments.grid.grid_results` with its recipe
    columns (kind, k, real_fraction, train_site, and n_real/n_synthetic where present), and its
    baseline (:meth:`cxrlib.core.kinds.Kind.baseline_name`, rendered from the recipe)."""
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
    (:func:`cxrlib.core.cohort.headline_test_set`) at ``real_fraction``, the primary analysis's
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
    every control arm of the grid (:attr:`cxrlib.core.kinds.Kind.control`, expected outcome in
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
