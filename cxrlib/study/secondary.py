"""The secondary analyses of notebook 05: per-label deltas between two experiments, the
pre-specified subgroup contrast (difference in differences), calibration, and per-label
metrics. Their comparisons and Holm families follow the plan of :mod:`cxrlib.study.plan`
(the labels of one comparison are a family; the subgroup contrasts of one test set are one).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score

from cxrlib.core.cohort import AGE_BANDS, SUBGROUPS, age_band
from cxrlib.core.labels import RACE_GROUPS, RACE_OTHER, RACE_UNKNOWN, SEXES, VIEWS
from cxrlib.core.schema import StatsSpec
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
    patient_bootstrap_weights,
    seed_estimate,
    seed_macros_of,
)
from cxrlib.study.plan import experiment_info, primary_fraction

_GROUP_ORDER: dict[str, tuple[str, ...]] = {
    "sex": SEXES, "age_band": AGE_BANDS, "race": RACE_GROUPS, "view": VIEWS,
}


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
    ci_high (two-level), the experiment's paired gain over the baseline in the group (gain,
    gain_ci_low, gain_ci_high; empty on the baseline's rows), n_images, n_patients,
    labels_used, left_out, dropped_groups.
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
                gain = contrast(sm, {(experiment, g): 1.0, (baseline, g): -1.0}, spec.alpha)
                for e in (baseline, experiment):
                    est = contrast(sm, {(e, g): 1.0}, spec.alpha)
                    paired = (gain.estimate, gain.ci_low, gain.ci_high) if e == experiment \
                        else (np.nan,) * 3
                    groups.append({"experiment": e, "group": g, "macro_auroc": est.estimate,
                                   "ci_low": est.ci_low, "ci_high": est.ci_high,
                                   "gain": paired[0], "gain_ci_low": paired[1],
                                   "gain_ci_high": paired[2],
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
