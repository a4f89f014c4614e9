"""The conditional DDPM: condition encoding, training, exact resume, bad input, multi-process."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from cxrlib.core.cohort import CohortError, diffusion_rows, source_rows, training_rows
from cxrlib.core.config import load_params
from cxrlib.core.errors import ParamsError
from cxrlib.core.labels import CHEXPERT_LABELS
from cxrlib.core.layout import RunLayout
from cxrlib.core.schema import DiffusionSpec, Params
from cxrlib.data.imagecache import ImageCache
from cxrlib.data.readers import prepare_cohort
from cxrlib.diffusion.checkpoints import load_weights
from cxrlib.diffusion.condition import (
    COND_DIM,
    LABEL_SLICE,
    ConditionEmbedding,
    condition_row,
    decode_condition,
    describe_condition,
    dropout_mask,
    encode_conditions,
    layout_table,
)
from cxrlib.diffusion.network import DiffusionError
from cxrlib.diffusion.pipeline import CXRPipeline
from cxrlib.diffusion.samplers import guided_output
from cxrlib.diffusion.training import (
    batch_indices,
    immiscible_noise,
    train_diffusion,
    training_timesteps,
)
from cxrlib.hardware import precision_label
from cxrlib.synthetic.cohorts import diffusion_source, replica_plan

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "params" / "smoke.yaml"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke cohort, prepared once for this module."""
    runs = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CXRLIB_RUNS_DIR", str(runs))
        params = load_params(SMOKE)
        run = RunLayout.open(params)
        cohort = prepare_cohort(params, run, progress=False)
    return params, cohort.manifest, ImageCache(cohort.cache_dir), run


def _scratch(run: RunLayout, folder: Path) -> RunLayout:
    """The smoke run's layout under another root: training there leaves the module's run."""
    return replace(run, root=folder)


def _with(params: Params, section: str, **update) -> Params:
    """``params`` with keys of one section changed."""
    return params.model_copy(update={section: getattr(params, section).model_copy(
        update=update)})


def test_condition_layout_round_trip():
    rows = pd.DataFrame({"age": [67.0, 23.0], "sex": ["Female", "Male"],
                         "race": ["Asian", "Unknown"],
                         **{lab: [1.0, np.nan] if lab == "Edema" else [0.0, 1.0]
                            for lab in CHEXPERT_LABELS}})
    vec = encode_conditions(rows, nan_value=-1.0)
    assert vec.shape == (2, COND_DIM) == (2, 22)
    first = decode_condition(vec[0])
    assert first["age_decade"] == 6 and first["sex"] == "Female" and first["race"] == "Asian"
    assert first["labels"]["Edema"] == 1.0 and first["labels"]["Cardiomegaly"] == 0.0
    second = decode_condition(vec[1])
    assert second["race"] == "Unknown" and vec[1, 3:8].sum() == 0  # other/unknown: all zeros
    assert second["labels"]["Edema"] == -1.0  # NaN encoded as params say
    assert list(vec[1, LABEL_SLICE]).count(1.0) == 13


def test_condition_with_view_adds_ap_1_pa_0_and_keeps_the_22_values():
    rows = pd.concat([condition_row(67, "Female", "Asian", ["Edema"], view="AP"),
                      condition_row(23, "Male", "White", [], view="PA")], ignore_index=True)
    plain, with_view = encode_conditions(rows), encode_conditions(rows, with_view=True)
    assert plain.shape == (2, 22) and with_view.shape == (2, 23)
    assert np.array_equal(with_view[:, :22], plain) and with_view[:, 22].tolist() == [1.0, 0.0]
    assert decode_condition(with_view[0])["view"] == "AP" and "view" not in decode_condition(
        plain[0])
    assert describe_condition(with_view[1]) == "M 20s White PA | no labels"
    assert len(layout_table()) == 22 and layout_table(with_view=True).loc[22, "block"] == "view"
    with pytest.raises(ValueError, match=r"view \['LATERAL'\] cannot be encoded"):
        encode_conditions(rows.assign(view=["AP", "LATERAL"]), with_view=True)
    with pytest.raises(KeyError, match="'view'"):
        encode_conditions(rows.drop(columns="view"), with_view=True)
    with pytest.raises(ValueError, match="unknown view 'LL'"):
        condition_row(50, "Male", "White", [], view="LL")
    with pytest.raises(ParamsError, match=r"encodes the views AP and PA only.*'LATERAL'"):
        load_params(SMOKE, {"diffusion.condition_on_view": True, "data.frontal_only": False,
                            "data.views": ["AP", "PA", "LATERAL"]})


