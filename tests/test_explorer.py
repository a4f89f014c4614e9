"""The explorer's compare mode and nearest-training-image view, without a browser."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cxrlib.core.config import load_params
from cxrlib.diffusion.network import ConditionalUNet, noise_scheduler, unet_config
from cxrlib.diffusion.pipeline import CXRPipeline
from cxrlib.synthetic.explorer import SamplingExplorer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def explorer(one_torch_thread) -> SamplingExplorer:
    """An untrained smoke-sized model (its condition embedding still changes the images) and
    random training images; 2 sampling steps, 3 images from seed 10."""
    params = load_params(ROOT / "params" / "smoke.yaml")
    torch.manual_seed(0)
    model = ConditionalUNet(**unet_config(params.diffusion, params.data.resolution)).eval()
    train = np.random.default_rng(0).integers(0, 256, (40, 32, 32), dtype=np.uint8)
    ex = SamplingExplorer(CXRPipeline(model, noise_scheduler(params.diffusion)),
                          train_images=train)
    ex.steps.value, ex.count.value, ex.seed.value = 2, 3, 10
    return ex


def _images_for(ex: SamplingExplorer, **labels: str) -> np.ndarray:
    for name, state in labels.items():
        ex.labels[name.replace("_", " ")].value = state
    return ex.generate()[0]


def test_compare_a_label_uses_the_same_seeds_without_and_with_it(explorer):
    ex = explorer
    ex.compare.value = "Edema"
    ex.on_compare()
    cmp = ex.last_comparison
    assert cmp.titles == ("without Edema", "with Edema") and cmp.seeds == [10, 11, 12]
    assert cmp.without.shape == cmp.with_.shape == (3, 32, 32)
    assert np.array_equal(cmp.difference, cmp.with_.astype(int) - cmp.without.astype(int))
    assert np.abs(cmp.difference).sum() > 0  # the condition changes the images
    # each row is exactly what Generate draws for that condition: same seeds, same settings
    assert np.array_equal(cmp.without, _images_for(ex, Edema="absent", No_Finding="present"))
    assert np.array_equal(cmp.with_, _images_for(ex, Edema="present", No_Finding="absent"))
    # three rows of three images: without, with, and the difference maps
    axes = ex.last_figure.axes
    assert len([a for a in axes if a.images]) == 9
    assert [axes[i].get_ylabel().replace("\n", " ") for i in (0, 3, 6)] == [
        "without Edema", "with Edema", "with Edema minus without Edema"]
    assert "mean |diff|" in axes[6].get_xlabel()


def test_compare_sex_and_age_change_only_that(explorer):
    ex = explorer
    ex.sex.value, ex.age.value, ex.compare_age.value = "Female", 70, 25
    ex.compare.value = "sex"
    first, second, titles = ex.comparison_rows()
    assert titles == ("sex Female", "sex Male")
    assert (first["sex"].item(), second["sex"].item()) == ("Female", "Male")
    assert first.drop(columns="sex").equals(second.drop(columns="sex"))
    ex.compare.value = "age"
    first, second, titles = ex.comparison_rows()
    assert titles == ("age 70", "age 25") and (first["age"].item(), second["age"].item()) == (
        70.0, 25.0)
    assert first.drop(columns="age").equals(second.drop(columns="age"))
    cmp = ex.generate_comparison()
    assert not np.array_equal(cmp.without, cmp.with_)


def test_nearest_training_image_finds_a_planted_copy(explorer):
    ex = explorer
    images, _ = ex.generate()
    original = ex.train_images
    planted = original.copy()
    planted[7] = images[1]
    planted[23] = np.clip(images[2].astype(int) // 2 + 60, 0, 255)  # re-exposed copy
    ex.train_images = planted
    try:
        idx, sim = ex.nearest_training(images)
        assert idx[1] == 7 and sim[1] == pytest.approx(1.0, abs=1e-5)
        assert idx[2] == 23 and sim[2] > 0.99  # pixel correlation ignores brightness
        assert sim[0] < 0.5  # random images are no neighbours
        ex.nearest.value = True
        ex.on_generate()
        drawn = [a for a in ex.last_figure.axes if a.images]
        assert len(drawn) == 6  # each image and its nearest training image below it
        assert "nearest training image 7\nr = 1.000" in {a.get_xlabel() for a in drawn}
        ex.on_compare()
        assert len([a for a in ex.last_figure.axes if a.images]) == 15  # 5 rows of 3
    finally:
        ex.train_images, ex.nearest.value = original, False


def test_nearest_needs_training_images(explorer):
    bare = SamplingExplorer(explorer.generator)
    assert bare.nearest.disabled
    with pytest.raises(ValueError, match="without train_images"):
        bare.nearest_training(np.zeros((1, 32, 32), np.uint8))


def _widgets(widget) -> list:
    """Every widget in a widget tree."""
    return [widget, *(w for child in getattr(widget, "children", ()) for w in _widgets(child))]


def test_view_dropdown_only_for_a_model_trained_with_the_view(explorer):
    assert explorer.view not in _widgets(explorer.widget())
    assert "view" not in explorer.compare.options and "view" not in explorer.condition_row()
    params = load_params(ROOT / "params" / "smoke.yaml", {"diffusion.condition_on_view": True})
    torch.manual_seed(0)
    model = ConditionalUNet(**unet_config(params.diffusion, params.data.resolution)).eval()
    ex = SamplingExplorer(CXRPipeline(model, noise_scheduler(params.diffusion)))
    ex.steps.value, ex.count.value = 2, 2
    assert ex.view in _widgets(ex.widget()) and "view" in ex.compare.options
    ex.view.value = "AP"
    assert ex.condition_row()["view"].item() == "AP"
    images, captions = ex.generate()
    assert images.shape == (2, 32, 32) and " AP | " in captions[0]
    ex.compare.value = "view"
    first, second, titles = ex.comparison_rows()
    assert titles == ("view AP", "view PA")
    assert first.drop(columns="view").equals(second.drop(columns="view"))
    cmp = ex.generate_comparison()
    assert not np.array_equal(cmp.without, cmp.with_)  # the view changes the images
