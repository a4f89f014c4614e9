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

import numpy as np
import pandas as pd

from cxrlib.core.kinds import Kind
from cxrlib.core.schema import StatsSpec
from cxrlib.stats import SeedMacros, seed_estimate

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
        curve = [e for e in arms["experiment"] if e in sm.point]
        if len(curve) < MIN_SIZES:
            continue
        curve_seeds = sorted(set.intersection(*(set(sm.point[e]) for e in curve)), key=str)
        log_n = np.array([np.mean([np.log(n_real[(e, s)]) for s in curve_seeds])
                          for e in curve])
        slope, slope_reps = _pooled_slope(sm, curve, log_n, curve_seeds)
        cv = float(np.std(slope_reps) / slope) if slope > 0 else np.inf
        rises = cv <= MAX_SLOPE_CV
        sizes = np.exp(log_n)
        for arm in placed.itertuples(index=False):
            base = Kind(arm.kind).baseline_name(arm.real_fraction, arm.train_site)
            if arm.experiment not in sm.point or base not in sm.point:
                continue
            seeds = sorted(set(sm.point[arm.experiment]) & set(sm.point[base]), key=str)
            own = np.array([n_real[(arm.experiment, s)] for s in seeds])
            start = np.array([n_real[(base, s)] for s in seeds])
            added = np.array([extra[(arm.experiment, s)] for s in seeds])
            delta = np.array([sm.point[arm.experiment][s] - sm.point[base][s] for s in seeds])
            n_eq = start * np.exp(delta / slope) if rises else np.full(len(seeds), np.nan)
            est = None
            if rises:
                reps = np.vstack([
                    (start[i] * np.exp((sm.replicates[arm.experiment][s]
                                        - sm.replicates[base][s]) / slope_reps) - own[i])
                    / added[i] for i, s in enumerate(seeds)])
                reps = reps[:, np.isfinite(reps).all(axis=0)]
                est = seed_estimate((n_eq - own) / added, np.atleast_2d(np.cov(reps)),
                                    spec.alpha)
            mean_eq = float(n_eq.mean())
            rows.append({
                "experiment": arm.experiment, "kind": arm.kind, "k": arm.k,
                "real_fraction": arm.real_fraction, "test_set": sm.test_set,
                "n_real": float(own.mean()), "n_extra": float(added.mean()),
                "n_synthetic": float(np.mean([n_syn[(arm.experiment, s)] for s in seeds])),
                "real_equivalent": mean_eq, "worth": float((n_eq - own).mean()),
                "rate": est.estimate if est else np.nan,
                "ci_low": est.ci_low if est else np.nan,
                "ci_high": est.ci_high if est else np.nan,
                "df": est.df if est else np.nan, "n_seeds": len(seeds),
                "extrapolated": bool(rises and not sizes.min() <= mean_eq <= sizes.max()),
                "curve_min": float(sizes.min()), "curve_max": float(sizes.max()),
                "slope": slope, "slope_cv": cv,
                "note": "" if rises else f"no rate: the learning curve's slope is not well "
                                         f"determined on this test set (CV {cv:.2f} > "
                                         f"{MAX_SLOPE_CV})"})
    return pd.DataFrame(rows)


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


def summary_entries(rates: pd.DataFrame, test_set: str) -> dict[str, dict]:
    """``summary.json["exchange_rate"]`` for the headline test set: {arm: {rate, ci_low,
    ci_high, extrapolated}}."""
    here = rates[rates["test_set"] == test_set]
    return {r["experiment"]: {"rate": r["rate"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                              "extrapolated": bool(r["extrapolated"]),
                              "real_equivalent": r["real_equivalent"], "n_real": r["n_real"],
                              "n_extra": r["n_extra"]}
            for r in here.to_dict("records")}
