"""The study's tables from per-image predictions (notebook 05): each experiment's macro AUROC,
the pre-specified primary analysis, every other comparison with its verdict, dose-response,
per-label deltas, subgroups, calibration, per-label metrics, seed spread and compute.
:mod:`cxrlib.findings` writes their sentences.

The statistics beneath them (the label rule, seeds as a random effect, the patient bootstrap,
clustered DeLong, TOST, Holm) are :mod:`cxrlib.stats`, whose notes state the rules; this module
decides what is compared with what, so that no comparison is chosen after seeing results:

* **Baselines** follow from an experiment's recipe (:meth:`cxrlib.kinds.Kind.baseline_name`).
* **The primary analysis** is every k of ``stats.primary.kinds`` at the primary real fraction
  against its real-only baseline; the subgroup analysis compares one pre-specified pair.
* **Verdicts**: better or worse when the Holm-adjusted p is below alpha; "matches" only when
  the 90% CI of delta lies inside +/- ``stats.equivalence_margin`` (TOST); otherwise not
  shown equivalent.
* **Holm families**: the primary comparisons of one test set; the dose-response tests of one
  test set; the other comparisons of one baseline and test set; the labels of one
  comparison; the subgroup contrasts of one test set.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score

from cxrlib.cohort import AGE_BANDS, SUBGROUPS, age_band
from cxrlib.config import StatsSpec
from cxrlib.kinds import Kind
from cxrlib.labels import RACE_GROUPS, RACE_OTHER, RACE_UNKNOWN, SEXES, VIEWS
from cxrlib.stats import (
    CodedTestSet,
    SeedMacros,
    adjust_holm,
    calibration_metrics,
    cluster_covariance,
    clustered_influence,
    coded_test_sets,
    contrast,
    label_rule,
    macro_and_replicates,
    patient_bootstrap_weights,
    seed_estimate,
    seed_macros,
    seed_macros_of,
)

#: Columns of :func:`primary_analysis` that ``summary.json`` keeps (issue 11's schema).
PRIMARY_COLUMNS: tuple[str, ...] = ("experiment", "baseline", "test_set", "delta", "ci_low",
                                    "ci_high", "p", "mde")
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
    """The pre-specified primary experiments: every k of ``stats.primary.kinds`` at the primary
    fraction (the supplementation and its controls), in grid order."""
    at = np.isclose(info["real_fraction"].astype(float), primary_fraction(info, spec))
    return info.loc[at & info["kind"].isin(spec.primary.kinds), "experiment"].tolist()


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


def internal_baseline(summary: pd.DataFrame, test_set: str) -> pd.Series:
    """The :func:`experiment_summary` row of the real-only baseline at the largest real
    fraction on ``test_set`` (:func:`cxrlib.cohort.headline_test_set`): the run's headline
    baseline."""
    real = summary[(summary["kind"] == Kind.REAL_ONLY) & (summary["test_set"] == test_set)]
    if real.empty:
        raise ValueError(f"no real_only result on the test set {test_set}")
    return real.loc[real["real_fraction"].astype(float).idxmax()]


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


def _judge(table: pd.DataFrame, spec: StatsSpec) -> pd.DataFrame:
    """Holm within each ``family``, then each comparison's verdict from its adjusted p."""
    table = adjust_holm(table)
    table["verdict"] = [_verdict(r, spec.alpha, spec.equivalence_margin)
                        for r in table.to_dict("records")]
    return table


def compare_experiments(macros: dict[str, SeedMacros], grid: pd.DataFrame,
                        spec: StatsSpec) -> pd.DataFrame:
    """Every experiment against its baseline (:func:`experiment_info`), with
    ``primary`` marking the pre-specified comparisons. Holm families: the primary comparisons
    of one test set; the others of one baseline and test set."""
    info = experiment_info(grid)
    primary = set(primary_experiments(info, spec))
    present = set().union(*(sm.point for sm in macros.values()))
    info = info[info["experiment"].isin(present) & (info["experiment"] != info["baseline"])]
    parts = []
    for baseline, group in info.groupby("baseline", sort=False):
        for is_primary, members in group.groupby(group["experiment"].isin(primary), sort=False):
            parts.append(compare_to_baseline(
                macros, str(baseline), members["experiment"].tolist(), spec,
                "primary" if is_primary else None).assign(primary=is_primary))
    if not parts:
        raise ValueError("the grid has no experiment to compare with a baseline")
    table = pd.concat(parts, ignore_index=True)
    table = table.merge(info[["experiment", *_GRID_COLUMNS]], on="experiment", how="left")
    return _judge(table, spec)  # a family may span baselines: adjust within each again


