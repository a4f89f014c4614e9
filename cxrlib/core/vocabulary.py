"""How reports name things: sites and test sets, where their images come from, experiment arms,
verdicts and numbers. One vocabulary for every table, figure and sentence a person reads.

Identifiers (``real_plus_synthetic_x2.f5``, ``chexpert (internal)``) stay what files and
``summary.json`` hold; pages show the labels made here from the recipe's parts (never by
parsing an identifier). No torch here.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from cxrlib.core.kinds import Kind
from cxrlib.core.schema import Params, SiteSpec

#: The real dataset whose metadata rows a phantom site renders, or that a reader reads.
DATASET_NAMES: dict[str, str] = {"chexpert": "CheXpert", "nih": "NIH ChestX-ray14",
                                 "padchest": "PadChest", "mimic": "MIMIC-CXR-JPG"}
#: One colour per arm kind family, in every figure (seaborn's colour-blind palette).
KIND_COLOURS: dict[str, str] = {
    "real only": "#d55e00", "synthetic": "#0173b2", "perfect generator": "#cc78bc",
    "repeated": "#949494", "shuffled": "#ca9161", "external": "#029e73",
}


def site_label(site: SiteSpec) -> str:
    """``CheXpert-style phantoms`` for a phantom site, the dataset's name for a real one."""
    if site.reader == "phantom" and site.phantom is not None:
        return f"{DATASET_NAMES[site.phantom.metadata].split()[0]}-style phantoms"
    if site.reader in DATASET_NAMES:
        return DATASET_NAMES[site.reader]
    return site.site


def image_source(site: SiteSpec) -> str:
    """Where a site's images come from, in words a forwarded page keeps."""
    if site.reader == "phantom" and site.phantom is not None:
        name = DATASET_NAMES[site.phantom.metadata]
        return (f"procedural phantoms drawn from {name}'s label rows, not X-ray images")
    return f"{DATASET_NAMES.get(site.reader, site.reader)} images read from {site.root}"


def test_set_labels(params: Params) -> dict[str, str]:
    """``{"chexpert (internal)": "CheXpert-style phantoms (internal)", ...}``: each test set's
    identifier (:func:`cxrlib.core.cohort.test_sets`) and its label."""
    return {f"{s.site} ({s.role})": f"{site_label(s)} ({s.role})" for s in params.data.sites}


def site_labels(params: Params) -> dict[str, str]:
    """``{"nih": "NIH-style phantoms", ...}`` for every site of the run."""
    return {s.site: site_label(s) for s in params.data.sites}


def _pct(value: float) -> str:
    return f"{100 * value:.0f}%"


def arm_label(kind: Kind, k: int, real_fraction: float, site: str) -> str:
    """An arm named for people, from its recipe: ``5% real + 200% synthetic``, ``5% real
    only``, ``NIH-style phantoms only``. ``site`` is the training site's label."""
    real, dose = f"{_pct(real_fraction)} real", _pct(k)
    labels = {
        Kind.REAL_ONLY: f"{real} only",
        Kind.REAL_PLUS_SYNTHETIC: f"{real} + {dose} synthetic",
        Kind.REAL_REPEATED: f"{real}, repeated {k + 1}x",
        Kind.REAL_PLUS_SHUFFLED: f"{real} + {dose} shuffled-label synthetic",
        Kind.SYNTHETIC_ONLY: f"synthetic only ({dose} of {real})",
        Kind.REAL_PLUS_REBALANCED: f"{real} + {dose} rebalanced synthetic",
        Kind.EXTERNAL_ONLY: f"{site} only",
        Kind.EXTERNAL_PLUS_SYNTHETIC: f"{site} + synthetic ({k} per internal image)",
        Kind.REAL_PLUS_ORACLE: f"{real} + {dose} perfect generator",
        Kind.ORACLE_ONLY: f"perfect generator only ({dose} of {real})",
        Kind.REAL_PLUS_ORACLE_SMOOTH: f"{real} + {dose} perfect generator, no detector noise",
        Kind.EXTERNAL_PLUS_REAL: f"{site} + internal real images ({k} per image)",
        Kind.SYNTHETIC_PRETRAIN: f"{dose} synthetic pretraining, {real} fine-tuning",
    }
    return labels[kind]


