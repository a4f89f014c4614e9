"""Classifier training throughput, and the data loader against what a training step consumes.

    python benchmarks/bench_classifier.py --params params/demo.yaml [--images 2048]

Three numbers, measured side by side in one run on a random image cache at the preset's
resolution (throughput does not depend on image content):

1. loader: images/s the DataLoader delivers (cache read + model scaling), no training;
2. step: images/s of the training step alone (augment, forward, backward, optimiser, EMA) on
   batches already in memory;
3. end to end: images/s of ``cxrlib.classifier.training.train_classifier`` over whole epochs.

The loader must never be the bottleneck: ``loader / step`` must stay well above 1. The script
exits 1 when it is not.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import timm.optim
import torch
from timm.utils import ModelEmaV3

from cxrlib.classifier.augment import augment_batch
from cxrlib.classifier.training import (
    BatchDataset,
    _label_matrix,
    _loader,
    build_model,
    epoch_plan,
    masked_bce,
    train_classifier,
)
from cxrlib.core.config import load_params
from cxrlib.core.labels import CHEXPERT_LABELS
from cxrlib.data.imagecache import ImageCache, write_image_cache


def random_cache(folder: Path, n: int, resolution: int) -> tuple[ImageCache, pd.DataFrame]:
    """A cache of ``n`` random images and manifest-like rows with random labels."""
    rng = np.random.default_rng(0)
    ids = [f"img{i:06d}" for i in range(n)]
    with write_image_cache(folder, n, resolution) as cache:
        cache.add(ids, rng.integers(0, 256, (n, resolution, resolution), np.uint8))
    labels = (rng.random((n, len(CHEXPERT_LABELS))) < 0.2).astype(float)
    rows = pd.DataFrame(labels, columns=list(CHEXPERT_LABELS))
    rows.insert(0, "image_id", ids)
    return ImageCache(folder), rows


def loader_rate(dataset: BatchDataset, workers: int, repeats: int = 3) -> float:
    best = 0.0
    for _ in range(repeats):
        start, seen = time.perf_counter(), 0
        for x, _y in _loader(dataset, workers, pin=False):
            seen += len(x)
        best = max(best, seen / (time.perf_counter() - start))
    return best


def step_rate(spec, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model = build_model(spec)
    opt = timm.optim.create_optimizer_v2(model, opt=spec.optimizer, lr=spec.lr,
                                         weight_decay=spec.weight_decay)
    ema = ModelEmaV3(model, decay=spec.ema_decay, use_warmup=True) if spec.ema_decay > 0 \
        else None
    gen = torch.Generator().manual_seed(0)
    model.train()
    for i, (x, y) in enumerate(batches):
        if i == 2:  # the first steps warm up allocators and kernels
            start, seen = time.perf_counter(), 0
        x, y = augment_batch(x, y, spec.augment, gen)
        loss = masked_bce(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model, i + 1)
        if i >= 2:
            seen += len(x)
    return seen / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params/demo.yaml"))
    parser.add_argument("--images", type=int, default=2048)
    args = parser.parse_args()
    params = load_params(args.params)
    spec = params.classifier
    res = params.data.resolution
    with tempfile.TemporaryDirectory() as tmp:
        cache, rows = random_cache(Path(tmp) / "cache", args.images, res)
        dataset = BatchDataset(cache, cache.rows_for(rows["image_id"]), _label_matrix(rows))
        dataset.plan = epoch_plan(len(rows), spec.batch_size, np.random.default_rng(0))
        loaded = loader_rate(dataset, spec.loader_workers)
        batches = [dataset[i] for i in range(min(len(dataset), 14))]
        step = step_rate(spec, batches)
        one_epoch = spec.model_copy(update={"epochs": 2, "patience": 5})
        val = rows.iloc[: len(rows) // 8]
        result = train_classifier(one_epoch, rows, val, cache, progress=False)
        hist = result.history
        end_to_end = float((hist["train_images"] / hist["seconds"]).max())
    print(f"preset {args.params.name}: {spec.backbone} at {res} px, batch {spec.batch_size}, "
          f"loader_workers {spec.loader_workers}, {torch.get_num_threads()} torch threads, "
          f"device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"  loader        {loaded:10.0f} img/s")
    print(f"  training step {step:10.0f} img/s")
    print(f"  end to end    {end_to_end:10.0f} img/s (train_classifier epoch incl. validation)")
    print(f"  loader / step = {loaded / step:.1f}x (must be > 1: the loader is not the "
          "bottleneck)")
    return 0 if loaded > step else 1


if __name__ == "__main__":
    raise SystemExit(main())
