"""Writing files safely: atomic file and folder replacement.

Every file cxrlib leaves in a run folder is written under a temporary name beside its final
one and renamed into place when complete, so an interrupted run never leaves a half-written
file where a later run (or a resume) would trust it, and a failed write leaves the previous
version intact; a full disk is a :class:`DiskFullError` naming the file and the space it
needs. No torch (the statistics stage writes through this module).
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


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
