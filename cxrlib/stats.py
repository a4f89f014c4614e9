"""Statistics on per-image predictions: AUROC tables, DeLong and patient-bootstrap tests, Holm
adjustment, subgroup AUROC, seed spread and findings written from the numbers.

Input is the long predictions frame: one row per (experiment, seed, test_set, label, image) with
``image_id``, ``patient_id``, ``target`` (1, 0, or NaN = unknown), ``score`` and the subgroup
columns ``sex``, ``age``, ``race``, ``view``. Every experiment is scored on the same images of a
test set, so all comparisons are paired. Policies followed by every function below:

* Unknown targets (NaN) are left out for that label only.
* Seeds: for every CI and test, an experiment's seeds are pooled by averaging each image's score
  over its seeds (a seed ensemble). The spread across seeds (per-seed macro AUROC: mean, min,
  max) is reported separately by :func:`seed_spread`.
* Macro AUROC is the mean over the labels with both classes in the (sub)set evaluated; the others
  are left out and named. In a bootstrap replicate where a used label lacks a class, that label's
  value is NaN and the replicate's macro is the mean of the remaining labels (nanmean).
* Bootstrap: patients, not images, are resampled with replacement, because a patient's images
  are correlated. The draws are made once per test set from ``numpy.random.default_rng(seed)``
  over all its patients and shared by every experiment and subgroup, so differences are paired
  and results are reproducible. CIs are percentile intervals.
* Paired bootstrap p-value for a difference d: ``2 * min(P(d* <= 0), P(d* >= 0))`` with each
  probability estimated as ``(count + 1) / (n_boot + 1)``, clipped to 1.
* Per-label comparisons use DeLong's paired test (fast algorithm of Sun & Xu, 2014); ``z > 0``
  means the second score (the experiment) has the higher AUROC, like ``delta = b - a``.
* Multiple comparisons: Holm within a family, by default one family per test set and level
  (the macro comparisons of a test set; its per-label comparisons).
* Subgroups: rows with a missing group value are left out, and race "Unknown"/"Other" are not
  race groups. A label enters a group's macro only with at least ``min_per_class`` positives
  and negatives in the group.

:func:`auroc_table` and :func:`macro_auroc` (used by the learnability check) are plain point
estimates on a single set of predictions.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from cxrlib.config import StatsSpec
from cxrlib.grid import baseline_of
from cxrlib.labels import CHEXPERT_LABELS, RACE_GROUPS, RACE_OTHER, RACE_UNKNOWN, SEXES, VIEWS

#: The ``label`` value of macro rows.
MACRO = "macro"
AGE_BANDS: tuple[str, ...] = ("<40", "40-59", "60-79", "80+")
SUBGROUPS: tuple[str, ...] = ("sex", "age_band", "race", "view")
#: Experiments trained on synthetic images only; :func:`findings` asks whether they match real.
SYNTHETIC_ONLY_PREFIX = "synthetic_only"
_GROUP_ORDER: dict[str, tuple[str, ...]] = {
    "sex": SEXES, "age_band": AGE_BANDS, "race": RACE_GROUPS, "view": VIEWS,
}
_ATTRIBUTES = ("sex", "age", "race", "view")


def auroc_table(predictions: pd.DataFrame) -> pd.DataFrame:
    """AUROC per (test_set, label) from long predictions (test_set, label, target, score)."""
    rows = []
    for (test_set, label), g in predictions.groupby(["test_set", "label"], sort=False):
        g = g[g["target"].notna()]
        pos, neg = int((g["target"] == 1).sum()), int((g["target"] == 0).sum())
        auc = roc_auc_score(g["target"], g["score"]) if pos and neg else np.nan
        rows.append({"test_set": test_set, "label": label, "n_pos": pos, "n_neg": neg,
                     "auroc": auc})
    return pd.DataFrame(rows)


def macro_auroc(table: pd.DataFrame) -> pd.DataFrame:
    """Macro AUROC per test set: mean over labels with both classes, and which were left out."""
    out = []
    for test_set, g in table.groupby("test_set", sort=False):
        present = g[g["auroc"].notna()]
        out.append({"test_set": test_set, "macro_auroc": present["auroc"].mean(),
                    "labels_used": len(present),
                    "left_out": ", ".join(g.loc[g["auroc"].isna(), "label"]) or "-"})
    return pd.DataFrame(out)


# --- DeLong ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeLongResult:
    """Paired DeLong test of two AUROCs on the same cases; ``z > 0`` means b is higher."""

    auroc_a: float
    auroc_b: float
    z: float
    p_value: float


def _binary_target(y_true: np.ndarray | Sequence[float]) -> np.ndarray:
    """Targets as a boolean array, refusing anything but 0/1 (NaN must be dropped first)."""
    y = np.asarray(y_true, dtype=float)
    if y.ndim != 1:
        raise ValueError(f"y_true must be one-dimensional, got shape {y.shape}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("y_true must hold only 0 and 1 (leave out unknown targets first)")
    return y == 1


def delong_covariance(y_true: np.ndarray | Sequence[float],
                      scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs of k score vectors on the same cases and their DeLong covariance matrix.

    ``scores`` is (k, n) or (n,). Uses the midrank algorithm of Sun & Xu (2014), O(k n log n),
    which equals DeLong's placement definition; needs at least two cases of each class.
    """
    y = _binary_target(y_true)
    s = np.atleast_2d(np.asarray(scores, dtype=float))
    if s.ndim != 2 or s.shape[1] != y.size:
        raise ValueError(f"scores have shape {s.shape} but y_true has {y.size} cases")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong needs at least two positives and two negatives, got {m} and {n}")
    pos, neg = s[:, y], s[:, ~y]
    tx = sps.rankdata(pos, axis=1)
    ty = sps.rankdata(neg, axis=1)
    tz = sps.rankdata(np.hstack([pos, neg]), axis=1)
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:, :m] - tx) / n          # per positive: share of negatives ranked below it
    v01 = 1.0 - (tz[:, m:] - ty) / m    # per negative: share of positives ranked above it
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, cov


