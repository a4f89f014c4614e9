"""The image cache: every manifest image decoded once, preprocessed, stored as uint8 on disk.

Training loops read the cache through a memory map, so they never decode a JPEG and memory
stays flat however large the dataset grows. Preprocessing follows the paper: one grey channel,
resize so the longest side equals the resolution, pad the short side (centred) with -1 (black),
store uint8; :func:`to_model_range` maps to [-1, 1] at load time.

Layout of a cache folder: ``images.npy`` (N x R x R uint8, opened with ``mmap_mode='r'``) and
``index.parquet`` (image_id per row of the array), written by :func:`write_image_cache`
under temporary names and renamed into place when complete.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from cxrlib.core.files import atomic_path, atomic_write_parquet

#: An image cache folder: the images (N x R x R uint8) and their ids, one per array row.
CACHE_IMAGES = "images.npy"
CACHE_INDEX = "index.parquet"


class CacheWriter:
    """The rows of an image cache being written; see :func:`write_image_cache`."""

    def __init__(self, images: np.ndarray):
        self._images = images
        self.image_ids: list[str] = []

    def add(self, image_ids: list[str], images: np.ndarray) -> None:
        """Store ``images`` (n x R x R uint8) as the next rows, under ``image_ids``."""
        start = len(self.image_ids)
        self._images[start: start + len(image_ids)] = images
        self.image_ids.extend(image_ids)

    def close(self) -> None:
        """Drop the memory map (before its file is renamed or removed); no rows can follow."""
        del self._images


@contextmanager
def write_image_cache(folder: Path, capacity: int, resolution: int) -> Iterator[CacheWriter]:
    """Write an image cache folder (read by :class:`cxrlib.data.imagecache.ImageCache`): the rows
    added in the block, in order, as ``images.npy`` and their ids as ``index.parquet``.

    Rows go straight to a memory-mapped temporary file of ``capacity`` rows, so memory stays
    flat; if fewer are added it is compacted to the rows stored. Both files are renamed into
    place only when the block ends without an error (the index last).
    """
    folder.mkdir(parents=True, exist_ok=True)
    shape = (capacity, resolution, resolution)
    with atomic_path(folder / CACHE_IMAGES, expected_bytes=int(np.prod(shape))) as tmp:
        images = _memmap(tmp, np.dtype(np.uint8), shape)
        writer = CacheWriter(images)
        try:
            yield writer
            images.flush()
            if len(writer.image_ids) < capacity:
                _compact(images, len(writer.image_ids), tmp)
        finally:
            writer.close()
            del images
    atomic_write_parquet(pd.DataFrame({"image_id": writer.image_ids}), folder / CACHE_INDEX)


def _memmap(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.memmap:
    """A new .npy file opened as a writable memory map, its blocks allocated first: a disk
    too small fails here, as an OSError a write names (:class:`DiskFullError`), instead of
    killing the process with SIGBUS when a page of the map cannot be written."""
    images = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    try:
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
    except OSError as err:
        if err.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # not supported by this file system
            return images
        del images
        raise
    return images


def _compact(images: np.ndarray, rows: int, path: Path) -> None:
    """Replace the .npy file ``path`` by its first ``rows`` rows (copied in chunks)."""
    shape = (rows, *images.shape[1:])
    with atomic_path(path, expected_bytes=int(np.prod(shape)) * images.itemsize) as tmp:
        out = _memmap(tmp, images.dtype, shape)
        for start in range(0, rows, 4096):
            stop = min(start + 4096, rows)
            out[start:stop] = images[start:stop]
        out.flush()
        del out


def preprocess(img: Image.Image, resolution: int) -> np.ndarray:
    """Grey, longest side to ``resolution`` (area-preserving resample), centred zero padding.

    16-bit and float images (PNG exports of DICOMs) are min-max scaled to 8 bits rather than
    clipped, which would turn most of a 12- or 16-bit image white.
    """
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.astype(np.uint8))
    img = img.convert("L")
    w, h = img.size
    scale = resolution / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC if scale > 1 else Image.LANCZOS)
    out = np.zeros((resolution, resolution), dtype=np.uint8)
    top, left = (resolution - nh) // 2, (resolution - nw) // 2
    out[top: top + nh, left: left + nw] = np.asarray(img)
    return out


def decode(img: Image.Image, resolution: int) -> np.ndarray:
    """An opened image file as the cache stores it (JPEG: decoded at a reduced scale first)."""
    img.draft("L", (resolution, resolution))
    return preprocess(img, resolution)


def load_image(path: str, resolution: int) -> tuple[np.ndarray | None, str | None]:
    """Decode and preprocess one file; returns (image, None) or (None, reason)."""
    try:
        with Image.open(path) as img:
            return decode(img, resolution), None
    except FileNotFoundError:
        return None, "image file missing"
    except Exception as exc:  # noqa: BLE001 - any decoder failure is one counted drop
        return None, f"image unreadable: {type(exc).__name__}: {exc}"


def _load_job(args: tuple[str, int]) -> tuple[np.ndarray | None, str | None]:
    return load_image(*args)


def build_cache(paths: list[str], image_ids: list[str], folder: Path, resolution: int,
                workers: int = 1, progress: bool = True) -> pd.DataFrame:
    """Decode ``paths`` into a cache folder; returns a frame of (image_id, reason) failures.

    Rows that fail are left out of the cache (and reported, never silently dropped); the
    index lists only the images that were stored, in array order.
    """
    failed: list[tuple[str, str]] = []
    jobs = [(p, resolution) for p in paths]
    pool = get_context("fork").Pool(workers) if workers > 1 else None
    try:
        with write_image_cache(folder, len(paths), resolution) as cache:
            results = pool.imap(_load_job, jobs, chunksize=32) if pool else map(_load_job, jobs)
            for image_id, (img, reason) in tqdm(zip(image_ids, results, strict=True),
                                                total=len(jobs), desc="image cache",
                                                disable=not progress):
                if img is None:
                    failed.append((image_id, reason or "unknown"))
                else:
                    cache.add([image_id], img[None])
    finally:
        if pool:
            pool.close()
            pool.join()
    return pd.DataFrame(failed, columns=["image_id", "reason"])


class ImageCache:
    """Read-only view of a cache folder, indexable by row number or image id."""

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)
        arr_path, index_path = self.folder / CACHE_IMAGES, self.folder / CACHE_INDEX
        if not arr_path.exists() or not index_path.exists():
            raise FileNotFoundError(
                f"no image cache in {self.folder} (expected images.npy and index.parquet); "
                "run notebook 01 (data preparation) for this run first"
            )
        try:
            self.images = np.load(arr_path, mmap_mode="r")
        except ValueError as err:  # numpy: the header asks for more bytes than the file has
            raise ValueError(
                f"image cache {arr_path} is truncated or damaged ({arr_path.stat().st_size:,} "
                f"bytes; {err}); python -m cxrlib verify names the stage to run again, or "
                "delete the folder and rebuild it (notebook 01)") from None
        self.image_ids = pd.read_parquet(index_path)["image_id"].tolist()
        if len(self.image_ids) != len(self.images):
            raise ValueError(
                f"image cache {self.folder} is inconsistent: {len(self.images)} images but "
                f"{len(self.image_ids)} ids; delete the folder and rebuild it"
            )
        self._row = {k: i for i, k in enumerate(self.image_ids)}

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    def rows_for(self, image_ids: list[str] | pd.Series) -> np.ndarray:
        """Array rows of the given ids; an id the cache lacks is an error naming it."""
        missing = [i for i in image_ids if i not in self._row]
        if missing:
            raise KeyError(
                f"{len(missing)} manifest image(s) are not in the cache {self.folder}, e.g. "
                f"{missing[:3]}; the cache does not match the manifest: rebuild it"
            )
        return np.array([self._row[i] for i in image_ids], dtype=np.int64)

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Images at array rows ``rows``, in that order (the memory map is read sorted)."""
        order = np.argsort(rows)
        out = np.empty((len(rows), *self.images.shape[1:]), dtype=np.uint8)
        out[order] = self.images[np.asarray(rows)[order]]
        return out

    def load(self, image_ids: list[str] | pd.Series) -> np.ndarray:
        """Images of the given ids, in that order."""
        return self.read_rows(self.rows_for(image_ids))

    def get(self, image_id: str) -> np.ndarray:
        return np.asarray(self.images[self._row[image_id]])

    def __getstate__(self) -> dict:
        # DataLoader workers get the folder and reopen the memory map, never a pickled copy
        # of the images.
        return {"folder": self.folder}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["folder"])


