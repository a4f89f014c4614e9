"""Statistics (:mod:`cxrlib.stats`): DeLong (plain and patient-clustered), the patient
bootstrap, seeds as a random effect, the label rule, TOST; and the study's tables
(:mod:`cxrlib.study.plan`): the primary analysis, dose-response, subgroups, calibration,
compute and the generated findings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from cxrlib import stats
from cxrlib.core.kinds import Kind
from cxrlib.core.schema import PrimarySpec, StatsSpec
from cxrlib.core.summary import CLAIM_KEYS, PRIMARY_KEYS, schema_problems
from cxrlib.experiments import diagnostics
from cxrlib.notebook_runner import summary_html
from cxrlib.stats import (
    SeedMacros,
    adjust_holm,
    clustered_influence,
    contrast,
    delong_covariance,
    delong_test,
    holm,
    label_rule,
    minimum_detectable_effect,
    patient_bootstrap_weights,
    seed_macros,
    seeds_for_mde,
    weighted_auroc,
)
from cxrlib.study import claims as study_claims
from cxrlib.study import findings, plan, secondary

LABELS = tuple(f"Label{j}" for j in range(10))


def make_study(rng: np.random.Generator, signals: dict[str, float], n_patients: int = 150,
               per_patient: int = 2, seeds: tuple[int, ...] = (0, 1, 2), seed_sd: float = 0.14,
               test_set: str = "internal", groups: dict[str, float] | None = None
               ) -> pd.DataFrame:
    """Long predictions: score = (signal + seed effect) * target + image difficulty + noise.

    Each (experiment, seed, label) draws its own signal around the experiment's (a training
    run's luck: 0.14 moves a label's AUROC by about 0.025); difficulty is shared by all models;
    ``groups`` adds a signal shift for the experiments named, in the "Female" patients only.
    """
    n, n_lab = n_patients * per_patient, len(LABELS)
    target = (rng.random((n, n_lab)) < 0.3).astype(float)
    difficulty = rng.normal(size=(n, n_lab))
    sex = np.repeat(rng.choice(["Male", "Female"], n_patients), per_patient)
    base = pd.DataFrame({
        "image_id": np.repeat([f"{test_set}-i{i:04d}" for i in range(n)], n_lab),
        "patient_id": np.repeat(np.repeat([f"p{i:03d}" for i in range(n_patients)],
                                          per_patient), n_lab),
        "label": np.tile(LABELS, n), "target": target.ravel(), "test_set": test_set,
        "sex": np.repeat(sex, n_lab)})
    parts = []
    for experiment, signal in signals.items():
        shift = (groups or {}).get(experiment, 0.0) * (sex == "Female")[:, None]
        for s in seeds:
            strength = signal + seed_sd * rng.normal(size=n_lab) + shift
            score = strength * target + difficulty + 0.7 * rng.normal(size=(n, n_lab))
            parts.append(base.assign(experiment=experiment, seed=s, score=score.ravel()))
    return pd.concat(parts, ignore_index=True)


def grid_of(experiments: dict[str, tuple[str, int, float]]) -> pd.DataFrame:
    """A grid_results-like frame: experiment -> (kind, k, real_fraction), one seed row each."""
    return pd.DataFrame([{"experiment": e, "kind": kind, "k": k, "real_fraction": f,
                          "train_site": "chexpert", "seed": 0, "train_seconds": 2.0}
                         for e, (kind, k, f) in experiments.items()])


# --- DeLong ---------------------------------------------------------------------------------

def delong_by_definition(y, a, b):
    """DeLong from its definition: O(m n) placements V10/V01, S10/S01 and the z of b - a."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    m, n = len(pos), len(neg)
    v10, v01 = np.zeros((2, m)), np.zeros((2, n))
    for k, s in enumerate((a, b)):
        for i, p in enumerate(pos):
            for j, q in enumerate(neg):
                psi = 1.0 if s[p] > s[q] else 0.5 if s[p] == s[q] else 0.0
                v10[k, i] += psi / n
                v01[k, j] += psi / m
    aucs = v10.mean(axis=1)
    cov = np.cov(v10) / m + np.cov(v01) / n
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    return aucs, cov, (aucs[1] - aucs[0]) / np.sqrt(var)


def test_delong_matches_its_definition_with_ties():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 45)
    a = rng.integers(0, 6, 45).astype(float) + y           # few distinct values: many ties
    b = np.round(a + rng.normal(0, 1.5, 45))
    aucs, cov, z = delong_by_definition(y, a, b)
    fast_aucs, fast_cov = delong_covariance(y, np.vstack([a, b]))
    np.testing.assert_allclose(fast_aucs, aucs, rtol=1e-12)
    np.testing.assert_allclose(fast_cov, cov, rtol=1e-10)
    result = delong_test(y, a, b)
    assert result.auroc_a == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert result.auroc_b == pytest.approx(roc_auc_score(y, b), abs=1e-12)
    assert result.z == pytest.approx(z, rel=1e-10)
    assert 0 < result.p_value < 1


def test_delong_identical_scores_and_swapping():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 60)
    a, b = rng.normal(size=60) + y, rng.normal(size=60) + 0.5 * y
    same = delong_test(y, a, a)
    assert (same.z, same.p_value) == (0.0, 1.0)
    forward, backward = delong_test(y, a, b), delong_test(y, b, a)
    assert forward.z == pytest.approx(-backward.z) and forward.z != 0
    assert forward.p_value == pytest.approx(backward.p_value)


def test_delong_detects_a_strongly_better_score():
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1], 150)
    weak, strong = rng.normal(size=300) + 0.2 * y, rng.normal(size=300) + 2.0 * y
    result = delong_test(y, weak, strong)
    assert result.z > 0 and result.p_value < 0.001


def test_delong_names_bad_inputs():
    with pytest.raises(ValueError, match="same length"):
        delong_test([0, 1, 0, 1], [1, 2, 3, 4], [1, 2, 3])
    with pytest.raises(ValueError, match="two positives"):
        delong_test([0, 0, 0, 1], [1, 2, 3, 4], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="only 0 and 1"):
        delong_test([0, 1, np.nan, 1], [1, 2, 3, 4], [1, 2, 3, 4])


