"""The worth curves (notebook 06): what one extra image is worth in real images along each
axis of ``tradeoffs`` (generator compute, guidance, dose, real-data size), and which cheap
measure of a generator predicts it.

Every point is an arm of the one grid, placed on the real-only learning curve by
:func:`cxrlib.study.exchange.exchange_rates` (the exchange rate r with its CI). All points share
each seed's real subset and the curve, so the difference between two points is paired
(:func:`cxrlib.study.exchange.worth_comparisons`: per seed and bootstrap replicate, seeds as a
random effect), and so is each point's share of the perfect generator's worth where the
perfect generator stands beside it. What the design can resolve is the difference's minimum
detectable effect at 80% power (:func:`cxrlib.stats.minimum_detectable_effect`), and the seeds
that would resolve a given one come from its own variance terms
(:func:`cxrlib.stats.seeds_for_mde`). No torch here.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from cxrlib.core.kinds import Kind
from cxrlib.core.schema import Params, StatsSpec
from cxrlib.experiments.grid import AXES, CurvePoint
from cxrlib.stats import SeedMacros, seeds_for_mde, spearman_ci
from cxrlib.study.exchange import worth_comparisons
from cxrlib.study.secondary import subgroup_analysis

#: The difference in r the compute axis should resolve (issue 38's design target).
TARGET_DIFFERENCE = 0.1


def _setting_of(point: CurvePoint, params: Params) -> tuple[int, float]:
    """The (checkpoint step, guidance) of a point's generator."""
    setting = point.arm[4] or params.reference_generator()
    return setting.step, setting.guidance


def curve_table(rates: pd.DataFrame, axes: dict[str, list[CurvePoint]], params: Params,
                test_set: str) -> pd.DataFrame:
    """One row per axis and point on ``test_set``: x, the generator's arm and its rate r with
    CI and extrapolated flag, the perfect generator's beside it (dose, size), whether it is
    the run's own setting, and the generator's (step, guidance)."""
    here = rates[rates["test_set"] == test_set].set_index("experiment")
    rows = []
    for axis, points in axes.items():
        for p in points:
            step, guidance = _setting_of(p, params)
            row = {"axis": axis, "x": p.x, "experiment": p.experiment,
                   "reference": p.reference, "step": step, "guidance": guidance}
            for prefix, name in (("", p.experiment), ("perfect_", p.perfect_experiment)):
                have = name is not None and name in here.index
                for col in ("rate", "ci_low", "ci_high", "n_extra"):
                    row[prefix + col] = float(here.loc[name, col]) if have else math.nan
                row[prefix + "extrapolated"] = bool(here.loc[name, "extrapolated"]) if have \
                    else False
            row["perfect"] = p.perfect_experiment or ""
            rows.append(row)
    return pd.DataFrame(rows)


def _comparisons(macros: dict[str, SeedMacros], grid: pd.DataFrame, spec: StatsSpec,
                 pairs: list[tuple[str, str]], test_set: str) -> pd.DataFrame:
    present = set(grid["experiment"])
    pairs = [p for p in dict.fromkeys(pairs) if set(p) <= present]
    table = worth_comparisons(macros, grid, spec, pairs) if pairs else pd.DataFrame()
    return table[table["test_set"] == test_set] if len(table) else table


def adjacent_differences(macros: dict[str, SeedMacros], grid: pd.DataFrame, spec: StatsSpec,
                         axes: dict[str, list[CurvePoint]], test_set: str) -> pd.DataFrame:
    """Between neighbouring points of each axis: the paired difference in r (the larger x
    minus the smaller) with its CI and minimum detectable effect, and the seeds that would
    resolve :data:`TARGET_DIFFERENCE` (None: more seeds alone would not)."""
    rows = []
    for axis, points in axes.items():
        for lo, hi in zip(points, points[1:], strict=False):
            table = _comparisons(macros, grid, spec, [(hi.experiment, lo.experiment)],
                                 test_set)
            if table.empty:
                continue
            r = table.iloc[0]
            rows.append({
                "axis": axis, "from": lo.x, "to": hi.x, "experiment": hi.experiment,
                "reference_experiment": lo.experiment, "difference": r["difference"],
                "ci_low": r["diff_ci_low"], "ci_high": r["diff_ci_high"],
                "mde": r["diff_mde"], "n_seeds": int(r["n_seeds"]),
                "seeds_for_target": seeds_for_mde(r["diff_seed_se"], r["diff_patient_se"],
                                                  int(r["n_seeds"]), TARGET_DIFFERENCE,
                                                  spec.alpha)})
    return pd.DataFrame(rows)


