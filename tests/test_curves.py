"""The worth curves: points assembled per axis from the grid's arms, paired differences
between neighbouring points, the share of the perfect generator's worth, and which cheap
measure ranks the generator settings like their worth, on planted exchange rates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrlib.core.config import load_params
from cxrlib.core.kinds import GeneratorSetting, Kind
from cxrlib.experiments.grid import arm_name, plan_grid, worth_axes
from cxrlib.stats import SeedMacros
from cxrlib.study.curves import (
    adjacent_differences,
    curve_table,
    guidance_sentences,
    measure_correlations,
    perfect_shares,
    settings_worth,
    summary_entry,
)
from cxrlib.study.exchange import exchange_rates
from cxrlib.synthetic.audit.run import SETTING_MEASURES

ROOT = Path(__file__).resolve().parent.parent
A, B = 0.55, 0.04  # the true learning curve: auroc = A + B ln n
SEEDS = (0, 1, 2, 3, 4)
#: Planted rates: worth rises with compute up to the run's 1,000 steps, then is flat; w 0 a
#: little below w 1, w 3 far below; the perfect generator worth one real image.
PLANTED = {
    GeneratorSetting(250, 1.0): 0.1, GeneratorSetting(500, 1.0): 0.2,
    GeneratorSetting(1000, 1.0): 0.4, GeneratorSetting(2000, 1.0): 0.4,
    GeneratorSetting(1000, 0.0): 0.3, GeneratorSetting(1000, 3.0): 0.05,
}


@pytest.fixture(scope="module")
def params():
    return load_params(ROOT / "params" / "tradeoffs.yaml")


def _planted(params) -> tuple[pd.DataFrame, dict[str, SeedMacros]]:
    """Grid results and per-seed macros for the tradeoffs preset's grid where every arm lies
    on the true curve at n_real + r n_extra, r from :data:`PLANTED` (1 for the perfect
    generator); each arm's patient-bootstrap replicates carry their own noise, shared by its
    seeds (they resample the same test patients)."""
    rows, point = [], {}
    ref = params.reference_generator()
    for e in plan_grid(params):
        n = round(4800 * e.real_fraction) + e.seed
        extra = e.k * n if e.kind is not Kind.REAL_ONLY else 0
        rate = 1.0 if e.kind is Kind.REAL_PLUS_ORACLE else PLANTED.get(e.generator or ref, 0)
        rows.append({**e.record(), "experiment": e.name, "n_real": n, "n_synthetic": extra,
                     "n_unique_real": n})
        point.setdefault(e.name, {})[e.seed] = A + B * np.log(n + rate * extra)
    rng = np.random.default_rng(0)
    shared = {name: rng.normal(0, 0.002, 300) for name in point}
    reps = {name: {s: v + shared[name] for s, v in by.items()} for name, by in point.items()}
    macros = {"internal": SeedMacros("internal", ("x",), (), 2000, 1500, point, reps,
                                     {e: float(np.mean(list(v.values()))) for e, v in
                                      point.items()})}
    return pd.DataFrame(rows).drop(columns="name"), macros


def test_axes_are_arms_of_one_grid_sharing_the_runs_own_point(params):
    axes = worth_axes(params)
    assert list(axes) == ["compute", "guidance", "dose", "size"]
    assert [p.x for p in axes["compute"]] == [250, 500, 1000, 2000]
    own = arm_name(Kind.REAL_PLUS_SYNTHETIC, 2, 0.05, "chexpert")
    # The run's own generator (1,000 steps at w 1, +200% at 5% real) is one arm on every axis.
    assert all(own in [p.experiment for p in points] for points in axes.values())
    assert [p.experiment for points in axes.values() for p in points if p.reference] == [own] * 4
    assert axes["compute"][0].experiment == f"{own}.step250-w1"
    assert axes["dose"][2].perfect_experiment == "real_plus_oracle_x4.f5"
    names = [e.name for e in plan_grid(params) if e.seed == 0]
    assert len(names) == len(set(names)) == 19  # no arm twice though axes share points


def test_curve_points_and_paired_differences_recover_planted_worth(params):
    grid, macros = _planted(params)
    rates = exchange_rates(macros, grid, params.stats)
    axes = worth_axes(params)
    curve = curve_table(rates, axes, params, "internal")
    compute = curve[curve["axis"] == "compute"]
    assert compute["rate"].to_numpy() == pytest.approx([0.1, 0.2, 0.4, 0.4], abs=1e-6)
    assert curve.loc[curve["axis"] == "dose", "perfect_rate"].to_numpy() == pytest.approx(
        [1.0, 1.0, 1.0], abs=1e-6)
    assert compute["step"].tolist() == [250, 500, 1000, 2000]
    diffs = adjacent_differences(macros, grid, params.stats, axes, "internal")
    steps = diffs[diffs["axis"] == "compute"].reset_index(drop=True)
    assert steps["difference"].to_numpy() == pytest.approx([0.1, 0.2, 0.0], abs=1e-6)
    assert steps.loc[1, "ci_low"] > 0  # 500 -> 1,000 steps: a real rise
    assert steps.loc[2, "ci_low"] < 0 < steps.loc[2, "ci_high"]  # flat past the run's budget
    assert (steps["mde"] > 0).all()
    guidance = diffs[diffs["axis"] == "guidance"]
    assert guidance["difference"].to_numpy() == pytest.approx([0.1, -0.35], abs=1e-6)
    shares = perfect_shares(macros, grid, params.stats, axes, "internal")
    own = shares[(shares["axis"] == "dose") & (shares["x"] == 2)].iloc[0]
    assert own["ratio"] == pytest.approx(0.4, abs=1e-6)
    assert own["ratio_ci_low"] < 0.4 < own["ratio_ci_high"]
    said = " ".join(guidance_sentences(curve, diffs, shares, pd.DataFrame()))
    assert "from 500 steps to 1,000 steps it rises by +0.20" in said
    assert "Most worth among the generator settings: 1,000 steps at w 1" in said
    assert "worth 0.40" in said and "the goal is 0.5" in said
    entry = summary_entry(curve, diffs, shares, pd.DataFrame(), "internal")
    assert [p["x"] for p in entry["axes"]["size"]] == [0.05, 0.1, 0.2]
    assert len(entry["differences"]) == len(diffs) == 3 + 2 + 2 + 2


def test_a_measure_that_tracks_worth_is_named_and_a_random_one_is_not(params):
    grid, macros = _planted(params)
    curve = curve_table(exchange_rates(macros, grid, params.stats), worth_axes(params), params,
                        "internal")
    rng = np.random.default_rng(3)
    measures = pd.DataFrame([{"step": s.step, "guidance": s.guidance,
                              "fidelity_ratio": 0.8 + r / 2, "fid": 40 - 50 * r,
                              "recall": rng.uniform()} for s, r in PLANTED.items()])
    settings = settings_worth(curve, measures)
    assert len(settings) == 6
    chosen = {k: SETTING_MEASURES[k] for k in ("fidelity_ratio", "fid", "recall")}
    table = measure_correlations(settings, chosen, seed=0).set_index("column")
    # Tied rates (0.4 at 1,000 and 2,000 steps) keep rho just below 1.
    assert table.loc["fidelity_ratio", "rho"] > 0.9
    assert table.loc["fid", "rho"] > 0.9  # lower FID is closer to real: oriented
    assert table.loc["fidelity_ratio", "picks_best"]
    assert table.loc["recall", "ci_low"] < 0 < table.loc["recall", "ci_high"]
    said = guidance_sentences(curve, pd.DataFrame(), pd.DataFrame(), table.reset_index())[-1]
    assert "ranks them most like their worth" in said
