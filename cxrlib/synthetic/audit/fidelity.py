"""Conditional and demographic fidelity of generated images, with patient-bootstrap CIs.

* **Conditional fidelity**: macro AUROC of the real-trained judge's scores on synthetic images
  against the labels they were *conditioned on*, beside the same judge on real validation
  images, and their ratio. A label enters the macro only with at least ``min_per_class``
  positives and as many negatives in *both* sets (:func:`macro_labels`); the set is fixed
  across bootstrap replicates and the labels left out are named.
* **Demographic fidelity** (:class:`DemographicProbes`): a sex probe (AUROC), an age probe
  (Pearson r) and a view probe (AP vs PA, AUROC) fitted on real training features, scored on
  synthetic images against their conditioned sex and age and their source row's view (a
  condition too for a model trained with ``diffusion.condition_on_view``), and on real
  validation images.

CIs resample patients (for a synthetic image, its source patient); the synthetic and the real
set are independent (training vs validation patients), so the ratio's CI comes from the ratio
of their replicates. The judge and the probes are held fixed: the CIs cover image sampling.
:func:`fidelity_comparison` puts it together, with sentences and the ``summary.json`` entries.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from cxrlib.core.labels import CHEXPERT_LABELS, VIEW_CODES
from cxrlib.stats import auroc_table, patient_bootstrap_weights, weighted_auroc

#: Ratio of synthetic to real fidelity that counts as carrying the conditions (issue 11).
FIDELITY_TARGET = 0.9
#: A ratio whose CI lies wholly above this is over-separation (synthetic images easier to
#: read than real ones: exaggerated, not faithful), never a pass of the target (issue 18).
OVER_SEPARATION = 1.05


def fidelity_verdict(ratio: float, ci_low: float, ci_high: float,
                     judged: bool | None = True) -> str:
    """The verdict on a fidelity ratio (synthetic / real) and its CI, in a few words.

    ``not estimable`` (no ratio); ``not judged`` (``judged`` false or None: the real value
    is not above chance, so the ratio means nothing); ``exaggerated`` (the CI lies wholly
    above :data:`OVER_SEPARATION`: over-separation, never a pass); ``possibly exaggerated``
    (the point estimate is above :data:`OVER_SEPARATION` but the CI includes it: not a plain
    pass either, since the synthetic images may be easier to read than real ones); ``meets
    target`` (at least :data:`FIDELITY_TARGET` and at most :data:`OVER_SEPARATION`, the CI
    above the target) or ``meets target, CI includes 0.9x``; ``below target`` (the CI below
    the target) or ``below target, CI includes 0.9x``.
    """
    if ratio is None or not np.isfinite(ratio):
        return "not estimable"
    if not judged:
        return "not judged"
    if ci_low > OVER_SEPARATION:
        return "exaggerated"
    if ratio > OVER_SEPARATION:
        return "possibly exaggerated"
    word = "meets target" if ratio >= FIDELITY_TARGET else "below target"
    if ci_low <= FIDELITY_TARGET <= ci_high:
        return f"{word}, CI includes {FIDELITY_TARGET:g}x"
    return word



def macro_labels(*targets: pd.DataFrame, min_per_class: int = 10,
                 labels: Sequence[str] = CHEXPERT_LABELS) -> tuple[list[str], dict[str, str]]:
    """The labels that enter a macro AUROC, and why each other label is left out.

    A label enters only with at least ``min_per_class`` positives and as many negatives
    (NaN = unknown, not counted) in *every* frame given (e.g. the synthetic and the real set),
    so that the compared macros average the same labels.
    """
    used, left_out = [], {}
    for label in labels:
        short = []
        for i, frame in enumerate(targets):
            t = frame[label].to_numpy(dtype=float)
            pos, neg = int((t == 1).sum()), int((t == 0).sum())
            if min(pos, neg) < min_per_class:
                short.append(f"set {i + 1}: {pos} pos/{neg} neg")
        if short:
            left_out[label] = "; ".join(short)
        else:
            used.append(label)
    return used, left_out


def conditional_fidelity(scores: np.ndarray, condition_labels: pd.DataFrame,
                         labels: tuple[str, ...] = CHEXPERT_LABELS) -> pd.DataFrame:
    """Per-label AUROC of judge scores against the labels the images were conditioned on.

    ``scores`` are sigmoid outputs (N x len(labels)); ``condition_labels`` holds one column per
    label with 0/1 (NaN rows are left out for that label). Uses
    :func:`cxrlib.stats.auroc_table`; a label with one class has AUROC NaN.
    """
    scores = np.asarray(scores, dtype=float)
    if scores.shape != (len(condition_labels), len(labels)):
        raise ValueError(f"scores must be {len(condition_labels)} x {len(labels)}, "
                         f"got {scores.shape}")
    missing = [lab for lab in labels if lab not in condition_labels]
    if missing:
        raise KeyError(f"condition_labels lacks label columns {missing}")
    parts = []
    for j, label in enumerate(labels):
        target = condition_labels[label].to_numpy(dtype=float)
        bad = ~np.isnan(target) & ~np.isin(target, (0.0, 1.0))
        if bad.any():
            raise ValueError(f"condition label '{label}' must be 0, 1 or NaN; found "
                             f"{sorted(set(target[bad]))}")
        parts.append(pd.DataFrame({"test_set": "synthetic", "label": label, "target": target,
                                   "score": scores[:, j]}))
    return auroc_table(pd.concat(parts, ignore_index=True))


def _logistic_probe(seed: int) -> Pipeline:
    """A binary probe on judge features: standardised, L2-regularised logistic regression."""
    return make_pipeline(StandardScaler(),
                         LogisticRegression(C=0.1, max_iter=2000, random_state=seed))


class DemographicProbes:
    """Sex, age and view read off judge features: logistic regressions (positive classes
    Female and AP) and a ridge regression (years), all on standardised features, fitted on
    real training rows.

    Rows need ``sex`` (Male/Female; anything else is left out), ``age`` (NaN left out) and
    ``view`` (AP/PA; anything else is left out). Training rows of one view only (a site
    without AP images) leave the view probe unfitted (``view`` None): its scores are NaN.
    """

    def __init__(self, features: np.ndarray, rows: pd.DataFrame, seed: int = 0):
        if len(features) != len(rows):
            raise ValueError(f"{len(features)} feature rows for {len(rows)} rows")
        x = np.asarray(features, dtype=np.float64)
        sex, age, view = self._targets(rows)
        if len(np.unique(sex[~np.isnan(sex)])) < 2:
            raise ValueError("the sex probe needs Male and Female training rows")
        if (~np.isnan(age)).sum() < 2:
            raise ValueError("the age probe needs at least 2 known ages")
        known = ~np.isnan(sex)
        self.sex: Pipeline = _logistic_probe(seed)
        self.sex.fit(x[known], sex[known])
        known = ~np.isnan(age)
        self.age: Pipeline = make_pipeline(StandardScaler(), Ridge(alpha=1.0))
        self.age.fit(x[known], age[known])
        self.mean_age = float(age[known].mean())
        known = ~np.isnan(view)
        self.view: Pipeline | None = None
        if len(np.unique(view[known])) == 2:
            self.view = _logistic_probe(seed)
            self.view.fit(x[known], view[known])

    @staticmethod
    def _targets(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sex as 1 (Female) / 0 (Male) / NaN, age in years (NaN unknown), and view as
        1 (AP) / 0 (PA) / NaN."""
        missing = [c for c in ("sex", "age", "view") if c not in rows]
        if missing:
            raise KeyError(f"rows need columns 'sex', 'age' and 'view'; missing {missing}")
        sex = rows["sex"].map({"Male": 0.0, "Female": 1.0}).to_numpy(dtype=float)
        view = rows["view"].map(VIEW_CODES).to_numpy(dtype=float)
        return sex, rows["age"].to_numpy(dtype=float), view

    def predict(self, features: np.ndarray, rows: pd.DataFrame) -> pd.DataFrame:
        """Per row: sex_target, sex_score (P(Female)), age_target, age_pred, view_target,
        view_score (P(AP); NaN without a view probe)."""
        x = np.asarray(features, dtype=np.float64)
        sex, age, view = self._targets(rows)
        view_score = (self.view.predict_proba(x)[:, 1] if self.view is not None
                      else np.full(len(x), np.nan))
        return pd.DataFrame({"sex_target": sex, "sex_score": self.sex.predict_proba(x)[:, 1],
                             "age_target": age, "age_pred": self.age.predict(x),
                             "view_target": view, "view_score": view_score})

    def evaluate(self, features: np.ndarray, rows: pd.DataFrame) -> dict[str, float | int]:
        """Point estimates: sex_auroc, sex_accuracy, sex_majority_accuracy, age_mae,
        age_pearson_r, age_mae_mean_baseline (predicting the training mean), view_auroc, and
        counts."""
        p = self.predict(features, rows)
        s, a = p.dropna(subset=["sex_target"]), p.dropna(subset=["age_target"])
        v = p.dropna(subset=["view_target", "view_score"])
        both = s["sex_target"].nunique() == 2
        r = (float(np.corrcoef(a["age_pred"], a["age_target"])[0, 1])
             if len(a) > 1 and a["age_target"].std() > 0 and a["age_pred"].std() > 0
             else np.nan)
        return {
            "sex_auroc": float(weighted_auroc(s["sex_target"], s["sex_score"])) if both
            else np.nan,
            "sex_accuracy": float(((s["sex_score"] > 0.5) == s["sex_target"]).mean())
            if len(s) else np.nan,
            "sex_majority_accuracy": float(max(s["sex_target"].mean(),
                                               1 - s["sex_target"].mean())) if len(s)
            else np.nan,
            "age_mae": float((a["age_pred"] - a["age_target"]).abs().mean()) if len(a)
            else np.nan,
            "age_pearson_r": r,
            "age_mae_mean_baseline": float((a["age_target"] - self.mean_age).abs().mean())
            if len(a) else np.nan,
            "view_auroc": float(weighted_auroc(v["view_target"], v["view_score"]))
            if v["view_target"].nunique() == 2 else np.nan,
            "n_sex": len(s), "n_age": len(a), "n_view": len(v),
        }


