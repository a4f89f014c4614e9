"""Running the audit for a run (notebook 03, the sampler benchmark): the judge, the real
reference images, each synthetic cohort (distance, fidelity, diversity, memorization, texture
and detectability), the guidance sweep and its verdict.

The judge is the run's real-only classifier (saved under ``<run>/classifiers/real_only``, which
the classifier experiments reuse as their baseline). Every real reference image comes from the
internal **validation** split: the test split is never read here, so nothing chosen in the
audit or the sweep is tuned on test images. (The judge early-stops on validation loss, so its
AUROC on validation images is, if anything, slightly optimistic; the real baseline of the
fidelity ratio is then a little high, never low.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
from torch import nn
from tqdm.auto import tqdm

from cxrlib.classifier.training import predict_images, train_or_load
from cxrlib.core.cohort import split_rows, training_rows
from cxrlib.core.kinds import GeneratorSetting
from cxrlib.core.layout import RunLayout
from cxrlib.core.schema import AuditSpec, ClassifierSpec, Params
from cxrlib.core.timing import Profile
from cxrlib.data.imagecache import ImageCache
from cxrlib.diffusion.condition import encode_conditions
from cxrlib.diffusion.network import ConditionalUNet, noise_scheduler
from cxrlib.diffusion.samplers import image_seed, timed_generate
from cxrlib.hardware import resolve_precision
from cxrlib.synthetic.audit.detectability import DetectabilityResult, detectability, patient_split
from cxrlib.synthetic.audit.fidelity import (
    FIDELITY_TARGET,
    OVER_SEPARATION,
    DemographicProbes,
    FidelityResult,
    fidelity_comparison,
    fidelity_estimate,
    macro_labels,
)
from cxrlib.synthetic.audit.metrics import (
    MemorizationResult,
    closest_pairs,
    distance_summary,
    distance_with_floor,
    judge_features,
    memorization_audit,
    ms_ssim_diversity,
)
from cxrlib.synthetic.audit.texture import TextureResult, texture_comparison


def sample_rows(rows: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """At most ``n`` rows drawn without replacement (seeded), in their original order."""
    if len(rows) <= n:
        return rows.reset_index(drop=True)
    pick = np.sort(np.random.default_rng(seed).choice(len(rows), n, replace=False))
    return rows.iloc[pick].reset_index(drop=True)


@dataclass
class AuditReference:
    """The judge, its probes, the optional second encoder and the real reference images, and
    the classifier settings the detectability classifier takes its backbone from."""

    judge: nn.Module
    spec: AuditSpec
    classifier: ClassifierSpec
    seed: int
    train_rows: pd.DataFrame  # all real training rows of the diffusion sites
    train_images: np.ndarray
    train_features: np.ndarray
    heldout_rows: pd.DataFrame  # a sample of the internal validation split
    heldout_images: np.ndarray
    heldout_features: np.ndarray
    heldout_scores: np.ndarray
    probes: DemographicProbes
    encoder: Callable[[np.ndarray], np.ndarray] | None = None
    heldout_encoded: np.ndarray | None = None

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Judge features of uint8 images."""
        return judge_features(self.judge, images)

    def distance(self, images: np.ndarray, features: np.ndarray,
                 n: int | None = None) -> pd.DataFrame:
        """:func:`cxrlib.synthetic.audit.metrics.distance_with_floor` in the judge's space and, when
        ``audit.encoder`` is set, in the encoder's; a ``space`` column tells them apart."""
        spec = self.spec
        run = partial(distance_with_floor, n=n, splits=spec.floor_splits, k=spec.prdc_k,
                      seed=self.seed)
        parts = [run(self.heldout_features, features).assign(space="judge")]
        if self.encoder is not None:
            parts.append(run(self.heldout_encoded, self.encoder(images)).assign(
                space=spec.encoder))
        return pd.concat(parts, ignore_index=True)

    def texture(self, images: np.ndarray, rows: pd.DataFrame) -> TextureResult:
        """:func:`cxrlib.synthetic.audit.texture.texture_comparison` of synthetic images (``rows``:
        their source patients) against the held-out real images."""
        return texture_comparison(self.heldout_images, self.heldout_rows["patient_id"], images,
                                  rows["patient_id"], self.spec.n_boot, self.seed)

    def detectability(self, images: np.ndarray, rows: pd.DataFrame) -> DetectabilityResult:
        """:func:`cxrlib.synthetic.audit.detectability.detectability` of synthetic images (``rows``:
        their source patients) against the held-out real images."""
        return detectability(self.heldout_images, self.heldout_rows["patient_id"], images,
                             rows["patient_id"], self.classifier, self.spec.detectability,
                             self.spec.n_boot, self.seed)


