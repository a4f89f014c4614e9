"""The classifier experiment grid (notebook 04): real, real + synthetic, synthetic only, sites.

Every cell of the grid is one :class:`Experiment` (a training set recipe) times a seed:

- ``real_only.f25``: a seeded draw of 25% of the internal training patients (the baseline);
- ``real_plus_synthetic_x2.f25``: those rows plus replicas 0..1 of each of them (+200%);
- ``synthetic_only_x2.f25``: the replicas alone, no real image;
- ``real_plus_rebalanced_x2.f25``: the real rows plus as many *rebalanced* synthetic images as
  the ``x2`` replica experiment adds, so the two strategies compare like for like;
- ``nih_only`` / ``nih_plus_synthetic_x2``: an external site's real training split alone and
  with internal synthetic replicas (the paper's MIMIC experiment).

Validation is always the real internal validation split; the test sets are the internal test
split and every external site's test split. Each finished experiment leaves its model,
history, config and long per-image predictions (parquet) in its own folder; the predictions are
written last and mark it done, so an interrupted grid resumes where it stopped.

Before anything trains, :func:`check_grid_leakage` verifies that no validation or test patient
(through a synthetic image's source patient too) is in any training set of the grid.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxrlib.classifier.training import TrainResult, predict, predictions_frame, train_or_load
from cxrlib.cluster.spec import ClusterSpec, active_cluster
from cxrlib.core.cohort import real_subset, split_rows, test_sets, training_rows, validation_rows
from cxrlib.core.files import atomic_path, atomic_write_parquet, atomic_write_text
from cxrlib.core.kinds import Kind
from cxrlib.core.labels import CHEXPERT_LABELS
from cxrlib.core.layout import RunLayout
from cxrlib.core.processes import is_main_process, on_main, process_state
from cxrlib.core.progress import tqdm
from cxrlib.core.schema import Params
from cxrlib.data.imagecache import CombinedCache, ImageCache
from cxrlib.data.readers import DataError, load_cohort
from cxrlib.experiments.grid import Experiment, grid_results, plan_grid


class LeakageError(DataError):
    """A validation or test patient is in a training set of the grid."""


@dataclass
class GridData:
    """What the grid trains and tests on: the real cohort and the synthetic cohorts."""

    manifest: pd.DataFrame
    cache: ImageCache
    synthetic: dict[str, pd.DataFrame]
    synthetic_caches: dict[str, ImageCache]

    def combined_cache(self) -> CombinedCache:
        return CombinedCache([self.cache, *self.synthetic_caches.values()])


def load_synthetic(run: RunLayout, strategies: list[str]
                   ) -> tuple[dict[str, pd.DataFrame], dict[str, ImageCache]]:
    """The synthetic cohorts notebook 03 wrote (manifest and image cache per strategy)."""
    frames, caches = {}, {}
    for strategy in strategies:
        path = run.synthetic_manifest(strategy)
        if not path.exists():
            raise FileNotFoundError(f"no synthetic cohort '{strategy}' at {path}; run notebook "
                                    "03 (or cxrlib generate-synthetic) for this run first")
        frames[strategy] = pd.read_parquet(path)
        caches[strategy] = ImageCache(run.synthetic_cache(strategy))
    return frames, caches


def grid_data(params: Params, run: RunLayout) -> GridData:
    """The run's real cohort (notebook 01) and synthetic cohorts (notebook 03)."""
    cohort = load_cohort(params, run)
    if cohort.cache_dir is None:
        raise DataError("a metadata-only run has no images to train classifiers on")
    frames, caches = load_synthetic(run, [*params.sampling.strategies, *(
        s.cohort() for s in params.generator_settings())])
    return GridData(cohort.manifest, ImageCache(cohort.cache_dir), frames, caches)


def _replicas_of(synthetic: pd.DataFrame, sources: pd.Series, k: int) -> pd.DataFrame:
    return synthetic[synthetic["source_image_id"].isin(set(sources))
                     & (synthetic["replica"] < k)]


