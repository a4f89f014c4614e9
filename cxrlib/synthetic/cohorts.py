"""The synthetic cohorts used to supplement real data: plans, sharded generation, the merge.

Images come from :mod:`cxrlib.diffusion.samplers` (one seed per image, derived from the run seed,
the source image id and the replica, so any synthetic image can be regenerated from its
manifest row).

Two condition strategies build a synthetic cohort from the real TRAINING rows only:

- ``replicas`` (the paper): every training row gets replicas 0..k-1 with its own labels and
  demographics and different seeds; ratio k uses replicas below k (+100% .. +1000%).
- ``rebalance``: conditions are drawn from the training rows' own label and demographic
  combinations, weighted so that the groups in ``sampling.rebalance.by`` come out in equal shares
  and the labels in ``label_boost`` more often, to ask whether synthetic data can repair
  under-represented groups.

Generation writes shards (``shards/shard-XXXXX.npz``, each renamed into place when complete);
an interrupted run skips finished shards and never duplicates or loses an image. Under
``accelerate launch`` the shards are split across processes. When all shards exist they are
merged into an image cache (:mod:`cxrlib.data.imagecache` layout) and a manifest in the real data's
schema plus provenance columns.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from PIL import Image

from cxrlib.cluster.spec import ClusterSpec, active_cluster
from cxrlib.core.cohort import AGE_BANDS, AGE_UNKNOWN, age_band, source_rows
from cxrlib.core.files import atomic_path, atomic_write_parquet
from cxrlib.core.kinds import ORACLE_STRATEGIES, GeneratorSetting
from cxrlib.core.labels import CHEXPERT_LABELS, MANIFEST_COLUMNS
from cxrlib.core.layout import RunLayout
from cxrlib.core.processes import on_main, process_state
from cxrlib.core.progress import tqdm
from cxrlib.core.schema import Params, SamplingSpec
from cxrlib.data.imagecache import decode, write_image_cache
from cxrlib.data.phantom import ORACLE_STREAM, STYLES, render_jpeg, smooth_style
from cxrlib.data.readers import load_cohort
from cxrlib.diffusion.checkpoints import checkpoint_at
from cxrlib.diffusion.pipeline import CXRPipeline
from cxrlib.diffusion.samplers import generate, image_seed
from cxrlib.hardware import precision_label, resolve_precision

if TYPE_CHECKING:
    import torch

#: Columns a synthetic manifest adds to the real schema.
PROVENANCE_COLUMNS: tuple[str, ...] = (
    "source_image_id", "replica", "seed", "strategy", "checkpoint", "sampler", "steps",
    "guidance", "guidance_rescale", "precision",
)


#: What an oracle cohort's ``checkpoint`` and ``sampler`` columns name (its ``precision``
#: is empty: no network computes it).
PHANTOM_RENDERER = "phantom-renderer"


class SyntheticCohortError(RuntimeError):
    """A synthetic cohort on disk is incomplete or does not match what is asked for."""


# ---------------------------------------------------------------------------------------------
# Synthetic cohort plans


def _synthetic_rows(source: pd.DataFrame, replica: np.ndarray, seeds: np.ndarray,
                    strategy: str, spec: SamplingSpec, checkpoint: str) -> pd.DataFrame:
    rows = source.reset_index(drop=True).copy()
    rows["source_image_id"] = rows["image_id"]
    rows["replica"] = replica
    rows["image_id"] = [f"synthetic/{strategy}/{sid}/r{r}"
                        for sid, r in zip(rows["source_image_id"], replica, strict=True)]
    rows["path"] = ""
    rows["site"] = "synthetic"
    rows["split"] = "train"
    rows["seed"] = seeds
    rows["strategy"] = strategy
    rows["checkpoint"] = checkpoint
    rows["sampler"] = spec.sampler
    rows["steps"] = spec.steps
    rows["guidance"] = spec.guidance
    rows["guidance_rescale"] = spec.guidance_rescale
    rows["precision"] = precision_label(resolve_precision(spec.mixed_precision))
    # patient_id and study_id stay those of the source row: leakage checks follow them.
    return rows[list(MANIFEST_COLUMNS) + list(PROVENANCE_COLUMNS)]


def replica_plan(params: Params, manifest: pd.DataFrame, checkpoint: str,
                 strategy: str = "replicas") -> pd.DataFrame:
    """Replicas 0..k-1 of every source training row (:func:`cxrlib.core.cohort.source_rows`,
    k = replicas); ``checkpoint`` names the diffusion checkpoint the images come from. The
    oracle strategies plan the same rows (their images are phantom renders, their seeds
    their own: the seed key carries the strategy)."""
    spec = params.sampling
    source = source_rows(params, manifest)
    k = spec.replicas
    rep_rows = source.loc[source.index.repeat(k)]
    replica = np.tile(np.arange(k), len(source))
    key = "" if strategy == "replicas" else f"{strategy}/"
    seeds = np.array([image_seed(params.run.seed, key + sid, r)
                      for sid, r in zip(rep_rows["image_id"], replica, strict=True)])
    plan = _synthetic_rows(rep_rows, replica, seeds, strategy, spec, checkpoint)
    if strategy in ORACLE_STRATEGIES:
        plan = plan.assign(sampler=PHANTOM_RENDERER, steps=0, guidance=np.nan,
                           guidance_rescale=np.nan, precision="")
    return plan.sort_values(["replica", "source_image_id"], kind="stable").reset_index(drop=True)


def rebalance_weights(source: pd.DataFrame, by: list[str],
                      label_boost: dict[str, float]) -> np.ndarray:
    """Sampling weights over training rows: equal total weight per group of ``by`` columns
    (sex, age_band, race, view), times ``label_boost[label]`` for rows positive for a label."""
    # A missing age is a group of its own here: every row needs a weight.
    frame = source.assign(age_band=age_band(source["age"]).astype(object).fillna(AGE_UNKNOWN))
    missing = [c for c in by if c not in frame]
    if missing:
        raise KeyError(f"sampling.rebalance.by: unknown column(s) {missing}; use sex, "
                       "age_band, race or view")
    if by:
        size = frame.groupby(by)[by[0]].transform("size").to_numpy(dtype=float)
        w = 1.0 / size
    else:
        w = np.ones(len(frame))
    for label, factor in label_boost.items():
        w = w * np.where(frame[label].to_numpy() == 1.0, factor, 1.0)
    return w / w.sum()


def rebalance_plan(params: Params, manifest: pd.DataFrame, checkpoint: str) -> pd.DataFrame:
    """``rebalance.n_images`` conditions drawn from the training rows with rebalancing weights
    (the same amount of synthetic data as a replica experiment when n_images = k x rows)."""
    spec = params.sampling
    source = source_rows(params, manifest)
    n = spec.rebalance.n_images or len(source) * spec.replicas
    w = rebalance_weights(source, spec.rebalance.by, spec.rebalance.label_boost)
    rng = np.random.default_rng([params.run.seed, 7919])
    pick = rng.choice(len(source), size=n, replace=True, p=w)
    draw = np.arange(n)
    chosen = source.iloc[pick]
    seeds = np.array([image_seed(params.run.seed, f"rebalance/{sid}", int(d))
                      for sid, d in zip(chosen["image_id"], draw, strict=True)])
    plan = _synthetic_rows(chosen, draw, seeds, "rebalance", spec, checkpoint)
    plan["image_id"] = [f"synthetic/rebalance/{i:07d}" for i in draw]
    return plan


def plan_for(params: Params, manifest: pd.DataFrame, strategy: str,
             checkpoint: str) -> pd.DataFrame:
    if strategy in ORACLE_STRATEGIES:
        return replica_plan(params, manifest, PHANTOM_RENDERER, strategy)
    if strategy == "replicas":
        return replica_plan(params, manifest, checkpoint)
    if strategy == "rebalance":
        return rebalance_plan(params, manifest, checkpoint)
    raise ValueError(f"unknown strategy '{strategy}'; use replicas, rebalance, "
                     f"{' or '.join(ORACLE_STRATEGIES)}")


# ---------------------------------------------------------------------------------------------
# Resumable, sharded generation


#: A function from plan rows to their images (n x R x R uint8).
ImageSource = Callable[[pd.DataFrame], np.ndarray]


def diffusion_source(params: Params, generator: CXRPipeline) -> ImageSource:
    """The generator's images for plan rows, at the run's sampling settings; the rows'
    conditions are encoded as the generator was trained (:meth:`CXRPipeline.encode`)."""
    spec = params.sampling

    def images(rows: pd.DataFrame) -> np.ndarray:
        cond = generator.encode(rows)
        return generate(generator.unet, generator.scheduler, cond, rows["seed"].to_numpy(),
                        spec.sampler, spec.steps, spec.guidance, spec.guidance_rescale,
                        spec.batch_size, precision=resolve_precision(spec.mixed_precision))

    return images


def oracle_source(params: Params, manifest: pd.DataFrame, smooth: bool) -> ImageSource:
    """A perfect generator for phantom cohorts: each plan row's source rendered again from the
    raw label codes its phantom site wrote (1, 0, -1, blank; not the manifest's processed
    labels, since uncertain and unannotated findings render differently), with the site's
    style (``smooth``: without detector noise and grain), the row's own seed, and the same
    JPEG and preprocessing path as the site's images."""
    sources = manifest.set_index("image_id")
    sites = {s.site: s for s in params.data.sites}
    raw: dict[str, pd.DataFrame] = {}

    def raw_row(image_id: str) -> pd.Series:
        src = sources.loc[image_id]
        site = sites[src["site"]]
        if site.phantom is None:
            raise SyntheticCohortError(f"{image_id}: the oracle renders phantom rows only; site "
                                       f"'{site.site}' is read from real images")
        if src["source_file"] not in raw:
            raw[src["source_file"]] = pd.read_csv(src["source_file"])
        return raw[src["source_file"]].iloc[int(src["source_row"]) - 2]

    def images(rows: pd.DataFrame) -> np.ndarray:
        out = np.empty((len(rows), params.data.resolution, params.data.resolution), np.uint8)
        for i, (sid, seed) in enumerate(zip(rows["source_image_id"], rows["seed"], strict=True)):
            row, spec = raw_row(sid), sites[sources.loc[sid, "site"]].phantom
            style = STYLES[spec.style]
            labels = {k: float(row[k]) for k in CHEXPERT_LABELS}
            jpeg = render_jpeg(labels, row["Sex"], float(row["Age"]), row["AP/PA"],
                               smooth_style(style) if smooth else style, spec.image_size,
                               [int(seed), ORACLE_STREAM])
            with Image.open(io.BytesIO(jpeg)) as img:
                out[i] = decode(img, params.data.resolution)
        return out

    return images