def test_null_embedding_and_dropout_rate():
    torch.manual_seed(0)
    emb = ConditionEmbedding(16)
    with torch.no_grad():
        emb.null.copy_(torch.arange(16.0))
    cond = torch.randn(4, COND_DIM)
    drop = torch.tensor([True, False, True, False])
    out = emb(cond, drop)
    assert torch.equal(out[0], torch.arange(16.0)) and torch.equal(out[2], torch.arange(16.0))
    assert torch.allclose(out[1], emb.mlp(cond[1:2])[0])
    rate = dropout_mask(20000, 0.1, torch.Generator().manual_seed(1)).float().mean().item()
    assert abs(rate - 0.1) < 0.01


def test_guidance_formula_matches_hand_computation():
    class Toy(torch.nn.Module):
        def forward(self, x, t, cond, drop=None):
            out = x + cond.sum(1).view(-1, 1, 1, 1)
            if drop is not None:
                out = torch.where(drop.view(-1, 1, 1, 1), x * 0.5, out)
            return out
    x = torch.randn(2, 1, 4, 4)
    cond = torch.ones(2, COND_DIM)
    t = torch.zeros(2, dtype=torch.long)
    c, u = x + COND_DIM, x * 0.5
    assert torch.allclose(guided_output(Toy(), x, t, cond, 0.0, 0.7), c)  # 0: conditional
    assert torch.allclose(guided_output(Toy(), x, t, cond, -1.0, 0.0), u)  # -1: unconditional
    plain = u + 3.0 * (c - u)  # w = 2: (1 + w) cond - w null, the authors' scale 3
    assert torch.allclose(guided_output(Toy(), x, t, cond, 2.0, 0.0), plain)
    ratio = c.std(dim=(1, 2, 3), keepdim=True) / plain.std(dim=(1, 2, 3), keepdim=True)
    expect = 0.7 * plain * ratio + 0.3 * plain
    assert torch.allclose(guided_output(Toy(), x, t, cond, 2.0, 0.7), expect)
    # continuous at 0 (the authors' scale jumps there: 0 conditional, 0.01 almost null)
    near = guided_output(Toy(), x, t, cond, 1e-4, 0.0)
    assert torch.allclose(near, c, atol=1e-2)


def test_batches_are_epoch_permutations():
    seen = np.concatenate([batch_indices(s, 10, 5, seed=3) for s in range(4)])
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert np.array_equal(batch_indices(2, 10, 5, 3), batch_indices(2, 10, 5, 3))


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return {**load_file(ckpt / "model.safetensors"),
            **{f"ema.{k}": v for k, v in load_file(ckpt / "ema.safetensors").items()}}


def test_resume_after_interruption_equals_uninterrupted(smoke, tmp_path):
    params, manifest, cache, run = smoke
    whole = train_diffusion(params, manifest, cache, _scratch(run, tmp_path / "whole"),
                            progress=False)

    class Killed(Exception):
        pass

    def kill_at_3(step: int) -> None:
        if step == 3:
            raise Killed
    with pytest.raises(Killed):
        train_diffusion(params, manifest, cache, _scratch(run, tmp_path / "split"),
                        progress=False, on_step=kill_at_3)
    resumed = train_diffusion(params, manifest, cache, _scratch(run, tmp_path / "split"),
                              progress=False)
    assert resumed.resumed_from == 2 and resumed.steps_done == 4
    a, b = _weights(whole.checkpoint), _weights(resumed.checkpoint)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    assert whole.history["loss"].tolist() == resumed.history["loss"].tolist()
    # every step's row says what it trained in (a resume on another machine would differ)
    assert set(resumed.history["precision"]) == {precision_label("no")}


