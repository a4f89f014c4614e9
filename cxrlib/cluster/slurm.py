"""Pieces of a stage as SLURM jobs, through submitit: submit, watch, resubmit, re-attach.

The stage's writer (the process holding the run's lock) calls :func:`run_pieces` with the
pieces still to do (arms of the grid, groups of synthetic shards, the diffusion training).
It submits them as one job array (or one multi-task job), records which job writes which
piece (:mod:`cxrlib.core.delegation`) and waits, showing a progress bar of pieces done,
queued and running. Each job runs its piece exactly as the local path does and writes only
its own folder, atomically, so the finished stage equals a local one.

What can happen to a job, and what follows:

- it finishes: the piece is done;
- SLURM warns it of its time limit or preempts it (``USR2``): submitit calls the task's
  ``checkpoint`` and requeues it (at most ``max_retries`` times); the piece resumes from its
  last checkpoint (a classifier's last round, a shard, a diffusion checkpoint);
- it disappears from the queue without a result (``scancel``, a node failure): the piece is
  submitted again, at most ``max_retries`` times;
- its piece raises (bad input, a bug): never retried; the stage stops and names the piece,
  the job and the last lines of its log; the other jobs keep running (re-run the command to
  wait for them, or ``cxrlib cancel``);
- ``cxrlib cancel`` marks the record and cancels the jobs: the stage stops.

A submitter that dies leaves its jobs and the record; the same command later re-attaches to
the jobs still queued or running instead of submitting them again.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from cxrlib.cluster.spec import ClusterSpec, Resources
from cxrlib.core.delegation import (
    ENDED,
    PIECE_ENV,
    Delegated,
    Delegation,
    clear_delegation,
    enter_piece,
    job_states,
    live_delegated,
    read_delegation,
    write_delegation,
)
from cxrlib.core.errors import RunFolderError
from cxrlib.core.layout import RunLayout
from cxrlib.core.lock import read_holder
from cxrlib.core.progress import tqdm

#: Lines of a failed job's log quoted in the error.
LOG_TAIL_LINES = 25
#: Seconds a job may be ended (or no longer listed) without a result before it counts as
#: killed, and at least two polls: its result file can reach a shared file system a moment
#: after the job ends, and a requeued job passes through states a busy controller lists late.
GONE_GRACE_SECONDS = 15.0


class PieceFailedError(RuntimeError):
    """A piece's job raised, or was killed more often than ``max_retries``: the message names
    the piece, the job and the end of its log."""


class StageCancelledError(RunFolderError):
    """The stage's jobs were cancelled (``cxrlib cancel``)."""


@dataclass(frozen=True)
class Piece:
    """One unit of a stage a job runs: ``fn()`` writes the run folder's ``folder`` (relative
    to the run) and nothing else; ``key`` names it in the record and in messages."""

    key: str
    folder: str
    fn: Callable[[], Any]


class DelegatedTask(submitit.helpers.Checkpointable):
    """What a job runs: the piece, after checking that the run's record delegates it to this
    job (:func:`cxrlib.core.delegation.enter_piece`). Checkpointable: when SLURM preempts the
    job or its time runs out, submitit requeues this same task, and the piece resumes from
    what it saved."""

    def __init__(self, run: RunLayout, stage: str, key: str, fn: Callable[[], Any]):
        self.run, self.stage, self.key, self.fn = run, stage, key, fn

    def __call__(self) -> Any:
        os.environ[PIECE_ENV] = self.key
        with enter_piece(self.run, self.stage, self.key):
            return self.fn()


def executor(spec: ClusterSpec, resources: Resources, folder: Path, name: str,
             nodes: int = 1, tasks_per_node: int = 1) -> submitit.SlurmExecutor:
    """submitit's SLURM executor for one kind of job of ``spec`` (logs under ``folder``)."""
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm",
                               slurm_max_num_timeout=spec.max_retries)
    extra: dict[str, Any] = dict(spec.sbatch)
    if spec.account:
        extra["account"] = spec.account
    if spec.qos:
        extra["qos"] = spec.qos
    ex.update_parameters(
        name=name, timeout_min=resources.time_min, cpus_per_task=resources.cpus_per_task,
        nodes=nodes, tasks_per_node=tasks_per_node,
        slurm_array_parallelism=spec.array_parallelism,
        slurm_signal_delay_s=spec.signal_delay_s, slurm_setup=list(spec.setup),
        slurm_additional_parameters=extra,
        **({"gpus_per_node": resources.gpus_per_task * tasks_per_node}
           if resources.gpus_per_task else {}),
        **({"mem_gb": resources.mem_gb} if resources.mem_gb else {}),
        **({"slurm_partition": spec.partition} if spec.partition else {}))
    return ex


def _finished(job: submitit.Job) -> bool:
    """Every task of the job left its result file (read directly: no accounting database
    needed)."""
    return all(t.paths.result_pickle.exists() for t in (job._sub_jobs or [job]))


def _log_tail(job: submitit.Job) -> str:
    text = ""
    for read in (job.stderr, job.stdout):
        try:
            text = (read() or "") + text
        except (OSError, ValueError):
            continue
    lines = [line for line in text.splitlines() if "sacct" not in line]
    return "\n".join(f"    {line}" for line in lines[-LOG_TAIL_LINES:])


def _outcome(job: submitit.Job) -> str | None:
    """None when every task returned; else the error its result holds (one line)."""
    try:
        job.results()
    except Exception as err:  # noqa: BLE001 - submitit raises the job's error as text
        # the trace's last line (``SomeError: message``), before submitit's closing notes
        trace = str(err).split("Traceback", 1)[-1].split("\n----", 1)[0]
        lines = [line.strip() for line in trace.strip().splitlines() if line.strip()]
        return lines[-1] if lines else type(err).__name__
    return None


