"""The embedded phantom cohort: determinism, per-label signatures, site styles, the writer."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxrlib.core.labels import CHEXPERT_LABELS
from cxrlib.core.schema import PhantomSpec
from cxrlib.data.metadata import NIH_TO_CHEXPERT, nih_metadata, padchest_metadata
from cxrlib.data.phantom import STYLES, render_phantom, write_phantom_site

NEGATIVE = dict.fromkeys(CHEXPERT_LABELS, 0.0)


def _render(labels: dict[str, float], seed: int = 3, style: str = "chexpert",
            sex: str = "Male", view: str = "PA", age: float = 55) -> np.ndarray:
    return render_phantom({**NEGATIVE, **labels}, sex, age, view, STYLES[style], 64,
                          np.random.default_rng(seed)).astype(float)


def test_render_is_deterministic_for_a_seed():
    a = _render({"Cardiomegaly": 1.0}, seed=11)
    b = _render({"Cardiomegaly": 1.0}, seed=11)
    c = _render({"Cardiomegaly": 1.0}, seed=12)
    assert np.array_equal(a, b)
    assert np.abs(a - c).mean() > 1.0


def test_no_finding_draws_nothing():
    assert np.array_equal(_render({}), _render({"No Finding": 1.0}))


@pytest.mark.parametrize("label", [lab for lab in CHEXPERT_LABELS if lab != "No Finding"])
def test_each_label_has_a_visible_signature(label):
    """Same seed, only this label switched on: the image changes, and an uncertain (-1) label
    changes it at most as much as a positive one (it renders weakly or not at all)."""
    seeds = range(4)
    base = [_render({}, seed=s) for s in seeds]
    pos = [_render({label: 1.0}, seed=s) for s in seeds]
    unc = [_render({label: -1.0}, seed=s) for s in seeds]
    change = np.mean([np.abs(p - b).sum() for p, b in zip(pos, base, strict=True)])
    weak = np.mean([np.abs(u - b).sum() for u, b in zip(unc, base, strict=True)])
    assert change > 300, f"{label} barely changes the image (total |diff| {change:.0f})"
    assert max(np.abs(p - b).max() for p, b in zip(pos, base, strict=True)) >= 12
    assert weak < change


def test_cardiomegaly_widens_the_heart_and_ap_magnifies_it():
    """Cardiothoracic ratio: more dense pixels in the lower middle band with cardiomegaly and
    on AP views (same seed)."""
    def heart_density(img: np.ndarray) -> float:
        return float(img[38:50, 16:48].mean())
    assert heart_density(_render({"Cardiomegaly": 1.0})) > heart_density(_render({})) + 2
    assert heart_density(_render({}, view="AP")) > heart_density(_render({}, view="PA"))


def test_sites_differ_in_acquisition_style():
    imgs = {s: _render({}, style=s) for s in STYLES}
    shapes = {s: i.shape for s, i in imgs.items()}
    assert len(set(shapes.values())) == 3, shapes  # aspect ratios differ
    means = [i.mean() for i in imgs.values()]
    assert max(means) - min(means) > 10


def test_external_metadata_maps_to_chexpert_labels():
    nih = nih_metadata()
    assert set(nih.columns) >= set(CHEXPERT_LABELS)
    # NIH does not annotate these: blank (unknown), never 0.
    for label in ("Fracture", "Support Devices", "Enlarged Cardiomediastinum"):
        assert nih[label].isna().all()
    assert set(NIH_TO_CHEXPERT.values()) <= set(CHEXPERT_LABELS)
    assert nih["Pleural Effusion"].eq(1.0).sum() > 10000  # 13,317 'Effusion' rows in NIH
    pc = padchest_metadata()
    assert pc[list(CHEXPERT_LABELS)].notna().all().all()
    assert pc["Support Devices"].eq(1.0).sum() > 5000


def test_write_phantom_site_is_a_deterministic_chexpert_folder(tmp_path):
    spec = PhantomSpec(metadata="chexpert", style="chexpert", n_images=12, image_size=32)
    marg = {"White": 0.5, "Asian": 0.5}
    a = write_phantom_site(tmp_path / "a" / "site", "site", spec, 7, marg, progress=False)
    b = write_phantom_site(tmp_path / "b" / "site", "site", spec, 7, marg, progress=False)
    ta, tb = pd.read_csv(a / "train.csv"), pd.read_csv(b / "train.csv")
    assert list(ta.columns[:5]) == ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"]
    assert list(ta.columns[5:]) == list(CHEXPERT_LABELS)
    assert len(ta) == 12
    pd.testing.assert_frame_equal(ta, tb)
    for rel in ta["Path"]:
        file_a = a / rel.split("/", 1)[1]
        assert file_a.read_bytes() == (b / rel.split("/", 1)[1]).read_bytes()
    demo = pd.read_csv(a / "demographics.csv")
    assert list(demo.columns) == ["PATIENT", "GENDER", "AGE_AT_CXR", "PRIMARY_RACE", "ETHNICITY"]
    assert set(demo["PRIMARY_RACE"]) <= {"White", "Asian"}
