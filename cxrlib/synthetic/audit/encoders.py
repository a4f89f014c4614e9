"""A second, independent feature space for the audit (``audit.encoder``), from local weights only.

The judge is trained on the run's own images, so a generator could fool it in ways a model
trained elsewhere would see. ``audit.encoder: "xrv:<weights>"`` names a torchxrayvision model
(e.g. ``xrv:densenet121-res224-all``) trained on public chest X-ray datasets; its weights file
must already lie in ``audit.encoder_cache`` (default torchxrayvision's own cache,
``~/.torchxrayvision/models_data``). Nothing is downloaded: a missing file is an error naming
the path and how to put the file there. The default (no encoder) leaves the audit to the judge.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torchxrayvision as xrv
from torch.nn import functional as F

from cxrlib.synthetic.audit.metrics import FeatureFn

#: torchxrayvision's pixel range (its ``normalize(img, 255)`` maps 0..255 to -1024..1024).
_XRV_RANGE = 1024.0


class EncoderUnavailable(FileNotFoundError):
    """The requested encoder's weights are not in the local cache (they are never downloaded)."""


def xrv_weights_file(weights: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where torchxrayvision keeps ``weights`` in ``cache_dir`` (default its own cache)."""
    if weights not in xrv.models.model_urls:
        known = ", ".join(sorted(k for k in xrv.models.model_urls if "-" in k))
        raise ValueError(f"unknown torchxrayvision weights '{weights}'; known: {known}")
    folder = Path(cache_dir).expanduser() if cache_dir else Path(xrv.utils.get_cache_dir())
    return folder / os.path.basename(xrv.models.model_urls[weights]["weights_url"])


def load_encoder(spec: str, cache_dir: str | os.PathLike[str] | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 64) -> FeatureFn:
    """A function from uint8 images (N x R x R) to encoder features (float32 N x d).

    ``spec`` is ``"xrv:<weights name>"``. Raises :class:`EncoderUnavailable` when the weights
    file is not already in ``cache_dir``. Images are resized (bilinear, antialiased) to the
    model's input size and scaled to torchxrayvision's [-1024, 1024].
    """
    kind, _, name = spec.partition(":")
    if kind != "xrv" or not name:
        raise ValueError(f"audit.encoder must look like 'xrv:<weights name>', got '{spec}'")
    path = xrv_weights_file(name, cache_dir)
    if not path.is_file():
        raise EncoderUnavailable(
            f"audit.encoder '{spec}' needs its weights at {path}, which is not there; nothing "
            f"is downloaded at run time. Copy the file there (from "
            f"{xrv.models.model_urls[name]['weights_url']}), set audit.encoder_cache to the "
            f"folder holding it, or set audit.encoder: null")
    model = xrv.models.get_model(name, cache_dir=str(path.parent)).to(device).eval()
    extract = model.features2 if hasattr(model, "features2") else model.features
    size = 512 if name.startswith("resnet") else 224

    def embed(images: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(np.asarray(images[start: start + batch_size], dtype=np.float32))
            x = F.interpolate(x.unsqueeze(1).to(device), size=(size, size), mode="bilinear",
                              align_corners=False, antialias=True)
            with torch.no_grad():
                out.append(extract((x / 255.0 * 2 - 1) * _XRV_RANGE).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)

    return embed
