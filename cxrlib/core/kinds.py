"""The experiment kinds of the classifier grid, as data.

Each :class:`Kind` carries its training-set :class:`Recipe` (where its real rows come from,
which synthetic rows it adds), its baseline kind and its display label; an experiment's name
is rendered from (kind, k, real fraction, site) by :meth:`Kind.experiment_name` and never
parsed back. No imports beyond the standard library, so the schema (:mod:`cxrlib.core.schema`),
the grid, the statistics and the figures all share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

#: Synthetic cohorts whose images are fresh phantom renders of their source rows (a perfect
#: generator, :func:`cxrlib.synthetic.cohorts.oracle_source`), not the diffusion model's.
ORACLE_STRATEGIES: tuple[str, ...] = ("oracle", "oracle_smooth")


@dataclass(frozen=True)
class Recipe:
    """How a kind's training set is built (:func:`cxrlib.experiments.runner.training_set`).

    ``real``: the real rows it is built on, the seeded internal subset at the experiment's
    real fraction or the external site's whole training split; ``synthetic``: none, replicas
    0..k-1 of those rows, the same with their label vectors shuffled, replicas 0..k-1 of every
    source, or ``k`` times as many rebalanced images as real rows; ``keep_real``: whether the
    real rows are trained on (not for synthetic only); ``real_copies``: the real rows appear
    ``1 + k`` times (the repeated-data control); ``internal_real`` adds as many internal real
    training images as ``all_replicas`` would add synthetic ones (the external-site control).
    ``cohort`` is the synthetic cohort (``sampling.strategies``) the synthetic rows come from:
    the diffusion model's ``replicas`` or the phantom renderer's ``oracle`` / ``oracle_smooth``.
    ``pretrain``: the synthetic rows are a first training phase of their own and the real rows
    fine-tune its kept weights (:func:`cxrlib.experiments.runner.run_experiment`), not one mixed
    set.
    """

    real: Literal["internal", "external"]
    synthetic: Literal["none", "replicas", "shuffled", "all_replicas", "rebalanced",
                       "internal_real"]
    keep_real: bool = True
    real_copies: bool = False
    cohort: Literal["replicas", "rebalance", "oracle", "oracle_smooth"] = "replicas"
    pretrain: bool = False


class Kind(StrEnum):
    """One training-set recipe of the grid; its value is what config.json and tables hold."""

    REAL_ONLY = "real_only"
    REAL_PLUS_SYNTHETIC = "real_plus_synthetic"
    REAL_REPEATED = "real_repeated"
    REAL_PLUS_SHUFFLED = "real_plus_shuffled"
    SYNTHETIC_ONLY = "synthetic_only"
    REAL_PLUS_REBALANCED = "real_plus_rebalanced"
    EXTERNAL_ONLY = "external_only"
    EXTERNAL_PLUS_SYNTHETIC = "external_plus_synthetic"
    REAL_PLUS_ORACLE = "real_plus_oracle"
    ORACLE_ONLY = "oracle_only"
    REAL_PLUS_ORACLE_SMOOTH = "real_plus_oracle_smooth"
    EXTERNAL_PLUS_REAL = "external_plus_real"
    SYNTHETIC_PRETRAIN = "synthetic_pretrain"

    @property
    def recipe(self) -> Recipe:
        return _RECIPES[self]

    @property
    def external(self) -> bool:
        """Trained on an external site's own training split (not the internal subset)."""
        return self.recipe.real == "external"

    @property
    def baseline(self) -> Kind:
        """The kind it is compared with: real only at the same fraction and seed, or the
        external site's real data alone."""
        return Kind.EXTERNAL_ONLY if self.external else Kind.REAL_ONLY

    @property
    def label(self) -> str:
        """How figures and prose name it."""
        return _LABELS[self]

    @property
    def description(self) -> str:
        """What its training set is, for the generated findings."""
        return _DESCRIPTIONS[self]

    @property
    def control(self) -> bool:
        """A manipulation check, not a hypothesis: an arm whose outcome is known in advance
        (the same rows repeated, labels shuffled, a perfect generator, more real images), so
        it tests the instrument and stays outside the Holm family of the hypotheses."""
        return self in _CONTROLS

    def experiment_name(self, k: int, real_fraction: float, site: str) -> str:
        """The experiment's name: ``real_only.f20``, ``real_plus_synthetic_x2.f20``,
        ``nih_only``, ``nih_plus_synthetic_x2``."""
        if self is Kind.EXTERNAL_ONLY:
            return f"{site}_only"
        if self is Kind.EXTERNAL_PLUS_SYNTHETIC:
            return f"{site}_plus_synthetic_x{k}"
        if self is Kind.EXTERNAL_PLUS_REAL:
            return f"{site}_plus_real_x{k}"
        tag = fraction_tag(real_fraction)
        return f"{self.value}.{tag}" if self is Kind.REAL_ONLY else f"{self.value}_x{k}.{tag}"

    def baseline_name(self, real_fraction: float, site: str) -> str:
        """The name of the experiment this one is compared with (same fraction or site)."""
        return self.baseline.experiment_name(0, real_fraction, site)


