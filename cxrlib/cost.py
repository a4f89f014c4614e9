"""What a study will cost before anything is submitted: ``python -m cxrlib plan``.

Per stage: the jobs a cluster run would submit, the images and steps, GPU-hours and disk.
Counts come from the parameters and, once notebook 01 has written the run's manifest, from
its rows (before that, the counts that depend on the cohort's size are marked unknown). Speeds
come only from measurements: ``benchmarks/bench_gpu.py``'s ``gpu_unet.json`` (the paper's
UNet, training and sampling images/s) for the named GPU kind, at the run's resolution; where
no benchmark ran on that kind the estimate says so instead of guessing. Disk is counted from
parameter counts and image sizes (uint8, one copy in shards and one in the merged cache).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cxrlib.cluster.spec import ClusterSpec
from cxrlib.core.cohort import diffusion_rows, source_rows
from cxrlib.core.layout import RunLayout
from cxrlib.core.schema import Params
from cxrlib.experiments.grid import plan_grid

#: Where the benchmarks write their figures (``gpu_unet.json`` in any folder below).
BENCHMARKS = Path(__file__).resolve().parent.parent / "reports" / "benchmarks"
#: Bytes per stored value of a checkpoint's weights, EMA and optimizer state (fp32).
FP32 = 4
#: Optimizer states per weight: AdamW keeps two moments, Lion one.
OPTIMIZER_STATES = {"adamw": 2, "lion": 1}


@dataclass(frozen=True)
class GpuFigures:
    """One ``gpu_unet.json``: the device it ran on, and images/s."""

    device: str
    resolution: int
    train: dict[str, float]  # precision -> training images/s per GPU
    sample_evals: dict[str, float]  # precision -> UNet evaluations/s per GPU (sampling)
    file: Path


def gpu_figures(kind: str | None, resolution: int, root: Path = BENCHMARKS
                ) -> GpuFigures | None:
    """The GPU benchmark that ran on ``kind`` (matched in its device name, e.g. ``H100``) at
    ``resolution``; None when there is none."""
    if not kind:
        return None
    for file in sorted(root.rglob("gpu_unet.json")):
        raw = json.loads(file.read_text())
        if kind.lower() not in raw["device"].lower() or raw["resolution"] != resolution:
            continue
        evals: dict[str, float] = {}
        for r in raw.get("sample", []):  # the fastest measured UNet evaluations/s
            rate = r["img_per_s"] * r["steps"]
            evals[r["precision"]] = max(evals.get(r["precision"], 0.0), rate)
        return GpuFigures(raw["device"], resolution,
                          {k: v["img_per_s"] for k, v in raw["train"].items()}, evals, file)
    return None


def _precision(mixed: str) -> str:
    return {"no": "fp32", "auto": "bf16"}.get(mixed, mixed)


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:,.1f} GB"


def _hours(work: float | None, rate: float | None, what: str, gpu: str | None) -> str:
    if work is None:
        return "unknown until notebook 01 has run"
    if rate is None:
        return f"no figure: no {what} benchmark ran on {gpu or 'the named GPU'}"
    return f"{work / rate / 3600:,.1f} GPU-h"


def _manifest(params: Params) -> pd.DataFrame | None:
    path = RunLayout.open(params, create=False).manifest
    return pd.read_parquet(path) if path.exists() else None


def study_plan(params: Params, cluster: ClusterSpec | None = None, gpu: str | None = None,
               bench_root: Path = BENCHMARKS) -> str:
    """The plan as text: one block per stage, then where the figures came from."""
    from cxrlib.classifier.training import build_model
    from cxrlib.diffusion.training import model_summary

    cluster = cluster or ClusterSpec(executor="local")
    gpu = gpu or cluster.gpu_kind
    figures = gpu_figures(gpu, params.data.resolution, bench_root)
    manifest = _manifest(params)
    d, s = params.diffusion, params.sampling
    lines = [f"Plan for run {params.run.name} ({params.data.resolution} px); GPU kind: "
             f"{gpu or 'none named (--gpu or the cluster file gpu_kind)'}"]

    # 02: diffusion training
    tasks = cluster.diffusion.nodes * cluster.diffusion.tasks_per_node
    seen = d.max_steps * d.batch_size * tasks
    n_unet = int(model_summary(params).attrs["parameters"])
    states = 2 + OPTIMIZER_STATES[d.optimizer]  # weights, EMA, optimizer
    rate = figures.train.get(_precision(d.mixed_precision)) if figures else None
    train_rows = len(diffusion_rows(params, manifest)) if manifest is not None else None
    lines += ["", "02 diffusion training",
              f"  jobs: 1 job of {cluster.diffusion.nodes} node(s) x "
              f"{cluster.diffusion.tasks_per_node} task(s) (one GPU each)",
              f"  work: {d.max_steps:,} steps x global batch {d.batch_size * tasks} = "
              f"{seen:,} images seen"
              + (f" ({seen / train_rows:,.1f} passes over {train_rows:,} images)"
                 if train_rows else ""),
              f"  time: {_hours(seen, rate, 'training', gpu)}"
              + (f" ({rate:,.1f} img/s per GPU, {_precision(d.mixed_precision)})"
                 if rate else ""),
              f"  disk: {_gb(n_unet * FP32 * states * d.keep_checkpoints)} "
              f"({d.keep_checkpoints} checkpoints of a {n_unet / 1e6:,.1f}M-parameter UNet)"]

    # 03: synthetic cohorts
    sources = len(source_rows(params, manifest)) if manifest is not None else None
    per_call = 2 if s.guidance > 0 else 1
    cohorts: dict[str, int | None] = {}
    for strategy in s.strategies:
        if strategy.startswith("oracle"):
            continue
        per_source = sources * s.replicas if sources is not None else None
        cohorts[strategy] = (s.rebalance.n_images or per_source) if strategy == "rebalance" \
            else per_source
    images = None if None in cohorts.values() else sum(cohorts.values())
    evals = None if images is None else images * s.steps * per_call
    erate = figures.sample_evals.get(_precision(s.mixed_precision)) if figures else None
    jobs = [f"{name}: " + ("? tasks" if n is None else
                           f"{min(cluster.generation_groups, math.ceil(n / s.shard_size))} "
                           "task(s)") for name, n in cohorts.items()]
    lines += ["", "03 synthetic cohorts",
              f"  jobs: one array per cohort over shard groups ({'; '.join(jobs) or 'none'});"
              " phantom oracles render on CPUs",
              "  work: " + ("unknown until notebook 01 has run" if images is None else
                            f"{images:,} images x {s.steps} {s.sampler} steps x {per_call} "
                            f"UNet call(s) = {evals:,} UNet evaluations"),
              f"  time: {_hours(evals, erate, 'sampling', gpu)}",
              "  disk: " + ("unknown" if images is None else
                            _gb(2 * images * params.data.resolution ** 2))]

    # 04: classifier grid
    arms = plan_grid(params)
    c = params.classifier
    n_cls = sum(p.numel() for p in build_model(c.model_copy(update={"pretrained": False}))
                .parameters())
    steps = (f"up to {c.max_steps:,} optimizer steps of batch {c.batch_size} each"
             if c.max_steps else f"up to {c.epochs} epochs each")
    lines += ["", "04 classifier grid",
              f"  jobs: an array of {len(arms)} task(s), one arm each, "
              f"{cluster.array_parallelism} at a time",
              f"  work: {len(arms)} trainings of {c.backbone}, {steps}",
              f"  time: no figure: no classifier benchmark ran on {gpu or 'a GPU'}",
              f"  disk: {_gb(len(arms) * n_cls * FP32)} of kept weights "
              f"({n_cls / 1e6:,.1f}M parameters per arm), plus "
              f"{_gb(n_cls * FP32 * (2 + OPTIMIZER_STATES[c.optimizer]))} per running arm "
              "for its resumable state"]
    lines += ["", f"Speeds: {figures.file} ({figures.device})" if figures else
              f"Speeds: none measured; run benchmarks/bench_gpu.py on a {gpu or 'GPU'} node "
              "and plan again"]
    return "\n".join(lines)
