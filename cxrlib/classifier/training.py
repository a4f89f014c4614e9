"""Pathology classifiers: a timm backbone with 14 outputs, trained from the image cache.

The loss is BCE with logits where NaN labels (uncertain under ``u-ignore``, or not annotated by
a site) are masked out per label instead of being treated as negatives. Training runs through
HF Accelerate (device, mixed precision, several GPUs), augments on the device
(:mod:`cxrlib.classifier.augment`), keeps an EMA of the weights for evaluation, keeps the weights of
the epoch with the lowest validation loss and stops early after ``patience`` epochs without
improvement. Every history row says the precision it trained in
(:func:`cxrlib.hardware.precision_label`). One trainer serves the learnability check (notebook
01), the audit's judge (notebook 03) and the experiment grid (notebook 04,
:mod:`cxrlib.experiments.runner`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch
from accelerate import Accelerator
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from safetensors.torch import load_file, save_file
from timm.models import get_deprecated_models, get_pretrained_cfg, split_model_name_tag
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn

from cxrlib.classifier.augment import augment_batch
from cxrlib.core.cohort import SUBGROUP_COLUMNS
from cxrlib.core.config import diff_keys
from cxrlib.core.files import replace_folder
from cxrlib.core.labels import CHEXPERT_LABELS
from cxrlib.core.processes import on_main
from cxrlib.core.progress import tqdm
from cxrlib.core.schema import ClassifierSpec, pretrained_kind
from cxrlib.data.imagecache import CombinedCache, ImageCache, to_model_input
from cxrlib.hardware import make_optimizer, precision_label, resolve_precision


def pick_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class MissingWeightsError(RuntimeError):
    """``classifier.pretrained`` names weights this machine does not have; the message gives
    the command that fetches them on a machine with network access."""


def _fetch_commands(name: str, hub_id: str, filename: str) -> str:
    return (f"On a machine with network access, run\n"
            f"    python -c \"import timm; timm.create_model('{name}', pretrained=True)\"\n"
            f"  or\n    hf download {hub_id} {filename}\n"
            "(huggingface-cli download in older huggingface_hub), then copy that machine's "
            "Hugging Face cache (HF_HOME, by default ~/.cache/huggingface) into this one's, or "
            f"set classifier.pretrained to the absolute path of the downloaded {filename}.")


def pretrained_weights(spec: ClassifierSpec) -> tuple[str, Path | None]:
    """The timm model to build for ``spec`` and the local file its initial weights come from
    (None: random weights). ``classifier.pretrained`` names a file, or timm weights looked up
    in the local Hugging Face cache only (``HF_HOME``, ``HF_HUB_CACHE``): nothing is
    downloaded. Weights that are not there raise :class:`MissingWeightsError` with the
    command that fetches them, before any training."""
    kind = pretrained_kind(spec.pretrained)
    if kind == "none":
        return spec.backbone, None
    if kind == "file":
        path = Path(os.path.expandvars(str(spec.pretrained))).expanduser()
        if not path.is_file():
            raise MissingWeightsError(f"classifier.pretrained: weights file {path} not found")
        return spec.backbone, path
    asked = spec.backbone if kind == "default" else str(spec.pretrained)
    name = get_deprecated_models().get(asked) or asked  # convnext_base_in22ft1k: an old name
    arch = split_model_name_tag(name)[0]
    if arch != spec.backbone:
        raise ValueError(f"classifier.pretrained {asked!r} are weights of '{arch}', but "
                         f"classifier.backbone is '{spec.backbone}'")
    cfg = get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        raise ValueError(f"classifier.pretrained: timm {timm.__version__} has no weights "
                         f"{asked!r} on the Hugging Face hub; its weights of '{arch}': "
                         f"{timm.list_pretrained(arch + '.*')[:8]}, or name a local file")
    name = f"{cfg.architecture}.{cfg.tag}"
    names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors",
                                                                "pytorch_model.bin"]
    for filename in names:
        cached = try_to_load_from_cache(cfg.hf_hub_id, filename)
        if isinstance(cached, str):
            return name, Path(cached)
    raise MissingWeightsError(
        f"classifier.pretrained {asked!r}: the weights ({cfg.hf_hub_id}) are not in the Hugging "
        f"Face cache {hf_constants.HF_HUB_CACHE}, and nothing is downloaded at run time.\n"
        + _fetch_commands(name, cfg.hf_hub_id, names[0]))


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a torch file read with ``weights_only`` (no
    pickled objects); a checkpoint holding it under ``state_dict`` or ``model`` is unwrapped."""
    if path.suffix == ".safetensors":
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def build_model(spec: ClassifierSpec, num_outputs: int = len(CHEXPERT_LABELS)) -> nn.Module:
    """A timm backbone with one grey input channel and ``num_outputs`` logits, with the
    initial weights ``classifier.pretrained`` names (:func:`pretrained_weights`), adapted as
    timm adapts them: the RGB stem summed to one channel, a head of another size left out."""
    name, weights = pretrained_weights(spec)
    overlay = {"state_dict": read_weights(weights)} if weights is not None else None
    try:
        model = timm.create_model(name, pretrained=weights is not None, in_chans=1,
                                  num_classes=num_outputs, pretrained_cfg_overlay=overlay)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ValueError(f"classifier.backbone: timm has no model '{spec.backbone}'") from None
        raise
    if overlay is not None:
        model.pretrained_cfg["state_dict"] = None  # the loaded tensors are copied; free them
    return model


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits over the (image, label) pairs whose target is not NaN."""
    known = ~torch.isnan(targets)
    if not known.any():
        return logits.sum() * 0.0
    loss = nn.functional.binary_cross_entropy_with_logits(
        logits[known], targets[known], reduction="mean")
    return loss


class BatchDataset(torch.utils.data.Dataset):
    """Batches of (images in model range, labels) read from an image cache by row lists.

    Index ``i`` is the ``i``-th batch of the epoch's plan, so a ``DataLoader`` with
    ``batch_size=None`` and worker processes prefetches whole batches; each worker reopens the
    cache's memory map instead of receiving a copy of the images.
    """

    def __init__(self, cache: ImageCache | CombinedCache, rows: np.ndarray, labels: np.ndarray):
        self.cache, self.rows, self.labels = cache, rows, labels
        self.plan: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.plan[i]
        return to_model_input(self.cache.read_rows(self.rows[idx])), torch.from_numpy(
            self.labels[idx])


def epoch_plan(n: int, batch_size: int, rng: np.random.Generator | None, rank: int = 0,
               world: int = 1) -> list[np.ndarray]:
    """Index batches for one epoch: a seeded permutation (or the identity when ``rng`` is None)
    cut into global batches of ``batch_size * world`` images, of which this process takes every
    ``world``-th. A last global batch smaller than ``world`` is dropped, so that every process
    has the same number of steps."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    step = batch_size * world
    return [order[s: s + step][rank::world] for s in range(0, n, step)
            if len(order[s: s + step]) >= world]


