"""Pretrained classifier weights, offline (``classifier.pretrained``).

A small timm model's weights are saved locally and loaded through the paths a GPU node behind
a firewall uses: a local file (safetensors, or a state dict read with ``weights_only``) and
timm weight names found in a Hugging Face cache folder laid out as ``huggingface_hub`` lays it
out. Every test runs with network connections refused, so a download attempt fails it. The
loaded weights must equal the saved ones, the stem as timm adapts it to one grey channel (the
RGB kernels summed).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file

from cxrlib.classifier.training import MissingWeightsError, build_model, pretrained_weights
from cxrlib.core.config import read_tree
from cxrlib.core.schema import ClassifierSpec, Params

ROOT = Path(__file__).resolve().parent.parent
#: timm's tiny ConvNeXt (272k parameters) and its one pretrained tag.
ARCH, TAG = "test_convnext", "r160_in1k"
STEM, HEAD = "stem.0.weight", "head.fc."


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network, and an empty Hugging Face cache of this test's own."""
    def refuse(*args, **kwargs):
        raise AssertionError("a test of offline weights tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    """The weights of an RGB, 1000-class model, as a pretrained checkpoint holds them."""
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _cache(hub: Path, repo: str, weights: dict[str, torch.Tensor]) -> Path:
    """Put a safetensors file where huggingface_hub's cache keeps ``repo``'s main revision."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file(weights, snapshot / "model.safetensors")
    return snapshot / "model.safetensors"


def _assert_loaded(model: torch.nn.Module, source: dict[str, torch.Tensor]) -> None:
    """Every weight as saved; the stem summed over RGB (timm's in_chans=1); a fresh head."""
    loaded = model.state_dict()
    body = [k for k in source if k != STEM and not k.startswith(HEAD)]
    assert body and all(torch.equal(loaded[k], source[k]) for k in body)
    assert source[STEM].shape[1] == 3 and loaded[STEM].shape[1] == 1
    torch.testing.assert_close(loaded[STEM], source[STEM].sum(dim=1, keepdim=True))
    assert loaded[HEAD + "weight"].shape[0] == 14  # the head is the task's, not loaded
    assert model.pretrained_cfg.get("state_dict") is None  # the read tensors are not kept


def test_a_local_weights_file_loads_with_the_one_channel_stem(tmp_path, source):
    file = tmp_path / "weights.safetensors"
    save_file(source, file)
    _assert_loaded(build_model(ClassifierSpec(backbone=ARCH, pretrained=str(file))), source)
    checkpoint = tmp_path / "weights.pth"  # a torch file: read with weights_only
    torch.save({"state_dict": source, "epoch": 3}, checkpoint)
    _assert_loaded(build_model(ClassifierSpec(backbone=ARCH, pretrained=str(checkpoint))),
                   source)
    random = build_model(ClassifierSpec(backbone=ARCH))  # the default: no weights read
    conv = next(k for k in source if k.endswith("conv_dw.weight"))
    assert not torch.equal(random.state_dict()[conv], source[conv])


class Payload:
    """A pickled object in a weights file: loading it would run code."""


def test_a_weights_file_with_pickled_objects_is_refused(tmp_path, source):
    file = tmp_path / "weights.pth"
    torch.save({"state_dict": source, "extra": Payload()}, file)
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        build_model(ClassifierSpec(backbone=ARCH, pretrained=str(file)))


def test_named_weights_come_from_the_local_hugging_face_cache(tmp_path, source):
    file = _cache(tmp_path / "hub", f"timm/{ARCH}.{TAG}", source)
    for pretrained in (f"{ARCH}.{TAG}", True):  # by name, and timm's default for the backbone
        spec = ClassifierSpec(backbone=ARCH, pretrained=pretrained)
        assert pretrained_weights(spec) == (f"{ARCH}.{TAG}", file)
        _assert_loaded(build_model(spec), source)


def test_missing_weights_fail_before_training_with_the_command_that_fetches_them(tmp_path):
    """The paper preset's classifier on a machine without the weights: the error names the
    weights and the exact commands; the authors' timm name resolves to the same weights."""
    spec = Params.model_validate(read_tree(ROOT / "params" / "chexpert.yaml")).classifier
    assert (spec.backbone, spec.pretrained) == ("convnext_base", "convnext_base.fb_in22k_ft_in1k")
    with pytest.raises(MissingWeightsError) as err:
        build_model(spec)
    message = str(err.value)
    assert ("python -c \"import timm; timm.create_model('convnext_base.fb_in22k_ft_in1k', "
            "pretrained=True)\"") in message
    assert "hf download timm/convnext_base.fb_in22k_ft_in1k model.safetensors" in message
    assert str(tmp_path / "hub") in message and "nothing is downloaded" in message
    # Cached, both names find the file (resolution only: building ConvNeXt-Base is slow).
    file = tmp_path / "hub" / "models--timm--convnext_base.fb_in22k_ft_in1k" / "snapshots"
    cached = _cache(tmp_path / "hub", "timm/convnext_base.fb_in22k_ft_in1k", {})
    assert cached.parent.parent == file
    for name in ("convnext_base.fb_in22k_ft_in1k", "convnext_base_in22ft1k"):
        assert pretrained_weights(spec.model_copy(update={"pretrained": name})) == (
            "convnext_base.fb_in22k_ft_in1k", cached)
    with pytest.raises(MissingWeightsError, match=r"weights file .*nowhere\.safetensors not found"):
        build_model(ClassifierSpec(backbone=ARCH, pretrained=str(tmp_path / "nowhere.safetensors")))


@pytest.mark.parametrize(("pretrained", "words"), [
    ("weights/model.safetensors", "needs an absolute path"),
    ("convnext_small.fb_in1k", "are weights of 'convnext_small', but classifier.backbone is"),
    ("", "name timm weights or a file"),
])
def test_pretrained_values_are_checked_when_the_parameters_load(pretrained, words):
    with pytest.raises(ValueError, match=words):
        ClassifierSpec(backbone="convnext_base", pretrained=pretrained)
    assert ClassifierSpec().pretrained is False  # the default reads no weights


def test_the_command_line_stops_on_missing_weights_before_any_stage(tmp_path, capsys,
                                                                     monkeypatch):
    """``cxrlib check`` and ``cxrlib run`` fail when the parameters load, naming the fetch."""
    from cxrlib.__main__ import main

    monkeypatch.setenv("CXRLIB_RUNS_DIR", str(tmp_path / "runs"))
    params = tmp_path / "p.yaml"
    params.write_text(f"extends: {ROOT / 'params' / 'smoke.yaml'}\n"
                      f"classifier: {{backbone: {ARCH}, pretrained: {ARCH}.{TAG}}}\n")
    for argv in (["check", str(params)], ["run", "--params", str(params)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"hf download timm/{ARCH}.{TAG}" in err, err
    assert not (tmp_path / "runs").exists()  # no run folder was made