# --- Weighted AUROC and the patient bootstrap -------------------------------------------------

def test_weighted_auroc_equals_sklearn_with_sample_weight():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 70)
    score = rng.integers(0, 8, 70).astype(float)            # ties
    weights = np.vstack([rng.integers(0, 4, 70), rng.uniform(0, 2, 70), np.ones(70)])
    batch = weighted_auroc(y, score, weights)
    for w, value in zip(weights, batch, strict=True):
        expected = roc_auc_score(y, score, sample_weight=w)
        assert value == pytest.approx(expected, abs=1e-12)
        assert float(weighted_auroc(y, score, w)) == pytest.approx(expected, abs=1e-12)
    no_positives = np.where(y == 1, 0.0, 1.0)
    assert np.isnan(weighted_auroc(y, score, no_positives))


def test_bootstrap_weights_are_per_patient():
    patients = np.repeat(["c", "a", "b", "d", "e"], [3, 1, 4, 2, 5])
    weights = patient_bootstrap_weights(patients, n_boot=50, seed=7)
    assert weights.shape == (50, len(patients))
    first = {}
    for i, p in enumerate(patients):
        first.setdefault(p, i)
        np.testing.assert_array_equal(weights[:, i], weights[:, first[p]])
    counts = weights[:, list(first.values())]
    np.testing.assert_array_equal(counts.sum(axis=1), 5)  # five patients drawn per replicate
    assert counts.std() > 0
    shuffled = np.random.default_rng(0).permutation(len(patients))
    again = patient_bootstrap_weights(patients[shuffled], n_boot=50, seed=7)
    np.testing.assert_array_equal(again, weights[:, shuffled])  # independent of row order


def test_holm_against_a_hand_computed_example():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4x, 3x, 2x, 1x = 0.02, 0.03, 0.06, 0.04 -> monotone 0.06
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.01, np.nan, 0.04]), [0.02, np.nan, 0.04])
    np.testing.assert_allclose(holm([0.5, 0.6]), [1.0, 1.0])
    table = pd.DataFrame({"family": ["x", "y", "x"], "p": [0.01, 0.01, 0.04]})
    np.testing.assert_allclose(adjust_holm(table)["p_holm"], [0.02, 0.01, 0.04])


# --- Patient-clustered DeLong ---------------------------------------------------------------

def test_clustered_delong_counts_a_patient_once():
    rng = np.random.default_rng(5)
    y = np.repeat([0, 1], 40)
    a, b = rng.normal(size=80) + 0.8 * y, rng.normal(size=80) + 1.2 * y
    single = delong_test(y, a, b, clusters=np.arange(80))
    plain = delong_test(y, a, b)
    assert single.z == pytest.approx(plain.z, rel=0.03)  # singletons: DeLong up to n/(n-1)
    # Three exact copies of every patient's image: plain DeLong triples its evidence, the
    # clustered test is unchanged (a patient's copies carry one image's information).
    copies = delong_test(np.tile(y, 3), np.tile(a, 3), np.tile(b, 3),
                         clusters=np.tile(np.arange(80), 3))
    assert copies.z == pytest.approx(single.z, rel=1e-9)
    assert delong_test(np.tile(y, 3), np.tile(a, 3), np.tile(b, 3)).z == pytest.approx(
        np.sqrt(3) * plain.z, rel=0.03)
    aucs, psi = clustered_influence(y, np.vstack([a, b]), np.arange(80))
    np.testing.assert_allclose(aucs, delong_covariance(y, np.vstack([a, b]))[0])
    np.testing.assert_allclose(psi.sum(axis=1), 0, atol=1e-12)  # influence values centre


def test_clustered_variance_agrees_with_the_patient_bootstrap():
    rng = np.random.default_rng(6)
    patients = np.repeat(np.arange(120), 3)
    y = (rng.random(360) < 0.4).astype(float)
    shared = np.repeat(rng.normal(size=120), 3)           # patient-level correlation
    score = 1.0 * y + shared + 0.5 * rng.normal(size=360)
    _, psi = clustered_influence(y, score, patients)
    analytic = stats.cluster_covariance(psi)[0, 0]
    reps = weighted_auroc(y, score, patient_bootstrap_weights(patients, 2000, 0))
    assert analytic == pytest.approx(np.var(reps), rel=0.15)


# --- The label rule, seeds as a random effect ------------------------------------------------

def test_label_rule_is_one_rule_and_names_the_labels_left_out():
    targets = np.array([[1, 0, 1], [1, 0, 0], [0, 1, np.nan], [0, 1, np.nan], [0, 0, np.nan]])
    np.testing.assert_array_equal(label_rule(targets, 2), [True, True, False])
    frame = make_study(np.random.default_rng(0), {"real_only": 1.2}, seeds=(0,))
    rare = frame["label"] == "Label9"
    frame.loc[rare, "target"] = np.where(frame.loc[rare, "image_id"] < "internal-i0009", 1.0, 0.0)
    sm = seed_macros(frame, StatsSpec(n_boot=100, min_positives=10))["internal"]
    assert sm.left_out == ("Label9",) and len(sm.labels) == 9
    assert sm.point["real_only"][0] == pytest.approx(np.mean([roc_auc_score(
        g["target"], g["score"]) for lab, g in frame.groupby("label") if lab != "Label9"]))
    # Nine positives pass a rule of nine: one label set for the point and every replicate.
    nine = seed_macros(frame, StatsSpec(n_boot=100, min_positives=9))["internal"]
    assert nine.left_out == () and np.isnan(nine.replicates["real_only"][0]).any()


def hand_macros(points: dict[str, list[float]], reps: dict[str, np.ndarray]) -> SeedMacros:
    """SeedMacros with given per-seed values and replicates (seeds 0..n-1)."""
    return SeedMacros("t", ("L",), (), 10, 10,
                      {k: dict(enumerate(v)) for k, v in points.items()},
                      {k: dict(enumerate(r)) for k, r in reps.items()},
                      {k: float(np.mean(v)) for k, v in points.items()})