def perfect_shares(macros: dict[str, SeedMacros], grid: pd.DataFrame, spec: StatsSpec,
                   axes: dict[str, list[CurvePoint]], test_set: str) -> pd.DataFrame:
    """At every point with the perfect generator beside it: the generator's rate over the
    perfect generator's (the share of the attainable worth) with its delta-method CI, and
    their paired difference (:func:`cxrlib.study.exchange.worth_comparisons`)."""
    pairs = [(p.experiment, p.perfect_experiment) for points in axes.values() for p in points
             if p.perfect_experiment]
    table = _comparisons(macros, grid, spec, pairs, test_set)
    if table.empty:
        return table
    at = pd.DataFrame([{"axis": axis, "x": p.x, "experiment": p.experiment,
                        "reference": p.perfect_experiment}
                       for axis, points in axes.items() for p in points
                       if p.perfect_experiment])
    return at.merge(table, on=["experiment", "reference"], how="inner")


def settings_worth(curve: pd.DataFrame, measures: pd.DataFrame) -> pd.DataFrame:
    """Each generator setting of the compute and guidance axes (one row per distinct step
    and guidance) with its rate and CI beside notebook 03's measures of its images
    (``generator_settings.csv``)."""
    own = curve[curve["axis"].isin(["compute", "guidance"])].drop_duplicates(
        ["step", "guidance"])
    keep = ["step", "guidance", "experiment", "reference", "rate", "ci_low", "ci_high"]
    return own[keep].merge(measures, on=["step", "guidance"], how="inner").sort_values(
        ["step", "guidance"]).reset_index(drop=True)


def measure_correlations(settings: pd.DataFrame, measures: dict[str, tuple[str, int]],
                         seed: int, alpha: float = 0.05) -> pd.DataFrame:
    """Per cheap measure (``measures``: column -> (label, direction), as
    :data:`cxrlib.synthetic.audit.run.SETTING_MEASURES`): Spearman's rho between the measure,
    oriented so that higher means closer to real (direction 0: minus the distance of the ratio
    from 1), and the settings' rates, with a CI over resampled settings; and whether the
    setting the measure ranks best is the one worth most."""
    rows = []
    finite = settings.dropna(subset=["rate"])
    best = finite["rate"].idxmax() if len(finite) else None
    for column, (label, direction) in measures.items():
        part = finite.dropna(subset=[column]) if column in finite else finite.iloc[:0]
        value = part[column].to_numpy(dtype=float) if len(part) else np.array([])
        oriented = -np.abs(value - 1) if direction == 0 else direction * value
        rho = spearman_ci(oriented, part["rate"].to_numpy(dtype=float), seed, alpha)
        picks = part.index[int(np.argmax(oriented))] == best if len(part) else False
        rows.append({"measure": label, "column": column, "rho": rho["rho"],
                     "ci_low": rho["ci_low"], "ci_high": rho["ci_high"], "n_settings": rho["n"],
                     "picks_best": bool(picks)})
    return pd.DataFrame(rows)


def _r(row: pd.Series | dict, prefix: str = "") -> str:
    rate = row[prefix + "rate"]
    if not np.isfinite(rate):
        return "no rate"
    mark = ", extrapolated" if row[prefix + "extrapolated"] else ""
    return (f"r = {rate:.2f} (95% CI {row[prefix + 'ci_low']:.2f} to "
            f"{row[prefix + 'ci_high']:.2f}{mark})")


def _x(axis: str, x: float) -> str:
    return {"compute": f"{x:,.0f} steps", "guidance": f"w {x:g}", "dose": f"+{100 * x:.0f}%",
            "size": f"{100 * x:g}% real"}[axis]


