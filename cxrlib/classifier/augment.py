"""Classifier training augmentations on a batch tensor, per image, on the training device.

The authors' set (FACTS.md): horizontal and vertical flips, Gaussian noise, a random affine
(rotation, scale, shift) and Mixup/CutMix with label smoothing. Each image draws its own
parameters from one ``torch.Generator``, so a run is reproducible from its seed.

Written here rather than taken from timm or torchvision because the targets are multi-label
with unknown (NaN) entries: timm's ``Mixup`` expects single-label class indices, and
torchvision's batch transforms draw one set of parameters for the whole batch. NaN targets stay
NaN through mixing (``lam * nan`` is NaN), so the masked loss still leaves them out.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from cxrlib.core.schema import AugmentSpec

#: The model-range value of the padding around every image (black, as in preprocessing).
BACKGROUND = -1.0


def _chance(p: float, n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """A boolean per image, true with probability ``p``."""
    return torch.rand(n, generator=gen, device=device) < p


def _uniform(n: int, low: float, high: float, gen: torch.Generator,
             device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, device=device)


def random_affine(x: torch.Tensor, spec: AugmentSpec, gen: torch.Generator) -> torch.Tensor:
    """Rotate by up to ``rotation`` rad, scale by 1 +- ``scale``, shift by up to ``shift`` of
    the side, each image with probability ``affine_p``; uncovered pixels get the background."""
    n, device = x.shape[0], x.device
    apply = _chance(spec.affine_p, n, gen, device)
    angle = _uniform(n, -spec.rotation, spec.rotation, gen, device) * apply
    zoom = torch.where(apply, _uniform(n, 1 - spec.scale, 1 + spec.scale, gen, device),
                       torch.ones(n, device=device))
    # affine_grid works in [-1, 1] coordinates: a shift of s of the side is 2 s there.
    tx = _uniform(n, -2 * spec.shift, 2 * spec.shift, gen, device) * apply
    ty = _uniform(n, -2 * spec.shift, 2 * spec.shift, gen, device) * apply
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    # grid_sample pads with 0, so sample (x - background) and add the background back.
    moved = F.grid_sample(x - BACKGROUND, grid, mode="bilinear", padding_mode="zeros",
                          align_corners=False) + BACKGROUND
    return torch.where(apply[:, None, None, None], moved, x)


def mix_batch(x: torch.Tensor, y: torch.Tensor, spec: AugmentSpec,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """With probability ``mix_p`` mix the batch with a shuffled copy of itself: Mixup (blend)
    or CutMix (paste a box), half each; targets are mixed by the same share of the image."""
    n, device = x.shape[0], x.device
    if n < 2 or spec.mix_p == 0 or torch.rand(1, generator=gen, device=device).item() >= spec.mix_p:
        return x, y
    # Beta(alpha, alpha) from numpy, seeded by ``gen`` (torch's Beta ignores generators).
    draw = int(torch.randint(2**31 - 1, (1,), generator=gen, device=device).item())
    lam = float(np.random.default_rng(draw).beta(spec.mix_alpha, spec.mix_alpha))
    perm = torch.randperm(n, generator=gen, device=device)
    if torch.rand(1, generator=gen, device=device).item() < 0.5:  # Mixup
        return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]
    side_h, side_w = x.shape[-2], x.shape[-1]  # CutMix: a box covering 1 - lam of the image
    cut = math.sqrt(1 - lam)
    h, w = int(side_h * cut), int(side_w * cut)
    cy = int(torch.randint(side_h, (1,), generator=gen, device=device).item())
    cx = int(torch.randint(side_w, (1,), generator=gen, device=device).item())
    top, bottom = max(cy - h // 2, 0), min(cy + h // 2, side_h)
    left, right = max(cx - w // 2, 0), min(cx + w // 2, side_w)
    mixed = x.clone()
    mixed[..., top:bottom, left:right] = x[perm][..., top:bottom, left:right]
    share = 1 - (bottom - top) * (right - left) / (side_h * side_w)  # of the original image
    return mixed, share * y + (1 - share) * y[perm]


def augment_batch(x: torch.Tensor, y: torch.Tensor, spec: AugmentSpec,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Flips, noise, affine, then Mixup/CutMix and label smoothing, for one training batch
    (``x``: n x 1 x H x W in [-1, 1]; ``y``: n x labels, NaN = unknown)."""
    n, device = x.shape[0], x.device
    x = torch.where(_chance(spec.hflip, n, gen, device)[:, None, None, None], x.flip(-1), x)
    x = torch.where(_chance(spec.vflip, n, gen, device)[:, None, None, None], x.flip(-2), x)
    noisy = _chance(spec.noise_p, n, gen, device)[:, None, None, None]
    noise = torch.randn(x.shape, generator=gen, device=device, dtype=x.dtype) * spec.noise_std
    x = torch.where(noisy, x + noise, x)
    if spec.affine_p > 0:
        x = random_affine(x, spec, gen)
    x, y = mix_batch(x, y, spec, gen)
    if spec.label_smoothing > 0:
        y = y * (1 - spec.label_smoothing) + spec.label_smoothing / 2
    return x, y
