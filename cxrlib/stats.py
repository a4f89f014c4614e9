"""Statistics on per-image predictions: AUROC, DeLong (plain and patient-clustered), the
patient bootstrap, the label rule, training seeds as a random effect, TOST, Holm and
calibration metrics. The study's tables built on them live in :mod:`cxrlib.study.plan`,
their sentences in :mod:`cxrlib.study.findings`.

Input is the long predictions frame: one row per (experiment, seed, test_set, label, image) with
``image_id``, ``patient_id``, ``target`` (1, 0, or NaN = unknown), ``score`` and the subgroup
columns ``sex``, ``age``, ``race``, ``view``. Every model is scored on the same images of a test
set, so all comparisons are paired. Rules followed by every function below:

* **One label rule.** A label enters a macro AUROC only with at least ``stats.min_positives``
  positives and as many negatives (unknown targets left out) in the (sub)set evaluated
  (:func:`label_rule`). The label set is fixed before resampling: a bootstrap replicate in which
  a label of the set lacks a class is dropped, never averaged over fewer labels. Labels left
  out are named in every table.
* **Seeds are a random effect.** Seed s of an experiment is paired with seed s of its baseline
  (each seed draws its own real subset, so the pair shares it). A contrast (a difference, a
  trend, a difference-in-differences) is computed per seed on the same test images and
  averaged over the seeds. Its variance has two levels (:func:`seed_estimate`): the variance
  between the per-seed values over the number of seeds (training variance, seed-by-image
  noise included), plus the patient-sampling variance the seeds share (the mean covariance
  between seeds of the patient-bootstrap replicates, or of the clustered DeLong influence
  values for one label). This is the method-of-moments fit of a crossed seed x test-set random
  effects model. CIs and p-values use Student's t with Satterthwaite degrees of freedom, so 3
  seeds give wide but calibrated intervals; a seed bootstrap cannot (3 seeds have 10 distinct
  resamples, and their variance is 2/3 of the truth). With one seed, the training variance is
  not estimated and the intervals cover test-set sampling only.
* **Patients, not images, are resampled.** The bootstrap draws are made once per test set from
  ``numpy.random.default_rng(stats.seed)`` over its patients and shared by every experiment,
  seed and subgroup, so contrasts are paired and reproducible. Per-label tests use DeLong's
  placements summed within patients (Obuchowski 1997), so a label's CI and p come from one
  analytic variance.
* **p-values are analytic** (t or normal), so they have no floor (``p_floor`` = 0) and can
  reach p < 0.01 after Holm with any ``n_boot``; ``n_boot`` only sets how precisely the
  patient-level variance is estimated (about 1/sqrt(2 n_boot) relative error).
* **Equivalence** is TOST against ``stats.equivalence_margin``
  (:meth:`Estimate.equivalence_p`): the 90% CI (1 - 2 alpha) of delta inside +/- margin.
* **Holm** (:func:`adjust_holm`) applies within a family; :mod:`cxrlib.study.plan` names the
  families.

:func:`auroc_table` and :func:`macro_auroc` (used by the learnability check) are plain point
estimates on a single set of predictions, without the label rule.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from cxrlib.core.cohort import SUBGROUP_COLUMNS
from cxrlib.core.labels import CHEXPERT_LABELS
from cxrlib.core.schema import StatsSpec

#: Power at which the minimum detectable effect is given.
MDE_POWER = 0.8
_LOGIT_CLIP = 1e-6


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


# --- DeLong, plain and patient-clustered ---------------------------------------------------

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


def _placements(positive: np.ndarray,
                scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUROCs of k score rows and DeLong's placement values (Sun & Xu's midrank algorithm).

    Returns aucs (k,), v10 (k, positives): each positive's share of negatives ranked below it
    (ties 1/2), and v01 (k, negatives): each negative's share of positives ranked above it.
    """
    s = np.atleast_2d(np.asarray(scores, dtype=float))
    if s.ndim != 2 or s.shape[1] != positive.size:
        raise ValueError(f"scores have shape {s.shape} but y_true has {positive.size} cases")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    m, n = int(positive.sum()), int((~positive).sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong needs at least two positives and two negatives, got {m} and {n}")
    pos, neg = s[:, positive], s[:, ~positive]
    tx = sps.rankdata(pos, axis=1)
    ty = sps.rankdata(neg, axis=1)
    tz = sps.rankdata(np.hstack([pos, neg]), axis=1)
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    return aucs, (tz[:, :m] - tx) / n, 1.0 - (tz[:, m:] - ty) / m


def delong_covariance(y_true: np.ndarray | Sequence[float],
                      scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs of k score vectors on the same cases and their DeLong covariance matrix.

    ``scores`` is (k, n) or (n,). Uses the midrank algorithm of Sun & Xu (2014), O(k n log n),
    which equals DeLong's placement definition; needs at least two cases of each class.
    """
    positive = _binary_target(y_true)
    aucs, v10, v01 = _placements(positive, scores)
    m, n = v10.shape[1], v01.shape[1]
    return aucs, np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n


def clustered_influence(y_true: np.ndarray | Sequence[float], scores: np.ndarray,
                        clusters: np.ndarray | Sequence[Hashable]) -> tuple[np.ndarray,
                                                                            np.ndarray]:
    """AUROCs of k score rows and each cluster's (patient's) influence on them.

    Obuchowski (1997) in influence form: a cluster's value is its positives' placements minus
    the AUROC, summed and divided by the number of positives, plus the same for its negatives.
    The covariance of two AUROCs is ``c / (c - 1) * psi_a @ psi_b`` over the c clusters, so a
    patient's images count as one sample; with one image per patient it is DeLong's.
    Returns aucs (k,) and psi (k, clusters), clusters numbered in sorted order.
    """
    positive = _binary_target(y_true)
    codes, uniques = pd.factorize(np.asarray(clusters), sort=True)
    if codes.shape != positive.shape or (codes < 0).any():
        raise ValueError("clusters must give one non-missing id per case")
    aucs, v10, v01 = _placements(positive, scores)
    m, n, c = v10.shape[1], v01.shape[1], len(uniques)
    if c < 2:
        raise ValueError("a clustered variance needs at least two clusters")
    psi = np.empty((len(aucs), c))
    for r, auc in enumerate(aucs):
        psi[r] = (np.bincount(codes[positive], (v10[r] - auc) / m, minlength=c)
                  + np.bincount(codes[~positive], (v01[r] - auc) / n, minlength=c))
    return aucs, psi


def cluster_covariance(psi: np.ndarray) -> np.ndarray:
    """Covariance matrix of the rows' estimates from cluster influence values (k, clusters)."""
    c = psi.shape[1]
    return c / (c - 1) * psi @ psi.T


def _z_test(diff: float, var: float) -> tuple[float, float]:
    """Two-sided normal test of a difference with variance ``var``: (z, p)."""
    if diff == 0:
        return 0.0, 1.0
    if var <= 0:
        return math.copysign(math.inf, diff), 0.0
    z = diff / math.sqrt(var)
    return float(z), float(2 * sps.norm.sf(abs(z)))


def delong_test(y_true: np.ndarray | Sequence[float], score_a: np.ndarray | Sequence[float],
                score_b: np.ndarray | Sequence[float],
                clusters: np.ndarray | Sequence[Hashable] | None = None) -> DeLongResult:
    """Two-sided paired DeLong test of AUROC(b) - AUROC(a) on the same cases.

    With ``clusters`` (one patient id per case), the patient-clustered test of Obuchowski
    (1997): correlated images of one patient are not counted as independent evidence.
    """
    a, b = np.asarray(score_a, dtype=float), np.asarray(score_b, dtype=float)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"score_a and score_b must be 1-D of the same length, got shapes "
                         f"{a.shape} and {b.shape}")
    if clusters is None:
        aucs, cov = delong_covariance(y_true, np.vstack([a, b]))
    else:
        aucs, psi = clustered_influence(y_true, np.vstack([a, b]), clusters)
        cov = cluster_covariance(psi)
    z, p = _z_test(float(aucs[1] - aucs[0]), float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]))
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


