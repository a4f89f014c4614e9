"""Work a run's writer hands to scheduler jobs: which job may write which piece of a stage.

A stage run on a cluster (:mod:`cxrlib.cluster`) splits into pieces (an arm of the grid, a
group of synthetic shards, the diffusion training) that SLURM jobs run on other nodes. The
run keeps one writer: the submitting process holds the run's lock (:mod:`cxrlib.core.lock`)
and records here, in ``RunLayout.delegated``, each piece's folder and the job it delegated
it to. A job writes only its own piece (:func:`enter_piece`); a process that is not that job
is refused. A submitter that died leaves its jobs running and this record behind: the same
command re-attaches to them (:mod:`cxrlib.cluster.slurm`) and a different one is refused
while they are queued or running (:func:`refuse_if_jobs_live`); ``cxrlib cancel`` ends them.

Whether a job is queued or running is asked of ``squeue`` (no accounting database needed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from cxrlib.core.files import atomic_write_text
from cxrlib.core.lock import RunBusyError, RunFolder, hold, jobs_phrase, read_holder

#: Set by a delegated task (:class:`cxrlib.cluster.slurm.DelegatedTask`) before its piece
#: runs: the piece's key, so :func:`enter_piece` waits for the record instead of locking.
PIECE_ENV = "CXRLIB_PIECE"
#: Seconds a job waits for the submitter's record to name it (the record is written just
#: after submission; a job can start before that on an idle cluster).
RECORD_WAIT_SECONDS = 120.0


@dataclass
class Delegated:
    """One piece handed to a job: the folder it writes (relative to the run), the job's id
    (``123`` or ``123_4`` for an array task), how many jobs it took and what became of it."""

    folder: str
    job_id: str
    attempts: int = 1
    status: str = "submitted"  # submitted | done | failed | cancelled


@dataclass
class Delegation:
    """The record of one stage's delegated pieces (``RunLayout.delegated``)."""

    stage: str
    submitter: str  # who submitted (lock holder's description)
    pieces: dict[str, Delegated] = field(default_factory=dict)
    updated: str = ""

    def job_ids(self, status: str | None = "submitted") -> list[str]:
        return [d.job_id for d in self.pieces.values() if status is None or d.status == status]

    def describe_jobs(self, live: set[str] | None = None) -> str:
        return jobs_phrase(self.stage, [j for j in self.job_ids() if live is None or j in live])


def read_delegation(run: RunFolder) -> Delegation | None:
    """The run's record of delegated pieces, or None."""
    try:
        raw = json.loads(run.delegated.read_text())
    except (FileNotFoundError, ValueError):
        return None
    pieces = {k: Delegated(**v) for k, v in raw.pop("pieces", {}).items()}
    return Delegation(**raw, pieces=pieces)


def write_delegation(run: RunFolder, record: Delegation) -> None:
    record.updated = datetime.now(UTC).isoformat(timespec="seconds")
    run.delegated.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.delegated, json.dumps(asdict(record), indent=1))


def clear_delegation(run: RunFolder) -> None:
    run.delegated.unlink(missing_ok=True)


