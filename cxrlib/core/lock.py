"""One writer per run folder: the lock every stage that writes into a run holds while it runs.

Two writers on one run (a second terminal, a re-launched job, JupyterLab beside a batch run)
would overwrite each other's checkpoints, shards and predictions, and a later resume would mix
them. So every writer takes ``RunLayout.lock`` (filelock's ``FileLock``: an ``flock``, which the
operating system releases when its process ends, however it ends) and records who it is in
``RunLayout.holder`` (process id, host, stage, since when) for the message a second writer
gets; it removes the record when it lets go. A record left behind names a process that was
killed while it held the run: the next writer takes the lock over and says whose it was.

Who takes it:

- ``python -m cxrlib run``, for each stage (:func:`cxrlib.core.records.writing`); the
  notebook kernel it starts inherits ``$CXRLIB_RUN_WRITER`` naming the hold and writes under
  it (:func:`parent_holds`);
- a notebook opened in JupyterLab, from its first cell (``Outputs``,
  :func:`cxrlib.core.records.claim`) until its last one (``Outputs.finish``,
  :func:`cxrlib.core.records.finish`) or until its kernel ends;
- ``train-diffusion``, ``generate-synthetic`` and ``run-experiments``, for their stage; under
  ``accelerate launch`` only the main process holds it, for all of them.

Readers (the explorer, ``cxrlib verify``, a notebook reading a finished stage) take nothing.
The stage protocol built on it (check the earlier stages' records, hold the lock, record the
stage) is :mod:`cxrlib.core.records`; this module knows only the run's paths.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol, TypeVar
from uuid import uuid4

from filelock import BaseFileLock, FileLock, Timeout

from cxrlib.core.errors import RunFolderError
from cxrlib.core.files import atomic_write_text

T = TypeVar("T")


class RunFolder(Protocol):
    """What the lock needs of a run: its folder and the two files beside it
    (:class:`cxrlib.core.layout.RunLayout` is one). The lock knows paths only, so the layout
    can take it while saving ``params.json``."""

    @property
    def root(self) -> Path: ...

    @property
    def lock(self) -> Path: ...

    @property
    def holder(self) -> Path: ...

    @property
    def delegated(self) -> Path: ...


#: Set for the processes a holder starts (notebook kernels): the token of its hold.
WRITER_ENV = "CXRLIB_RUN_WRITER"


#: Seconds a writer waits for the lock: long enough to ride over another process's brief
#: hold (``RunLayout.open`` saving ``params.json``), short enough to fail at once.
WAIT_SECONDS = 1.0


class RunBusyError(RunFolderError):
    """Another process writes into the run folder; the message names it."""


@dataclass(frozen=True)
class Holder:
    """Who holds a run's lock, as recorded in ``RunLayout.holder``."""

    pid: int
    host: str
    stage: str
    since: str  # ISO 8601, UTC
    command: str
    token: str  # tells the processes it starts (``WRITER_ENV``) that they write under it

    @classmethod
    def this_process(cls, stage: str) -> Holder:
        script = Path(sys.argv[0])  # python -m cxrlib runs cxrlib/__main__.py
        program = f"python -m {script.parent.name}" if script.name == "__main__.py" \
            else script.name
        return cls(os.getpid(), socket.gethostname(), stage,
                   datetime.now(UTC).isoformat(timespec="seconds"),
                   " ".join([program, *sys.argv[1:]])[:200], uuid4().hex)

    def describe(self) -> str:
        return (f"process {self.pid} on host {self.host}, stage {self.stage}, since "
                f"{self.since} (command: {self.command})")

    def gone(self) -> bool:
        """True when the process no longer runs on this host (unknown for other hosts)."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # it runs, as another user
            return False
        return False


def read_holder(run: RunFolder) -> Holder | None:
    """The recorded holder of a run's lock (None when there is no readable record)."""
    try:
        return Holder(**json.loads(run.holder.read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


#: The locks this process holds, by run folder.
_held: dict[Path, tuple[BaseFileLock, Holder]] = {}


def _key(run: RunFolder) -> Path:
    return run.root.resolve()


def _lock(run: RunFolder, timeout: float) -> BaseFileLock:
    return FileLock(str(run.lock), timeout=timeout, thread_local=False)


def acquire(run: RunFolder, stage: str) -> Holder:
    """Take the run's lock for ``stage`` and record this process as its holder; a
    :class:`RunBusyError` naming the holder when another process has it."""
    run.root.mkdir(parents=True, exist_ok=True)
    lock = _lock(run, WAIT_SECONDS)
    try:
        lock.acquire()
    except Timeout:
        raise RunBusyError(_busy_message(run, read_holder(run))) from None
    try:
        stale = read_holder(run)
        if stale is not None:
            why = "it is no longer running" if stale.gone() else "it ended without letting go"
            print(f"note: took over the lock of run folder {run.root} from "
                  f"{stale.describe()}: {why}", file=sys.stderr)
        me = Holder.this_process(stage)
        atomic_write_text(run.holder, json.dumps(asdict(me), indent=1))
    except BaseException:
        lock.release()
        raise
    _held[_key(run)] = (lock, me)
    return me


def jobs_phrase(stage: str, ids: list[str]) -> str:
    """SLURM jobs of a stage in words: ``3 SLURM job(s) of stage 04_... (12_0, 12_1, 12_2)``."""
    shown = ", ".join(ids[:8]) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")
    return f"{len(ids)} SLURM job(s) of stage {stage} ({shown})"


def _delegated_jobs(run: RunFolder) -> str:
    """The jobs the holder delegated pieces to (:mod:`cxrlib.core.delegation`, which builds
    on this module, hence the record read as plain JSON here), in words."""
    try:
        record = json.loads(run.delegated.read_text())
    except (FileNotFoundError, ValueError):
        return ""
    ids = [p["job_id"] for p in record.get("pieces", {}).values() if p["status"] == "submitted"]
    return f", with {jobs_phrase(record.get('stage'), ids)}" if ids else ""


def _busy_message(run: RunFolder, holder: Holder | None) -> str:
    who = holder.describe() if holder else "a process that has not recorded itself yet"
    who += _delegated_jobs(run)
    return (f"run folder {run.root} is being written by {who}. Two writers would overwrite "
            "each other's checkpoints, shards and predictions: wait until it has finished, or "
            "stop it (a notebook in JupyterLab: run its last cell or shut down its kernel), "
            "then start this again; a lock left by a killed process is taken over on its "
            "own. To work beside it, give this run another run.name.")


def release(run: RunFolder) -> None:
    lock, me = _held.pop(_key(run))
    try:
        if read_holder(run) == me:
            run.holder.unlink(missing_ok=True)
    finally:
        lock.release()


def held_stage(run: RunFolder) -> str | None:
    """The stage this process holds the run's lock for, or None where it holds none."""
    held = _held.get(_key(run))
    return None if held is None else held[1].stage


def holds(run: RunFolder) -> bool:
    """True when this process holds the run's lock."""
    return _key(run) in _held


def parent_holds(run: RunFolder) -> bool:
    """True in a process started by the run's holder (a notebook kernel under ``cxrlib
    run``): ``$CXRLIB_RUN_WRITER`` is the recorded holder's token and the lock is held."""
    token, holder = os.environ.get(WRITER_ENV), read_holder(run)
    if not token or holder is None or holder.token != token:
        return False
    probe = _lock(run, 0)
    try:
        probe.acquire()
    except Timeout:
        return True
    probe.release()  # its holder has gone: the record is stale
    return False


def _launched() -> bool:
    """Under ``accelerate launch`` (or torchrun), where several processes run this code."""
    return "ACCELERATE_MIXED_PRECISION" in os.environ or "WORLD_SIZE" in os.environ


def on_main_if_launched(fn: Callable[[], T]) -> T | None:
    """``fn()`` on the main process only, its failure raised on every process
    (:func:`cxrlib.core.processes.on_main`); a plain call outside ``accelerate launch``, so that
    notebook kernels and the pipeline never import the training stack for it."""
    if not _launched():
        return fn()
    from cxrlib.core.processes import on_main

    return on_main(fn)


@contextmanager
def hold(run: RunFolder, stage: str) -> Iterator[bool]:
    """Hold the run's lock for ``stage`` in the block; yields whether this call took it.

    Nothing is taken where it is held already: by this process (an outer block), by the
    parent process (:func:`parent_holds`), or, under ``accelerate launch``, by the main
    process for the others. Processes started in the block inherit ``$CXRLIB_RUN_WRITER``.
    """
    if holds(run) or parent_holds(run):
        yield False
        return
    me = on_main_if_launched(lambda: acquire(run, stage))
    if me is None:  # another process of an accelerate launch holds it
        yield False
        return
    before = os.environ.get(WRITER_ENV)
    os.environ[WRITER_ENV] = me.token
    try:
        yield True
    finally:
        if before is None:
            os.environ.pop(WRITER_ENV, None)
        else:
            os.environ[WRITER_ENV] = before
        release(run)


def unless_busy(run: RunFolder, write: Callable[[], None]) -> None:
    """``write()`` under the run's lock, unless another process holds it (then the run stays
    as its writer leaves it); on the main process only under ``accelerate launch``."""
    if holds(run) or parent_holds(run):
        write()
        return
    if _launched():
        from cxrlib.core.processes import is_main_process

        if not is_main_process():
            return
    lock = _lock(run, 0)
    try:
        lock.acquire()
    except Timeout:
        return
    try:
        write()
    finally:
        lock.release()