def shuffled_labels(rows: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The rows with their 14-label vectors permuted across rows (a seeded permutation of
    whole vectors; images, demographics and patients stay): the shuffled-conditions control."""
    order = np.random.default_rng([seed, 31337]).permutation(len(rows))
    labels = list(CHEXPERT_LABELS)
    out = rows.copy()
    out[labels] = rows[labels].to_numpy()[order]
    return out


def _external_real(exp: Experiment, manifest: pd.DataFrame) -> pd.DataFrame:
    real = split_rows(manifest, [exp.train_site], "train")
    if real.empty:
        raise DataError(f"experiment {exp.name}: site '{exp.train_site}' has no training "
                        "rows; give it a train fraction in data.sites[].split")
    return real


def _internal_real_images(exp: Experiment, params: Params, data: GridData) -> pd.DataFrame:
    """As many internal real training images as ``exp.k`` replicas of every source add,
    whole patients in a seeded order (the external site's real-data control)."""
    need = int((data.synthetic["replicas"]["replica"] < exp.k).sum())
    pool = training_rows(params, data.manifest)
    if len(pool) < need:
        raise DataError(f"experiment {exp.name}: needs {need} internal real training images "
                        f"but the internal site has {len(pool)}; lower its k in "
                        "experiments.external[].real_k")
    patients = np.array(sorted(pool["patient_id"].unique()))
    order = np.random.default_rng([params.run.seed, exp.seed, 271]).permutation(len(patients))
    rank = dict(zip(patients[order], range(len(patients)), strict=True))
    return pool.iloc[np.argsort(pool["patient_id"].map(rank).to_numpy(), kind="stable")].head(
        need)


def training_set(exp: Experiment, params: Params, data: GridData) -> pd.DataFrame:
    """The training rows of one experiment, built from its kind's recipe
    (:class:`cxrlib.core.kinds.Recipe`): real and synthetic manifest rows, with a ``source``
    column saying which; an error names what is missing for a recipe."""
    recipe, manifest = exp.kind.recipe, data.manifest
    if recipe.real == "external":
        real = _external_real(exp, manifest)
    else:
        real = real_subset(params, manifest, exp.real_fraction, exp.seed,
                           beyond_sources=exp.kind is Kind.REAL_ONLY)
    if recipe.synthetic != "none" and exp.cohort not in data.synthetic:
        raise DataError(f"experiment {exp.name} needs the synthetic cohort '{exp.cohort}'; "
                        "add it to sampling.strategies (or tradeoffs) and run notebook 03")
    pool = data.synthetic.get(exp.cohort)
    synth = real.iloc[:0]
    if recipe.synthetic == "all_replicas":
        synth = pool[pool["replica"] < exp.k]
    elif recipe.synthetic == "internal_real":
        synth = _internal_real_images(exp, params, data)
    elif recipe.synthetic in ("replicas", "shuffled"):
        synth = _replicas_of(pool, real["image_id"], exp.k)
        missing = len(real) * exp.k - len(synth)
        if missing:
            raise DataError(
                f"experiment {exp.name}: {missing} of {len(real) * exp.k} images of the "
                f"'{exp.cohort}' cohort are missing (sampling.replicas "
                f"{params.sampling.replicas}); generate more (notebook 03) or lower the k "
                "values in experiments")
        if recipe.synthetic == "shuffled":
            synth = shuffled_labels(synth, exp.seed)
    elif recipe.synthetic == "rebalanced":
        pool = pool[pool["patient_id"].isin(set(real["patient_id"]))]
        need = len(real) * exp.k
        if len(pool) < need:
            raise DataError(
                f"experiment {exp.name}: needs {need} rebalanced images of its real "
                f"patients but the rebalance cohort has {len(pool)}; raise "
                "sampling.rebalance.n_images or lower experiments.rebalance_k")
        synth = pool.iloc[:need]  # the cohort is a seeded weighted draw: its head is one
    if recipe.real_copies:
        real = pd.concat([real] * (1 + exp.k), ignore_index=True)
    if not recipe.keep_real:
        real = real.iloc[:0]
    # The external control's added rows are real internal images: "added" like synthetic
    # ones (counted as the supplement), but read from the real cache.
    added = "added_real" if recipe.synthetic == "internal_real" else "synthetic"
    return pd.concat([real.assign(source="real"), synth.assign(source=added)],
                     ignore_index=True)


def experiment_validation(exp: Experiment, params: Params,
                          manifest: pd.DataFrame) -> pd.DataFrame:
    """Where an experiment early-stops: its own training site's validation split for an arm
    trained on an external site, else the real internal validation rows."""
    if not exp.kind.external:
        return validation_rows(params, manifest)
    val = split_rows(manifest, [exp.train_site], "val").reset_index(drop=True)
    if val.empty:
        raise DataError(f"experiment {exp.name} early-stops on site '{exp.train_site}''s own "
                        "validation split, which is empty; give that site a 'val' fraction in "
                        "data.sites[].split.fractions")
    return val


def check_grid_leakage(training: dict[str, pd.DataFrame], manifest: pd.DataFrame) -> None:
    """Fail loudly if a validation or test patient appears in any training set of the grid
    (synthetic rows carry their source's patient id, so copies of a patient count too)."""
    held_out = manifest[manifest["split"].isin(["val", "test"])]
    held = dict(zip(held_out["patient_id"], held_out["split"], strict=False))
    problems = []
    for name, rows in training.items():
        bad = sorted(set(rows["patient_id"]) & set(held))
        if bad:
            problems.append(f"{name}: {len(bad)} patient(s) from val/test, e.g. "
                            f"{[(p, held[p]) for p in bad[:3]]}")
        not_train = rows.loc[rows["source"] == "real", "split"].ne("train")
        if not_train.any():
            problems.append(f"{name}: {int(not_train.sum())} real row(s) not from a train split")
    if problems:
        raise LeakageError("held-out patients leak into training sets:\n  " +
                           "\n  ".join(problems))


def _config(exp: Experiment, params: Params, train: pd.DataFrame) -> dict:
    real = train["source"] == "real"
    return {**exp.record(), "classifier": params.classifier.model_dump(),
            "protocol": params.classifier.protocol,
            "n_real": int(real.sum()), "n_synthetic": int((~real).sum()),
            "n_unique_real": int(train.loc[real, "image_id"].nunique()),
            "n_patients": int(train["patient_id"].nunique())}


def passes_per_real_image(images_seen: int, n_real: int, n_total: int,
                          n_unique_real: int) -> float:
    """How often each distinct real image was drawn: batches draw uniformly from the training
    rows, so real draws are ``images_seen * n_real / n_total``, shared by the distinct ones."""
    if n_unique_real == 0 or n_total == 0:
        return 0.0
    return images_seen * n_real / n_total / n_unique_real


def run_experiment(exp: Experiment, params: Params, data: GridData, train: pd.DataFrame,
                   run: RunLayout, reuse: tuple[Path, ...] = (),
                   progress: bool = False, resumable: bool = False) -> pd.DataFrame:
    """Train (or reuse) one experiment's classifier and write its predictions on every test
    set; returns the predictions. Only the main process writes files. ``resumable`` keeps
    each training's state after every round and continues from it (a cluster job that was
    preempted: :func:`train_arm`)."""
    out = run.experiment(exp.name, exp.seed)
    val = experiment_validation(exp, params, data.manifest)
    started = time.perf_counter()
    pretrain: TrainResult | None = None
    fit = train  # the rows the (last) training phase fits
    if exp.kind.recipe.pretrain:
        # phase 1 on the synthetic rows alone, phase 2 fine-tunes its kept weights on the real
        # rows; each early-stops on the same validation rows
        pretrain = train_or_load(params.classifier, train[train["source"] == "synthetic"], val,
                                 data.combined_cache(), out.pretrain_model, exp.seed, progress,
                                 resumable=resumable)
        fit = train[train["source"] == "real"]
    cache = data.combined_cache() if (fit["source"] == "synthetic").any() else data.cache
    result: TrainResult = train_or_load(params.classifier, fit, val, cache, out.model,
                                        exp.seed, progress, reuse,
                                        init=pretrain.model if pretrain else None,
                                        resumable=resumable)
    seconds = time.perf_counter() - started
    preds = pd.concat([predictions_frame(rows, predict(result.model, rows, data.cache), name)
                       for name, rows in test_sets(params, data.manifest).items()],
                      ignore_index=True)
    preds.insert(0, "experiment", exp.name)
    preds.insert(1, "seed", exp.seed)
    config = _config(exp, params, train)
    config.update({
        "best_epoch": result.best_epoch, "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        # Under protocol converged an arm that ran its whole budget never early-stopped.
        "converged": (result.stopped_early if params.classifier.protocol == "converged"
                      else None),
        "optimizer_steps": result.steps, "best_step": result.best_step,
        "images_seen": result.images_seen,
        "passes_per_real_image": round(passes_per_real_image(
            result.images_seen, config["n_real"], len(fit), config["n_unique_real"]), 2),
        "validation_site": str(val["site"].iloc[0]), "train_seconds": round(seconds, 1),
        "precision": result.precision})
    history = result.history
    if pretrain is not None:
        # the arm's compute is both phases': steps count on from the pretraining's end
        config.update({
            "converged": config["converged"] and pretrain.stopped_early,
            "optimizer_steps": pretrain.steps + result.steps,
            "best_step": pretrain.steps + result.best_step,
            "images_seen": pretrain.images_seen + result.images_seen,
            "pretrain_steps": pretrain.steps, "pretrain_best_step": pretrain.best_step})
        history = pd.concat([pretrain.history.assign(phase="pretrain"),
                             history.assign(phase="fine-tune",
                                            epoch=history["epoch"] + len(pretrain.history),
                                            step=history["step"] + pretrain.steps)],
                            ignore_index=True)

    def write() -> None:
        atomic_write_text(out.config, json.dumps(config, indent=1))
        with atomic_path(out.history) as tmp:
            history.assign(experiment=exp.name, seed=exp.seed).to_csv(tmp, index=False)
        atomic_write_parquet(preds, out.predictions)  # last: marks it done

    on_main(write)
    return preds


def training_sets(params: Params, data: GridData) -> dict[Experiment, pd.DataFrame]:
    """The training rows of every experiment of the grid, checked for leakage (an error
    before anything trains)."""
    training = {e: training_set(e, params, data) for e in plan_grid(params)}
    check_grid_leakage({f"{e.name} seed {e.seed}": rows for e, rows in training.items()},
                       data.manifest)
    return training


def grid_overview(training: dict[Experiment, pd.DataFrame]) -> pd.DataFrame:
    """One row per experiment (first seed): recipe and training-set size."""
    rows, seen = [], set()
    for exp, train in training.items():
        if exp.name in seen:
            continue
        seen.add(exp.name)
        n_real = int((train["source"] == "real").sum())
        n_syn = len(train) - n_real
        rows.append({"experiment": exp.name, "kind": exp.kind.value, "k": exp.k,
                     "real fraction": exp.real_fraction, "trained on": exp.train_site,
                     "real images": n_real, "synthetic images": n_syn,
                     "patients": train["patient_id"].nunique(),
                     "seeds": sum(e.name == exp.name for e in training)})
    return pd.DataFrame(rows).set_index("experiment")


def run_grid(params: Params, data: GridData, run: RunLayout,
             training: dict[Experiment, pd.DataFrame] | None = None,
             progress: bool = True) -> pd.DataFrame:
    """Run every experiment of the grid that has no predictions yet (resumable), after the
    leakage check over all of them; returns :func:`grid_results`. The real-only model at 100%
    is notebook 03's judge when that has been trained (same rows and seed), not trained again."""
    training = training if training is not None else training_sets(params, data)
    todo = [e for e in training
            if not run.experiment(e.name, e.seed).predictions.exists()]
    cluster = active_cluster()
    if cluster is not None:
        _run_on_cluster(todo, params, run, cluster)
        return grid_results(run, settings=True)
    bar = tqdm(todo, desc=f"experiment grid ({len(training) - len(todo)} of {len(training)} "
               "done before)", disable=not (progress and is_main_process()))
    workers = min(params.experiments.workers, len(todo))
    if workers > 1:
        _run_in_processes(todo, training, params, data, run, workers, bar)
        return grid_results(run, settings=True)
    for exp in bar:
        bar.set_postfix_str(f"{exp.name} seed {exp.seed}")
        run_experiment(exp, params, data, training[exp], run, _judge_reuse(exp, run))
    return grid_results(run, settings=True)


GRID_STAGE = "04_classifier_experiments"


def arm_key(exp: Experiment) -> str:
    """How the cluster's record and messages name an arm."""
    return f"arm {exp.name} seed {exp.seed}"


def train_arm(params: Params, exp: Experiment, threads: int | None = None,
              progress: bool = False) -> None:
    """Train one arm of the grid from the run folder alone, as :func:`run_grid` does in
    process: the piece a cluster job runs and ``cxrlib run-arm``. Resumable after every
    round, so a preempted job continues where it stopped."""
    if threads:
        torch.set_num_threads(threads)
    run = RunLayout.open(params, create=False)
    data = grid_data(params, run)
    run_experiment(exp, params, data, training_set(exp, params, data), run,
                   _judge_reuse(exp, run), progress=progress, resumable=True)


def _run_on_cluster(todo: list[Experiment], params: Params, run: RunLayout,
                    cluster: ClusterSpec) -> None:
    """The arms still to train as a SLURM job array, one arm per task
    (:func:`cxrlib.cluster.slurm.run_pieces`), ``cpus_per_task`` torch threads each."""
    from cxrlib.cluster.slurm import Piece, run_pieces

    pieces = [Piece(arm_key(e), run.experiment(e.name, e.seed).root.relative_to(
        run.root).as_posix(), partial(train_arm, params, e, cluster.grid.cpus_per_task))
        for e in todo]
    run_pieces(pieces, cluster, cluster.grid, run, GRID_STAGE,
               desc=f"experiment grid on SLURM ({len(todo)} arms)")


def _judge_reuse(exp: Experiment, run: RunLayout) -> tuple[Path, ...]:
    """Real only at 100% is notebook 03's judge (same rows and seed): reuse it if trained."""
    return (run.judge,) if exp.kind is Kind.REAL_ONLY and exp.real_fraction == 1.0 else ()


#: A grid worker process's share of the run (set once per process by :func:`_start_worker`).
_WORKER: dict = {}


def _start_worker(params: Params, data: GridData, run: RunLayout, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(params=params, data=data, run=run)


def _worker_experiment(exp: Experiment, train: pd.DataFrame) -> None:
    w = _WORKER
    run_experiment(exp, w["params"], w["data"], train, w["run"], _judge_reuse(exp, w["run"]))


def _run_in_processes(todo: list[Experiment], training: dict[Experiment, pd.DataFrame],
                      params: Params, data: GridData, run: RunLayout, workers: int,
                      bar) -> None:
    """``experiments.workers`` arms at a time, each in a spawned process with an equal share
    of the torch threads; every arm writes its own folder exactly as in-process (predictions
    last), so an interrupted grid resumes the same way. The caches pickle without images."""
    if process_state().num_processes > 1:
        raise ValueError("experiments.workers > 1 runs arms in processes of its own; under "
                         "accelerate launch each arm already spans the launched processes: "
                         "set experiments.workers: 1")
    threads = max(1, torch.get_num_threads() // workers)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_start_worker,
                             initargs=(params, data, run, threads)) as pool:
        running = {pool.submit(_worker_experiment, e, training[e]): e for e in todo}
        bar.set_postfix_str(f"{workers} at a time, {threads} thread(s) each")
        try:
            for done in as_completed(running):
                exp = running[done]
                try:
                    done.result()
                except Exception as err:
                    raise RuntimeError(f"experiment {exp.name} seed {exp.seed} failed in its "
                                       f"worker process: {err}") from err
                bar.update(1)
                bar.set_postfix_str(f"{exp.name} seed {exp.seed} done")
        finally:
            for future in running:
                future.cancel()