#: Job states after which a job runs no more (a requeued job passes through others, e.g.
#: ``REQUEUED``, and is still the same job).
ENDED = frozenset({"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                   "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"})


def job_states() -> dict[str, str] | None:
    """This user's SLURM jobs that the controller still lists, in any state, id -> state
    (``PENDING``, ``RUNNING``, ``REQUEUED``, ``CANCELLED``, ...; array tasks one by one, as
    ``123_4``; ended jobs stay listed for the cluster's MinJobAge); None where there is no
    ``squeue`` (not a SLURM submit host)."""
    if shutil.which("squeue") is None:
        return None
    out = subprocess.run(["squeue", "--me", "-h", "-r", "-t", "all", "-o", "%i %T"],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"squeue failed ({out.returncode}): {out.stderr.strip()[:300]}")
    return dict(line.split(maxsplit=1) for line in out.stdout.splitlines() if line.strip())


def live_job_ids() -> set[str] | None:
    """Ids of the jobs of :func:`job_states` that are queued, running or being requeued
    (None without ``squeue``)."""
    states = job_states()
    return None if states is None else {j for j, s in states.items() if s not in ENDED}


def live_delegated(run: RunFolder) -> tuple[Delegation | None, set[str]]:
    """The run's record and which of its submitted jobs are still queued or running."""
    record = read_delegation(run)
    if record is None:
        return None, set()
    live = live_job_ids()
    return record, set() if live is None else set(record.job_ids()) & live


def job_id_here() -> str | None:
    """This process's SLURM job id as ``squeue -r`` prints it (``123`` or ``123_4``)."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def refuse_if_jobs_live(run: RunFolder, stage: str) -> None:
    """A writer that took the lock of a run whose jobs a dead submitter left queued or running
    may go on only for the same stage (it re-attaches to them); otherwise a
    :class:`RunBusyError` names the jobs and how to end them."""
    _refuse_other_stage(run, stage, *live_delegated(run))


def _refuse_other_stage(run: RunFolder, stage: str, record: Delegation | None,
                        live: set[str]) -> None:
    if record is None or not live or record.stage == stage:
        return
    raise RunBusyError(
        f"run folder {run.root} has {record.describe_jobs(live)} still queued or running, "
        f"submitted by {record.submitter}. Re-run that stage's command to wait for them, or "
        "end them with `python -m cxrlib cancel --params <its parameter file>`, then start "
        "this again.")


@contextmanager
def enter_piece(run: RunFolder, stage: str, key: str) -> Iterator[None]:
    """Write piece ``key`` of ``stage`` (an arm, a shard group): a job the run's record names
    for it writes under the submitter's lock; any other process must take the lock itself
    (:func:`cxrlib.core.lock.hold`, refused while another writer holds it), and is refused
    while jobs delegated by a dead submitter still run."""
    if os.environ.get(PIECE_ENV) == key:
        _wait_until_named(run, stage, key)
        yield
        return
    with hold(run, stage):
        record, live = live_delegated(run)  # one look at the queue for both checks
        _refuse_other_stage(run, stage, record, live)
        if record is not None and key in record.pieces and record.pieces[key].job_id in live:
            raise RunBusyError(f"piece {key} of run {run.root} is delegated to SLURM job "
                               f"{record.pieces[key].job_id}, which is still queued or "
                               "running; wait for it or cancel it (cxrlib cancel)")
        yield


def _wait_until_named(run: RunFolder, stage: str, key: str) -> None:
    here = job_id_here()
    deadline = time.monotonic() + RECORD_WAIT_SECONDS
    while True:
        record = read_delegation(run)
        entry = record.pieces.get(key) if record and record.stage == stage else None
        if entry is not None and entry.job_id == here and entry.status == "submitted":
            return
        if time.monotonic() > deadline:
            holder = read_holder(run)
            raise RunBusyError(
                f"job {here} was not delegated piece {key} of stage {stage} in run "
                f"{run.root} (the record names {entry.job_id if entry else 'no job'} for it; "
                f"writer: {holder.describe() if holder else 'none'}); a job may write only "
                "the piece its submitter handed to it")
        time.sleep(1.0)


def cancel_jobs(run: RunFolder) -> list[str]:
    """Mark every submitted piece of the run's record cancelled, then ``scancel`` their jobs
    (a waiting submitter reads the mark and stops instead of resubmitting); the job ids."""
    record = read_delegation(run)
    if record is None:
        return []
    ids = record.job_ids()
    for entry in record.pieces.values():
        if entry.status == "submitted":
            entry.status = "cancelled"
    write_delegation(run, record)
    if ids and shutil.which("scancel"):
        subprocess.run(["scancel", *ids], check=False, timeout=60)
    return ids