def generate_cohort(params: Params, plan: pd.DataFrame, source: ImageSource, run: RunLayout,
                    strategy: str, rank: int = 0, world: int = 1, progress: bool = True,
                    on_shard: Callable[[int], None] | None = None) -> list[int]:
    """Generate the shards of ``plan`` that this process owns and that do not exist yet.

    Shard s holds plan rows [s * shard_size, (s + 1) * shard_size) and belongs to process
    s % world. Returns the shard numbers written now.

    Args:
        params: the run's parameters; only ``sampling.shard_size`` is read here.
        plan: the cohort's rows in order (:func:`plan_for`); its ``checkpoint`` is stored in
            each shard, and an existing shard of another checkpoint is an error.
        source: plan rows -> their images (:func:`diffusion_source` or :func:`oracle_source`).
        run: the run folder; shards go to :meth:`RunLayout.synthetic_shard`.
        strategy: the cohort's strategy (``replicas``, ``rebalance`` or an oracle); names its
            folder.
        rank: this process's index; it writes the shards s with s % world == rank.
        world: the number of processes sharing the shards.
        progress: show a tqdm bar over this process's shards.
        on_shard: ``on_shard(s)``, run after each shard is written (tests use it to interrupt
            a run).
    """
    spec = params.sampling
    size = spec.shard_size
    n_shards = (len(plan) + size - 1) // size
    run.synthetic_shard(strategy, 0).parent.mkdir(parents=True, exist_ok=True)
    checkpoint = str(plan["checkpoint"].iloc[0]) if len(plan) else ""
    todo = []
    for s in range(n_shards):
        path = run.synthetic_shard(strategy, s)
        if s % world != rank:
            continue
        if not path.exists():
            todo.append(s)
        elif str(np.load(path)["checkpoint"]) != checkpoint:
            raise SyntheticCohortError(
                f"{path} was generated with diffusion checkpoint "
                f"{np.load(path)['checkpoint']} but this cohort uses {checkpoint}; delete "
                f"{run.synthetic(strategy)} to generate it again from the current model")
    written = []
    for s in tqdm(todo, desc=f"{strategy} shards", disable=not progress):
        lo, hi = s * size, min((s + 1) * size, len(plan))
        images = source(plan.iloc[lo:hi])
        with atomic_path(run.synthetic_shard(strategy, s), expected_bytes=images.nbytes) as tmp:
            np.savez(tmp, images=images,
                     image_ids=plan["image_id"].to_numpy()[lo:hi].astype(str),
                     checkpoint=np.array(checkpoint))
        written.append(s)
        if on_shard is not None:
            on_shard(s)
    return written


