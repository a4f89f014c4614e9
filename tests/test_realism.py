"""Texture fidelity and detectability of synthetic images, on phantom radiographs with planted
differences; and the stage profile."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from cxrlib.core.labels import CHEXPERT_LABELS
from cxrlib.core.schema import ClassifierSpec, DetectabilitySpec
from cxrlib.core.timing import REST, Profile
from cxrlib.data.phantom import STYLES, render_phantom
from cxrlib.synthetic.audit import figures as audit_figures
from cxrlib.synthetic.audit.detectability import (
    DetectabilityResult,
    detectability,
    patient_parts,
    patient_split,
)
from cxrlib.synthetic.audit.texture import (
    HF_BAND,
    N_BANDS,
    TextureResult,
    band_power,
    texture_comparison,
)

R = 32
N = 160  # two patient-disjoint sets of 80

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def phantoms() -> tuple[np.ndarray, np.ndarray]:
    """Phantom radiographs of varied sex, age, view and findings, two images per patient."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(N):
        labels = {k: float(rng.random() < 0.2) for k in CHEXPERT_LABELS}
        images.append(render_phantom(labels, ("Male", "Female")[i % 2], 20 + i % 60,
                                     ("PA", "AP")[i % 3 == 0], STYLES["chexpert"], R,
                                     np.random.default_rng([1, i])))
    return np.stack(images), np.arange(N) // 2


def blurred(images: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """The planted loss of high frequencies: a Gaussian blur of every image."""
    smooth = ndimage.gaussian_filter(images.astype(np.float64), (0, sigma, sigma))
    return np.clip(np.round(smooth), 0, 255).astype(np.uint8)


# --- the spectrum --------------------------------------------------------------------------------

def test_band_power_of_white_noise_is_its_variance_in_every_band():
    noise = np.random.default_rng(0).normal(100, 10, (200, R, R))
    power = band_power(noise).mean(axis=0)
    assert power.shape == (N_BANDS,)
    np.testing.assert_allclose(power, 100.0, rtol=0.05)


def test_band_power_puts_a_grating_in_its_band():
    x = np.arange(R)
    # 9.5 cycles across the image (0.30 cycles per pixel): between two FFT frequencies, so
    # without a window its power would leak into every band (5% into band 1, 1% into band 5)
    grating = 128 + 50 * np.cos(2 * np.pi * (9.5 / R) * x)[None, :].repeat(R, 0)
    power = band_power(grating[None])[0]
    assert power.argmax() == 3  # 0.25-0.33 cycles per pixel
    assert power[[1, 5]].max() < 1e-3 * power[3]  # the Hann window keeps leakage local
    flat = band_power(np.full((1, R, R), 77, dtype=np.uint8))[0]
    np.testing.assert_allclose(flat, 0.0, atol=1e-12)  # the mean is removed
    with pytest.raises(ValueError, match="no frequency"):
        band_power(np.zeros((1, 6, 6)))


def test_texture_finds_the_planted_loss_and_excess_of_high_frequencies(phantoms):
    images, patients = phantoms
    a, b = patients < N // 4, patients >= N // 4
    same = texture_comparison(images[a], patients[a], images[b], patients[b], n_boot=400)
    bands = same.bands
    assert ((bands["ci_low"] < 1) & (bands["ci_high"] > 1)).all()  # real vs real: 1
    assert 0.85 < same.hf["ratio"] < 1.15
    smooth = texture_comparison(images[a], patients[a], blurred(images[b]), patients[b],
                                n_boot=400)
    ratio = smooth.bands["ratio"].to_numpy()
    assert smooth.hf["ci_high"] < 0.1  # blurred: almost no power at the top
    assert (np.diff(ratio) < 0).all() and ratio[0] > 0.5  # the blur's falling transfer
    expected = band_power(blurred(images[b])).mean(0) / band_power(images[a]).mean(0)
    np.testing.assert_allclose(ratio, expected)
    assert smooth.bands.index[HF_BAND] == N_BANDS - 1
    noisy = np.clip(images[b] + np.random.default_rng(1).normal(0, 12, images[b].shape), 0,
                    255).astype(np.uint8)
    excess = texture_comparison(images[a], patients[a], noisy, patients[b], n_boot=400)
    assert excess.hf["ci_low"] > 1.2  # too much noise reads above 1
    entry = smooth.summary_entry()
    assert {"value", "ci_low", "ci_high"} <= set(entry) and entry["value"] == smooth.hf["ratio"]
    assert "of 6 frequency bands, 6 have a CI below 1" in smooth.sentence()


# --- detectability -------------------------------------------------------------------------------

SPEC = ClassifierSpec(backbone="resnet10t", lr=0.002)
BUDGET = DetectabilitySpec(max_steps=30, eval_every=10, patience=2, batch_size=16)


def test_patient_parts_keep_patients_whole():
    groups = np.repeat(np.arange(20), 3)
    mask = patient_split(groups, 0.5, seed=3)
    assert not set(groups[mask]) & set(groups[~mask]) and len(set(groups[mask])) == 10
    assert (mask == patient_split(groups, 0.5, seed=3)).all()
    parts = patient_parts(groups, seed=3)
    patients = {p: set(groups[parts == p]) for p in ("fit", "val", "scored")}
    assert [len(patients[p]) for p in ("fit", "val", "scored")] == [8, 2, 10]
    assert not (patients["fit"] | patients["val"]) & patients["scored"]
    assert not patients["fit"] & patients["val"]
    with pytest.raises(ValueError, match="at least 4 patients"):
        patient_parts(groups[:9], seed=0)


def test_detectability_is_chance_for_real_halves_and_high_for_blurred(phantoms):
    images, patients = phantoms
    a, b = patients < N // 4, patients >= N // 4
    same = detectability(images[a], patients[a], images[b], patients[b], SPEC, BUDGET,
                         n_boot=400)
    assert 0.35 < same.auroc < 0.65 and same.ci_low < 0.5 < same.ci_high
    assert same.n_scored + same.n_fit + same.n_val == N
    assert "not distinguishable from chance" in same.sentence()
    smooth = detectability(images[a], patients[a], blurred(images[b]), patients[b], SPEC,
                           BUDGET, n_boot=400)
    assert smooth.auroc > 0.8 and smooth.ci_low > 0.5
    assert 0 < smooth.kept_step <= smooth.steps <= BUDGET.max_steps
    assert "tells them apart" in smooth.sentence()
    assert set(smooth.summary_entry()) >= {"value", "ci_low", "ci_high"}
    with pytest.raises(ValueError, match="at least 4 patients"):
        detectability(images[:6], patients[:6], images[6:12], patients[6:12], SPEC, BUDGET)


def test_texture_figure_draws(phantoms):
    images, patients = phantoms
    a, b = patients < N // 4, patients >= N // 4
    texture = pd.concat({
        name: texture_comparison(images[a], patients[a], other, patients[b],
                                 n_boot=100).bands.set_index("band")
        for name, other in (("replicas", blurred(images[b])), ("oracle", images[b]))},
        names=["cohort"])
    detect = pd.DataFrame({"auroc": [0.9, 0.5], "ci_low": [0.85, 0.4], "ci_high": [0.95, 0.6]},
                          index=pd.Index(["replicas", "oracle"], name="cohort"))
    fig = audit_figures.texture_figure(texture, detect)
    try:
        fig.canvas.draw()
        legend = fig.axes[0].get_legend()
        assert len(legend.get_texts()) == 2
        renderer = fig.canvas.get_renderer()
        box = legend.get_window_extent(renderer)
        assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes)
        assert fig.get_size_inches()[0] <= 12
    finally:
        plt.close(fig)