def kind_labels() -> dict[str, str]:
    """Each experiment kind's value (``synthetic_only``, as tables and prose name a kind the
    grid lacks) -> its label."""
    return {kind.value: kind.label for kind in Kind}


def kind_colour(kind: Kind | str) -> str:
    """The one colour of an arm kind's family in every figure."""
    kind = Kind(kind)
    if kind in (Kind.REAL_ONLY, Kind.EXTERNAL_ONLY):
        return KIND_COLOURS["real only"]
    if kind in (Kind.REAL_PLUS_ORACLE, Kind.ORACLE_ONLY, Kind.REAL_PLUS_ORACLE_SMOOTH):
        return KIND_COLOURS["perfect generator"]
    if kind is Kind.REAL_REPEATED:
        return KIND_COLOURS["repeated"]
    if kind is Kind.REAL_PLUS_SHUFFLED:
        return KIND_COLOURS["shuffled"]
    if kind is Kind.EXTERNAL_PLUS_REAL:
        return KIND_COLOURS["external"]
    return KIND_COLOURS["synthetic"]


def arm_labels(grid: pd.DataFrame, params: Params) -> dict[str, str]:
    """Each experiment identifier of a grid table (columns experiment, kind, k,
    real_fraction, train_site; :func:`cxrlib.experiments.grid.grid_results`) -> its label."""
    sites = site_labels(params)
    internal = " + ".join(sites[s] for s in params.internal_sites())
    rows = grid.drop_duplicates("experiment")
    none = pd.Series(index=rows.index)  # a grid without other generator settings
    steps, guidance = rows.get("generator_step", none), rows.get("generator_guidance", none)
    return {r.experiment: arm_label(Kind(r.kind), int(r.k), float(r.real_fraction),
                                    sites.get(r.train_site, internal))
            + ("" if pd.isna(step) else f" ({int(step):,} steps, w {float(w):g})")
            for r, step, w in zip(rows.itertuples(index=False), steps, guidance, strict=True)}


#: One word set for every verdict a page shows: a comparison's, a claim's, a check's.
VERDICTS: dict[Any, str] = {
    "better": "better", "worse": "worse", "matches": "equivalent",
    "not shown equivalent": "inconclusive", "supported": "supported",
    "contradicted": "contradicted", "inconclusive": "inconclusive",
    "not tested in this run": "not tested", True: "held", False: "did not hold",
}


def verdict_word(value: Any) -> str:
    """The page's word for a verdict (a check's ``held`` True/False included)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "not judged"
    if isinstance(value, np.bool_):
        value = bool(value)
    return VERDICTS.get(value, str(value))


#: Columns of differences, shown with their sign (and their table's CI bounds with them).
DIFFERENCE_COLUMNS = ("delta", "slope_per_k", "did")
#: Columns shown as whole numbers, and p-values (``< 0.001`` below a thousandth).
COUNT_COLUMNS = ("n_seeds", "n_images", "n_real", "n_synthetic", "n_unique_real", "seeds",
                 "optimizer_steps", "best_step", "kept_step", "images_seen", "labels_used",
                 "family_size", "n", "n_groups", "positives", "claim")
P_COLUMNS = ("p", "p_holm", "p_equivalence", "p_floor")


def format_number(value: Any, column: str = "", signed: bool = False) -> str:
    """A cell as a page shows it: 3 decimals (with the sign where ``signed``: a difference),
    counts as integers, p-values as ``< 0.001``, booleans as yes/no, missing as a dash; text
    as it is."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return f"{value:,}"
    if isinstance(value, numbers.Real):
        if column in P_COLUMNS:
            return "< 0.001" if value < 0.001 else f"{value:.3f}"
        if column in COUNT_COLUMNS or float(value).is_integer() and abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:+.3f}" if signed else f"{value:.3f}"
    return str(value)