def finalize_cohort(plan: pd.DataFrame, run: RunLayout, strategy: str,
                    shard_size: int) -> pd.DataFrame:
    """Merge complete shards into the cohort's image cache and write its manifest (last: it
    marks the cohort complete); an error names the shards still missing. Returns the
    synthetic manifest."""
    folder = run.synthetic(strategy)
    n_shards = (len(plan) + shard_size - 1) // shard_size
    shards = [run.synthetic_shard(strategy, s) for s in range(n_shards)]
    missing = [p.name for p in shards if not p.exists()]
    if missing or sum(len(np.load(p)["image_ids"]) for p in shards) != len(plan):
        raise SyntheticCohortError(f"synthetic cohort in {folder} is incomplete (missing shards: "
                           f"{missing[:5]}); run the generation again to finish it")
    with write_image_cache(run.synthetic_cache(strategy), len(plan), run.resolution) as cache:
        for p in shards:
            data = np.load(p)
            cache.add(data["image_ids"].tolist(), data["images"])
        if cache.image_ids != plan["image_id"].tolist():
            raise SyntheticCohortError(f"synthetic shards in {folder} do not match the plan "
                                       "(made with other parameters?); delete the folder and "
                                       "generate again")
    atomic_write_parquet(plan, run.synthetic_manifest(strategy))
    return plan


