"""The audit of generated images, on tiny synthetic data and an untrained timm judge."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import timm
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from cxrlib import audit
from cxrlib.labels import CHEXPERT_LABELS

R = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def judge() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet10t", pretrained=False, in_chans=1, num_classes=14)


def blobs(n: int, seed: int, size: int = R) -> np.ndarray:
    """Grey disc-like blobs at random places and sizes on a noisy background, uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.empty((n, size, size), dtype=np.uint8)
    for i in range(n):
        cx, cy = rng.uniform(0.25 * size, 0.75 * size, 2)
        r = rng.uniform(0.12 * size, 0.3 * size)
        img = 110 + 80 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        out[i] = np.clip(img + rng.normal(0, 10, (size, size)), 0, 255)
    return out


def noise(n: int, seed: int, size: int = R) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


# --- judge features and the torchmetrics extractor -------------------------------------------

def test_judge_features_shape_dtype_and_determinism(judge):
    imgs = blobs(20, seed=1)
    judge.train()  # judge_features must switch to eval (BN running stats) and switch back
    f1 = audit.judge_features(judge, imgs)
    assert judge.training
    f2 = audit.judge_features(judge, imgs, batch_size=7)
    assert f1.shape == (20, judge.num_features) and f1.dtype == np.float32
    np.testing.assert_allclose(f1, f2, rtol=1e-5, atol=1e-6)  # batching does not matter
    assert not np.allclose(f1[0], f1[1])  # different images, different features
    assert audit.judge_features(judge, imgs[:0]).shape == (0, judge.num_features)


