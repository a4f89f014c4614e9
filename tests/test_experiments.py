"""Classifier experiments: masked loss, augmentations, loader plans, the grid and its checks.

The grid tests use the smoke cohort with stand-in synthetic cohorts (copies of their source
images written through the sampling code's own plans and cache format), so they need no
diffusion model and run in seconds.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxrlib.classifier import training
from cxrlib.classifier.augment import augment_batch, mix_batch, random_affine
from cxrlib.classifier.training import epoch_plan, masked_bce, round_plans, weights_crc
from cxrlib.core.cohort import CohortError, patient_subset, real_subset, source_rows, training_rows
from cxrlib.core.config import load_params
from cxrlib.core.errors import ParamsError
from cxrlib.core.files import atomic_write_parquet
from cxrlib.core.kinds import Kind
from cxrlib.core.labels import CHEXPERT_LABELS
from cxrlib.core.layout import RunLayout
from cxrlib.core.schema import AugmentSpec, ClassifierSpec
from cxrlib.data.imagecache import CombinedCache, ImageCache, decode, write_image_cache
from cxrlib.data.phantom import STYLES, render_jpeg
from cxrlib.data.readers import prepare_cohort
from cxrlib.experiments.grid import Experiment, plan_grid
from cxrlib.experiments.runner import (
    GridData,
    LeakageError,
    check_grid_leakage,
    experiment_validation,
    grid_data,
    run_experiment,
    run_grid,
    training_set,
    training_sets,
)
from cxrlib.hardware import make_optimizer, precision_label
from cxrlib.synthetic.cohorts import (
    PHANTOM_RENDERER,
    oracle_source,
    plan_for,
    rebalance_plan,
    replica_plan,
)

ROOT = Path(__file__).resolve().parent.parent
OFF = AugmentSpec(hflip=0, vflip=0, noise_p=0, affine_p=0, mix_p=0, label_smoothing=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------
# Loss and augmentations


def test_masked_bce_ignores_nan_labels_instead_of_calling_them_negative():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.3, 4.0, -2.0]], requires_grad=True)
    targets = torch.tensor([[1.0, float("nan"), 0.0], [float("nan"), 1.0, float("nan")]])
    loss = masked_bce(logits, targets)
    known = ~torch.isnan(targets)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[known], targets[known])
    assert torch.allclose(loss, expected)
    as_negative = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, torch.nan_to_num(targets, nan=0.0))
    assert not torch.allclose(loss, as_negative)
    loss.backward()
    assert torch.all(logits.grad[~known] == 0) and torch.all(logits.grad[known] != 0)
    assert masked_bce(logits, torch.full_like(targets, float("nan"))).item() == 0.0


def _batch(n: int = 8, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand((n, 1, size, size), generator=g) * 2 - 1
    y = (torch.rand((n, 14), generator=g) > 0.5).float()
    y[0, 3] = float("nan")
    return x, y


def test_augmentations_switched_off_change_nothing():
    x, y = _batch()
    ax, ay = augment_batch(x, y, OFF, torch.Generator().manual_seed(1))
    assert torch.equal(ax, x)
    assert torch.equal(torch.isnan(ay), torch.isnan(y))
    assert torch.equal(torch.nan_to_num(ay), torch.nan_to_num(y))


def test_augmentations_are_seeded_and_keep_nan_targets_unknown():
    x, y = _batch()
    spec = AugmentSpec(mix_p=1.0)
    a = augment_batch(x, y, spec, torch.Generator().manual_seed(5))
    b = augment_batch(x, y, spec, torch.Generator().manual_seed(5))
    c = augment_batch(x, y, spec, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(torch.nan_to_num(a[1]), torch.nan_to_num(b[1]))
    assert not torch.equal(a[0], c[0])
    assert torch.isnan(a[1][0, 3])  # an unknown label stays unknown after mixing
    known = a[1][~torch.isnan(a[1])]
    assert known.min() >= 0.05 - 1e-6 and known.max() <= 0.95 + 1e-6  # label smoothing 0.1


def test_mixing_blends_targets_by_the_share_of_the_image():
    x = torch.stack([torch.full((1, 8, 8), 1.0), torch.full((1, 8, 8), -1.0)])
    y = torch.tensor([[1.0] * 14, [0.0] * 14])
    for seed in range(6):
        mx, my = mix_batch(x, y, AugmentSpec(mix_p=1.0), torch.Generator().manual_seed(seed))
        share_of_first = (mx[0].mean().item() + 1) / 2  # pixels that came from image 0
        if torch.equal(mx, x):  # mixed with itself (the permutation kept the order)
            continue
        assert my[0, 0].item() == pytest.approx(share_of_first, abs=1e-5)


def test_affine_pads_with_the_background_value():
    x = torch.ones((4, 1, 16, 16))
    spec = AugmentSpec(affine_p=1.0, rotation=0.5, scale=0.0, shift=0.2)
    moved = random_affine(x, spec, torch.Generator().manual_seed(0))
    assert moved.min().item() == pytest.approx(-1.0, abs=1e-5)  # uncovered corner
    assert moved.max().item() == pytest.approx(1.0, abs=1e-5)


def test_epoch_plan_splits_global_batches_across_processes():
    rng = lambda: np.random.default_rng(3)  # noqa: E731
    single = epoch_plan(22, 8, rng())
    assert np.array_equal(np.sort(np.concatenate(single)), np.arange(22))
    ranks = [epoch_plan(22, 4, rng(), rank=r, world=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    together = np.sort(np.concatenate([b for plan in ranks for b in plan]))
    assert np.array_equal(together, np.arange(22))  # every image once per epoch
    odd = [epoch_plan(17, 4, rng(), rank=r, world=2) for r in range(2)]
    assert len(odd[0]) == len(odd[1]) == 2  # the last global batch of 1 image is dropped


# ------------------------------------------------------------------------------------------
# The grid on the smoke cohort with stand-in synthetic cohorts


def _write_cohort(plan: pd.DataFrame, cache: ImageCache, run: RunLayout, strategy: str) -> None:
    """A synthetic cohort in notebook 03's format, whose images copy their source images."""
    with write_image_cache(run.synthetic_cache(strategy), len(plan), cache.resolution) as out:
        out.add(plan["image_id"].tolist(), cache.load(plan["source_image_id"]))
    atomic_write_parquet(plan, run.synthetic_manifest(strategy))


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CXRLIB_RUNS_DIR", str(runs))
        # no worth curves: the grid's arms read the stand-in cohorts written below only
        params = load_params(ROOT / "params" / "smoke.yaml", {"tradeoffs": None})
        run = RunLayout.open(params)
        cohort = prepare_cohort(params, run, progress=False)
    cache = ImageCache(cohort.cache_dir)
    _write_cohort(replica_plan(params, cohort.manifest, "step-0000004"), cache, run, "replicas")
    _write_cohort(rebalance_plan(params, cohort.manifest, "step-0000004"), cache, run,
                  "rebalance")
    _write_cohort(plan_for(params, cohort.manifest, "oracle", ""), cache, run, "oracle")
    return params, run, grid_data(params, run)