def check_no_eval_sources(plan: pd.DataFrame, manifest: pd.DataFrame) -> None:
    """Synthetic images must come from training rows only: fail naming any that do not."""
    split = manifest.set_index("image_id")["split"]
    bad = plan.loc[plan["source_image_id"].map(split) != "train", "source_image_id"]
    if len(bad):
        raise ValueError(f"{len(bad)} synthetic row(s) come from non-training images, e.g. "
                         f"{bad.iloc[:3].tolist()}")


def label_summary(plan: pd.DataFrame, source: pd.DataFrame) -> pd.DataFrame:
    """Share positive per label, and share per sex and age band: synthetic plan vs source."""
    out = {}
    for name, frame in (("real train", source), ("synthetic", plan)):
        col = {lab: (frame[lab] == 1.0).mean() for lab in CHEXPERT_LABELS}
        col.update({f"sex={s}": (frame["sex"] == s).mean() for s in ("Female", "Male")})
        bands = age_band(frame["age"]).value_counts(normalize=True)
        col.update({f"age {b}": bands.get(b, 0.0) for b in AGE_BANDS})
        out[name] = col
    return (100 * pd.DataFrame(out)).round(1)


def label_mix(cohorts: dict[str, pd.DataFrame], source: pd.DataFrame) -> pd.DataFrame:
    """:func:`label_summary` of every cohort side by side (a column level per cohort)."""
    return pd.concat({s: label_summary(m, source) for s, m in cohorts.items()}, axis=1)


