"""The paper's claims, answered from the analysis plan's comparisons.

Each claim of the abstract (:data:`CLAIMS`) names the comparison that tests it; :func:`claims_table`
gives its verdict on every test set (supported, contradicted, inconclusive, or not tested in this
run) from the comparison's CI and the equivalence margin, with the confounds the run could not
remove: arms that differ in compute or did not converge (:mod:`cxrlib.experiments.diagnostics`),
and a generator trained on the rows it supplements (distillation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from cxrlib.core.kinds import Kind
from cxrlib.core.schema import StatsSpec
from cxrlib.experiments.diagnostics import (
    KEPT_STEPS_DIFFER,
    NOT_CONVERGED,
    compute_table,
    training_flags,
)
from cxrlib.study.plan import experiment_info, primary_fraction


@dataclass(frozen=True)
class Claim:
    """One of the paper's claims and the comparisons of the grid that test it: every
    experiment of ``kind`` (at the primary fraction for internal kinds; k in ``ks`` unless
    None) against its baseline on every test set; ``test`` is what supports it, a gain
    (better) or an equivalence (TOST); ``confounds`` what the design cannot remove."""

    number: int
    statement: str
    kind: Kind
    ks: tuple[int, ...] | None
    test: Literal["gain", "equivalence"]
    confounds: tuple[str, ...]
    #: Test-set scopes the claim names (:func:`test_set_scope`); one without a row is
    #: reported as not tested.
    scopes: tuple[str, ...] = ()


#: The distillation confound, by what the generator learned from (``diffusion.train_on``).
DISTILLATION: dict[str, str] = {
    "all": "distillation: the generator was trained on all internal training patients, so "
           "synthetic images can carry information from patients outside the arm's real subset",
    "sources": "distillation, narrowed: the generator learned only from the source patients "
               "(diffusion.train_on: sources); an arm whose real subset is smaller than the "
               "source draw still gets images from a generator that saw the other source "
               "patients",
}


_DISTILLATION = "distillation"  # where CLAIMS name it; claims_table fills in the run's text


#: The paper's three claims (issue 18, item 7).
CLAIMS: tuple[Claim, ...] = (
    Claim(1, "synthetic supplementation improves performance internally and externally",
          Kind.REAL_PLUS_SYNTHETIC, None, "gain",
          (_DISTILLATION, "label coverage: replicas repeat their source rows' label "
                          "combinations, so no unseen combination is added"),
          scopes=("internal", "external")),
    Claim(2, "synthetic-only training matches real training at +200-300% (k = 2-3)",
          Kind.SYNTHETIC_ONLY, (2, 3), "equivalence",
          (_DISTILLATION, "the synthetic images are replicas of the same real rows, so the "
                          "arm is bounded by the generator's fidelity (the oracle_only check "
                          "shows what a perfect generator reaches)")),
    Claim(3, "an external site's data plus synthetic images beats the external site alone "
             "(the cross-site gain)",
          Kind.EXTERNAL_PLUS_SYNTHETIC, None, "gain",
          (_DISTILLATION, "label coverage: labels the external site does not annotate are "
                          "carried by the synthetic images only (the site's blank policy)",
           "internal-site data: the synthetic images add the internal site's style and "
           "patients, which external_plus_real controls for with real images")),
)


#: A claim's verdicts (:func:`claim_verdict`), and the one for a claim without its arms.
SUPPORTED = "supported"


CONTRADICTED = "contradicted"


INCONCLUSIVE = "inconclusive"


NOT_TESTED = "not tested in this run"


def claim_verdict(test: str, verdict: str, ci90_low: float, ci90_high: float,
                  margin: float) -> str:
    """supported / contradicted / inconclusive from a comparison's verdict. A gain: supported
    when better (Holm), contradicted when worse or shown equivalent (TOST: no gain as large as
    the margin), else inconclusive (the MDE says what could have been missed). An
    equivalence: supported when the 90% CI lies inside +/- margin or the arm is better,
    contradicted when worse beyond the margin, else inconclusive."""
    if test == "gain":
        if verdict.startswith("better"):
            return SUPPORTED
        return CONTRADICTED if verdict.startswith("worse") or verdict == "matches" \
            else INCONCLUSIVE
    if verdict.startswith("better") or -margin < ci90_low and ci90_high < margin:
        return SUPPORTED
    return CONTRADICTED if verdict == "worse" else INCONCLUSIVE


def test_set_scope(test_set: str) -> str:
    """internal or external, from the test set's name (:func:`cxrlib.core.cohort.test_sets` names
    them ``<site> (internal|external)``)."""
    return "external" if test_set.endswith("(external)") else "internal"


def _pair_confounds(grid: pd.DataFrame, row: dict) -> list[str]:
    """What differs between a compared pair's training beyond the data: the step-matched
    protocol (passes per real image), kept steps more than two-fold apart, arms that did not
    converge."""
    compute = compute_table(grid).set_index("experiment")
    arms = [row["experiment"], row["baseline"]]
    out = []
    protocols = set(compute.loc[arms, "protocol"].dropna())
    if not protocols:
        out.append("training protocol not recorded")
    elif "steps" in protocols:
        passes = compute.loc[arms, "passes_per_real_image"].astype(float)
        out.append(f"protocol steps: one step budget, so the arms see each real image "
                   f"{passes.iloc[0]:.1f} vs {passes.iloc[1]:.1f} times")
    flags = training_flags(grid, pd.DataFrame([row]))
    for flag in flags.to_dict("records"):
        if flag["flag"] == KEPT_STEPS_DIFFER:
            out.append(f"{KEPT_STEPS_DIFFER} ({flag['kept_step']:.0f} vs "
                       f"{flag['baseline_kept_step']:.0f})")
        elif flag["experiment"] in arms:
            out.append(f"{flag['experiment']} {NOT_CONVERGED} in {flag['seeds_not_converged']} "
                       f"of {flag['n_seeds']} seeds")
    return out


def claims_table(comparisons: pd.DataFrame, grid: pd.DataFrame, spec: StatsSpec,
                 exchange: pd.DataFrame | None = None,
                 train_on: Literal["all", "sources"] = "all") -> pd.DataFrame:
    """The paper's claims (:data:`CLAIMS`) answered by this run: one row per comparison that
    tests a claim (from :func:`compare_experiments`, Holm as there), or one row saying
    "not tested in this run" when the grid lacks its arms. Columns: claim, statement, scope
    (internal / external test set), test_set, tested (experiment vs baseline, or why not),
    experiment, baseline, k, delta, ci_low, ci_high, ci90_low, ci90_high, p_holm, mde,
    mde_holm (t-based, at the family's first Holm level), family_size, test (gain /
    equivalence), verdict (supported / contradicted / inconclusive / not tested in this run;
    also for a scope the claim names without a test set), confounds ("; "), and
    the experiment's exchange rate where ``exchange`` (columns experiment, test_set, rate,
    ci_low, ci_high, extrapolated) gives one. ``train_on`` (``diffusion.train_on``) words
    the distillation confound."""
    fraction = primary_fraction(experiment_info(grid), spec)
    rates = (exchange.set_index(["experiment", "test_set"]) if exchange is not None
             else pd.DataFrame(columns=["rate", "ci_low", "ci_high", "extrapolated"]))
    rows = []
    for claim in CLAIMS:
        chosen = comparisons[comparisons["kind"] == claim.kind]
        if not claim.kind.external:
            chosen = chosen[np.isclose(chosen["real_fraction"].astype(float), fraction)]
        if claim.ks is not None:
            chosen = chosen[chosen["k"].isin(claim.ks)]
        common = {"claim": claim.number, "statement": claim.statement, "test": claim.test}
        if chosen.empty:
            ks = f" with k = {', '.join(map(str, claim.ks))}" if claim.ks else ""
            where = "" if claim.kind.external else f" at {fraction:.0%} real data"
            rows.append({**common, "scope": "-", "test_set": "-", "verdict": NOT_TESTED,
                         "tested": f"no {claim.kind.value} arm{ks}{where} in the grid",
                         "confounds": "-"})
            continue
        scopes = set(chosen["test_set"].map(test_set_scope))
        rows += [{**common, "scope": scope, "test_set": "-", "verdict": NOT_TESTED,
                  "tested": f"no {scope} test set in this run", "confounds": "-"}
                 for scope in claim.scopes if scope not in scopes]
        for row in chosen.to_dict("records"):
            key = (row["experiment"], row["test_set"])
            rate = rates.loc[key] if key in rates.index else None
            rows.append({
                **common, "scope": test_set_scope(row["test_set"]),
                "tested": f"{row['experiment']} vs {row['baseline']}",
                **{c: row[c] for c in ("test_set", "experiment", "baseline", "k", "delta",
                                       "ci_low", "ci_high", "ci90_low", "ci90_high",
                                       "p_holm", "mde", "mde_holm", "family_size")},
                # the variance terms that say how many seeds would reach the margin
                **{c: row.get(c, math.nan) for c in ("n_seeds", "seed_se", "patient_se")},
                "verdict": claim_verdict(claim.test, row["verdict"], row["ci90_low"],
                                         row["ci90_high"], spec.equivalence_margin),
                "confounds": "; ".join([*(DISTILLATION[train_on] if c == _DISTILLATION
                                          else c for c in claim.confounds),
                                        *_pair_confounds(grid, row)]),
                "exchange_rate": math.nan if rate is None else rate["rate"],
                "exchange_ci_low": math.nan if rate is None else rate["ci_low"],
                "exchange_ci_high": math.nan if rate is None else rate["ci_high"],
                "exchange_extrapolated": None if rate is None else bool(rate["extrapolated"])})
    columns = ["claim", "statement", "scope", "test_set", "tested", "experiment", "baseline",
               "k", "delta", "ci_low", "ci_high", "ci90_low", "ci90_high", "p_holm", "mde",
               "mde_holm", "family_size", "n_seeds", "seed_se", "patient_se", "test", "verdict",
               "confounds", "exchange_rate",
               "exchange_ci_low",
               "exchange_ci_high", "exchange_extrapolated"]
    return pd.DataFrame(rows).reindex(columns=columns)
