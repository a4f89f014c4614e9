"""The trained generator as a diffusers pipeline: :class:`CXRPipeline`.

A ``DiffusionPipeline`` holding the conditional UNet
(:class:`cxrlib.diffusion.network.ConditionalUNet`) and its training schedule; its call takes a
condition (age, sex, race, the 14 CheXpert findings, and the view for a model trained with it), the
guidance weight w and rescale phi, the sampler and steps, and per-image seeds, and samples through
:func:`cxrlib.diffusion.samplers.generate`, so its images are exactly cxrlib's for the same seeds.
It is also the one value the explorer and the synthetic cohorts sample from,
built from a run's checkpoint (:meth:`CXRPipeline.from_checkpoint`) or from a folder written
by ``python -m cxrlib export-generator`` (:mod:`cxrlib.diffusion.export`;
:meth:`CXRPipeline.from_exported` in cxrlib, ``DiffusionPipeline.from_pretrained(folder,
trust_remote_code=True)`` anywhere). Its config records the NaN-label encoding and the checkpoint
the weights came from (the provenance of synthetic images), so both routes give the same cohorts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, ImagePipelineOutput
from PIL import Image

from cxrlib.core.schema import DiffusionSpec
from cxrlib.diffusion.checkpoints import load_weights
from cxrlib.diffusion.condition import condition_row, encode_conditions
from cxrlib.diffusion.network import ConditionalUNet, noise_scheduler
from cxrlib.diffusion.samplers import generate


class CXRPipeline(DiffusionPipeline):
    """Conditional chest X-ray generator: ``pipe(age=70, sex="Female", findings=["Edema"],
    num_images=4, seed=0).images``."""

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: ConditionalUNet, scheduler: DDPMScheduler,
                 nan_label_value: float = 0.0, checkpoint: str = ""):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(nan_label_value=nan_label_value, checkpoint=checkpoint)

    @classmethod
    def from_checkpoint(cls, folder: Path, spec: DiffusionSpec) -> CXRPipeline:
        """The EMA model of a training checkpoint with the run's schedule."""
        pipe = cls(load_weights(folder, use_ema=True), noise_scheduler(spec),
                   spec.nan_label_value, folder.name)
        pipe.origin = ("checkpoint", Path(folder))
        return pipe

    @classmethod
    def from_exported(cls, folder: Path) -> CXRPipeline:
        """A folder written by ``export-generator``, loaded part by part, so its
        ``cxr_pipeline.py`` (the hook for ``DiffusionPipeline.from_pretrained``) is not run."""
        folder = Path(folder)
        index = cls.load_config(folder)
        pipe = cls(ConditionalUNet.from_pretrained(folder / "unet"),
                   DDPMScheduler.from_pretrained(folder / "scheduler"),
                   index["nan_label_value"], index["checkpoint"])
        pipe.origin = ("exported", folder)
        return pipe

    #: Where it was loaded from (``("checkpoint" | "exported", folder)``), so that a cluster
    #: job can load the same generator; None for one built in memory.
    origin: tuple[str, Path] | None = None

    @classmethod
    def reload(cls, origin: tuple[str, Path], spec: DiffusionSpec) -> CXRPipeline:
        """The generator again from its :attr:`origin` (in another process)."""
        kind, folder = origin
        return cls.from_checkpoint(folder, spec) if kind == "checkpoint" \
            else cls.from_exported(folder)

    def encode(self, rows: pd.DataFrame) -> np.ndarray:
        """Condition vectors of manifest-like rows in the layout the UNet was trained with
        (with the view or without: :attr:`ConditionalUNet.conditions_on_view`)."""
        return encode_conditions(rows, self.config.nan_label_value,
                                 self.unet.conditions_on_view)

    @torch.no_grad()
    def __call__(self, age: float = 60.0, sex: str = "Male", race: str = "White",
                 findings: Mapping[str, float] | Iterable[str] = ("No Finding",),
                 view: str | None = None, num_images: int | None = None,
                 seed: int | Sequence[int] = 0,
                 guidance: float = 0.0, guidance_rescale: float = 0.7, sampler: str = "ddim",
                 steps: int = 50, batch_size: int = 64, output_type: str = "pil",
                 return_dict: bool = True) -> ImagePipelineOutput | tuple:
        """Images of one condition.

        Args:
            age: age in years; the condition holds its decade (``age // 10``).
            sex: one of :data:`cxrlib.core.labels.SEXES` (Male, Female).
            race: one of :data:`cxrlib.core.labels.RACE_VALUES` (Other and Unknown encode as
                no race group).
            findings: the labels present (the others absent), or a mapping label -> 1, 0 or
                NaN (uncertain, encoded as the config's ``nan_label_value``).
            view: AP or PA, for a model trained with the view (and only for one).
            num_images: how many images for an int ``seed`` (1 if None); with a sequence of
                seeds it must be None or their number.
            seed: an int gives seeds seed .. seed + num_images - 1, a sequence one image per
                seed; each image has its own seed, as in cxrlib's cohorts, so it does not
                depend on the batch.
            guidance: the guidance weight w (0: the plain conditional model, one UNet call;
                the authors' scale s is w = s - 1).
            guidance_rescale: phi, how far each guided output's standard deviation is pulled
                back toward the conditional one's (0: not rescaled); unused at w = 0.
            sampler: one of :data:`cxrlib.core.schema.SAMPLERS`.
            steps: sampler steps.
            batch_size: images per UNet batch (memory and speed; the images depend on it only
                by float rounding).
            output_type: ``"pil"`` (grayscale PIL images) or ``"np"`` (n x R x R uint8).
            return_dict: return an ``ImagePipelineOutput``; else the tuple ``(images,)``.
        """
        if isinstance(seed, int):
            seeds = list(range(seed, seed + (num_images or 1)))
        else:
            seeds = [int(s) for s in seed]
            if num_images not in (None, len(seeds)):
                raise ValueError(f"num_images={num_images} but {len(seeds)} seeds given")
        if output_type not in ("pil", "np"):
            raise ValueError(f"output_type must be 'pil' or 'np', not '{output_type}'")
        if (view is not None) != self.unet.conditions_on_view:
            raise ValueError("this generator was trained with the view in its condition "
                             "(diffusion.condition_on_view); pass view='AP' or 'PA'"
                             if view is None else
                             f"view={view!r}: this generator was trained without the view "
                             "(diffusion.condition_on_view false); leave view out")
        cond = self.encode(condition_row(age, sex, race, findings, view))
        images = generate(self.unet, self.scheduler, np.repeat(cond, len(seeds), axis=0),
                          seeds, sampler, steps, guidance, guidance_rescale, batch_size)
        out = [Image.fromarray(im) for im in images] if output_type == "pil" else images
        return ImagePipelineOutput(images=out) if return_dict else (out,)