def test_plan_names_recipes_and_baselines(grid_run):
    params, _, _ = grid_run
    plan = plan_grid(params)
    names = [e.name for e in plan]
    per_fraction = ["real_only", "real_plus_synthetic_x1", "real_plus_synthetic_x2",
                    "real_repeated_x1", "real_plus_shuffled_x1", "real_plus_oracle_x1",
                    "synthetic_only_x1", "real_plus_rebalanced_x1"]
    assert names == [f"{n}.{tag}" for tag in ("f100", "f50", "f25") for n in per_fraction] + [
        "nih_only", "nih_plus_synthetic_x1", "nih_plus_real_x1"]
    baselines = {e.name: e.baseline for e in plan}
    assert baselines["synthetic_only_x1.f50"] \
        == Kind.SYNTHETIC_ONLY.baseline_name(0.5, "chexpert") == "real_only.f50"
    assert baselines["real_plus_shuffled_x1.f100"] == "real_only.f100"
    assert baselines["nih_plus_synthetic_x1"] \
        == Kind.EXTERNAL_PLUS_SYNTHETIC.baseline_name(1.0, "nih") == "nih_only"
    # every kind's recipe is data: its baseline kind, and whether it is trained on real rows
    assert {e.kind.baseline for e in plan} == {Kind.REAL_ONLY, Kind.EXTERNAL_ONLY}
    assert not Kind.SYNTHETIC_ONLY.recipe.keep_real and Kind.REAL_REPEATED.recipe.real_copies
    assert [k for k in Kind if k.control] == [
        Kind.REAL_REPEATED, Kind.REAL_PLUS_SHUFFLED, Kind.REAL_PLUS_ORACLE, Kind.ORACLE_ONLY,
        Kind.REAL_PLUS_ORACLE_SMOOTH, Kind.EXTERNAL_PLUS_REAL]
    assert baselines["nih_plus_real_x1"] == "nih_only"