def round_steps(spec: ClassifierSpec) -> int | None:
    """Optimizer steps per validation round: ``eval_every`` (protocol converged), the budget
    cut into ``epochs`` rounds (protocol steps), or None (a round is one epoch)."""
    if spec.max_steps is None:
        return None
    if spec.protocol == "converged":
        return spec.eval_every
    return math.ceil(spec.max_steps / spec.epochs)


def n_rounds(spec: ClassifierSpec) -> int:
    """Validation rounds when nothing stops training early."""
    per_round = round_steps(spec)
    return spec.epochs if per_round is None else math.ceil(spec.max_steps / per_round)


def round_plans(n: int, spec: ClassifierSpec, rng: np.random.Generator, rank: int = 0,
                world: int = 1) -> Iterator[list[np.ndarray]]:
    """The batches of each validation round. Without a step budget a round is one epoch.
    With ``spec.max_steps``, rounds have :func:`round_steps` steps each, drawn from
    consecutive epochs (seeded permutations) of full batches, so every training set, small or
    large, is validated at the same steps (and, under protocol steps, gets the same number of
    optimizer steps)."""
    per_round = round_steps(spec)
    if per_round is None:
        for _ in range(spec.epochs):
            yield epoch_plan(n, spec.batch_size, rng, rank, world)
        return
    full = n >= spec.batch_size * world  # a set smaller than one batch keeps its only batch
    left, pending = spec.max_steps, []
    while left > 0:
        take = min(per_round, left)
        while len(pending) < take:
            pending += [b for b in epoch_plan(n, spec.batch_size, rng, rank, world)
                        if not full or len(b) == spec.batch_size]
        yield pending[:take]
        pending, left = pending[take:], left - take


