"""Sampling: determinism, synthetic cohort plans, resumable generation, the explorer widgets."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cxrlib.core.cohort import AGE_UNKNOWN, age_band, training_rows
from cxrlib.core.config import load_params
from cxrlib.core.layout import RunLayout
from cxrlib.data.imagecache import ImageCache
from cxrlib.data.readers import prepare_cohort
from cxrlib.diffusion.network import ConditionalUNet, noise_scheduler, unet_config
from cxrlib.diffusion.pipeline import CXRPipeline
from cxrlib.diffusion.samplers import SAMPLERS, generate
from cxrlib.synthetic.cohorts import (
    SyntheticCohortError,
    check_no_eval_sources,
    diffusion_source,
    finalize_cohort,
    generate_cohort,
    rebalance_plan,
    rebalance_weights,
    replica_plan,
)
from cxrlib.synthetic.explorer import SamplingExplorer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CXRLIB_RUNS_DIR", str(runs))
        params = load_params(ROOT / "params" / "smoke.yaml",
                             {"sampling.replicas": 2, "sampling.shard_size": 64,
                              "sampling.steps": 3})
        run = RunLayout.open(params)
        cohort = prepare_cohort(params, run, progress=False)
    torch.manual_seed(0)
    model = ConditionalUNet(**unet_config(params.diffusion, params.data.resolution)).eval()
    return params, cohort.manifest, CXRPipeline(model, noise_scheduler(params.diffusion)), run


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_an_image_depends_on_its_seed_not_its_batch(smoke, sampler):
    params, manifest, generator, _ = smoke
    model, sched = generator.unet, generator.scheduler
    cond = np.zeros((3, 22), dtype=np.float32)
    together = generate(model, sched, cond, [5, 6, 7], sampler, 3, 2.0, 0.7, batch_size=3)
    alone = generate(model, sched, cond[:1], [6], sampler, 3, 2.0, 0.7)
    again = generate(model, sched, cond, [5, 6, 7], sampler, 3, 2.0, 0.7, batch_size=2)
    # the same up to float rounding: the UNet's batched convolutions differ by ~1e-6 between
    # batch sizes, which can move a pixel across a grey-level boundary
    for a, b in ((together[1], alone[0]), (together, again)):
        diff = np.abs(a.astype(int) - b.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.005
    assert np.abs(together[0].astype(int) - together[2].astype(int)).mean() > 5


@pytest.mark.parametrize(("stochastic", "deterministic"),
                         [("ddim_eta", "ddim"), ("sde_dpmpp", "dpmpp")])
def test_stochastic_samplers_inject_step_noise(smoke, stochastic, deterministic):
    """The same seeds through a stochastic sampler and its deterministic twin: the initial
    noise is the same, so any difference comes from the noise added at each step."""
    _, _, generator, _ = smoke
    cond = np.zeros((2, 22), dtype=np.float32)
    runs = {name: generate(generator.unet, generator.scheduler, cond, [5, 6], name, 3, 1.0, 0.7)
            for name in (stochastic, deterministic)}
    assert not np.array_equal(runs[stochastic], runs[deterministic])


def test_bf16_sampling_runs_the_unet_in_bf16_and_stays_near_fp32(smoke):
    """``sampling.mixed_precision``: the UNet computes in bf16 under autocast, the scheduler in
    fp32, and the images stay within rounding of the fp32 ones on the same seeds."""
    _, _, generator, _ = smoke
    model, sched = generator.unet, generator.scheduler
    seen: list[torch.dtype] = []
    hook = model.unet.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    cond = np.zeros((4, 22), dtype=np.float32)
    try:
        fp32 = generate(model, sched, cond, [1, 2, 3, 4], "dpmpp", 3, 1.0, 0.7)
        n_fp32 = len(seen)
        bf16 = generate(model, sched, cond, [1, 2, 3, 4], "dpmpp", 3, 1.0, 0.7,
                        precision="bf16")
    finally:
        hook.remove()
    assert set(seen[:n_fp32]) == {torch.float32} and set(seen[n_fp32:]) == {torch.bfloat16}
    diff = np.abs(fp32.astype(int) - bf16.astype(int))
    assert 0 < diff.mean() < 2, diff.mean()


def test_replica_plan_uses_training_rows_only(smoke):
    params, manifest, _, _ = smoke
    plan = replica_plan(params, manifest, "step-0000004")
    train = training_rows(params, manifest)
    assert len(plan) == 2 * len(train)
    assert set(plan["source_image_id"]) == set(train["image_id"])
    assert plan.groupby("source_image_id")["replica"].apply(sorted).map(list).eq(
        [[0, 1]] * len(train)).all()
    assert plan["seed"].is_unique and plan["image_id"].is_unique
    assert (plan["site"] == "synthetic").all()
    # same labels and demographics as the source row, and its patient id (for leakage checks)
    src = train.set_index("image_id").loc[plan["source_image_id"]]
    for col in ("patient_id", "sex", "age", "Cardiomegaly"):
        assert np.array_equal(plan[col].to_numpy(), src[col].to_numpy()) or col == "Cardiomegaly"
    assert plan.equals(replica_plan(params, manifest, "step-0000004"))  # deterministic
    check_no_eval_sources(plan, manifest)
    bad = plan.copy()
    test_id = manifest.loc[manifest["split"] == "test", "image_id"].iloc[0]
    bad.loc[0, "source_image_id"] = test_id
    with pytest.raises(ValueError, match="non-training"):
        check_no_eval_sources(bad, manifest)


def test_rebalance_weights_equalise_groups(smoke):
    params, manifest, _, _ = smoke
    train = training_rows(params, manifest)
    w = rebalance_weights(train, ["sex"], {})
    per_sex = pd.Series(w).groupby(train["sex"].to_numpy()).sum()
    assert np.allclose(per_sex.to_numpy(), 0.5)
    aged = train.assign(age=train["age"].where(np.arange(len(train)) % 3 > 0))
    by_band = rebalance_weights(aged, ["age_band"], {})  # a missing age is a group of its own
    bands = age_band(aged["age"]).astype(object).fillna(AGE_UNKNOWN).to_numpy()
    per_band = pd.Series(by_band).groupby(bands).sum()
    assert AGE_UNKNOWN in per_band.index and np.allclose(per_band, 1 / len(per_band))
    boosted = rebalance_weights(train, [], {"Support Devices": 4.0})
    pos = (train["Support Devices"] == 1.0).to_numpy()
    assert np.allclose(boosted[pos] / boosted[~pos][0], 4.0)
    plan = rebalance_plan(params, manifest, "step-0000004")
    assert len(plan) == 2 * len(train)  # same amount of synthetic data as k = 2 replicas
    assert set(plan["source_image_id"]) <= set(train["image_id"])


def test_generation_resumes_without_duplicates_or_losses(smoke, tmp_path):
    params, manifest, generator, run = smoke
    plan = replica_plan(params, manifest, "step-0000004").head(150)  # 3 shards of 64
    source = diffusion_source(params, generator)
    whole, part = replace(run, root=tmp_path / "whole"), replace(run, root=tmp_path / "part")
    generate_cohort(params, plan, source, whole, "replicas", progress=False)
    ref = finalize_cohort(plan, whole, "replicas", params.sampling.shard_size)

    class Stop(Exception):
        pass

    def stop_after_first(_shard: int) -> None:
        raise Stop
    with pytest.raises(Stop):
        generate_cohort(params, plan, source, part, "replicas", progress=False,
                        on_shard=stop_after_first)
    with pytest.raises(RuntimeError, match="incomplete"):
        finalize_cohort(plan, part, "replicas", params.sampling.shard_size)
    written = generate_cohort(params, plan, source, part, "replicas", progress=False)
    assert written == [1, 2]  # shard 0 was kept, not generated twice
    out = finalize_cohort(plan, part, "replicas", params.sampling.shard_size)
    pd.testing.assert_frame_equal(out, ref)
    a = ImageCache(whole.synthetic_cache("replicas"))
    b = ImageCache(part.synthetic_cache("replicas"))
    assert a.image_ids == b.image_ids == plan["image_id"].tolist()
    assert np.array_equal(np.asarray(a.images), np.asarray(b.images))
    saved = pd.read_parquet(part.synthetic_manifest("replicas"))
    assert {"source_image_id", "replica", "seed", "sampler", "steps", "guidance",
            "checkpoint"} <= set(saved.columns)
    # shards from another model are never mixed into this cohort
    other = plan.assign(checkpoint="step-0000099")
    with pytest.raises(SyntheticCohortError, match="step-0000004 but this cohort uses"):
        generate_cohort(params, other, source, part, "replicas", progress=False)


def test_two_processes_split_the_shards(smoke, tmp_path):
    params, manifest, generator, run = smoke
    plan = replica_plan(params, manifest, "step-0000004").head(150)
    source = diffusion_source(params, generator)
    here = replace(run, root=tmp_path)
    first = generate_cohort(params, plan, source, here, "replicas", rank=0, world=2,
                            progress=False)
    second = generate_cohort(params, plan, source, here, "replicas", rank=1, world=2,
                             progress=False)
    assert first == [0, 2] and second == [1]
    finalize_cohort(plan, here, "replicas", params.sampling.shard_size)


def test_explorer_callbacks_return_images_for_the_widgets(smoke):
    ex = SamplingExplorer(smoke[2])
    ex.steps.value, ex.count.value, ex.seed.value = 2, 3, 10
    ex.labels["Cardiomegaly"].value = "present"
    ex.labels["No Finding"].value = "absent"
    ex.sex.value, ex.age.value = "Female", 71
    ex.on_generate()
    images, captions = ex.last
    assert images.shape == (3, 32, 32) and images.dtype == np.uint8
    assert "Cardiomegaly" in captions[0] and "F 70s" in captions[0] and "seed 10" in captions[0]
    assert len([a for a in ex.last_figure.axes if a.images]) == 3  # drawn for the output
    same, _ = ex.generate()
    assert np.array_equal(same, images)
    ex.labels["Cardiomegaly"].value = "absent"
    other, caps = ex.generate()
    assert not np.array_equal(other, images) and "Cardiomegaly" not in caps[0]


def test_source_fraction_draws_whole_patients(smoke):
    params, manifest, _, _ = smoke
    part = params.model_copy(update={"sampling": params.sampling.model_copy(
        update={"source_fraction": 0.5})})
    plan = replica_plan(part, manifest, "step-0000004")
    train = training_rows(params, manifest)
    used = set(plan["patient_id"])
    assert 0.3 * train["patient_id"].nunique() < len(used) < 0.7 * train["patient_id"].nunique()
    # every image of a chosen patient is a source: patients are drawn whole
    chosen = train[train["patient_id"].isin(used)]
    assert set(plan["source_image_id"]) == set(chosen["image_id"])
