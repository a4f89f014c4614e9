"""Training the conditional DDPM: loss, batches, checkpoints, resume, previews.

Notation follows Ho et al. (2020) and Salimans & Ho (2022): a clean image x_0 in [-1, 1] is
noised to x_t = alpha_t x_0 + sigma_t eps with eps ~ N(0, I), where alpha_t^2 = prod(1 - beta_s)
follows the cosine schedule (Nichol & Dhariwal 2021) rescaled to zero terminal SNR (Lin et al.
2024: alpha_T = 0, so the last step is pure noise, as at sampling time). The network
(:mod:`cxrlib.diffusion.network`) predicts v = alpha_t eps - sigma_t x_0 (``v_prediction``;
``epsilon`` selectable) and is trained with the mean squared error against it. The condition c (22
values, 23 with ``diffusion.condition_on_view``: :mod:`cxrlib.diffusion.condition`) is replaced by a
learned null embedding for a ``cond_dropout`` share of images, so one network gives both
eps(x_t, c) and eps(x_t, null) for classifier-free guidance.

Training runs through HF Accelerate, so the same code runs in a notebook on one device and under
``accelerate launch`` on several GPUs or nodes. Batches are a pure function of (seed, step) and
the noise of each step comes from a generator seeded by (seed, step, process), so a run resumed
from a checkpoint continues exactly as an uninterrupted run would.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import (
    EMAModel,
    compute_density_for_timestep_sampling,
    compute_snr,
)
from safetensors.torch import load_file, save_file
from scipy.optimize import linear_sum_assignment

from cxrlib.cluster.spec import ClusterSpec, active_cluster
from cxrlib.core.cohort import diffusion_rows
from cxrlib.core.config import diff_keys
from cxrlib.core.files import atomic_path, atomic_write_text, replace_folder
from cxrlib.core.labels import CHEXPERT_LABELS
from cxrlib.core.layout import RunLayout
from cxrlib.core.processes import on_main
from cxrlib.core.progress import tqdm
from cxrlib.core.schema import DiffusionSpec, Params
from cxrlib.data.imagecache import ImageCache, to_model_input
from cxrlib.diffusion.checkpoints import (
    checkpoint_dirs,
    checkpoint_folder,
    latest_checkpoint,
    read_checkpoint_state,
    trained_checkpoint,
)
from cxrlib.diffusion.condition import dropout_mask, encode_conditions
from cxrlib.diffusion.network import ConditionalUNet, DiffusionError, noise_scheduler, unet_config
from cxrlib.diffusion.samplers import ddim_for, sample_images
from cxrlib.hardware import describe_precision, make_optimizer, precision_label, resolve_precision


def model_summary(params: Params) -> pd.DataFrame:
    """Per UNet level: feature-map size, channels, residual blocks, attention; and totals."""
    cfg = unet_config(params.diffusion, params.data.resolution)
    model = ConditionalUNet(**cfg)
    rows = [{"level": i, "feature map": f"{params.data.resolution // 2**i} px",
             "channels": ch, "res blocks": cfg["layers_per_block"],
             "attention": "yes" if "Attn" in blk else "-"}
            for i, (ch, blk) in enumerate(zip(cfg["block_out_channels"],
                                              cfg["down_block_types"], strict=True))]
    table = pd.DataFrame(rows).set_index("level")
    table.attrs["parameters"] = sum(p.numel() for p in model.parameters())
    table.attrs["condition embedding"] = sum(p.numel() for p in model.cond_embed.parameters())
    return table


def identity_config(params: Params) -> dict:
    """What a checkpoint must match to be resumed: architecture (with the condition width),
    schedule, optimiser, data (``train_on``). Keys newer than the first checkpoints
    (:attr:`DiffusionSpec.LATER_IDENTITY_KEYS`) are left out at their defaults, as those
    checkpoints were made without them."""
    spec = params.diffusion.model_dump(exclude=set(DiffusionSpec.RUN_LENGTH_KEYS))
    for key in DiffusionSpec.LATER_IDENTITY_KEYS:
        if spec[key] == DiffusionSpec.model_fields[key].default:
            del spec[key]
    return {"unet": unet_config(params.diffusion, params.data.resolution), "diffusion": spec,
            "seed": params.run.seed}


def batch_indices(step: int, n: int, global_batch: int, seed: int) -> np.ndarray:
    """Row indices of the global batch at ``step``: epochs are seeded permutations of n rows,
    consumed in order, so a batch depends only on (seed, step)."""
    pos = step * global_batch + np.arange(global_batch)
    epochs, within = pos // n, pos % n
    out = np.empty(global_batch, dtype=np.int64)
    for e in np.unique(epochs):
        perm = np.random.default_rng([seed, int(e)]).permutation(n)
        out[epochs == e] = perm[within[epochs == e]]
    return out


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The random source of one training step on one process (noise, timesteps, dropout)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, rank])
                                             .generate_state(1)[0]))


# ---------------------------------------------------------------------------------------------
# Checkpoints: RunLayout.checkpoints/step-XXXXXXX/ written under a temporary name and
# renamed when complete. Weights, EMA weights and RNG state in safetensors; the optimiser state
# with torch.save (tensors and numbers only, loaded back with weights_only=True); the loss
# history in parquet; the rest JSON.


def save_checkpoint(accelerator: Accelerator, root: Path, step: int, model: ConditionalUNet,
                    ema: EMAModel, optimizer: torch.optim.Optimizer,
                    lr_scheduler: torch.optim.lr_scheduler.LRScheduler, identity: dict,
                    history: list[dict], keep: int,
                    kept_steps: frozenset[int] = frozenset()) -> Path | None:
    """Write ``step-XXXXXXX/`` from the main process (every process's RNG state is gathered to
    it) as one folder replaced atomically. Returns the folder on the main process, None on
    the others.

    Args:
        accelerator: the training's Accelerator (process count, gradient scaler); every
            process must call, since the RNG states are gathered.
        root: the checkpoints folder (:attr:`RunLayout.checkpoints`).
        step: optimiser steps done; names the folder.
        model: the unwrapped UNet, its raw (not EMA) weights saved to ``model.safetensors``.
        ema: the EMA of the weights (``ema.safetensors``, its settings in ``state.json``).
        optimizer: the optimiser, its state saved to ``optimizer.pt``.
        lr_scheduler: the learning-rate schedule, its state saved in ``state.json``.
        identity: what a resume must match (:func:`identity_config`), saved in ``state.json``.
        history: the loss history so far, one dict per step (``history.parquet``).
        keep: how many newest checkpoints to keep; older ones are removed ...
        kept_steps: ... except those of these steps, which the study samples from
            (:meth:`cxrlib.core.schema.Params.sampled_steps`).
    """
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    rngs = gather_object([rng]) if accelerator.num_processes > 1 else [rng]
    final = checkpoint_folder(root, step)

    def write() -> Path:
        previous = latest_checkpoint(root)  # a new checkpoint needs about its space
        need = sum(f.stat().st_size for f in previous.iterdir()) if previous else 0
        with replace_folder(final, expected_bytes=need) as tmp:
            for rank, state in enumerate(rngs):
                save_file(state, tmp / f"rng-{rank}.safetensors")
            names = [n for n, _ in model.named_parameters()]
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                      tmp / "model.safetensors")
            save_file({n: p.detach().cpu().contiguous()
                       for n, p in zip(names, ema.shadow_params, strict=True)},
                      tmp / "ema.safetensors")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            pd.DataFrame(history).to_parquet(tmp / "history.parquet", index=False)
            scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
            state = {"step": step, "identity": identity, "world": accelerator.num_processes,
                     "ema": {k: v for k, v in ema.state_dict().items() if k != "shadow_params"},
                     "lr_scheduler": lr_scheduler.state_dict(), "grad_scaler": scaler}
            (tmp / "state.json").write_text(json.dumps(state, indent=1, default=float))
        for old in checkpoint_dirs(root)[:-keep]:
            if old != final and read_checkpoint_state(old)["step"] not in kept_steps:
                shutil.rmtree(old)
        return final

    return on_main(write)


@dataclass
class ResumePoint:
    """Where a restored checkpoint left training: the steps done and their loss history."""

    step: int
    history: list[dict]


def restore_checkpoint(accelerator: Accelerator, folder: Path, model: ConditionalUNet,
                       ema: EMAModel, optimizer: torch.optim.Optimizer,
                       lr_scheduler: torch.optim.lr_scheduler.LRScheduler) -> ResumePoint:
    """Undo :func:`save_checkpoint`: load the weights, EMA, optimiser, learning-rate schedule,
    gradient scaler and this process's RNG state from ``folder``.

    Call it with the objects freshly built and before ``accelerator.prepare``, so the run then
    continues exactly as the saved one would have. A checkpoint made with another number of
    processes is refused (its batches would not line up).
    """
    state = read_checkpoint_state(folder)
    saved_world = state.get("world", 1)
    if saved_world != accelerator.num_processes:
        raise DiffusionError(
            f"checkpoint {folder} was trained with {saved_world} process(es) but this run has "
            f"{accelerator.num_processes}: the batches would not line up; resume with "
            f"{saved_world} process(es), or start a new run")
    model.load_state_dict(load_file(folder / "model.safetensors"))
    shadow = load_file(folder / "ema.safetensors")
    ema.load_state_dict({**state["ema"], "shadow_params": [
        shadow[n] for n, _ in model.named_parameters()]})
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if state.get("grad_scaler") and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state["grad_scaler"])
    rng = load_file(folder / f"rng-{accelerator.process_index}.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available() and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])
    history = pd.read_parquet(folder / "history.parquet").to_dict("records")
    return ResumePoint(state["step"], history)


def check_identity(folder: Path, identity: dict) -> None:
    """A checkpoint made with another configuration cannot be resumed: say which keys differ."""
    saved = json.loads(json.dumps(read_checkpoint_state(folder)["identity"]))
    keys = sorted(diff_keys(saved, json.loads(json.dumps(identity))))
    if keys:
        raise DiffusionError(
            f"checkpoint {folder} was made with a different configuration (differs in: "
            f"{', '.join(keys[:8])}); use a new run.name, or delete the checkpoints folder "
            "to start this run's training again")


def condition_pairs(model: ConditionalUNet, scheduler: DDPMScheduler, base: pd.DataFrame,
                    labels: list[str], seeds: list[int], spec: DiffusionSpec,
                    steps: int | None = None) -> dict[str, np.ndarray]:
    """The same seeds sampled with no finding and with each label switched on.

    Returns ``{"no finding": imgs, label: imgs, ...}`` (each seeds x R x R uint8); differences
    between entries come from the condition alone.
    """
    rows = base.iloc[[0] * len(seeds)].copy()
    for lab in CHEXPERT_LABELS:
        rows[lab] = 0.0
    rows["No Finding"] = 1.0
    out = {}
    for name in ["no finding", *labels]:
        variant = rows.copy()
        if name != "no finding":
            variant["No Finding"], variant[name] = 0.0, 1.0
        cond = encode_conditions(variant, spec.nan_label_value, model.conditions_on_view)
        out[name] = sample_images(model, ddim_for(scheduler), cond, seeds, spec.preview_guidance,
                                  spec.guidance_rescale, steps or spec.sample_steps)
    return out


def preview_conditions(rows: pd.DataFrame, nan_value: float,
                       with_view: bool = False) -> tuple[np.ndarray, list[str]]:
    """Fixed preview conditions: the first training row's demographics with no finding, then
    with one finding switched on (cardiomegaly, effusion, support devices, edema), then with
    the sex flipped and, ``with_view``, the view flipped. A grid row shares one seed, so
    differences come from the condition."""
    base = rows.iloc[[0]].copy()
    for lab in CHEXPERT_LABELS:
        base[lab] = 0.0
    base["No Finding"] = 1.0
    variants, names = [base], ["no finding"]
    for lab in ("Cardiomegaly", "Pleural Effusion", "Support Devices", "Edema"):
        v = base.copy()
        v["No Finding"], v[lab] = 0.0, 1.0
        variants.append(v)
        names.append(lab.lower())
    v = base.copy()
    v["sex"] = "Female" if base["sex"].iloc[0] == "Male" else "Male"
    variants.append(v)
    names.append(f"sex {v['sex'].iloc[0].lower()}")
    if with_view:
        v = base.copy()
        v["view"] = "PA" if base["view"].iloc[0] == "AP" else "AP"
        variants.append(v)
        names.append(f"view {v['view'].iloc[0]}")
    frame = pd.concat(variants, ignore_index=True)
    return encode_conditions(frame, nan_value, with_view), names


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainingOutcome:
    """Where a training run ended: its last checkpoint, the loss history and preview grids,
    and the image ids of the rows it learned from (:func:`cxrlib.core.cohort.diffusion_rows`)."""

    checkpoint: Path
    history: pd.DataFrame
    steps_done: int
    resumed_from: int
    preview_files: list[Path]
    image_ids: list[str]
    num_processes: int = 1
    is_main_process: bool = True


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
                   scheduler: DDPMScheduler, spec: DiffusionSpec) -> torch.Tensor:
    """MSE against the target, optionally Min-SNR-gamma weighted per image (Hang et al. 2023,
    eq. 10 and its v form): w(t) = min(SNR(t), gamma) / SNR(t) for eps targets and
    min(SNR(t), gamma) / (SNR(t) + 1) for v targets, where SNR = alpha_t^2 / sigma_t^2. Easy,
    low-noise steps then stop dominating the gradient, which speeds up convergence."""
    per_image = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    if spec.snr_gamma is None:
        return per_image.mean()
    snr = compute_snr(scheduler, t)
    denom = snr + 1 if spec.prediction_type == "v_prediction" else snr.clamp(min=1e-8)
    return (per_image * snr.clamp(max=spec.snr_gamma) / denom).mean()


def immiscible_noise(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The batch's noise draws reordered so that image i gets draw j(i), where j minimises the
    summed squared distance between images and their noise (Li et al. 2024, Algorithm 1; the
    Hungarian method of scipy). Each image still gets one N(0, I) draw, so the forward process
    per image is unchanged; what changes is which image each draw diffuses."""
    cost = torch.cdist(x0.flatten(1).float(), noise.flatten(1).float()).pow(2)
    _, cols = linear_sum_assignment(cost.numpy())
    return noise[torch.from_numpy(cols)]