class CombinedCache:
    """Several image caches read as one (real and synthetic images in one training set).

    Rows are numbered cache after cache; the interface is :class:`ImageCache`'s, so the
    classifier code reads a mixed training set exactly like a real-only one.
    """

    def __init__(self, caches: list[ImageCache]):
        if not caches:
            raise ValueError("CombinedCache needs at least one cache")
        sizes = {c.resolution for c in caches}
        if len(sizes) > 1:
            raise ValueError(f"caches of different resolutions cannot be combined: "
                             f"{[(str(c.folder), c.resolution) for c in caches]}")
        self.caches = caches
        self._offsets = np.cumsum([0] + [len(c) for c in caches])
        self._row: dict[str, int] = {}
        for offset, cache in zip(self._offsets, caches, strict=False):
            for image_id, row in cache._row.items():
                self._row.setdefault(image_id, int(offset) + row)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def resolution(self) -> int:
        return self.caches[0].resolution

    def rows_for(self, image_ids: list[str] | pd.Series) -> np.ndarray:
        """Global rows of the given ids; an id no cache holds is an error naming it."""
        missing = [i for i in image_ids if i not in self._row]
        if missing:
            raise KeyError(f"{len(missing)} image(s) are in none of the caches "
                           f"{[str(c.folder) for c in self.caches]}, e.g. {missing[:3]}")
        return np.array([self._row[i] for i in image_ids], dtype=np.int64)

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Images at global rows ``rows``, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.resolution, self.resolution), dtype=np.uint8)
        which = np.searchsorted(self._offsets, rows, side="right") - 1
        for i, cache in enumerate(self.caches):
            sel = np.flatnonzero(which == i)
            if len(sel):
                out[sel] = cache.read_rows(rows[sel] - self._offsets[i])
        return out

    def load(self, image_ids: list[str] | pd.Series) -> np.ndarray:
        """Images of the given ids, in that order."""
        return self.read_rows(self.rows_for(image_ids))


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (the paper's input scaling; padding becomes -1)."""
    return images.astype(np.float32) / 127.5 - 1.0


def to_model_input(images: np.ndarray) -> torch.Tensor:
    """uint8 images (n x R x R) -> a float tensor (n x 1 x R x R) in [-1, 1], as every model
    of the project (diffusion UNet, classifiers, the audit's judge) takes them."""
    return torch.from_numpy(to_model_range(np.asarray(images))).unsqueeze(1)