def run_pieces(pieces: list[Piece], spec: ClusterSpec, resources: Resources, run: RunLayout,
               stage: str, desc: str, nodes: int = 1, tasks_per_node: int = 1) -> None:
    """Run ``pieces`` as SLURM jobs and wait for all of them (see the module's notes)."""
    if not pieces:
        return
    logging.getLogger("submitit").setLevel(logging.ERROR)  # sacct-less clusters warn per poll
    folder = run.jobs / stage
    ex = executor(spec, resources, folder, f"cxrlib-{run.name}-{stage[:2]}", nodes,
                  tasks_per_node)
    tasks = tuple(range(nodes * tasks_per_node))
    holder = read_holder(run)
    record = Delegation(stage, holder.describe() if holder else f"process {os.getpid()}")
    jobs: dict[str, submitit.Job] = {}
    old, live = live_delegated(run)
    if old is not None and old.stage == stage:
        for p in pieces:
            entry = old.pieces.get(p.key)
            if entry is not None and entry.job_id in live:
                jobs[p.key] = submitit.SlurmJob(folder=folder, job_id=entry.job_id, tasks=tasks)
                record.pieces[p.key] = entry
        if jobs:
            print(f"re-attached to {len(jobs)} job(s) of stage {stage} still queued or running "
                  f"(submitted by {old.submitter})")
    by_key = {p.key: p for p in pieces}
    new = [p for p in pieces if p.key not in jobs]
    with ex.batch():
        submitted = [ex.submit(DelegatedTask(run, stage, p.key, p.fn)) for p in new]
    for p, job in zip(new, submitted, strict=True):
        jobs[p.key] = job
        record.pieces[p.key] = Delegated(p.folder, str(job.job_id))
    write_delegation(run, record)
    if new:
        print(f"submitted {len(new)} SLURM job(s) for stage {stage} (logs: {folder})")
    _wait(jobs, by_key, record, ex, spec, run, stage, desc)
    clear_delegation(run)


def _wait(jobs: dict[str, submitit.Job], by_key: dict[str, Piece], record: Delegation,
          ex: submitit.Executor, spec: ClusterSpec, run: RunLayout, stage: str,
          desc: str) -> None:
    pending = set(jobs)
    gone_since: dict[str, float] = {}  # piece -> when its job was first seen ended, no result
    bar = tqdm(total=len(jobs), desc=desc)
    poll = min(spec.poll_seconds, 2.0)  # the first looks come soon: small pieces end fast
    try:
        while pending:
            time.sleep(poll)
            poll = min(poll * 2, spec.poll_seconds)
            marks = read_delegation(run)
            if marks is not None and any(
                    marks.pieces.get(k) and marks.pieces[k].status == "cancelled"
                    for k in pending):
                raise StageCancelledError(f"the SLURM jobs of stage {stage} were cancelled "
                                          f"(cxrlib cancel); {len(pending)} piece(s) unfinished")
            states = job_states() or {}
            for key in sorted(pending):
                job, entry = jobs[key], record.pieces[key]
                if _finished(job):
                    error = _outcome(job)
                    if error is None:
                        pending.discard(key)
                        entry.status = "done"
                        bar.update(1)
                        continue
                    if "UncompletedJobError" not in error:
                        entry.status = "failed"
                        write_delegation(run, record)
                        raise PieceFailedError(_failure(key, job, error, stage, len(pending)))
                elif states.get(job.job_id, "ENDED") not in ENDED:  # queued, running, requeued
                    gone_since.pop(key, None)
                    continue
                elif (time.monotonic() - gone_since.setdefault(key, time.monotonic())
                      < GONE_GRACE_SECONDS):
                    continue
                # killed by the scheduler, or requeued too often: submit again, within bounds
                if entry.attempts > spec.max_retries:
                    entry.status = "failed"
                    write_delegation(run, record)
                    raise PieceFailedError(_failure(
                        key, job, f"killed by the scheduler {entry.attempts} time(s) "
                        f"(max_retries {spec.max_retries})", stage, len(pending)))
                piece = by_key[key]
                jobs[key] = ex.submit(DelegatedTask(run, stage, key, piece.fn))
                gone_since.pop(key, None)
                record.pieces[key] = Delegated(piece.folder, str(jobs[key].job_id),
                                               entry.attempts + 1)
                print(f"{key}: job {job.job_id} ended without a result (cancelled or its node "
                      f"failed); submitted again as job {jobs[key].job_id} "
                      f"(attempt {entry.attempts + 1})")
                write_delegation(run, record)
            queued = sum(states.get(jobs[k].job_id, "PENDING") in ("PENDING", "REQUEUED")
                         for k in pending)
            bar.set_postfix_str(f"{len(pending) - queued} running, {queued} queued")
    finally:
        bar.close()


def _failure(key: str, job: submitit.Job, error: str, stage: str, pending: int) -> str:
    others = pending - 1
    rest = (f" The other {others} job(s) of the stage keep running: after fixing the cause, "
            "run the same command again (it waits for them and submits only what is "
            "missing), or end them with `python -m cxrlib cancel --params <file>`."
            if others else "")
    return (f"stage {stage}: {key} failed in SLURM job {job.job_id}: {error}\n"
            f"  last lines of its log ({job.paths.stderr}):\n{_log_tail(job)}\n{rest}")