def training_timesteps(spec: DiffusionSpec, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` training timesteps in [0, T) drawn as ``diffusion.timestep_sampling`` says:
    uniform integers, or T * sigmoid(z) with z normal (SD3's logit-normal density, from
    diffusers), floored to the integer timestep."""
    steps = spec.num_train_timesteps
    if spec.timestep_sampling == "uniform":
        return torch.randint(0, steps, (n,), generator=generator)
    u = compute_density_for_timestep_sampling(
        "logit_normal", n, logit_mean=spec.timestep_logit_mean,
        logit_std=spec.timestep_logit_std, generator=generator)
    return (u * steps).long().clamp(0, steps - 1)


class _CachedRows(torch.utils.data.Dataset):
    """Training images (from the memory-mapped cache) and their condition vectors."""

    def __init__(self, cache: ImageCache, rows: pd.DataFrame, spec: DiffusionSpec):
        self.cache = cache
        self.index = cache.rows_for(rows["image_id"])
        self.cond = encode_conditions(rows, spec.nan_label_value, spec.condition_on_view)

    def __len__(self) -> int:
        return len(self.index)

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return to_model_input(self.cache.read_rows(self.index[idx])), torch.from_numpy(
            self.cond[idx])


def check_cache_matches(cache: ImageCache, rows: pd.DataFrame, resolution: int) -> None:
    if cache.resolution != resolution:
        raise DiffusionError(f"image cache {cache.folder} holds {cache.resolution} px images but "
                             f"data.resolution is {resolution}; rebuild the cache (notebook 01)")
    cache.rows_for(rows["image_id"])  # raises naming ids the cache lacks


def train_diffusion(params: Params, manifest: pd.DataFrame, cache: ImageCache, run: RunLayout,
                    progress: bool = True,
                    on_step: Callable[[int], None] | None = None) -> TrainingOutcome:
    """Train (or resume) the conditional DDPM for ``diffusion.max_steps`` optimiser steps on
    :func:`cxrlib.core.cohort.diffusion_rows` (``diffusion.train_on``).

    Writes checkpoints and preview grids under the run's diffusion stage
    (:attr:`RunLayout.checkpoints`, :attr:`RunLayout.previews`).
    ``on_step(step)`` is called after each step (tests use it to interrupt a run).

    With a cluster file (``--cluster``, :func:`cxrlib.cluster.spec.active_cluster`) the steps
    run as one SLURM job of ``diffusion.nodes`` x ``tasks_per_node`` processes
    (:func:`train_on_cluster`) and this process waits for it.
    """
    cluster = active_cluster()
    if cluster is not None:
        return train_on_cluster(params, manifest, run, cluster)
    spec = params.diffusion
    rows = diffusion_rows(params, manifest)
    check_cache_matches(cache, rows, params.data.resolution)
    identity = identity_config(params)
    ckpt_root = run.checkpoints
    ckpt_root.mkdir(parents=True, exist_ok=True)
    start = latest_checkpoint(ckpt_root)
    if start is not None and spec.resume == "never":
        raise DiffusionError(f"diffusion.resume is 'never' but {ckpt_root} already holds "
                             f"checkpoints (latest {start.name}); use a new run.name, or delete "
                             "the folder to train from scratch")
    if start is not None:
        check_identity(start, identity)

    accelerator = Accelerator(mixed_precision=resolve_precision(spec.mixed_precision),
                              cpu=not torch.cuda.is_available())
    ran = precision_label(accelerator.mixed_precision)  # each history row says it (resumes)
    if progress and accelerator.is_main_process:
        print(describe_precision(spec.mixed_precision, accelerator.mixed_precision))
    torch.manual_seed(params.run.seed)
    model = ConditionalUNet(**identity["unet"])
    optimizer = make_optimizer(model, spec.optimizer, spec.lr, spec.weight_decay)
    lr_scheduler = get_scheduler(
        "cosine" if spec.lr_schedule == "cosine" else "constant_with_warmup", optimizer,
        num_warmup_steps=spec.warmup_steps, num_training_steps=spec.max_steps)
    # foreach: one fused update over all tensors instead of a Python loop per tensor (the loop
    # cost the trainer 18% of its speed on a 2-core CPU, benchmarks/bench_diffusion_trainer.py)
    ema = EMAModel(model.parameters(), decay=spec.ema_decay, foreach=True)
    resume = (restore_checkpoint(accelerator, start, model, ema, optimizer, lr_scheduler)
              if start is not None else ResumePoint(0, []))
    step, history = resume.step, resume.history
    rank, world = accelerator.process_index, accelerator.num_processes
    layout = torch.channels_last if spec.channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    if spec.compile:
        model.compile()  # in place: parameter names, and so checkpoints, stay as they are
    model, optimizer = accelerator.prepare(model, optimizer)
    ema.to(accelerator.device)
    scheduler = noise_scheduler(spec)
    data = _CachedRows(cache, rows, spec)
    global_batch = spec.batch_size * world
    previews: list[Path] = []
    preview_cond, preview_names = preview_conditions(rows, spec.nan_label_value,
                                                     spec.condition_on_view)
    last_ckpt = start

    bar = tqdm(total=spec.max_steps, initial=step, desc="diffusion steps",
               disable=not progress or not accelerator.is_main_process)
    while step < spec.max_steps:
        idx = batch_indices(step, len(data), global_batch, params.run.seed)
        x0, cond = data.batch(idx[rank * spec.batch_size:(rank + 1) * spec.batch_size])
        gen = step_generator(params.run.seed, step, rank)
        noise = torch.randn(x0.shape, generator=gen)
        if spec.noise_assignment == "immiscible":
            noise = immiscible_noise(x0, noise)
        t = training_timesteps(spec, x0.shape[0], gen)
        drop = dropout_mask(x0.shape[0], spec.cond_dropout, gen)
        x0, noise, t, cond, drop = (v.to(accelerator.device) for v in (x0, noise, t, cond, drop))
        xt = scheduler.add_noise(x0, noise, t).contiguous(memory_format=layout)
        target = (scheduler.get_velocity(x0, noise, t) if spec.prediction_type == "v_prediction"
                  else noise)
        with accelerator.autocast():
            pred = model(xt, t, cond, drop)
        loss = diffusion_loss(pred, target, t, scheduler, spec)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), spec.grad_clip)
        optimizer.step()
        if not optimizer.step_was_skipped:  # fp16: the scaler skips steps with inf gradients
            lr_scheduler.step()
            ema.step(accelerator.unwrap_model(model).parameters())
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_all = accelerator.gather(loss.detach()[None]).mean().item()
        history.append({"step": step, "loss": loss_all, "grad_norm": float(grad_norm),
                        "lr": lr_scheduler.get_last_lr()[0], "precision": ran})
        bar.update(1)
        bar.set_postfix(loss=f"{loss_all:.4f}")
        done = step == spec.max_steps
        if step % spec.checkpoint_every == 0 or done:
            last_ckpt = save_checkpoint(accelerator, ckpt_root, step,
                                        accelerator.unwrap_model(model), ema, optimizer,
                                        lr_scheduler, identity, history, spec.keep_checkpoints,
                                        params.sampled_steps())
        if step % spec.sample_every == 0 or done:
            path = on_main(partial(
                _preview, accelerator.unwrap_model(model), ema, scheduler, spec, preview_cond,
                preview_names, run, step, params.run.seed))
            previews += [path] if path is not None else []
        if on_step is not None:
            on_step(step)
    bar.close()
    if last_ckpt is None:
        last_ckpt = latest_checkpoint(ckpt_root)
    accelerator.end_training()
    return TrainingOutcome(last_ckpt, pd.DataFrame(history), step, resume.step, previews,
                           rows["image_id"].tolist(), world, accelerator.is_main_process)


DIFFUSION_STAGE = "02_diffusion_training"


def train_task(params: Params, threads: int | None = None) -> None:
    """One process of a SLURM training job: torch.distributed's variables from SLURM's
    (submitit's ``TorchDistributedEnvironment``), so accelerate sees the job's processes as
    ``accelerate launch`` would start them, then the training from the run folder."""
    from submitit.helpers import TorchDistributedEnvironment

    from cxrlib.data.readers import load_cohort

    if threads:
        torch.set_num_threads(threads)
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    run = RunLayout.open(params, create=False)
    cohort = load_cohort(params, run)
    if cohort.cache_dir is None:
        raise DiffusionError("a metadata-only run has no images to train on")
    train_diffusion(params, cohort.manifest, ImageCache(cohort.cache_dir), run)


def train_on_cluster(params: Params, manifest: pd.DataFrame, run: RunLayout,
                     cluster: ClusterSpec) -> TrainingOutcome:
    """Train as one SLURM job (:func:`train_task` in every process), resubmitted or requeued
    from its last checkpoint when the scheduler kills or preempts it; the outcome read back
    from the checkpoint it ends with."""
    from cxrlib.cluster.slurm import Piece, run_pieces

    job = cluster.diffusion
    before = latest_checkpoint(run.checkpoints)
    start = read_checkpoint_state(before)["step"] if before is not None else 0
    if start < params.diffusion.max_steps:
        piece = Piece("diffusion training", run.checkpoints.relative_to(run.root).as_posix(),
                      partial(train_task, params, job.cpus_per_task))
        run_pieces([piece], cluster, job, run, DIFFUSION_STAGE,
                   desc=f"diffusion training on SLURM ({job.nodes} node(s) x "
                   f"{job.tasks_per_node} process(es))", nodes=job.nodes,
                   tasks_per_node=job.tasks_per_node)
    last = trained_checkpoint(run)
    state = read_checkpoint_state(last)
    history = pd.read_parquet(last / "history.parquet")
    return TrainingOutcome(last, history, state["step"], start, run.preview_grids,
                           diffusion_rows(params, manifest)["image_id"].tolist(),
                           state.get("world", 1), True)


def _preview(model: ConditionalUNet, ema: EMAModel, scheduler: DDPMScheduler,
             spec: DiffusionSpec, cond: np.ndarray, names: list[str], run: RunLayout, step: int,
             seed: int) -> Path:
    """Sample the fixed preview conditions with EMA weights; save a grid PNG.

    Args:
        model: the unwrapped UNet; the EMA weights are swapped in for sampling and the
            training weights (and train mode) restored after.
        ema: the EMA of the weights.
        scheduler: the training schedule; sampled with DDIM on it.
        spec: diffusion settings: ``preview_guidance``, ``guidance_rescale``, ``sample_steps``.
        cond: the preview condition vectors, one grid column each (:func:`preview_conditions`).
        names: the columns' names, saved beside the grids (:attr:`RunLayout.preview_columns`).
        run: the run folder; the grid goes to :meth:`RunLayout.preview` of ``step``.
        step: the training step the grid shows.
        seed: the run seed; the grid's three rows use seeds ``seed * 1000 + 0, 1, 2``, one per
            row, shared by its columns.
    """
    from PIL import Image

    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    model.eval()
    seeds = [seed * 1000 + j for j in range(3)]
    grid_rows = []
    for j in seeds:
        imgs = sample_images(model, ddim_for(scheduler), cond, [j] * len(cond),
                             spec.preview_guidance, spec.guidance_rescale, spec.sample_steps)
        grid_rows.append(np.concatenate(list(imgs), axis=1))
    model.train()
    ema.restore(model.parameters())
    run.previews.mkdir(parents=True, exist_ok=True)
    path = run.preview(step)
    with atomic_path(path) as tmp:
        Image.fromarray(np.concatenate(grid_rows, axis=0)).save(tmp)
    atomic_write_text(run.preview_columns, json.dumps(names))
    return path


@dataclass
class Preview:
    """The newest preview grid of a training run: rows are seeds, columns the fixed
    preview conditions named in ``columns``."""

    image: np.ndarray  # H x W uint8
    name: str
    columns: list[str]
    count: int  # preview grids written so far

    def enlarged(self, factor: int):
        """The grid as a PIL image, each pixel repeated ``factor`` times (for display)."""
        from PIL import Image

        return Image.fromarray(self.image.repeat(factor, 0).repeat(factor, 1))


def latest_preview(run: RunLayout) -> Preview:
    """The newest grid :func:`train_diffusion` saved under :attr:`RunLayout.previews`."""
    from PIL import Image

    grids = run.preview_grids
    if not grids:
        raise DiffusionError(f"no preview grids under {run.previews}; set diffusion."
                             "sample_every below diffusion.max_steps and train again")
    columns = json.loads(run.preview_columns.read_text())
    return Preview(np.asarray(Image.open(grids[-1])), grids[-1].name, columns, len(grids))
