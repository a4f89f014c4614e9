"""The exchange rate: how many real images an arm's extra images are worth (notebook 05).

Real-only arms at three or more real-data sizes, trained under the same protocol, give a
learning curve per test set and training seed: macro AUROC against the number of real
training images ``n``. The curve is fitted as ``auroc = a + b ln n`` (log-linear; monotone
when ``b > 0``), the simplest form that follows the diminishing returns seen in learning
curves with two parameters, so three sizes leave one degree of freedom to show the fit.

Every supplemented internal arm is placed on the curve through its paired per-seed delta to
its own baseline (real only at the same fraction): ``n_eq = n_base exp(delta / b)`` real
images would give its AUROC, ``worth = n_eq - n_real`` is what its extra images bought, and
``r = worth / n_extra`` is "one synthetic image is worth r real images". A perfect generator
should come out near ``r = 1`` (when its images add as much as new patients' would), labels
shuffled at or below 0: that is the instrument's calibration. ``r`` is computed per seed and
under each shared patient-bootstrap replicate (b refitted to each) and combined like any
contrast (:func:`cxrlib.stats.seed_estimate`: seeds as a random effect, t with Satterthwaite
df). Where the curve's slope is not well determined (:data:`MAX_SLOPE_CV`) no rate is given; an arm
whose ``n_eq`` lies outside the measured sizes is marked ``extrapolated``.

Written here because no library inverts a per-seed learning curve with this variance model;
the fit is numpy's least squares.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cxrlib.core.kinds import Kind
from cxrlib.core.schema import StatsSpec
from cxrlib.stats import Estimate, SeedMacros, seed_estimate

#: The fitted form, as the report names it.
CURVE_FORM = "macro AUROC = a + b ln(real images)"
#: Fewest real-only sizes that make a learning curve.
MIN_SIZES = 3
#: Largest coefficient of variation of the curve's slope (over patient-bootstrap replicates)
#: at which a rate is given: r goes through exp(delta / b), which stays near-normal only while
#: b is well determined; beyond it the interval is unbounded and no rate is reported (the
#: demo's PadChest-style curve, CV 0.24, gave intervals of +/-10 to +/-10^6).
MAX_SLOPE_CV = 0.2


def _fit(log_n: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares (a, b) of y = a + b log_n; NaN where any value is missing."""
    if not (np.isfinite(log_n).all() and np.isfinite(y).all()):
        return np.nan, np.nan
    b, a = np.polyfit(log_n, y, 1)
    return float(a), float(b)