def test_contrast_two_level_variance_by_hand():
    rng = np.random.default_rng(1)
    shared = rng.normal(0, 0.01, 4000)                     # patient sampling all seeds share
    reps_b = np.vstack([0.80 + shared + rng.normal(0, 0.002, 4000) for _ in range(3)])
    sm = hand_macros({"b": [0.80, 0.80, 0.80], "e": [0.83, 0.81, 0.82]},
                     {"b": reps_b, "e": reps_b + 0.5 * shared})
    est = contrast(sm, {"e": 1.0, "b": -1.0}, 0.05)
    seed_var = np.var([0.03, 0.01, 0.02], ddof=1) / 3      # 0.0001 / 3
    assert est.estimate == pytest.approx(0.02)
    assert est.seed_se == pytest.approx(np.sqrt(seed_var))
    assert est.patient_se == pytest.approx(0.005, rel=0.1)  # sd of 0.5 * shared
    assert est.se ** 2 == pytest.approx(seed_var + est.patient_se ** 2)
    assert est.df == pytest.approx(est.se ** 4 / (seed_var ** 2 / 2))
    half = sps.t.ppf(0.975, est.df) * est.se
    assert (est.ci_low, est.ci_high) == pytest.approx((0.02 - half, 0.02 + half))
    assert est.p == pytest.approx(2 * sps.t.sf(0.02 / est.se, est.df))
    assert est.mde == pytest.approx((sps.t.ppf(0.975, est.df) + sps.t.ppf(0.8, est.df))
                                    * est.se)
    one = contrast(hand_macros({"b": [0.8], "e": [0.83]}, {"b": reps_b[:1],
                                                          "e": reps_b[:1] + 0.5 * shared}),
                   {"e": 1.0, "b": -1.0}, 0.05)
    assert one.n_seeds == 1 and np.isnan(one.seed_se) and one.df == np.inf
    assert one.se == pytest.approx(0.005, rel=0.1)


def rejection_rate(shift: float, n_studies: int, seed: int) -> float:
    """Share of simulated studies (3 seeds per arm) whose macro comparison has p < 0.05."""
    rng = np.random.default_rng(seed)
    spec = StatsSpec(n_boot=100)
    rejected = 0
    for _ in range(n_studies):
        sm = seed_macros(make_study(rng, {"base": 1.2, "exp": 1.2 + shift}), spec)["internal"]
        rejected += contrast(sm, {"exp": 1.0, "base": -1.0}, 0.05).p < 0.05
    return rejected / n_studies


def test_seed_variation_alone_is_rejected_at_the_nominal_rate_and_a_real_gain_is_found():
    # Arms differ only by training-seed luck (per-label AUROC seed SD about 0.025): the
    # pooled ensemble test rejected about a quarter of such studies; this one about 5%.
    assert 0.01 <= rejection_rate(0.0, 120, seed=1) <= 0.10
    # A signal shift of 0.166 raises every label's AUROC by about 0.03.
    assert rejection_rate(0.166, 120, seed=2) >= 0.45


# --- Comparisons, TOST and the primary analysis ----------------------------------------------

def test_verdicts_follow_tost_and_holm():
    spec = StatsSpec(equivalence_margin=0.02)
    row = {"p_holm": 0.4, "delta": 0.004, "ci90_low": -0.01, "ci90_high": 0.018}
    assert plan._verdict(row, spec.alpha, 0.02) == "matches"
    assert plan._verdict({**row, "ci90_high": 0.021}, spec.alpha, 0.02) == (
        "not shown equivalent")
    assert plan._verdict({**row, "p_holm": 0.01}, spec.alpha, 0.02) == (
        "better (within the equivalence margin)")
    assert plan._verdict({**row, "p_holm": 0.01, "delta": -0.03, "ci90_low": -0.05},
                                 spec.alpha, 0.02) == "worse"


GRID = {"real_only.f100": ("real_only", 0, 1.0),
        "real_plus_synthetic_x1.f100": ("real_plus_synthetic", 1, 1.0),
        "real_plus_synthetic_x2.f100": ("real_plus_synthetic", 2, 1.0),
        "real_repeated_x2.f100": ("real_repeated", 2, 1.0),
        "real_plus_oracle_x2.f100": ("real_plus_oracle", 2, 1.0),
        "synthetic_only_x1.f100": ("synthetic_only", 1, 1.0),
        "real_only.f50": ("real_only", 0, 0.5),
        "real_plus_synthetic_x2.f50": ("real_plus_synthetic", 2, 0.5)}


@pytest.fixture(scope="module")
def study():
    rng = np.random.default_rng(3)
    signals = {"real_only.f100": 1.2, "real_plus_synthetic_x1.f100": 1.4,
               "real_plus_synthetic_x2.f100": 2.2, "real_repeated_x2.f100": 1.2,
               "real_plus_oracle_x2.f100": 2.4,
               "synthetic_only_x1.f100": 1.19, "real_only.f50": 1.0,
               "real_plus_synthetic_x2.f50": 1.0}
    frame = make_study(rng, signals, n_patients=400)
    spec = StatsSpec(n_boot=200)
    return frame, grid_of(GRID), spec, seed_macros(frame, spec)


def test_primary_analysis_is_the_prespecified_set(study):
    frame, grid, spec, macros = study
    primary = plan.primary_analysis(frame, grid, spec)
    assert set(PRIMARY_KEYS) <= set(primary.columns)
    # the hypotheses only: real_repeated is named in stats.primary.kinds but is a control
    assert primary["experiment"].tolist() == ["real_plus_synthetic_x1.f100",
                                              "real_plus_synthetic_x2.f100"]
    assert (primary["baseline"] == "real_only.f100").all()
    np.testing.assert_allclose(primary["p_holm"], holm(primary["p"]))
    big = primary.set_index("experiment").loc["real_plus_synthetic_x2.f100"]
    assert big["delta"] > 0.05 and big["p_holm"] < 0.05 and big["verdict"] == "better"
    # The same rows, to the last digit, inside the table of all comparisons.
    every = plan.compare_experiments(macros, grid, spec)
    pd.testing.assert_frame_equal(
        every[every["primary"]].reset_index(drop=True)[primary.columns], primary)
    at_half = plan.primary_analysis(frame, grid, spec.model_copy(
        update={"primary": PrimarySpec(real_fraction=0.5)}))
    assert at_half["experiment"].tolist() == ["real_plus_synthetic_x2.f50"]
    with pytest.raises(ValueError, match="not a real fraction"):
        plan.primary_analysis(frame, grid, spec.model_copy(
            update={"primary": PrimarySpec(real_fraction=0.25)}))