def weighted_pearson(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Pearson r of x and y under each row of ``weights`` (B x n), e.g. bootstrap counts.

    Hand-written because neither numpy nor scipy computes a weighted correlation for many
    weightings at once; with unit weights it equals ``np.corrcoef``.
    """
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    total = w.sum(axis=1, keepdims=True)
    dx = x[None, :] - (w @ x)[:, None] / total
    dy = y[None, :] - (w @ y)[:, None] / total
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w * dx * dy).sum(1) / np.sqrt((w * dx * dx).sum(1) * (w * dy * dy).sum(1))


@dataclass
class FidelityEstimate:
    """A point estimate, its percentile CI and its bootstrap replicates (for ratios)."""

    value: float
    ci_low: float
    ci_high: float
    replicates: np.ndarray
    n_images: int
    n_patients: int


def _estimate(value: float, replicates: np.ndarray, n: int, patients: int,
              alpha: float) -> FidelityEstimate:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanquantile(replicates, [alpha / 2, 1 - alpha / 2])
    return FidelityEstimate(float(value), float(low), float(high), replicates, n, patients)


def fidelity_estimate(kind: str, rows: pd.DataFrame, scores: np.ndarray | pd.DataFrame,
                      labels: Sequence[str] = (), n_boot: int = 1000, seed: int = 0,
                      alpha: float = 0.05) -> FidelityEstimate:
    """One fidelity number with a patient-bootstrap percentile CI.

    ``kind``: ``"macro"`` (mean AUROC over ``labels`` of ``scores`` (N x 14, CHEXPERT order)
    against the label columns of ``rows``; the label set is fixed across replicates, a
    replicate where a label lost a class averages the others), ``"sex"`` or ``"view"`` (AUROC
    of the probe's ``sex_score`` against ``sex_target``, or ``view_score`` against
    ``view_target``; ``scores`` is :meth:`DemographicProbes.predict`) or ``"age"`` (Pearson r
    of ``age_pred`` and ``age_target``); rows without a target or score are left out.
    Patients (``rows.patient_id``; for synthetic images their source patient) are resampled,
    so correlated images move together. The probes and the judge are held fixed: the CI
    covers image sampling only.
    """
    pid = rows["patient_id"].to_numpy()
    if kind == "macro":
        if not labels:
            nan = np.full(n_boot, np.nan)
            return FidelityEstimate(np.nan, np.nan, np.nan, nan, len(rows), len(set(pid)))
        weights = patient_bootstrap_weights(pid, n_boot, seed)
        s = np.asarray(scores, dtype=float)
        per_point, per_boot = [], []
        for label in labels:
            t = rows[label].to_numpy(dtype=float)
            keep = ~np.isnan(t)
            col = s[keep, CHEXPERT_LABELS.index(label)]
            per_point.append(float(weighted_auroc(t[keep], col)))
            per_boot.append(weighted_auroc(t[keep], col, weights[:, keep]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            boot = np.nanmean(np.stack(per_boot), axis=0)
        return _estimate(np.mean(per_point), boot, len(rows), len(set(pid)), alpha)
    if kind not in ("sex", "view", "age"):
        raise ValueError(f"kind must be 'macro', 'sex', 'view' or 'age', got {kind!r}")
    score = "age_pred" if kind == "age" else f"{kind}_score"
    frame = pd.DataFrame(scores).assign(_pid=pid).dropna(subset=[f"{kind}_target", score])
    if frame.empty:
        nan = np.full(n_boot, np.nan)
        return FidelityEstimate(np.nan, np.nan, np.nan, nan, 0, 0)
    weights = patient_bootstrap_weights(frame["_pid"].to_numpy(), n_boot, seed)
    if kind != "age":
        t, s = frame[f"{kind}_target"].to_numpy(), frame[score].to_numpy()
        point = float(weighted_auroc(t, s)) if len(np.unique(t)) == 2 else np.nan
        boot = weighted_auroc(t, s, weights) if len(np.unique(t)) == 2 else np.full(n_boot,
                                                                                    np.nan)
    else:
        t, s = frame["age_target"].to_numpy(), frame["age_pred"].to_numpy()
        point = float(weighted_pearson(s, t, np.ones((1, len(t))))[0])
        boot = weighted_pearson(s, t, weights)
    return _estimate(point, boot, len(frame), frame["_pid"].nunique(), alpha)


def ratio_ci(synthetic: FidelityEstimate, real: FidelityEstimate,
             alpha: float = 0.05) -> tuple[float, float, float]:
    """Synthetic / real and its percentile CI from the two independent sets' replicates."""
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        boot = synthetic.replicates / real.replicates
        low, high = np.nanquantile(boot, [alpha / 2, 1 - alpha / 2])
    point = synthetic.value / real.value if real.value else float("nan")
    return point, float(low), float(high)


#: The headline measures: (key in summary.json, what it is, the statistic's name).
MEASURES: tuple[tuple[str, str, str], ...] = (
    ("fidelity", "conditional fidelity", "macro AUROC"),
    ("sex_fidelity", "sex fidelity", "sex-probe AUROC"),
    ("age_fidelity", "age fidelity", "age-probe Pearson r"),
    ("view_fidelity", "view fidelity", "view-probe AUROC"),
)
#: Chance level of each statistic: a ratio to a real value at or below it means nothing.
_CHANCE = {"fidelity": 0.5, "sex_fidelity": 0.5, "age_fidelity": 0.0, "view_fidelity": 0.5}
_SUMMARY_NAMES = {"fidelity": ("synthetic_macro_auroc", "real_macro_auroc"),
                  "sex_fidelity": ("synthetic_auroc", "real_auroc"),
                  "age_fidelity": ("synthetic_r", "real_r"),
                  "view_fidelity": ("synthetic_auroc", "real_auroc")}


@dataclass
class FidelityResult:
    """Synthetic vs real fidelity: per-label AUROCs, the headline estimates, the rule."""

    per_label: pd.DataFrame
    estimates: dict[str, tuple[FidelityEstimate, FidelityEstimate]]
    labels: list[str]
    left_out: dict[str, str]
    min_per_class: int
    alpha: float

    def table(self) -> pd.DataFrame:
        """One row per measure: synthetic and real with CIs, the ratio with its CI, whether
        its CI lies above :data:`OVER_SEPARATION` (``over_separation``), whether the ratio
        reaches :data:`FIDELITY_TARGET` without over-separating (``meets_target``), whether
        its point estimate is above :data:`OVER_SEPARATION` while its CI includes it
        (``possibly_exaggerated``: not a plain pass); the three None when the real value is
        not above chance, so that the ratio means nothing; and :func:`fidelity_verdict`."""
        rows = []
        for key, name, stat in MEASURES:
            syn, real = self.estimates[key]
            ratio, low, high = ratio_ci(syn, real, self.alpha)
            judged = bool(np.isfinite(ratio) and real.value > _CHANCE[key])
            over = bool(low > OVER_SEPARATION) if judged else None
            rows.append({"measure": name, "statistic": stat, "synthetic": syn.value,
                         "synthetic_ci_low": syn.ci_low, "synthetic_ci_high": syn.ci_high,
                         "n_synthetic": syn.n_images, "real": real.value,
                         "real_ci_low": real.ci_low, "real_ci_high": real.ci_high,
                         "n_real": real.n_images, "ratio": ratio, "ratio_ci_low": low,
                         "ratio_ci_high": high,
                         "chance": _CHANCE[key], "over_separation": over,
                         "meets_target": bool(ratio >= FIDELITY_TARGET and not over)
                         if judged else None,
                         "possibly_exaggerated": bool(ratio > OVER_SEPARATION and not over)
                         if judged else None,
                         "verdict": fidelity_verdict(ratio, low, high, judged)})
        return pd.DataFrame(rows)

    def summary_entries(self) -> dict[str, dict[str, object]]:
        """``fidelity``, ``sex_fidelity``, ``age_fidelity`` and ``view_fidelity`` for
        :func:`cxrlib.core.summary.update_summary` (NaN becomes null there)."""
        out = {}
        for row, (key, _, _) in zip(self.table().to_dict("records"), MEASURES, strict=True):
            syn_key, real_key = _SUMMARY_NAMES[key]
            entry = {syn_key: row["synthetic"], real_key: row["real"], "ratio": row["ratio"],
                     f"{syn_key}_ci": [row["synthetic_ci_low"], row["synthetic_ci_high"]],
                     f"{real_key}_ci": [row["real_ci_low"], row["real_ci_high"]],
                     "ratio_ci": [row["ratio_ci_low"], row["ratio_ci_high"]],
                     "meets_0.9x_real": row["meets_target"],
                     "over_separation": row["over_separation"],
                     "possibly_exaggerated": row["possibly_exaggerated"],
                     "verdict": row["verdict"], "n_synthetic": row["n_synthetic"],
                     "n_real": row["n_real"], "ci_level": 1 - self.alpha}
            if key == "fidelity":
                entry.update(labels=self.labels, labels_left_out=sorted(self.left_out),
                             min_per_class=self.min_per_class)
            out[key] = entry
        return out

    def sentences(self, synthetic: str = "synthetic images",
                  real: str = "real validation images") -> list[str]:
        """Generated statements: each measure, synthetic against real, CIs, the ratio, and
        its :func:`fidelity_verdict` in words: at least or below 0.9x real, over-separation
        (CI above 1.05: not a pass) or possibly exaggerated (point above 1.05, CI including
        it: not a plain pass either); then the label rule and the labels left out."""
        pct = f"{1 - self.alpha:.0%}"
        lines = []
        for row in self.table().to_dict("records"):
            name, stat = row["measure"], row["statistic"]
            if not np.isfinite(row["synthetic"]) or not np.isfinite(row["real"]):
                why = (f"no label has at least {self.min_per_class} positives and "
                       f"{self.min_per_class} negatives in both sets" if name.startswith("cond")
                       else "one of the sets lacks the values it needs")
                lines.append(f"{name.capitalize()} could not be estimated: {why}.")
                continue
            if row["meets_target"] is None:
                lines.append(
                    f"{name.capitalize()}: {stat} {row['synthetic']:.3f} on {row['n_synthetic']} "
                    f"{synthetic} against {row['real']:.3f} on {row['n_real']} {real}, which is "
                    f"not above chance ({row['chance']:g}): the judge or probe does not read "
                    "this on real images, so the ratio to real means nothing.")
                continue
            if row["over_separation"]:
                verdict = (f"over-separation: the CI lies above {OVER_SEPARATION:g}, so the "
                           f"synthetic images are easier to read than real ones (exaggerated, "
                           f"not a pass of the {FIDELITY_TARGET:g}x target)")
            elif row["possibly_exaggerated"]:
                verdict = (f"possibly exaggerated: the point estimate is above "
                           f"{OVER_SEPARATION:g}x real, so the synthetic images may be easier "
                           f"to read than real ones, and the CI does not rule out "
                           f"{OVER_SEPARATION:g} (not a plain pass of the {FIDELITY_TARGET:g}x "
                           f"target)")
            else:
                verdict = ("at least" if row["meets_target"] else "below") + \
                    f" {FIDELITY_TARGET:g}x real"
            lines.append(
                f"{name.capitalize()}: {stat} {row['synthetic']:.3f} ({pct} CI "
                f"{row['synthetic_ci_low']:.3f}-{row['synthetic_ci_high']:.3f}) on "
                f"{row['n_synthetic']} {synthetic} against {row['real']:.3f} "
                f"({row['real_ci_low']:.3f}-{row['real_ci_high']:.3f}) on {row['n_real']} "
                f"{real}; ratio {row['ratio']:.2f} ({row['ratio_ci_low']:.2f}-"
                f"{row['ratio_ci_high']:.2f}), {verdict}"
                + (f" (the CI includes {FIDELITY_TARGET:g})"
                   if row["ratio_ci_low"] <= FIDELITY_TARGET <= row["ratio_ci_high"] else "")
                + ".")
        rule = (f"Conditional fidelity averages the {len(self.labels)} labels with at least "
                f"{self.min_per_class} positives and {self.min_per_class} negatives in both "
                f"sets")
        rule += (f" ({', '.join(self.labels)})" if self.labels else "")
        if self.left_out:
            rule += "; left out: " + "; ".join(f"{lab} ({why})"
                                               for lab, why in self.left_out.items())
        lines.append(rule + ". CIs resample patients; the judge and the probes are fixed.")
        return lines


def fidelity_comparison(syn_rows: pd.DataFrame, syn_scores: np.ndarray,
                        syn_features: np.ndarray, real_rows: pd.DataFrame,
                        real_scores: np.ndarray, real_features: np.ndarray,
                        probes: DemographicProbes, min_per_class: int = 10,
                        n_boot: int = 1000, seed: int = 0,
                        alpha: float = 0.05) -> FidelityResult:
    """Conditional, sex, age and view fidelity of synthetic images (scored against their
    conditions) beside the same judge and probes on real images (scored against their labels).

    Args:
        syn_rows: the synthetic images' rows: the 14 label columns (the conditions), ``sex``,
            ``age``, ``view`` and ``patient_id`` (the source patient).
        syn_scores: the judge's sigmoid outputs on them (N x 14, CheXpert order).
        syn_features: the judge's pre-logit features of them, read by ``probes``.
        real_rows: the real (validation) images' rows, same columns, their own labels.
        real_scores: the judge's outputs on the real images.
        real_features: the judge's features of the real images.
        probes: sex, age and view probes fitted on real training features.
        min_per_class: a label enters the macro only with at least this many positives and
            negatives in both sets (:func:`macro_labels`).
        n_boot: patient-bootstrap replicates of each CI.
        seed: bootstrap seed of the synthetic set; the real set uses ``seed + 1``.
        alpha: the CIs are at level 1 - alpha.
    """
    labels, left_out = macro_labels(syn_rows, real_rows, min_per_class=min_per_class)
    left_out = {lab: why.replace("set 1", "synthetic").replace("set 2", "real")
                for lab, why in left_out.items()}
    per = []
    for name, rows, scores in (("synthetic", syn_rows, syn_scores),
                               ("real", real_rows, real_scores)):
        t = conditional_fidelity(scores, rows).drop(columns="test_set").set_index("label")
        per.append(t.add_prefix(f"{name}_"))
    per_label = pd.concat(per, axis=1).assign(in_macro=lambda d: d.index.isin(labels))
    estimates = {}
    syn_demo, real_demo = (probes.predict(syn_features, syn_rows),
                           probes.predict(real_features, real_rows))
    for key, kind in (("fidelity", "macro"), ("sex_fidelity", "sex"), ("age_fidelity", "age"),
                      ("view_fidelity", "view")):
        syn_in, real_in = ((syn_scores, real_scores) if kind == "macro"
                           else (syn_demo, real_demo))
        estimates[key] = (
            fidelity_estimate(kind, syn_rows, syn_in, labels, n_boot, seed, alpha),
            fidelity_estimate(kind, real_rows, real_in, labels, n_boot, seed + 1, alpha))
    return FidelityResult(per_label.reset_index(), estimates, labels, left_out, min_per_class,
                          alpha)