def test_training_sets_have_the_recipe_sizes(grid_run):
    params, _, data = grid_run
    sets = {e.name: rows for e, rows in training_sets(params, data).items()}
    real = sets["real_only.f100"]
    assert (real["source"] == "real").all() and (real["split"] == "train").all()
    plus2 = sets["real_plus_synthetic_x2.f100"]
    assert (plus2["source"] == "synthetic").sum() == 2 * len(real)
    only = sets["synthetic_only_x1.f50"]
    assert (only["source"] == "synthetic").all()
    assert set(only["source_image_id"]) == set(sets["real_only.f50"]["image_id"])
    rebal = sets["real_plus_rebalanced_x1.f100"]
    assert (rebal["source"] == "synthetic").sum() == len(real)  # like for like with x1
    assert set(sets["real_only.f50"]["patient_id"]) < set(real["patient_id"])  # nested
    nih = sets["nih_plus_synthetic_x1"]
    assert set(nih.loc[nih["source"] == "real", "site"]) == {"nih"}
    # The external control adds as many internal REAL training images as x1 adds synthetic.
    nih_real = sets["nih_plus_real_x1"]
    added = nih_real[nih_real["source"] == "added_real"]
    assert len(added) == (nih["source"] == "synthetic").sum()
    assert set(added["site"]) == {"chexpert"} and (added["split"] == "train").all()
    # The positive control: the oracle cohort's renders of exactly the real rows.
    oracle = sets["real_plus_oracle_x1.f50"]
    renders = oracle[oracle["source"] == "synthetic"]
    assert renders["image_id"].str.startswith("synthetic/oracle/").all()
    assert sorted(renders["source_image_id"]) == sorted(sets["real_only.f50"]["image_id"])
    # Controls: as many rows as real + 1 replica; real rows twice, or labels shuffled.
    repeated = sets["real_repeated_x1.f100"]
    assert (repeated["source"] == "real").all() and len(repeated) == 2 * len(real)
    assert (repeated["image_id"].value_counts() == 2).all()
    shuffled, plus1 = sets["real_plus_shuffled_x1.f100"], sets["real_plus_synthetic_x1.f100"]
    syn_s = shuffled[shuffled["source"] == "synthetic"].set_index("image_id")
    syn_p = plus1[plus1["source"] == "synthetic"].set_index("image_id").loc[syn_s.index]
    labels = list(CHEXPERT_LABELS)
    assert syn_s[["sex", "age", "patient_id"]].equals(syn_p[["sex", "age", "patient_id"]])
    for lab in labels:  # the same labels, permuted across the synthetic rows
        assert sorted(syn_s[lab].fillna(-9)) == sorted(syn_p[lab].fillna(-9))
    moved = (syn_s[labels].fillna(-9).to_numpy() != syn_p[labels].fillna(-9).to_numpy())
    assert moved.any(axis=1).mean() > 0.3
    real_s = shuffled[shuffled["source"] == "real"].reset_index(drop=True)
    assert real_s[labels].equals(real[labels].reset_index(drop=True))  # real rows untouched


def test_each_seed_draws_its_own_real_subset_inside_the_sources(grid_run):
    params, _, data = grid_run
    half = params.sampling.model_copy(update={"source_fraction": 0.5})
    p = params.model_copy(update={"sampling": half})
    sources = set(source_rows(p, data.manifest)["patient_id"])
    draws = {s: set(real_subset(p, data.manifest, 0.25, s)["patient_id"]) for s in (0, 1)}
    assert draws[0] <= sources and draws[1] <= sources
    assert draws[0] != draws[1]
    assert draws[0] <= set(real_subset(p, data.manifest, 0.4, 0)["patient_id"])  # nested
    same = [set(real_subset(p, data.manifest, 0.5, s)["patient_id"]) for s in (0, 1)]
    assert same[0] == same[1] == sources  # the whole source set leaves nothing to draw
    with pytest.raises(CohortError, match="experiments.real_fractions"):
        real_subset(p, data.manifest, 0.75, 0)