# --- Predictions as arrays ------------------------------------------------------------------

@dataclass(frozen=True)
class CodedTestSet:
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


def coded_test_sets(predictions: pd.DataFrame,
                    keys: tuple[str, ...] = ("experiment",)) -> Iterator[CodedTestSet]:
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
    attributes = pd.DataFrame({c: predictions[c].iloc[first].to_numpy() for c in SUBGROUP_COLUMNS
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
             attributes: pd.DataFrame) -> CodedTestSet:
    """Pool one test set's coded rows into a score matrix per key and one target matrix.

    The row arrays (``img``, ``lab``, ``key``, ``score``, ``target``) have one entry per
    prediction row of this test set; codes are compact (0.. among those in use here).

    Args:
        name: the test set's name (in errors and the result).
        img: each row's image, an index into ``image_ids``.
        lab: each row's label, an index into ``labels``.
        key: each row's key (e.g. experiment), an index into ``key_names``; every key must
            score every (image, label) pair, equally often (every seed every image).
        score: each row's score; averaged over the rows of an (image, label, key) cell.
        target: each row's target (0, 1 or NaN = unknown); must agree within an
            (image, label) pair across keys and seeds.
        labels: the labels in use, in CheXpert order (the target matrix's columns).
        key_names: each key code's value (the result's score keys).
        image_ids: the images in use, in image_id order (the matrices' rows).
        patient_ids: each image's patient.
        attributes: per-image subgroup columns, in image order.
    """
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
    return CodedTestSet(name, image_ids, patient_ids, labels, targets,
                    dict(zip(key_names, means, strict=True)), attributes)


# --- The label rule and per-seed macro AUROC -----------------------------------------------

def label_rule(targets: np.ndarray, min_positives: int) -> np.ndarray:
    """Which labels (columns of an images x labels target matrix, NaN = unknown) may enter a
    macro AUROC: at least ``min_positives`` positives and as many negatives."""
    return (((targets == 1).sum(axis=0) >= min_positives)
            & ((targets == 0).sum(axis=0) >= min_positives))


def _named(labels: tuple[str, ...], mask: np.ndarray) -> tuple[str, ...]:
    return tuple(lab for lab, keep in zip(labels, mask, strict=True) if keep)


def macro_and_replicates(labels: tuple[str, ...], targets: np.ndarray, scores: np.ndarray,
                         used: np.ndarray, weights: np.ndarray | None,
                         weight_rows: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Macro AUROC over the ``used`` labels on the whole (sub)set and per bootstrap replicate.

    ``weights`` are the test set's replicate weights (n_boot, n_images); case i of
    targets/scores is image ``weight_rows[i]`` (the identity when None), so subgroups reuse the
    test set's draws. A replicate where a used label lacks a class is NaN (label set fixed).
    """
    n_boot = 0 if weights is None else len(weights)
    columns = np.flatnonzero(used)
    if columns.size == 0:
        return math.nan, np.full(n_boot, np.nan)
    point, reps = np.empty(columns.size), np.empty((columns.size, n_boot))
    for i, j in enumerate(columns):
        known = np.flatnonzero(~np.isnan(targets[:, j]))
        positive, score = targets[known, j] == 1, scores[known, j]
        point[i] = _auroc_columns(score, positive)[0]
        if weights is not None:
            rows = known if weight_rows is None else weight_rows[known]
            reps[i] = _auroc_columns(score, positive, weights.T, rows)
    return float(point.mean()), reps.mean(axis=0)


@dataclass(frozen=True)
class SeedMacros:
    """Per-seed macro AUROC of every key (an experiment, or an experiment and a subgroup) on
    one test set, on the whole set and under each shared patient-bootstrap replicate."""

    test_set: str
    labels: tuple[str, ...]                    # the labels in every macro (the label rule)
    left_out: tuple[str, ...]
    n_images: int
    n_patients: int
    point: dict[Hashable, dict[Hashable, float]]            # key -> seed -> macro
    replicates: dict[Hashable, dict[Hashable, np.ndarray]]  # key -> seed -> (n_boot,)
    ensemble: dict[Hashable, float]            # key -> macro of the seed-averaged scores


def seed_macros_of(ts: CodedTestSet, used: np.ndarray, weights: np.ndarray,
                   members: np.ndarray | None = None, tag: Hashable = None) -> SeedMacros:
    """:class:`SeedMacros` of a test set whose scores are keyed (experiment, seed), on the
    images ``members`` (all when None); keys become (experiment, tag) when a tag is given."""
    rows = np.arange(len(ts.image_ids)) if members is None else members
    targets = ts.targets[rows]
    point: dict[Hashable, dict[Hashable, float]] = {}
    reps: dict[Hashable, dict[Hashable, np.ndarray]] = {}
    pooled: dict[Hashable, list[np.ndarray]] = {}
    for (experiment, seed), scores in ts.scores.items():
        key = experiment if tag is None else (experiment, tag)
        value, replicates = macro_and_replicates(ts.labels, targets, scores[rows], used, weights,
                                                 rows)
        point.setdefault(key, {})[seed] = value
        reps.setdefault(key, {})[seed] = replicates
        pooled.setdefault(key, []).append(scores[rows])
    ensemble = {key: macro_and_replicates(ts.labels, targets, np.mean(s, axis=0), used, None)[0]
                for key, s in pooled.items()}
    return SeedMacros(ts.name, _named(ts.labels, used), _named(ts.labels, ~used), len(rows),
                      len(pd.unique(ts.patient_ids[rows])), point, reps, ensemble)


def seed_macros(predictions: pd.DataFrame, spec: StatsSpec) -> dict[str, SeedMacros]:
    """:class:`SeedMacros` per test set: every experiment and seed, the label rule of ``spec``
    and ``spec.n_boot`` patient-bootstrap replicates drawn with ``spec.seed``."""
    if "seed" not in predictions.columns:
        raise ValueError("predictions lack the column 'seed'")
    out = {}
    for ts in coded_test_sets(predictions, ("experiment", "seed")):
        weights = patient_bootstrap_weights(ts.patient_ids, spec.n_boot, spec.seed)
        out[ts.name] = seed_macros_of(ts, label_rule(ts.targets, spec.min_positives), weights)
    return out


# --- Estimates with seeds as a random effect ------------------------------------------------

@dataclass(frozen=True)
class Estimate:
    """A contrast averaged over seeds with its two-level standard error (see the module notes).

    ``ci_*`` is the (1 - alpha) t interval, ``ci90_*`` the (1 - 2 alpha) one used by TOST;
    ``seed_se`` is NaN with one seed (training variance not estimated); ``mde`` is the minimum
    detectable effect at 80% power and level alpha (:func:`minimum_detectable_effect`).
    """

    estimate: float
    se: float
    df: float
    ci_low: float
    ci_high: float
    ci90_low: float
    ci90_high: float
    p: float
    n_seeds: int
    seed_sd: float
    seed_se: float
    patient_se: float
    mde: float

    @classmethod
    def missing(cls, n_seeds: int) -> Estimate:
        """No estimate (NaN throughout): a contrast that cannot be formed or is not tested."""
        nan = math.nan
        return cls(nan, nan, nan, nan, nan, nan, nan, nan, n_seeds, nan, nan, nan, nan)

    def equivalence_p(self, margin: float) -> float:
        """TOST p: the larger one-sided p of delta > -margin and delta < +margin."""
        if self.se == 0:
            return 0.0 if abs(self.estimate) < margin else 1.0
        lower = sps.t.sf((self.estimate + margin) / self.se, self.df)
        upper = sps.t.cdf((self.estimate - margin) / self.se, self.df)
        return float(max(lower, upper))


def _t_p(estimate: float, se: float, df: float) -> float:
    """Two-sided p of ``estimate`` / ``se`` under Student's t with ``df`` (normal when inf)."""
    if se == 0:
        return 1.0 if estimate == 0 else 0.0
    return float(2 * sps.t.sf(abs(estimate) / se, df))


def minimum_detectable_effect(se: float, df: float, level: float) -> float:
    """The smallest true difference a two-sided t test at ``level`` finds with
    :data:`MDE_POWER` power: (t_{1-level/2, df} + t_{power, df}) * se, at the comparison's own
    (Satterthwaite) df, so that it matches the test actually run; with 2 to 5 df it is far
    larger than the normal-quantile value, which it equals at infinite df (one seed)."""
    if not (math.isfinite(se) and df > 0):
        return math.nan
    return float((sps.t.ppf(1 - level / 2, df) + sps.t.ppf(MDE_POWER, df)) * se)


def seeds_for_mde(seed_se: float, patient_se: float, n_seeds: int, target: float,
                  level: float, most: int = 100) -> int | None:
    """The fewest training seeds at which a comparison like this one would detect ``target``
    (its MDE at most that), from its own variance terms: the between-seed term shrinks as
    1 / seeds, the test set's (patient) term does not; Satterthwaite df as in
    :func:`seed_estimate`. None when no number up to ``most`` does (the test set's own
    variance alone is too large: more test patients would be needed) or with one seed."""
    if not (n_seeds > 1 and math.isfinite(seed_se) and math.isfinite(patient_se)):
        return None
    per_seed = seed_se ** 2 * n_seeds  # the variance of one seed's paired delta
    for n in range(2, most + 1):
        seed_var = per_seed / n
        total = seed_var + patient_se ** 2
        df = math.inf if seed_var == 0 else total ** 2 / (seed_var ** 2 / (n - 1))
        if minimum_detectable_effect(math.sqrt(total), df, level) <= target:
            return n
    return None


def seed_estimate(values: np.ndarray, patient_cov: np.ndarray, alpha: float) -> Estimate:
    """Combine per-seed values (S,) and their patient-level covariance (S, S) into an estimate.

    Variance = var(values) / S (between seeds) + the mean off-diagonal patient covariance (the
    test-set sampling that all seeds share); one seed: its patient variance alone. Degrees of
    freedom by Satterthwaite, the seed term having S - 1.
    """
    n = len(values)
    estimate = float(np.mean(values))
    if n > 1:
        seed_var = float(np.var(values, ddof=1)) / n
        patient_var = max(float(patient_cov[~np.eye(n, dtype=bool)].mean()), 0.0)
        total = seed_var + patient_var
        df = math.inf if seed_var == 0 else total ** 2 / (seed_var ** 2 / (n - 1))
        seed_sd = float(np.std(values, ddof=1))
    else:
        seed_var, seed_sd = math.nan, math.nan
        patient_var = total = max(float(patient_cov[0, 0]), 0.0)
        df = math.inf
    se = math.sqrt(total)
    p = _t_p(estimate, se, df)
    half, half90 = sps.t.ppf(1 - alpha / 2, df) * se, sps.t.ppf(1 - alpha, df) * se
    return Estimate(estimate, se, df, estimate - half, estimate + half, estimate - half90,
                    estimate + half90, p, n, seed_sd, math.sqrt(seed_var), math.sqrt(patient_var),
                    minimum_detectable_effect(se, df, alpha))


def contrast(sm: SeedMacros, weights: dict[Hashable, float], alpha: float) -> Estimate:
    """Sum of ``weight * macro`` over keys, per seed (seeds paired across keys), averaged over
    the seeds all keys have, with its two-level SE: e.g. {experiment: 1, baseline: -1}."""
    seeds = sorted(set.intersection(*(set(sm.point[k]) for k in weights)), key=str)
    if not seeds:
        raise ValueError(f"test set {sm.test_set!r}: {list(weights)} share no training seed")
    values = np.array([sum(w * sm.point[k][s] for k, w in weights.items()) for s in seeds])
    reps = np.vstack([sum(w * sm.replicates[k][s] for k, w in weights.items()) for s in seeds])
    reps = reps[:, np.isfinite(reps).all(axis=0)]
    if not np.isfinite(values).all() or reps.shape[1] < 2:
        return Estimate.missing(len(seeds))
    return seed_estimate(values, np.atleast_2d(np.cov(reps)), alpha)


# --- Multiple comparisons -------------------------------------------------------------------

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


def adjust_holm(table: pd.DataFrame, by: Sequence[str] = ("family",),
                p_column: str = "p") -> pd.DataFrame:
    """Copy of ``table`` with ``p_holm``: Holm applied within each group of ``by``."""
    out = table.copy()
    adjusted = np.full(len(out), np.nan)
    p = out[p_column].to_numpy(dtype=float)
    for positions in out.groupby(list(by), sort=False, dropna=False).indices.values():
        adjusted[positions] = holm(p[positions])
    out["p_holm"] = adjusted
    return out


# --- Calibration ----------------------------------------------------------------------------

def calibration_metrics(y: np.ndarray, p: np.ndarray, bins: int) -> tuple[float, float, float]:
    """Brier score, expected calibration error (``bins`` equal-width bins, weighted by their
    share of cases) and calibration slope (logistic regression of y on logit p; 1 = ideal,
    < 1 = overconfident) of probabilities ``p`` for binary targets ``y``."""
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    brier = float(np.mean((p - y) ** 2))
    which = np.minimum((p * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, y, bins) - np.bincount(which, p, bins))
    ece = float(gap.sum() / count.sum())
    logit = np.log(np.clip(p, _LOGIT_CLIP, 1 - _LOGIT_CLIP) / np.clip(1 - p, _LOGIT_CLIP, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit = LogisticRegression(C=np.inf).fit(logit[:, None], y)
    return brier, ece, float(fit.coef_[0, 0])


#: Resamples behind :func:`spearman_ci`.
SPEARMAN_RESAMPLES = 2000


def spearman_ci(x: np.ndarray, y: np.ndarray, seed: int, alpha: float = 0.05,
                min_points: int = 4) -> dict[str, float]:
    """Spearman's rho of ``x`` and ``y`` with a percentile CI over resamples of the points
    (pairs drawn with replacement; a resample without spread in either is skipped): how
    strongly a ranking by one follows the other, and how sure a few points make that. NaN
    with fewer than ``min_points`` points."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < min_points or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"rho": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": len(x)}
    rng = np.random.default_rng([seed, 5417])
    draws = []
    for _ in range(SPEARMAN_RESAMPLES):
        pick = rng.integers(0, len(x), len(x))
        if np.ptp(x[pick]) > 0 and np.ptp(y[pick]) > 0:
            draws.append(sps.spearmanr(x[pick], y[pick]).statistic)
    low, high = np.nanpercentile(draws, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return {"rho": float(sps.spearmanr(x, y).statistic), "ci_low": float(low),
            "ci_high": float(high), "n": len(x)}
