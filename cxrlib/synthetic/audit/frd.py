"""Fréchet Radiomics Distance (FRD): how far synthetic images are from real ones in a space of
standardised radiomic features (Osuala, Konz et al.; Konz, Osuala et al., Medical Image
Analysis 2026, arXiv:2412.01496).

FRD fits a Gaussian to hand-crafted, interpretable radiomic features (intensity statistics
and texture matrices of the image and of its wavelet sub-bands, by PyRadiomics) of each set
and takes the Fréchet distance between the two, as FID does with a network's features. The
reference implementation is the ``frd-score`` package (:func:`frd_score.compute_frd`); this
module only hands it the images and checks what goes in. ``frd-score`` leaves PyRadiomics to
the user, and PyRadiomics' own PyPI releases do not build on Python 3.11 (AIM-Harvard/
pyradiomics#903), so the project installs the ``pyradiomics-bhklab`` fork, which provides the
same ``radiomics`` module and builds from its sdist (a C extension, ~10 s with gcc).
"""

from __future__ import annotations

import contextlib
import io
import math
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

#: Images each set needs at the very least (a covariance needs two). FRD, like FID, is biased
#: upwards at small n: compare values only at equal set sizes, of at least ~100 images.
MIN_IMAGES = 2
#: Smallest image side accepted: the smallest that was tried with the v1 settings (4 px works,
#: and so does every larger size tried, up to 64 px).
MIN_SIDE = 4
#: What to do when the packages are missing.
INSTALL_HINT = (
    "FRD needs the frd-score and pyradiomics-bhklab packages (dependencies of cxrlib): run "
    "`make setup`, or `pip install -e . -c constraints.txt` in the project's environment "
    "(pyradiomics-bhklab builds a small C extension from source, so a C compiler is needed)."
)


def _check_stack(images: np.ndarray, name: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{name} must be a uint8 stack N x H x W of grey-level images, got "
                         f"{images.dtype} {images.shape}")
    n, h, w = images.shape
    if n < MIN_IMAGES:
        raise ValueError(f"{name} has {n} image(s); FRD needs at least {MIN_IMAGES} per set "
                         "(and ~100 or more for a stable value)")
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"{name} images are {h} x {w} px; FRD needs at least "
                         f"{MIN_SIDE} x {MIN_SIDE}")
    flat = images.reshape(n, -1)
    constant = np.flatnonzero(flat.min(axis=1) == flat.max(axis=1))
    if constant.size:
        raise ValueError(f"{name} image(s) {constant[:5].tolist()} are constant: PyRadiomics "
                         "normalises each image's intensities, which a constant image does not "
                         "have; leave such images out")
    return images


@contextlib.contextmanager
def _matplotlib_backend_kept() -> Iterator[None]:
    """``frd_score`` calls ``matplotlib.use("Agg")`` when it is imported, which would switch a
    notebook's inline backend off (and close its open figures); that call does nothing here."""
    try:
        import matplotlib
    except ImportError:  # frd_score then skips it too
        yield
        return

    def keep_backend(*args: object, **kwargs: object) -> None:
        return None

    use = matplotlib.use
    matplotlib.use = keep_backend
    try:
        yield
    finally:
        matplotlib.use = use


def _frd_score() -> ModuleType:
    """The ``frd_score`` package, once ``radiomics`` (which it imports lazily) is known to load."""
    try:
        import radiomics  # noqa: F401  (frd_score's own hint points at a git install)

        with _matplotlib_backend_kept():
            import frd_score
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from err
    return frd_score


def _write_pngs(images: np.ndarray, folder: Path) -> list[str]:
    from PIL import Image

    folder.mkdir()
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{i:06d}.png"
        Image.fromarray(image).save(path)  # mode L: lossless, 8 bit
        paths.append(str(path))
    return paths


