"""The experiment grid as data: the experiments of a run's plan and the files they leave.

No torch here, so the statistics stage (notebook 05) reads a finished grid without importing
the training stack. :mod:`cxrlib.experiments.runner` builds the training sets and trains the grid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd

from cxrlib.core.kinds import GeneratorSetting, Kind
from cxrlib.core.layout import ExperimentFolder, RunLayout
from cxrlib.core.schema import Params
from cxrlib.core.vocabulary import arm_labels, kind_labels, test_set_labels


@dataclass(frozen=True)
class Experiment:
    """One training-set recipe of the grid at one seed; its name and its ``baseline`` (the
    real-only model at the same fraction and seed, or the external site's real data alone)
    are rendered from the recipe. ``generator`` (worth curves only) takes the synthetic rows
    from another generator setting's cohort than the run's own."""

    kind: Kind
    k: int
    real_fraction: float
    train_site: str
    seed: int
    generator: GeneratorSetting | None = None

    @property
    def name(self) -> str:
        return arm_name(self.kind, self.k, self.real_fraction, self.train_site, self.generator)

    @property
    def baseline(self) -> str:
        return self.kind.baseline_name(self.real_fraction, self.train_site)

    @property
    def cohort(self) -> str:
        """The synthetic cohort its synthetic rows come from."""
        strategy = self.kind.recipe.cohort
        return strategy if self.generator is None else self.generator.cohort(strategy)

    def record(self) -> dict:
        """The recipe as plain values (config.json, tables)."""
        g = self.generator
        return {"name": self.name, "kind": self.kind.value, "k": self.k,
                "real_fraction": self.real_fraction, "train_site": self.train_site,
                "seed": self.seed, "generator": g.tag if g else "",
                "generator_step": g.step if g else None,
                "generator_guidance": g.guidance if g else None}


def arm_name(kind: Kind, k: int, real_fraction: float, site: str,
             generator: GeneratorSetting | None = None) -> str:
    """An arm's name (:meth:`Kind.experiment_name`), with its generator setting's tag when it
    has one: ``real_plus_synthetic_x2.f5.step250-w1``."""
    name = kind.experiment_name(k, real_fraction, site)
    return name if generator is None else f"{name}.{generator.tag}"


def plan_grid(params: Params) -> list[Experiment]:
    """Every experiment x seed of ``params.experiments``, baselines first, then the arms of
    the worth curves (``params.tradeoffs``) that the grid does not already have."""
    grid, internal = params.experiments, "+".join(params.internal_sites())
    recipes: list[tuple[Kind, int, float, str, GeneratorSetting | None]] = []
    for f in grid.real_fractions:
        recipes.append((Kind.REAL_ONLY, 0, f, internal, None))
        if f not in grid.supplemented:
            continue
        for kind, ks in grid.internal_arms:
            recipes += [(kind, k, f, internal, None) for k in ks]
    for ext in grid.external:
        for k in sorted(ext.synthetic_k):
            kind = Kind.EXTERNAL_ONLY if k == 0 else Kind.EXTERNAL_PLUS_SYNTHETIC
            recipes.append((kind, k, 1.0, ext.site, None))
        recipes += [(Kind.EXTERNAL_PLUS_REAL, k, 1.0, ext.site, None)
                    for k in sorted(ext.real_k)]
    for point in (p for points in worth_axes(params).values() for p in points):
        for arm in (point.arm, point.perfect):
            if arm is not None and arm not in recipes:
                recipes.append(arm)
    return [Experiment(kind, k, f, site, seed, generator)
            for seed in grid.seeds for kind, k, f, site, generator in recipes]


#: The worth curves' axes (``tradeoffs``) and how figures name their x.
AXES: dict[str, str] = {"compute": "generator training steps", "guidance": "guidance w",
                        "dose": "synthetic images per real image (k)",
                        "size": "real training images (share of the training patients)"}

#: An arm of the grid without its seed: kind, k, real fraction, training site, generator.
ArmRecipe = tuple[Kind, int, float, str, "GeneratorSetting | None"]


@dataclass(frozen=True)
class CurvePoint:
    """One point of a worth curve: the generator's arm at ``x`` and, where the axis has one,
    the perfect generator's arm beside it; ``reference`` marks the run's own setting (the
    point every axis shares)."""

    axis: str
    x: float
    arm: ArmRecipe
    perfect: ArmRecipe | None
    reference: bool

    @property
    def experiment(self) -> str:
        return arm_name(*self.arm)

    @property
    def perfect_experiment(self) -> str | None:
        return None if self.perfect is None else arm_name(*self.perfect)


def worth_axes(params: Params) -> dict[str, list[CurvePoint]]:
    """The points of each axis of ``params.tradeoffs`` in x order (an axis with fewer than two
    points is left out): generator compute and guidance at ``real_fraction`` and ``k``, dose
    at ``real_fraction``, real-data size at ``k``; the perfect generator at the same dose and
    real fraction beside every point when ``sampling.strategies`` has ``oracle`` (on the
    compute and guidance axes one arm, the attainable worth those points are read against)."""
    t = params.tradeoffs
    if t is None:
        return {}
    ref, site = params.reference_generator(), "+".join(params.internal_sites())
    oracle = "oracle" in params.sampling.strategies

    def point(axis: str, x: float, k: int, f: float, setting: GeneratorSetting) -> CurvePoint:
        own = setting == ref
        arm = (Kind.REAL_PLUS_SYNTHETIC, k, f, site, None if own else setting)
        perfect = (Kind.REAL_PLUS_ORACLE, k, f, site, None) if oracle else None
        return CurvePoint(axis, x, arm, perfect, own and k == t.k and f == t.real_fraction)

    axes = {
        "compute": [point("compute", s, t.k, t.real_fraction, GeneratorSetting(s, ref.guidance))
                    for s in sorted(set(t.steps) | {ref.step})],
        "guidance": [point("guidance", w, t.k, t.real_fraction, GeneratorSetting(ref.step, w))
                     for w in sorted(set(t.guidance) | {ref.guidance})],
        "dose": [point("dose", k, k, t.real_fraction, ref)
                 for k in sorted(set(t.doses) | {t.k})],
        "size": [point("size", f, t.k, f, ref) for f in sorted(set(t.sizes) | {t.real_fraction})]}
    return {axis: points for axis, points in axes.items() if len(points) > 1}


def _finished(run: RunLayout, settings: bool) -> list[ExperimentFolder]:
    """The finished experiments; without ``settings``, only those of the run's own generator
    (the arms of other generator settings are the worth curves', notebook 06)."""
    done = run.finished_experiments()
    if settings:
        return done
    return [e for e in done if not json.loads(e.config.read_text()).get("generator")]


def load_predictions(run: RunLayout, settings: bool = False) -> pd.DataFrame:
    """Every finished experiment's per-image predictions, in one frame (``settings``: with
    the arms of other generator settings, :func:`_finished`)."""
    done = _finished(run, settings)
    if not done:
        raise FileNotFoundError(f"no experiment predictions under {run.experiments}; run "
                                "notebook 04 (classifier experiments) for this run first")
    return pd.concat([pd.read_parquet(e.predictions) for e in done], ignore_index=True)


def load_histories(run: RunLayout, settings: bool = False) -> pd.DataFrame:
    """Every finished experiment's per-round history (train and validation loss)."""
    return pd.concat([pd.read_csv(e.history) for e in _finished(run, settings)],
                     ignore_index=True)


def grid_results(run: RunLayout, settings: bool = False) -> pd.DataFrame:
    """One row per finished experiment and seed: its recipe, training-set sizes, steps,
    seconds and the precision it trained in (AUROCs come from the statistics stage, on the
    predictions); ``settings``: with the arms of other generator settings."""
    rows = []
    for done in _finished(run, settings):
        config = json.loads(done.config.read_text())
        rows.append({k: config.get(k) for k in (
            "name", "kind", "k", "real_fraction", "train_site", "seed", "n_real", "n_synthetic",
            "n_unique_real", "protocol", "best_epoch", "epochs_run", "stopped_early",
            "converged", "optimizer_steps", "best_step", "images_seen",
            "passes_per_real_image", "validation_site", "train_seconds", "precision",
            "pretrain_steps", "pretrain_best_step", "generator", "generator_step",
            "generator_guidance")})
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