def test_checkpoint_from_another_config_is_refused(smoke, tmp_path):
    params, manifest, cache, run = smoke
    here = _scratch(run, tmp_path)
    train_diffusion(params, manifest, cache, here, progress=False)
    other = params.model_copy(update={"diffusion": params.diffusion.model_copy(
        update={"base_channels": 16})})
    with pytest.raises(DiffusionError, match="different configuration.*base_channels"):
        train_diffusion(other, manifest, cache, here, progress=False)


def test_bad_inputs_fail_before_training(smoke, tmp_path):
    params, manifest, cache, run = smoke
    no_train = manifest.assign(split="test")
    with pytest.raises(CohortError, match="no training rows"):
        training_rows(params, no_train)
    foreign = manifest.copy()
    foreign.loc[foreign.index[0], "image_id"] = "chexpert/not-in-cache"
    with pytest.raises(KeyError, match="not in the cache"):
        train_diffusion(params, foreign, cache, _scratch(run, tmp_path), progress=False)
    other_res = params.model_copy(update={"data": params.data.model_copy(
        update={"resolution": 48})})
    with pytest.raises(DiffusionError, match="holds 32 px images"):
        train_diffusion(other_res, manifest, cache, _scratch(run, tmp_path), progress=False)


def test_two_processes_through_accelerate(smoke, tmp_path):
    """`accelerate launch --multi_gpu` with 2 processes (gloo on CPU) runs the same trainer."""
    _, _, _, run = smoke
    env = {**os.environ, "CXRLIB_RUNS_DIR": str(run.root.parent), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--multi_gpu", "-m", "cxrlib", "train-diffusion", "--params", str(SMOKE)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "processes: 2" in proc.stdout
    assert (run.checkpoints / "step-0000004" / "model.safetensors").exists()


def test_min_snr_weights_follow_the_paper():
    """Hang et al. 2023: v targets weigh each image by min(SNR, gamma) / (SNR + 1)."""
    from diffusers.training_utils import compute_snr

    from cxrlib.core.schema import DiffusionSpec
    from cxrlib.diffusion.network import noise_scheduler
    from cxrlib.diffusion.training import diffusion_loss

    spec = DiffusionSpec(preset="demo", snr_gamma=5.0)
    sched = noise_scheduler(spec)
    t = torch.tensor([10, 500, 999])  # high, middle and zero SNR (zero terminal SNR)
    pred, target = torch.zeros(3, 1, 4, 4), torch.ones(3, 1, 4, 4)  # per-image MSE = 1
    snr = compute_snr(sched, t)
    assert snr[0] > 5 > snr[1] and snr[2] == 0
    expected = (torch.clamp(snr, max=5.0) / (snr + 1)).mean()
    assert torch.isclose(diffusion_loss(pred, target, t, sched, spec), expected)
    plain = spec.model_copy(update={"snr_gamma": None})
    assert diffusion_loss(pred, target, t, sched, plain) == 1.0


def test_precision_auto_follows_the_cpu(tmp_path, monkeypatch):
    from cxrlib import hardware

    amx, plain = tmp_path / "amx", tmp_path / "plain"
    amx.write_text("flags\t: fpu sse2 avx512f amx_bf16 amx_tile\n")
    plain.write_text("flags\t: fpu sse2 avx2\n")
    assert hardware.cpu_bf16_units(amx) == ("amx_bf16",)
    assert hardware.cpu_bf16_units(plain) == ()
    for cpuinfo, auto in ((amx, "bf16"), (plain, "no")):
        monkeypatch.setattr(hardware, "cpu_bf16_units", lambda c=cpuinfo: hardware.BF16_CPU_FLAGS
                            if "amx" in c.read_text() else ())
        assert hardware.resolve_precision("auto", cuda=False) == auto
        assert hardware.resolve_precision("bf16", cuda=False) == auto  # no emulated bf16
        assert hardware.resolve_precision("fp16", cuda=False) == "no"
        assert hardware.resolve_precision("no", cuda=False) == "no"
        # what the trainers record: what ran and the CPU's bf16 units that decided it
        units = "amx_bf16, avx512_bf16" if auto == "bf16" else "none"
        assert hardware.precision_label(auto, cuda=False) == (
            f"{hardware.PRECISION_NAMES[auto]} (CPU bf16 units: {units})")
    assert hardware.resolve_precision("fp16", cuda=True) == "fp16"
    assert hardware.resolve_precision("no", cuda=True) == "no"
    monkeypatch.setattr(hardware.torch.cuda, "is_bf16_supported", lambda: False)
    assert hardware.resolve_precision("auto", cuda=True) == "fp16"  # pre-Ampere GPUs
    monkeypatch.setattr(hardware.torch.cuda, "get_device_name", lambda: "NVIDIA H200")
    assert hardware.precision_label("bf16", cuda=True) == "bf16 autocast (GPU: NVIDIA H200)"


def test_channels_last_trains_the_same_model(smoke, tmp_path):
    """channels_last changes the memory layout, not the arithmetic: same losses and weights
    up to float rounding, and checkpoints keep the parameter names."""
    params, manifest, cache, run = smoke
    nhwc = params.model_copy(update={"diffusion": params.diffusion.model_copy(
        update={"channels_last": True})})
    a = train_diffusion(params, manifest, cache, _scratch(run, tmp_path / "nchw"), progress=False)
    b = train_diffusion(nhwc, manifest, cache, _scratch(run, tmp_path / "nhwc"), progress=False)
    np.testing.assert_allclose(a.history["loss"], b.history["loss"], rtol=1e-3)
    wa, wb = _weights(a.checkpoint), _weights(b.checkpoint)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-2, atol=1e-3)  # AdamW, 4 steps