def test_real_only_reaches_past_the_sources_by_a_nested_seeded_draw(grid_run):
    params, _, data = grid_run
    half = params.sampling.model_copy(update={"source_fraction": 0.5})
    p = params.model_copy(update={"sampling": half})
    sources = set(source_rows(p, data.manifest)["patient_id"])
    everyone = set(training_rows(p, data.manifest)["patient_id"])
    far = {s: set(real_subset(p, data.manifest, 0.75, s, beyond_sources=True)["patient_id"])
           for s in (0, 1)}
    for s in (0, 1):
        assert sources < far[s] < everyone  # every source patient, then some of the others
        assert abs(len(far[s]) / len(everyone) - 0.75) < 0.1
        assert set(real_subset(p, data.manifest, 0.6, s, beyond_sources=True)["patient_id"]) \
            <= far[s]  # nested
    assert far[0] != far[1]  # each seed draws its own extra patients
    inside = real_subset(p, data.manifest, 0.25, 0, beyond_sources=True)
    assert inside.equals(real_subset(p, data.manifest, 0.25, 0))  # below: the same draw
    assert set(real_subset(p, data.manifest, 1.0, 0, beyond_sources=True)["patient_id"]) \
        == everyone


def test_a_step_budget_gives_every_training_set_the_same_steps():
    spec = ClassifierSpec(batch_size=8, epochs=4, max_steps=30)
    for n in (20, 50, 333):
        rounds = list(round_plans(n, spec, np.random.default_rng(0)))
        assert len(rounds) == 4 and sum(len(r) for r in rounds) == 30
        assert all(len(b) == 8 for r in rounds for b in r)  # full batches only
    per_epoch = list(round_plans(50, spec.model_copy(update={"max_steps": None}),
                                 np.random.default_rng(0)))
    assert len(per_epoch) == 4 and all(len(r) == 7 for r in per_epoch)  # 6 full + 1 of 2


def test_supplement_fractions_keep_the_other_arms_at_the_listed_fractions():
    params = load_params(ROOT / "params" / "smoke.yaml",
                         {"experiments.supplement_fractions": [0.5], "tradeoffs": None})
    names = [e.name for e in plan_grid(params)]
    assert {"real_only.f100", "real_only.f50", "real_only.f25"} <= set(names)
    assert not [n for n in names if n != "real_only.f100" and n.endswith(".f100")]
    assert "real_plus_oracle_x1.f50" in names and "real_plus_oracle_x1.f25" not in names
    with pytest.raises(ParamsError, match="supplement_fractions .0.3. are not in"):
        load_params(ROOT / "params" / "smoke.yaml", {"experiments.supplement_fractions": [0.3]})
    partial = {"sampling.source_fraction": 0.5}
    far = load_params(ROOT / "params" / "smoke.yaml",
                      {**partial, "experiments.supplement_fractions": [0.5, 0.25]})
    assert "real_only.f100" in [e.name for e in plan_grid(far)]  # real only runs past them
    with pytest.raises(ParamsError, match=r"has \[1.0\], above sampling.source_fraction 0.5"):
        load_params(ROOT / "params" / "smoke.yaml", partial)  # every arm at 100%: refused


def test_converged_protocol_validates_every_eval_every_steps_up_to_its_ceiling():
    spec = ClassifierSpec(batch_size=8, protocol="converged", max_steps=100, eval_every=25)
    for n in (20, 333):
        rounds = list(round_plans(n, spec, np.random.default_rng(0)))
        assert [len(r) for r in rounds] == [25, 25, 25, 25]
    with pytest.raises(ValueError, match="needs classifier.max_steps"):
        ClassifierSpec(protocol="converged")


def test_early_stopping_waits_out_the_early_transient_before_it_may_stop():
    """The demo arm's validation loss rises at step 50 before it falls (seed 2 of the 5% arm,
    2026-12-06); patience 2 alone stops at step 75 on the weights of step 25, patience 2 from
    step 100 on keeps step 125's."""
    losses = [0.486, 0.756, 0.537, 0.394, 0.361, 0.383, 0.387, 0.406, 0.423]
    model = torch.nn.Linear(1, 1)

    def run(stopper: training.EarlyStopping) -> tuple[int, int]:
        for epoch, loss in enumerate(losses, start=1):
            if stopper.update(loss, epoch, 25 * epoch, model):
                return 25 * epoch, stopper.best_step
        return 25 * len(losses), stopper.best_step

    assert run(training.EarlyStopping(patience=2)) == (75, 25)
    assert run(training.EarlyStopping(patience=2, stop_after=100)) == (175, 125)
    assert run(training.EarlyStopping(patience=4)) == (225, 125)