def test_secondary_comparisons_and_synthetic_only_equivalence(study):
    _, grid, spec, macros = study
    every = plan.compare_experiments(macros, grid, spec).set_index("experiment")
    synthetic = every.loc["synthetic_only_x1.f100"]
    assert not synthetic["primary"] and synthetic["family"] == "real_only.f100: internal"
    assert abs(synthetic["delta"]) < 0.02
    wide = spec.model_copy(update={"equivalence_margin": 0.5})
    relaxed = plan.compare_experiments(macros, grid, wide).set_index("experiment")
    assert relaxed.loc["synthetic_only_x1.f100", "verdict"] == "matches"
    assert synthetic["p_equivalence"] > relaxed.loc["synthetic_only_x1.f100", "p_equivalence"]
    assert every.loc["real_plus_synthetic_x2.f50", "baseline"] == "real_only.f50"


def test_dose_response_includes_k0_and_needs_three_doses(study):
    _, grid, spec, macros = study
    dose = plan.dose_response(macros, grid, spec).set_index("real_fraction")
    row = dose.loc[1.0]
    sm = macros["internal"]
    mean = {e: np.mean(list(sm.point[e].values())) for e in GRID}
    ks = np.array([0.0, 1.0, 2.0])                 # the baseline is dose 0
    levels = [mean["real_only.f100"], mean["real_plus_synthetic_x1.f100"],
              mean["real_plus_synthetic_x2.f100"]]
    assert row["slope_per_k"] == pytest.approx(np.polyfit(ks, levels, 1)[0])
    assert row["slope_per_k"] > 0 and row["primary"] and row["k_values"] == "0, 1, 2"
    assert row["reason"] == "-" and row["mde_holm"] == pytest.approx(row["mde"])  # m = 1
    # 50% has k = 2 and its baseline only: two doses give no slope, and the row says why
    two = dose.loc[0.5]
    assert two["n_doses"] == 2 and np.isnan(two["slope_per_k"]) and np.isnan(two["p_holm"])
    assert "only 2 dose(s) (k = 0, 2; k = 0 is real_only.f50)" in two["reason"]
    text = findings.dose_sentences(dose.reset_index(), spec)
    assert any("no dose-response slope" in t and "at least 3" in t for t in text)
    assert any("k = 0 the baseline" in t for t in text)


def test_compare_labels_with_seeds(study):
    frame, _, spec, _ = study
    pair = ("real_plus_synthetic_x2.f100", "real_only.f100")
    labels = secondary.compare_labels(frame, [pair], spec)
    assert len(labels) == len(LABELS) and (labels["test"] == "clustered DeLong + seeds").all()
    row = labels[labels["label"] == "Label0"].iloc[0]
    sub = frame[(frame["label"] == "Label0")]
    per_seed = [roc_auc_score(g["target"], g["score"]) for _, g in
                sub[sub["experiment"] == pair[0]].groupby("seed")]
    assert row["auroc"] == pytest.approx(np.mean(per_seed))
    assert row["ci_low"] < row["delta"] < row["ci_high"]
    assert (labels["p_holm"] >= labels["p"]).all() and (labels["delta"] > 0).mean() > 0.8


def test_subgroups_difference_in_differences():
    rng = np.random.default_rng(4)
    frame = make_study(rng, {"base": 1.2, "exp": 1.2}, n_patients=400,
                       groups={"exp": 0.6})      # the experiment helps Female patients only
    spec = StatsSpec(n_boot=200, subgroups=["sex"])
    groups, did = secondary.subgroup_analysis(frame, "exp", "base", spec)
    assert set(groups["group"]) == {"Male", "Female"} and len(groups) == 4
    row = did.iloc[0]
    assert row["group"] != row["reference"]
    sign = 1 if row["group"] == "Female" else -1
    assert sign * row["did"] > 0.05 and row["p_holm"] < 0.01
    assert row["did"] == pytest.approx(row["delta_group"] - row["delta_reference"])
    null_study = make_study(rng, {"base": 1.2, "exp": 1.2}, n_patients=400)
    null = secondary.subgroup_analysis(null_study, "exp", "base", spec)[1].iloc[0]
    assert null["ci_low"] < 0 < null["ci_high"]


def test_subgroup_pair_is_prespecified():
    grid = grid_of(GRID)
    assert secondary.subgroup_pair(grid, StatsSpec()) == ("real_plus_synthetic_x2.f100",
                                                            "real_only.f100")
    chosen = StatsSpec(primary=PrimarySpec(subgroup_k=1))
    assert secondary.subgroup_pair(grid, chosen)[0] == "real_plus_synthetic_x1.f100"


# --- Calibration, AUPRC, seeds and compute ---------------------------------------------------

def test_calibration_metrics_by_hand():
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.3, 0.6, 0.9])
    brier, ece, _ = stats.calibration_metrics(y, p, bins=2)
    assert brier == pytest.approx((0.01 + 0.09 + 0.16 + 0.01) / 4)
    assert ece == pytest.approx((2 * abs(0 - 0.2) + 2 * abs(1 - 0.75)) / 4)
    rng = np.random.default_rng(7)
    prob = rng.uniform(0.02, 0.98, 20000)
    outcome = (rng.random(20000) < prob).astype(float)
    assert stats.calibration_metrics(outcome, prob, 10)[2] == pytest.approx(1.0, abs=0.08)
    sharp = 1 / (1 + np.exp(-3 * np.log(prob / (1 - prob))))   # overconfident: slope 1/3
    assert stats.calibration_metrics(outcome, sharp, 10)[2] == pytest.approx(1 / 3, abs=0.05)