@dataclass(frozen=True, order=True)
class GeneratorSetting:
    """A generator other than the run's own, for the worth curves (``tradeoffs``): the EMA
    weights of the diffusion checkpoint at ``step`` sampled at guidance ``w``, with the run's
    sampler. Its cohort (:meth:`cohort`) plans the same rows and seeds as the run's own
    replicas, so images of two settings differ only in the setting."""

    step: int
    guidance: float

    @property
    def tag(self) -> str:
        """``step250-w1``: the suffix of its cohort's folder and its arms' names."""
        return f"step{self.step}-w{self.guidance:g}"

    @property
    def label(self) -> str:
        """How figures and prose name it."""
        return f"{self.step:,} steps, w {self.guidance:g}"

    def cohort(self, strategy: str = "replicas") -> str:
        """The key of its synthetic cohort (a folder of ``03_sampling_explorer/synthetic``)."""
        return f"{strategy}-{self.tag}"


def fraction_tag(fraction: float) -> str:
    """``0.25`` -> ``f25`` (the suffix of an internal experiment's name)."""
    return f"f{round(100 * fraction)}"


_RECIPES: dict[Kind, Recipe] = {
    Kind.REAL_ONLY: Recipe("internal", "none"),
    Kind.REAL_PLUS_SYNTHETIC: Recipe("internal", "replicas"),
    Kind.REAL_REPEATED: Recipe("internal", "none", real_copies=True),
    Kind.REAL_PLUS_SHUFFLED: Recipe("internal", "shuffled"),
    Kind.SYNTHETIC_ONLY: Recipe("internal", "replicas", keep_real=False),
    Kind.REAL_PLUS_REBALANCED: Recipe("internal", "rebalanced", cohort="rebalance"),
    Kind.EXTERNAL_ONLY: Recipe("external", "none"),
    Kind.EXTERNAL_PLUS_SYNTHETIC: Recipe("external", "all_replicas"),
    Kind.REAL_PLUS_ORACLE: Recipe("internal", "replicas", cohort="oracle"),
    Kind.ORACLE_ONLY: Recipe("internal", "replicas", keep_real=False, cohort="oracle"),
    Kind.REAL_PLUS_ORACLE_SMOOTH: Recipe("internal", "replicas", cohort="oracle_smooth"),
    Kind.EXTERNAL_PLUS_REAL: Recipe("external", "internal_real"),
    Kind.SYNTHETIC_PRETRAIN: Recipe("internal", "replicas", pretrain=True),
}
_CONTROLS = frozenset({Kind.REAL_REPEATED, Kind.REAL_PLUS_SHUFFLED, Kind.REAL_PLUS_ORACLE,
                       Kind.ORACLE_ONLY, Kind.REAL_PLUS_ORACLE_SMOOTH, Kind.EXTERNAL_PLUS_REAL})
_LABELS: dict[Kind, str] = {
    Kind.REAL_ONLY: "real only",
    Kind.REAL_PLUS_SYNTHETIC: "real + synthetic",
    Kind.REAL_REPEATED: "control: real, repeated",
    Kind.REAL_PLUS_SHUFFLED: "control: real + shuffled-label synthetic",
    Kind.SYNTHETIC_ONLY: "synthetic only",
    Kind.REAL_PLUS_REBALANCED: "real + rebalanced",
    Kind.EXTERNAL_ONLY: "external site only",
    Kind.EXTERNAL_PLUS_SYNTHETIC: "external site + synthetic",
    Kind.REAL_PLUS_ORACLE: "control: real + perfect generator",
    Kind.ORACLE_ONLY: "control: perfect generator only",
    Kind.REAL_PLUS_ORACLE_SMOOTH: "control: real + perfect generator without detector noise",
    Kind.EXTERNAL_PLUS_REAL: "control: external site + internal real",
    Kind.SYNTHETIC_PRETRAIN: "synthetic pretraining, real fine-tuning",
}
_DESCRIPTIONS: dict[Kind, str] = {
    Kind.REAL_ONLY: "the real rows alone",
    Kind.REAL_PLUS_SYNTHETIC: "the real rows and their synthetic replicas",
    Kind.REAL_REPEATED: "the real rows repeated to the same size",
    Kind.REAL_PLUS_SHUFFLED: "synthetic images with their labels shuffled",
    Kind.SYNTHETIC_ONLY: "synthetic training images only",
    Kind.REAL_PLUS_REBALANCED: "the real rows and rebalanced synthetic images",
    Kind.EXTERNAL_ONLY: "the external site's real training data alone",
    Kind.EXTERNAL_PLUS_SYNTHETIC: "the external site's real training data and internal "
                                  "synthetic replicas",
    Kind.REAL_PLUS_ORACLE: "the real rows and fresh phantom renders of them (a perfect "
                           "generator)",
    Kind.ORACLE_ONLY: "fresh phantom renders of the real rows only (a perfect generator)",
    Kind.REAL_PLUS_ORACLE_SMOOTH: "the real rows and fresh renders of them without detector "
                                  "noise and grain",
    Kind.EXTERNAL_PLUS_REAL: "the external site's real training data and as many internal real "
                             "images as the synthetic arm adds",
    Kind.SYNTHETIC_PRETRAIN: "pretraining on the real rows' synthetic replicas, then "
                             "fine-tuning on the real rows",
}
