"""The audit of generated images: fidelity, conditioning, diversity and memorization.

Every measurement uses a *judge*: a timm classifier (:func:`cxrlib.classify.build_model`, one grey
input channel in [-1, 1], 14 logits) trained on the run's real training images. Its penultimate
(pre-logits) features replace Inception v3, which has never seen a chest X-ray and expects RGB
photographs at 299 px. Images are numpy uint8 arrays N x R x R throughout.

What is measured, and the baseline each number is read against:

* **Distribution distance** (:func:`fid_kid`, :func:`fid_kid_with_baseline`): FID and KID in
  judge-feature space, computed by torchmetrics. Both are biased by sample size, so a number
  alone means little; the baseline is the *noise floor*: two disjoint real sets of the same
  size ("real vs real"). Synthetic images are as close to real as the metric can tell when
  "real vs synthetic" is near that floor.
* **Conditional fidelity** (:func:`conditional_fidelity`): per-label AUROC of the judge's
  scores on synthetic images against the labels they were *conditioned on*. Baseline: the
  judge's AUROC on the real test set (:func:`cxrlib.stats.auroc_table`); 0.5 is chance.
* **Demographic fidelity** (:func:`demographic_fidelity`): linear probes (sex, age) fitted on
  judge features of real training images and evaluated on synthetic images against their
  conditioned sex and age. Baselines: the same probes on real test images (call the function
  again with those), plus the chance levels it reports (majority-class accuracy, the MAE of
  predicting the training mean age).
* **Diversity** (:func:`ms_ssim_diversity`): mean pairwise MS-SSIM among replicas generated from
  one condition; 1 means identical replicas (mode collapse), lower is more diverse. Baseline:
  the same number on groups of real images (e.g. real images sharing a label set).
* **Memorization** (:func:`memorization_audit`): each synthetic image's nearest training image,
  by pixel correlation and by judge-feature cosine. Baseline: the nearest-training-image
  similarity of every real *test* image (patients never trained on). A synthetic image is
  flagged when it is closer to its neighbour than the baseline's high quantile in both spaces,
  or when its pixel correlation is at least 0.99 (a near copy whatever the baseline says).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.nn import functional as F
from torchmetrics.image import MultiScaleStructuralSimilarityIndexMeasure
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from tqdm.auto import tqdm

from cxrlib.classify import predict_images, predictions_frame, train_or_load
from cxrlib.condition import encode_conditions
from cxrlib.config import Params, atomic_write_parquet
from cxrlib.diffusion import ConditionalUNet, noise_scheduler, training_rows
from cxrlib.imagecache import ImageCache, to_model_input
from cxrlib.labels import CHEXPERT_LABELS, SEXES
from cxrlib.sampling import image_seed, timed_generate
from cxrlib.stats import auroc_table

#: Pixel correlation at or above which a synthetic image counts as a near copy of its neighbour.
NEAR_COPY_CORRELATION = 0.99
#: torchmetrics' default MS-SSIM scale weights (Wang et al., 2003), finest scale first.
MS_SSIM_BETAS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pre_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pre-logit features of a timm model for a float batch (N, 1, R, R) in [-1, 1]."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model.forward_head(model.forward_features(x), pre_logits=True)
    finally:
        model.train(was_training)


def _check_images(images: np.ndarray, name: str = "images") -> None:
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 N x R x R, got {images.dtype} {images.shape}")


def judge_features(model: nn.Module, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """Pre-logit judge features (float32, N x d) of uint8 images N x R x R.

    The images go in at their own resolution, which should be the one the judge was trained
    at; they are scaled to [-1, 1] as in training (:func:`cxrlib.imagecache.to_model_range`).
    Runs without gradients, in eval mode, on the model's device, in batches (``images`` may
    be a memory map).
    """
    _check_images(images)
    device = _model_device(model)
    out = []
    for start in range(0, len(images), batch_size):
        x = to_model_input(images[start: start + batch_size]).to(device)
        out.append(_pre_logits(model, x).float().cpu().numpy())
    if not out:
        dim = JudgeFeatureExtractor(model, images.shape[-1]).num_features
        return np.zeros((0, dim), dtype=np.float32)
    return np.concatenate(out)


class JudgeFeatureExtractor(nn.Module):
    """The judge as torchmetrics' custom ``feature=`` network for FID and KID.

    Accepts what torchmetrics passes: uint8 images in [0, 255] (``normalize=False``, also its
    dummy (1, 3, 299, 299) probe) or float images in [0, 1] (``normalize=True``), with 1 or 3
    channels (3 are averaged into one grey channel) and any size (resized with antialiasing
    to the judge's ``resolution``), then scaled to [-1, 1] as in training. Returns float64
    pre-logit features (N x d) on the input's device, so the metric's states stay where the
    caller put them. ``num_features`` is set, so torchmetrics needs no probe to learn d.
    """

    def __init__(self, model: nn.Module, resolution: int):
        super().__init__()
        self.model = model
        self.resolution = int(resolution)
        probe = torch.zeros(1, 1, self.resolution, self.resolution,
                            device=_model_device(model))
        self.num_features = int(_pre_logits(model, probe).shape[-1])

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        if imgs.ndim == 3:
            imgs = imgs.unsqueeze(1)
        if imgs.ndim != 4 or imgs.shape[1] not in (1, 3):
            raise ValueError(f"expected images (N, 1 or 3, H, W), got {tuple(imgs.shape)}")
        out_device = imgs.device
        x = imgs.to(_model_device(self.model))
        # Work on the 0..255 scale so that uint8 input at the judge's resolution gives exactly
        # the training scaling x / 127.5 - 1.
        x = x.float() if x.dtype == torch.uint8 else x.float() * 255.0
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        if tuple(x.shape[-2:]) != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear",
                              align_corners=False, antialias=True).clamp_(0.0, 255.0)
        x = x / 127.5 - 1.0
        return _pre_logits(self.model, x).double().to(out_device)


def _feed(metric: FrechetInceptionDistance | KernelInceptionDistance, images: np.ndarray,
          real: bool, batch_size: int) -> None:
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start: start + batch_size]))
        metric.update(batch.unsqueeze(1), real=real)


def fid_kid(model: nn.Module, real: np.ndarray, fake: np.ndarray, resolution: int,
            kid_subset_size: int | None = None, kid_subsets: int = 100, seed: int = 0,
            batch_size: int = 128) -> dict[str, float | int]:
    """FID and KID (mean, std over subsets) between two uint8 image sets in judge features.

    Computed by torchmetrics with :class:`JudgeFeatureExtractor`. KID draws ``kid_subsets``
    random subsets of ``kid_subset_size`` images from each set (default ``min(n_real, n_fake,
    100)``; it may not exceed the smaller set); ``seed`` makes the draw reproducible without
    touching the global torch RNG. Returns fid, kid_mean, kid_std, n_real, n_fake.
    """
    _check_images(real, "real")
    _check_images(fake, "fake")
    n_real, n_fake = len(real), len(fake)
    if min(n_real, n_fake) < 2:
        raise ValueError(f"FID/KID need at least 2 images per set (got {n_real} real, "
                         f"{n_fake} fake)")
    limit = min(n_real, n_fake)
    subset = min(limit, 100) if kid_subset_size is None else int(kid_subset_size)
    if not 1 <= subset <= limit:
        raise ValueError(f"kid_subset_size must be between 1 and min(n_real, n_fake) = {limit}, "
                         f"got {kid_subset_size}")
    extractor = JudgeFeatureExtractor(model, resolution)
    fid = FrechetInceptionDistance(feature=extractor, normalize=False)
    with warnings.catch_warnings():  # it warns that it keeps all features: that is intended
        warnings.filterwarnings("ignore", message=".*save all extracted features")
        kid = KernelInceptionDistance(feature=extractor, subsets=kid_subsets,
                                      subset_size=subset, normalize=False)
    for metric in (fid, kid):
        _feed(metric, real, True, batch_size)
        _feed(metric, fake, False, batch_size)
    fid_value = float(fid.compute())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": fid_value, "kid_mean": float(kid_mean), "kid_std": float(kid_std),
            "n_real": n_real, "n_fake": n_fake}


def fid_kid_with_baseline(model: nn.Module, real_a: np.ndarray, real_b: np.ndarray,
                          fake: np.ndarray, resolution: int, seed: int = 0,
                          batch_size: int = 128) -> pd.DataFrame:
    """FID/KID of ``real_a`` vs ``real_b`` (the noise floor) and of ``real_a`` vs ``fake``.

    ``real_a`` and ``real_b`` should be disjoint real sets (e.g. two halves of the test set).
    Both comparisons use the same number of images on the second side (the larger of
    ``real_b``/``fake`` is subsampled, seeded) and the same KID subset size, because both
    metrics depend on sample size; the table's n columns show what was used.
    """
    _check_images(real_b, "real_b")
    _check_images(fake, "fake")
    n = min(len(real_b), len(fake))
    rng = np.random.default_rng(seed)

    def take(images: np.ndarray) -> np.ndarray:
        if len(images) == n:
            return images
        return images[np.sort(rng.choice(len(images), size=n, replace=False))]

    real_b, fake = take(real_b), take(fake)
    subset = min(len(real_a), n, 100)
    rows = []
    for name, other in (("real vs real", real_b), ("real vs synthetic", fake)):
        res = fid_kid(model, real_a, other, resolution, kid_subset_size=subset, seed=seed,
                      batch_size=batch_size)
        rows.append({"comparison": name, **res})
    return pd.DataFrame(rows)


def conditional_fidelity(scores: np.ndarray, condition_labels: pd.DataFrame,
                         labels: tuple[str, ...] = CHEXPERT_LABELS) -> pd.DataFrame:
    """Per-label AUROC of judge scores on synthetic images vs the labels they were conditioned on.

    ``scores`` are sigmoid outputs (N x len(labels)) in ``labels`` order; ``condition_labels``
    holds one column per label with 0/1 (NaN rows are left out for that label, so pass the
    labels as the generator saw them). Uses :func:`cxrlib.stats.auroc_table` with
    test_set="synthetic"; a label with one class among the synthetic images has AUROC NaN.
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


def demographic_fidelity(real_features: np.ndarray, real_rows: pd.DataFrame,
                         eval_features: np.ndarray, eval_rows: pd.DataFrame,
                         seed: int = 0) -> dict[str, float | int]:
    """How well sex and age can be read off eval images by probes trained on real images.

    A logistic regression (sex, positive class Female) and a ridge regression (age, years),
    both on standardised judge features, are fitted on the real training rows and scored on
    the eval rows (synthetic images with the sex/age they were conditioned on, or real test
    images for the baseline). Rows need ``sex`` (Male/Female; anything else is left out of
    the sex probe) and ``age`` (NaN left out of the age probe). Returns sex_auroc,
    sex_accuracy, sex_majority_accuracy (always guessing the eval set's majority sex),
    age_mae, age_pearson_r, age_mae_mean_baseline (predicting the training mean age) and
    the number of rows used.
    """
    for name, feats, rows in (("real", real_features, real_rows),
                              ("eval", eval_features, eval_rows)):
        if len(feats) != len(rows):
            raise ValueError(f"{name}_features has {len(feats)} rows but {name}_rows {len(rows)}")
        if not {"sex", "age"} <= set(rows.columns):
            raise KeyError(f"{name}_rows needs columns 'sex' and 'age'")
    real_features = np.asarray(real_features, dtype=np.float64)
    eval_features = np.asarray(eval_features, dtype=np.float64)
    out: dict[str, float | int] = {}

    tr = real_rows["sex"].isin(SEXES).to_numpy()
    ev = eval_rows["sex"].isin(SEXES).to_numpy()
    y_tr = (real_rows["sex"].to_numpy()[tr] == "Female").astype(int)
    y_ev = (eval_rows["sex"].to_numpy()[ev] == "Female").astype(int)
    if len(np.unique(y_tr)) < 2:
        raise ValueError("the real rows need both sexes to fit the sex probe")
    sex_probe = make_pipeline(StandardScaler(),
                              LogisticRegression(max_iter=2000, random_state=seed))
    sex_probe.fit(real_features[tr], y_tr)
    if ev.any():
        prob = sex_probe.predict_proba(eval_features[ev])[:, 1]
        out["sex_auroc"] = (float(roc_auc_score(y_ev, prob)) if len(np.unique(y_ev)) == 2
                            else float("nan"))
        out["sex_accuracy"] = float(accuracy_score(y_ev, (prob >= 0.5).astype(int)))
        out["sex_majority_accuracy"] = float(max(y_ev.mean(), 1 - y_ev.mean()))
    else:
        out.update(sex_auroc=np.nan, sex_accuracy=np.nan, sex_majority_accuracy=np.nan)
    out["n_train_sex"], out["n_eval_sex"] = int(tr.sum()), int(ev.sum())

    age_tr = real_rows["age"].to_numpy(dtype=float)
    age_ev = eval_rows["age"].to_numpy(dtype=float)
    tr, ev = ~np.isnan(age_tr), ~np.isnan(age_ev)
    if tr.sum() < 2:
        raise ValueError("the real rows need at least 2 known ages to fit the age probe")
    age_probe = make_pipeline(StandardScaler(), Ridge(alpha=1.0))
    age_probe.fit(real_features[tr], age_tr[tr])
    if ev.any():
        pred, truth = age_probe.predict(eval_features[ev]), age_ev[ev]
        out["age_mae"] = float(np.abs(pred - truth).mean())
        out["age_pearson_r"] = (float(np.corrcoef(pred, truth)[0, 1])
                                if len(truth) > 1 and truth.std() > 0 and pred.std() > 0
                                else float("nan"))
        out["age_mae_mean_baseline"] = float(np.abs(age_tr[tr].mean() - truth).mean())
    else:
        out.update(age_mae=np.nan, age_pearson_r=np.nan, age_mae_mean_baseline=np.nan)
    out["n_train_age"], out["n_eval_age"] = int(tr.sum()), int(ev.sum())
    return out


def ms_ssim_settings(resolution: int) -> dict[str, object]:
    """MS-SSIM settings that work at ``resolution``: scale weights, Gaussian sigma, kernel size.

    torchmetrics' defaults (5 scales, sigma 1.5, an 11-tap window) need images of at least
    176 px (its check: ``R // (scales - 1)**2 > kernel - 1``); those are used from there up.
    Smaller images get a 7-tap window (sigma 0.8: torchmetrics sizes the Gaussian window as
    ``2 * int(3.5 * sigma + 0.5) + 1`` taps, so this really is 7) and as many scales as pass
    that check while the coarsest scale stays at least one window wide: 3 scales at 32 px, 4
    at 64 px, 5 from 128 px. The scale weights are the first ``scales`` of the standard ones,
    rescaled to sum to 1 so that the value stays in [0, 1] and comparable across resolutions
    with the same settings (values from different settings are not comparable).
    """
    if resolution >= 176:
        return {"betas": MS_SSIM_BETAS, "sigma": 1.5, "kernel_size": 11, "scales": 5}
    kernel, sigma = 7, 0.8
    for scales in range(5, 0, -1):
        if (resolution >= 2 ** scales and resolution // max(1, scales - 1) ** 2 > kernel - 1
                and resolution // 2 ** (scales - 1) >= kernel):
            betas = np.asarray(MS_SSIM_BETAS[:scales])
            betas = tuple(float(b) for b in betas / betas.sum())
            return {"betas": betas, "sigma": sigma, "kernel_size": kernel, "scales": scales}
    raise ValueError(f"MS-SSIM needs images of at least {kernel} px, got {resolution}")


def ms_ssim_diversity(images: np.ndarray, groups: np.ndarray, max_pairs: int | None = None,
                      seed: int = 0, batch_size: int = 256) -> pd.DataFrame:
    """Mean pairwise MS-SSIM among images that share a group id (replicas of one condition).

    One row per group with at least 2 images: group, n, n_pairs, ms_ssim (1 = identical
    replicas; lower = more diverse). All pairs are used unless a group has more than
    ``max_pairs``, when a seeded random sample of pairs is. Settings: :func:`ms_ssim_settings`
    at the images' resolution, data in [0, 1] with data_range 1, and torchmetrics' "relu"
    normalisation (negative structure terms count as 0, so unrelated images give ~0).
    """
    _check_images(images)
    groups = np.asarray(groups)
    if len(groups) != len(images):
        raise ValueError(f"{len(groups)} group ids for {len(images)} images")
    cfg = ms_ssim_settings(images.shape[-1])
    metric = MultiScaleStructuralSimilarityIndexMeasure(
        gaussian_kernel=True, sigma=cfg["sigma"], kernel_size=cfg["kernel_size"],
        betas=cfg["betas"], data_range=1.0, normalize="relu")
    rng = np.random.default_rng(seed)
    rows = []
    for group in pd.unique(groups):
        members = np.flatnonzero(groups == group)
        if len(members) < 2:
            continue
        first, second = np.triu_indices(len(members), k=1)
        if max_pairs is not None and len(first) > max_pairs:
            keep = rng.choice(len(first), size=max_pairs, replace=False)
            first, second = first[keep], second[keep]
        x = torch.from_numpy(np.asarray(images[members], dtype=np.float32) / 255.0).unsqueeze(1)
        metric.reset()
        for start in range(0, len(first), batch_size):
            a, b = first[start: start + batch_size], second[start: start + batch_size]
            metric.update(x[a], x[b])
        rows.append({"group": group, "n": len(members), "n_pairs": len(first),
                     "ms_ssim": float(metric.compute())})
    return pd.DataFrame(rows, columns=["group", "n", "n_pairs", "ms_ssim"])


def _unit_rows(block: np.ndarray, centre: bool) -> np.ndarray:
    """Rows as float32 unit vectors (mean-centred first for Pearson); zero rows stay zero."""
    x = np.asarray(block, dtype=np.float32).reshape(len(block), -1)
    if centre:
        x = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def nearest_neighbours(query: np.ndarray, reference: np.ndarray, metric: str,
                       chunk_size: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Each query's most similar reference row: (index int64, similarity float32).

    ``metric="pixel"``: Pearson correlation of the flattened pixels (cosine of mean-centred
    unit vectors; a constant image has similarity 0 to everything). ``metric="feature"``:
    cosine similarity of feature vectors. Both sides are processed in chunks of
    ``chunk_size`` rows, so memory stays at a few chunk x chunk and chunk x D blocks however
    large the sets are (memory-mapped arrays are read chunk by chunk). Ties go to the lowest
    reference index.
    """
    if metric not in ("pixel", "feature"):
        raise ValueError(f"metric must be 'pixel' or 'feature', got {metric!r}")
    if len(reference) == 0:
        raise ValueError("the reference set is empty")
    dq = int(np.prod(query.shape[1:]))
    dr = int(np.prod(reference.shape[1:]))
    if dq != dr:
        raise ValueError(f"query rows have {dq} values but reference rows {dr}")
    centre = metric == "pixel"
    best_sim = np.full(len(query), -np.inf, dtype=np.float32)
    best_idx = np.zeros(len(query), dtype=np.int64)
    for r0 in range(0, len(reference), chunk_size):
        ref = _unit_rows(reference[r0: r0 + chunk_size], centre)
        for q0 in range(0, len(query), chunk_size):
            sims = _unit_rows(query[q0: q0 + chunk_size], centre) @ ref.T
            arg = sims.argmax(axis=1)
            val = sims[np.arange(len(arg)), arg]
            better = val > best_sim[q0: q0 + len(arg)]
            best_sim[q0: q0 + len(arg)][better] = val[better]
            best_idx[q0: q0 + len(arg)][better] = arg[better] + r0
    return best_idx, best_sim


@dataclass
class MemorizationResult:
    """Nearest-training-image similarities of synthetic images and the real-test baseline.

    Per synthetic image: the index and similarity of its nearest training image by pixel
    correlation and by judge-feature cosine, and whether it is flagged. Baseline: the same
    similarities for each real test image. Thresholds are the baseline's ``quantile``.
    """

    syn_pixel_idx: np.ndarray
    syn_pixel_sim: np.ndarray
    syn_feature_idx: np.ndarray
    syn_feature_sim: np.ndarray
    test_pixel_idx: np.ndarray
    test_pixel_sim: np.ndarray
    test_feature_idx: np.ndarray
    test_feature_sim: np.ndarray
    quantile: float
    pixel_threshold: float
    feature_threshold: float
    flagged: np.ndarray
    near_copy: float = NEAR_COPY_CORRELATION

    @property
    def flag_count(self) -> int:
        """Number of flagged synthetic images."""
        return int(self.flagged.sum())

    def table(self) -> pd.DataFrame:
        """One row per synthetic image: neighbours, similarities and the flag."""
        return pd.DataFrame({
            "syn_index": np.arange(len(self.flagged)),
            "pixel_train_index": self.syn_pixel_idx, "pixel_similarity": self.syn_pixel_sim,
            "feature_train_index": self.syn_feature_idx,
            "feature_similarity": self.syn_feature_sim, "flagged": self.flagged,
        })


def memorization_audit(syn_pixels: np.ndarray, syn_features: np.ndarray,
                       train_pixels: np.ndarray, train_features: np.ndarray,
                       test_pixels: np.ndarray, test_features: np.ndarray,
                       quantile: float = 0.999,
                       near_copy: float = NEAR_COPY_CORRELATION) -> MemorizationResult:
    """Find synthetic images closer to a training image than real unseen images ever are.

    Thresholds are the ``quantile`` of the test->train nearest-neighbour similarity in each
    space (with a few hundred test images, 0.999 is close to their maximum). A synthetic image
    is flagged when it is above both thresholds (closer than nearly every unseen real image,
    in pixels *and* in what the judge sees), or when its pixel correlation is at least
    ``near_copy`` (a copy up to intensity scaling).
    """
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    if len(test_pixels) == 0:
        raise ValueError("the memorization baseline needs real test images")
    for name, pix, feat in (("syn", syn_pixels, syn_features), ("train", train_pixels,
                            train_features), ("test", test_pixels, test_features)):
        if len(pix) != len(feat):
            raise ValueError(f"{name}: {len(pix)} images but {len(feat)} feature rows")
    sp_idx, sp_sim = nearest_neighbours(syn_pixels, train_pixels, "pixel")
    sf_idx, sf_sim = nearest_neighbours(syn_features, train_features, "feature")
    tp_idx, tp_sim = nearest_neighbours(test_pixels, train_pixels, "pixel")
    tf_idx, tf_sim = nearest_neighbours(test_features, train_features, "feature")
    pix_thr = float(np.quantile(tp_sim, quantile))
    feat_thr = float(np.quantile(tf_sim, quantile))
    flagged = ((sp_sim > pix_thr) & (sf_sim > feat_thr)) | (sp_sim >= near_copy)
    return MemorizationResult(sp_idx, sp_sim, sf_idx, sf_sim, tp_idx, tp_sim, tf_idx, tf_sim,
                              quantile, pix_thr, feat_thr, flagged, near_copy)


def closest_pairs(result: MemorizationResult, k: int = 8) -> pd.DataFrame:
    """The ``k`` synthetic images with the highest pixel correlation to a training image.

    Columns: syn_index, train_index (its pixel neighbour), pixel_similarity,
    feature_similarity, flagged; most similar first.
    """
    order = np.argsort(-result.syn_pixel_sim, kind="stable")[:k]
    return pd.DataFrame({
        "syn_index": order, "train_index": result.syn_pixel_idx[order],
        "pixel_similarity": result.syn_pixel_sim[order],
        "feature_similarity": result.syn_feature_sim[order], "flagged": result.flagged[order],
    })


def memorization_figure(result: MemorizationResult) -> plt.Figure:
    """Nearest-training-image similarity: synthetic vs real test images, in both spaces."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    spaces = (("pixel correlation", result.syn_pixel_sim, result.test_pixel_sim,
               result.pixel_threshold),
              ("judge-feature cosine", result.syn_feature_sim, result.test_feature_sim,
               result.feature_threshold))
    for ax, (name, syn, test, thr) in zip(axes, spaces, strict=True):
        data = pd.concat([pd.DataFrame({"similarity": syn, "set": "synthetic -> train"}),
                          pd.DataFrame({"similarity": test, "set": "real test -> train"})],
                         ignore_index=True)
        sns.histplot(data=data, x="similarity", hue="set", stat="density", common_norm=False,
                     element="step", bins=40, ax=ax)
        ax.axvline(thr, color="k", ls="--", lw=1)
        ax.text(thr, 0.98, f" test q{result.quantile:g}", transform=ax.get_xaxis_transform(),
                va="top", fontsize=8)
        if name.startswith("pixel"):
            ax.axvline(result.near_copy, color="red", ls=":", lw=1)
        ax.set_xlabel(f"nearest-neighbour {name}")
        ax.set_title(name)
    fig.suptitle(f"Memorization audit: {result.flag_count} of {len(result.flagged)} synthetic "
                 "images flagged")
    fig.tight_layout()
    return fig


def closest_pairs_figure(syn_images: np.ndarray, train_images: np.ndarray,
                         pairs: pd.DataFrame) -> plt.Figure:
    """Each pair of :func:`closest_pairs` side by side: synthetic image, training neighbour."""
    n = max(len(pairs), 1)
    fig, axes = plt.subplots(n, 2, figsize=(4.2, 2.1 * n), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, row in enumerate(pairs.itertuples(index=False)):
        axes[i, 0].imshow(syn_images[row.syn_index], cmap="gray", vmin=0, vmax=255)
        axes[i, 0].set_title(f"synthetic {row.syn_index}"
                             + (" (flagged)" if row.flagged else ""), fontsize=8)
        axes[i, 1].imshow(train_images[row.train_index], cmap="gray", vmin=0, vmax=255)
        axes[i, 1].set_title(f"train {row.train_index}: r={row.pixel_similarity:.3f}, "
                             f"cos={row.feature_similarity:.3f}", fontsize=8)
    fig.tight_layout()
    return fig


def fidelity_figure(per_label_auroc: pd.DataFrame) -> plt.Figure:
    """Per-label AUROC bars (from :func:`conditional_fidelity`; several test sets side by side).

    Labels without an AUROC (one class only) are marked "n/a"; the dashed line is chance.
    """
    table = per_label_auroc.copy()
    if "test_set" not in table:
        table["test_set"] = "synthetic"
    order = [lab for lab in CHEXPERT_LABELS if lab in set(table["label"])]
    order += [lab for lab in pd.unique(table["label"]) if lab not in order]
    fig, ax = plt.subplots(figsize=(7, 0.8 + 0.35 * len(order)))
    known = table.dropna(subset=["auroc"])
    if len(known):
        sns.barplot(data=known, y="label", x="auroc", hue="test_set", order=order, ax=ax,
                    orient="h")
    else:
        ax.set_yticks(range(len(order)), order)
        ax.set_ylim(len(order) - 0.5, -0.5)
    missing = table.groupby("label")["auroc"].apply(lambda s: s.isna().all())
    for i, lab in enumerate(order):
        if missing.get(lab, False):
            ax.text(0.51, i, "n/a", va="center", fontsize=8, color="grey")
    ax.axvline(0.5, color="k", ls="--", lw=1)
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("AUROC")
    ax.set_ylabel("")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Running the audit for a run: the judge, the real reference sets, each synthetic cohort, and
# the guidance sweep. The judge is the run's real-only classifier (saved under
# <run>/classifiers/real_only), which the classifier experiments reuse as their baseline.


@dataclass
class AuditReference:
    """The judge and the real images every synthetic set is compared with."""

    judge: nn.Module
    resolution: int
    train_rows: pd.DataFrame  # all real training rows of the diffusion sites
    train_images: np.ndarray
    train_features: np.ndarray
    test_rows: pd.DataFrame  # a sample of the internal test split
    test_images: np.ndarray
    test_features: np.ndarray
    test_scores: np.ndarray

    def test_halves(self) -> tuple[np.ndarray, np.ndarray]:
        """Two disjoint halves of the real test sample: FID between them is the floor that
        sampling noise alone gives (neither half was seen by the judge in training)."""
        half = len(self.test_images) // 2
        return self.test_images[:half], self.test_images[half: 2 * half]


def sample_rows(rows: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """At most ``n`` rows drawn without replacement (seeded), in their original order."""
    if len(rows) <= n:
        return rows.reset_index(drop=True)
    pick = np.sort(np.random.default_rng(seed).choice(len(rows), n, replace=False))
    return rows.iloc[pick].reset_index(drop=True)


def audit_reference(params: Params, manifest: pd.DataFrame, cache: ImageCache, folder: Path,
                    progress: bool = True) -> AuditReference:
    """Train (or load) the judge on real training rows and embed the real reference sets."""
    train = training_rows(params, manifest)
    sites = set(train["site"])
    val = manifest[manifest["site"].isin(sites) & (manifest["split"] == "val")]
    test = manifest[manifest["site"].isin(sites) & (manifest["split"] == "test")]
    judge_dir = folder / "classifiers" / "real_only"
    judge = train_or_load(params.classifier, train, val, cache, judge_dir, params.run.seed,
                          progress).model
    # The judge's predictions on the whole internal test split, saved for later stages.
    scores = predict_images(judge, cache.load(test["image_id"]))
    atomic_write_parquet(predictions_frame(test, scores, "internal test"),
                         judge_dir / "predictions_internal_test.parquet")
    keep = sample_rows(test.assign(_i=np.arange(len(test))), params.sampling.audit_images,
                       params.run.seed)
    test_images = cache.load(keep["image_id"])
    train_images = cache.load(train["image_id"])
    return AuditReference(judge, params.data.resolution, train, train_images,
                          judge_features(judge, train_images), keep.drop(columns="_i"),
                          test_images, judge_features(judge, test_images),
                          scores[keep["_i"].to_numpy()])


@dataclass
class SyntheticAudit:
    """Every audit table for one synthetic cohort (and the real baselines beside them)."""

    distance: pd.DataFrame
    fidelity: pd.DataFrame
    demographics: pd.DataFrame
    diversity: pd.DataFrame
    memorization: MemorizationResult
    closest: pd.DataFrame
    images: np.ndarray


def audit_synthetic(ref: AuditReference, synth: pd.DataFrame, synth_cache: ImageCache,
                    n_images: int, seed: int = 0) -> SyntheticAudit:
    """Distance, conditional and demographic fidelity, diversity and memorization of a cohort."""
    rows = sample_rows(synth, n_images, seed)
    images = synth_cache.load(rows["image_id"])
    feats = judge_features(ref.judge, images)
    sample_train = sample_rows(ref.train_rows.assign(_i=np.arange(len(ref.train_rows))),
                           len(ref.test_rows), seed)
    half_a, half_b = ref.test_halves()
    distance = fid_kid_with_baseline(ref.judge, half_a, half_b, images, ref.resolution,
                                     seed=seed)
    fidelity = conditional_fidelity(predict_images(ref.judge, images), rows).rename(
        columns={"auroc": "synthetic (condition)"})
    real = conditional_fidelity(ref.test_scores, ref.test_rows)
    fidelity = fidelity.merge(real[["label", "auroc"]].rename(columns={"auroc": "real test"}),
                              on="label")
    demo = pd.DataFrame({
        "synthetic (condition)": demographic_fidelity(ref.train_features, ref.train_rows,
                                                      feats, rows),
        "real test": demographic_fidelity(ref.train_features, ref.train_rows,
                                          ref.test_features, ref.test_rows),
    })
    # Diversity: replicas of one source vs random pairs of different real training images.
    groups = synth["source_image_id"].to_numpy()
    multi = synth[pd.Series(groups).map(pd.Series(groups).value_counts()).to_numpy() > 1]
    keep = multi["source_image_id"].drop_duplicates().iloc[: max(1, n_images // 4)]
    reps = multi[multi["source_image_id"].isin(keep)]
    div = ms_ssim_diversity(synth_cache.load(reps["image_id"]), reps["source_image_id"].to_numpy())
    pair_ids = np.random.default_rng(seed).permutation(len(sample_train)) // 2
    real_div = ms_ssim_diversity(ref.train_images[sample_train["_i"].to_numpy()], pair_ids)
    diversity = pd.DataFrame({
        "set": ["synthetic replicas of one condition", "real: random pairs of images"],
        "groups": [len(div), len(real_div)],
        "mean MS-SSIM": [div["ms_ssim"].mean() if len(div) else np.nan,
                         real_div["ms_ssim"].mean()],
    })
    memo = memorization_audit(images, feats, ref.train_images, ref.train_features,
                              ref.test_images, ref.test_features)
    return SyntheticAudit(distance, fidelity, demo, diversity, memo, closest_pairs(memo),
                          images)


def guidance_sweep(params: Params, ref: AuditReference, model: ConditionalUNet,
                   progress: bool = True) -> pd.DataFrame:
    """Guidance scale x sampler x steps -> FID/KID to real test images, macro conditional
    fidelity, sex-probe AUROC and seconds per image, on the same conditions and seeds."""
    spec = params.sampling
    rows = sample_rows(ref.train_rows, spec.sweep_images, params.run.seed + 1)
    cond = encode_conditions(rows, params.diffusion.nan_label_value)
    seeds = [image_seed(params.run.seed, f"sweep/{i}", 0) for i in range(len(rows))]
    sched = noise_scheduler(params.diffusion)
    half_a, half_b = ref.test_halves()
    n = min(len(rows), len(half_a), len(half_b))
    floor = fid_kid(ref.judge, half_a[:n], half_b[:n], ref.resolution)
    out = [{"sampler": "real", "steps": 0, "guidance": np.nan, "fid": floor["fid"],
            "kid": floor["kid_mean"], "fidelity_macro_auroc": np.nan, "sex_auroc": np.nan,
            "sec_per_image": 0.0}]
    grid = [(s, k, g) for s in spec.sweep_samplers for k in spec.sweep_steps
            for g in spec.sweep_scales]
    for sampler, steps, scale in tqdm(grid, desc="guidance sweep", disable=not progress):
        images, sec = timed_generate(model, sched, cond, seeds, sampler, steps, scale,
                                     spec.guidance_rescale, spec.batch_size)
        dist = fid_kid(ref.judge, half_a[:n], images[:n], ref.resolution)
        fid = conditional_fidelity(predict_images(ref.judge, images), rows)
        demo = demographic_fidelity(ref.train_features, ref.train_rows,
                                    judge_features(ref.judge, images), rows)
        out.append({"sampler": sampler, "steps": steps, "guidance": scale, "fid": dist["fid"],
                    "kid": dist["kid_mean"], "fidelity_macro_auroc": fid["auroc"].mean(),
                    "sex_auroc": demo.get("sex_auroc", np.nan), "sec_per_image": sec})
    return pd.DataFrame(out)


def sweep_verdict(table: pd.DataFrame) -> str:
    """Sentences, generated from the sweep's numbers, on which setting the data support."""
    runs = table[table["sampler"] != "real"].copy()
    floor = float(table.loc[table["sampler"] == "real", "fid"].iloc[0])
    runs["rank"] = (runs["fid"].rank() + runs["fidelity_macro_auroc"].rank(ascending=False))
    best = runs.sort_values(["rank", "sec_per_image"]).iloc[0]
    close = runs[runs["fid"] <= 1.05 * runs["fid"].min()].sort_values("sec_per_image").iloc[0]
    lines = [
        f"Best balance of distance and conditional fidelity: {best['sampler']} with "
        f"{int(best['steps'])} steps at guidance {best['guidance']:g} (FID {best['fid']:.3g}, "
        f"macro fidelity AUROC {best['fidelity_macro_auroc']:.3f}, "
        f"{best['sec_per_image']:.3f} s/image; real-vs-real FID at this size {floor:.3g}).",
        f"Cheapest setting within 5% of the lowest FID ({runs['fid'].min():.3g}): "
        f"{close['sampler']} with {int(close['steps'])} steps at guidance {close['guidance']:g} "
        f"({close['sec_per_image']:.3f} s/image).",
    ]
    by_scale = runs.groupby("guidance")[["fid", "fidelity_macro_auroc"]].mean()
    hi, lo = by_scale.index.max(), by_scale.index.min()
    if hi != lo:
        trend = "raises" if by_scale.loc[hi, "fidelity_macro_auroc"] > by_scale.loc[
            lo, "fidelity_macro_auroc"] else "does not raise"
        lines.append(
            f"Averaged over samplers and steps, guidance {hi:g} {trend} conditional fidelity "
            f"over guidance {lo:g} ({by_scale.loc[lo, 'fidelity_macro_auroc']:.3f} -> "
            f"{by_scale.loc[hi, 'fidelity_macro_auroc']:.3f}) and moves FID from "
            f"{by_scale.loc[lo, 'fid']:.3g} to {by_scale.loc[hi, 'fid']:.3g}.")
    return " ".join(lines)