def test_calibration_table_and_label_metrics(study):
    frame, _, spec, _ = study
    probs = frame.assign(score=1 / (1 + np.exp(-frame["score"])))
    table = secondary.calibration_table(probs, spec).set_index("experiment")
    assert table.loc["real_only.f100", "n_seeds"] == 3
    base = probs[probs["experiment"] == "real_only.f100"]
    brier = base.assign(sq=(base["score"] - base["target"]) ** 2).groupby(["seed", "label"])[
        "sq"].mean().groupby("seed").mean().mean()
    assert table.loc["real_only.f100", "brier"] == pytest.approx(brier)
    labels = secondary.label_metrics(probs, spec)
    row = labels[(labels["experiment"] == "real_only.f100") & (labels["label"] == "Label0")]
    sub = probs[(probs["experiment"] == "real_only.f100") & (probs["label"] == "Label0")]
    from sklearn.metrics import average_precision_score
    expected = np.mean([average_precision_score(g["target"], g["score"])
                        for _, g in sub.groupby("seed")])
    assert row["auprc"].iloc[0] == pytest.approx(expected)
    assert not row["rare"].iloc[0] and row["in_macro"].iloc[0]


def test_seed_spread_and_compute_table(study):
    frame, grid, spec, macros = study
    spread = diagnostics.seed_spread(frame, spec.min_positives).set_index("experiment")
    values = list(macros["internal"].point["real_only.f100"].values())
    assert spread.loc["real_only.f100", "macro_auroc_mean"] == pytest.approx(np.mean(values))
    assert spread.loc["real_only.f100", "macro_auroc_min"] == pytest.approx(min(values))
    old = diagnostics.compute_table(grid)           # a run from before the compute columns
    assert old["optimizer_steps"].isna().all() and (old["train_seconds"] == 2.0).all()
    assert old["kept_step"].isna().all() and old["protocol"].isna().all()
    new = diagnostics.compute_table(grid.assign(
        optimizer_steps=[10, 20, 30, 40, 50, 60, 70, 80], best_step=[5, 10, 15, 20, 25, 30, 35, 40],
        images_seen=320, protocol="converged"))
    row = new.set_index("experiment").loc["real_only.f50"]
    assert (row["optimizer_steps"], row["kept_step"], row["protocol"]) == (70, 35, "converged")


# --- Findings ---------------------------------------------------------------------------------

def test_findings_state_numbers_and_rules(study):
    frame, grid, spec, macros = study
    summary = plan.experiment_summary(macros, grid, spec)
    primary = plan.primary_analysis(macros, grid, spec)
    every = plan.compare_experiments(macros, grid, spec)
    dose = plan.dose_response(macros, grid, spec)
    checks = plan.manipulation_checks(macros, grid, spec)
    claims = study_claims.claims_table(every, grid, spec)
    flags = diagnostics.training_flags(grid, every, checks)
    _, did = secondary.subgroup_analysis(frame, *secondary.subgroup_pair(grid, spec),
                                            spec.model_copy(update={"subgroups": ["sex"]}))
    text = findings.study_findings(summary, primary, dose, every, did, spec, claims=claims,
                                   checks=checks, flags=flags)
    # the findings open with one sentence per claim of the paper
    assert [t[:8] for t in text[:3]] == ["Claim 1 ", "Claim 2 ", "Claim 3 "]
    assert "not tested externally (no external test set in this run)" in text[0]
    assert "supported on internal by real_plus_synthetic_x2.f100" in text[0]
    assert "not tested in this run (no synthetic_only arm with k = 2, 3" in text[1]
    assert any("at least 10 positives and 10 negatives" in s and "left out: -" in s
               for s in text)
    big = primary.set_index("experiment").loc["real_plus_synthetic_x2.f100"]
    sentence = next(s for s in text if s.startswith(
        "On internal, real_plus_synthetic_x2.f100 vs real_only.f100"))
    assert f"delta {big['delta']:+.3f}" in sentence and f"MDE {big['mde']:.3f}" in sentence
    assert f"{big['mde_holm']:.3f} at Holm's first level, alpha/2" in sentence
    assert "3 seeds paired by seed" in sentence and "better (Holm-adjusted p" in sentence
    check = next(s for s in text if s.startswith(
        "Manipulation check (control: real + perfect generator; expected better"))
    assert "real_plus_oracle_x2.f100 vs real_only.f100" in check and "check held" in check
    assert text.index(check) > text.index(sentence)         # checks follow the hypotheses
    assert any(s.startswith("Manipulation check (more real data beats less") for s in text)
    assert any("synthetic_only_x1.f100 (synthetic training images only)" in s
               and ("not shown equivalent" in s or "matches (TOST" in s) for s in text)
    assert any("difference-in-differences" in s for s in text)
    one_seed = findings.design_sentences(summary.assign(n_seeds=1), spec)
    assert "training variance is not estimated" in one_seed[1]


# --- Inference at its real degrees of freedom (issue 18) --------------------------------------

def test_mde_uses_t_at_the_comparisons_df_and_the_holm_level():
    se = 0.01
    normal = (sps.norm.ppf(0.975) + sps.norm.ppf(0.8)) * se
    small = minimum_detectable_effect(se, 2.5, 0.05)
    assert small == pytest.approx((sps.t.ppf(0.975, 2.5) + sps.t.ppf(0.8, 2.5)) * se)
    assert small > 1.5 * normal                          # 2-5 df: far above the normal value
    assert minimum_detectable_effect(se, np.inf, 0.05) == pytest.approx(normal)
    assert minimum_detectable_effect(se, 1e6, 0.05) == pytest.approx(normal, rel=1e-4)
    first_holm = minimum_detectable_effect(se, 4.0, 0.05 / 3)  # three hypotheses
    assert first_holm == pytest.approx((sps.t.ppf(1 - 0.05 / 6, 4.0) + sps.t.ppf(0.8, 4.0)) * se)
    assert first_holm > minimum_detectable_effect(se, 4.0, 0.05)
    assert np.isnan(minimum_detectable_effect(np.nan, 3.0, 0.05))