def primary_analysis(data: pd.DataFrame | dict[str, SeedMacros], grid: pd.DataFrame,
                     spec: StatsSpec) -> pd.DataFrame:
    """The pre-specified primary comparisons, one row each: every k of the primary kinds
    (real + synthetic and its controls) at the primary fraction against its real-only baseline
    on every test set. ``data`` is the predictions frame or :func:`seed_macros`' result.

    Columns include experiment, baseline, test_set, delta, ci_low, ci_high, p (unadjusted,
    analytic), p_holm (Holm over the primary comparisons of the test set), mde (the minimum
    detectable effect at 80% power and level alpha from this comparison's two-level SE),
    n_seeds, verdict, kind and k.
    """
    info = experiment_info(grid)
    wanted = primary_experiments(info, spec)
    if not wanted:
        kinds = ", ".join(k.value for k in spec.primary.kinds)
        raise ValueError(f"the grid has no experiment of the primary kinds ({kinds}) "
                         f"at real fraction {primary_fraction(info, spec)}")
    if isinstance(data, pd.DataFrame):
        keep = set(wanted) | set(info.loc[info["experiment"].isin(wanted), "baseline"])
        data = seed_macros(data[data["experiment"].isin(keep)], spec)
    parts = [compare_to_baseline(data, str(b), g["experiment"].tolist(), spec, "primary")
             for b, g in info[info["experiment"].isin(wanted)].groupby("baseline", sort=False)]
    table = _judge(pd.concat(parts, ignore_index=True), spec).assign(primary=True)
    return table.merge(info[["experiment", *_GRID_COLUMNS]], on="experiment", how="left")


def dose_response(macros: dict[str, SeedMacros], grid: pd.DataFrame,
                  spec: StatsSpec) -> pd.DataFrame:
    """Trend of macro AUROC on k for each family of ``stats.primary.dose_response_kinds`` at
    each real fraction with two or more k: the least-squares slope over the grid's k values
    (per +1 k, i.e. per 100% synthetic), a per-seed contrast with the two-level SE. The
    baseline cancels from a slope of deltas, so this asks only whether more helps more.
    ``primary`` marks the primary fraction; Holm within the test set."""
    info = experiment_info(grid)
    fraction = primary_fraction(info, spec)
    rows = []
    for (kind, f), fam in info[info["kind"].isin(spec.primary.dose_response_kinds)].groupby(
            ["kind", "real_fraction"], sort=False):
        ks = fam["k"].to_numpy(dtype=float)
        if len(np.unique(ks)) < 2:
            continue
        w = (ks - ks.mean()) / ((ks - ks.mean()) ** 2).sum()
        for sm in macros.values():
            if not set(fam["experiment"]) <= set(sm.point):
                continue
            est = contrast(sm, dict(zip(fam["experiment"], w, strict=True)), spec.alpha)
            rows.append({"kind": kind, "real_fraction": f, "test_set": sm.test_set,
                         "k_values": ", ".join(str(int(k)) for k in sorted(ks)),
                         "slope_per_k": est.estimate, "ci_low": est.ci_low,
                         "ci_high": est.ci_high, "p": est.p, "p_floor": 0.0,
                         "n_seeds": est.n_seeds, "primary": bool(np.isclose(f, fraction)),
                         "family": f"dose-response: {sm.test_set}"})
    table = pd.DataFrame(rows)
    return adjust_holm(table) if len(table) else table


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
    """Compute per experiment from :func:`cxrlib.grid.grid_results`: seeds, and the mean per
    seed of optimizer steps, images seen and training wall time (NaN where older runs did not
    record a column), with the wall time of all seeds together."""
    columns = ("optimizer_steps", "images_seen", "train_seconds")
    frame = grid.assign(**{c: grid[c] if c in grid.columns else np.nan for c in columns})
    table = frame.groupby("experiment", sort=False).agg(
        kind=("kind", "first"), k=("k", "first"), real_fraction=("real_fraction", "first"),
        n_seeds=("seed", "nunique"), optimizer_steps=("optimizer_steps", "mean"),
        images_seen=("images_seen", "mean"), train_seconds=("train_seconds", "mean"),
        train_seconds_all_seeds=("train_seconds", "sum"))
    return table.reset_index()
