"""Audit metrics for generated images: distance, diversity and memorization.

Every measurement uses a *judge*: a timm classifier (:func:`cxrlib.classifier.training.build_model`,
one grey input channel in [-1, 1], 14 logits) trained on the run's real training images. Its
penultimate (pre-logits) features replace Inception v3, which has never seen a chest X-ray. An
optional second, independent feature space comes from :mod:`cxrlib.synthetic.audit.encoders`. Images
are numpy uint8 arrays N x R x R throughout; the real reference images are *validation* images (the
orchestration in :mod:`cxrlib.synthetic.audit.run` never reads the test split).

What is measured, and what each number is read against:

* **Distribution distance** (:func:`distance_with_floor`): FID and KID (torchmetrics, on
  precomputed features) and precision / recall / density / coverage (:func:`prdc`, Naeem et
  al. 2020) for the synthetic set against real validation images, beside the same numbers for
  two disjoint real sets of the same size (the *floor*), over several random splits. Every row
  states n and the feature dimension: with n below the dimension FID's covariance is
  rank-deficient and favours low-variance sets, so recall and coverage (k-NN based, sound at
  small n) say whether diversity was lost. KID uses subsets of half the set, so its spread
  across subsets is real.
* **Conditional and demographic fidelity**: :mod:`cxrlib.synthetic.audit.fidelity`.
* **Diversity** (:func:`ms_ssim_diversity`): mean pairwise MS-SSIM among replicas of one
  condition (1 = identical), beside random pairs of real images.
* **Memorization** (:func:`memorization_audit`): each synthetic image's nearest training image
  in pixel space (Pearson correlation) and in centred judge features (cosine), each the best
  over one-pixel shifts and horizontal flips, so shifted, flipped and re-exposed copies are
  found. Thresholds are calibrated on held-out real images (at least as many as are audited):
  an image is flagged when it is closer than all but ``rate`` of them in either space. Also
  reported: each replica's similarity to its own source image, and the share flagged with a
  one-sided 95% Clopper-Pearson upper bound.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from scipy import stats as sps
from sklearn.metrics import pairwise_distances
from sklearn.neighbors import NearestNeighbors
from torch import nn
from torchmetrics.image import MultiScaleStructuralSimilarityIndexMeasure
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from cxrlib.data.imagecache import to_model_input

#: torchmetrics' default MS-SSIM scale weights (Wang et al., 2003), finest scale first.
MS_SSIM_BETAS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)

FeatureFn = Callable[[np.ndarray], np.ndarray]


def _check_images(images: np.ndarray, name: str = "images") -> None:
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 N x R x R, got {images.dtype} {images.shape}")


# --- judge features ---------------------------------------------------------------------------

def _pre_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pre-logit features of a timm model for a float batch (N, 1, R, R) in [-1, 1]."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model.forward_head(model.forward_features(x), pre_logits=True)
    finally:
        model.train(was_training)


def judge_features(model: nn.Module, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """Pre-logit judge features (float32, N x d) of uint8 images N x R x R.

    The images go in at their own resolution (the judge's training resolution), scaled to
    [-1, 1] as in training; without gradients, in eval mode, on the model's device, in batches
    (``images`` may be a memory map).
    """
    _check_images(images)
    device = next(model.parameters()).device
    out = []
    for start in range(0, max(len(images), 1), batch_size):
        block = images[start: start + batch_size]
        if not len(block):  # an empty set: probe one blank image for d
            block = np.zeros((1, *images.shape[1:]), dtype=np.uint8)
        out.append(_pre_logits(model, to_model_input(block).to(device)).float().cpu().numpy())
    feats = np.concatenate(out)
    return feats[: len(images)]


# --- FID, KID, precision / recall / density / coverage -----------------------------------------

class _Precomputed(nn.Module):
    """Identity 'feature network' so torchmetrics computes FID/KID on features computed once
    (the floor's several splits then cost no further forward passes)."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = int(dim)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return feats


def default_kid_subset(n: int) -> int:
    """KID subset size for sets of ``n``: half the set (at most 1000), so subsets differ."""
    return max(2, min(n // 2, 1000))


def fid_kid(real: np.ndarray, fake: np.ndarray, kid_subset_size: int | None = None,
            kid_subsets: int = 100, seed: int = 0) -> dict[str, float | int]:
    """FID and KID (mean, std over subsets) between two feature sets (N x d), by torchmetrics.

    KID draws ``kid_subsets`` random subsets of ``kid_subset_size`` rows of each set (default
    :func:`default_kid_subset` of the smaller set; it must be below the smaller set, or every
    subset would be the whole set); ``seed`` fixes the draw without touching the global RNG.
    Returns fid, kid_mean, kid_std, kid_subset, n_real, n_fake and dim.
    """
    real, fake = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be N x d with the same d, got {real.shape}, "
                         f"{fake.shape}")
    limit = min(len(real), len(fake))
    if limit < 3:
        raise ValueError(f"FID/KID need at least 3 rows per set (got {len(real)} real, "
                         f"{len(fake)} fake)")
    subset = default_kid_subset(limit) if kid_subset_size is None else int(kid_subset_size)
    if not 2 <= subset < limit:
        raise ValueError(f"kid_subset_size must be at least 2 and below min(n_real, n_fake) = "
                         f"{limit}, got {kid_subset_size}")
    net = _Precomputed(real.shape[1])
    fid = FrechetInceptionDistance(feature=net, normalize=False)
    with warnings.catch_warnings():  # it warns that it keeps all features: that is intended
        warnings.filterwarnings("ignore", message=".*save all extracted features")
        kid = KernelInceptionDistance(feature=net, subsets=kid_subsets, subset_size=subset,
                                      normalize=False)
    for metric in (fid, kid):
        metric.update(torch.from_numpy(real), real=True)
        metric.update(torch.from_numpy(fake), real=False)
    fid_value = float(fid.compute())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": fid_value, "kid_mean": float(kid_mean), "kid_std": float(kid_std),
            "kid_subset": subset, "n_real": len(real), "n_fake": len(fake),
            "dim": real.shape[1]}


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage of ``fake`` against ``real`` (Naeem et al. 2020).

    Each real row gets a ball reaching its k-th nearest real neighbour (Euclidean). Precision:
    share of fake rows inside some real ball; density: mean number of real balls a fake row
    falls in, over k; coverage: share of real balls holding a fake row (the collapse-robust
    recall); recall: the same with the roles swapped (share of real rows inside some fake
    row's k-NN ball). Written here because the reference ``prdc`` package is not installed;
    it is a few lines on sklearn's NearestNeighbors.
    """
    real, fake = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"PRDC with k={k} needs more than k rows per set (got {len(real)} "
                         f"real, {len(fake)} fake)")

    def radii(x: np.ndarray) -> np.ndarray:  # distance to the k-th neighbour, self excluded
        return NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)[0][:, -1]

    real_r, fake_r = radii(real), radii(fake)
    dist = pairwise_distances(fake, real)  # fake x real
    inside_real = dist < real_r[None, :]
    return {
        "precision": float(inside_real.any(axis=1).mean()),
        "recall": float((dist < fake_r[:, None]).any(axis=0).mean()),
        "density": float(inside_real.sum(axis=1).mean() / k),
        "coverage": float((dist.min(axis=0) < real_r).mean()),
    }


def distance_with_floor(real_pool: np.ndarray, fake: np.ndarray, n: int | None = None,
                        splits: int = 5, k: int = 5, seed: int = 0) -> pd.DataFrame:
    """FID, KID and PRDC of real vs real (the floor) and real vs synthetic, over random splits.

    Each split draws two disjoint sets of ``n`` rows from ``real_pool`` (features of real
    validation images) and ``n`` rows of ``fake``; set A is compared with set B (real vs real)
    and with the synthetic draw (real vs synthetic), so both comparisons have the same sizes.
    ``n`` defaults to ``min(len(fake), len(real_pool) // 2)``. One row per split and
    comparison: comparison, split, n, dim, fid, kid_mean, kid_std, kid_subset, precision,
    recall, density, coverage. Summarise with :func:`distance_summary`.
    """
    limit = min(len(fake), len(real_pool) // 2)
    n = limit if n is None else int(n)
    if not k < n <= limit:
        raise ValueError(f"n must be above k={k} and at most min(n_fake, n_real_pool // 2) = "
                         f"{limit}, got {n}")
    rng = np.random.default_rng(seed)
    rows = []
    for split in range(splits):
        perm = rng.permutation(len(real_pool))
        a, b = real_pool[perm[:n]], real_pool[perm[n: 2 * n]]
        syn = fake[np.sort(rng.choice(len(fake), size=n, replace=False))]
        for name, other in (("real vs real", b), ("real vs synthetic", syn)):
            res = fid_kid(a, other, seed=seed + split)
            rows.append({"comparison": name, "split": split, "n": n, "dim": res["dim"],
                         "fid": res["fid"], "kid_mean": res["kid_mean"],
                         "kid_std": res["kid_std"], "kid_subset": res["kid_subset"],
                         **prdc(a, other, k)})
    return pd.DataFrame(rows)


DISTANCE_METRICS: tuple[str, ...] = ("fid", "kid_mean", "precision", "recall", "density",
                                     "coverage")


def distance_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean, min and max over splits of each metric of :func:`distance_with_floor`, per
    comparison (and per feature ``space`` when the table has that column)."""
    keys = [c for c in ("space", "comparison") if c in table]
    agg = table.groupby(keys, sort=False).agg(
        n=("n", "first"), dim=("dim", "first"), splits=("split", "nunique"),
        **{f"{m}{s}": (m, f) for m in DISTANCE_METRICS
           for s, f in (("", "mean"), ("_min", "min"), ("_max", "max"))})
    return agg.reset_index()


# --- diversity ---------------------------------------------------------------------------------

def ms_ssim_settings(resolution: int) -> dict[str, object]:
    """MS-SSIM settings that work at ``resolution``: scale weights, Gaussian sigma, kernel size.

    torchmetrics' defaults (5 scales, sigma 1.5, an 11-tap window) need images of at least
    176 px (its check: ``R // (scales - 1)**2 > kernel - 1``); those are used from there up.
    Smaller images get a 7-tap window (sigma 0.8: torchmetrics sizes the Gaussian window as
    ``2 * int(3.5 * sigma + 0.5) + 1`` taps) and as many scales as pass that check while the
    coarsest scale stays at least one window wide: 3 scales at 32 px, 4 at 64 px, 5 from 128
    px. The scale weights are the first ``scales`` standard ones, rescaled to sum to 1.
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
    ``max_pairs``, when a seeded random sample of pairs is. Settings: :func:`ms_ssim_settings`,
    data in [0, 1], torchmetrics' "relu" normalisation (unrelated images give ~0).
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


# --- memorization ------------------------------------------------------------------------------

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

    ``metric="pixel"``: Pearson correlation of the flattened values (a constant row has
    similarity 0 to everything); ``metric="feature"``: cosine similarity. Both sides are
    processed in chunks, so memory stays small however large the sets are. Ties go to the
    lowest reference index.
    """
    if metric not in ("pixel", "feature"):
        raise ValueError(f"metric must be 'pixel' or 'feature', got {metric!r}")
    if len(reference) == 0:
        raise ValueError("the reference set is empty")
    dq, dr = int(np.prod(query.shape[1:])), int(np.prod(reference.shape[1:]))
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


def image_variants(images: np.ndarray) -> Iterator[np.ndarray]:
    """The images, horizontally flipped or not, shifted by -1, 0 or 1 pixel in each direction
    (18 variants; edges repeated). Searching all of them makes a neighbour search robust to
    the small moves a near copy may have."""
    _check_images(images)
    padded = np.pad(np.asarray(images), ((0, 0), (1, 1), (1, 1)), mode="edge")
    size = images.shape[-1]
    for flip in (False, True):
        base = padded[:, :, ::-1] if flip else padded
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                yield np.ascontiguousarray(base[:, 1 + dy: 1 + dy + size, 1 + dx: 1 + dx + size])


@dataclass
class Neighbours:
    """Each query's nearest reference image by pixel correlation and by centred-feature
    cosine (both the best over :func:`image_variants` of the query)."""

    pixel_idx: np.ndarray
    pixel_sim: np.ndarray
    feature_idx: np.ndarray
    feature_sim: np.ndarray


#: Gaussian low-pass (pixels) applied before pixel correlations in the memorization audit.
PIXEL_SMOOTHING_SIGMA = 1.0


def _interior(images: np.ndarray) -> np.ndarray:
    """Low-passed pixels away from the 1-pixel border (which a shift fills by repetition).

    The low-pass (Gaussian, :data:`PIXEL_SMOOTHING_SIGMA`) keeps detector noise from setting
    the scale: two noisy radiographs correlate less than a smooth generated image and a noisy
    one, so without it smooth synthetic images look like copies of any radiograph of the same
    build (seen on the demo: 54% of synthetic images flagged, their neighbours other patients).
    """
    smooth = ndimage.gaussian_filter(np.asarray(images, dtype=np.float32),
                                     sigma=(0, PIXEL_SMOOTHING_SIGMA, PIXEL_SMOOTHING_SIGMA))
    return smooth[:, 1:-1, 1:-1]


def robust_neighbours(query: np.ndarray, reference: np.ndarray, reference_features: np.ndarray,
                      embed: FeatureFn, centre: np.ndarray) -> Neighbours:
    """Nearest reference image of each query, robust to one-pixel shifts, flips and intensity.

    Pixel space: Pearson correlation (invariant to brightness and contrast changes) of the
    low-passed interior pixels (:func:`_interior`). Feature space: cosine of
    ``embed(variant) - centre`` against ``reference_features - centre`` (centring on the
    training mean removes the direction every radiograph shares, which otherwise makes all
    cosines near 1). Each is maximised over the 18 variants of the query.
    """
    ref_pix, ref_feat = _interior(reference), reference_features - centre
    best = Neighbours(np.zeros(len(query), np.int64), np.full(len(query), -np.inf, np.float32),
                      np.zeros(len(query), np.int64), np.full(len(query), -np.inf, np.float32))
    for variant in image_variants(query):
        for space, (idx, sim) in (
                ("pixel", nearest_neighbours(_interior(variant), ref_pix, "pixel")),
                ("feature", nearest_neighbours(embed(variant) - centre, ref_feat, "feature"))):
            old_sim = getattr(best, f"{space}_sim")
            better = sim > old_sim
            old_sim[better] = sim[better]
            getattr(best, f"{space}_idx")[better] = idx[better]
    return best


def _rowwise_sim(a: np.ndarray, b: np.ndarray, centre_rows: bool) -> np.ndarray:
    return (_unit_rows(a, centre_rows) * _unit_rows(b, centre_rows)).sum(axis=1)


def source_similarity(query: np.ndarray, sources: np.ndarray, source_features: np.ndarray,
                      embed: FeatureFn, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel and centred-feature similarity of each query to its *own* source image (row i of
    ``sources``), each the best over the query's :func:`image_variants`."""
    pix = np.full(len(query), -np.inf, dtype=np.float32)
    feat = np.full(len(query), -np.inf, dtype=np.float32)
    for variant in image_variants(query):
        pix = np.maximum(pix, _rowwise_sim(_interior(variant), _interior(sources), True))
        feat = np.maximum(feat, _rowwise_sim(embed(variant) - centre, source_features - centre,
                                             False))
    return pix, feat


def upper_bound(k: int, n: int, level: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper confidence bound of a share k / n."""
    if n == 0:
        return float("nan")
    return 1.0 if k >= n else float(sps.beta.ppf(level, k + 1, n - k))


@dataclass
class MemorizationResult:
    """Nearest training images of the audited synthetic images and of held-out real images,
    the thresholds calibrated on the latter, and the flags."""

    synthetic: Neighbours
    heldout: Neighbours
    rate: float
    pixel_threshold: float
    feature_threshold: float
    flagged: np.ndarray
    heldout_flagged: np.ndarray
    source_pixel_sim: np.ndarray | None = None
    source_feature_sim: np.ndarray | None = None
    source_index: np.ndarray | None = None

    @property
    def flag_count(self) -> int:
        """Number of flagged synthetic images."""
        return int(self.flagged.sum())

    def summary(self) -> dict[str, float | int]:
        """Counts, shares with one-sided 95% upper bounds, thresholds and the source check."""
        n, k = len(self.flagged), self.flag_count
        out: dict[str, float | int] = {
            "audited": n, "flagged": k, "share": k / n if n else np.nan,
            "share_upper95": upper_bound(k, n), "heldout": len(self.heldout_flagged),
            "heldout_share_flagged": float(self.heldout_flagged.mean()),
            "target_rate_per_space": self.rate, "pixel_threshold": self.pixel_threshold,
            "feature_threshold": self.feature_threshold}
        if self.source_index is not None:
            known = self.source_index >= 0
            copies = self.source_copy[known]
            out.update(
                with_source=int(known.sum()), source_copies=int(copies.sum()),
                source_copy_upper95=upper_bound(int(copies.sum()), int(known.sum())),
                nearest_is_source=float(
                    (self.synthetic.pixel_idx[known] == self.source_index[known]).mean())
                if known.any() else np.nan,
                median_source_pixel_sim=float(np.median(self.source_pixel_sim[known]))
                if known.any() else np.nan)
        return out

    @property
    def source_copy(self) -> np.ndarray:
        """Replicas closer to their own source than the calibrated thresholds allow."""
        if self.source_index is None:
            return np.zeros(len(self.flagged), dtype=bool)
        return (((self.source_pixel_sim > self.pixel_threshold)
                 | (self.source_feature_sim > self.feature_threshold)) & (self.source_index >= 0))

    def table(self) -> pd.DataFrame:
        """One row per audited synthetic image: neighbours, similarities and the flags."""
        out = pd.DataFrame({
            "syn_index": np.arange(len(self.flagged)),
            "pixel_train_index": self.synthetic.pixel_idx,
            "pixel_similarity": self.synthetic.pixel_sim,
            "feature_train_index": self.synthetic.feature_idx,
            "feature_similarity": self.synthetic.feature_sim, "flagged": self.flagged})
        if self.source_index is not None:
            out = out.assign(source_train_index=self.source_index,
                             source_pixel_similarity=self.source_pixel_sim,
                             source_feature_similarity=self.source_feature_sim,
                             source_copy=self.source_copy)
        return out


def memorization_audit(synthetic: np.ndarray, train: np.ndarray, train_features: np.ndarray,
                       heldout: np.ndarray, embed: FeatureFn, rate: float = 0.01,
                       source_index: np.ndarray | None = None) -> MemorizationResult:
    """Flag synthetic images closer to a training image than unseen real images come.

    ``heldout`` are real images the generator never saw (e.g. validation images), at least as
    many as ``synthetic``, so that the calibration is no coarser than the audit. Thresholds are
    the ``1 - rate`` quantile of the held-out images' nearest-training similarity in each space
    (:func:`robust_neighbours`); a synthetic image is flagged when it exceeds either, so at
    most about ``2 * rate`` of unseen images would be. ``embed`` maps uint8 images to features
    (e.g. the judge's); ``source_index`` (index into ``train`` of each synthetic image's
    source row, -1 where unknown) adds the replica-vs-own-source check.
    """
    for name, images in (("synthetic", synthetic), ("train", train), ("heldout", heldout)):
        _check_images(images, name)
    if not 0.0 < rate < 0.5:
        raise ValueError(f"rate must be in (0, 0.5), got {rate}")
    if len(heldout) < len(synthetic):
        raise ValueError(f"the held-out calibration set ({len(heldout)} images) must be at "
                         f"least as large as the audited synthetic set ({len(synthetic)})")
    if len(train_features) != len(train):
        raise ValueError(f"{len(train)} training images but {len(train_features)} feature rows")
    centre = np.asarray(train_features, dtype=np.float32).mean(axis=0)
    syn = robust_neighbours(synthetic, train, train_features, embed, centre)
    held = robust_neighbours(heldout, train, train_features, embed, centre)
    pix_thr = float(np.quantile(held.pixel_sim, 1 - rate))
    feat_thr = float(np.quantile(held.feature_sim, 1 - rate))

    def flags(nb: Neighbours) -> np.ndarray:
        return (nb.pixel_sim > pix_thr) | (nb.feature_sim > feat_thr)

    result = MemorizationResult(syn, held, rate, pix_thr, feat_thr, flags(syn), flags(held))
    if source_index is not None:
        src = np.asarray(source_index, dtype=np.int64)
        if len(src) != len(synthetic):
            raise ValueError(f"{len(src)} source indices for {len(synthetic)} synthetic images")
        safe = np.where(src >= 0, src, 0)
        pix, feat = source_similarity(synthetic, train[safe],
                                      np.asarray(train_features)[safe], embed, centre)
        result.source_index = src
        result.source_pixel_sim = np.where(src >= 0, pix, np.nan)
        result.source_feature_sim = np.where(src >= 0, feat, np.nan)
    return result


def closest_pairs(result: MemorizationResult, k: int = 8) -> pd.DataFrame:
    """The ``k`` synthetic images with the highest pixel correlation to a training image.

    Columns: syn_index, train_index (its pixel neighbour), pixel_similarity,
    feature_similarity, flagged; most similar first.
    """
    nb = result.synthetic
    order = np.argsort(-nb.pixel_sim, kind="stable")[:k]
    return pd.DataFrame({
        "syn_index": order, "train_index": nb.pixel_idx[order],
        "pixel_similarity": nb.pixel_sim[order], "feature_similarity": nb.feature_sim[order],
        "flagged": result.flagged[order]})
