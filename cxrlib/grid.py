"""The experiment grid as data: recipe names, baselines, and the files each experiment leaves.

No torch here, so the statistics stage (notebook 05) reads a finished grid without importing
the training stack. :mod:`cxrlib.experiments` builds the training sets and trains the grid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cxrlib.config import Params


@dataclass(frozen=True)
class Experiment:
    """One training-set recipe of the grid at one seed, and the experiment it is compared
    with (its ``baseline``: the real-only model at the same fraction and seed, or the
    external site's real data alone)."""

    name: str
    kind: str
    k: int
    real_fraction: float
    train_site: str
    seed: int

    @property
    def baseline(self) -> str:
        return baseline_name(self.kind, self.real_fraction, self.train_site)

    @property
    def folder(self) -> str:
        return f"{self.name}/seed-{self.seed}"


def fraction_tag(fraction: float) -> str:
    """``0.25`` -> ``f25`` (the suffix of an experiment name)."""
    return f"f{round(100 * fraction)}"


#: Kinds trained on an external site's own training split (their baseline: that site alone).
EXTERNAL_KINDS: frozenset[str] = frozenset({"external_only", "external_plus_synthetic"})


def baseline_name(kind: str, real_fraction: float, train_site: str) -> str:
    """The experiment a recipe is compared with, rendered from the recipe (never parsed from
    a name): the real-only model at the same real fraction, or, for the external kinds, the
    external site's real training data alone."""
    if kind in EXTERNAL_KINDS:
        return f"{train_site}_only"
    return f"real_only.{fraction_tag(real_fraction)}"


def plan_grid(params: Params) -> list[Experiment]:
    """Every experiment x seed of ``params.experiments``, baselines first."""
    grid, internal = params.experiments, "+".join(params.internal_sites())
    recipes: list[tuple[str, str, int, float, str]] = []
    for f in grid.real_fractions:
        tag = fraction_tag(f)
        recipes.append((baseline_name("real_only", f, internal), "real_only", 0, f, internal))
        for kind, ks in (("real_plus_synthetic", grid.supplement_k),
                         ("real_repeated", grid.repeated_k),
                         ("real_plus_shuffled", grid.shuffled_k),
                         ("synthetic_only", grid.synthetic_only_k),
                         ("real_plus_rebalanced", [grid.rebalance_k] if grid.rebalance_k else [])):
            recipes += [(f"{kind}_x{k}.{tag}", kind, k, f, internal) for k in ks]
    for ext in grid.external:
        base = baseline_name("external_only", 1.0, ext.site)
        for k in sorted(ext.synthetic_k):
            name = base if k == 0 else f"{ext.site}_plus_synthetic_x{k}"
            kind = "external_only" if k == 0 else "external_plus_synthetic"
            recipes.append((name, kind, k, 1.0, ext.site))
    return [Experiment(name, kind, k, f, site, seed)
            for seed in grid.seeds for name, kind, k, f, site in recipes]


def load_predictions(folder: Path) -> pd.DataFrame:
    """Every finished experiment's per-image predictions under ``folder``, in one frame."""
    paths = sorted(folder.glob("*/seed-*/predictions.parquet"))
    if not paths:
        raise FileNotFoundError(f"no experiment predictions under {folder}; run notebook 04 "
                                "(classifier experiments) for this run first")
    return pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)


def load_histories(folder: Path) -> pd.DataFrame:
    """Every finished experiment's per-epoch history (train and validation loss)."""
    paths = sorted(folder.glob("*/seed-*/history.csv"))
    return pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)


def grid_results(folder: Path) -> pd.DataFrame:
    """One row per finished experiment and seed: its recipe, training-set sizes and epochs
    (AUROCs come from the statistics stage, on the predictions)."""
    rows = []
    for path in sorted(folder.glob("*/seed-*/predictions.parquet")):
        config = json.loads((path.parent / "config.json").read_text())
        rows.append({k: config.get(k) for k in (
            "name", "kind", "k", "real_fraction", "train_site", "seed", "n_real", "n_synthetic",
            "best_epoch", "epochs_run", "stopped_early", "optimizer_steps", "best_step",
            "images_seen", "train_seconds")})
    table = pd.DataFrame(rows).rename(columns={"name": "experiment"})
    if len(table):
        table["synthetic %"] = (100 * table["n_synthetic"] / table["n_real"].where(
            table["n_real"] > 0)).round(0)
    return table


def stopping_table(results: pd.DataFrame) -> pd.DataFrame:
    """Where each arm stopped, mean over seeds: optimizer steps run (the budget unless early
    stopping ended it), the step whose weights were kept, passes over its training set, and
    seconds. Arms that differ here differ in compute, not only in data."""
    frame = results.assign(
        passes=results["images_seen"] / (results["n_real"] + results["n_synthetic"]),
        stopped_early=results["stopped_early"].astype(float))
    cols = ["optimizer_steps", "best_step", "images_seen", "passes", "stopped_early",
            "train_seconds"]
    return (frame.groupby("experiment", sort=False)[cols].mean()
            .rename(columns={"stopped_early": "share stopped early",
                             "passes": "passes over its data"}).round(2))
