"""Reading training checkpoints: ``RunLayout.checkpoints/step-XXXXXXX/`` with ``state.json``
(step, identity = architecture and schedule), ``model.safetensors`` and ``ema.safetensors``,
written by :func:`cxrlib.diffusion.training.save_checkpoint`. Here, not in the trainer, so
sampling, the explorer and the audit load a model without importing the training loop.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from cxrlib.core.layout import RunLayout
from cxrlib.core.schema import Params
from cxrlib.diffusion.network import ConditionalUNet, DiffusionError


def checkpoint_dirs(root: Path) -> list[Path]:
    """The complete checkpoint folders under ``root``, oldest first."""
    return sorted(p for p in root.glob("step-*") if p.is_dir() and (p / "state.json").exists())


def checkpoint_folder(root: Path, step: int) -> Path:
    """The folder of the checkpoint written at training step ``step``."""
    return root / f"step-{step:07d}"


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint folder under ``root`` (None if there is none)."""
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def trained_checkpoint(run: RunLayout) -> Path:
    """The latest checkpoint of a run's diffusion stage (notebook 02), for sampling; an error
    that says what to run when there is none."""
    ckpt = latest_checkpoint(run.checkpoints)
    if ckpt is None:
        raise DiffusionError(f"no diffusion checkpoint under {run.checkpoints}; run "
                             "notebook 02 (or cxrlib train-diffusion) first")
    return ckpt


def checkpoint_at(run: RunLayout, step: int | None) -> Path:
    """The checkpoint of training step ``step`` (None: the latest,
    :func:`trained_checkpoint`); an error names the steps there are."""
    if step is None:
        return trained_checkpoint(run)
    folder = checkpoint_folder(run.checkpoints, step)
    if not (folder / "state.json").exists():
        have = [p.name for p in checkpoint_dirs(run.checkpoints)]
        raise DiffusionError(f"no diffusion checkpoint of step {step} under {run.checkpoints} "
                             f"(there are {have or 'none'}); train to it (notebook 02, "
                             "diffusion.max_steps; checkpoints the parameters sample from are "
                             "kept)")
    return folder


def sampling_checkpoint(run: RunLayout, params: Params) -> Path:
    """The run's own generator: the checkpoint of ``sampling.checkpoint_step``, or the
    latest."""
    return checkpoint_at(run, params.sampling.checkpoint_step)


def read_checkpoint_state(folder: Path) -> dict:
    """A checkpoint's ``state.json``: its step, identity (architecture, schedule) and more."""
    return json.loads((folder / "state.json").read_text())


def load_weights(folder: Path, use_ema: bool = True) -> ConditionalUNet:
    """A model from a checkpoint folder, with its EMA weights by default (for sampling)."""
    state = read_checkpoint_state(folder)
    model = ConditionalUNet(**state["identity"]["unet"])
    model.load_state_dict(load_file(folder / "model.safetensors"))
    if use_ema:
        shadow = load_file(folder / "ema.safetensors")
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(shadow[name])
    return model.eval()
