"""Writing files safely: atomic file and folder replacement, image caches, main-process writes.

Every file cxrlib leaves in a run folder is written under a temporary name beside its final
one and renamed into place when complete, so an interrupted run never leaves a half-written
file where a later run (or a resume) would trust it, and a failed write leaves the previous
version intact; a full disk is a :class:`DiskFullError` naming the file and the space it
needs. Under ``accelerate launch`` several processes run the same code; files shared
by all of them are written by the main process only (:func:`on_main`), while the others wait.
The helpers live here so that each rule has one implementation. No torch at import time (the
statistics stage writes through this module without the training stack).
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from accelerate import PartialState

T = TypeVar("T")

#: An image cache folder: the images (N x R x R uint8) and their ids, one per array row.
CACHE_IMAGES = "images.npy"
CACHE_INDEX = "index.parquet"


class DiskFullError(RuntimeError):
    """A write ran out of disk space (or quota); the message names the file, the space it
    needs and the space left, and says that nothing finished before was touched."""


def _size(path: Path) -> int:
    """Bytes on disk of a file, or of every file under a folder (0 when it does not exist);
    a sparse file (a memory map not yet written) counts only what is allocated."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(min(st.st_size, st.st_blocks * 512) for st in (f.stat() for f in files))


def _disk_full(err: BaseException, folder: Path) -> bool:
    """Did ``err`` come from a full disk? The errno says so for plain writes; some libraries
    hide it (pyarrow keeps it in the text, ``torch.save`` raises a RuntimeError), so a write
    that failed with no space left counts too."""
    if isinstance(err, DiskFullError):  # an inner write named its file already
        return False
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
        return True
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


@contextmanager
def _full_disk_named(path: Path, tmp: Path, expected_bytes: int) -> Iterator[None]:
    """Turn a full disk while writing ``tmp`` (for ``path``) into a :class:`DiskFullError`."""
    try:
        yield
    except Exception as err:
        if not _disk_full(err, path.parent):
            raise
        written, previous = _size(tmp), _size(path)
        need = max(written, previous, expected_bytes)
        free = shutil.disk_usage(path.parent).free
        kept = ("keeps its previous version" if path.exists() else "was not written")
        raise DiskFullError(
            f"disk full while writing {path}: it needs at least {_mb(need)} free "
            f"({_mb(written)} were written when the disk filled), and {_mb(free)} are free "
            f"on that disk. Free space there (or move the run: run.out_dir or "
            f"$CXRLIB_RUNS_DIR), then run the stage again: it resumes, everything finished "
            f"before is kept, and {path.name} {kept}.") from err


@contextmanager
def atomic_path(path: Path, expected_bytes: int = 0) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write; renamed onto ``path`` when the block ends
    without an error, removed when it raises (a full disk: :class:`DiskFullError`, which
    states about ``expected_bytes`` needed where the caller knows the size).

    The temporary name keeps ``path``'s suffix, since some writers choose or append the
    format by suffix (``np.save`` adds ``.npy``, PIL picks the image format).
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        with _full_disk_named(path, tmp, expected_bytes):
            yield tmp
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write text (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_parquet(frame: Any, path: Path) -> None:
    """Write a DataFrame (without its index) to parquet atomically."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


@contextmanager
def replace_folder(folder: Path, expected_bytes: int = 0) -> Iterator[Path]:
    """A fresh temporary folder to fill; it replaces ``folder`` when the block ends without an
    error, and is removed when it raises (``folder`` is then untouched; a full disk is a
    :class:`DiskFullError`, as in :func:`atomic_path`).

    The old folder is moved aside until the new one is in place, so there is always a complete
    copy on disk. The temporary names are fixed (not per process), so leftovers of a killed
    write are cleared by the next one.
    """
    tmp = folder.with_name(f".{folder.name}.tmp")
    aside = folder.with_name(f".{folder.name}.old")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        with _full_disk_named(folder, tmp, expected_bytes):
            yield tmp
        if aside.exists():
            shutil.rmtree(aside)
        if folder.exists():
            os.replace(folder, aside)
        os.replace(tmp, folder)
        if aside.exists():
            shutil.rmtree(aside)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


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
    """Write an image cache folder (read by :class:`cxrlib.imagecache.ImageCache`): the rows
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


def process_state() -> PartialState:
    """accelerate's state of this process, set up as cxrlib's Accelerators are (on the CPU where
    there is no GPU), so that it is right even before any Accelerator exists: a bare
    ``PartialState()`` under ``accelerate launch`` on a CPU-only machine sees one process."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    """True on the process that writes shared files: rank 0 under ``accelerate launch``, and
    the only process otherwise."""
    return process_state().is_main_process


class MainProcessError(RuntimeError):
    """Raised on the other processes when work done on the main process failed."""


def on_main(fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on the main process only; every process returns once it has finished.

    Returns ``fn``'s result on the main process and None on the others. If ``fn`` raises, the
    main process re-raises it and every other process raises :class:`MainProcessError` naming
    it, instead of waiting at the next barrier until a collective timeout hides the cause.
    """
    from accelerate.utils import broadcast_object_list

    result, failure = None, None
    if is_main_process():
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the others are told
            failure = exc
    state = process_state()
    if state.num_processes > 1:
        state.wait_for_everyone()
        flag = [None if failure is None else f"{type(failure).__name__}: {failure}"]
        broadcast_object_list(flag)
        if failure is None and flag[0] is not None:
            raise MainProcessError(f"the main process failed: {flag[0]}")
    if failure is not None:
        raise failure
    return result