def test_seeds_for_mde_is_the_fewest_seeds_whose_mde_reaches_the_target():
    """The demo's internal comparison: 5 seeds, MDE 0.025 against a 0.02 target."""
    seed_se, patient_se, n = 0.0075, 0.002, 5

    def mde_at(k: int) -> float:  # the same comparison with k seeds
        seed_var = seed_se ** 2 * n / k
        total = seed_var + patient_se ** 2
        return minimum_detectable_effect(np.sqrt(total), total ** 2 / (seed_var ** 2 / (k - 1)),
                                         0.05)

    assert mde_at(n) > 0.02
    k = seeds_for_mde(seed_se, patient_se, n, 0.02, 0.05)
    assert k is not None and k > n and mde_at(k) <= 0.02 < mde_at(k - 1)
    assert seeds_for_mde(seed_se, 0.02, n, 0.02, 0.05) is None  # the test set's own variance
    assert seeds_for_mde(seed_se, patient_se, 1, 0.02, 0.05) is None  # one seed: unknown


def test_primary_mde_at_the_familys_holm_level(study):
    _, grid, spec, macros = study
    primary = plan.primary_analysis(macros, grid, spec)
    assert (primary["family_size"] == 2).all()
    for row in primary.to_dict("records"):
        assert row["mde"] == pytest.approx(minimum_detectable_effect(row["se"], row["df"], 0.05))
        assert row["mde_holm"] == pytest.approx(
            minimum_detectable_effect(row["se"], row["df"], 0.05 / 2))
        assert row["mde_holm"] > row["mde"] > 0


def test_controls_are_manipulation_checks_outside_the_holm_family(study):
    _, grid, spec, macros = study
    hypotheses_only = grid[~grid["kind"].map(lambda k: Kind(k).control)]
    alone = plan.primary_analysis(macros, hypotheses_only, spec)
    with_controls = plan.primary_analysis(macros, grid, spec)
    pd.testing.assert_series_equal(with_controls["p_holm"], alone["p_holm"])
    named = spec.model_copy(update={"primary": PrimarySpec(
        kinds=[Kind.REAL_PLUS_SYNTHETIC, Kind.REAL_PLUS_ORACLE, Kind.REAL_REPEATED])})
    pd.testing.assert_series_equal(
        plan.primary_analysis(macros, grid, named)["p_holm"], alone["p_holm"])
    every = plan.compare_experiments(macros, grid, spec).set_index("experiment")
    oracle = every.loc["real_plus_oracle_x2.f100"]
    assert oracle["control"] and not oracle["primary"]
    assert oracle["family"] == "check: real_plus_oracle_x2.f100 vs real_only.f100: internal"
    checks = plan.manipulation_checks(macros, grid, spec)
    assert list(zip(checks["experiment"], checks["baseline"], strict=True)) == [
        ("real_repeated_x2.f100", "real_only.f100"), ("real_plus_oracle_x2.f100", "real_only.f100"),
        ("real_only.f100", "real_only.f50")]             # more real data beats less
    np.testing.assert_allclose(checks["p_holm"], checks["p"])  # each check is judged alone
    by = checks.set_index("experiment")
    assert by.loc["real_plus_oracle_x2.f100", "delta"] == pytest.approx(oracle["delta"])
    assert by.loc["real_plus_oracle_x2.f100", ["expected", "verdict", "held"]].tolist() == [
        "better", "better", True]
    assert by.loc["real_repeated_x2.f100", "expected"] == "not better"
    assert by.loc["real_repeated_x2.f100", "held"]
    more = by.loc["real_only.f100"]
    assert more["check"] == plan.MORE_REAL and more["delta"] > 0
    assert more["held"] == more["verdict"].startswith("better")
    assert set(plan.CHECK_EXPECTATIONS) == {k for k in Kind if k.control}


def test_check_outcomes_follow_their_expectation():
    held = plan._held
    assert held("better", "better") and not held("not shown equivalent", "better")
    assert held("worse", "not better") and not held("better (within the equivalence margin)",
                                                    "not better")
    assert held("not shown equivalent", "not worse") and not held("worse", "not worse")
    assert held("better", "reported") is None and held("n/a", "better") is None


def _claims_grid() -> pd.DataFrame:
    """A grid with the arms of the three claims, protocol steps, passes and kept steps."""
    arms = {"real_only.f20": ("real_only", 0, 0.2, 300, 12.0),
            "real_plus_synthetic_x2.f20": ("real_plus_synthetic", 2, 0.2, 900, 4.0),
            "synthetic_only_x1.f20": ("synthetic_only", 1, 0.2, 300, 0.0),
            "synthetic_only_x2.f20": ("synthetic_only", 2, 0.2, 300, 0.0),
            "real_only.f10": ("real_only", 0, 0.1, 200, 12.0),
            "real_plus_synthetic_x2.f10": ("real_plus_synthetic", 2, 0.1, 300, 4.0),
            "nih_only": ("external_only", 0, 1.0, 100, 6.0),
            "nih_plus_synthetic_x1": ("external_plus_synthetic", 1, 1.0, 150, 3.0)}
    return pd.DataFrame([{"experiment": e, "kind": kind, "k": k, "real_fraction": f,
                          "train_site": "nih" if kind.startswith("external") else "chexpert",
                          "seed": 0, "protocol": "steps", "best_step": kept,
                          "passes_per_real_image": passes, "converged": True}
                         for e, (kind, k, f, kept, passes) in arms.items()])


