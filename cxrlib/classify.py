"""Pathology classifiers: a timm backbone with 14 outputs, trained from the image cache.

The loss is BCE with logits where NaN labels (uncertain under ``u-ignore``, or not annotated by
a site) are masked out per label instead of being treated as negatives. Training keeps the
weights of the epoch with the lowest validation loss and stops early after ``patience`` epochs
without improvement.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import timm.optim
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from cxrlib.config import ClassifierSpec, diff_keys
from cxrlib.imagecache import ImageCache, to_model_input
from cxrlib.labels import CHEXPERT_LABELS


def pick_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_model(spec: ClassifierSpec, num_outputs: int = len(CHEXPERT_LABELS)) -> nn.Module:
    """A timm backbone with one grey input channel and ``num_outputs`` logits."""
    try:
        return timm.create_model(spec.backbone, pretrained=spec.pretrained, in_chans=1,
                                 num_classes=num_outputs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ValueError(f"classifier.backbone: timm has no model '{spec.backbone}'") from None
        raise
    except Exception as exc:  # noqa: BLE001 - hub/network failures have many types
        if spec.pretrained:
            raise RuntimeError(
                f"classifier.pretrained is true but the weights of '{spec.backbone}' cannot be "
                f"loaded ({type(exc).__name__}: {exc}). Put them in the Hugging Face cache "
                "(HF_HOME) on a machine with network access, or set pretrained: false."
            ) from None
        raise


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits over the (image, label) pairs whose target is not NaN."""
    known = ~torch.isnan(targets)
    if not known.any():
        return logits.sum() * 0.0
    loss = nn.functional.binary_cross_entropy_with_logits(
        logits[known], targets[known], reduction="mean")
    return loss


def _batches(rows: np.ndarray, labels: np.ndarray, cache: ImageCache, batch_size: int,
             rng: np.random.Generator | None):
    order = rng.permutation(len(rows)) if rng is not None else np.arange(len(rows))
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        x = to_model_input(cache.read_rows(rows[idx]))
        yield x, torch.from_numpy(labels[idx])


@dataclass
class TrainResult:
    """A trained classifier and how training went."""

    model: nn.Module
    history: pd.DataFrame
    best_epoch: int
    stopped_early: bool


def _label_matrix(df: pd.DataFrame) -> np.ndarray:
    return df[list(CHEXPERT_LABELS)].to_numpy(dtype=np.float32)


@torch.no_grad()
def _eval_loss(model: nn.Module, rows: np.ndarray, labels: np.ndarray, cache: ImageCache,
               batch_size: int, device: torch.device) -> float:
    model.eval()
    total, count = 0.0, 0
    for x, y in _batches(rows, labels, cache, batch_size, None):
        logits = model(x.to(device))
        known = (~torch.isnan(y)).sum().item()
        total += masked_bce(logits, y.to(device)).item() * known
        count += known
    return total / max(count, 1)


def train_classifier(spec: ClassifierSpec, train: pd.DataFrame, val: pd.DataFrame,
                     cache: ImageCache, seed: int = 0, progress: bool = True) -> TrainResult:
    """Train on ``train`` rows with early stopping on ``val`` loss; returns the best model."""
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"classifier training needs train and val rows (got {len(train)} "
                         f"train, {len(val)} val)")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = pick_device()
    model = build_model(spec).to(device)
    opt = timm.optim.create_optimizer_v2(model, opt=spec.optimizer, lr=spec.lr,
                                         weight_decay=spec.weight_decay)
    tr_rows, va_rows = cache.rows_for(train["image_id"]), cache.rows_for(val["image_id"])
    tr_y, va_y = _label_matrix(train), _label_matrix(val)
    best_loss, best_epoch, best_state, waited = np.inf, 0, None, 0
    history = []
    bar = tqdm(range(1, spec.epochs + 1), desc="classifier epochs", disable=not progress)
    for epoch in bar:
        model.train()
        losses = []
        for x, y in _batches(tr_rows, tr_y, cache, spec.batch_size, rng):
            loss = masked_bce(model(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
            opt.step()
            losses.append(loss.item())
        val_loss = _eval_loss(model, va_rows, va_y, cache, spec.batch_size, device)
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)),
                        "val_loss": val_loss})
        bar.set_postfix(train=f"{np.mean(losses):.3f}", val=f"{val_loss:.3f}")
        if not np.isfinite(val_loss):
            raise ValueError(f"classifier training diverged at epoch {epoch} (validation loss "
                             f"{val_loss}); lower classifier.lr ({spec.lr}) or check the data "
                             f"(backbone {spec.backbone})")
        if val_loss < best_loss:
            best_loss, best_epoch, waited = val_loss, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
            if waited >= spec.patience:
                break
    assert best_state is not None
    model.load_state_dict(best_state)
    return TrainResult(model, pd.DataFrame(history), best_epoch,
                       stopped_early=len(history) < spec.epochs)


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
    """Weights in safetensors, the spec and training history beside them (atomic folder)."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()},
              tmp / "model.safetensors")
    meta = {"spec": spec.model_dump(), "best_epoch": result.best_epoch,
            "stopped_early": result.stopped_early, **(extra or {})}
    (tmp / "classifier.json").write_text(json.dumps(meta, indent=1))
    result.history.to_csv(tmp / "history.csv", index=False)
    aside = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():  # keep the old model until the new one is in place
        os.replace(folder, aside)
    os.replace(tmp, folder)
    if aside.exists():
        shutil.rmtree(aside)
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
                       meta["stopped_early"])


def train_or_load(spec: ClassifierSpec, train: pd.DataFrame, val: pd.DataFrame,
                  cache: ImageCache, folder: Path, seed: int = 0,
                  progress: bool = True) -> TrainResult:
    """Reuse a classifier saved in ``folder`` (same settings, seed, training and validation
    rows), else train and save one, so that a model is never trained twice for the same data."""
    ids = {"train_rows": len(train), "val_rows": len(val), "seed": seed,
           "train_ids_crc": zlib.crc32("\n".join(train["image_id"]).encode()),
           "val_ids_crc": zlib.crc32("\n".join(val["image_id"]).encode())}
    if (folder / "classifier.json").exists():
        meta = json.loads((folder / "classifier.json").read_text())
        same_spec = ClassifierSpec.model_validate(meta["spec"]) == spec
        if same_spec and all(meta.get(k) == v for k, v in ids.items()):
            return load_classifier(folder, spec)
    result = train_classifier(spec, train, val, cache, seed, progress)
    save_classifier(result, spec, folder, ids)
    return result


def predictions_frame(df: pd.DataFrame, scores: np.ndarray, test_set: str) -> pd.DataFrame:
    """Long per-image predictions: image_id, patient_id, test_set, label, target, score."""
    parts = []
    for j, label in enumerate(CHEXPERT_LABELS):
        parts.append(pd.DataFrame({
            "image_id": df["image_id"].to_numpy(), "patient_id": df["patient_id"].to_numpy(),
            "test_set": test_set, "label": label, "target": df[label].to_numpy(dtype=float),
            "score": scores[:, j],
        }))
    return pd.concat(parts, ignore_index=True)