def test_extractor_takes_what_torchmetrics_feeds(judge):
    imgs = blobs(6, seed=2)
    ref = audit.judge_features(judge, imgs)
    ext = audit.JudgeFeatureExtractor(judge, R)
    assert ext.num_features == ref.shape[1]
    u8 = torch.from_numpy(imgs).unsqueeze(1)
    out = ext(u8)
    assert out.dtype == torch.float64 and out.shape == ref.shape
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)
    # normalize=True style float input in [0, 1], and 3 identical channels
    np.testing.assert_allclose(ext(u8.float() / 255).numpy(), ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ext(u8.repeat(1, 3, 1, 1)).numpy(), ref, rtol=1e-5, atol=1e-6)
    # torchmetrics' probe: uint8 RGB at 299 px; a wrapper without num_features forces it
    probe = torch.randint(0, 255, (1, 3, 299, 299), dtype=torch.uint8)
    assert ext(probe).shape == (1, ref.shape[1])

    class NoNumFeatures(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = ext

        def forward(self, x):
            return self.inner(x)

    fid = FrechetInceptionDistance(feature=NoNumFeatures())
    assert fid.real_features_sum.shape == (ref.shape[1],)


def test_fid_kid_self_is_zero_and_shifted_set_is_far(judge):
    a, b = blobs(48, seed=3), blobs(48, seed=4)
    inverted = 255 - b
    same = audit.fid_kid(judge, a, a, R)
    close = audit.fid_kid(judge, a, b, R)
    far = audit.fid_kid(judge, a, inverted, R)
    assert set(same) == {"fid", "kid_mean", "kid_std", "n_real", "n_fake"}
    assert (same["n_real"], same["n_fake"]) == (48, 48)
    assert abs(same["fid"]) < 1e-4 * far["fid"]
    assert far["fid"] > 10 * close["fid"] > 0
    assert far["kid_mean"] > 10 * abs(close["kid_mean"])


def test_kid_subset_size_is_checked_and_used(judge):
    a, b = blobs(20, seed=5), blobs(30, seed=6)
    with pytest.raises(ValueError, match="kid_subset_size"):
        audit.fid_kid(judge, a, b, R, kid_subset_size=21)
    with pytest.raises(ValueError, match="at least 2"):
        audit.fid_kid(judge, a[:1], b, R)
    full = audit.fid_kid(judge, a, a, R)  # default min(20, 20, 100) = 20: every subset is all
    assert full["kid_std"] < 1e-9 * max(abs(full["kid_mean"]), 1e-12) + 1e-15
    part = audit.fid_kid(judge, a, b, R, kid_subset_size=8, seed=1)
    again = audit.fid_kid(judge, a, b, R, kid_subset_size=8, seed=1)
    assert part["kid_std"] > 0
    assert part["kid_mean"] == again["kid_mean"]  # seeded subsets


def test_fid_kid_with_baseline_puts_the_noise_floor_below_a_different_set(judge):
    a, b = blobs(40, seed=7), blobs(40, seed=8)
    fake = 255 - blobs(55, seed=9)  # larger than real_b: subsampled to the same size
    table = audit.fid_kid_with_baseline(judge, a, b, fake, R)
    assert list(table["comparison"]) == ["real vs real", "real vs synthetic"]
    assert list(table["n_fake"]) == [40, 40] and list(table["n_real"]) == [40, 40]
    floor, syn = table["fid"].to_numpy()
    assert syn > 10 * floor


# --- conditional and demographic fidelity ----------------------------------------------------

def _condition_frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    labels = pd.DataFrame(rng.integers(0, 2, (n, len(CHEXPERT_LABELS))).astype(float),
                          columns=list(CHEXPERT_LABELS))
    labels["Fracture"] = 0.0  # one class only
    return labels


def test_conditional_fidelity_perfect_reversed_and_single_class():
    labels = _condition_frame(40, seed=0)
    labels.loc[:4, "Edema"] = np.nan
    table = audit.conditional_fidelity(labels.to_numpy(), labels).set_index("label")
    assert list(table.index) == list(CHEXPERT_LABELS)
    assert (table["test_set"] == "synthetic").all()
    others = table.drop(index="Fracture")
    assert np.allclose(others["auroc"], 1.0)
    assert np.isnan(table.loc["Fracture", "auroc"])
    assert table.loc["Edema", "n_pos"] + table.loc["Edema", "n_neg"] == 35  # NaN rows left out
    reversed_ = audit.conditional_fidelity(1.0 - labels.fillna(0).to_numpy(), labels)
    assert np.allclose(reversed_["auroc"].dropna(), 0.0)


def test_conditional_fidelity_rejects_bad_input():
    labels = _condition_frame(10, seed=1)
    with pytest.raises(ValueError, match="scores must be"):
        audit.conditional_fidelity(np.zeros((10, 3)), labels)
    labels.loc[0, "Edema"] = -1.0
    with pytest.raises(ValueError, match="0, 1 or NaN"):
        audit.conditional_fidelity(np.zeros((10, 14)), labels)


def _demographic_set(n: int, seed: int, informative: bool) -> tuple[np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    sex = rng.choice(["Male", "Female"], size=n)
    age = rng.uniform(20, 90, size=n)
    feats = rng.normal(size=(n, 16))
    if informative:
        feats[:, 0] += np.where(sex == "Female", 2.0, -2.0)
        feats[:, 1] = (age - 55) / 20 + rng.normal(0, 0.05, size=n)
    return feats, pd.DataFrame({"sex": sex, "age": age})


def test_demographic_fidelity_reads_encoded_sex_and_age():
    real_f, real_rows = _demographic_set(400, seed=0, informative=True)
    eval_f, eval_rows = _demographic_set(300, seed=1, informative=True)
    eval_rows.loc[:9, "sex"] = "Unknown"
    eval_rows.loc[:4, "age"] = np.nan
    res = audit.demographic_fidelity(real_f, real_rows, eval_f, eval_rows)
    assert res["sex_auroc"] > 0.95 and res["sex_accuracy"] > 0.9
    assert res["age_mae"] < 3.0 and res["age_pearson_r"] > 0.98
    assert res["age_mae"] < 0.2 * res["age_mae_mean_baseline"]
    assert (res["n_eval_sex"], res["n_eval_age"], res["n_train_sex"]) == (290, 295, 400)


def test_demographic_fidelity_on_random_features_is_near_chance():
    real_f, real_rows = _demographic_set(400, seed=2, informative=True)
    eval_f, eval_rows = _demographic_set(300, seed=3, informative=False)
    res = audit.demographic_fidelity(real_f, real_rows, eval_f, eval_rows)
    assert abs(res["sex_auroc"] - 0.5) < 0.1
    assert res["sex_accuracy"] < 0.62
    assert abs(res["age_pearson_r"]) < 0.2
    assert res["age_mae"] > 0.9 * res["age_mae_mean_baseline"]


# --- diversity --------------------------------------------------------------------------------

def test_ms_ssim_settings_fit_small_images():
    assert audit.ms_ssim_settings(32)["scales"] == 3
    assert audit.ms_ssim_settings(64)["scales"] == 4
    assert audit.ms_ssim_settings(128)["scales"] == 5
    assert audit.ms_ssim_settings(256)["betas"] == audit.MS_SSIM_BETAS
    assert np.isclose(sum(audit.ms_ssim_settings(64)["betas"]), 1.0)
    assert audit.ms_ssim_settings(16)["scales"] == 2
    with pytest.raises(ValueError, match="at least"):
        audit.ms_ssim_settings(6)


@pytest.mark.parametrize("size", [16, 32, 64])
def test_ms_ssim_diversity_replicas_vs_noise(size):
    base = blobs(1, seed=10, size=size)[0]
    rng = np.random.default_rng(0)
    jitter = np.clip(base + rng.normal(0, 12, (4, size, size)), 0, 255).astype(np.uint8)
    images = np.concatenate([np.repeat(base[None], 4, axis=0), jitter, noise(4, 11, size),
                             blobs(1, seed=12, size=size)])
    groups = np.array(["same"] * 4 + ["jitter"] * 4 + ["noise"] * 4 + ["single"])
    table = audit.ms_ssim_diversity(images, groups).set_index("group")
    assert list(table.index) == ["same", "jitter", "noise"]  # singleton skipped
    assert list(table["n"]) == [4, 4, 4] and list(table["n_pairs"]) == [6, 6, 6]
    assert table.loc["same", "ms_ssim"] > 0.999
    assert table.loc["same", "ms_ssim"] > table.loc["jitter", "ms_ssim"] + 0.05
    assert table.loc["noise", "ms_ssim"] < 0.2
    assert table.loc["jitter", "ms_ssim"] > table.loc["noise", "ms_ssim"] + 0.2
    capped = audit.ms_ssim_diversity(images, groups, max_pairs=2)
    assert list(capped["n_pairs"]) == [2, 2, 2]


# --- memorization -----------------------------------------------------------------------------

def test_nearest_neighbours_matches_brute_force_in_chunks():
    rng = np.random.default_rng(0)
    query, ref = blobs(13, seed=20), blobs(29, seed=21)
    ref[4] = 77  # a constant image: correlation 0, never NaN
    idx, sim = audit.nearest_neighbours(query, ref, "pixel", chunk_size=5)
    q = query.reshape(13, -1).astype(float)
    r = ref.reshape(29, -1).astype(float)
    corr = np.array([[np.corrcoef(a, b)[0, 1] if b.std() > 0 else 0.0 for b in r] for a in q])
    np.testing.assert_array_equal(idx, corr.argmax(axis=1))
    np.testing.assert_allclose(sim, corr.max(axis=1), atol=1e-5)
    fq, fr = rng.normal(size=(13, 8)), rng.normal(size=(29, 8))
    fidx, fsim = audit.nearest_neighbours(fq, fr, "feature", chunk_size=4)
    cos = (fq / np.linalg.norm(fq, axis=1, keepdims=True)) @ (
        fr / np.linalg.norm(fr, axis=1, keepdims=True)).T
    np.testing.assert_array_equal(fidx, cos.argmax(axis=1))
    np.testing.assert_allclose(fsim, cos.max(axis=1), atol=1e-5)
    with pytest.raises(ValueError, match="metric"):
        audit.nearest_neighbours(fq, fr, "euclid")


@pytest.fixture(scope="module")
def memorization(judge):
    train, test = blobs(120, seed=30), blobs(60, seed=31)
    syn = np.concatenate([noise(12, seed=32), blobs(8, seed=33, size=R)])
    syn[5] = train[17]  # an exact copy
    syn[9] = np.clip(train[42] * 0.8 + 20, 0, 255).astype(np.uint8)  # a rescaled copy
    feats = {k: audit.judge_features(judge, v) for k, v in
             (("train", train), ("test", test), ("syn", syn))}
    return train, syn, audit.memorization_audit(syn, feats["syn"], train, feats["train"],
                                                test, feats["test"], quantile=0.999)


def test_memorization_flags_planted_copies_only(memorization):
    train, syn, res = memorization
    assert res.syn_pixel_idx[5] == 17 and res.syn_pixel_sim[5] > 0.9999
    assert res.syn_feature_idx[5] == 17 and res.syn_feature_sim[5] > 0.9999
    assert res.syn_pixel_idx[9] == 42 and res.syn_pixel_sim[9] > 0.99
    assert res.flagged[5] and res.flagged[9]
    assert res.flag_count == 2 and set(np.flatnonzero(res.flagged)) == {5, 9}
    assert len(res.test_pixel_sim) == 60 and res.pixel_threshold < 0.99
    assert res.pixel_threshold == pytest.approx(np.quantile(res.test_pixel_sim, 0.999))
    table = res.table()
    assert len(table) == len(syn) and table["flagged"].sum() == 2


def test_memorization_needs_both_spaces_or_a_near_copy(judge):
    rng = np.random.default_rng(1)
    train, test = blobs(40, seed=40), blobs(30, seed=41)
    train_f, test_f = rng.normal(size=(40, 8)), rng.normal(size=(30, 8))
    syn = np.stack([noise(1, seed=42)[0], train[3], train[7]])
    syn_f = np.stack([train_f[3],              # same features as train 3, unrelated pixels
                      rng.normal(size=8),      # exact pixel copy, unrelated features
                      -train_f[7]])            # pixel copy, opposite features
    res = audit.memorization_audit(syn, syn_f, train, train_f, test, test_f, quantile=0.99)
    assert res.syn_feature_sim[0] > res.feature_threshold
    assert res.syn_pixel_sim[0] < res.pixel_threshold
    assert list(res.flagged) == [False, True, True]
    strict = audit.memorization_audit(syn, syn_f, train, train_f, test, test_f, quantile=0.99,
                                      near_copy=1.01)  # no near-copy rule: both spaces needed
    assert not strict.flagged[1]


def test_closest_pairs_puts_the_planted_copy_first(memorization):
    _, _, res = memorization
    pairs = audit.closest_pairs(res, k=3)
    assert len(pairs) == 3
    assert (pairs.loc[0, "syn_index"], pairs.loc[0, "train_index"]) == (5, 17)
    assert (pairs.loc[1, "syn_index"], pairs.loc[1, "train_index"]) == (9, 42)
    assert pairs["pixel_similarity"].is_monotonic_decreasing


# --- figures ----------------------------------------------------------------------------------

def test_figures_render(memorization):
    train, syn, res = memorization
    figs = [audit.memorization_figure(res),
            audit.closest_pairs_figure(syn, train, audit.closest_pairs(res, k=2))]
    labels = _condition_frame(30, seed=3)
    table = audit.conditional_fidelity(labels.to_numpy() * 0.5 + 0.2, labels)
    figs.append(audit.fidelity_figure(table))
    try:
        assert len(figs[0].axes) == 2
        assert len(figs[1].axes) == 4
        assert any(t.get_text() == "n/a" for t in figs[2].axes[0].texts)  # Fracture
        for fig in figs:
            fig.canvas.draw()
    finally:
        for fig in figs:
            plt.close(fig)
