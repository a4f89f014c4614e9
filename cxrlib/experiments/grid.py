"""The experiment grid as data: the experiments of a run's plan and the files they leave.

No torch here, so the statistics stage (notebook 05) reads a finished grid without importing
the training stack. :mod:`cxrlib.experiments.runner` builds the training sets and trains the grid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd

from cxrlib.core.kinds import Kind
from cxrlib.core.layout import RunLayout
from cxrlib.core.schema import Params
from cxrlib.core.vocabulary import arm_labels, kind_labels, test_set_labels


@dataclass(frozen=True)
class Experiment:
    """One training-set recipe of the grid at one seed; its name and its ``baseline`` (the
    real-only model at the same fraction and seed, or the external site's real data alone)
    are rendered from the recipe."""

    kind: Kind
    k: int
    real_fraction: float
    train_site: str
    seed: int

    @property
    def name(self) -> str:
        return self.kind.experiment_name(self.k, self.real_fraction, self.train_site)

    @property
    def baseline(self) -> str:
        return self.kind.baseline_name(self.real_fraction, self.train_site)

    def record(self) -> dict:
        """The recipe as plain values (config.json, tables)."""
        return {"name": self.name, "kind": self.kind.value, "k": self.k,
                "real_fraction": self.real_fraction, "train_site": self.train_site,
                "seed": self.seed}


def plan_grid(params: Params) -> list[Experiment]:
    """Every experiment x seed of ``params.experiments``, baselines first."""
    grid, internal = params.experiments, "+".join(params.internal_sites())
    recipes: list[tuple[Kind, int, float, str]] = []
    for f in grid.real_fractions:
        recipes.append((Kind.REAL_ONLY, 0, f, internal))
        if f not in grid.supplemented:
            continue
        for kind, ks in grid.internal_arms:
            recipes += [(kind, k, f, internal) for k in ks]
    for ext in grid.external:
        for k in sorted(ext.synthetic_k):
            kind = Kind.EXTERNAL_ONLY if k == 0 else Kind.EXTERNAL_PLUS_SYNTHETIC
            recipes.append((kind, k, 1.0, ext.site))
        recipes += [(Kind.EXTERNAL_PLUS_REAL, k, 1.0, ext.site) for k in sorted(ext.real_k)]
    return [Experiment(kind, k, f, site, seed)
            for seed in grid.seeds for kind, k, f, site in recipes]


def load_predictions(run: RunLayout) -> pd.DataFrame:
    """Every finished experiment's per-image predictions, in one frame."""
    done = run.finished_experiments()
    if not done:
        raise FileNotFoundError(f"no experiment predictions under {run.experiments}; run "
                                "notebook 04 (classifier experiments) for this run first")
    return pd.concat([pd.read_parquet(e.predictions) for e in done], ignore_index=True)


def load_histories(run: RunLayout) -> pd.DataFrame:
    """Every finished experiment's per-round history (train and validation loss)."""
    return pd.concat([pd.read_csv(e.history) for e in run.finished_experiments()],
                     ignore_index=True)


def grid_results(run: RunLayout) -> pd.DataFrame:
    """One row per finished experiment and seed: its recipe, training-set sizes, steps,
    seconds and the precision it trained in (AUROCs come from the statistics stage, on the
    predictions)."""
    rows = []
    for done in run.finished_experiments():
        config = json.loads(done.config.read_text())
        rows.append({k: config.get(k) for k in (
            "name", "kind", "k", "real_fraction", "train_site", "seed", "n_real", "n_synthetic",
            "n_unique_real", "protocol", "best_epoch", "epochs_run", "stopped_early",
            "converged", "optimizer_steps", "best_step", "images_seen",
            "passes_per_real_image", "validation_site", "train_seconds", "precision",
            "pretrain_steps", "pretrain_best_step")})
    table = pd.DataFrame(rows).rename(columns={"name": "experiment"})
    if len(table):
        table["synthetic %"] = (100 * table["n_synthetic"] / table["n_real"].where(
            table["n_real"] > 0)).round(0)
    return table


def grid_labels(params: Params) -> dict[str, str]:
    """Every name a page of this run shows for people: each planned experiment's label, each
    test set's and each kind's (:mod:`cxrlib.core.vocabulary`)."""
    planned = pd.DataFrame([e.record() for e in plan_grid(params)]).rename(
        columns={"name": "experiment"})
    return {**kind_labels(), **arm_labels(planned, params), **test_set_labels(params)}