def build_synthetic_cohort(params: Params, manifest: pd.DataFrame, generator: CXRPipeline,
                           run: RunLayout, strategy: str, progress: bool = True) -> pd.DataFrame:
    """Plan, check, generate (this process's shards) and merge one strategy's cohort from
    ``generator`` (a run's checkpoint or an exported folder, :mod:`cxrlib.diffusion.pipeline`); its
    ``checkpoint`` is the cohort's provenance.

    Under ``accelerate launch`` every process generates its share of the shards; the main
    process merges them once all are written (an error there is raised on every process). A
    finished cohort is loaded, not regenerated, if it came from the same checkpoint.
    """
    checkpoint = generator.config.checkpoint
    out = run.synthetic(strategy)
    done = run.synthetic_manifest(strategy)
    if done.exists():
        existing = pd.read_parquet(done)
        made_by = PHANTOM_RENDERER if strategy in ORACLE_STRATEGIES else checkpoint
        if existing["checkpoint"].iloc[0] != made_by:
            raise SyntheticCohortError(
                f"synthetic cohort {out} was generated with diffusion checkpoint "
                f"{existing['checkpoint'].iloc[0]} but the model now is {checkpoint}; "
                "delete the folder to generate it again")
        return existing
    plan = plan_for(params, manifest, strategy, checkpoint)
    check_no_eval_sources(plan, manifest)
    cluster = active_cluster()
    if cluster is not None:
        _generate_on_cluster(params, plan, generator, run, strategy, cluster)
        finalize_cohort(plan, run, strategy, params.sampling.shard_size)
        return pd.read_parquet(done)
    state = process_state()
    generate_cohort(params, plan, _source(params, manifest, strategy, generator, state.device),
                    run, strategy, state.process_index, state.num_processes,
                    progress and state.is_main_process)
    state.wait_for_everyone()  # every shard is written
    on_main(partial(finalize_cohort, plan, run, strategy, params.sampling.shard_size))
    return pd.read_parquet(done)


def _setting_params(params: Params, setting: GeneratorSetting) -> Params:
    """The run's parameters sampling as ``setting`` does: its guidance, ``tradeoffs.k``
    replicas."""
    spec = params.sampling.model_copy(update={"guidance": setting.guidance,
                                              "replicas": params.tradeoffs.k})
    return params.model_copy(update={"sampling": spec})


def setting_plan(params: Params, manifest: pd.DataFrame, setting: GeneratorSetting,
                 checkpoint: str) -> pd.DataFrame:
    """The cohort of one generator setting of the worth curves: replicas 0..k-1
    (``tradeoffs.k``) of the run's source rows with the seeds of the run's own replicas (the
    same rows and noise: images of two settings differ only in the setting), at the
    setting's guidance; image ids carry the setting, so its images never collide with
    another cohort's."""
    plan = replica_plan(_setting_params(params, setting), manifest, checkpoint)
    key = setting.cohort()
    plan["image_id"] = [f"synthetic/{key}/{sid}/r{r}"
                        for sid, r in zip(plan["source_image_id"], plan["replica"], strict=True)]
    return plan


def build_setting_cohorts(params: Params, manifest: pd.DataFrame, run: RunLayout,
                          progress: bool = True) -> dict[GeneratorSetting, pd.DataFrame]:
    """Plan, generate and merge the cohort of every generator setting of the worth curves
    (:meth:`cxrlib.core.schema.Params.generator_settings`) that is not complete yet, each from
    its checkpoint's EMA weights; resumable by shard like the run's own cohorts. Generated in
    this process (on a cluster too: the settings' cohorts are small beside the grid)."""
    out = {}
    for setting in params.generator_settings():
        key, done = setting.cohort(), run.synthetic_manifest(setting.cohort())
        folder = checkpoint_at(run, setting.step)
        if done.exists():
            out[setting] = pd.read_parquet(done)
            if out[setting]["checkpoint"].iloc[0] != folder.name:
                raise SyntheticCohortError(f"{run.synthetic(key)} was generated from another "
                                           "checkpoint; delete the folder to generate it again")
            continue
        generator = CXRPipeline.from_checkpoint(folder, params.diffusion)
        plan = setting_plan(params, manifest, setting, folder.name)
        check_no_eval_sources(plan, manifest)
        source = diffusion_source(_setting_params(params, setting), generator)
        generate_cohort(params, plan, source, run, key, progress=progress)
        out[setting] = finalize_cohort(plan, run, key, params.sampling.shard_size)
    return out