@dataclass
class TrainResult:
    """A trained classifier and how training went: the rounds (epochs) and optimizer steps
    run, and the round and step whose weights were kept."""

    model: nn.Module
    history: pd.DataFrame
    best_epoch: int
    stopped_early: bool
    steps: int = 0
    best_step: int = 0
    images_seen: int = 0

    @property
    def precision(self) -> str:
        """What it trained in (:func:`cxrlib.hardware.precision_label`); ``not recorded``
        for a classifier saved before histories said it."""
        if "precision" not in self.history or self.history["precision"].isna().all():
            return "not recorded"
        return "; ".join(dict.fromkeys(self.history["precision"].dropna()))


class EarlyStopping:
    """The converged protocol's bookkeeping, shared by both trainers: keep the weights of the
    lowest validation loss; stop after ``patience`` validations without a lower one, but not
    before step ``stop_after``."""

    def __init__(self, patience: int, stop_after: int = 0):
        self.patience, self.stop_after = patience, stop_after
        self.best_loss, self.best_epoch, self.best_step, self.waited = np.inf, 0, 0, 0
        self.best_state: dict[str, torch.Tensor] | None = None

    def update(self, val_loss: float, epoch: int, step: int, model: nn.Module | None) -> bool:
        """Record a validation round (``model``: the weights it scored; None replays a saved
        history without weights); True = stop now."""
        if val_loss < self.best_loss:
            self.best_loss, self.best_epoch, self.best_step, self.waited = \
                val_loss, epoch, step, 0
            if model is not None:
                self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return False
        self.waited += 1
        return self.waited >= self.patience and step >= self.stop_after

    def result(self, spec: ClassifierSpec, history: list[dict], device: torch.device,
               rounds: int, steps: int, seen: int, num_outputs: int = len(CHEXPERT_LABELS)
               ) -> TrainResult:
        """The kept weights in a fresh model (eval mode) and how training went."""
        if self.best_state is None:
            raise RuntimeError("no validation round ran; nothing to keep")
        final = build_model(spec.model_copy(update={"pretrained": False}), num_outputs)
        final.load_state_dict(self.best_state)
        final.to(device).eval()
        return TrainResult(final, pd.DataFrame(history), self.best_epoch,
                           stopped_early=len(history) < rounds, steps=steps,
                           best_step=self.best_step, images_seen=seen)


def _label_matrix(df: pd.DataFrame) -> np.ndarray:
    return df[list(CHEXPERT_LABELS)].to_numpy(dtype=np.float32)


def _loader(dataset: BatchDataset, workers: int, pin: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False,
                                       num_workers=workers, pin_memory=pin,
                                       persistent_workers=False)


@torch.no_grad()
def _eval_loss(model: nn.Module, loader: torch.utils.data.DataLoader,
               accelerator: Accelerator, layout: torch.memory_format) -> float:
    """Masked BCE over this process's validation share, summed over all processes."""
    model.eval()
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    for x, y in loader:
        x, y = x.to(accelerator.device).contiguous(memory_format=layout), y.to(accelerator.device)
        with accelerator.autocast():
            logits = model(x)
        known = (~torch.isnan(y)).sum()
        total += torch.stack([masked_bce(logits.float(), y) * known, known.double()])
    total = accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1].clamp(min=1))


def _accelerator(spec: ClassifierSpec) -> Accelerator:
    cuda = torch.cuda.is_available()
    return Accelerator(mixed_precision=resolve_precision(spec.mixed_precision, cuda),
                       cpu=not cuda)


def lr_schedule(spec: ClassifierSpec, optimizer: torch.optim.Optimizer
                ) -> CosineLRScheduler | None:
    """The learning-rate schedule of ``spec.lr_schedule``, stepped with the optimizer step
    count (``step_update``); None for a constant rate."""
    if spec.lr_schedule == "constant":
        return None
    return CosineLRScheduler(optimizer, t_initial=spec.lr_decay_steps or spec.max_steps,
                             lr_min=spec.lr / 100, warmup_t=spec.warmup_steps,
                             warmup_lr_init=spec.lr / 100, t_in_epochs=False)


