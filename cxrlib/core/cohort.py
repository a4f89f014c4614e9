"""Which rows: every selection of manifest rows the study makes, and the subgroups it reports.

The diffusion model's training rows, the rows that get synthetic replicas, each experiment's
real subset, the validation and test rows and the subgroup columns and age bands are defined
here once, so the diffusion model, the synthetic cohorts, the classifier grid and the
statistics cannot disagree on them. Every draw is seeded from the run's parameters, so a run
selects the same rows every time. Only numpy and pandas: the statistics use this module
without loading the training stack.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import get_args

import numpy as np
import pandas as pd

from cxrlib.core.schema import Params, Subgroup

#: Image attributes that subgroups are defined on; predictions carry them, so subgroup
#: statistics need no manifest.
SUBGROUP_COLUMNS: tuple[str, ...] = ("sex", "age", "race", "view")
#: The subgroup attributes of the analysis: the columns above, age grouped into bands.
SUBGROUPS: tuple[str, ...] = get_args(Subgroup)
AGE_BANDS: tuple[str, ...] = ("<40", "40-59", "60-79", "80+")
#: The band of a missing age where a grouping must place every row (rebalancing).
AGE_UNKNOWN = "unknown"


class CohortError(ValueError):
    """The manifest has no rows for a selection the parameters ask for; the message says why."""


def age_band(age: pd.Series | np.ndarray | Sequence[float]) -> pd.Series:
    """Age bands "<40", "40-59", "60-79", "80+" (ordered categorical; NaN where age is unknown)."""
    years = pd.to_numeric(pd.Series(age), errors="coerce")
    return pd.cut(years, [-np.inf, 40, 60, 80, np.inf], right=False, labels=list(AGE_BANDS))


def patient_subset(rows: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """Rows of a seeded draw of ``fraction`` of the patients (at least one), whole patients
    only. Draws are nested: for one seed, the patients of a smaller fraction are always among
    those of a larger one, so a 10% real subset lies inside the 25% that got synthetic images.
    """
    if fraction >= 1.0:
        return rows.reset_index(drop=True)
    patients = np.array(sorted(rows["patient_id"].unique()))
    order = np.random.default_rng([seed, 104729]).permutation(len(patients))
    keep = set(patients[order[: max(1, round(fraction * len(patients)))]])
    return rows[rows["patient_id"].isin(keep)].reset_index(drop=True)


def split_rows(manifest: pd.DataFrame, sites: list[str], split: str) -> pd.DataFrame:
    """Rows of one split (train, val, test) of the given sites, in manifest order."""
    return manifest[manifest["site"].isin(sites) & (manifest["split"] == split)]


def internal_rows(params: Params, manifest: pd.DataFrame) -> pd.DataFrame:
    """Manifest rows of the internal site(s), every split."""
    return manifest[manifest["site"].isin(params.internal_sites())]


def training_rows(params: Params, manifest: pd.DataFrame) -> pd.DataFrame:
    """The training split of the diffusion model's sites (``diffusion.sites``, by default the
    internal ones): the rows synthetic images are made from (:func:`source_rows`) and, with
    ``diffusion.train_on: all``, the rows the diffusion model learns from."""
    sites = params.diffusion.sites or params.internal_sites()
    unknown = sorted(set(sites) - set(manifest["site"]))
    if unknown:
        raise CohortError(f"diffusion.sites names site(s) {unknown} that the manifest does "
                          f"not have (sites: {sorted(manifest['site'].unique())})")
    rows = split_rows(manifest, sites, "train")
    if rows.empty:
        raise CohortError(f"the manifest has no training rows for site(s) {sites}; check "
                          "data.sites[].split fractions, or run notebook 01 again")
    return rows.reset_index(drop=True)


def source_rows(params: Params, manifest: pd.DataFrame) -> pd.DataFrame:
    """The training rows synthetic images are made from: all of :func:`training_rows`, or a
    seeded draw of ``sampling.source_fraction`` of their patients."""
    return patient_subset(training_rows(params, manifest), params.sampling.source_fraction,
                          params.run.seed)


def diffusion_rows(params: Params, manifest: pd.DataFrame) -> pd.DataFrame:
    """The rows the diffusion model learns from (``diffusion.train_on``): all of
    :func:`training_rows`, or only the :func:`source_rows`, so that the generator learns
    from the patients it makes images for and no others."""
    if params.diffusion.train_on == "sources":
        return source_rows(params, manifest)
    return training_rows(params, manifest)


def real_subset(params: Params, manifest: pd.DataFrame, fraction: float, seed: int,
                beyond_sources: bool = False) -> pd.DataFrame:
    """The real training rows of an internal experiment at one training seed: a seeded draw
    of ``fraction`` of the internal training patients, made inside the rows that have
    synthetic replicas (:func:`source_rows`, ``sampling.source_fraction``).
    Each training seed draws its own subset, because the draw is part of a recipe's
    variance; for one seed, smaller fractions lie inside larger ones.

    ``beyond_sources`` (real-only arms, which need no replicas) lets ``fraction`` exceed the
    source fraction: all source patients, then a seeded nested draw of the other training
    patients, so the learning curve can reach past the rows that have synthetic images."""
    sources = source_rows(params, manifest)
    share = fraction / params.sampling.source_fraction
    draw = params.run.seed + 7919 * (seed + 1)
    if share <= 1 + 1e-9:
        return patient_subset(sources, min(share, 1.0), draw)
    if not beyond_sources:
        raise CohortError(f"experiments.real_fractions has {fraction} but only "
                          f"sampling.source_fraction {params.sampling.source_fraction} of the "
                          "training patients have synthetic replicas; run the arms with extra "
                          "images at fractions no larger than the source fraction "
                          "(experiments.supplement_fractions), or generate more")
    train = training_rows(params, manifest)
    rest = train[~train["patient_id"].isin(set(sources["patient_id"]))]
    more = (fraction - params.sampling.source_fraction) / (1 - params.sampling.source_fraction)
    return pd.concat([sources, patient_subset(rest, more, draw)], ignore_index=True)


def validation_rows(params: Params, manifest: pd.DataFrame) -> pd.DataFrame:
    """Real internal validation rows: the one validation set of every experiment."""
    return split_rows(manifest, params.internal_sites(), "val").reset_index(drop=True)


def _held_out_name(site: str, role: str) -> str:
    return f"{site} ({role})"


def test_sets(params: Params, manifest: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """``{"<site> (internal|external)": test rows}`` for every site with a test split."""
    out = {}
    for site in params.data.sites:
        rows = split_rows(manifest, [site.site], "test")
        if len(rows):
            out[_held_out_name(site.site, site.role)] = rows.reset_index(drop=True)
    return out


def headline_test_set(params: Params) -> str:
    """The name :func:`test_sets` gives the first internal site's test set: where the run's
    headline baseline is read."""
    return _held_out_name(params.internal_sites()[0], "internal")
