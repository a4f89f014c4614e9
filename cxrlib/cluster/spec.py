"""The cluster file: where a study's jobs run and with what resources (``--cluster FILE``).

Kept out of the parameter file on purpose: where the jobs run is not part of a study's
identity (a run started on a laptop can be finished on a cluster, and the other way round),
so changing the partition or the time limit never invalidates a run folder. Read with
``yaml.safe_load`` and validated before anything is submitted; an unknown key or a wrong
type names the file and the key. ``params/cluster/slurm.yaml`` documents every key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cxrlib.core.delegation import PIECE_ENV
from cxrlib.core.errors import ParamsError

#: Set by ``cxrlib run --cluster FILE`` for the notebook kernels it starts: the cluster file
#: the stages submit their pieces with.
CLUSTER_ENV = "CXRLIB_CLUSTER"


class Resources(BaseModel):
    """What one task asks the scheduler for."""

    model_config = ConfigDict(extra="forbid")

    #: Wall-clock limit per job (minutes); a job reaching it is requeued from its checkpoint.
    time_min: Annotated[int, Field(ge=1)] = 240
    #: CPU cores per task; also the torch threads a task uses, so results match a local run
    #: with the same thread count.
    cpus_per_task: Annotated[int, Field(ge=1)] = 8
    #: GPUs per task (0: CPU only).
    gpus_per_task: Annotated[int, Field(ge=0)] = 1
    #: Memory per node in GB (None: the partition's default).
    mem_gb: Annotated[float, Field(gt=0)] | None = None


class DiffusionJob(Resources):
    """The diffusion training: one job of ``nodes`` x ``tasks_per_node`` tasks (one per GPU),
    whose ``accelerate`` state is built from SLURM's environment."""

    nodes: Annotated[int, Field(ge=1)] = 1
    tasks_per_node: Annotated[int, Field(ge=1)] = 4
    time_min: Annotated[int, Field(ge=1)] = 1440


class ClusterSpec(BaseModel):
    """A cluster file (``params/cluster/slurm.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    #: ``slurm`` submits through submitit; ``local`` runs every piece in this process (the
    #: default without a cluster file; useful to test a cluster file's pieces on a laptop).
    executor: Literal["slurm", "local"] = "slurm"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    #: Shell lines every job runs first (module loads, venv activation).
    setup: list[str] = Field(default_factory=list)
    #: Other ``#SBATCH`` options, e.g. ``{constraint: a100}``.
    sbatch: dict[str, str | int] = Field(default_factory=dict)
    #: Array tasks running at once (the grid's arms, the shard groups).
    array_parallelism: Annotated[int, Field(ge=1)] = 16
    #: Times a piece killed by the scheduler (``scancel``, node failure) is submitted again,
    #: and a job that hit its time limit or was preempted is requeued; a piece that fails on
    #: its own (an exception) is never retried.
    max_retries: Annotated[int, Field(ge=0)] = 3
    #: Seconds before the time limit that SLURM warns a job (USR2), which then requeues.
    signal_delay_s: Annotated[int, Field(ge=10)] = 120
    #: Seconds between looks at the queue while waiting.
    poll_seconds: Annotated[float, Field(gt=0)] = 15.0
    #: The classifier grid: one array task per arm.
    grid: Resources = Field(default_factory=Resources)
    #: Cohort generation: an array over groups of shards (shard s goes to group s % groups).
    generation: Resources = Field(default_factory=Resources)
    generation_groups: Annotated[int, Field(ge=1)] = 16
    diffusion: DiffusionJob = Field(default_factory=DiffusionJob)
    #: The GPU model the jobs get (e.g. ``H100``), for ``cxrlib plan``'s estimate.
    gpu_kind: str | None = None


def load_cluster(file: str | os.PathLike[str]) -> ClusterSpec:
    """Read and validate a cluster file; a :class:`ParamsError` names the file and key."""
    path = Path(file)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: cluster file not found") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    try:
        return ClusterSpec.model_validate(raw)
    except ValidationError as err:
        keys = "; ".join(f"key '{'.'.join(map(str, e['loc']))}': {e['msg']}"
                         for e in err.errors())
        raise ParamsError(f"{path}: invalid cluster file: {keys} (see "
                          "params/cluster/slurm.yaml for every key)") from None


def active_cluster() -> ClusterSpec | None:
    """The cluster file ``cxrlib run --cluster`` named for this process (``$CXRLIB_CLUSTER``),
    or None: run locally (also inside a job, which inherits the variable but runs its own
    piece)."""
    file = os.environ.get(CLUSTER_ENV)
    if not file or os.environ.get(PIECE_ENV):  # a job runs its own piece here, locally
        return None
    spec = load_cluster(file)
    return spec if spec.executor == "slurm" else None