def _change(row: dict) -> str:
    ci = f"{row['difference']:+.2f} (95% CI {row['ci_low']:+.2f} to {row['ci_high']:+.2f})"
    if row["ci_low"] > 0:
        return f"rises by {ci}"
    if row["ci_high"] < 0:
        return f"falls by {ci}"
    return f"changes by {ci}, a CI that includes 0"


def guidance_sentences(curve: pd.DataFrame, diffs: pd.DataFrame, shares: pd.DataFrame,
                       correlations: pd.DataFrame) -> list[str]:
    """The guidance section, written from the tables: per axis, the worth at each point and
    how it changes between neighbours; the best generator setting and its share of the perfect
    generator's worth; what the design resolves; which cheap measure tracks worth."""
    said = []
    for axis, points in curve.groupby("axis", sort=False):
        values = "; ".join(f"{_x(axis, p['x'])}: {_r(p)}" for p in points.to_dict("records"))
        steps = [f"from {_x(axis, d['from'])} to {_x(axis, d['to'])} it {_change(d)}"
                 for d in diffs[diffs["axis"] == axis].to_dict("records")] if len(diffs) else []
        line = f"{AXES[axis].capitalize()}: {values}."
        if steps:
            line += " Paired: " + "; ".join(steps) + "."
        said.append(line)
        if axis in ("dose", "size") and points["perfect_rate"].notna().any():
            said.append(f"The perfect generator on the same {axis} axis: " + "; ".join(
                f"{_x(axis, p['x'])}: {_r(p, 'perfect_')}" for p in points.to_dict("records"))
                + ".")
    settings = curve[curve["axis"].isin(["compute", "guidance"])].dropna(subset=["rate"])
    own = curve[curve["reference"]]
    own_arm = own.iloc[0]["experiment"] if len(own) else None
    best = settings.loc[settings["rate"].idxmax()] if len(settings) else None
    if best is not None:
        line = (f"Most worth among the generator settings: {best['step']:,} steps at w "
                f"{best['guidance']:g}, {_r(best)}")
        if own_arm is not None and best["experiment"] != own_arm:
            line += f"; the run's own setting: {_r(own.iloc[0])}"
        said.append(line + ".")
    read = [("the run's own setting", own_arm)]
    if best is not None and best["experiment"] != own_arm:
        read.append(("the setting worth most", best["experiment"]))
    for who, arm in read:
        rows = shares[shares["experiment"] == arm] if len(shares) else shares
        if rows.empty:
            continue
        r = rows.iloc[0]
        ci = (f"95% CI {r['ratio_ci_low']:.2f} to {r['ratio_ci_high']:.2f}"
              if np.isfinite(r["ratio_ci_low"]) else
              "no interval: the perfect generator's own CI reaches 0")
        said.append(f"At {who} the generator's images are worth {r['ratio']:.2f} ({ci}) of "
                    f"the perfect generator's at the same dose; the goal is 0.5.")
    compute = diffs[diffs["axis"] == "compute"] if len(diffs) else diffs
    if len(compute):
        parts = [f"{_x('compute', d['from'])} to {_x('compute', d['to'])}: {d['mde']:.2f}"
                 + ("" if d["mde"] <= TARGET_DIFFERENCE else
                    f" (about {d['seeds_for_target']} seeds would resolve "
                    f"{TARGET_DIFFERENCE})" if d["seeds_for_target"] else
                    " (more seeds alone would not resolve it)")
                 for d in compute.to_dict("records")]
        said.append(f"What this design resolves: with {int(compute['n_seeds'].max())} seeds, a "
                    f"difference in worth between neighbouring compute points is found with 80% "
                    f"power when it is at least (the paired difference's minimum detectable "
                    f"effect) " + "; ".join(parts) + ".")
    if len(correlations):
        usable = correlations.dropna(subset=["rho"])
        tracks = usable[usable["ci_low"] > 0]
        if usable.empty:
            said.append("Too few generator settings to rank the cheap measures against worth.")
        else:
            top = usable.loc[usable["rho"].idxmax()]
            said.append(
                f"Which cheap measure predicts worth, over {int(top['n_settings'])} generator "
                f"settings: {top['measure']} ranks them most like their worth (Spearman rho "
                f"{top['rho']:+.2f}, 95% CI {top['ci_low']:+.2f} to {top['ci_high']:+.2f}); "
                + (f"{', '.join(tracks['measure'])} track it with a CI above 0."
                   if len(tracks) else "no measure's CI lies above 0, so none is shown to "
                   "stand in for the grid here."))
    return said