def delong_test(y_true: np.ndarray | Sequence[float], score_a: np.ndarray | Sequence[float],
                score_b: np.ndarray | Sequence[float]) -> DeLongResult:
    """Two-sided paired DeLong test of AUROC(b) - AUROC(a) on the same cases."""
    a, b = np.asarray(score_a, dtype=float), np.asarray(score_b, dtype=float)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"score_a and score_b must be 1-D of the same length, got shapes "
                         f"{a.shape} and {b.shape}")
    aucs, cov = delong_covariance(y_true, np.vstack([a, b]))
    diff = aucs[1] - aucs[0]
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    if diff == 0:
        z, p = 0.0, 1.0
    elif var <= 0:
        z, p = math.copysign(math.inf, diff), 0.0
    else:
        z = float(diff / math.sqrt(var))
        p = float(2 * sps.norm.sf(abs(z)))
    return DeLongResult(float(aucs[0]), float(aucs[1]), z, p)


# --- Weighted AUROC and the patient bootstrap -------------------------------------------------

def _auroc_columns(score: np.ndarray, positive: np.ndarray, weights: np.ndarray | None = None,
                   rows: np.ndarray | None = None) -> np.ndarray:
    """Weighted AUROC (Mann-Whitney, ties count 1/2) for each column of ``weights``.

    Case i has weights ``weights[rows[i]]`` (rows default to the identity; no weights = one
    column of ones). Weights are laid out (cases, replicates) because cumulative sums down
    columns are fast in numpy; int32 bootstrap counts sum exactly and halve the memory traffic.
    The negatives are sorted once; each positive finds the negatives below it and tied with it
    by binary search, so the cost is O(n log n + n * replicates).
    """
    if weights is None:
        weights, rows = np.ones((len(score), 1), dtype=np.int32), None
    rows = np.arange(len(score)) if rows is None else rows
    neg = np.flatnonzero(~positive)
    neg = neg[np.argsort(score[neg], kind="stable")]
    pos = np.flatnonzero(positive)
    below = np.searchsorted(score[neg], score[pos], side="left")
    not_above = np.searchsorted(score[neg], score[pos], side="right")
    neg_cum = np.zeros((len(neg) + 1, weights.shape[1]), dtype=weights.dtype)
    np.cumsum(weights[rows[neg]], axis=0, out=neg_cum[1:])
    w_pos = weights[rows[pos]]
    num = 0.5 * np.einsum("ik,ik->k", w_pos, neg_cum[below] + neg_cum[not_above],
                          dtype=np.float64)
    den = w_pos.sum(axis=0, dtype=np.float64) * neg_cum[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def weighted_auroc(y_true: np.ndarray | Sequence[float], score: np.ndarray | Sequence[float],
                   weights: np.ndarray | None = None) -> np.ndarray:
    """AUROC with per-case weights (weighted Mann-Whitney, ties count 1/2), many weightings at once.

    ``weights`` is (n,) or (B, n), e.g. bootstrap replicates. Returns an array of shape
    ``weights.shape[:-1]`` (0-d for one weighting), NaN where a class has zero total weight.
    Equals sklearn's ``roc_auc_score(..., sample_weight=w)``.
    """
    positive = _binary_target(y_true)
    s = np.asarray(score, dtype=float)
    w = np.ones(s.shape) if weights is None else np.asarray(weights, dtype=float)
    if s.shape != positive.shape or w.ndim not in (1, 2) or w.shape[-1] != s.size:
        raise ValueError(f"y_true {positive.shape}, score {s.shape} and weights {w.shape} "
                         f"disagree on the number of cases")
    return _auroc_columns(s, positive, w.reshape(-1, s.size).T).reshape(w.shape[:-1])


def patient_bootstrap_weights(patient_ids: np.ndarray | Sequence[Hashable], n_boot: int,
                              seed: int) -> np.ndarray:
    """Per-image integer weights of ``n_boot`` patient-bootstrap replicates, shape (n_boot, n).

    Each replicate draws as many patients as there are, with replacement; an image's weight is
    how often its patient was drawn, so a patient's images enter or leave together. Patients
    are numbered in sorted order, so the draws do not depend on the row order. The result is a
    transposed view of a C-ordered (n, n_boot) array, the layout the AUROC code works in.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    codes, uniques = pd.factorize(np.asarray(patient_ids), sort=True)
    if (codes < 0).any():
        raise ValueError("patient_id must not be missing")
    n_pat = len(uniques)
    draws = np.random.default_rng(seed).integers(0, n_pat, size=(n_boot, n_pat))
    offsets = n_pat * np.arange(n_boot)[:, None]
    counts = np.bincount((draws + offsets).ravel(), minlength=n_boot * n_pat)
    by_patient = np.ascontiguousarray(counts.reshape(n_boot, n_pat).T, dtype=np.int32)
    return by_patient[codes].T


def _nan_stat(func: Callable[..., np.ndarray], *args: object, **kwargs: object) -> np.ndarray:
    """Apply a numpy nan-function; an all-NaN slice gives NaN quietly instead of a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return func(*args, **kwargs)


def _percentile_ci(replicates: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over axis 0, ignoring NaN replicates."""
    low, high = _nan_stat(np.nanquantile, replicates, [alpha / 2, 1 - alpha / 2], axis=0)
    return low, high


def _bootstrap_p(deltas: np.ndarray) -> float:
    """Two-sided bootstrap p-value of a difference: 2 min(P(d* <= 0), P(d* >= 0)), +1 corrected."""
    d = deltas[np.isfinite(deltas)]
    if d.size == 0:
        return math.nan
    tail = min(int((d <= 0).sum()), int((d >= 0).sum()))
    return min(1.0, 2 * (tail + 1) / (d.size + 1))


# --- Predictions as arrays ------------------------------------------------------------------

@dataclass(frozen=True)
class _TestSet:
    """One test set as arrays: images in image_id order, labels in CheXpert order."""

    name: str
    image_ids: np.ndarray
    patient_ids: np.ndarray
    labels: tuple[str, ...]
    targets: np.ndarray                 # (n_images, n_labels), NaN = unknown
    scores: dict[Hashable, np.ndarray]  # key -> (n_images, n_labels), averaged over other rows
    attributes: pd.DataFrame            # per-image subgroup columns, in image order


def _codes(column: pd.Series, sort: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of a column and its distinct values (refusing missing values)."""
    codes, uniques = pd.factorize(column, sort=sort)
    if (codes < 0).any():
        raise ValueError(f"predictions have missing values in {column.name!r}")
    return codes.astype(np.int64), np.asarray(uniques, dtype=object)


def _key_codes(predictions: pd.DataFrame,
               keys: tuple[str, ...]) -> tuple[np.ndarray, list[Hashable]]:
    """Codes of the key columns present (e.g. experiment, seed) and each code's key value."""
    present = [k for k in keys if k in predictions.columns]
    if not present:
        return np.zeros(len(predictions), dtype=np.int64), [None]
    combined = np.zeros(len(predictions), dtype=np.int64)
    values = []
    for col in present:
        codes, uniques = _codes(predictions[col])
        combined = combined * len(uniques) + codes
        values.append(uniques)
    codes, combos = pd.factorize(combined)
    parts = np.unravel_index(combos, [len(v) for v in values])
    names = [tuple(v[i] for v, i in zip(values, idx, strict=True))
             for idx in zip(*parts, strict=True)]
    return codes, [n[0] if len(present) == 1 else n for n in names]


def _label_codes(column: pd.Series) -> tuple[np.ndarray, tuple[str, ...]]:
    """Codes of the labels, numbered in CheXpert order (unknown labels after, sorted)."""
    codes, uniques = _codes(column)
    rank = {lab: i for i, lab in enumerate(CHEXPERT_LABELS)}
    order = sorted(range(len(uniques)), key=lambda k: (rank.get(uniques[k], len(rank)),
                                                       str(uniques[k])))
    new_code = np.empty(len(uniques), dtype=np.int64)
    new_code[order] = np.arange(len(uniques))
    return new_code[codes], tuple(uniques[order])


def _compact(codes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The codes in use (ascending) and each code renumbered 0.. among them; O(n), no sort."""
    present = np.bincount(codes, minlength=size) > 0
    return np.flatnonzero(present), (np.cumsum(present) - 1)[codes]


def _test_sets(predictions: pd.DataFrame,
               keys: tuple[str, ...] = ("experiment",)) -> Iterator[_TestSet]:
    """Each test set of the predictions as arrays, in order of appearance.

    Scores are averaged over all rows of an (image, label, key) cell, i.e. over seeds when the
    key is the experiment. Columns are coded once for the whole frame (pandas string columns are
    slow to split), and every test set is then cut out of integer arrays.
    """
    missing = {"image_id", "patient_id", "label", "target", "score"} - set(predictions.columns)
    if missing:
        raise ValueError(f"predictions lack the column(s) {sorted(missing)}")
    if predictions.empty:
        raise ValueError("predictions are empty")
    score = predictions["score"].to_numpy(dtype=float)
    target = predictions["target"].to_numpy(dtype=float)
    if not np.isfinite(score).all():
        raise ValueError("scores must be finite")
    if not (np.isnan(target) | (target == 0) | (target == 1)).all():
        raise ValueError("targets must be 0, 1 or NaN")
    image, image_ids = _codes(predictions["image_id"], sort=True)
    patient, patient_ids = _codes(predictions["patient_id"], sort=True)
    first = np.unique(image, return_index=True)[1]  # one row per image, in image_id order
    if (patient != patient[first][image]).any():
        raise ValueError("an image_id has more than one patient_id")
    attributes = pd.DataFrame({c: predictions[c].iloc[first].to_numpy() for c in _ATTRIBUTES
                               if c in predictions.columns}, index=pd.RangeIndex(len(first)))
    label, labels = _label_codes(predictions["label"])
    key, key_names = _key_codes(predictions, keys)
    if "test_set" in predictions.columns:
        test_set, names = _codes(predictions["test_set"])
    else:
        test_set, names = np.zeros(len(predictions), dtype=np.int64), np.array([""], dtype=object)
    for k, name in enumerate(names):
        rows = np.flatnonzero(test_set == k)
        images, img = _compact(image[rows], len(image_ids))
        used_labels, lab = _compact(label[rows], len(labels))
        used_keys, ky = _compact(key[rows], len(key_names))
        yield _arrange(str(name), img, lab, ky, score[rows], target[rows],
                       tuple(labels[i] for i in used_labels), [key_names[i] for i in used_keys],
                       image_ids[images], patient_ids[patient[first][images]],
                       attributes.iloc[images].reset_index(drop=True))


def _arrange(name: str, img: np.ndarray, lab: np.ndarray, key: np.ndarray, score: np.ndarray,
             target: np.ndarray, labels: tuple[str, ...], key_names: list[Hashable],
             image_ids: np.ndarray, patient_ids: np.ndarray,
             attributes: pd.DataFrame) -> _TestSet:
    """Pool one test set's coded rows into a score matrix per key and one target matrix."""
    n, n_lab, n_key = len(image_ids), len(labels), len(key_names)
    cell = (key * n + img) * n_lab + lab
    count = np.bincount(cell, minlength=n_key * n * n_lab).reshape(n_key, n * n_lab)
    total = np.bincount(cell, weights=score, minlength=n_key * n * n_lab)
    lacking = (count == 0).sum(axis=1)
    if lacking.any():
        k = int(np.argmax(lacking > 0))
        raise ValueError(f"test set {name!r}: {key_names[k]} lacks scores for {lacking[k]} of "
                         f"{n * n_lab} image/label pairs; all must cover the same images")
    uneven = count.min(axis=1) != count.max(axis=1)
    if uneven.any():
        k = int(np.argmax(uneven))
        raise ValueError(f"test set {name!r}: {key_names[k]} has between {count[k].min()} and "
                         f"{count[k].max()} rows per image/label pair; every seed must score "
                         f"every image")
    means = (total / count.ravel()).reshape(n_key, n, n_lab)

    pair = img * n_lab + lab
    coded = np.where(np.isnan(target), -1.0, target)
    t_count = np.bincount(pair, minlength=n * n_lab)
    t_mean = np.bincount(pair, weights=coded, minlength=n * n_lab) / t_count
    t_square = np.bincount(pair, weights=coded ** 2, minlength=n * n_lab) / t_count
    if (t_square - t_mean ** 2 > 1e-9).any():
        raise ValueError(f"test set {name!r}: an image has different targets for the same label "
                         f"across experiments or seeds")
    targets = np.where(t_mean < 0, np.nan, t_mean).reshape(n, n_lab)
    return _TestSet(name, image_ids, patient_ids, labels, targets,
                    dict(zip(key_names, means, strict=True)), attributes)


def _single_test_set(predictions: pd.DataFrame, what: str) -> _TestSet:
    """Arrange predictions that must hold one experiment on one test set (seeds are pooled)."""
    for col in ("experiment", "test_set"):
        if col in predictions.columns and predictions[col].nunique() > 1:
            raise ValueError(f"{what} must hold one {col}, got {predictions[col].nunique()}")
    return next(_test_sets(predictions, ()))


# --- Evaluation of one score matrix ---------------------------------------------------------

@dataclass(frozen=True)
class _Evaluation:
    """AUROC per label on the whole (sub)set and per bootstrap replicate."""

    labels: tuple[str, ...]
    auroc: np.ndarray       # (n_labels,)
    replicates: np.ndarray  # (n_boot, n_labels)
    used: np.ndarray        # (n_labels,) labels that enter the macro
    n_pos: np.ndarray
    n_neg: np.ndarray

    @property
    def macro(self) -> float:
        return float(self.auroc[self.used].mean()) if self.used.any() else math.nan

    @property
    def macro_replicates(self) -> np.ndarray:
        return _nan_stat(np.nanmean, self.replicates[:, self.used], axis=1)

    @property
    def left_out(self) -> str:
        return ", ".join(lab for lab, u in zip(self.labels, self.used, strict=True) if not u) or "-"


def _evaluate(labels: tuple[str, ...], targets: np.ndarray, scores: np.ndarray,
              weights: np.ndarray | None, weight_rows: np.ndarray | None = None,
              min_per_class: int = 1) -> _Evaluation:
    """AUROC per label, on the whole (sub)set and under each bootstrap replicate.

    ``weights`` are the test set's replicate weights as (n_boot, n_images); case i of
    targets/scores is image ``weight_rows[i]`` (the identity when None), so subgroups reuse the
    test set's draws without copying them.
    """
    n_pos = (targets == 1).sum(axis=0)
    n_neg = (targets == 0).sum(axis=0)
    used = (n_pos >= max(min_per_class, 1)) & (n_neg >= max(min_per_class, 1))
    n_boot = 0 if weights is None else len(weights)
    auroc = np.full(len(labels), np.nan)
    replicates = np.full((n_boot, len(labels)), np.nan)
    for j in np.flatnonzero(used):
        known = np.flatnonzero(~np.isnan(targets[:, j]))
        positive, score = targets[known, j] == 1, scores[known, j]
        auroc[j] = _auroc_columns(score, positive)[0]
        if weights is not None:
            rows = known if weight_rows is None else weight_rows[known]
            replicates[:, j] = _auroc_columns(score, positive, weights.T, rows)
    return _Evaluation(labels, auroc, replicates, used, n_pos, n_neg)


@dataclass(frozen=True)
class PairedBootstrapResult:
    """Macro AUROC of b minus a on the same images, with a patient-bootstrap CI and p-value."""

    macro_a: float
    macro_b: float
    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    labels_used: tuple[str, ...]


def _paired(a: _Evaluation, b: _Evaluation, alpha: float) -> PairedBootstrapResult:
    """Paired macro difference b - a from evaluations made with the same bootstrap weights."""
    deltas = b.macro_replicates - a.macro_replicates
    low, high = _percentile_ci(deltas, alpha)
    used = tuple(lab for lab, u in zip(a.labels, a.used, strict=True) if u)
    return PairedBootstrapResult(a.macro, b.macro, b.macro - a.macro, float(low), float(high),
                                 _bootstrap_p(deltas), used)


# --- Public bootstrap API ---------------------------------------------------------------------

def bootstrap_ci(predictions: pd.DataFrame, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> pd.DataFrame:
    """Per-label and macro AUROC with patient-bootstrap CIs, for one experiment on one test set.

    Columns: label, auroc, ci_low, ci_high, n_pos, n_neg, in_macro; the last row is the macro
    (label ``"macro"``, n_pos/n_neg/in_macro NA). Labels without both classes have in_macro False.
    """
    ts = _single_test_set(predictions, "bootstrap_ci predictions")
    weights = patient_bootstrap_weights(ts.patient_ids, n_boot, seed)
    ev = _evaluate(ts.labels, ts.targets, next(iter(ts.scores.values())), weights)
    low, high = _percentile_ci(ev.replicates, alpha)
    m_low, m_high = _percentile_ci(ev.macro_replicates, alpha)
    return pd.DataFrame({
        "label": [*ts.labels, MACRO],
        "auroc": [*ev.auroc, ev.macro],
        "ci_low": [*low, m_low],
        "ci_high": [*high, m_high],
        "n_pos": pd.array([*ev.n_pos, pd.NA], dtype="Int64"),
        "n_neg": pd.array([*ev.n_neg, pd.NA], dtype="Int64"),
        "in_macro": pd.array([*ev.used, pd.NA], dtype="boolean"),
    })


def paired_bootstrap_test(preds_a: pd.DataFrame, preds_b: pd.DataFrame, n_boot: int = 1000,
                          seed: int = 0, alpha: float = 0.05) -> PairedBootstrapResult:
    """Paired patient-bootstrap test of macro AUROC(b) - AUROC(a) on the same test images."""
    a = _single_test_set(preds_a, "preds_a")
    b = _single_test_set(preds_b, "preds_b")
    if not (np.array_equal(a.image_ids, b.image_ids) and a.labels == b.labels
            and np.array_equal(a.patient_ids, b.patient_ids)):
        raise ValueError("preds_a and preds_b must cover the same images, patients and labels")
    if not np.array_equal(a.targets, b.targets, equal_nan=True):
        raise ValueError("preds_a and preds_b have different targets for the same images")
    weights = patient_bootstrap_weights(a.patient_ids, n_boot, seed)
    return _paired(_evaluate(a.labels, a.targets, next(iter(a.scores.values())), weights),
                   _evaluate(b.labels, b.targets, next(iter(b.scores.values())), weights), alpha)


def macro_summary(predictions: pd.DataFrame, n_boot: int = 1000, seed: int = 0,
                  alpha: float = 0.05) -> pd.DataFrame:
    """Macro AUROC with patient-bootstrap CI per experiment and test set (seeds pooled).

    Columns: experiment, test_set, macro_auroc, ci_low, ci_high, labels_used, left_out,
    n_images, n_patients.
    """
    rows = []
    for ts in _test_sets(predictions):
        weights = patient_bootstrap_weights(ts.patient_ids, n_boot, seed)
        for experiment, scores in ts.scores.items():
            ev = _evaluate(ts.labels, ts.targets, scores, weights)
            low, high = _percentile_ci(ev.macro_replicates, alpha)
            rows.append({"experiment": experiment, "test_set": ts.name, "macro_auroc": ev.macro,
                         "ci_low": float(low), "ci_high": float(high),
                         "labels_used": int(ev.used.sum()), "left_out": ev.left_out,
                         "n_images": len(ts.image_ids),
                         "n_patients": len(pd.unique(ts.patient_ids))})
    return pd.DataFrame(rows)


# --- Multiple comparisons and comparisons to a baseline -------------------------------------

def holm(p_values: np.ndarray | Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni step-down adjusted p-values (monotone, at most 1); NaN stays NaN."""
    p = np.asarray(p_values, dtype=float)
    if ((p < 0) | (p > 1)).any():
        raise ValueError("p-values must lie in [0, 1]")
    out = np.full(p.shape, np.nan)
    known = ~np.isnan(p)
    m = int(known.sum())
    if m:
        values = p[known]
        order = np.argsort(values, kind="stable")
        stepped = np.maximum.accumulate((m - np.arange(m)) * values[order])
        adjusted = np.empty(m)
        adjusted[order] = np.minimum(stepped, 1.0)
        out[known] = adjusted
    return out


def adjust_holm(table: pd.DataFrame, by: Sequence[str] = ("comparison_family",),
                p_column: str = "p_value") -> pd.DataFrame:
    """Copy of ``table`` with ``p_adjusted``: Holm applied within each group of ``by``."""
    out = table.copy()
    adjusted = np.full(len(out), np.nan)
    p = out[p_column].to_numpy(dtype=float)
    for positions in out.groupby(list(by), sort=False, dropna=False).indices.values():
        adjusted[positions] = holm(p[positions])
    out["p_adjusted"] = adjusted
    return out


def compare_to_baseline(predictions: pd.DataFrame, baseline: str, n_boot: int = 1000,
                        seed: int = 0, alpha: float = 0.05) -> pd.DataFrame:
    """Every experiment against ``baseline`` on every test set, macro and per label.

    Macro rows (level "macro", label "macro"): p from the paired patient bootstrap. Label rows
    (level "label"): AUROC and delta CIs from the same bootstrap, p from DeLong's paired test
    (NaN when a class has fewer than two cases). ``p_adjusted`` is Holm within
    ``comparison_family`` ("<test_set>: macro" / "<test_set>: label"); call
    :func:`adjust_holm` with another ``by`` to choose other families. The smallest bootstrap p
    is 2 / (n_boot + 1), so with k macro comparisons per family the smallest adjusted p is
    2k / (n_boot + 1): 14 experiments need n_boot >= 560 to reach 0.05 at all.
    """
    rows = []
    for ts in _test_sets(predictions):
        if baseline not in ts.scores:
            raise ValueError(f"baseline {baseline!r} has no predictions on test set {ts.name!r}")
        weights = patient_bootstrap_weights(ts.patient_ids, n_boot, seed)
        base = _evaluate(ts.labels, ts.targets, ts.scores[baseline], weights)
        b_low, b_high = _percentile_ci(base.replicates, alpha)
        bm_low, bm_high = _percentile_ci(base.macro_replicates, alpha)
        for experiment, scores in ts.scores.items():
            if experiment == baseline:
                continue
            ev = _evaluate(ts.labels, ts.targets, scores, weights)
            paired = _paired(base, ev, alpha)
            m_low, m_high = _percentile_ci(ev.macro_replicates, alpha)
            common = {"experiment": experiment, "baseline": baseline, "test_set": ts.name,
                      "ci_level": 1 - alpha}
            rows.append({**common, "level": MACRO, "label": MACRO, "auroc": ev.macro,
                         "ci_low": float(m_low), "ci_high": float(m_high),
                         "baseline_auroc": base.macro, "baseline_ci_low": float(bm_low),
                         "baseline_ci_high": float(bm_high), "delta": paired.delta,
                         "delta_ci_low": paired.ci_low, "delta_ci_high": paired.ci_high,
                         "p_value": paired.p_value, "test": "paired patient bootstrap",
                         "n_pos": math.nan, "n_neg": math.nan})
            low, high = _percentile_ci(ev.replicates, alpha)
            d_low, d_high = _percentile_ci(ev.replicates - base.replicates, alpha)
            for j, label in enumerate(ts.labels):
                p = math.nan
                if ev.n_pos[j] >= 2 and ev.n_neg[j] >= 2:
                    known = ~np.isnan(ts.targets[:, j])
                    p = delong_test(ts.targets[known, j], ts.scores[baseline][known, j],
                                    scores[known, j]).p_value
                rows.append({**common, "level": "label", "label": label, "auroc": ev.auroc[j],
                             "ci_low": low[j], "ci_high": high[j],
                             "baseline_auroc": base.auroc[j], "baseline_ci_low": b_low[j],
                             "baseline_ci_high": b_high[j], "delta": ev.auroc[j] - base.auroc[j],
                             "delta_ci_low": d_low[j], "delta_ci_high": d_high[j],
                             "p_value": p, "test": "DeLong", "n_pos": int(ev.n_pos[j]),
                             "n_neg": int(ev.n_neg[j])})
    table = pd.DataFrame(rows)
    if table.empty:
        raise ValueError(f"no experiment besides the baseline {baseline!r} to compare")
    order = ["experiment", "baseline", "test_set", "level", "label", "auroc", "ci_low", "ci_high",
             "baseline_auroc", "baseline_ci_low", "baseline_ci_high", "delta", "delta_ci_low",
             "delta_ci_high", "p_value", "test", "n_pos", "n_neg", "ci_level"]
    table = table[order]
    table["comparison_family"] = table["test_set"] + ": " + table["level"]
    return adjust_holm(table)


def seed_spread(predictions: pd.DataFrame) -> pd.DataFrame:
    """Spread of the per-seed macro AUROC per experiment and test set (no bootstrap).

    Columns: experiment, test_set, n_seeds, macro_auroc_mean, macro_auroc_min, macro_auroc_max.
    """
    if "seed" not in predictions.columns:
        raise ValueError("predictions lack the column 'seed'")
    rows = []
    for ts in _test_sets(predictions, keys=("experiment", "seed")):
        per_experiment: dict[Hashable, list[float]] = {}
        for (experiment, _seed), scores in ts.scores.items():
            macro = _evaluate(ts.labels, ts.targets, scores, None).macro
            per_experiment.setdefault(experiment, []).append(macro)
        for experiment, macros in per_experiment.items():
            values = np.asarray(macros)
            rows.append({"experiment": experiment, "test_set": ts.name, "n_seeds": len(values),
                         "macro_auroc_mean": values.mean(), "macro_auroc_min": values.min(),
                         "macro_auroc_max": values.max()})
    return pd.DataFrame(rows)


# --- Subgroups ------------------------------------------------------------------------------

def age_band(age: pd.Series | np.ndarray | Sequence[float]) -> pd.Series:
    """Age bands "<40", "40-59", "60-79", "80+" (ordered categorical; NaN where age is unknown)."""
    years = pd.to_numeric(pd.Series(age), errors="coerce")
    return pd.cut(years, [-np.inf, 40, 60, 80, np.inf], right=False, labels=list(AGE_BANDS))


def _group_values(ts: _TestSet, by: str) -> tuple[pd.Series, list[str]]:
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


def subgroup_auroc(predictions: pd.DataFrame, by: str | Sequence[str], n_boot: int = 1000,
                   seed: int = 0, alpha: float = 0.05, min_per_class: int = 5,
                   keep_replicates: bool = False) -> pd.DataFrame:
    """Macro AUROC with patient-bootstrap CI per experiment, test set and subgroup.

    ``by`` is one or more of "sex", "age_band", "race", "view". A label enters a group's macro
    only with ``min_per_class`` positives and negatives there; a group with no such label gets
    NaN. Columns: experiment, test_set, by, group, macro_auroc, ci_low, ci_high, n_images,
    n_patients, labels_used, left_out, plus ``replicates`` (the bootstrap macro values, for
    :func:`subgroup_gap`'s CI) when ``keep_replicates``.
    """
    bys = [by] if isinstance(by, str) else list(by)
    unknown = [b for b in bys if b not in SUBGROUPS]
    if unknown:
        raise ValueError(f"unknown subgroup(s) {unknown}; choose from {SUBGROUPS}")
    rows = []
    for ts in _test_sets(predictions):
        weights = patient_bootstrap_weights(ts.patient_ids, n_boot, seed)
        for b in bys:
            values, groups = _group_values(ts, b)
            for group in groups:
                members = np.flatnonzero((values == group).to_numpy())
                for experiment, scores in ts.scores.items():
                    ev = _evaluate(ts.labels, ts.targets[members], scores[members], weights,
                                   members, min_per_class)
                    reps = ev.macro_replicates
                    low, high = _percentile_ci(reps, alpha)
                    row = {"experiment": experiment, "test_set": ts.name, "by": b, "group": group,
                           "macro_auroc": ev.macro, "ci_low": float(low), "ci_high": float(high),
                           "n_images": len(members),
                           "n_patients": len(pd.unique(ts.patient_ids[members])),
                           "labels_used": int(ev.used.sum()), "left_out": ev.left_out}
                    if keep_replicates:
                        row["replicates"] = reps
                    rows.append(row)
    return pd.DataFrame(rows)


def _gap_replicates(table: pd.DataFrame, groups: list[str]) -> np.ndarray:
    """Per-replicate max - min group macro AUROC over ``groups`` (table indexed by group)."""
    reps = np.column_stack([table.at[g, "replicates"] for g in groups])
    return _nan_stat(np.nanmax, reps, axis=1) - _nan_stat(np.nanmin, reps, axis=1)


def subgroup_gap(sub_table: pd.DataFrame, baseline: str, tolerance: float = 0.005,
                 alpha: float = 0.05) -> pd.DataFrame:
    """Gap between the best and worst subgroup, per experiment, against the baseline's gap.

    Uses the groups with a macro AUROC for both. ``change`` = gap - baseline_gap (negative =
    narrower); ``direction`` is "unchanged" when |change| < ``tolerance``, "n/a" with fewer than
    two groups. With a ``replicates`` column (``subgroup_auroc(..., keep_replicates=True)``) the
    change gets a paired percentile CI (rough: max - min is biased upwards); else it is NaN.
    Columns: experiment, test_set, by, n_groups, best_group, worst_group, gap, baseline_gap,
    change, direction, change_ci_low, change_ci_high.
    """
    if baseline not in set(sub_table["experiment"]):
        raise ValueError(f"baseline {baseline!r} is not in the subgroup table")
    rows = []
    for (test_set, b), g in sub_table.groupby(["test_set", "by"], sort=False):
        base = g[g["experiment"] == baseline].set_index("group")
        if base.empty:
            raise ValueError(f"baseline {baseline!r} has no {b} groups on test set {test_set!r}")
        for experiment, e in g[g["experiment"] != baseline].groupby("experiment", sort=False):
            e = e.set_index("group")
            groups = [x for x in e.index if x in base.index
                      and np.isfinite(e.at[x, "macro_auroc"])
                      and np.isfinite(base.at[x, "macro_auroc"])]
            row = {"experiment": experiment, "test_set": test_set, "by": b,
                   "n_groups": len(groups), "best_group": None, "worst_group": None,
                   "gap": math.nan, "baseline_gap": math.nan, "change": math.nan,
                   "direction": "n/a", "change_ci_low": math.nan, "change_ci_high": math.nan}
            if len(groups) >= 2:
                auc, base_auc = e.loc[groups, "macro_auroc"], base.loc[groups, "macro_auroc"]
                gap = float(auc.max() - auc.min())
                base_gap = float(base_auc.max() - base_auc.min())
                change = gap - base_gap
                direction = ("unchanged" if abs(change) < tolerance
                             else "narrower" if change < 0 else "wider")
                row.update(best_group=auc.idxmax(), worst_group=auc.idxmin(), gap=gap,
                           baseline_gap=base_gap, change=change, direction=direction)
                if "replicates" in e.columns:
                    low, high = _percentile_ci(
                        _gap_replicates(e, groups) - _gap_replicates(base, groups), alpha)
                    row.update(change_ci_low=float(low), change_ci_high=float(high))
            rows.append(row)
    return pd.DataFrame(rows)


# --- Findings -------------------------------------------------------------------------------

def _p_text(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _delta_text(row: dict, ci: str) -> str:
    """'+0.014, 95% CI +0.004 to +0.024, Holm-adjusted p = 0.003' for a comparison row."""
    return (f"{row['delta']:+.3f}, {ci} {row['delta_ci_low']:+.3f} to "
            f"{row['delta_ci_high']:+.3f}, Holm-adjusted {_p_text(row['p_adjusted'])}")


def _synthetic_only_sentence(row: dict, where: str, ci: str, alpha: float,
                             margin: float) -> str:
    """Whether a synthetic-only experiment matches the baseline, with the rule spelled out."""
    overlap = row["ci_low"] <= row["baseline_ci_high"] and row["baseline_ci_low"] <= row["ci_high"]
    close = abs(row["delta"]) < margin and row["p_adjusted"] >= alpha
    reasons = (["the CIs overlap"] if overlap else []) + (
        [f"|delta| = {abs(row['delta']):.3f} with Holm-adjusted {_p_text(row['p_adjusted'])}"]
        if close else [])
    verdict = "matched" if reasons else "did not match"
    because = " and ".join(reasons) if reasons else "neither holds"
    return (f"{where}, {row['experiment']} (synthetic training images only) {verdict} "
            f"{row['baseline']}: macro AUROC {row['auroc']:.3f} ({ci} {row['ci_low']:.3f} to "
            f"{row['ci_high']:.3f}) vs {row['baseline_auroc']:.3f} ({ci} "
            f"{row['baseline_ci_low']:.3f} to {row['baseline_ci_high']:.3f}), delta "
            f"{_delta_text(row, ci)}; a match means the {ci}s overlap or |delta| < {margin:g} "
            f"with Holm-adjusted p >= {alpha:g}, and here {because}.")


def findings(comparison: pd.DataFrame, alpha: float = 0.05,
             match_margin: float = 0.01) -> list[str]:
    """Sentences generated from the macro rows of :func:`compare_to_baseline`, per test set.

    Per test set: how many experiments beat / fall below the baseline (Holm-adjusted p <
    ``alpha``), one sentence per significant difference (largest first), the largest gain, and
    whether each synthetic-only experiment (name starts with "synthetic_only") matches the
    baseline: its CI overlaps the baseline's, or |delta| < ``match_margin`` with adjusted
    p >= ``alpha``.
    """
    table = comparison if "p_adjusted" in comparison.columns else adjust_holm(comparison)
    macro = table[(table["level"] == MACRO) & table["delta"].notna()]
    out = []
    for test_set, g in macro.groupby("test_set", sort=False):
        first = g.iloc[0]
        baseline, where = first["baseline"], f"On {test_set} test"
        ci = f"{round(100 * first['ci_level'])}% CI"
        significant = g["p_adjusted"] < alpha
        up = g[significant & (g["delta"] > 0)].sort_values("delta", ascending=False)
        down = g[significant & (g["delta"] < 0)].sort_values("delta")
        out.append(f"{where}, {len(up)} of {len(g)} experiments significantly beat {baseline} "
                   f"(macro AUROC {first['baseline_auroc']:.3f}) and {len(down)} fell below it "
                   f"(Holm-adjusted p < {alpha:g}).")
        for verb, rows in (("raised", up), ("lowered", down)):
            for row in rows.to_dict("records"):
                out.append(f"{where}, {row['experiment']} {verb} macro AUROC from "
                           f"{row['baseline_auroc']:.3f} to {row['auroc']:.3f} "
                           f"({_delta_text(row, ci)}).")
        best = g.loc[g["delta"].idxmax()].to_dict()
        if best["delta"] > 0:
            out.append(f"{where}, the largest gain over {baseline} was {best['experiment']}'s "
                       f"({_delta_text(best, ci)}).")
        else:
            out.append(f"{where}, no experiment had a higher macro AUROC than {baseline} "
                       f"({first['baseline_auroc']:.3f}).")
        synthetic = g[g["experiment"].astype(str).str.startswith(SYNTHETIC_ONLY_PREFIX)]
        for row in synthetic.to_dict("records"):
            out.append(_synthetic_only_sentence(row, where, ci, alpha, match_margin))
    return out


# --- The study: families of comparisons, summaries and findings for notebook 05 ------------

def experiment_summary(predictions: pd.DataFrame, grid: pd.DataFrame,
                       spec: StatsSpec) -> pd.DataFrame:
    """:func:`macro_summary` with each experiment's recipe from the grid (kind, k,
    real_fraction, train_site, n_real, n_synthetic), for the figures."""
    info = grid.drop_duplicates("experiment")[
        ["experiment", "kind", "k", "real_fraction", "train_site", "n_real", "n_synthetic"]]
    return macro_summary(predictions, spec.n_boot, spec.seed, spec.alpha).merge(
        info, on="experiment", how="left")


def compare_families(predictions: pd.DataFrame, spec: StatsSpec) -> pd.DataFrame:
    """Every experiment against its own baseline (:func:`cxrlib.grid.baseline_of`:
    real only at the same real fraction, or the external site alone). Holm applies within one
    baseline, test set and level, i.e. across the comparisons of one figure panel."""
    names = list(dict.fromkeys(predictions["experiment"]))
    parts = []
    for baseline in dict.fromkeys(baseline_of(n) for n in names):
        members = [n for n in names if baseline_of(n) == baseline]
        if baseline not in names:
            raise ValueError(f"experiments {members} have no baseline predictions "
                             f"({baseline}); finish the grid (notebook 04) first")
        if len(members) > 1:
            parts.append(compare_to_baseline(predictions[predictions["experiment"].isin(members)],
                                             baseline, spec.n_boot, spec.seed, spec.alpha))
    if not parts:
        raise ValueError("the grid has no experiment to compare with a baseline")
    table = pd.concat(parts, ignore_index=True)
    table["comparison_family"] = table["baseline"] + " / " + table["comparison_family"]
    return adjust_holm(table)


def best_experiment(comparisons: pd.DataFrame, kind_prefix: str = "real_plus_synthetic") -> str:
    """The experiment named ``kind_prefix...`` with the largest macro AUROC gain over its
    baseline on the internal test set (the first test set when none is marked internal)."""
    macro = comparisons[(comparisons["level"] == MACRO)
                        & comparisons["experiment"].str.startswith(kind_prefix)]
    if macro.empty:
        raise ValueError(f"no experiment starting with {kind_prefix!r} was compared")
    internal = macro[macro["test_set"].str.contains("internal")]
    pool = internal if len(internal) else macro[macro["test_set"] == macro["test_set"].iloc[0]]
    return str(pool.loc[pool["delta"].idxmax(), "experiment"])


def gap_sentences(gaps: pd.DataFrame, alpha: float = 0.05) -> list[str]:
    """One sentence per experiment, test set and attribute with at least two groups: did the
    gap between the best and the worst subgroup narrow or widen against the baseline?"""
    ci = f"{round(100 * (1 - alpha))}% CI"
    out = []
    for row in gaps[gaps["direction"] != "n/a"].to_dict("records"):
        interval = ""
        if np.isfinite(row["change_ci_low"]):
            unclear = row["change_ci_low"] <= 0 <= row["change_ci_high"]
            interval = (f"; {ci} of the change {row['change_ci_low']:+.3f} to "
                        f"{row['change_ci_high']:+.3f}"
                        + (", which includes 0: no clear change" if unclear else ""))
        out.append(f"Subgroups by {row['by']} on {row['test_set']} test: {row['experiment']} "
                   f"{'left' if row['direction'] == 'unchanged' else 'made'} the gap between "
                   f"the best ({row['best_group']}) and worst ({row['worst_group']}) group "
                   f"{row['direction']}: {row['gap']:.3f} against {row['baseline_gap']:.3f} "
                   f"for the baseline ({row['change']:+.3f}{interval}).")
    return out


def study_findings(comparisons: pd.DataFrame, gaps: pd.DataFrame,
                   spec: StatsSpec) -> list[str]:
    """:func:`findings` for every family of comparisons, then :func:`gap_sentences`."""
    out = []
    for _, family in comparisons.groupby("baseline", sort=False):
        out += findings(family, spec.alpha)
    return out + gap_sentences(gaps, spec.alpha)