def _claims_comparisons(grid: pd.DataFrame) -> pd.DataFrame:
    """Comparison rows as compare_experiments gives them, with chosen numbers and verdicts."""
    rows = [("real_plus_synthetic_x2.f20", "chexpert (internal)", 0.03, 0.01, 0.05, "better"),
            ("real_plus_synthetic_x2.f20", "nih (external)", 0.01, -0.02, 0.04,
             "not shown equivalent"),
            ("real_plus_synthetic_x2.f10", "chexpert (internal)", -0.05, -0.07, -0.03, "worse"),
            ("synthetic_only_x1.f20", "chexpert (internal)", -0.08, -0.1, -0.06, "worse"),
            ("synthetic_only_x2.f20", "chexpert (internal)", -0.004, -0.012, 0.004, "matches"),
            ("nih_plus_synthetic_x1", "nih (external)", -0.03, -0.05, -0.01, "worse")]
    info = plan.experiment_info(grid).set_index("experiment")
    return pd.DataFrame([{"experiment": e, "baseline": info.loc[e, "baseline"],
                          "kind": info.loc[e, "kind"], "k": info.loc[e, "k"],
                          "real_fraction": info.loc[e, "real_fraction"], "test_set": t,
                          "delta": d, "ci_low": lo, "ci_high": hi, "ci90_low": lo + 0.002,
                          "ci90_high": hi - 0.002, "p_holm": 0.01 if v in ("better", "worse")
                          else 0.5, "mde": 0.029, "mde_holm": 0.043, "family_size": 2,
                          "verdict": v} for e, t, d, lo, hi, v in rows])


def test_claim_verdicts():
    verdict = study_claims.claim_verdict
    assert verdict("gain", "better (within the equivalence margin)", 0.001, 0.01, 0.02) == (
        "supported")
    assert verdict("gain", "worse", -0.05, -0.03, 0.02) == "contradicted"
    assert verdict("gain", "matches", -0.01, 0.01, 0.02) == "contradicted"  # no gain that size
    assert verdict("gain", "not shown equivalent", -0.01, 0.03, 0.02) == "inconclusive"
    assert verdict("equivalence", "worse (within the equivalence margin)", -0.019, -0.001,
                   0.02) == "supported"
    assert verdict("equivalence", "worse", -0.05, -0.03, 0.02) == "contradicted"
    assert verdict("equivalence", "not shown equivalent", -0.03, 0.01, 0.02) == "inconclusive"
    assert verdict("equivalence", "better", 0.01, 0.05, 0.02) == "supported"


def test_claims_table_answers_the_papers_claims():
    grid = _claims_grid()
    comparisons = _claims_comparisons(grid)
    exchange = pd.DataFrame([{"experiment": "real_plus_synthetic_x2.f20",
                              "test_set": "chexpert (internal)", "rate": 0.5, "ci_low": 0.2,
                              "ci_high": 0.9, "extrapolated": True}])
    claims = study_claims.claims_table(comparisons, grid, StatsSpec(), exchange)
    got = {(r["claim"], r["test_set"], r["experiment"]): r["verdict"]
           for r in claims.to_dict("records")}
    assert got == {  # the primary fraction (20%) only; synthetic only at k = 2-3 only
        (1, "chexpert (internal)", "real_plus_synthetic_x2.f20"): "supported",
        (1, "nih (external)", "real_plus_synthetic_x2.f20"): "inconclusive",
        (2, "chexpert (internal)", "synthetic_only_x2.f20"): "supported",
        (3, "nih (external)", "nih_plus_synthetic_x1"): "contradicted"}
    first = claims.iloc[0]
    assert (first["exchange_rate"], first["exchange_extrapolated"]) == (0.5, True)
    assert np.isnan(claims.iloc[1]["exchange_rate"])
    # the landing page shows the rate with its CI in one cell, and - where a claim has none;
    # arms and test sets by their labels, verdicts in the one word set
    rows = claims[list(CLAIM_KEYS)].to_dict("records")
    labels = {"arms": {"real_plus_synthetic_x2.f20": "20% real + 200% synthetic",
                       "real_only.f20": "20% real only"},
              "test_sets": {"chexpert (internal)": "CheXpert-style phantoms (internal)"}}
    page = summary_html({"claims": rows, "internal_test_images": 10, "labels": labels})
    assert "<td>0.500 (0.200 to 0.900), extrapolated</td>" in page
    assert page.count("<td>0.500") == 1 and "nan" not in page
    assert "20% real + 200% synthetic vs 20% real only" in page
    assert "real_plus_synthetic_x2.f20" not in page and "CheXpert-style phantoms" in page
    # no exponent in a cell: a CI bound just below 0, a large count
    cells = summary_html({"claims": [{**rows[0], "ci_low": -7.66e-05, "mde": 12345.0}],
                          "internal_test_images": 10})
    assert "-0.000 to" in cells and "<td>12,345</td>" in cells and "e-05" not in cells
    assert study_claims.DISTILLATION["all"] in first["confounds"]
    narrowed = study_claims.claims_table(comparisons, grid, StatsSpec(), exchange,
                                         train_on="sources").iloc[0]["confounds"]
    assert study_claims.DISTILLATION["sources"] in narrowed
    assert study_claims.DISTILLATION["all"] not in narrowed
    assert "see each real image 4.0 vs 12.0 times" in first["confounds"]   # protocol steps
    assert "kept steps differ more than 2-fold (900 vs 300)" in first["confounds"]
    assert "external_plus_real" in claims.iloc[3]["confounds"]
    spec = StatsSpec()
    summary = findings.claims_summary(claims, spec)
    assert len(summary) == 3 and summary[2].startswith("Claim 3 (an external site's data")
    assert "contradicted on nih (external) by nih_plus_synthetic_x1 vs nih_only" in summary[2]
    text = findings.claim_sentences(claims, spec)
    assert "worth 0.50 real images (95% CI 0.20 to 0.90, extrapolated" in text[0]
    assert "detects 0.029 with 80% power (0.043 at its family's first Holm level)" in text[1]
    # without the arms (or an external test set) a claim is not tested in this run
    internal = comparisons[comparisons["kind"] == "real_plus_synthetic"]
    internal = internal[internal["test_set"] == "chexpert (internal)"]
    few = study_claims.claims_table(internal, grid, spec)
    assert few["verdict"].tolist() == ["not tested in this run", "supported",
                                       "not tested in this run", "not tested in this run"]
    assert few.iloc[0]["tested"] == "no external test set in this run"
    assert few.iloc[2]["tested"] == ("no synthetic_only arm with k = 2, 3 at 20% real data in "
                                     "the grid")