def test_a_shorter_patience_is_a_prefix_of_the_same_training(grid_run):
    """What benchmarks/replay_early_stopping.py rests on: until a rule stops it, a training
    does not depend on its early-stopping rule, so a less patient rule's run is a prefix of a
    more patient one's and its kept step is the replay of the longer history."""
    params, _, data = grid_run
    train = data.manifest[data.manifest["split"] == "train"].head(64)
    val = data.manifest[data.manifest["split"] == "val"].head(32)
    spec = params.classifier.model_copy(update={
        "protocol": "converged", "max_steps": 40, "eval_every": 2, "batch_size": 16,
        "lr": 0.05, "patience": 20})  # a rate high enough that the validation loss jumps
    long = training.train_classifier(spec, train, val, data.cache, seed=3, progress=False)
    short = training.train_classifier(spec.model_copy(update={"patience": 1}), train, val,
                                      data.cache, seed=3, progress=False)
    assert len(short.history) < len(long.history)  # the short rule did stop earlier
    shared = long.history.head(len(short.history))
    np.testing.assert_array_equal(short.history["val_loss"], shared["val_loss"])
    replayed = training.EarlyStopping(1)
    for row in long.history.itertuples():
        if replayed.update(row.val_loss, row.epoch, row.step, None):
            break
    assert (replayed.best_step, row.step) == (short.best_step, short.steps)


def test_adamw_runs_fused_with_the_per_tensor_update():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    twin = copy.deepcopy(model)
    fused = make_optimizer(model, "adamw", 1e-2, 1e-4)
    loop = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=1e-4)
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    x = torch.randn(32, 8)
    for _ in range(5):
        for net, opt in ((model, fused), (twin, loop)):
            net(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not make_optimizer(model, "lion", 1e-4, 0.0).defaults.get("fused")


def test_cosine_schedule_warms_up_decays_and_holds():
    spec = ClassifierSpec(lr=1e-2, lr_schedule="cosine", warmup_steps=10, max_steps=400,
                          lr_decay_steps=100)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=spec.lr)
    schedule = training.lr_schedule(spec, opt)
    lrs = []
    for step in range(1, 151):
        schedule.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] < lrs[4] < lrs[8] < lrs[9] <= 1e-2 < lrs[9] * 1.03  # warm-up to lr
    assert all(a >= b for a, b in zip(lrs[9:100], lrs[10:100], strict=False))  # decays
    assert lrs[99:] == pytest.approx([1e-4] * 51)  # 1% of lr, held after lr_decay_steps
    assert training.lr_schedule(ClassifierSpec(), opt) is None  # constant: no schedule
    with pytest.raises(ValueError, match="needs classifier.lr_decay_steps"):
        ClassifierSpec(lr_schedule="cosine")


def test_channels_last_trains_the_same_classifier(grid_run):
    """channels_last changes the memory layout of the model and its batches, not the
    arithmetic; every history row says the precision it trained in, and ``on_round`` sees
    the weights each round scored."""
    params, _, data = grid_run
    train = data.manifest[data.manifest["split"] == "train"].head(64)
    val = data.manifest[data.manifest["split"] == "val"].head(32)
    spec = params.classifier.model_copy(update={"augment": OFF})
    rounds = []
    a = training.train_classifier(spec, train, val, data.cache, progress=False,
                                  on_round=lambda m, row: rounds.append((m.training, row)))
    b = training.train_classifier(spec.model_copy(update={"channels_last": True}), train, val,
                                  data.cache, progress=False)
    np.testing.assert_allclose(a.history["val_loss"], b.history["val_loss"], rtol=1e-3)
    np.testing.assert_allclose(a.history["train_loss"], b.history["train_loss"], rtol=1e-3)
    assert set(a.history["precision"]) == {precision_label("no")} == {b.precision}
    assert [row["step"] for _, row in rounds] == a.history["step"].tolist()
    assert not any(training for training, _ in rounds)  # scored in eval mode


def test_external_arms_early_stop_on_their_own_site(grid_run):
    params, _, data = grid_run
    exps = {e.name: e for e in plan_grid(params)}
    val = experiment_validation(exps["nih_only"], params, data.manifest)
    assert set(val["site"]) == {"nih"} and (val["split"] == "val").all()
    internal = experiment_validation(exps["real_only.f50"], params, data.manifest)
    assert set(internal["site"]) == {"chexpert"}
    # NIH's unannotated labels (blank: nan for the site) stay missing, not negative.
    nih = data.manifest[data.manifest["site"] == "nih"]
    assert nih["Fracture"].isna().all() and nih["Support Devices"].isna().all()
    assert nih["Pleural Effusion"].notna().all()