def summary_entry(curve: pd.DataFrame, diffs: pd.DataFrame, shares: pd.DataFrame,
                  correlations: pd.DataFrame, test_set: str) -> dict:
    """``summary.json["worth_curves"]``: each axis's points (r, CI, extrapolated, the perfect
    generator's beside it), the paired differences between neighbours, the shares of the
    perfect generator's worth and the measures' correlations with worth."""
    point_keys = ["x", "experiment", "reference", "step", "guidance", "rate", "ci_low",
                  "ci_high", "extrapolated", "perfect", "perfect_rate", "perfect_ci_low",
                  "perfect_ci_high", "perfect_extrapolated"]
    share_keys = ["axis", "x", "experiment", "reference", "ratio", "ratio_ci_low",
                  "ratio_ci_high", "difference", "diff_ci_low", "diff_ci_high"]
    return {
        "test_set": test_set,
        "axes": {axis: part[point_keys].to_dict("records")
                 for axis, part in curve.groupby("axis", sort=False)},
        "differences": diffs.to_dict("records") if len(diffs) else [],
        "perfect_shares": shares[share_keys].to_dict("records") if len(shares) else [],
        "measures": correlations.to_dict("records") if len(correlations) else [],
    }


#: The subgroups the worth curves break the run's own setting down by.
WORTH_SUBGROUPS: tuple[str, ...] = ("sex", "age_band")


def subgroup_gains(predictions: pd.DataFrame, grid: pd.DataFrame, spec: StatsSpec,
                   arms: list[str], test_set: str) -> pd.DataFrame:
    """Per sex and age band of ``test_set``: each arm's paired macro-AUROC gain over its
    baseline within the group with its 95% CI (:func:`cxrlib.study.secondary.subgroup_analysis`,
    one common label set per attribute)."""
    info = grid.drop_duplicates("experiment").set_index("experiment")
    narrowed = spec.model_copy(update={"subgroups": list(WORTH_SUBGROUPS)})
    here = predictions[predictions["test_set"] == test_set]
    parts = []
    for arm in arms:
        if arm not in info.index:
            continue
        row = info.loc[arm]
        baseline = Kind(row["kind"]).baseline_name(row["real_fraction"], row["train_site"])
        groups, _ = subgroup_analysis(here, arm, baseline, narrowed)
        parts.append(groups[groups["experiment"] == arm])
    keep = ["experiment", "by", "group", "gain", "gain_ci_low", "gain_ci_high", "n_images",
            "labels_used"]
    if not parts:
        return pd.DataFrame(columns=keep)
    gains = pd.concat(parts, ignore_index=True)[keep]
    return gains.assign(by=gains["by"].replace({"age_band": "age band"}))


def subgroup_sentences(gains: pd.DataFrame, labels: dict[str, str]) -> list[str]:
    """Per arm: the groups whose gain CI lies above 0, below 0, and how many include 0."""
    said = []
    for arm, part in gains.groupby("experiment", sort=False):
        helps = [f"{r.group} ({r.gain:+.3f})" for r in part.itertuples() if r.gain_ci_low > 0]
        hurts = [f"{r.group} ({r.gain:+.3f})" for r in part.itertuples() if r.gain_ci_high < 0]
        said.append(f"{labels.get(arm, arm)}, by sex and age band (95% CIs not adjusted "
                    f"across groups): gains in {', '.join(helps) or 'no group'}; losses in "
                    f"{', '.join(hurts) or 'no group'}; "
                    f"{len(part) - len(helps) - len(hurts)} group(s) with a CI that includes 0.")
    return said