def _worth(y: np.ndarray | float, a: float, b: float) -> np.ndarray:
    """Real images that give AUROC ``y`` on the curve (NaN where the curve does not rise)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.where(b > 0, np.exp((np.asarray(y) - a) / b), np.nan)


def _per_seed(grid: pd.DataFrame, column: str) -> dict[tuple[str, Hashable], float]:
    return {(e, s): float(v) for e, s, v in grid[["experiment", "seed", column]].itertuples(
        index=False)}


def curve_arms(grid: pd.DataFrame) -> pd.DataFrame:
    """The real-only arms of the learning curve: one row per real fraction (internal)."""
    real = grid[grid["kind"] == Kind.REAL_ONLY]
    return real.drop_duplicates("experiment").sort_values("real_fraction")


def placed_arms(grid: pd.DataFrame) -> pd.DataFrame:
    """Internal arms with extra (synthetic, repeated or rendered) images: those placed on
    the curve."""
    internal = grid["kind"].map(lambda k: not Kind(k).external) & (
        grid["kind"] != Kind.REAL_ONLY)
    return grid[internal].drop_duplicates("experiment")


def _n_extra(grid: pd.DataFrame) -> pd.Series:
    """Images an arm has beyond its distinct real rows (synthetic images or repeated copies)."""
    return grid["n_real"] + grid["n_synthetic"] - grid["n_unique_real"]


def learning_curve(macros: dict[str, SeedMacros], grid: pd.DataFrame) -> pd.DataFrame:
    """Per test set and real-only size: mean real images, mean macro AUROC over seeds, and the
    curve fitted to the seed means (with its coefficients, for the figure and the report)."""
    arms = curve_arms(grid)
    n = grid.groupby("experiment")["n_unique_real"].mean()
    rows = []
    for sm in macros.values():
        present = [e for e in arms["experiment"] if e in sm.point]
        if len(present) < MIN_SIZES:
            continue
        y = np.array([np.mean(list(sm.point[e].values())) for e in present])
        x = np.log(n.loc[present].to_numpy(dtype=float))
        a, b = _fit(x, y)
        fitted = a + b * x
        for e, xi, yi, fi in zip(present, x, y, fitted, strict=True):
            rows.append({"test_set": sm.test_set, "experiment": e, "real_images": np.exp(xi),
                         "macro_auroc": yi, "fitted": fi, "a": a, "b": b,
                         "r2": 1 - ((y - fitted) ** 2).sum() / max(((y - y.mean()) ** 2).sum(),
                                                                  1e-12)})
    return pd.DataFrame(rows)


def _pooled_slope(sm: SeedMacros, curve: list[str], log_n: np.ndarray,
                  seeds: list[Hashable]) -> tuple[float, np.ndarray]:
    """The curve's slope fitted to the seed means, and under each patient-bootstrap replicate
    (the replicates' seed means)."""
    y = np.array([np.mean([sm.point[e][s] for s in seeds]) for e in curve])
    reps = np.vstack([np.mean([sm.replicates[e][s] for s in seeds], axis=0) for e in curve])
    return _fit(log_n, y)[1], np.polyfit(log_n, reps, 1)[0]


@dataclass(frozen=True)
class _Curve:
    """One test set's learning curve: its arms, sizes and slope (fitted to the seed means and
    to each patient-bootstrap replicate), and whether the slope is determined well enough to
    place arms on it (:data:`MAX_SLOPE_CV`)."""

    sizes: np.ndarray
    slope: float
    slope_reps: np.ndarray
    cv: float

    @property
    def rises(self) -> bool:
        return self.cv <= MAX_SLOPE_CV


def _curve(sm: SeedMacros, arms: pd.DataFrame, n_real: dict) -> _Curve | None:
    curve = [e for e in arms["experiment"] if e in sm.point]
    if len(curve) < MIN_SIZES:
        return None
    seeds = sorted(set.intersection(*(set(sm.point[e]) for e in curve)), key=str)
    log_n = np.array([np.mean([np.log(n_real[(e, s)]) for s in seeds]) for e in curve])
    slope, slope_reps = _pooled_slope(sm, curve, log_n, seeds)
    cv = float(np.std(slope_reps) / slope) if slope > 0 else np.inf
    return _Curve(np.exp(log_n), slope, slope_reps, cv)


@dataclass(frozen=True)
class _Draws:
    """An arm's rate per training seed and under each shared patient-bootstrap replicate
    (seeds x replicates), with what it was computed from."""

    seeds: list[Hashable]
    n_eq: np.ndarray
    own: np.ndarray
    added: np.ndarray
    rates: np.ndarray
    reps: np.ndarray


def _draws(sm: SeedMacros, curve: _Curve, experiment: str, baseline: str, n_real: dict,
           extra: dict) -> _Draws:
    """Place ``experiment`` on the curve through its paired per-seed delta to ``baseline``:
    ``n_eq = n_base exp(delta / b)`` and ``r = (n_eq - n_real) / n_extra``."""
    seeds = sorted(set(sm.point[experiment]) & set(sm.point[baseline]), key=str)
    own = np.array([n_real[(experiment, s)] for s in seeds])
    start = np.array([n_real[(baseline, s)] for s in seeds])
    added = np.array([extra[(experiment, s)] for s in seeds])
    delta = np.array([sm.point[experiment][s] - sm.point[baseline][s] for s in seeds])
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # a flat curve
        n_eq = start * np.exp(delta / curve.slope)
        reps = np.vstack([
            (start[i] * np.exp((sm.replicates[experiment][s] - sm.replicates[baseline][s])
                               / curve.slope_reps) - own[i]) / added[i]
            for i, s in enumerate(seeds)])
    return _Draws(seeds, n_eq, own, added, (n_eq - own) / added, reps)


def _estimate(values: np.ndarray, reps: np.ndarray, alpha: float) -> Estimate:
    reps = reps[:, np.isfinite(reps).all(axis=0)]
    return seed_estimate(values, np.atleast_2d(np.cov(reps)), alpha)


def exchange_rates(macros: dict[str, SeedMacros], grid: pd.DataFrame,
                   spec: StatsSpec) -> pd.DataFrame:
    """The exchange rate of every placed arm on every test set with a learning curve.

    An arm is placed through its paired per-seed delta to its own baseline (real only at the
    same fraction, a point of the curve) and the curve's slope b: ``n_eq = n_base exp(delta /
    b)``, so seed-to-seed noise in the curve's height cancels as it does in every comparison.
    b is fitted to the seed means (and to each patient-bootstrap replicate's); where its
    coefficient of variation over the replicates exceeds :data:`MAX_SLOPE_CV`, no rate is
    given (``note`` says so). The seed-to-seed spread of b itself is not
    propagated. ``grid`` is :func:`cxrlib.experiments.grid.grid_results` (per experiment and seed:
    kind, n_real, n_synthetic, n_unique_real). Columns: experiment, kind, k, test_set, n_real,
    n_extra, real_equivalent (n_eq, mean over seeds), worth (n_eq - n_real), rate with ci_low,
    ci_high (two-level, t), df, n_seeds, extrapolated, curve_min, curve_max, slope, note.
    """
    arms, placed = curve_arms(grid), placed_arms(grid)
    if len(arms) < MIN_SIZES:
        raise ValueError(f"an exchange rate needs real-only arms at {MIN_SIZES} or more real "
                         f"fractions under one protocol (the grid has {len(arms)}); add them "
                         "to experiments.real_fractions")
    n_real, n_syn = _per_seed(grid, "n_unique_real"), _per_seed(grid, "n_synthetic")
    extra = _per_seed(grid.assign(n_extra=_n_extra(grid)), "n_extra")
    rows = []
    for sm in macros.values():
        curve = _curve(sm, arms, n_real)
        if curve is None:
            continue
        for arm in placed.itertuples(index=False):
            base = Kind(arm.kind).baseline_name(arm.real_fraction, arm.train_site)
            if arm.experiment not in sm.point or base not in sm.point:
                continue
            d = _draws(sm, curve, arm.experiment, base, n_real, extra)
            n_eq = d.n_eq if curve.rises else np.full(len(d.seeds), np.nan)
            est = _estimate(d.rates, d.reps, spec.alpha) if curve.rises else None
            mean_eq = float(n_eq.mean())
            rows.append({
                "experiment": arm.experiment, "kind": arm.kind, "k": arm.k,
                "real_fraction": arm.real_fraction, "test_set": sm.test_set,
                "n_real": float(d.own.mean()), "n_extra": float(d.added.mean()),
                "n_synthetic": float(np.mean([n_syn[(arm.experiment, s)] for s in d.seeds])),
                "real_equivalent": mean_eq, "worth": float((n_eq - d.own).mean()),
                "rate": est.estimate if est else np.nan,
                "ci_low": est.ci_low if est else np.nan,
                "ci_high": est.ci_high if est else np.nan,
                "df": est.df if est else np.nan, "n_seeds": len(d.seeds),
                "extrapolated": bool(curve.rises and not curve.sizes.min() <= mean_eq
                                     <= curve.sizes.max()),
                "curve_min": float(curve.sizes.min()), "curve_max": float(curve.sizes.max()),
                "slope": curve.slope, "slope_cv": curve.cv,
                "note": "" if curve.rises else f"no rate: the learning curve's slope is not well "
                                               f"determined on this test set (CV "
                                               f"{curve.cv:.2f} > {MAX_SLOPE_CV})"})
    return pd.DataFrame(rows)


def worth_comparisons(macros: dict[str, SeedMacros], grid: pd.DataFrame, spec: StatsSpec,
                      pairs: list[tuple[str, str]]) -> pd.DataFrame:
    """What one arm's extra images are worth against another's, per test set with a curve,
    paired: ``pairs`` of (arm, reference), both placed on the same learning curve. The
    difference of their rates comes per seed, with the patient-bootstrap replicates both
    share (two-level CI as every contrast); the ratio ``rate / reference rate`` (e.g. the
    generator's images against the perfect generator's: the share of the attainable worth)
    by the delta method on the same draws, with no interval where the reference's own CI
    reaches 0 (the ratio is then unbounded). Columns: test_set, experiment, reference,
    rate, reference_rate, difference with diff_ci_low/high, ratio with ratio_ci_low/high,
    n_seeds, the difference's minimum detectable effect (``diff_mde``, 80% power) and its
    seed and patient standard errors (for :func:`cxrlib.stats.seeds_for_mde`), note."""
    arms = curve_arms(grid)
    if len(arms) < MIN_SIZES:
        return pd.DataFrame()
    kinds = grid.drop_duplicates("experiment").set_index("experiment")
    n_real = _per_seed(grid, "n_unique_real")
    extra = _per_seed(grid.assign(n_extra=_n_extra(grid)), "n_extra")
    rows = []
    for sm in macros.values():
        curve = _curve(sm, arms, n_real)
        if curve is None or not curve.rises:
            continue
        for experiment, reference in pairs:
            draws = {}
            for e in (experiment, reference):
                row = kinds.loc[e]
                base = Kind(row["kind"]).baseline_name(row["real_fraction"], row["train_site"])
                draws[e] = _draws(sm, curve, e, base, n_real, extra)
            a, b = draws[experiment], draws[reference]
            if a.seeds != b.seeds:
                raise ValueError(f"{experiment} and {reference} were trained at different "
                                 "seeds; a paired comparison needs the same ones")
            diff = _estimate(a.rates - b.rates, a.reps - b.reps, spec.alpha)
            ref = _estimate(b.rates, b.reps, spec.alpha)
            ratio = float(a.rates.mean() / b.rates.mean()) if b.rates.mean() else np.nan
            bounded = ref.ci_low > 0
            if bounded:  # delta method: linearise rate_a - ratio * rate_b around the ratio
                lin = _estimate((a.rates - ratio * b.rates) / b.rates.mean(),
                                (a.reps - ratio * b.reps) / b.rates.mean(), spec.alpha)
                low, high = ratio - (lin.estimate - lin.ci_low), ratio + (lin.ci_high
                                                                          - lin.estimate)
            else:
                low = high = np.nan
            rows.append({"test_set": sm.test_set, "experiment": experiment,
                         "reference": reference, "rate": float(a.rates.mean()),
                         "reference_rate": float(b.rates.mean()),
                         "difference": diff.estimate, "diff_ci_low": diff.ci_low,
                         "diff_ci_high": diff.ci_high, "ratio": ratio,
                         "ratio_ci_low": low, "ratio_ci_high": high, "n_seeds": len(a.seeds),
                         "diff_mde": diff.mde, "diff_seed_se": diff.seed_se,
                         "diff_patient_se": diff.patient_se,
                         "note": "" if bounded else "no interval for the ratio: the "
                                 "reference's own CI reaches 0"})
    return pd.DataFrame(rows)


def perfect_generator_pairs(grid: pd.DataFrame) -> list[tuple[str, str]]:
    """(generator arm, perfect-generator arm) at the same k and real fraction: the pairs whose
    worth ratio says what share of the attainable worth the generator delivers."""
    arms = grid.drop_duplicates("experiment")
    oracle = {(r.k, r.real_fraction): r.experiment for r in arms.itertuples()
              if r.kind == Kind.REAL_PLUS_ORACLE}
    return [(r.experiment, oracle[(r.k, r.real_fraction)]) for r in arms.itertuples()
            if r.kind == Kind.REAL_PLUS_SYNTHETIC and (r.k, r.real_fraction) in oracle]


def calibration_held(rates: pd.DataFrame, test_set: str) -> dict[str, str]:
    """Whether the instrument's calibration held on ``test_set``: the perfect generator's
    rate CI includes 1 (and lies above 0), the shuffled-label control's rate is at or below
    0 (its CI's lower end). Returns {check: sentence}; a control missing from the grid says so.
    """
    here = rates[rates["test_set"] == test_set]
    out = {}
    for kind, want in ((Kind.REAL_PLUS_ORACLE, "includes 1"),
                       (Kind.REAL_PLUS_SHUFFLED, "at or below 0")):
        rows = here[here["kind"] == kind]
        if rows.empty:
            out[kind.value] = f"{kind.label}: not in this grid, so not checked"
            continue
        row = rows.loc[rows["k"].idxmax()]
        if not np.isfinite(row["rate"]):
            out[kind.value] = f"{kind.label}: {row['note']}, so not checked"
            continue
        ci = f"r = {row['rate']:.2f} (95% CI {row['ci_low']:.2f} to {row['ci_high']:.2f})"
        if kind is Kind.REAL_PLUS_ORACLE:
            held = row["ci_low"] <= 1 <= row["ci_high"]
            detail = "includes 1" if held else (
                "lies below 1: a fresh render of a row is worth less than a new patient's "
                "image" if row["ci_high"] < 1 else "lies above 1")
        else:
            held = row["ci_low"] <= 0
            detail = "reaches 0 or below" if held else "lies above 0"
        extra = " (extrapolated beyond the measured curve)" if row["extrapolated"] else ""
        out[kind.value] = (f"{kind.label} at x{int(row['k'])}: {ci}{extra}; expected: "
                           f"{want}; its CI {detail}: {'held' if held else 'did not hold'}")
    return out


def worth_sentences(versus: pd.DataFrame) -> list[str]:
    """One sentence per row of :func:`worth_comparisons`: the share of the perfect
    generator's worth, and the paired difference in r, each with its CI."""
    said = []
    for r in versus.to_dict("records"):
        share = (f"{r['ratio']:.2f} (95% CI {r['ratio_ci_low']:.2f} to {r['ratio_ci_high']:.2f})"
                 if np.isfinite(r["ratio_ci_low"]) else
                 f"{r['ratio']:.2f} (no interval: the perfect generator's own CI reaches 0)")
        said.append(f"{r['test_set']}: an extra image of {r['experiment']} is worth {share} of "
                    f"one of {r['reference']}; paired difference in r {r['difference']:+.2f} "
                    f"(95% CI {r['diff_ci_low']:+.2f} to {r['diff_ci_high']:+.2f}).")
    return said


def worth_summary(versus: pd.DataFrame, test_set: str) -> dict[str, dict]:
    """``summary.json["worth_vs_perfect"]`` for the headline test set: {generator arm: its
    rate against the perfect generator's, as a ratio and a paired difference, with CIs}."""
    if versus.empty:
        return {}
    here = versus[versus["test_set"] == test_set]
    keys = ("reference", "rate", "reference_rate", "ratio", "ratio_ci_low", "ratio_ci_high",
            "difference", "diff_ci_low", "diff_ci_high")
    return {r["experiment"]: {k: r[k] for k in keys} for r in here.to_dict("records")}


def summary_entries(rates: pd.DataFrame, test_set: str) -> dict[str, dict]:
    """``summary.json["exchange_rate"]`` for the headline test set: {arm: {rate, ci_low,
    ci_high, extrapolated}}."""
    here = rates[rates["test_set"] == test_set]
    return {r["experiment"]: {"rate": r["rate"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                              "extrapolated": bool(r["extrapolated"]),
                              "real_equivalent": r["real_equivalent"], "n_real": r["n_real"],
                              "n_extra": r["n_extra"]}
            for r in here.to_dict("records")}