def test_oracle_renders_the_raw_row_through_the_sites_own_path(grid_run):
    """The perfect generator: with the site's own random stream the render reproduces the
    cached cohort image byte for byte (same JPEG and preprocessing path); with its own seed it
    is a fresh image of the same row; the smooth variant drops the detector noise."""
    params, run, data = grid_run
    plan = plan_for(params, data.manifest, "oracle", "").head(6)
    assert (plan["checkpoint"] == PHANTOM_RENDERER).all()
    assert not set(plan["seed"]) & set(replica_plan(params, data.manifest, "x")["seed"])
    first = data.manifest.set_index("image_id").loc[plan["source_image_id"].iloc[0]]
    i = int(first["source_row"]) - 2
    raw = pd.read_csv(first["source_file"]).iloc[i]
    site_key = int.from_bytes(b"chexpert", "little")
    own = render_jpeg({k: float(raw[k]) for k in CHEXPERT_LABELS}, raw["Sex"],
                      float(raw["Age"]), raw["AP/PA"], STYLES["chexpert"], 32,
                      [params.run.seed, site_key, i])
    with Image.open(io.BytesIO(own)) as img:
        assert np.array_equal(decode(img, 32), data.cache.get(first.name))
    fresh = oracle_source(params, data.manifest, smooth=False)(plan)
    again = oracle_source(params, data.manifest, smooth=False)(plan)
    smooth = oracle_source(params, data.manifest, smooth=True)(plan)
    assert np.array_equal(fresh, again)  # seeded
    assert not np.array_equal(fresh[0], data.cache.get(first.name))  # a new image of the row
    lap = lambda a: np.abs(np.diff(a.astype(float), axis=-1)).mean()  # noqa: E731
    assert lap(smooth) < lap(fresh)  # no detector noise: less pixel-to-pixel variation


def test_oracle_on_real_data_is_refused_with_the_reason(tmp_path):
    site = {"site": "mysite", "reader": "csv", "root": str(tmp_path),
            "columns": {"path": "p", "patient_id": "q"}}
    with pytest.raises(ParamsError, match="real data .* cannot have"):
        load_params(ROOT / "params" / "smoke.yaml", {"data.sites": [site]})
    with pytest.raises(ParamsError, match="needs 'oracle' in sampling.strategies"):
        load_params(ROOT / "params" / "smoke.yaml", {"sampling.strategies": ["replicas"],
                                                     "experiments.rebalance_k": 0})


def test_synthetic_rows_never_come_from_validation_or_test_sources(grid_run):
    params, _, data = grid_run
    split = data.manifest.set_index("image_id")["split"]
    for rows in training_sets(params, data).values():
        synthetic = rows[rows["source"] == "synthetic"]
        if len(synthetic):
            assert (synthetic["source_image_id"].map(split) == "train").all()


def test_leakage_check_fails_loudly_on_a_test_patient(grid_run):
    params, _, data = grid_run
    test_patient = data.manifest.loc[data.manifest["split"] == "test", "patient_id"].iloc[0]
    replicas = data.synthetic["replicas"].copy()
    replicas.loc[replicas.index[0], "patient_id"] = test_patient  # a synthetic copy of them
    leaky = GridData(data.manifest, data.cache, {**data.synthetic, "replicas": replicas},
                     data.synthetic_caches)
    with pytest.raises(LeakageError, match=str(test_patient)):
        training_sets(params, leaky)
    exp = plan_grid(params)[0]
    rows = training_set(exp, params, data)
    rows.loc[0, "split"] = "val"
    with pytest.raises(LeakageError, match="not from a train split"):
        check_grid_leakage({"x": rows}, data.manifest)


def test_fractions_beyond_the_synthetic_sources_are_refused(grid_run):
    params, _, data = grid_run
    partial = params.sampling.model_copy(update={"source_fraction": 0.5})
    p = params.model_copy(update={"sampling": partial})
    few = source_rows(p, data.manifest)
    replicas = data.synthetic["replicas"]
    some = replicas[replicas["source_image_id"].isin(set(few["image_id"]))]
    thin = GridData(data.manifest, data.cache, {**data.synthetic, "replicas": some},
                    data.synthetic_caches)
    exp = next(e for e in plan_grid(p) if e.name == "real_plus_synthetic_x1.f100")
    with pytest.raises(ValueError, match="experiments.real_fractions"):
        training_set(exp, p, thin)
    half = next(e for e in plan_grid(p) if e.name == "real_plus_synthetic_x1.f50")
    assert len(training_set(half, p, thin))  # the 50% draw lies inside the sources
    two = exp.__class__(**{**exp.__dict__, "k": 2, "real_fraction": 0.5})
    fewer = GridData(data.manifest, data.cache,
                     {**data.synthetic, "replicas": some[some["replica"] < 1]},
                     data.synthetic_caches)
    with pytest.raises(ValueError, match="replicas. cohort are missing"):
        training_set(two, p, fewer)