@dataclass(frozen=True)
class RoundState:
    """Where a classifier training stood after its last validation round, in ``folder``
    (weights, EMA, kept weights and random states in safetensors; the optimizer's state
    with ``torch.save``, read back with ``weights_only=True``; counters and history in
    JSON). ``identity`` (settings, seed, rows) must match for a saved state to be used."""

    folder: Path
    identity: dict

    def saved(self) -> bool:
        if not (self.folder / "state.json").exists():
            return False
        state = json.loads((self.folder / "state.json").read_text())
        return state["identity"] == json.loads(json.dumps(self.identity))

    def save(self, rounds: int, step: int, seen: int, history: list[dict], model: nn.Module,
             opt: torch.optim.Optimizer, ema: ModelEmaV3 | None, stopper: EarlyStopping,
             gen: torch.Generator) -> None:
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        if ema is not None:
            tensors |= {f"ema.{k}": v for k, v in ema.module.state_dict().items()}
        if stopper.best_state is not None:
            tensors |= {f"best.{k}": v for k, v in stopper.best_state.items()}
        tensors |= {"rng.gen": gen.get_state(), "rng.torch": torch.get_rng_state()}
        counters = {"identity": self.identity, "rounds": rounds, "step": step, "seen": seen,
                    "history": history, "best_loss": stopper.best_loss,
                    "best_epoch": stopper.best_epoch, "best_step": stopper.best_step,
                    "waited": stopper.waited}
        with replace_folder(self.folder) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                      tmp / "state.safetensors")
            torch.save(opt.state_dict(), tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps(counters, default=float))

    def restore(self, model: nn.Module, opt: torch.optim.Optimizer, ema: ModelEmaV3 | None,
                stopper: EarlyStopping, gen: torch.Generator
                ) -> tuple[int, int, int, list[dict]]:
        """Load the saved state into the freshly built objects; (rounds, step, images seen,
        history) done."""
        state = json.loads((self.folder / "state.json").read_text())
        tensors = load_file(self.folder / "state.safetensors")

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        model.load_state_dict(part("model."))
        if ema is not None:
            ema.module.load_state_dict(part("ema."))
        best = part("best.")
        stopper.best_state = best or None
        stopper.best_loss, stopper.best_epoch = state["best_loss"], state["best_epoch"]
        stopper.best_step, stopper.waited = state["best_step"], state["waited"]
        opt.load_state_dict(torch.load(self.folder / "optimizer.pt", weights_only=True))
        gen.set_state(tensors["rng.gen"])
        torch.set_rng_state(tensors["rng.torch"])
        print(f"classifier training resumed after round {state['rounds']} (step "
              f"{state['step']}) from {self.folder}", flush=True)
        return state["rounds"], state["step"], state["seen"], state["history"]


