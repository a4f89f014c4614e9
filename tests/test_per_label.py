"""Per finding: a planted gain on one finding is found there and nowhere else, and the
correlation with the generator's per-finding fidelity follows what was planted."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxrlib.core.labels import CHEXPERT_LABELS
from cxrlib.core.schema import StatsSpec
from cxrlib.study.per_label import gain_and_fidelity, label_sentences, label_worth

SEEDS = (0, 1, 2)
SIZES = {"real_only.f5": 240, "real_only.f10": 480, "real_only.f20": 960}
ARM, PLANTED = "real_plus_synthetic_x2.f5", "Edema"


def _study(n_images: int = 400) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Predictions whose signal grows with the real images an arm saw (the same for every
    finding), and a synthetic arm equal to its baseline except on one finding. Noise is shared
    by every arm of a seed, so arms differ only where the signal does."""
    rng = np.random.default_rng(0)
    targets = (rng.random((n_images, len(CHEXPERT_LABELS))) < 0.3).astype(float)
    patients = np.arange(n_images) // 2
    frames, grid = [], []
    signal = {name: 0.4 + 0.25 * np.log(n / 240) for name, n in SIZES.items()}
    for seed in SEEDS:
        noise = np.random.default_rng([seed, 1]).normal(size=targets.shape)
        arms = {**{k: np.full(len(CHEXPERT_LABELS), v) for k, v in signal.items()},
                ARM: np.where(np.array(CHEXPERT_LABELS) == PLANTED, signal["real_only.f5"] + 0.6,
                              signal["real_only.f5"])}
        for name, strength in arms.items():
            scores = targets * strength + noise
            frames.append(pd.DataFrame({
                "image_id": np.repeat([f"i{i}" for i in range(n_images)], len(CHEXPERT_LABELS)),
                "patient_id": np.repeat(patients.astype(str), len(CHEXPERT_LABELS)),
                "label": np.tile(CHEXPERT_LABELS, n_images), "target": targets.ravel(),
                "score": scores.ravel(), "test_set": "internal", "experiment": name,
                "seed": seed}))
            n = SIZES.get(name, 240)
            grid.append({"experiment": name, "kind": "real_only" if name in SIZES else
                         "real_plus_synthetic", "k": 0 if name in SIZES else 2,
                         "real_fraction": {240: 0.05, 480: 0.1, 960: 0.2}[n],
                         "train_site": "chexpert", "seed": seed, "n_real": n,
                         "n_synthetic": 0 if name in SIZES else 2 * n, "n_unique_real": n})
    return pd.concat(frames, ignore_index=True), pd.DataFrame(grid)


def test_a_planted_gain_on_one_finding_is_found_there_only():
    predictions, grid = _study()
    worth = label_worth(predictions, grid, StatsSpec(n_boot=200), "internal", [ARM])
    assert len(worth) == len(CHEXPERT_LABELS) and set(worth["baseline"]) == {"real_only.f5"}
    planted = worth.set_index("label").loc[PLANTED]
    assert planted["ci_low"] > 0 and planted["gain"] > 0.05
    others = worth[worth["label"] != PLANTED]
    assert (others["gain"] == 0).all()  # identical scores: no gain at all
    assert np.isfinite(planted["rate"]) and planted["rate"] > 0  # its curve can be inverted
    said = label_sentences(worth, ARM)[0]
    assert f"adjusted across findings): helps {PLANTED}; hurts none; 13 with a CI that " \
        "includes 0" in said

    fidelity = pd.Series(np.linspace(0.8, 0.9, len(CHEXPERT_LABELS)), index=CHEXPERT_LABELS,
                         name="fidelity")
    fidelity[PLANTED] = 1.0  # the finding the generator draws best is the one that gains
    both, rho = gain_and_fidelity(worth, fidelity, ARM)
    assert len(both) == 14 and rho["rho"] > 0 and 0 < rho["ci_low"] <= rho["ci_high"]
    assert "Spearman rho" in label_sentences(worth, ARM, rho)[1]


def test_an_unknown_test_set_is_an_error_naming_it():
    predictions, grid = _study(60)
    with pytest.raises(ValueError, match="no predictions on test set 'nih'"):
        label_worth(predictions, grid, StatsSpec(n_boot=100), "nih", [ARM])