def _source(params: Params, manifest: pd.DataFrame, strategy: str, generator: CXRPipeline,
            device: torch.device | str) -> ImageSource:
    if strategy in ORACLE_STRATEGIES:
        return oracle_source(params, manifest, smooth=strategy == "oracle_smooth")
    return diffusion_source(params, generator.to(device))


SAMPLING_STAGE = "03_sampling_explorer"


def generate_group(params: Params, strategy: str, checkpoint: str, group: int, groups: int,
                   origin: tuple[str, Path] | None, threads: int | None = None) -> list[int]:
    """Generate shard group ``group`` of ``groups`` (the shards s with s % groups == group)
    of one cohort from the run folder alone: the piece a cluster job runs. Shards already
    written are skipped, so a preempted job continues where it stopped."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    run = RunLayout.open(params, create=False)
    manifest = load_cohort(params, run).manifest
    generator = None if origin is None else CXRPipeline.reload(origin, params.diffusion)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plan = plan_for(params, manifest, strategy, checkpoint)
    return generate_cohort(params, plan, _source(params, manifest, strategy, generator, device),
                           run, strategy, group, groups, progress=False)


def _generate_on_cluster(params: Params, plan: pd.DataFrame, generator: CXRPipeline,
                         run: RunLayout, strategy: str, cluster: ClusterSpec) -> None:
    """The cohort's missing shards as a SLURM job array over shard groups
    (``cluster.generation_groups``; group g writes the shards s with s % groups == g)."""
    from cxrlib.cluster.slurm import Piece, run_pieces

    size = params.sampling.shard_size
    n_shards = (len(plan) + size - 1) // size
    missing = [s for s in range(n_shards) if not run.synthetic_shard(strategy, s).exists()]
    groups = min(cluster.generation_groups, n_shards)
    origin = None if strategy in ORACLE_STRATEGIES else generator.origin
    if strategy not in ORACLE_STRATEGIES and origin is None:
        raise SyntheticCohortError("this generator was built in memory, so a cluster job "
                                   "cannot load it; use the run's checkpoint or an exported "
                                   "generator folder (cxrlib export-generator)")
    checkpoint = str(plan["checkpoint"].iloc[0])
    folder = run.synthetic(strategy).relative_to(run.root).as_posix()
    pieces = [Piece(f"{strategy} shard group {g} of {groups}", folder,
                    partial(generate_group, params, strategy, checkpoint, g, groups, origin,
                            cluster.generation.cpus_per_task))
              for g in sorted({s % groups for s in missing})]
    run_pieces(pieces, cluster, cluster.generation, run, SAMPLING_STAGE,
               desc=f"{strategy} cohort on SLURM ({len(missing)} shards, {len(pieces)} jobs)")


def cohort_counts(cohorts: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Images and distinct source rows per synthetic cohort."""
    return pd.DataFrame({s: {"images": len(m), "source rows": m["source_image_id"].nunique()}
                         for s, m in cohorts.items()}).T


def replica_examples(cohort: pd.DataFrame, images: np.ndarray,
                     n_sources: int = 4) -> dict[str, np.ndarray]:
    """``{"replica r": images of the first n sources}``: a row per source, a column per replica.
    ``images`` is the cohort's image array in manifest order."""
    sources = cohort["source_image_id"].drop_duplicates().head(n_sources)
    out = {}
    for r in sorted(cohort["replica"].unique()):
        pos = [int(np.flatnonzero((cohort["source_image_id"] == s).to_numpy()
                                  & (cohort["replica"] == r).to_numpy())[0]) for s in sources]
        out[f"replica {r}"] = np.asarray(images[pos])
    return out