@pytest.mark.parametrize(("low", "high", "verdict"), [
    (0.4, 0.8, "too smooth"), (1.2, 1.5, "too much fine texture"),
    (0.9, 1.1, "consistent with real")])
def test_texture_verdict_reads_the_ci_against_1(low, high, verdict):
    bands = pd.DataFrame({"band": np.arange(N_BANDS), "f_low": 0.0, "f_high": 0.5,
                          "real_power": 1.0, "synthetic_power": 1.0, "ratio": 1.0,
                          "ci_low": 1.0, "ci_high": 1.0})
    bands.loc[HF_BAND, ["ratio", "ci_low", "ci_high"]] = [(low + high) / 2, low, high]
    assert TextureResult(bands, 10, 10, 0.05).verdict() == verdict


@pytest.mark.parametrize(("low", "high", "verdict"), [
    (0.55, 0.9, "detectable"), (0.4, 0.6, "not detectable"), (0.2, 0.45, "not detectable")])
def test_detectability_verdict_reads_the_ci_against_chance(low, high, verdict):
    result = DetectabilityResult((low + high) / 2, low, high, 10, 2, 10, 50, 20, 1.0, 0.05)
    assert result.verdict() == verdict
    assert ("better than chance" in result.sentence()) == (verdict == "detectable")


# --- the stage profile ---------------------------------------------------------------------------

def test_profile_adds_parts_and_names_the_largest():
    profile = Profile()
    with profile.part("generation"):
        pass
    profile.add({"memorization": 3.0, "texture": 0.5}, prefix="audit replicas: ")
    profile.add({"memorization": 1.0}, prefix="audit replicas: ")
    table = profile.table()
    assert list(table.index) == ["generation", "audit replicas: memorization",
                                 "audit replicas: texture", REST]
    assert table.loc["audit replicas: memorization", "seconds"] == 4.0
    assert table["share"].sum() == pytest.approx(1.0, abs=0.01)
    assert table.loc[REST, "seconds"] == 0.0  # the parts added here took no clock time
    assert Profile.sentence(table) == (f"Of 4 s, the largest part is audit replicas: "
                                       f"memorization: 4.0 s (89%); 0.0 s went to the {REST}.")
    slow = table.assign(seconds=[0.0, 4.0, 0.5, 10.0])  # the rest is never the named part
    assert "the largest part is audit replicas: memorization" in Profile.sentence(slow)