#: Bookkeeping columns a saved table keeps and a page leaves out (p_floor is 0 for analytic
#: p-values; a family is the Holm family the table's grouping already shows).
HIDDEN_COLUMNS = ("p_floor", "family")
#: Column headers for people.
HEADERS: dict[str, str] = {
    "experiment": "arm", "baseline": "compared with", "test_set": "test set",
    "delta": "difference", "ci_low": "CI low", "ci_high": "CI high",
    "mde": "detectable (MDE)", "mde_holm": "MDE at Holm", "p_holm": "p (Holm)",
    "n_seeds": "seeds", "macro_auroc": "macro AUROC", "baseline_auroc": "baseline AUROC",
    "auroc": "AUROC", "held": "held", "verdict": "verdict", "n_images": "images",
    "reference": "perfect generator", "reference_rate": "its r",
    "ratio": "share of its worth", "ratio_ci_low": "share CI low",
    "ratio_ci_high": "share CI high", "diff_ci_low": "difference CI low",
    "diff_ci_high": "difference CI high", "rate_ci_low": "r CI low",
    "rate_ci_high": "r CI high", "label": "finding",
    # the worth curves (notebook 06) and the generator settings' audit (notebook 03)
    "x": "point", "perfect_rate": "perfect generator's r", "perfect_ci_low": "its CI low",
    "perfect_ci_high": "its CI high", "seeds_for_target": "seeds to resolve 0.1",
    "rho": "Spearman rho", "n_settings": "settings", "picks_best": "ranks the best first",
    "step": "training steps", "guidance": "w", "fidelity_ratio": "fidelity (x real)",
    "fidelity_ci_low": "fidelity CI low", "fidelity_ci_high": "fidelity CI high",
    "fid": "FID", "kid": "KID", "frd": "FRD", "texture_hf_ratio": "texture (x real)",
    "detectability_auroc": "detectability AUROC", "memorized_share": "near-copies",
    "by": "attribute", "gain_ci_low": "gain CI low", "gain_ci_high": "gain CI high",
    "labels_used": "findings used",
}


def readable(table: pd.DataFrame, labels: Mapping[str, str]) -> pd.DataFrame:
    """A table as a page shows it: identifiers (arms, test sets) replaced by their labels,
    verdicts in the one word set, numbers formatted, headers for people, no index."""
    plain = table.index.name is None and table.index.dtype.kind in "iu"  # row numbers
    out = table.reset_index(drop=plain).drop(columns=list(HIDDEN_COLUMNS), errors="ignore")
    if not plain and "index" in out.columns and table.index.name is None:
        out = out.rename(columns={"index": ""})
    out = relabel(out, labels)
    for column in out.columns:
        if out[column].dtype.kind in "OTU" and column not in ID_COLUMNS:  # text columns
            out[column] = out[column].map(lambda v: with_labels(v, labels)
                                          if isinstance(v, str) else v)
    for column in ("verdict", "held", "control"):
        if column in out:
            out[column] = out[column].map(verdict_word)
    differences = [c for c in DIFFERENCE_COLUMNS if c in out]
    signed = {*differences, *(("ci_low", "ci_high") if differences else ())}
    for column in out.columns:
        if out[column].dtype.kind in "fiub":
            out[column] = [format_number(v, column, column in signed) for v in out[column]]
    return out.rename(columns=HEADERS)


#: Columns that hold identifiers a page shows as labels.
ID_COLUMNS = ("experiment", "baseline", "test_set", "chosen", "arm")


def relabel(table: pd.DataFrame, labels: Mapping[str, str]) -> pd.DataFrame:
    """A copy of ``table`` with its identifier columns (:data:`ID_COLUMNS`) shown as labels,
    for a figure's titles and legends; other columns as they are."""
    out = table.copy()
    for column in ID_COLUMNS:
        if column in out:
            out[column] = out[column].map(lambda v: labels.get(v, v) if isinstance(v, str)
                                          else v)
    return out


def with_labels(text: str, labels: Mapping[str, str]) -> str:
    """Generated prose with each identifier it names shown as its label (longest identifier
    first, so none is replaced inside another)."""
    for key in sorted(labels, key=len, reverse=True):
        text = text.replace(key, labels[key])
    return text
