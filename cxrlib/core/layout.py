"""Every path of a run, in one object: :class:`RunLayout`.

A run lives in ``<runs>/<run.name>/``; each notebook writes into a folder named after it, and
what a later stage reads (the cohort, the checkpoints, the synthetic cohorts, the judge, the
experiment folders) is found here rather than typed out again by each reader::

    <run>/params.json                         the validated parameters (refuses other ones)
    <run>/summary.json                        the headline numbers (cxrlib.core.summary)
    <run>/notebooks/<stage>.ipynb             executed notebooks (cxrlib.notebook_runner)
    <run>/01_data_prep/                       figures and tables of notebook 01
        check_history.csv                     the learnability check's training history
        cohort/manifest.parquet, dropped.parquet, cache_<res>/
        phantom/<site>/                       rendered phantom sites
    <run>/02_diffusion_training/              notebook 02
        loss_history.csv                      the loss (and precision) of every step
        checkpoints/step-XXXXXXX/, previews/
    <run>/03_sampling_explorer/               notebook 03
        synthetic/<strategy>/manifest.parquet, cache_<res>/
        judge/                                the audit's real-only classifier
    <run>/04_classifier_experiments/          notebook 04
        <experiment>/seed-<s>/                model, config, history, predictions
    <run>/05_statistics/                      notebook 05
    <run>/06_worth_curves/                    notebook 06 (runs with ``tradeoffs`` only)
    <run>/records/<stage>.json                size and sha256 of every file a stage wrote,
                                              recorded when it finished (cxrlib.core.records)
    <run>/.writer.lock, .writer.json          the one-writer lock and its holder (cxrlib.core.lock)

Names that start with a dot are scratch: temporary files of writes in progress
(:mod:`cxrlib.core.files`), the lock; no record lists them.

The rendered reports of a run go to ``reports/<run.name>/`` (:meth:`RunLayout.reports`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrlib.core.config import diff_keys, params_base, resolve_path
from cxrlib.core.errors import ParamsError
from cxrlib.core.files import atomic_write_text
from cxrlib.core.lock import unless_busy
from cxrlib.core.schema import DiffusionSpec, Params

#: The notebooks, in order; each is a pipeline stage and names its run folder.
STAGES: tuple[str, ...] = ("01_data_prep", "02_diffusion_training", "03_sampling_explorer",
                           "04_classifier_experiments", "05_statistics", "06_worth_curves")
#: The worth curves' stage: a run has it only when its parameters have ``tradeoffs``.
WORTH_STAGE = "06_worth_curves"


def stages_of(params: Params) -> tuple[str, ...]:
    """The stages a run of ``params`` has (:data:`WORTH_STAGE` only with ``tradeoffs``)."""
    return tuple(s for s in STAGES if s != WORTH_STAGE or params.tradeoffs is not None)
#: Environment variable that moves every run folder (tests point it at a temporary folder).
RUNS_DIR_ENV = "CXRLIB_RUNS_DIR"
#: Where rendered reports go, relative to the parameter file's project.
REPORTS_DIR = "reports"
#: Where each stage's record of the files it wrote goes, inside the run.
RECORDS_DIR = "records"
#: The training histories each stage writes (glob patterns in its folder; every row says the
#: precision it trained in): notebook 01's learnability check and 02's loss history (their
#: tables ``check_history`` and ``loss_history``), 03's judge, 04's experiments.
TRAINING_HISTORIES: dict[str, str] = {
    "01_data_prep": "check_history.csv",
    "02_diffusion_training": "loss_history.csv",
    "03_sampling_explorer": "judge/history.csv",
    "04_classifier_experiments": "*/seed-*/history.csv",
}
#: Keys a run may change between invocations: how long to train, how often to save, how many
#: worker processes. Everything else defines the run and must stay as it was.
_FREE_KEYS = frozenset({"data.workers", "experiments.workers", "sampling.batch_size",
                        *(f"diffusion.{k}" for k in DiffusionSpec.RUN_LENGTH_KEYS)})


@dataclass(frozen=True)
class RunLayout:
    """The folders and files of one run; build it with :meth:`open`."""

    root: Path
    resolution: int
    name: str
    project: Path  # the folder relative paths of the parameter file are taken from

    @classmethod
    def open(cls, params: Params, create: bool = True) -> RunLayout:
        """The run's layout under ``<run.out_dir or $CXRLIB_RUNS_DIR>/<run.name>``.

        With ``create`` the folder is made and keeps ``params.json``; opening it again with
        different parameters is an error naming the keys that differ, so one run never
        writes over another run's files. Only run-length keys (``_FREE_KEYS``: steps to
        train, checkpoint cadence, workers) may change, so a finished training run can be
        continued for more steps.
        """
        project = params_base(params)
        runs = os.environ.get(RUNS_DIR_ENV) or params.run.out_dir
        layout = cls(resolve_path(runs, project) / params.run.name, params.data.resolution,
                     params.run.name, project)
        if create:
            layout._claim(params)
        return layout

    def _claim(self, params: Params) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        current = json.loads(params.to_json())
        before = json.loads(self.params.read_text()) if self.params.exists() else None
        if before is not None:
            # Keys the saved record lacks were added to the schema after the folder was made.
            diff = sorted(k for k in diff_keys(before, current)
                          if k not in _FREE_KEYS and _has_key(before, k))
            if diff:
                raise ParamsError(
                    f"run folder {self.root} was made with different parameters "
                    f"(keys differ: {', '.join(diff[:8])}); give the run a new run.name, "
                    f"or delete the folder to start it again")
        if before != current:  # the latest invocation, unless another process writes the run
            unless_busy(self, lambda: atomic_write_text(self.params, params.to_json()))

    # -- the run as a whole --------------------------------------------------------------
    @property
    def params(self) -> Path:
        return self.root / "params.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    def stage(self, stage: str) -> Path:
        """The folder notebook ``stage`` writes its figures and tables to."""
        if stage not in STAGES:
            raise KeyError(f"unknown stage '{stage}'; the stages are {', '.join(STAGES)}")
        return self.root / stage

    def executed(self, stage: str) -> Path:
        """Where the pipeline keeps notebook ``stage`` as executed for this run."""
        return self.root / "notebooks" / f"{self.stage(stage).name}.ipynb"

    def stage_files(self, stage: str) -> list[Path]:
        """Every file stage ``stage`` wrote: its folder and its executed notebook, without
        scratch names (a leading dot: writes in progress), sorted."""
        found = [p for p in self.stage(stage).rglob("*")
                 if p.is_file() and not any(part.startswith(".")
                                            for part in p.relative_to(self.root).parts)]
        executed = self.executed(stage)
        return sorted(found + ([executed] if executed.is_file() else []))

    def training_histories(self, stage: str) -> list[Path]:
        """The training histories stage ``stage`` wrote (:data:`TRAINING_HISTORIES`), sorted;
        empty for a stage that trains nothing or has not run."""
        pattern = TRAINING_HISTORIES.get(stage)
        return sorted(self.stage(stage).glob(pattern)) if pattern else []

    def record(self, stage: str) -> Path:
        """What ``stage`` wrote (sizes, checksums), recorded when it finished."""
        return self.root / RECORDS_DIR / f"{self.stage(stage).name}.json"

    @property
    def lock(self) -> Path:
        """The lock file of the run's one writer (:mod:`cxrlib.core.lock`)."""
        return self.root / ".writer.lock"

    @property
    def holder(self) -> Path:
        """Who holds :attr:`lock`: process, host, stage, since when (JSON)."""
        return self.root / ".writer.json"

    @property
    def delegated(self) -> Path:
        """Which SLURM job writes which piece of the stage running on a cluster
        (:mod:`cxrlib.core.delegation`, JSON)."""
        return self.jobs / "delegated.json"

    @property
    def jobs(self) -> Path:
        """Scheduler jobs' files: submitit's pickles and each job's log, by stage."""
        return self.root / "jobs"

    def reports(self, reports_root: Path | None = None) -> Path:
        """Where the run's rendered pages go: ``reports/<run.name>/`` by default."""
        return Path(reports_root or self.project / REPORTS_DIR) / self.name

    # -- 01 data preparation -------------------------------------------------------------
    @property
    def cohort(self) -> Path:
        return self.stage("01_data_prep") / "cohort"

    @property
    def manifest(self) -> Path:
        return self.cohort / "manifest.parquet"

    @property
    def dropped(self) -> Path:
        return self.cohort / "dropped.parquet"

    @property
    def image_cache(self) -> Path:
        return self.cohort / f"cache_{self.resolution}"

    def phantom(self, site: str) -> Path:
        return self.stage("01_data_prep") / "phantom" / site

    # -- 02 diffusion training -----------------------------------------------------------
    @property
    def diffusion(self) -> Path:
        return self.stage("02_diffusion_training")

    @property
    def checkpoints(self) -> Path:
        return self.diffusion / "checkpoints"

    @property
    def previews(self) -> Path:
        return self.diffusion / "previews"

    def preview(self, step: int) -> Path:
        """The preview grid sampled at training step ``step``."""
        return self.previews / f"step-{step:07d}.png"

    @property
    def preview_grids(self) -> list[Path]:
        """Every preview grid so far, oldest first."""
        return sorted(self.previews.glob("step-*.png"))

    @property
    def preview_columns(self) -> Path:
        """The names of the preview grids' columns (their conditions), as JSON."""
        return self.previews / "columns.json"

    # -- 03 sampling ---------------------------------------------------------------------
    def synthetic(self, strategy: str) -> Path:
        """One synthetic cohort: its manifest, shards and image cache."""
        return self.stage("03_sampling_explorer") / "synthetic" / strategy

    def synthetic_manifest(self, strategy: str) -> Path:
        return self.synthetic(strategy) / "manifest.parquet"

    def synthetic_cache(self, strategy: str) -> Path:
        return self.synthetic(strategy) / f"cache_{self.resolution}"

    def synthetic_shard(self, strategy: str, shard: int) -> Path:
        """One shard of generated images (the unit of resumption and of splitting)."""
        return self.synthetic(strategy) / "shards" / f"shard-{shard:05d}.npz"

    @property
    def judge(self) -> Path:
        """The audit's judge: the real-only classifier on all diffusion training rows."""
        return self.stage("03_sampling_explorer") / "judge"

    # -- 04 classifier experiments -------------------------------------------------------
    @property
    def experiments(self) -> Path:
        return self.stage("04_classifier_experiments")

    def experiment(self, name: str, seed: int) -> ExperimentFolder:
        """One experiment at one training seed."""
        return ExperimentFolder(self.experiments / name / f"seed-{seed}")

    def finished_experiments(self) -> list[ExperimentFolder]:
        """Every experiment and seed with predictions (written last), in name order."""
        return [ExperimentFolder(p.parent) for p in
                sorted(self.experiments.glob(f"*/seed-*/{ExperimentFolder.PREDICTIONS}"))]


@dataclass(frozen=True)
class ExperimentFolder:
    """What one experiment at one seed leaves (:func:`cxrlib.experiments.runner.run_experiment`)."""

    root: Path
    PREDICTIONS = "predictions.parquet"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def pretrain_model(self) -> Path:
        """The first phase of a synthetic-pretraining arm (its synthetic rows only)."""
        return self.root / "pretrain-model"

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def history(self) -> Path:
        return self.root / "history.csv"

    @property
    def predictions(self) -> Path:
        """Per-image predictions on every test set; written last, so it marks the
        experiment done."""
        return self.root / self.PREDICTIONS


def _has_key(tree: dict, dotted: str) -> bool:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True