def train_classifier(spec: ClassifierSpec, train: pd.DataFrame, val: pd.DataFrame,
                     cache: ImageCache | CombinedCache, seed: int = 0,
                     progress: bool = True,
                     on_round: Callable[[nn.Module, dict], None] | None = None,
                     init: nn.Module | None = None, resume: RoundState | None = None
                     ) -> TrainResult:
    """Train on ``train`` rows with early stopping on ``val`` loss; returns the best model.

    Augmentations (``spec.augment``) run per image on the device; the EMA of the weights
    (``spec.ema_decay`` > 0) is what validation scores and what is returned. Under
    ``accelerate launch`` every process trains on its share of each global batch (DDP) and
    the validation loss is summed over processes, so all stop at the same epoch.

    Args:
        spec: the classifier settings (backbone, optimizer, schedule, batch size, EMA,
            augmentation, precision, stopping protocol).
        train: training rows: ``image_id`` and the 14 CheXpert label columns (NaN = unknown,
            left out of the loss); must not be empty.
        val: validation rows, same columns; their masked BCE drives early stopping.
        cache: the images of both sets, looked up by ``image_id`` (a :class:`CombinedCache`
            mixes real and synthetic images).
        seed: seeds the initial weights (torch), the batch order and the augmentation
            generator (``seed * 1000 + rank``).
        progress: show a tqdm bar of the rounds (main process only).
        on_round: ``on_round(model, row)``, called after each validation round with the
            weights it scored and its history row, outside the round's timed seconds
            (benchmarks score them there).
        init: start from these weights (a fine-tuning phase) instead of the backbone's own
            initialisation; the optimizer, schedule and EMA start afresh.
        resume: save the training state after every round there and, when one is saved,
            continue from it (a preempted cluster job): the result equals an uninterrupted
            run's. One process only (under ``accelerate launch`` it is not used).
    """
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"classifier training needs train and val rows (got {len(train)} "
                         f"train, {len(val)} val)")
    accelerator = _accelerator(spec)
    precision = precision_label(accelerator.mixed_precision)
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator(device=accelerator.device).manual_seed(seed * 1000 + rank)
    layout = torch.channels_last if spec.channels_last else torch.contiguous_format
    model = build_model(spec)
    if init is not None:
        model.load_state_dict(init.state_dict())
    model = model.to(memory_format=layout)
    opt = make_optimizer(model, spec.optimizer, spec.lr, spec.weight_decay)
    schedule = lr_schedule(spec, opt)
    model, opt = accelerator.prepare(model, opt)
    # EMA with timm's warm-up (decay grows as 1 - (1 + step)^-2/3 up to ema_decay), so a
    # short run is not averaged into its random initialisation.
    ema = ModelEmaV3(accelerator.unwrap_model(model), decay=spec.ema_decay, use_warmup=True) \
        if spec.ema_decay > 0 else None
    step = 0
    train_set = BatchDataset(cache, cache.rows_for(train["image_id"]), _label_matrix(train))
    val_set = BatchDataset(cache, cache.rows_for(val["image_id"]), _label_matrix(val))
    val_set.plan = epoch_plan(len(val), spec.batch_size, None, rank, world)
    pin = accelerator.device.type == "cuda"
    stopper = EarlyStopping(spec.patience, spec.stop_after_steps)
    history, seen = [], 0
    rounds = n_rounds(spec)
    resume = resume if world == 1 else None
    done_rounds = 0
    if resume is not None and resume.saved():
        done_rounds, step, seen, history = resume.restore(accelerator.unwrap_model(model), opt,
                                                          ema, stopper, gen)
    bar = tqdm(enumerate(round_plans(len(train), spec, rng, rank, world), start=1),
               total=rounds, desc="classifier epochs", initial=done_rounds,
               disable=not (progress and accelerator.is_main_process))
    for epoch, plan in bar:
        if epoch <= done_rounds:  # replayed: the batch order continues where it stopped
            continue
        started = time.perf_counter()
        train_set.plan = plan
        model.train()
        losses = []
        for x, y in _loader(train_set, spec.loader_workers, pin):
            x, y = augment_batch(x.to(accelerator.device), y.to(accelerator.device),
                                 spec.augment, gen)
            x = x.contiguous(memory_format=layout)
            with accelerator.autocast():
                logits = model(x)
            loss = masked_bce(logits.float(), y)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), spec.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if schedule is not None:
                schedule.step_update(step)
            seen += len(x) * world
            if ema is not None:
                ema.update(accelerator.unwrap_model(model), step)
            losses.append(loss.item())
        scored = ema.module if ema is not None else model
        val_loss = _eval_loss(scored, _loader(val_set, spec.loader_workers, pin), accelerator,
                              layout)
        history.append({"epoch": epoch, "step": step, "images_seen": seen,
                        "train_loss": float(np.mean(losses)), "val_loss": val_loss,
                        "seconds": time.perf_counter() - started, "train_images": len(train),
                        "lr": opt.param_groups[0]["lr"], "precision": precision})
        if on_round is not None:
            on_round(accelerator.unwrap_model(scored), history[-1])
        bar.set_postfix(train=f"{np.mean(losses):.3f}", val=f"{val_loss:.3f}")
        if not np.isfinite(val_loss):
            raise ValueError(f"classifier training diverged at epoch {epoch} (validation loss "
                             f"{val_loss}); lower classifier.lr ({spec.lr}) or check the data "
                             f"(backbone {spec.backbone})")
        if stopper.update(val_loss, epoch, step, accelerator.unwrap_model(scored)):
            break
        if resume is not None:
            resume.save(epoch, step, seen, history, accelerator.unwrap_model(model), opt, ema,
                        stopper, gen)
    return stopper.result(spec, history, accelerator.device, rounds, step, seen)


