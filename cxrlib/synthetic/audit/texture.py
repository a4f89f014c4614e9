"""Texture fidelity: how much power synthetic images have at each spatial frequency, against
real ones.

Few-step deterministic samplers and diffusion models in general draw the finest detail last
and worst (detector noise, mottle), and a classifier's features barely see it, so FID in the
judge's space does not either. Here each image's power spectrum is taken after subtracting
its mean and applying a 2-D Hann window (so the image border does not leak power into every
frequency), averaged over rings of radial frequency (bands of equal width from 0 to the
Nyquist frequency, 0.5 cycles per pixel), and averaged over images. The synthetic / real
ratio per band is 1 where the synthetic images carry real texture, below 1 where they are
too smooth. Its CI resamples patients of both sets independently (a synthetic image's patient
is its source patient), as the fidelity CIs do. The headline is the top band's ratio
(:data:`HF_BAND`).

numpy and scipy have the FFT and the window but no radial average of a 2-D spectrum, so the
ring average is written here (a ``np.bincount`` over each frequency's band).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import fft
from scipy.signal import windows

from cxrlib.stats import patient_bootstrap_weights

#: Bands of equal width in radial frequency from 0 to Nyquist (0.5 cycles per pixel).
N_BANDS = 6
#: The band of the headline high-frequency ratio: the top one (5/6 of Nyquist and above).
HF_BAND = N_BANDS - 1


def band_edges(n_bands: int = N_BANDS) -> np.ndarray:
    """Edges (cycles per pixel) of ``n_bands`` equal-width radial-frequency bands up to 0.5."""
    return np.linspace(0.0, 0.5, n_bands + 1)


def band_power(images: np.ndarray, n_bands: int = N_BANDS, chunk_size: int = 256) -> np.ndarray:
    """Mean power per radial-frequency band of each image (float64, n x n_bands).

    ``images`` are uint8 (or float) n x R x R. Each image has its mean subtracted and is
    multiplied by a 2-D Hann window; the power ``|FFT|^2`` is divided by the window's energy
    (so white noise of variance v has power v in every band) and averaged over the
    frequencies of each band (0 < f <= 0.5; the corners beyond Nyquist are left out).
    """
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be n x R x R, got {images.shape}")
    size = images.shape[-1]
    hann = windows.hann(size, sym=False)
    window = np.outer(hann, hann)
    freq = fft.fftfreq(size)
    radius = np.hypot(*np.meshgrid(freq, freq, indexing="ij")).ravel()
    keep = (radius > 0) & (radius <= 0.5)
    band = np.digitize(radius[keep], band_edges(n_bands)[1:-1], right=True)
    counts = np.bincount(band, minlength=n_bands)
    if (counts == 0).any():
        raise ValueError(f"{size} px images have no frequency in some of {n_bands} bands")
    member = np.eye(n_bands)[band] / counts  # each column averages one ring
    out = np.empty((len(images), n_bands))
    for start in range(0, len(images), chunk_size):  # bounded memory at 256 px and up
        x = images[start: start + chunk_size].astype(np.float64)
        x = (x - x.mean(axis=(1, 2), keepdims=True)) * window
        power = np.abs(fft.fft2(x)) ** 2 / (window ** 2).sum()
        out[start: start + len(x)] = power.reshape(len(x), -1)[:, keep] @ member
    return out


@dataclass
class TextureResult:
    """Synthetic vs real power per band, the ratio with its patient-bootstrap CI."""

    bands: pd.DataFrame  # band, f_low, f_high, real_power, synthetic_power, ratio, CI
    n_real: int
    n_synthetic: int
    alpha: float

    @property
    def hf(self) -> pd.Series:
        """The headline row: the top band (:data:`HF_BAND`)."""
        return self.bands.iloc[HF_BAND]

    def summary_entry(self) -> dict[str, object]:
        """``texture_hf_ratio`` for :func:`cxrlib.core.summary.update_summary`."""
        hf = self.hf
        return {"value": hf["ratio"], "ci_low": hf["ci_low"], "ci_high": hf["ci_high"],
                "band_cycles_per_pixel": [hf["f_low"], hf["f_high"]],
                "n_real": self.n_real, "n_synthetic": self.n_synthetic,
                "ci_level": 1 - self.alpha}

    def verdict(self) -> str:
        """The headline ratio's CI against 1 (real texture), in a few words: ``too smooth``
        (CI below 1), ``too much fine texture`` (CI above 1) or ``consistent with real`` (the
        CI includes 1; at this sample size, which the CI's width shows)."""
        hf = self.hf
        if not np.isfinite(hf["ratio"]):
            return "not estimable"
        if hf["ci_high"] < 1:
            return "too smooth"
        if hf["ci_low"] > 1:
            return "too much fine texture"
        return "consistent with real"

    def sentence(self, synthetic: str = "synthetic images") -> str:
        """The headline ratio and how many bands have a CI below or above 1, in words."""
        hf = self.hf
        below, above = int((self.bands["ci_high"] < 1).sum()), int((self.bands["ci_low"] > 1).sum())
        return (f"Texture: {synthetic} have {hf['ratio']:.3g}x the real power at the highest "
                f"frequencies ({hf['f_low']:.2f}-{hf['f_high']:.2f} cycles/pixel; "
                f"{1 - self.alpha:.0%} CI {hf['ci_low']:.3g}-{hf['ci_high']:.3g}; 1 = real); "
                f"of {len(self.bands)} frequency bands, {below} have a CI below 1 and {above} "
                f"above; "
                f"{self.n_synthetic} synthetic against {self.n_real} real validation images.")


def texture_comparison(real: np.ndarray, real_groups: Sequence[Hashable],
                       synthetic: np.ndarray, synthetic_groups: Sequence[Hashable],
                       n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
                       n_bands: int = N_BANDS) -> TextureResult:
    """Mean band power (:func:`band_power`) of both sets and their ratio per band.

    Each set's patients are resampled on their own (the sets are independent), and the CI is
    the percentile interval of the replicates' ratio of mean powers.

    Args:
        real: real images (n x R x R), at least 2; the ratio's denominator.
        real_groups: each real image's patient.
        synthetic: synthetic images (m x R x R, same R), at least 2.
        synthetic_groups: each synthetic image's source patient.
        n_boot: patient-bootstrap replicates per set.
        seed: bootstrap seed of the real set; the synthetic set uses ``seed + 1``.
        alpha: the CI is at level 1 - alpha.
        n_bands: equal-width radial-frequency bands from 0 to Nyquist (the headline
            :attr:`TextureResult.hf` reads band :data:`HF_BAND`, the top one at the default).
    """
    if min(len(real), len(synthetic)) < 2:
        raise ValueError(f"texture needs at least 2 images per set (got {len(real)} real, "
                         f"{len(synthetic)} synthetic)")
    powers, boots = [], []
    for images, groups, offset in ((real, real_groups, 0), (synthetic, synthetic_groups, 1)):
        p = band_power(images, n_bands)
        w = patient_bootstrap_weights(np.asarray(groups), n_boot, seed + offset)
        powers.append(p.mean(axis=0))
        boots.append((w @ p) / w.sum(axis=1, keepdims=True))
    ratio_boot = boots[1] / boots[0]
    low, high = np.quantile(ratio_boot, [alpha / 2, 1 - alpha / 2], axis=0)
    edges = band_edges(n_bands)
    bands = pd.DataFrame({"band": np.arange(n_bands), "f_low": edges[:-1], "f_high": edges[1:],
                          "real_power": powers[0], "synthetic_power": powers[1],
                          "ratio": powers[1] / powers[0], "ci_low": low, "ci_high": high})
    return TextureResult(bands, len(real), len(synthetic), alpha)