def judge_rows(params: Params, manifest: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The judge's training rows (every training row of the diffusion sites) and its
    validation rows (their internal validation split, which also gives the real reference)."""
    train = training_rows(params, manifest)
    sites = sorted(set(train["site"]))
    val = split_rows(manifest, sites, "val")
    if len(val) < 2 * (params.audit.prdc_k + 1):
        raise ValueError(f"the audit needs validation images of sites {sites}; found "
                         f"{len(val)} (set a val fraction in data.sites[].split)")
    return train, val


def audit_reference(params: Params, manifest: pd.DataFrame, cache: ImageCache, run: RunLayout,
                    progress: bool = True) -> AuditReference:
    """Train (or load) the judge, fit the probes, and embed the real reference images.

    The held-out reference is up to ``2 * sampling.audit_images`` validation images of the
    diffusion sites: two disjoint sets of the audited size for the real-vs-real floor, and a
    memorization calibration set at least as large as the audited synthetic set. With
    ``audit.encoder`` set, its weights must be in the local cache (an error otherwise).
    """
    from cxrlib.synthetic.audit.encoders import load_encoder  # torchxrayvision only when asked for

    train, val = judge_rows(params, manifest)
    judge = train_or_load(params.classifier, train, val, cache,
                          run.judge, params.run.seed,
                          progress).model
    heldout = sample_rows(val, 2 * params.sampling.audit_images, params.run.seed)
    heldout_images = cache.load(heldout["image_id"])
    train_images = cache.load(train["image_id"])
    train_features = judge_features(judge, train_images)
    encoder = encoded = None
    if params.audit.encoder:
        device = next(judge.parameters()).device
        encoder = load_encoder(params.audit.encoder, params.audit.encoder_cache, device)
        encoded = encoder(heldout_images)
    return AuditReference(
        judge, params.audit, params.classifier, params.run.seed, train, train_images,
        train_features, heldout, heldout_images, judge_features(judge, heldout_images),
        predict_images(judge, heldout_images),
        DemographicProbes(train_features, train, params.run.seed), encoder, encoded)


@dataclass
class SyntheticAudit:
    """Every audit table for one synthetic cohort (and the real baselines beside them)."""

    distance: pd.DataFrame  # per split, space and comparison
    fidelity: FidelityResult
    diversity: pd.DataFrame
    memorization: MemorizationResult
    closest: pd.DataFrame
    images: np.ndarray
    texture: TextureResult
    detectability: DetectabilityResult
    seconds: dict[str, float]  # wall-clock seconds of each part of the audit

    @property
    def distance_summary(self) -> pd.DataFrame:
        """Mean and range over the floor's splits."""
        return distance_summary(self.distance)


def audit_tables(audits: dict[str, SyntheticAudit]) -> dict[str, pd.DataFrame]:
    """Every cohort's audit tables side by side, by the name notebook 03 saves each under:
    the cohorts as the outer index level (the per-label fidelity: as columns)."""
    def stack(table: Callable[[SyntheticAudit], pd.DataFrame]) -> pd.DataFrame:
        return pd.concat({s: table(a) for s, a in audits.items()}, names=["cohort"])

    return {
        "distance_per_split": stack(lambda a: a.distance),
        "distance": stack(lambda a: a.distance_summary).round(4),
        "conditional_fidelity_per_label": pd.concat(
            {s: a.fidelity.per_label.set_index("label") for s, a in audits.items()},
            axis=1).round(3),
        "fidelity": stack(lambda a: a.fidelity.table().set_index("measure")).round(4),
        "diversity": stack(lambda a: a.diversity.set_index("set")),
        "memorization": pd.DataFrame({s: a.memorization.summary()
                                      for s, a in audits.items()}).T,
        "texture": stack(lambda a: a.texture.bands.set_index("band")),
        "detectability": pd.DataFrame([a.detectability.row() for a in audits.values()],
                                      index=pd.Index(list(audits), name="cohort")),
    }


def per_label_overview(per_label: pd.DataFrame) -> pd.DataFrame:
    """:func:`audit_tables`' ``conditional_fidelity_per_label`` narrowed to fit a page: the
    judge's AUROC on real validation images and each cohort's AUROC against its conditions,
    with positives / negatives and whether the label enters the macro (the full counts stay
    in the saved table)."""
    def counts(frame: pd.DataFrame, side: str) -> pd.Series:
        def whole(v: float) -> str:
            return "-" if pd.isna(v) else str(int(v))

        return (frame[f"{side}_n_pos"].map(whole) + " / "
                + frame[f"{side}_n_neg"].map(whole))

    cohorts = list(dict.fromkeys(per_label.columns.get_level_values(0)))
    first = per_label[cohorts[0]]
    parts = {("real validation", "AUROC"): first["real_auroc"],
             ("real validation", "pos / neg"): counts(first, "real")}
    for cohort in cohorts:
        part = per_label[cohort]
        parts.update({(cohort, "AUROC"): part["synthetic_auroc"],
                      (cohort, "pos / neg"): counts(part, "synthetic"),
                      (cohort, "in macro"): part["in_macro"].astype(bool)})
    return pd.DataFrame(parts)


def memorization_sentences(memorization: pd.DataFrame) -> list[str]:
    """One line per cohort of :func:`audit_tables`' memorization table."""
    return [f"{s}: {int(row['flagged'])} of {int(row['audited'])} audited synthetic images "
            f"flagged as possible copies (95% upper bound {row['share_upper95']:.1%}); "
            f"held-out real images flagged: {row['heldout_share_flagged']:.1%}; "
            f"copies of their own source: {int(row['source_copies'])} of "
            f"{int(row['with_source'])}" for s, row in memorization.iterrows()]


def memorization_verdict(summary: dict[str, float | int]) -> str:
    """The memorization audit's verdict (:meth:`MemorizationResult.summary`), in a few words:
    ``copies of their source`` (a replica closer to its own source row's image than the
    calibrated thresholds allow), ``none found`` (nothing flagged), ``no more than unseen
    images`` (flagged no more often than the held-out real images the thresholds were
    calibrated on, which the generator never saw) or ``more than unseen images`` (inspect the
    closest pairs)."""
    if summary.get("source_copies", 0):
        return "copies of their source"
    if not summary["flagged"]:
        return "none found"
    if summary["share"] <= summary["heldout_share_flagged"]:
        return "no more than unseen images"
    return "more than unseen images"


#: What each fidelity measure reads, for the summary's "what it means".
_READS = {"conditional fidelity": "The judge reads the conditioned findings",
          "sex fidelity": "A sex probe reads the conditioned sex",
          "age fidelity": "An age probe tracks the conditioned age",
          "view fidelity": "A view probe reads the AP/PA view"}


def _fidelity_meaning(row: dict, synthetic: str) -> str:
    """One line on a fidelity row of :meth:`FidelityResult.table`, by its verdict."""
    verdict, over, target = row["verdict"], f"{OVER_SEPARATION:g}x", f"{FIDELITY_TARGET:g}x"
    if verdict == "not estimable":
        return ("Not estimable: no label has enough positives and negatives in both sets."
                if row["measure"] == "conditional fidelity"
                else "Not estimable: one of the sets lacks the values it needs.")
    if verdict == "not judged":
        return (f"Not judged: on real images the {row['statistic']} is not above chance, so "
                "the ratio to real means nothing.")
    tail = {
        "exaggerated": f"more clearly than in real images (the CI lies above {over}), which "
                       "is exaggerated, not a pass",
        "possibly exaggerated": f"possibly more clearly than in real images (above {over}, "
                                f"but the CI does not rule out {over}), so not a plain pass",
        "meets target": f"at least the {target} target",
        f"meets target, CI includes {target}": f"at least the {target} target on the point "
                                               "estimate, though the CI does not rule out less",
        "below target": f"below the {target} target, so the generator loses part of it",
        f"below target, CI includes {target}": f"below the {target} target on the point "
                                               f"estimate, though the CI does not rule out "
                                               f"{target}",
    }[verdict]
    return (f"{_READS[row['measure']]} on {synthetic} {row['ratio']:.2f}x as well as on real "
            f"images: {tail}.")


def audit_summary(audit: SyntheticAudit, synthetic: str = "synthetic images") -> pd.DataFrame:
    """The audit of one cohort in one table a collaborator reads first: one row per measure
    with its estimate, CI, verdict and a line on what it means.

    Notebook 03 shows it at the top of its page, so that the answer comes before the
    details. Rows: conditional fidelity, then sex, age and view fidelity where estimable
    (synthetic and real statistic, their ratio and
    :func:`~cxrlib.synthetic.audit.fidelity.fidelity_verdict`: a ratio above 1.05x real reads
    "possibly exaggerated", or "exaggerated" when its CI lies wholly above 1.05); texture
    (power in the top frequency band, synthetic and real, their ratio,
    :meth:`TextureResult.verdict`); detectability (AUROC of a
    real-versus-synthetic classifier, :meth:`DetectabilityResult.verdict`); memorization
    (share of audited synthetic images flagged as near-copies of a training image beside the
    held-out real images' share, with its one-sided 95% upper bound,
    :func:`memorization_verdict`). The verdicts come from the rules of the modules that
    compute each measure; the numbers are the ones the detailed tables below hold.

    Columns: measure, synthetic, real, ratio or value, the CI (as text, named for its level),
    verdict, what it means; a fidelity ratio whose real value is not above chance is left
    blank (it means nothing). ``synthetic`` names the images in the sentences.
    """
    fidelity = audit.fidelity
    ci = f"{1 - fidelity.alpha:.0%} CI"

    def interval(low: float, high: float) -> str:
        return "-" if not (np.isfinite(low) and np.isfinite(high)) else \
            f"{low:.3f} to {high:.3f}"

    rows = []
    for row in fidelity.table().to_dict("records"):
        estimable = np.isfinite(row["synthetic"]) and np.isfinite(row["real"])
        if not estimable and row["measure"] != "conditional fidelity":
            continue
        judged = row["verdict"] not in ("not judged", "not estimable")  # else no ratio
        rows.append({"measure": f"{row['measure']} ({row['statistic']}, ratio to real)",
                     "synthetic": row["synthetic"], "real": row["real"],
                     "ratio or value": row["ratio"] if judged else np.nan,
                     ci: interval(row["ratio_ci_low"], row["ratio_ci_high"]) if judged else "-",
                     "verdict": row["verdict"],
                     "what it means": _fidelity_meaning(row, synthetic)})
    texture, hf = audit.texture, audit.texture.hf
    images = synthetic[:1].upper() + synthetic[1:]
    rows.append({
        "measure": "texture (power at the finest detail, ratio to real)",
        "synthetic": hf["synthetic_power"], "real": hf["real_power"],
        "ratio or value": hf["ratio"], ci: interval(hf["ci_low"], hf["ci_high"]),
        "verdict": texture.verdict(),
        "what it means": f"{images} have {hf['ratio']:.2f}x the real power at "
                         f"{hf['f_low']:.2f}-{hf['f_high']:.2f} cycles/pixel: 1 = real "
                         "texture, below 1 = too smooth, above 1 = too noisy."})
    detect = audit.detectability
    rows.append({
        "measure": "detectability (AUROC, real vs synthetic)", "synthetic": np.nan,
        "real": np.nan, "ratio or value": detect.auroc,
        ci: interval(detect.ci_low, detect.ci_high), "verdict": detect.verdict(),
        "what it means": f"A classifier trained to tell {synthetic} from real ones scores "
                         f"AUROC {detect.auroc:.2f} on {detect.n_scored} images (both kinds) "
                         "of patients it never saw: 0.5 = cannot tell them apart, 1 = always "
                         "can."})
    memo = audit.memorization.summary()
    copies = (f"; {int(memo['source_copies'])} of {int(memo['with_source'])} are copies of "
              "their own source" if memo.get("with_source") else "")
    rows.append({
        "measure": "memorization (share flagged as near-copies)", "synthetic": memo["share"],
        "real": memo["heldout_share_flagged"], "ratio or value": memo["share"],
        ci: f"up to {memo['share_upper95']:.3f}", "verdict": memorization_verdict(memo),
        "what it means": f"{int(memo['flagged'])} of {int(memo['audited'])} {synthetic} are "
                         "closer to a training image (in pixels or judge features) than all "
                         f"but {memo['target_rate_per_space']:.0%} of unseen real images "
                         f"come; unseen real images: {memo['heldout_share_flagged']:.1%} "
                         f"flagged{copies}."})
    return pd.DataFrame(rows)


def audit_synthetic(ref: AuditReference, synth: pd.DataFrame, synth_cache: ImageCache,
                    n_images: int, seed: int = 0) -> SyntheticAudit:
    """Distance, conditional and demographic fidelity, diversity, memorization, texture and
    detectability of a cohort, with the seconds each part took.

    At most ``min(n_images, held-out images)`` synthetic images are audited, so that the
    memorization calibration set is at least as large as the audited set.
    """
    timer = Profile()
    spec = ref.spec
    with timer.part("distance and fidelity"):
        rows = sample_rows(synth, min(n_images, len(ref.heldout_rows)), seed)
        images = synth_cache.load(rows["image_id"])
        feats = ref.embed(images)
        fidelity = fidelity_comparison(rows, predict_images(ref.judge, images), feats,
                                       ref.heldout_rows, ref.heldout_scores,
                                       ref.heldout_features, ref.probes, spec.min_per_class,
                                       spec.n_boot, seed)
        distance = ref.distance(images, feats)
    with timer.part("diversity"):
        # Replicas of one source vs random pairs of different real validation images.
        counts = synth["source_image_id"].map(synth["source_image_id"].value_counts())
        multi = synth[counts.to_numpy() > 1]
        keep = multi["source_image_id"].drop_duplicates().iloc[: max(1, len(rows) // 4)]
        reps = multi[multi["source_image_id"].isin(keep)]
        div = ms_ssim_diversity(synth_cache.load(reps["image_id"]),
                                reps["source_image_id"].to_numpy())
        pair_ids = np.random.default_rng(seed).permutation(len(ref.heldout_images)) // 2
        real_div = ms_ssim_diversity(ref.heldout_images, pair_ids)
        diversity = pd.DataFrame({
            "set": ["synthetic replicas of one condition", "real: random pairs of images"],
            "groups": [len(div), len(real_div)],
            "mean MS-SSIM": [div["ms_ssim"].mean() if len(div) else np.nan,
                             real_div["ms_ssim"].mean()],
        })
    with timer.part("memorization"):
        position = pd.Series(np.arange(len(ref.train_rows)), index=ref.train_rows["image_id"])
        source = rows["source_image_id"].map(position).fillna(-1).to_numpy(dtype=np.int64)
        memo = memorization_audit(images, ref.train_images, ref.train_features,
                                  ref.heldout_images, ref.embed, spec.memorization_rate, source)
    with timer.part("texture"):
        texture = ref.texture(images, rows)
    with timer.part("detectability"):
        detect = ref.detectability(images, rows)
    return SyntheticAudit(distance, fidelity, diversity, memo, closest_pairs(memo), images,
                          texture, detect, timer.seconds)


def realism_entries(audit: SyntheticAudit) -> dict[str, dict[str, object]]:
    """``texture_hf_ratio`` and ``detectability_auroc`` of one cohort's audit for
    :func:`cxrlib.core.summary.update_summary`."""
    return {"texture_hf_ratio": audit.texture.summary_entry(),
            "detectability_auroc": audit.detectability.summary_entry()}


def score_setting(ref: AuditReference, rows: pd.DataFrame, images: np.ndarray,
                  labels: list[str]) -> dict[str, float]:
    """One generated set (the same conditions for every setting) scored for the sweep and the
    sampler benchmark: distance (mean over the floor's splits, judge space), macro
    conditional fidelity over ``labels`` with its CI, the sex and view probes' AUROCs, the
    texture's high-frequency power ratio and the detectability AUROC, each with its CI."""
    feats = ref.embed(images)
    dist = distance_summary(ref.distance(images, feats).query("space == 'judge'"))
    syn = dist[dist["comparison"] == "real vs synthetic"].iloc[0]
    macro = fidelity_estimate("macro", rows, predict_images(ref.judge, images), labels,
                              ref.spec.n_boot, ref.seed)
    return {"n": int(syn["n"]), "dim": int(syn["dim"]),
            **{m: float(syn[m]) for m in ("fid", "kid_mean", "precision", "recall", "density",
                                          "coverage")},
            "fidelity_macro_auroc": macro.value, "fidelity_ci_low": macro.ci_low,
            "fidelity_ci_high": macro.ci_high, **_probe_columns(ref, rows, feats),
            **_realism_columns(ref.texture(images, rows), ref.detectability(images, rows))}


def _probe_columns(ref: AuditReference, rows: pd.DataFrame,
                   features: np.ndarray) -> dict[str, float]:
    """The sweep's ``sex_auroc`` and ``view_auroc``: the probes on images' judge features
    against their rows' sex and view."""
    probed = ref.probes.predict(features, rows)
    return {f"{kind}_auroc": fidelity_estimate(kind, rows, probed, (), ref.spec.n_boot,
                                               ref.seed).value for kind in ("sex", "view")}


def _realism_columns(texture: TextureResult,
                     detect: DetectabilityResult | None) -> dict[str, float]:
    """The sweep's texture and detectability columns (NaN without a detectability)."""
    hf = texture.hf
    auroc = (detect.auroc, detect.ci_low, detect.ci_high) if detect else (np.nan,) * 3
    return {"texture_hf_ratio": float(hf["ratio"]), "texture_ci_low": float(hf["ci_low"]),
            "texture_ci_high": float(hf["ci_high"]), "detectability_auroc": auroc[0],
            "detectability_ci_low": auroc[1], "detectability_ci_high": auroc[2]}


def real_row(ref: AuditReference, n: int, labels: list[str]) -> dict[str, float]:
    """The sweep's reference row: the real-vs-real floor at ``n``, the judge's macro AUROC
    and the sex- and view-probe AUROCs on the held-out real images, and the texture ratio of
    one half of their patients against the other (1 up to sampling). Its detectability is
    left NaN: a real-vs-real classifier would cost another training to show chance (0.5),
    which the tests check instead."""
    dist = distance_summary(distance_with_floor(
        ref.heldout_features, ref.heldout_features, n=n, splits=ref.spec.floor_splits,
        k=ref.spec.prdc_k, seed=ref.seed))
    floor = dist[dist["comparison"] == "real vs real"].iloc[0]
    macro = fidelity_estimate("macro", ref.heldout_rows, ref.heldout_scores, labels,
                              ref.spec.n_boot, ref.seed)
    groups = ref.heldout_rows["patient_id"].to_numpy()
    half = patient_split(groups, 0.5, ref.seed)
    texture = texture_comparison(ref.heldout_images[~half], groups[~half],
                                 ref.heldout_images[half], groups[half], ref.spec.n_boot,
                                 ref.seed)
    return {"sampler": "real", "steps": 0, "guidance": np.nan, "n": int(floor["n"]),
            "dim": int(floor["dim"]),
            **{m: float(floor[m]) for m in ("fid", "kid_mean", "precision", "recall",
                                            "density", "coverage")},
            "fidelity_macro_auroc": macro.value, "fidelity_ci_low": macro.ci_low,
            "fidelity_ci_high": macro.ci_high,
            **_probe_columns(ref, ref.heldout_rows, ref.heldout_features),
            **_realism_columns(texture, None), "sec_per_image": 0.0}


def sweep_conditions(params: Params, ref: AuditReference, n: int, with_view: bool,
                     key: str = "sweep") -> tuple[pd.DataFrame, np.ndarray, list[int], list[str]]:
    """Conditions (real training rows), their vectors (with the view for a model trained
    with it: :attr:`ConditionalUNet.conditions_on_view`) and seeds, and the macro's labels
    (:func:`cxrlib.synthetic.audit.fidelity.macro_labels` on these rows and the held-out images)."""
    rows = sample_rows(ref.train_rows, min(n, len(ref.heldout_rows) // 2), params.run.seed + 1)
    cond = encode_conditions(rows, params.diffusion.nan_label_value, with_view)
    seeds = [image_seed(params.run.seed, f"{key}/{i}", 0) for i in range(len(rows))]
    labels, _ = macro_labels(rows, ref.heldout_rows, min_per_class=ref.spec.min_per_class)
    return rows, cond, seeds, labels


def guidance_sweep(params: Params, ref: AuditReference, model: ConditionalUNet,
                   progress: bool = True, profile: Profile | None = None) -> pd.DataFrame:
    """Guidance w x sampler x steps on the same conditions and seeds, each scored by
    :func:`score_setting` with its seconds per image; first row: the real reference.
    ``profile`` gets the seconds of generating and of scoring."""
    spec = params.sampling
    rows, cond, seeds, labels = sweep_conditions(params, ref, spec.sweep_images,
                                                 model.conditions_on_view)
    sched = noise_scheduler(params.diffusion)
    profile = profile or Profile()
    with profile.part("guidance sweep: scoring"):
        out = [real_row(ref, len(rows), labels)]
    grid = spec.sweep_grid()
    for sampler, steps, w in tqdm(grid, desc="guidance sweep", disable=not progress):
        with profile.part("guidance sweep: generation"):
            images, sec = timed_generate(model, sched, cond, seeds, sampler, steps, w,
                                         spec.guidance_rescale, spec.batch_size,
                                         precision=resolve_precision(spec.mixed_precision))
        with profile.part("guidance sweep: scoring"):
            out.append({"sampler": sampler, "steps": steps, "guidance": w,
                        **score_setting(ref, rows, images, labels), "sec_per_image": sec})
    table = pd.DataFrame(out)
    table.attrs["labels"] = labels
    # what the cohorts were generated with, for sweep_verdict to compare with its choice
    table.attrs["generated"] = {"sampler": spec.sampler, "steps": spec.steps,
                                "guidance": spec.guidance}
    return table


def _setting(row: pd.Series) -> str:
    return f"{row['sampler']} with {int(row['steps'])} steps at guidance w {row['guidance']:g}"


def _generated_sentence(generated: dict | None, best: pd.Series) -> str:
    """Whether the run's cohorts were generated at the setting the sweep chose (issue 18:
    generate at the sweep's choice, or say why not)."""
    if not generated:
        return ""
    used = pd.Series(generated)
    if (used["sampler"] == best["sampler"] and int(used["steps"]) == int(best["steps"])
            and float(used["guidance"]) == float(best["guidance"])):
        return f"The synthetic cohorts were generated at this setting ({_setting(used)})."
    return (f"The synthetic cohorts were generated with {_setting(used)} (`sampling:` in the "
            f"parameter file), not the chosen setting: the sweep runs on validation conditions "
            f"after generation, so set `sampling.sampler`, `steps` and `guidance` to "
            f"{_setting(best)} and run notebook 03 again to generate at it.")


def sweep_verdict(table: pd.DataFrame, tolerance: float = 0.05) -> str:
    """Which setting the data support, without rewarding lower diversity.

    A setting's diversity is the lower of its recall and coverage; eligible settings have a
    diversity within ``tolerance`` of the most diverse setting tried (so at least that one is
    eligible). Among them the highest macro conditional fidelity leads, and every eligible
    setting whose fidelity lies inside its 95% CI ties with it; of those the one a
    real-versus-synthetic classifier tells apart least (lowest detectability AUROC) is chosen,
    then the faster: conditional fidelity first, realism among settings it cannot separate.
    Settings with higher fidelity that lost diversity are named, not chosen. FID is reported
    with n and the feature dimension beside its real-vs-real floor, but decides nothing.
    """
    real = table[table["sampler"] == "real"].iloc[0]
    runs = table[table["sampler"] != "real"].copy()
    diversity = runs[["recall", "coverage"]].min(axis=1)
    most = runs.loc[diversity.idxmax()]
    ok = diversity >= diversity.max() - tolerance
    eligible = runs[ok]
    lines = [f"Rule: a setting's diversity is the lower of its recall and coverage; among "
             f"settings within {tolerance:g} of the most diverse ({_setting(most)}: recall "
             f"{most['recall']:.2f}, coverage {most['coverage']:.2f}; real vs real "
             f"{real['recall']:.2f}, {real['coverage']:.2f}), pick the highest macro "
             "conditional fidelity, then the fastest."
             + (f" The macro averages {', '.join(table.attrs['labels'])}."
                if table.attrs.get("labels") else "")]
    if eligible["fidelity_macro_auroc"].notna().any():
        top = eligible.sort_values(["fidelity_macro_auroc", "sec_per_image"],
                                   ascending=[False, True]).iloc[0]
        within = eligible[eligible["fidelity_macro_auroc"] >= top["fidelity_ci_low"]]
        best = top
        if within["detectability_auroc"].notna().any():  # realism breaks the tie
            best = within.assign(realism=within["detectability_auroc"].fillna(np.inf)) \
                .sort_values(["realism", "sec_per_image"]).iloc[0]
        lines.append(
            f"Chosen: {_setting(best)}: macro fidelity AUROC {best['fidelity_macro_auroc']:.3f} "
            f"(95% CI {best['fidelity_ci_low']:.3f}-{best['fidelity_ci_high']:.3f}; the judge "
            f"on real validation images {real['fidelity_macro_auroc']:.3f}), recall "
            f"{best['recall']:.2f}, coverage {best['coverage']:.2f}, "
            f"{best['sec_per_image']:.3f} s/image; high-frequency power ratio "
            f"{best['texture_hf_ratio']:.3g} ({best['texture_ci_low']:.3g}-"
            f"{best['texture_ci_high']:.3g}; 1 = real), detectability AUROC "
            f"{best['detectability_auroc']:.3f} ({best['detectability_ci_low']:.3f}-"
            f"{best['detectability_ci_high']:.3f}; 0.5 = indistinguishable).")
        if best.name != top.name:
            lines.append(
                f"It ties the highest fidelity ({_setting(top)}: "
                f"{top['fidelity_macro_auroc']:.3f}, CI low {top['fidelity_ci_low']:.3f}) and "
                f"is harder to tell from real images (detectability "
                f"{best['detectability_auroc']:.3f} against {top['detectability_auroc']:.3f}).")
        cheap = within.sort_values("sec_per_image").iloc[0]
        if cheap["sec_per_image"] < best["sec_per_image"]:
            lines.append(f"Cheapest eligible setting inside that CI: {_setting(cheap)} "
                         f"({cheap['fidelity_macro_auroc']:.3f}, "
                         f"{cheap['sec_per_image']:.3f} s/image).")
        passed = runs[~ok & (runs["fidelity_macro_auroc"] > top["fidelity_macro_auroc"])]
        if len(passed):
            lines.append("Passed over for lost diversity despite higher fidelity: "
                         + "; ".join(f"{_setting(r)} ({r['fidelity_macro_auroc']:.3f}, recall "
                                     f"{r['recall']:.2f}, coverage {r['coverage']:.2f})"
                                     for _, r in passed.iterrows()) + ".")
    else:
        best = eligible.sort_values(["coverage", "sec_per_image"],
                                    ascending=[False, True]).iloc[0]
        lines.append(f"No label has at least the required positives and negatives among the "
                     f"{int(real['n'])} sweep conditions and the validation images, so "
                     f"conditional fidelity cannot decide; the most diverse setting is "
                     f"{_setting(best)} (coverage {best['coverage']:.2f}).")
    lines.append(_generated_sentence(table.attrs.get("generated"), best))
    by_scale = runs.groupby("guidance")[["fidelity_macro_auroc", "coverage"]].mean()
    hi, lo = by_scale.index.max(), by_scale.index.min()
    if hi != lo:
        lines.append(
            f"Averaged over samplers and steps, guidance w {lo:g} -> {hi:g} moves macro fidelity "
            f"{by_scale.loc[lo, 'fidelity_macro_auroc']:.3f} -> "
            f"{by_scale.loc[hi, 'fidelity_macro_auroc']:.3f} and coverage "
            f"{by_scale.loc[lo, 'coverage']:.2f} -> {by_scale.loc[hi, 'coverage']:.2f}.")
    lines.append(f"FID at n = {int(real['n'])} in d = {int(real['dim'])} judge dimensions "
                 f"(rank-deficient when n < d, so it favours low-variance sets): real vs real "
                 f"{real['fid']:.3g}, settings {runs['fid'].min():.3g}-{runs['fid'].max():.3g}.")
    return " ".join(line for line in lines if line)


#: The cheap measures of each generator setting (:func:`setting_measures`), by column, with
#: the direction that means closer to real: +1 higher is better, -1 lower is better, 0 the
#: closer to 1 the better (a ratio to real).
SETTING_MEASURES: dict[str, tuple[str, int]] = {
    "fidelity_ratio": ("conditional fidelity (x real)", +1),
    "fid": ("FID (judge features)", -1),
    "kid": ("KID (judge features)", -1),
    "frd": ("FRD (radiomics)", -1),
    "precision": ("precision", +1),
    "recall": ("recall", +1),
    "coverage": ("coverage", +1),
    "texture_hf_ratio": ("texture (x real at the finest detail)", 0),
    "detectability_auroc": ("detectability (AUROC)", -1),
    "memorized_share": ("share flagged as near-copies", -1),
}


def setting_measures(ref: AuditReference,
                     cohorts: dict[GeneratorSetting, tuple[pd.DataFrame, ImageCache]],
                     n_images: int, seed: int, progress: bool = True,
                     frd: Callable[[np.ndarray, np.ndarray], float] | None = None,
                     frd_images: int = 150) -> pd.DataFrame:
    """The audit's measures (:func:`audit_synthetic`) of each generator setting's cohort,
    one row per setting, on the same planned rows (the same conditions and seeds: cohorts of
    :func:`cxrlib.synthetic.cohorts.setting_plan` share the run's plan order), beside the
    Fréchet Radiomics Distance to the held-out real images when ``frd`` is given (on the
    first ``frd_images`` of each set: radiomic features take about 0.1 s per small image). The
    columns: setting (its label), step, guidance, n, :data:`SETTING_MEASURES` with
    ``fidelity_ci_low``/``high``, and ``seconds``."""
    rows = []
    for setting, (cohort, cache) in tqdm(cohorts.items(), desc="generator settings' audit",
                                         disable=not progress):
        timer = Profile()
        audit = audit_synthetic(ref, cohort, cache, n_images, seed)
        fidelity = audit.fidelity.table().iloc[0]
        dist = audit.distance_summary
        syn = dist[(dist["comparison"] == "real vs synthetic")
                   & (dist["space"] == "judge")].iloc[0]
        with timer.part("frd"):
            radiomics = (frd(ref.heldout_images[:frd_images], audit.images[:frd_images])
                         if frd else np.nan)
        rows.append({
            "setting": setting.label, "step": setting.step, "guidance": setting.guidance,
            "n": len(audit.images),
            "fidelity_ratio": fidelity["ratio"], "fidelity_ci_low": fidelity["ratio_ci_low"],
            "fidelity_ci_high": fidelity["ratio_ci_high"], "fid": float(syn["fid"]),
            "kid": float(syn["kid_mean"]), "frd": radiomics,
            **{m: float(syn[m]) for m in ("precision", "recall", "coverage")},
            "texture_hf_ratio": float(audit.texture.hf["ratio"]),
            "detectability_auroc": audit.detectability.auroc,
            "memorized_share": audit.memorization.summary()["share"],
            "seconds": sum(audit.seconds.values()) + timer.seconds.get("frd", 0.0)})
    return pd.DataFrame(rows)