def test_patient_subsets_are_nested_and_whole_patients(grid_run):
    _, _, data = grid_run
    rows = data.manifest[data.manifest["split"] == "train"]
    small, large = patient_subset(rows, 0.3, 7), patient_subset(rows, 0.6, 7)
    assert set(small["patient_id"]) <= set(large["patient_id"])
    per_patient = rows.groupby("patient_id").size()
    assert (small.groupby("patient_id").size() == per_patient[small["patient_id"].unique()]).all()


def test_grid_runs_writes_predictions_and_resumes(grid_run, monkeypatch):
    params, run, data = grid_run
    results = run_grid(params, data, run, progress=False)
    assert len(results) == len(plan_grid(params))
    preds = pd.read_parquet(run.experiment("real_plus_synthetic_x1.f50", 0).predictions)
    assert set(preds.columns) >= {"experiment", "seed", "image_id", "patient_id", "test_set",
                                  "label", "target", "score", "sex", "age", "view"}
    assert set(preds["test_set"]) == {"chexpert (internal)", "nih (external)",
                                      "padchest (external)"}
    assert len(preds) == 14 * preds["image_id"].nunique()
    assert set(preds["label"]) == set(CHEXPERT_LABELS)
    assert set(results["precision"]) == {precision_label("no")}  # per arm: what it ran in
    # Resume: drop one experiment's predictions; only that one trains again.
    (run.experiment("synthetic_only_x1.f100", 0).predictions).unlink()
    trained = []
    real_train = training.train_classifier
    monkeypatch.setattr(training, "train_classifier",
                        lambda *a, **k: trained.append(len(a[1])) or real_train(*a, **k))
    shutil.rmtree(run.experiment("synthetic_only_x1.f100", 0).model)
    run_grid(params, data, run, progress=False)
    assert len(trained) == 1
    assert (run.experiment("synthetic_only_x1.f100", 0).predictions).exists()


def test_combined_cache_reads_across_caches_and_caches_pickle_without_images(grid_run):
    _, _, data = grid_run
    combined = data.combined_cache()
    syn_ids = data.synthetic["replicas"]["image_id"].iloc[[3, 0]].tolist()
    real_ids = data.manifest["image_id"].iloc[[5, 1]].tolist()
    ids = [syn_ids[0], real_ids[0], syn_ids[1], real_ids[1]]
    got = combined.load(ids)
    assert np.array_equal(got[1], data.cache.get(real_ids[0]))
    assert np.array_equal(got[0], data.synthetic_caches["replicas"].get(syn_ids[0]))
    with pytest.raises(KeyError, match="none of the caches"):
        combined.load(["nope"])
    blob = pickle.dumps(data.cache)
    assert len(blob) < 2000 and np.array_equal(pickle.loads(blob).get(real_ids[0]),
                                               data.cache.get(real_ids[0]))
    assert isinstance(combined, CombinedCache)


def test_experiment_params_are_validated():
    with pytest.raises(ParamsError, match="sampling.replicas"):
        load_params(ROOT / "params" / "smoke.yaml", {"experiments.supplement_k": [5]})
    with pytest.raises(ParamsError, match="not an external site"):
        load_params(ROOT / "params" / "smoke.yaml",
                    {"experiments.external": [{"site": "chexpert", "synthetic_k": [0]}]})
    with pytest.raises(ParamsError, match="experiments.seedz"):
        load_params(ROOT / "params" / "smoke.yaml", {"experiments.seedz": [1]})


