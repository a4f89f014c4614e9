"""Fréchet Radiomics Distance (cxrlib.synthetic.audit.frd) through frd-score: zero for one set
against itself, larger for each step of a planted shift than for a second draw of the same
distribution, in either order, and clear errors for what it cannot score.

Small sets of 16 px textures keep it at a few seconds; the shift tests use the Original image
only (90 features, ~4x faster than FRDv1's Original + Wavelet); the identity test runs the
full v1 settings.
"""

from __future__ import annotations

import math
import sys
import tempfile

import numpy as np
import pytest
from scipy import ndimage

from cxrlib.synthetic.audit.frd import INSTALL_HINT, frechet_radiomics_distance

SIZE = 16
N = 30
FAST = ("Original",)
#: Gaussian blur (px) planted in the "synthetic" set, mildest first.
BLURS = (1.5, 2.5, 3.5)


def textures(n: int, seed: int, blur: float = 0.0, size: int = SIZE) -> np.ndarray:
    """Smooth random textures (grey level 120 +- 30), optionally blurred after the fact."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        image = ndimage.gaussian_filter(rng.normal(0.0, 1.0, (size, size)), 1.5)
        image = image / image.std() * 30 + 120
        if blur:
            image = ndimage.gaussian_filter(image, blur)
        out.append(np.clip(image, 0, 255).astype(np.uint8))
    return np.stack(out)


@pytest.fixture(scope="module")
def shift_scores() -> dict[str, float]:
    def frd(real: np.ndarray, synthetic: np.ndarray) -> float:
        return frechet_radiomics_distance(real, synthetic, image_types=FAST, num_workers=1)

    real, same = textures(N, seed=1), textures(N, seed=2)
    blurred = [textures(N, seed=10 + i, blur=blur) for i, blur in enumerate(BLURS)]
    scores = {"same": frd(real, same), "strongest swapped": frd(blurred[-1], real)}
    for blur, images in zip(BLURS, blurred, strict=True):
        scores[f"blur {blur}"] = frd(real, images)
    return scores


def test_identical_sets_are_at_zero_distance_and_leave_no_files(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    images = textures(8, seed=3)
    value = frechet_radiomics_distance(images, images, num_workers=1)  # full v1 settings
    assert not math.isnan(value)
    assert math.exp(value) < 1e-6  # FRD is log(d^2): d^2 = 0 gives -inf
    assert list(tmp_path.iterdir()) == []  # its PNGs went into a temporary folder, now gone


def test_frd_grows_with_each_step_of_a_planted_blur(shift_scores):
    values = [shift_scores["same"], *(shift_scores[f"blur {b}"] for b in BLURS)]
    assert all(math.isfinite(v) for v in values), shift_scores
    steps = np.diff(values)
    # Same-distribution draw lowest, then up with every blur step, by margins well above the
    # spread of the same-distribution value over seeds (3.3-3.6 here; a 0.5 px blur is lost in
    # it, 1 px is not).
    assert (steps > 0.5).all(), shift_scores


def test_frd_sees_the_shift_in_either_order(shift_scores):
    # Normalised by the first set's feature statistics, FRD is not symmetric, but swapping
    # the sets changes it little next to the planted shift.
    strongest = shift_scores[f"blur {BLURS[-1]}"]
    assert abs(shift_scores["strongest swapped"] - strongest) < 0.2 * strongest, shift_scores
    assert shift_scores["strongest swapped"] > shift_scores["same"] + 1.0, shift_scores


def test_frd_is_deterministic():
    real, synthetic = textures(6, seed=4), textures(6, seed=5, blur=1.0)
    first = frechet_radiomics_distance(real, synthetic, image_types=FAST, num_workers=1)
    assert frechet_radiomics_distance(real, synthetic, image_types=FAST, num_workers=1) == first


GOOD = textures(4, seed=6)


@pytest.mark.parametrize(("real", "synthetic", "kwargs", "message"), [
    (GOOD.astype(np.float32), GOOD, {}, "uint8 stack N x H x W"),
    (GOOD[0], GOOD, {}, "uint8 stack N x H x W"),
    (GOOD, GOOD[:1], {}, "synthetic has 1 image"),
    (GOOD[:, :3, :3], GOOD[:, :3, :3], {}, "at least 4 x 4"),
    (GOOD, np.concatenate([GOOD, np.full((1, SIZE, SIZE), 7, np.uint8)]), {},
     r"synthetic image\(s\) \[4\] are constant"),
    (GOOD, textures(4, seed=7, size=SIZE + 8), {}, "resize them to one size"),
    (GOOD, GOOD, {"num_workers": 0}, "num_workers must be at least 1"),
])
def test_bad_inputs_are_refused_with_the_reason(real, synthetic, kwargs, message):
    with pytest.raises(ValueError, match=message):
        frechet_radiomics_distance(real, synthetic, **kwargs)


def test_image_types_must_be_a_sequence_of_names():
    with pytest.raises(TypeError, match=r"\('Original',\)"):
        frechet_radiomics_distance(GOOD, GOOD, image_types="Original")


@pytest.mark.parametrize("module", ["frd_score", "radiomics"])
def test_missing_package_says_how_to_install_it(monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # import of it raises ImportError
    with pytest.raises(ImportError, match="make setup"):
        frechet_radiomics_distance(GOOD, GOOD)
    assert "pip install -e . -c constraints.txt" in INSTALL_HINT


def test_importing_frd_score_keeps_the_matplotlib_backend(monkeypatch):
    # frd_score calls matplotlib.use("Agg") at import, which would turn a notebook's inline
    # figures off: the wrapper makes it a no-op. Import it afresh under a non-Agg backend.
    import matplotlib
    import matplotlib.pyplot as plt

    for name in [m for m in sys.modules if m == "frd_score" or m.startswith("frd_score.")]:
        monkeypatch.delitem(sys.modules, name)
    before = matplotlib.get_backend()
    plt.switch_backend("svg")
    try:
        from cxrlib.synthetic.audit.frd import _frd_score

        _frd_score()
        assert "frd_score" in sys.modules
        assert matplotlib.get_backend().lower() == "svg"
    finally:
        plt.switch_backend(before)