def train_binary(spec: ClassifierSpec, images: np.ndarray, targets: np.ndarray,
                 val_images: np.ndarray, val_targets: np.ndarray, seed: int = 0) -> TrainResult:
    """A one-logit classifier of uint8 images (n x R x R) against 0/1 ``targets``, e.g. real
    versus synthetic (:mod:`cxrlib.synthetic.audit.detectability`), where the 14-label trainer does
    not fit.

    ``spec``'s backbone, optimizer, learning rate, weight decay, gradient clip and precision;
    BCE over full batches of ``spec.batch_size`` drawn as :func:`round_plans` draws them
    (protocol converged: validation loss every ``eval_every`` steps up to ``max_steps``, stop
    after ``patience`` validations without a lower one); the weights of the lowest validation
    loss are returned, in eval mode. No augmentation: the project's (noise, affine
    resampling, mixing) would hide or add the very texture such a classifier should find.
    One process; the global torch random state is left as it was.
    """
    spec = spec.model_copy(update={"protocol": "converged"})
    accelerator = _accelerator(spec)
    device = accelerator.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(spec, num_outputs=1)
    opt = make_optimizer(model, spec.optimizer, spec.lr, spec.weight_decay)
    model, opt = accelerator.prepare(model, opt)
    x_all, y_all = to_model_input(images), torch.as_tensor(targets, dtype=torch.float32)
    y_val = torch.as_tensor(val_targets, dtype=torch.float32)
    loss_fn = nn.functional.binary_cross_entropy_with_logits
    stopper = EarlyStopping(spec.patience, spec.stop_after_steps)
    step = seen = 0
    history = []
    plans = round_plans(len(images), spec, np.random.default_rng(seed))
    for epoch, plan in enumerate(plans, start=1):
        model.train()
        losses = []
        for idx in plan:
            with accelerator.autocast():
                logits = model(x_all[idx].to(device))[:, 0]
            loss = loss_fn(logits.float(), y_all[idx].to(device))
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), spec.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            seen += len(idx)
            losses.append(loss.item())
        val_p = torch.from_numpy(predict_images(model, val_images)[:, 0])
        val_loss = float(nn.functional.binary_cross_entropy(val_p, y_val))
        history.append({"epoch": epoch, "step": step, "train_loss": float(np.mean(losses)),
                        "val_loss": val_loss})
        if stopper.update(val_loss, epoch, step, accelerator.unwrap_model(model)):
            break
    return stopper.result(spec, history, device, n_rounds(spec), step, seen, num_outputs=1)


@torch.no_grad()
def predict(model: nn.Module, df: pd.DataFrame, cache: ImageCache,
            batch_size: int = 128) -> np.ndarray:
    """Sigmoid scores (n_images x 14) for the manifest rows ``df``."""
    return predict_images(model, cache.load(df["image_id"]), batch_size)


@torch.no_grad()
def predict_images(model: nn.Module, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """Sigmoid scores (n x 14) for uint8 images (n x R x R), e.g. generated ones."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = to_model_input(images[start: start + batch_size]).to(device)
        out.append(torch.sigmoid(model(x)).cpu())
    if not out:
        return np.zeros((0, len(CHEXPERT_LABELS)), dtype=np.float32)
    return torch.cat(out).numpy()


def save_classifier(result: TrainResult, spec: ClassifierSpec, folder: Path,
                    extra: dict | None = None) -> Path:
    """Weights in safetensors, the spec and training history beside them (atomic folder).
    Under ``accelerate launch`` call it on the main process only
    (:func:`cxrlib.core.processes.on_main`)."""
    meta = {"spec": spec.model_dump(), "best_epoch": result.best_epoch,
            "stopped_early": result.stopped_early, "steps": result.steps,
            "best_step": result.best_step, "images_seen": result.images_seen, **(extra or {})}
    with replace_folder(folder) as tmp:
        save_file({k: v.detach().cpu().contiguous()
                   for k, v in result.model.state_dict().items()}, tmp / "model.safetensors")
        (tmp / "classifier.json").write_text(json.dumps(meta, indent=1))
        result.history.to_csv(tmp / "history.csv", index=False)
    return folder


def load_classifier(folder: Path, spec: ClassifierSpec | None = None) -> TrainResult:
    """A classifier saved by :func:`save_classifier`; ``spec`` must match if given."""
    meta = json.loads((folder / "classifier.json").read_text())
    saved = ClassifierSpec.model_validate(meta["spec"])
    if spec is not None and saved != spec:
        raise ValueError(f"classifier in {folder} was trained with other settings "
                         f"({sorted(diff_keys(saved.model_dump(), spec.model_dump()))}); "
                         "delete it to train again")
    model = build_model(saved.model_copy(update={"pretrained": False}))
    model.load_state_dict(load_file(folder / "model.safetensors"))
    model.to(pick_device()).eval()
    return TrainResult(model, pd.read_csv(folder / "history.csv"), meta["best_epoch"],
                       meta["stopped_early"], meta.get("steps", 0), meta.get("best_step", 0),
                       meta.get("images_seen", 0))


def weights_crc(model: nn.Module) -> int:
    """A checksum of a model's weights (which initial weights a fine-tuned model started from)."""
    crc = 0
    for name, tensor in model.state_dict().items():
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy(), crc)
    return crc