def test_immiscible_assignment_pairs_images_with_nearer_noise():
    """Immiscible noise is a reordering of the batch's own draws (each image still gets one
    N(0, I) draw) that minimises the summed image-noise distance: never above the identity
    pairing, and optimal against every other permutation of a small batch."""
    import itertools

    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 1, 4, 4, generator=gen), torch.randn(5, 1, 4, 4, generator=gen)
    out = immiscible_noise(x0, noise)

    def cost(n: torch.Tensor) -> float:
        return float((x0 - n).pow(2).sum())

    assert sorted(map(tuple, out.flatten(1).tolist())) == sorted(
        map(tuple, noise.flatten(1).tolist()))
    best = min(cost(noise[list(p)]) for p in itertools.permutations(range(5)))
    assert cost(out) == pytest.approx(best)
    assert cost(out) < cost(noise)


def test_logit_normal_timesteps_favour_the_middle_noise_levels():
    """Uniform timesteps keep today's stream (torch.randint); logit-normal ones stay in [0, T)
    and put about 68% of the draws at sigmoid(+-1) of T (0.27-0.73 T) against 46% uniform."""
    spec = DiffusionSpec()
    n, steps = 20_000, spec.num_train_timesteps
    uniform = training_timesteps(spec, n, torch.Generator().manual_seed(0))
    assert torch.equal(uniform, torch.randint(0, steps, (n,),
                                              generator=torch.Generator().manual_seed(0)))
    logit = training_timesteps(spec.model_copy(update={"timestep_sampling": "logit_normal"}),
                               n, torch.Generator().manual_seed(0))
    assert logit.dtype == torch.long and int(logit.min()) >= 0 and int(logit.max()) < steps

    def middle(t: torch.Tensor) -> float:
        return float(((t >= 0.269 * steps) & (t < 0.731 * steps)).float().mean())

    assert middle(logit) == pytest.approx(0.683, abs=0.015)
    assert middle(uniform) == pytest.approx(0.462, abs=0.015)
    shifted = training_timesteps(spec.model_copy(update={
        "timestep_sampling": "logit_normal", "timestep_logit_mean": 1.0}), n,
        torch.Generator().manual_seed(0))
    assert float(shifted.float().median()) == pytest.approx(0.731 * steps, abs=15)


