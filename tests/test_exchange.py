"""The exchange rate: a learning curve of real-only arms, and every arm placed on it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxrlib.core.schema import StatsSpec
from cxrlib.stats import SeedMacros
from cxrlib.study.exchange import calibration_held, exchange_rates, learning_curve

A, B = 0.55, 0.04  # the true curve: auroc = A + B ln n
SEEDS = (0, 1, 2, 3, 4)


def _grid(rates: dict[str, float]) -> tuple[pd.DataFrame, dict[str, dict[int, float]]]:
    """Grid results and per-seed macros where every arm lies exactly on the true curve at
    n_real + rate * n_extra (seed noise on the real draw size only)."""
    rows, point = [], {}
    for s in SEEDS:
        for f, n in ((0.05, 240 + s), (0.1, 480 + 2 * s), (0.2, 960 + 3 * s)):
            name = f"real_only.f{round(100 * f)}"
            rows.append({"experiment": name, "kind": "real_only", "k": 0, "real_fraction": f,
                         "train_site": "chexpert", "seed": s, "n_real": n, "n_synthetic": 0,
                         "n_unique_real": n})
            point.setdefault(name, {})[s] = A + B * np.log(n)
        n = 240 + s
        for name, kind, rate in (("real_plus_oracle_x2.f5", "real_plus_oracle",
                                  rates["oracle"]),
                                 ("real_plus_shuffled_x2.f5", "real_plus_shuffled",
                                  rates["shuffled"])):
            rows.append({"experiment": name, "kind": kind, "k": 2, "real_fraction": 0.05,
                         "train_site": "chexpert", "seed": s, "n_real": n, "n_synthetic": 2 * n,
                         "n_unique_real": n})
            point.setdefault(name, {})[s] = A + B * np.log(n + rate * 2 * n)
    return pd.DataFrame(rows), point


def _macros(point: dict[str, dict[int, float]], noise: float = 0.002) -> dict[str, SeedMacros]:
    rng = np.random.default_rng(0)
    # The patient bootstrap is shared by every seed: one resampling noise per experiment.
    shared = {e: rng.normal(0, noise, 200) for e in point}
    reps = {e: {s: v + shared[e] for s, v in by.items()} for e, by in point.items()}
    return {"internal": SeedMacros("internal", ("x",), (), 2000, 1500, point, reps,
                                   {e: float(np.mean(list(v.values()))) for e, v in
                                    point.items()})}


def test_rates_are_recovered_from_arms_on_the_curve():
    grid, point = _grid({"oracle": 1.0, "shuffled": 0.25})
    rates = exchange_rates(_macros(point), grid, StatsSpec()).set_index("kind")
    assert rates.loc["real_plus_oracle", "rate"] == pytest.approx(1.0, abs=1e-9)
    assert rates.loc["real_plus_shuffled", "rate"] == pytest.approx(0.25, abs=1e-9)
    oracle = rates.loc["real_plus_oracle"]
    assert oracle["ci_low"] < 1 < oracle["ci_high"] and oracle["n_seeds"] == 5
    assert oracle["real_equivalent"] == pytest.approx(3 * oracle["n_real"], rel=1e-9)
    assert not oracle["extrapolated"]  # 3 x 242 real images lie inside 240..966


def test_arms_beyond_the_curve_are_marked_extrapolated_and_checks_say_so():
    grid, point = _grid({"oracle": 2.5, "shuffled": -0.2})
    macros = _macros(point)
    rates = exchange_rates(macros, grid, StatsSpec())
    oracle = rates.set_index("kind").loc["real_plus_oracle"]
    assert oracle["extrapolated"] and oracle["rate"] == pytest.approx(2.5, abs=1e-9)
    checks = calibration_held(rates, "internal")
    assert "lies above 1" in checks["real_plus_oracle"]
    assert "did not hold" in checks["real_plus_oracle"]
    assert checks["real_plus_shuffled"].endswith("held")
    curve = learning_curve(macros, grid)
    assert len(curve) == 3 and curve["b"].iloc[0] == pytest.approx(B, rel=1e-2)
    assert curve["r2"].iloc[0] > 0.999


def test_fewer_than_three_sizes_is_an_error_naming_the_key():
    grid, point = _grid({"oracle": 1.0, "shuffled": 0.0})
    two = grid[grid["experiment"] != "real_only.f20"]
    with pytest.raises(ValueError, match="experiments.real_fractions"):
        exchange_rates(_macros(point), two, StatsSpec())


def test_no_rate_where_the_curve_is_flat():
    grid, point = _grid({"oracle": 1.0, "shuffled": 0.0})
    flat = {e: {s: 0.7 + (0.0 if e.startswith("real_only") else 0.01) for s in by}
            for e, by in point.items()}
    rates = exchange_rates(_macros(flat, noise=0.01), grid, StatsSpec())
    assert rates["rate"].isna().all() and rates["note"].str.contains("not well").all()
    assert "so not checked" in calibration_held(rates, "internal")["real_plus_oracle"]


def test_worth_against_a_reference_arm_is_paired_with_its_ratio():
    """Planted: the shuffled arm worth 0.4 real images per image, the oracle 0.8. The paired
    difference is -0.4 and the ratio 0.5, each with a CI around it; a reference whose own CI
    reaches 0 gives a ratio without an interval."""
    from cxrlib.study.exchange import worth_comparisons

    grid, point = _grid({"oracle": 0.8, "shuffled": 0.4})
    pair = [("real_plus_shuffled_x2.f5", "real_plus_oracle_x2.f5")]
    row = worth_comparisons(_macros(point), grid, StatsSpec(), pair).iloc[0]
    assert row["difference"] == pytest.approx(-0.4, abs=1e-9)
    assert row["diff_ci_low"] < -0.4 < row["diff_ci_high"] < 0
    assert row["ratio"] == pytest.approx(0.5, abs=1e-9)
    assert row["ratio_ci_low"] < 0.5 < row["ratio_ci_high"] < 1 and row["note"] == ""
    rates = exchange_rates(_macros(point), grid, StatsSpec()).set_index("experiment")
    assert row["rate"] == pytest.approx(rates.loc[pair[0][0], "rate"])
    from cxrlib.study.exchange import worth_sentences

    said = worth_sentences(worth_comparisons(_macros(point), grid, StatsSpec(), pair))[0]
    assert "is worth 0.50 (95% CI" in said and "paired difference in r -0.40" in said
    # a reference worth nothing: the ratio has no interval
    zero, zpoint = _grid({"oracle": 0.0, "shuffled": 0.4})
    flat = worth_comparisons(_macros(zpoint), zero, StatsSpec(), pair).iloc[0]
    assert np.isnan(flat["ratio_ci_low"]) and "reaches 0" in flat["note"]