def frechet_radiomics_distance(real: np.ndarray, synthetic: np.ndarray, *,
                               image_types: Sequence[str] | None = None,
                               num_workers: int | None = None) -> float:
    """FRD of ``synthetic`` against ``real``, by ``frd_score.compute_frd`` with its default
    FRDv1 settings (lower is closer; it is ``log`` of a squared distance, so it can be negative,
    and identical sets give ``-inf``).

    ``real`` and ``synthetic`` are uint8 stacks N x H x W of grey-level images of one size (the
    set sizes may differ). Each image is written as an 8-bit PNG into a temporary folder, which
    is removed afterwards, and read back by ``frd_score`` with a pixel spacing of 1 (mm). It is
    offline and deterministic: the same images give the same value, whatever ``num_workers``.

    The v1 settings (``frd_score``'s ``configs/extraction_2d.yaml`` and defaults), kept as they
    are because all of them run on small 2-D images:

    - mask: the whole image (``frd_score`` leaves one corner pixel out, its workaround for a
      PyRadiomics bug with full masks);
    - images: resampled to 2 mm pixels (B-spline), so a 32 px image is analysed at 16 px;
      intensities normalised (``normalizeScale`` 100), grey levels binned 5 wide,
      ``voxelArrayShift`` 300 for the first-order energy features;
    - filters: Original, Wavelet and LoG (sigma 2, 3, 4, 5 mm). ``frd_score`` passes a 2-D
      image as a one-slice volume with ``force2D``, so the wavelet gives its 4 in-plane
      sub-bands, and PyRadiomics skips LoG altogether (it needs at least 4 voxels in every
      direction): LoG adds nothing on 2-D images. Every image gives 398 values: 77 features
      (18 first-order, 22 GLCM, 16 GLRLM, 16 GLSZM, 5 NGTDM) of each of the 5 images, and
      PyRadiomics' 13 numeric diagnostics (intensity mean, min and max, mask voxel counts),
      which the paper's pipeline kept;
    - normalisation: z-scores with the mean and standard deviation of ``real`` (the paper's
      Eq. 3, ``norm_ref="d1"``), so FRD is not symmetric in its arguments; features that are
      NaN or infinite after it (constant in ``real``) are dropped;
    - value: ``log(d2)``, with ``d2`` the squared Fréchet distance between the two Gaussians
      (``frd_score``'s default, the convention of the original code; the paper's Eq. 3,
      ``log`` of the distance itself, is half of it).

    ``image_types`` overrides the filters (e.g. ``("Original",)``: 90 values per image and
    about 4x faster, but no longer FRDv1's feature space). ``num_workers`` is the number of
    processes that extract features (``frd_score``'s default, ``None``, is the CPU count less
    two, at least one). Extraction takes about 0.1 s per 32 px image and 0.17 s per 64 px
    image on one core, so 150 vs 150 images take about 32 s and 55 s with one worker (10 s
    and 14 s with ``("Original",)``), plus ~2 s to import the packages the first time.

    Raises ValueError for inputs it cannot score (see :data:`MIN_IMAGES`, :data:`MIN_SIDE`;
    constant images) and ImportError, saying how to install them, when the packages are
    missing.
    """
    real = _check_stack(real, "real")
    synthetic = _check_stack(synthetic, "synthetic")
    if real.shape[1:] != synthetic.shape[1:]:
        raise ValueError(f"real images are {real.shape[1:]} px and synthetic ones "
                         f"{synthetic.shape[1:]}: resize them to one size first (PyRadiomics' "
                         "size-dependent features would otherwise dominate FRD)")
    if num_workers is not None and num_workers < 1:
        raise ValueError(f"num_workers must be at least 1 (or None), got {num_workers}")
    if isinstance(image_types, str):
        raise TypeError(f"image_types is a sequence of names, e.g. ({image_types!r},)")
    frd_score = _frd_score()
    with tempfile.TemporaryDirectory(prefix="cxrlib-frd-") as tmp:
        paths = [_write_pngs(real, Path(tmp) / "real"),
                 _write_pngs(synthetic, Path(tmp) / "synthetic")]
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its result
            value = frd_score.compute_frd(
                paths, frd_version="v1", num_workers=num_workers,
                image_types=None if image_types is None else list(image_types))
    value = float(value)
    if math.isnan(value):
        raise RuntimeError("frd_score returned NaN: no radiomic feature could be compared "
                           "(see its logged warnings)")
    return value
