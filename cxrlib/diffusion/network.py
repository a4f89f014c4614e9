"""The network of the conditional DDPM: no training stack.

:class:`ConditionalUNet` is diffusers' ``UNet2DModel`` with the condition embedding
(:mod:`cxrlib.diffusion.condition`) added to its timestep embedding; for the null embedding it gives
eps(x_t, null), so one network serves classifier-free guidance. It is a diffusers
``ModelMixin`` + ``ConfigMixin``, so ``save_pretrained`` / ``from_pretrained`` work on it,
and its state-dict keys (``unet.*``, ``cond_embed.*``) are those of every checkpoint.

Differences from the authors' code: the variance is fixed (DDPM's ``fixed_small``) rather than
learned, since diffusers' samplers (DDIM, DPM-Solver++) do not use a learned variance and the
paper samples with DDIM; the UNet's attention heads have one width per head (diffusers'
``attention_head_dim``), chosen so the first attention level has ``attention_heads`` heads.
"""

from __future__ import annotations

import math

import torch
from diffusers import ConfigMixin, DDPMScheduler, ModelMixin, UNet2DModel
from diffusers.configuration_utils import register_to_config

from cxrlib.core.schema import DiffusionSpec
from cxrlib.diffusion.condition import COND_DIM, ConditionEmbedding, cond_dim, layout_with_view


class DiffusionError(ValueError):
    """The diffusion model cannot be built, trained or loaded as asked; the message says why
    and what to do."""


def unet_config(spec: DiffusionSpec, resolution: int) -> dict:
    """:class:`ConditionalUNet` arguments for a spec (the architecture saved in checkpoints).
    The condition width is named only with the view (``cond_dim`` 23): the authors' 22 is the
    default, so the checkpoints made before the view keep their architecture as saved."""
    levels = [resolution // 2**i for i in range(len(spec.channel_mult))]
    if levels[-1] < 1 or resolution % 2 ** (len(spec.channel_mult) - 1):
        raise DiffusionError(f"diffusion.channel_mult has {len(spec.channel_mult)} levels, too "
                             f"many for {resolution} px images")
    down = ["AttnDownBlock2D" if r in spec.attention_resolutions else "DownBlock2D"
            for r in levels]
    channels = [spec.base_channels * m for m in spec.channel_mult]
    attn_channels = [c for c, r in zip(channels, levels, strict=True)
                     if r in spec.attention_resolutions] or [channels[-1]]
    groups = math.gcd(32, spec.base_channels)
    return {
        "sample_size": resolution, "in_channels": 1, "out_channels": 1,
        "block_out_channels": channels, "layers_per_block": spec.layers_per_block,
        "down_block_types": down,
        "up_block_types": [b.replace("Down", "Up") for b in reversed(down)],
        "attention_head_dim": max(1, attn_channels[0] // spec.attention_heads),
        "resnet_time_scale_shift": "scale_shift", "dropout": spec.dropout,
        "norm_num_groups": groups, "class_embed_type": "identity",
        **({"cond_dim": cond_dim(True)} if spec.condition_on_view else {}),
    }


def noise_scheduler(spec: DiffusionSpec) -> DDPMScheduler:
    """The training schedule: cosine betas rescaled to zero terminal SNR, v or eps targets."""
    return DDPMScheduler(num_train_timesteps=spec.num_train_timesteps,
                         beta_schedule=spec.beta_schedule,
                         rescale_betas_zero_snr=spec.zero_terminal_snr,
                         prediction_type=spec.prediction_type,
                         timestep_spacing="trailing", clip_sample=True)


class ConditionalUNet(ModelMixin, ConfigMixin):
    """diffusers UNet2DModel plus the condition embedding added to its timestep embedding.

    The arguments are :func:`unet_config`'s keys, passed on to ``UNet2DModel`` but for
    ``cond_dim``; they are the model's diffusers config (``config.json`` of a saved model).

    Args:
        sample_size: image side in pixels (the run's resolution).
        in_channels: image channels in (1, grey radiographs).
        out_channels: channels predicted (1: the noise or v target of one grey image).
        block_out_channels: channels per resolution level (``base_channels`` times each
            ``channel_mult``); the first times 4 is the embedding width.
        layers_per_block: ResNet layers per level.
        down_block_types: per level, ``AttnDownBlock2D`` at the spec's attention resolutions,
            else ``DownBlock2D``.
        up_block_types: the down types mirrored (``Up`` for ``Down``, in reverse order).
        attention_head_dim: width of one attention head, chosen so the first attention level
            has ``attention_heads`` heads.
        resnet_time_scale_shift: how the embedding enters the ResNets (``scale_shift``: FiLM).
        dropout: dropout rate in the ResNet blocks.
        norm_num_groups: GroupNorm groups (gcd of 32 and ``base_channels``, so it divides
            every level's channels).
        class_embed_type: ``identity``: the condition embedding is passed as class labels and
            added to the timestep embedding as it is.
        cond_dim: the condition vector's width (:mod:`cxrlib.diffusion.condition`): 22, the
            authors' layout, or 23 with the view.
    """

    @register_to_config
    def __init__(self, *, sample_size: int, in_channels: int, out_channels: int,
                 block_out_channels: list[int], layers_per_block: int,
                 down_block_types: list[str], up_block_types: list[str],
                 attention_head_dim: int, resnet_time_scale_shift: str, dropout: float,
                 norm_num_groups: int, class_embed_type: str, cond_dim: int = COND_DIM):
        super().__init__()
        self.unet = UNet2DModel(
            sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
            block_out_channels=block_out_channels, layers_per_block=layers_per_block,
            down_block_types=down_block_types, up_block_types=up_block_types,
            attention_head_dim=attention_head_dim,
            resnet_time_scale_shift=resnet_time_scale_shift, dropout=dropout,
            norm_num_groups=norm_num_groups, class_embed_type=class_embed_type)
        self.cond_embed = ConditionEmbedding(block_out_channels[0] * 4, cond_dim)

    @property
    def conditions_on_view(self) -> bool:
        """Whether the model was trained with the view in its condition vector: the layout
        every condition for it must be encoded with (``encode_conditions(..., with_view=)``)."""
        return layout_with_view(self.config.cond_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x, t, class_labels=self.cond_embed(cond, drop)).sample