def train_or_load(spec: ClassifierSpec, train: pd.DataFrame, val: pd.DataFrame,
                  cache: ImageCache | CombinedCache, folder: Path, seed: int = 0,
                  progress: bool = True, reuse: tuple[Path, ...] = (),
                  init: nn.Module | None = None, resumable: bool = False) -> TrainResult:
    """Reuse a classifier saved in ``folder`` or in one of the ``reuse`` folders (same
    settings, seed, training and validation rows, initial weights), else train one; the result
    is saved in ``folder``, so that a model is never trained twice for the same data. Only the
    main process saves; the others wait for it.

    Args:
        spec: the classifier settings; a saved model is reused only if its spec is equal.
        train: training rows (``image_id`` and the label columns); their count and a CRC of
            their ids must match a saved model's.
        val: validation rows, matched the same way.
        cache: the images, read only if a model has to be trained.
        folder: where the result is saved (``classifier.json``, weights, history); looked in
            first.
        seed: the training seed (:func:`train_classifier`); part of the match.
        progress: show a progress bar while training.
        reuse: other folders to look in, in order; a model found there is copied into
            ``folder`` with ``reused_from`` recorded.
        init: initial weights of a fine-tuning phase; matched by :func:`weights_crc`.
        resumable: keep the training state after every round beside ``folder`` (a hidden
            ``.<name>.resume`` folder, removed once the model is saved) and continue from it
            when it is there (:class:`RoundState`).
    """
    ids = {"train_rows": len(train), "val_rows": len(val), "seed": seed,
           "train_ids_crc": zlib.crc32("\n".join(train["image_id"]).encode()),
           "val_ids_crc": zlib.crc32("\n".join(val["image_id"]).encode()),
           "init_crc": None if init is None else weights_crc(init)}
    for candidate in (folder, *reuse):
        if (candidate / "classifier.json").exists():
            meta = json.loads((candidate / "classifier.json").read_text())
            same_spec = ClassifierSpec.model_validate(meta["spec"]) == spec
            if same_spec and all(meta.get(k) == v for k, v in ids.items()):
                result = load_classifier(candidate, spec)
                if candidate != folder:
                    on_main(partial(save_classifier, result, spec, folder,
                                    {**ids, "reused_from": str(candidate)}))
                return result
    state = RoundState(folder.parent / f".{folder.name}.resume",
                       {"spec": spec.model_dump(), **ids}) if resumable else None
    result = train_classifier(spec, train, val, cache, seed, progress, init=init,
                              resume=state)
    on_main(partial(save_classifier, result, spec, folder, ids))
    if state is not None:
        shutil.rmtree(state.folder, ignore_errors=True)
    return result


def predictions_frame(df: pd.DataFrame, scores: np.ndarray, test_set: str) -> pd.DataFrame:
    """Long per-image predictions: image_id, patient_id, test_set, label, target, score, and
    the image's sex, age, race and view (where the rows have them)."""
    parts = []
    extra = {c: df[c].to_numpy() for c in SUBGROUP_COLUMNS if c in df}
    for j, label in enumerate(CHEXPERT_LABELS):
        parts.append(pd.DataFrame({
            "image_id": df["image_id"].to_numpy(), "patient_id": df["patient_id"].to_numpy(),
            "test_set": test_set, "label": label, "target": df[label].to_numpy(dtype=float),
            "score": scores[:, j], **extra,
        }))
    return pd.concat(parts, ignore_index=True)