def test_training_flags_name_kept_steps_and_unconverged_arms():
    grid = _claims_grid()
    grid.loc[grid["experiment"] == "nih_plus_synthetic_x1", ["protocol", "converged"]] = [
        "converged", False]
    flags = diagnostics.training_flags(grid, _claims_comparisons(grid))
    kept = flags[flags["flag"] == diagnostics.KEPT_STEPS_DIFFER]
    assert kept["experiment"].tolist() == ["real_plus_synthetic_x2.f20"]   # 900 vs 300
    stuck = flags[flags["flag"] == diagnostics.NOT_CONVERGED].iloc[0]
    assert (stuck["experiment"], stuck["seeds_not_converged"], stuck["n_seeds"]) == (
        "nih_plus_synthetic_x1", 1, 1)
    text = findings.flag_sentences(flags)
    assert "kept step 900 against 300 for real_only.f20" in text[0]
    assert "did not converge in 1 of 1 seeds" in text[1]


def test_summary_schema_checks_the_new_rows():
    summary = {"primary": [{k: 0 for k in PRIMARY_KEYS if k != "mde_holm"}], "claims": []}
    problems = schema_problems(summary)
    assert "primary[0] lacks ['mde_holm']" in problems
    assert any("'claims' is empty" in p for p in problems)
    assert "missing key 'manipulation_checks'" in problems


def test_supplementation_figure_legend_names_only_the_kinds_that_ran():
    """Figure 3 on a grid without synthetic-only arms lists no empty "synthetic only" entry."""
    import matplotlib

    matplotlib.use("Agg")
    from cxrlib.study.figures import supplementation_figure

    rows = [("real_only", 0, 0.80), ("real_plus_synthetic", 1, 0.81),
            ("real_plus_synthetic", 2, 0.82), ("real_plus_oracle", 2, 0.84)]
    summary = pd.DataFrame([{"kind": kind, "k": k, "real_fraction": 0.05, "test_set": "internal",
                             "macro_auroc": a, "ci_low": a - 0.01, "ci_high": a + 0.01}
                            for kind, k, a in rows])
    fig = supplementation_figure(summary, 0.05)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert Kind.SYNTHETIC_ONLY.label not in labels
    assert {Kind.REAL_PLUS_SYNTHETIC.label, Kind.REAL_PLUS_ORACLE.label} <= set(labels)


def test_the_headline_baseline_is_the_primary_fractions_real_only_arm():
    summary = pd.DataFrame({
        "experiment": ["real_only.f5", "real_only.f20", "real_plus_synthetic_x2.f5",
                       "real_only.f5"],
        "kind": [Kind.REAL_ONLY, Kind.REAL_ONLY, Kind.REAL_PLUS_SYNTHETIC, Kind.REAL_ONLY],
        "real_fraction": [0.05, 0.2, 0.05, 0.05],
        "test_set": ["int", "int", "int", "ext"],
        "macro_auroc": [0.72, 0.80, 0.70, 0.60]})
    at = plan.internal_baseline
    assert at(summary, "int", 0.05)["macro_auroc"] == 0.72  # the primary comparisons' baseline
    assert at(summary, "int")["macro_auroc"] == 0.80  # none given: the largest fraction
    with pytest.raises(ValueError, match=r"real_fraction 0.1 has no real_only result on int"):
        at(summary, "int", 0.1)


def test_the_headline_reads_each_result_against_the_positive_control_beside_it():
    """A gain on a test set where the perfect generator did not show its own gain says so in
    the same sentence; an inconclusive result states its MDE; labels replace identifiers."""
    row = {"experiment": "real_plus_synthetic_x2.f5", "baseline": "real_only.f5",
           "delta": 0.052, "ci_low": 0.027, "ci_high": 0.077, "mde": 0.034}
    check = {"check": Kind.REAL_PLUS_ORACLE.label, "baseline": "real_only.f5"}
    summary = {
        "primary": [{**row, "test_set": "nih (external)", "verdict": "better"},
                    {**row, "test_set": "chexpert (internal)", "verdict": "not shown equivalent",
                     "delta": 0.010, "ci_low": -0.005, "ci_high": 0.025, "mde": 0.021}],
        "manipulation_checks": [{**check, "test_set": "nih (external)", "held": False},
                                {**check, "test_set": "chexpert (internal)", "held": True},
                                {**check, "baseline": "real_only.f20",
                                 "test_set": "chexpert (internal)", "held": False}],
        "exchange_rate": {"real_plus_synthetic_x2.f5": {"rate": 0.11, "ci_low": -0.04,
                                                        "ci_high": 0.26},
                          "real_plus_synthetic_x1.f5": {"rate": None}},
        "labels": {"arms": {"real_plus_synthetic_x2.f5": "5% real + 200% synthetic",
                            "real_only.f5": "5% real only"},
                   "test_sets": {"nih (external)": "NIH-style phantoms (external)"}},
    }
    first, worth = findings.headline(summary)
    assert first.startswith("5% real + 200% synthetic against 5% real only")
    assert ("NIH-style phantoms (external) +0.052 (+0.027 to +0.077), better, though the "
            "perfect generator did not show its own gain there") in first
    assert ("chexpert (internal) +0.010 (-0.005 to +0.025), inconclusive (only a difference "
            "above 0.021 could be detected), while the perfect generator did show its gain "
            "there") in first
    assert worth.endswith("5% real + 200% synthetic 0.110 (-0.040 to 0.260).")
    assert findings.headline({}) == []
    summary["worth_vs_perfect"] = {"real_plus_synthetic_x2.f5": {
        "reference": "real_plus_oracle_x2.f5", "ratio": 0.25, "ratio_ci_low": -0.24,
        "ratio_ci_high": 0.75}}
    share = findings.headline(summary)[-1]
    assert share.startswith("Against the perfect generator at the same dose")
    assert "5% real + 200% synthetic is worth 0.25 (95% CI -0.24 to 0.75) of one" in share
