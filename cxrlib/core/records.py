"""What each stage wrote, recorded when it finished, and checked against the disk.

When a stage ends without an error, ``RunLayout.record(stage)`` lists every file it wrote
(``RunLayout.stage_files``) with its size, modification time and SHA-256. ``python -m cxrlib
verify`` checks a run against these records and names every file that is missing, truncated,
changed or not in the record, and which stage to run again; a stage checks the earlier stages
the same way before it starts (:func:`check_inputs`), so a run copied in part, a disk that
lost data or a file edited by hand stops the run instead of being trained on.

The checksum is SHA-256 (``hashlib``, read in 8 MiB blocks: about 1.8 GB/s per core with the
CPU's SHA instructions, 0.4 GB/s without; the same digests as ``sha256sum``). A full check
reads every byte, so a stage's own check of its inputs is the quick kind: sizes always, and
the checksum of every file whose modification time differs from the record's (a copy, an
edit, a re-written file); ``cxrlib verify`` hashes every file unless ``--quick``. Recording a
stage again re-hashes only the files that changed since its last record.

The stage protocol lives here too: a stage runs inside :func:`writing` (``cxrlib run``) or
between a notebook's :func:`claim` and :func:`finish`, which hold the run's one-writer lock
(:mod:`cxrlib.core.lock`), check the earlier stages' records first and record the stage last.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cxrlib.core.delegation import refuse_if_jobs_live
from cxrlib.core.errors import RunFolderError
from cxrlib.core.files import atomic_write_text
from cxrlib.core.layout import STAGES, RunLayout
from cxrlib.core.lock import (
    acquire,
    held_stage,
    hold,
    holds,
    on_main_if_launched,
    parent_holds,
    release,
)

_BLOCK = 8 << 20


class VerificationError(RunFolderError):
    """Files of a run do not match the records of the stages that wrote them."""


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in blocks (memory stays flat for any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def read_record(run: RunLayout, stage: str) -> dict[str, dict] | None:
    """The files a stage's record lists (path relative to the run -> size, mtime_ns, sha256);
    None when the stage has no record (not finished, or finished before records existed)."""
    path = run.record(stage)
    if not path.exists():
        return None
    return json.loads(path.read_text())["files"]


def record_stage(run: RunLayout, stage: str) -> Path:
    """Record every file of ``stage`` (size, modification time, SHA-256); files unchanged
    since the previous record (same size and time) keep their checksum without a re-read."""
    before = read_record(run, stage) or {}
    files = {}
    for path in run.stage_files(stage):
        st, name = path.stat(), path.relative_to(run.root).as_posix()
        old = before.get(name)
        same = old is not None and (old["size"], old["mtime_ns"]) == (st.st_size, st.st_mtime_ns)
        files[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                       "sha256": old["sha256"] if same else file_sha256(path)}
    run.record(stage).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.record(stage), json.dumps(
        {"stage": stage, "recorded": datetime.now(UTC).isoformat(timespec="seconds"),
         "checksum": "sha256", "files": files}, indent=1))
    return run.record(stage)


@dataclass(frozen=True)
class Problem:
    """One file of a run that does not match its stage's record."""

    stage: str
    path: str  # relative to the run folder
    what: str

    def __str__(self) -> str:
        return f"{self.path}: {self.what}"


def check_stage(run: RunLayout, stage: str, full: bool = True) -> list[Problem] | None:
    """The files of ``stage`` that do not match its record; None when it has no record.

    ``full`` hashes every file; otherwise only those whose size matches and whose
    modification time does not (see the module's notes on speed).
    """
    recorded = read_record(run, stage)
    if recorded is None:
        return None
    problems = []
    for name, entry in recorded.items():
        path = run.root / name
        if not path.is_file():
            problems.append(Problem(stage, name, "missing"))
            continue
        st = path.stat()
        if st.st_size < entry["size"]:
            what = f"truncated ({st.st_size:,} of {entry['size']:,} bytes)"
        elif st.st_size > entry["size"]:
            what = f"changed ({st.st_size:,} bytes, recorded {entry['size']:,})"
        elif (full or st.st_mtime_ns != entry["mtime_ns"]) and \
                file_sha256(path) != entry["sha256"]:
            what = "changed (its SHA-256 differs from the record)"
        else:
            continue
        problems.append(Problem(stage, name, what))
    for path in run.stage_files(stage):
        name = path.relative_to(run.root).as_posix()
        if name not in recorded:
            problems.append(Problem(stage, name, "not in the record (written after the stage "
                                                 "finished, or by a run of it that did not)"))
    return problems


def describe(problems: Iterable[Problem], params_file: Path | str = "<its parameter file>"
             ) -> str:
    """The problems, by stage, each stage followed by what to run."""
    by_stage: dict[str, list[Problem]] = {}
    for p in problems:
        by_stage.setdefault(p.stage, []).append(p)
    lines = []
    for stage, found in by_stage.items():
        lines += [f"  {p}" for p in found]
        lines.append(f"  -> run {stage} again: python -m cxrlib run --params {params_file} "
                     f"--stage {stage} --force (or restore these files from an intact copy of "
                     "the run)")
    return "\n".join(lines)


def check_inputs(run: RunLayout, stage: str) -> None:
    """Before ``stage`` starts: the earlier stages' files (quick check) must match their
    records; a :class:`VerificationError` naming every file that does not, and what to run."""
    earlier = STAGES[:STAGES.index(stage)]
    problems = [p for s in earlier for p in check_stage(run, s, full=False) or []]
    if problems:
        raise VerificationError(
            f"{stage} cannot start on run {run.root}: files of earlier stages do not match "
            f"their records ({run.record(earlier[0]).parent}):\n{describe(problems)}")


# -- the stage protocol --------------------------------------------------------------------
@contextmanager
def writing(run: RunLayout, stage: str) -> Iterator[None]:
    """Write stage ``stage`` of a run: hold its lock, stop before any work if files of the
    earlier stages fail their records (:class:`VerificationError`), and
    record every file of the stage when the block ends without an error."""
    with hold(run, stage) as taken:
        # every process calls these (a collective under accelerate launch); the one that took
        # the lock does the work
        on_main_if_launched(lambda: refuse_if_jobs_live(run, stage) if taken else None)
        on_main_if_launched(lambda: check_inputs(run, stage) if taken else None)
        yield
        # The stages end with every process's writes done (their last step runs on_main) and
        # may have closed the process group (Accelerator.end_training): no collective here.
        if taken:
            record_stage(run, stage)


def claim(run: RunLayout, stage: str) -> None:
    """A notebook's writes: take the lock for ``stage`` until :func:`finish` or the kernel
    ends, after checking the earlier stages' files; nothing to do under ``cxrlib run``, whose
    hold covers the kernel, or when this kernel holds it already."""
    if holds(run) or parent_holds(run):
        return
    acquire(run, stage)
    try:
        refuse_if_jobs_live(run, stage)
        check_inputs(run, stage)
    except BaseException:
        release(run)
        raise


def finish(run: RunLayout, stage: str) -> None:
    """A notebook's last cell: record ``stage`` and let go of the lock if this kernel took it
    (:func:`claim`); under ``cxrlib run`` the runner records the stage."""
    if held_stage(run) != stage:
        return
    try:
        record_stage(run, stage)
    finally:
        release(run)
