"""Statistics: DeLong, weighted AUROC, the patient bootstrap, Holm, subgroups and findings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from cxrlib import stats
from cxrlib.config import StatsSpec
from cxrlib.stats import (
    adjust_holm,
    age_band,
    bootstrap_ci,
    compare_to_baseline,
    delong_covariance,
    delong_test,
    findings,
    holm,
    macro_summary,
    paired_bootstrap_test,
    patient_bootstrap_weights,
    seed_spread,
    subgroup_auroc,
    subgroup_gap,
    weighted_auroc,
)

LABELS = ("Cardiomegaly", "Edema", "Pleural Effusion", "Fracture")


def make_predictions(signals: dict[str, float], n_patients: int = 80,
                     images_per_patient: int = 2, seeds: tuple[int, ...] = (0, 1),
                     test_sets: tuple[str, ...] = ("internal",), seed: int = 0) -> pd.DataFrame:
    """Long predictions: score = signal * target + shared image difficulty + per-seed noise."""
    rng = np.random.default_rng(seed)
    parts = []
    for test_set in test_sets:
        n = n_patients * images_per_patient
        per_patient = {
            "patient_id": [f"{test_set}-p{i:03d}" for i in range(n_patients)],
            "sex": rng.choice(["Male", "Female"], n_patients),
            "age": rng.uniform(20, 95, n_patients),
            "race": rng.choice(["White", "Asian", "Black/African American", "Unknown"],
                               n_patients),
        }
        images = pd.DataFrame({k: np.repeat(v, images_per_patient) for k, v in per_patient.items()})
        images["image_id"] = [f"{test_set}-i{i:04d}" for i in range(n)]
        images["view"] = rng.choice(["AP", "PA"], n)
        targets = (rng.random((n, len(LABELS))) < 0.3).astype(float)
        targets[rng.random(targets.shape) < 0.05] = np.nan
        difficulty = rng.normal(size=targets.shape)
        for experiment, signal in signals.items():
            for s in seeds:
                scores = signal * np.nan_to_num(targets) + difficulty + 0.5 * rng.normal(
                    size=targets.shape)
                for j, label in enumerate(LABELS):
                    parts.append(images.assign(experiment=experiment, seed=s, test_set=test_set,
                                               label=label, target=targets[:, j],
                                               score=scores[:, j]))
    return pd.concat(parts, ignore_index=True)


def pooled(frame: pd.DataFrame, label: str) -> pd.DataFrame:
    """Seed-averaged score and target per image for one label, known targets only."""
    g = frame[(frame["label"] == label) & frame["target"].notna()]
    return g.groupby("image_id").agg(target=("target", "first"), score=("score", "mean"))


def sklearn_auroc(frame: pd.DataFrame, label: str) -> float:
    """Reference AUROC of the seed-averaged scores."""
    p = pooled(frame, label)
    return roc_auc_score(p["target"], p["score"])


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


def test_bootstrap_ci_is_reproducible_by_seed():
    frame = make_predictions({"real_only": 1.0})
    one, two = bootstrap_ci(frame, n_boot=200, seed=5), bootstrap_ci(frame, n_boot=200, seed=5)
    pd.testing.assert_frame_equal(one, two)
    other = bootstrap_ci(frame, n_boot=200, seed=6)
    assert not np.allclose(one["ci_low"], other["ci_low"])
    pd.testing.assert_series_equal(one["auroc"], other["auroc"])


def test_bootstrap_resamples_patients_not_images():
    rng = np.random.default_rng(8)
    n_patients, per_patient = 40, 10
    target = np.repeat(rng.integers(0, 2, n_patients), per_patient).astype(float)
    score = np.repeat(rng.normal(size=n_patients), per_patient) + target
    frame = pd.DataFrame({"image_id": np.arange(n_patients * per_patient),
                          "patient_id": np.repeat(np.arange(n_patients), per_patient),
                          "test_set": "t", "label": "Edema", "target": target, "score": score})
    by_patient = bootstrap_ci(frame, n_boot=300, seed=0).iloc[-1]
    by_image = bootstrap_ci(frame.assign(patient_id=frame["image_id"]), n_boot=300,
                            seed=0).iloc[-1]
    assert by_patient["auroc"] == by_image["auroc"]
    width = by_patient["ci_high"] - by_patient["ci_low"]
    assert width > 2 * (by_image["ci_high"] - by_image["ci_low"])  # ~sqrt(10) expected


def test_macro_leaves_out_a_label_without_positives_and_names_it():
    frame = make_predictions({"real_only": 1.0})
    frame.loc[frame["label"] == "Fracture", "target"] = 0.0
    table = bootstrap_ci(frame, n_boot=100).set_index("label")
    expected = {lab: sklearn_auroc(frame, lab) for lab in LABELS[:3]}
    for lab, auc in expected.items():
        assert table.at[lab, "auroc"] == pytest.approx(auc, abs=1e-12)
        assert table.at[lab, "ci_low"] < auc < table.at[lab, "ci_high"]
    assert not table.at["Fracture", "in_macro"] and np.isnan(table.at["Fracture", "auroc"])
    assert table.at["macro", "auroc"] == pytest.approx(np.mean(list(expected.values())))
    summary = macro_summary(frame, n_boot=100).iloc[0]
    assert (summary["labels_used"], summary["left_out"]) == (3, "Fracture")
    assert summary["macro_auroc"] == pytest.approx(table.at["macro", "auroc"])


def test_paired_bootstrap_test():
    frame = make_predictions({"real_only": 0.8, "better": 2.0})
    a, b = (frame[frame["experiment"] == e] for e in ("real_only", "better"))
    same = paired_bootstrap_test(a, a, n_boot=200)
    assert (same.delta, same.p_value, same.ci_low, same.ci_high) == (0.0, 1.0, 0.0, 0.0)
    gain = paired_bootstrap_test(a, b, n_boot=200, seed=1)
    assert gain.delta == pytest.approx(gain.macro_b - gain.macro_a) and gain.delta > 0
    assert 0 < gain.ci_low < gain.delta < gain.ci_high
    assert gain.p_value == pytest.approx(2 / 201)  # no replicate at or below zero
    loss = paired_bootstrap_test(b, a, n_boot=200, seed=1)
    assert loss.delta == pytest.approx(-gain.delta) and loss.p_value == gain.p_value
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap_test(a, b[b["image_id"] != "internal-i0000"], n_boot=10)


def test_predictions_are_checked():
    frame = make_predictions({"real_only": 1.0, "other": 1.0}, n_patients=20)
    with pytest.raises(ValueError, match="other has between 1 and 2 rows"):
        macro_summary(frame.drop(index=frame.index[-1]), n_boot=10)
    one_seed = frame[frame["seed"] == 0]
    with pytest.raises(ValueError, match="other lacks scores for 1 of"):
        macro_summary(one_seed.drop(index=one_seed.index[-1]), n_boot=10)
    changed = frame.copy()
    changed.loc[changed.index[-1], "target"] = 1 - np.nan_to_num(changed["target"].iloc[-1])
    with pytest.raises(ValueError, match="different targets"):
        macro_summary(changed, n_boot=10)
    with pytest.raises(ValueError, match="must hold one experiment"):
        bootstrap_ci(frame, n_boot=10)
    with pytest.raises(ValueError, match="baseline 'missing'"):
        compare_to_baseline(frame, "missing", n_boot=10)


# --- Holm and comparisons -------------------------------------------------------------------

def test_holm_against_a_hand_computed_example():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4x, 3x, 2x, 1x = 0.02, 0.03, 0.06, 0.04 -> monotone 0.06
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.01, np.nan, 0.04]), [0.02, np.nan, 0.04])
    np.testing.assert_allclose(holm([0.5, 0.6]), [1.0, 1.0])
    table = pd.DataFrame({"family": ["x", "y", "x"], "p_value": [0.01, 0.01, 0.04]})
    np.testing.assert_allclose(adjust_holm(table, by=["family"])["p_adjusted"], [0.02, 0.01, 0.04])


@pytest.fixture(scope="module")
def experiments():
    frame = make_predictions({"real_only": 0.8, "real_plus_synthetic_x2": 2.0,
                              "synthetic_only_x1": 0.75}, test_sets=("internal", "external"))
    copy = frame[frame["experiment"] == "real_only"].assign(experiment="copy_of_real")
    return pd.concat([frame, copy], ignore_index=True)


@pytest.fixture(scope="module")
def comparison(experiments):
    # 200 replicates: the smallest p is 2/201, below 0.05 / 3 for Holm over three experiments
    return compare_to_baseline(experiments, "real_only", n_boot=200)


def test_compare_to_baseline(experiments, comparison):
    table = comparison
    macro = table[table["level"] == "macro"].set_index(["test_set", "experiment"])
    assert len(macro) == 6 and "real_only" not in macro.index.get_level_values("experiment")
    np.testing.assert_allclose(macro["delta"], macro["auroc"] - macro["baseline_auroc"])
    summary = macro_summary(experiments, n_boot=200).set_index(["test_set", "experiment"])
    np.testing.assert_allclose(macro["auroc"], summary.loc[macro.index, "macro_auroc"])
    np.testing.assert_allclose(macro["ci_low"], summary.loc[macro.index, "ci_low"])
    gain = macro.loc[("internal", "real_plus_synthetic_x2")]
    assert gain["delta"] > 0 and gain["p_adjusted"] < 0.05
    assert macro.loc[("internal", "copy_of_real"), ["delta", "p_value"]].tolist() == [0.0, 1.0]
    assert (table["p_adjusted"] >= table["p_value"] - 1e-12).all()
    assert set(table["comparison_family"]) == {"internal: macro", "internal: label",
                                               "external: macro", "external: label"}
    row = table[(table["test_set"] == "external") & (table["label"] == "Edema")
                & (table["experiment"] == "synthetic_only_x1")].iloc[0]
    frame = experiments[experiments["test_set"] == "external"]
    base = pooled(frame[frame["experiment"] == "real_only"], "Edema")
    other = pooled(frame[frame["experiment"] == "synthetic_only_x1"], "Edema")
    expected = delong_test(base["target"], base["score"], other["score"])
    assert row["p_value"] == pytest.approx(expected.p_value)
    assert row["auroc"] == pytest.approx(expected.auroc_b)


def test_seed_spread(experiments):
    spread = seed_spread(experiments).set_index(["test_set", "experiment"])
    frame = experiments[(experiments["test_set"] == "internal")
                        & (experiments["experiment"] == "synthetic_only_x1")]
    per_seed = [np.mean([sklearn_auroc(frame[frame["seed"] == s], lab) for lab in LABELS])
                for s in (0, 1)]
    row = spread.loc[("internal", "synthetic_only_x1")]
    assert row["n_seeds"] == 2
    assert row["macro_auroc_mean"] == pytest.approx(np.mean(per_seed))
    assert (row["macro_auroc_min"], row["macro_auroc_max"]) == pytest.approx(
        (min(per_seed), max(per_seed)))


# --- Subgroups ------------------------------------------------------------------------------

def test_age_band():
    bands = age_band([12, 39.9, 40, 59.5, 60, 79, 80, 101, np.nan])
    assert bands.iloc[:8].tolist() == ["<40", "<40", "40-59", "40-59", "60-79", "60-79", "80+",
                                       "80+"]
    assert pd.isna(bands.iloc[8])


def test_subgroup_auroc(experiments):
    frame = experiments[experiments["test_set"] == "internal"].copy()
    frame.loc[(frame["view"] == "AP") & (frame["label"] == "Edema"), "target"] = 0.0
    table = subgroup_auroc(frame, ["sex", "race", "view"], n_boot=100, min_per_class=3)
    assert "Unknown" not in set(table["group"])
    assert set(table.loc[table["by"] == "race", "group"]) == {
        "White", "Asian", "Black/African American"}
    row = table[(table["experiment"] == "real_only") & (table["group"] == "Female")].iloc[0]
    female = frame[(frame["sex"] == "Female") & (frame["experiment"] == "real_only")]
    expected = np.mean([sklearn_auroc(female, lab) for lab in LABELS])
    assert row["macro_auroc"] == pytest.approx(expected)
    assert row["ci_low"] < expected < row["ci_high"]
    assert row["n_images"] == female["image_id"].nunique()
    ap = table[(table["group"] == "AP")].iloc[0]
    assert ap["labels_used"] == 3 and ap["left_out"] == "Edema"
    none = subgroup_auroc(frame, "sex", n_boot=20, min_per_class=1000)
    assert none["macro_auroc"].isna().all() and (none["labels_used"] == 0).all()


def test_subgroup_gap_numbers_and_words():
    rows = [("real_only", "A", 0.80), ("real_only", "B", 0.70), ("real_only", "C", 0.75),
            ("narrow", "A", 0.80), ("narrow", "B", 0.78), ("narrow", "C", 0.79),
            ("wide", "A", 0.90), ("wide", "B", 0.70), ("wide", "C", np.nan),
            ("same", "A", 0.802), ("same", "B", 0.70), ("same", "C", 0.75)]
    sub = pd.DataFrame(rows, columns=["experiment", "group", "macro_auroc"]).assign(
        test_set="internal", by="sex")
    gap = subgroup_gap(sub, "real_only").set_index("experiment")
    assert gap.loc["narrow", ["gap", "baseline_gap", "change"]].tolist() == pytest.approx(
        [0.02, 0.10, -0.08])
    assert gap.loc["narrow", ["direction", "best_group", "worst_group"]].tolist() == [
        "narrower", "A", "B"]
    assert gap.loc["wide", "n_groups"] == 2 and gap.loc["wide", "direction"] == "wider"
    assert gap.loc["wide", "change"] == pytest.approx(0.10)
    assert gap.loc["same", "direction"] == "unchanged"
    assert np.isnan(gap.loc["narrow", "change_ci_low"])


def test_subgroup_gap_ci_from_replicates(experiments):
    table = subgroup_auroc(experiments, "sex", n_boot=100, min_per_class=3, keep_replicates=True)
    gap = subgroup_gap(table, "real_only")
    assert len(gap) == 6
    assert (gap["change_ci_low"] <= gap["change_ci_high"]).all()
    copy = gap[gap["experiment"] == "copy_of_real"]
    assert (copy["change"] == 0).all() and (copy["direction"] == "unchanged").all()
    assert (copy[["change_ci_low", "change_ci_high"]] == 0).all().all()


# --- Findings -------------------------------------------------------------------------------

def comparison_rows() -> pd.DataFrame:
    base = {"baseline": "real_only", "level": "macro", "label": "macro", "ci_level": 0.95,
            "baseline_auroc": 0.781, "baseline_ci_low": 0.770, "baseline_ci_high": 0.792}
    rows = [
        ("chexpert (internal)", "real_plus_synthetic_x2", 0.795, 0.784, 0.806,
         0.014, 0.004, 0.024, 0.003),
        ("chexpert (internal)", "real_plus_synthetic_x5", 0.770, 0.759, 0.781,
         -0.011, -0.020, -0.002, 0.020),
        ("chexpert (internal)", "synthetic_only_x1", 0.776, 0.765, 0.787,
         -0.005, -0.015, 0.005, 0.400),
        ("chexpert (internal)", "synthetic_only_x2", 0.700, 0.690, 0.710,
         -0.081, -0.090, -0.072, 0.0004),
        ("mimic (external)", "real_plus_synthetic_x2", 0.779, 0.768, 0.790,
         -0.002, -0.010, 0.006, 0.700),
    ]
    cols = ["test_set", "experiment", "auroc", "ci_low", "ci_high", "delta", "delta_ci_low",
            "delta_ci_high", "p_adjusted"]
    return pd.DataFrame(rows, columns=cols).assign(**base)


def test_findings_sentences_carry_the_numbers():
    text = findings(comparison_rows())
    assert text[0] == ("On chexpert (internal) test, 1 of 4 experiments significantly beat "
                       "real_only (macro AUROC 0.781) and 2 fell below it "
                       "(Holm-adjusted p < 0.05).")
    assert ("On chexpert (internal) test, real_plus_synthetic_x2 raised macro AUROC from 0.781 "
            "to 0.795 (+0.014, 95% CI +0.004 to +0.024, Holm-adjusted p = 0.003).") in text
    lowered = [s for s in text if " lowered " in s]
    assert len(lowered) == 2 and "synthetic_only_x2" in lowered[0]
    assert "Holm-adjusted p < 0.001" in lowered[0]
    assert any(s.startswith("On chexpert (internal) test, the largest gain over real_only was "
                            "real_plus_synthetic_x2's (+0.014") for s in text)
    matched = [s for s in text if "synthetic_only_x1 (synthetic training images only) matched"
               in s]
    assert len(matched) == 1
    assert "0.776 (95% CI 0.765 to 0.787) vs 0.781 (95% CI 0.770 to 0.792)" in matched[0]
    assert "a match means the 95% CIs overlap or |delta| < 0.01" in matched[0]
    assert matched[0].endswith("here the CIs overlap and |delta| = 0.005 with Holm-adjusted "
                               "p = 0.400.")
    assert any("synthetic_only_x2 (synthetic training images only) did not match" in s
               and s.endswith("neither holds.") for s in text)
    assert "On mimic (external) test, 0 of 1 experiments significantly beat" in " ".join(text)
    assert ("On mimic (external) test, no experiment had a higher macro AUROC than real_only "
            "(0.781).") in text


def test_findings_from_a_real_comparison(comparison):
    table = comparison
    text = findings(table)
    gain = table[(table["level"] == "macro") & (table["test_set"] == "internal")
                 & (table["experiment"] == "real_plus_synthetic_x2")].iloc[0]
    sentence = next(s for s in text if "real_plus_synthetic_x2 raised" in s
                    and s.startswith("On internal"))
    assert f"from {gain['baseline_auroc']:.3f} to {gain['auroc']:.3f}" in sentence
    assert f"({gain['delta']:+.3f}, 95% CI {gain['delta_ci_low']:+.3f}" in sentence
    assert sum("synthetic_only_x1 (synthetic training images only)" in s for s in text) == 2


# --- The study layer: families of comparisons and the generated sentences ------------------

def test_compare_families_pairs_each_experiment_with_its_own_baseline():
    preds = make_predictions({"real_only.f50": 0.8, "real_plus_synthetic_x1.f50": 1.4,
                              "real_only.f100": 1.0, "synthetic_only_x1.f100": 0.9},
                             n_patients=40, seeds=(0,))
    spec = StatsSpec(n_boot=200)
    table = stats.compare_families(preds, spec)
    macro = table[table["level"] == stats.MACRO].set_index("experiment")
    assert macro.loc["real_plus_synthetic_x1.f50", "baseline"] == "real_only.f50"
    assert macro.loc["synthetic_only_x1.f100", "baseline"] == "real_only.f100"
    assert set(table["comparison_family"]) == {
        "real_only.f50 / internal: macro", "real_only.f50 / internal: label",
        "real_only.f100 / internal: macro", "real_only.f100 / internal: label"}
    # One comparison per macro family: Holm leaves its p as it is.
    assert np.allclose(macro["p_adjusted"], macro["p_value"])
    assert stats.best_experiment(table) == "real_plus_synthetic_x1.f50"
    with pytest.raises(ValueError, match="no baseline predictions"):
        stats.compare_families(preds[preds["experiment"] != "real_only.f50"], spec)


def test_gap_sentences_say_when_the_change_is_unclear():
    gaps = pd.DataFrame([
        {"experiment": "e", "test_set": "t", "by": "sex", "n_groups": 2, "best_group": "Female",
         "worst_group": "Male", "gap": 0.05, "baseline_gap": 0.08, "change": -0.03,
         "direction": "narrower", "change_ci_low": -0.06, "change_ci_high": 0.01},
        {"experiment": "e", "test_set": "t", "by": "view", "n_groups": 1, "best_group": None,
         "worst_group": None, "gap": np.nan, "baseline_gap": np.nan, "change": np.nan,
         "direction": "n/a", "change_ci_low": np.nan, "change_ci_high": np.nan}])
    sentences = stats.gap_sentences(gaps)
    assert len(sentences) == 1  # the attribute with a single group says nothing
    assert "narrower: 0.050 against 0.080" in sentences[0]
    assert "-0.030" in sentences[0] and "includes 0: no clear change" in sentences[0]