def test_grid_under_two_processes_through_accelerate(grid_run, tmp_path):
    """`accelerate launch --multi_gpu` with 2 processes (gloo on CPU): DDP training of the
    experiments still to do, the main process writing their files."""
    params, run, data = grid_run
    grid_params = tmp_path / "smoke-grid.yaml"  # the fixture's parameters: no worth curves
    grid_params.write_text(f"extends: {ROOT / 'params' / 'smoke.yaml'}\ntradeoffs: null\n")
    out = run.experiments
    run_grid(params, data, run, progress=False)  # the rest of the grid is done
    for name in ("real_only.f50", "nih_plus_synthetic_x1"):
        shutil.rmtree(out / name)
    env = {**os.environ, "CXRLIB_RUNS_DIR": str(run.root.parent), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--multi_gpu", "-m", "cxrlib", "run-experiments", "--params", str(grid_params)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{len(plan_grid(params))} experiment(s) finished" in proc.stdout
    for name in ("real_only.f50", "nih_plus_synthetic_x1"):
        preds = pd.read_parquet(run.experiment(name, 0).predictions)
        assert preds["score"].notna().all() and len(preds) == len(
            pd.read_parquet(run.experiment("real_only.f100", 0).predictions))


def test_grid_workers_train_arms_in_processes_of_their_own(grid_run, monkeypatch):
    """experiments.workers 2: the arms still to do train in two spawned processes (none in
    this one), each on its own training rows and writing its folder as in-process training
    does. (Their scores are not compared: another thread count changes the float sums, which
    a training carries on as another seed would.)"""
    params, run, data = grid_run
    run_grid(params, data, run, progress=False)  # the rest of the grid is done
    names = ("real_only.f50", "real_plus_synthetic_x1.f50", "real_plus_oracle_x1.f25")
    rows = ("name", "seed", "n_real", "n_synthetic", "n_unique_real", "n_patients")
    before = {}
    for name in names:
        config = json.loads(run.experiment(name, 0).config.read_text())
        before[name] = ({k: config[k] for k in rows},
                        pd.read_parquet(run.experiment(name, 0).predictions))
        shutil.rmtree(run.experiment(name, 0).root)
    monkeypatch.setattr("cxrlib.experiments.runner.run_experiment",
                        lambda *a, **k: pytest.fail("trained in the calling process"))
    two = params.model_copy(update={"experiments": params.experiments.model_copy(
        update={"workers": 2})})
    results = run_grid(two, data, run, progress=False)
    assert len(results) == len(plan_grid(params))
    for name in names:
        config = json.loads(run.experiment(name, 0).config.read_text())
        assert {k: config[k] for k in rows} == before[name][0]  # the same training rows
        assert config["optimizer_steps"] > 0
        after = pd.read_parquet(run.experiment(name, 0).predictions)
        assert after[["image_id", "label", "test_set"]].equals(
            before[name][1][["image_id", "label", "test_set"]])
        assert after["score"].between(0, 1).all()


def test_synthetic_pretraining_fine_tunes_the_pretrained_weights_on_the_real_rows(
        grid_run, monkeypatch):
    """Kind synthetic_pretrain: phase 1 trains on the real rows' replicas alone, phase 2 on the
    real rows alone from phase 1's kept weights; steps of both phases are reported and the
    arm's compute is their sum."""
    params, run, data = grid_run
    exp = Experiment(Kind.SYNTHETIC_PRETRAIN, 1, 0.5, "chexpert", 0)
    train = training_set(exp, params, data)
    assert (train["source"] == "synthetic").sum() == (train["source"] == "real").sum() > 0
    calls = []
    real_train = training.train_classifier

    def spy(spec, rows, val, cache, seed, progress, on_round=None, init=None, resume=None):
        result = real_train(spec, rows, val, cache, seed, progress, init=init, resume=resume)
        calls.append((set(rows["source"]), None if init is None else weights_crc(init),
                      weights_crc(result.model)))
        return result

    monkeypatch.setattr(training, "train_classifier", spy)
    run_experiment(exp, params, data, train, run)
    (pre_rows, pre_init, pre_out), (fine_rows, fine_init, _) = calls
    assert pre_rows == {"synthetic"} and pre_init is None
    assert fine_rows == {"real"} and fine_init == pre_out  # starts from the kept weights
    out = run.experiment(exp.name, exp.seed)
    config = json.loads(out.config.read_text())
    history = pd.read_csv(out.history)
    assert config["optimizer_steps"] == history["step"].max() > config["pretrain_steps"] > 0
    assert config["best_step"] > config["pretrain_steps"]  # counted on from phase 1's end
    assert list(dict.fromkeys(history["phase"])) == ["pretrain", "fine-tune"]
    assert history["step"].is_monotonic_increasing
    assert config["n_synthetic"] == config["n_real"]  # the arm's supplement, as for mixing
    # the saved fine-tuned model is reused for the same initial weights only
    calls.clear()
    real = train[train["source"] == "real"]
    val = experiment_validation(exp, params, data.manifest)
    for init in (training.load_classifier(out.pretrain_model).model, None):
        training.train_or_load(params.classifier, real, val, data.cache, out.model, 0, False,
                               init=init)
    assert len(calls) == 1 and calls[0][1] is None