def test_cosine_schedule_and_immiscible_noise_train(smoke, tmp_path):
    """lr_schedule cosine warms up, then decays to 0 at max_steps; immiscible noise changes
    the losses but trains; both are part of a checkpoint's identity."""
    params, manifest, cache, run = smoke
    spec = params.diffusion
    cosine = params.model_copy(update={"diffusion": spec.model_copy(update={
        "lr_schedule": "cosine", "warmup_steps": 1, "noise_assignment": "immiscible"})})
    out = train_diffusion(cosine, manifest, cache, _scratch(run, tmp_path / "c"), progress=False)
    lr = out.history["lr"].to_numpy()
    assert lr[0] == pytest.approx(spec.lr)  # after the one warm-up step
    assert np.all(np.diff(lr) <= 0) and lr[-1] == pytest.approx(0.0, abs=1e-12)
    assert np.isfinite(out.history["loss"]).all()
    with pytest.raises(DiffusionError, match="lr_schedule|noise_assignment"):
        train_diffusion(params, manifest, cache, _scratch(run, tmp_path / "c"), progress=False)
def test_view_conditioned_model_trains_samples_and_refuses_a_resume_without_it(smoke,
                                                                               tmp_path):
    params, manifest, cache, run = smoke
    on = _with(params, "diffusion", condition_on_view=True)
    here = _scratch(run, tmp_path)
    outcome = train_diffusion(on, manifest, cache, here, progress=False)
    model = load_weights(outcome.checkpoint)
    assert model.conditions_on_view and model.cond_embed.mlp[0].in_features == 23
    generator = CXRPipeline.from_checkpoint(outcome.checkpoint, on.diffusion)
    plan = replica_plan(on, manifest, outcome.checkpoint.name).head(3)
    images = diffusion_source(on, generator)(plan)
    assert images.shape == (3, 32, 32) and images.dtype == np.uint8
    ap = generator(view="AP", num_images=2, steps=2, output_type="np").images
    assert ap.shape == (2, 32, 32)
    with pytest.raises(ValueError, match="pass view='AP' or 'PA'"):
        generator(steps=2)
    with pytest.raises(ValueError, match="have 22 values but this model takes 23"):
        model(torch.zeros(1, 1, 32, 32), torch.zeros(1, dtype=torch.long),
              torch.zeros(1, 22))
    with pytest.raises(DiffusionError, match="different configuration.*condition_on_view"):
        train_diffusion(params, manifest, cache, here, progress=False)


def test_train_on_sources_learns_from_the_source_rows_only(smoke, tmp_path):
    params, manifest, cache, run = smoke
    half = _with(params, "sampling", source_fraction=0.5)
    sources = _with(half, "diffusion", train_on="sources")
    assert diffusion_rows(half, manifest).equals(training_rows(params, manifest))
    full = _with(params, "diffusion", train_on="sources")  # source fraction 1: the same rows
    assert diffusion_rows(full, manifest).equals(training_rows(params, manifest))
    here = _scratch(run, tmp_path)
    outcome = train_diffusion(sources, manifest, cache, here, progress=False)
    expected = source_rows(half, manifest)["image_id"].tolist()
    assert outcome.image_ids == expected
    assert len(expected) < len(training_rows(params, manifest))
    with pytest.raises(DiffusionError, match="different configuration.*train_on"):
        train_diffusion(half, manifest, cache, here, progress=False)


def test_sampling_without_a_trained_model_says_what_to_run(smoke, tmp_path):
    from cxrlib.diffusion.checkpoints import trained_checkpoint

    with pytest.raises(DiffusionError, match="run notebook 02"):
        trained_checkpoint(_scratch(smoke[3], tmp_path))
