"""The parameter schema: every section and key of a parameter file, typed and validated.

A run is described by one YAML file in ``params/``. :func:`cxrlib.core.config.load_params` parses it
with ``yaml.safe_load`` and validates it against :class:`Params` before any work starts: an unknown
key, a wrong type or a missing required path raises :class:`cxrlib.core.errors.ParamsError` naming
the file and the key. The validated parameters round-trip to JSON and are saved in the run folder,
so every output can be traced to the exact configuration that made it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    Tag,
    model_serializer,
    model_validator,
)

from cxrlib.core.kinds import ORACLE_STRATEGIES, GeneratorSetting, Kind
from cxrlib.core.labels import CHEXPERT_LABELS, RACE_VALUES, VIEW_CODES

Split = Literal["train", "val", "test"]


View = Literal["AP", "PA", "LATERAL", "OTHER"]


PositiveInt = Annotated[int, Field(gt=0)]


Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


#: The groups subgroup analyses and rebalancing split by (:data:`cxrlib.core.cohort.SUBGROUPS`).
Subgroup = Literal["sex", "age_band", "race", "view"]


#: Classifier-free guidance weight w, continuous in w: eps = null + (1 + w) (cond - null), i.e.
#: (1 + w) cond - w null. w = 0 is the plain conditional model, w = -1 the unconditional one.
#: The authors' scale s (out = null + s (cond - null), with s = 0 meaning the plain conditional
#: model) maps to w = s - 1 for s > 0, and their s = 0 to w = 0.
Guidance = Annotated[float, Field(ge=-1.0)]


#: Precision of a stage: Accelerate's ``mixed_precision`` values, or ``auto``
#: (:func:`cxrlib.hardware.resolve_precision`: bf16 autocast on GPUs and on CPUs with bf16
#: units, fp32 elsewhere).
MixedPrecision = Literal["no", "fp16", "bf16", "auto"]


def _renamed_guidance(data: Any, section: str, renamed: dict[str, str]) -> Any:
    """A clear error for the guidance keys of files written before the scale became w."""
    old = sorted(set(renamed) & set(data)) if isinstance(data, dict) else []
    if old:
        raise ValueError(
            "; ".join(f"{section}.{k} is now {section}.{renamed[k]}" for k in old) +
            ", on a continuous scale: w = s - 1 for the old scale s > 0, and s = 0 stays 0 "
            "(the plain conditional model)")
    return data


class _Strict(BaseModel):
    """Base for every section: unknown keys are errors, and types are not coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SplitSpec(_Strict):
    """How a site's rows are assigned to train/val/test, always by patient."""

    mode: Literal["random", "official"] = "random"
    fractions: dict[Split, Fraction] = Field(
        default_factory=lambda: {"train": 0.7, "val": 0.1, "test": 0.2}
    )
    seed: int = 0
    #: Splits that must hold at least one image after filtering (an empty one is an error).
    required: list[Split] = Field(default_factory=lambda: ["train", "val", "test"])

    @model_validator(mode="after")
    def _fractions_sum(self) -> SplitSpec:
        total = sum(self.fractions.values())
        if self.mode == "random" and abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1, got {total:.4f}")
        return self


class FileSplitSpec(_Strict):
    """A split read from files, one CSV per split (gzip allowed), as the authors released
    theirs (``cxp_tr.csv.gz``: ``Path,PID``). Rows of the site that no file names are dropped
    and counted; rows a file names that the site lacks are counted and the first few named; a
    patient in two splits is an error naming the patient."""

    mode: Literal["file"]
    #: One file per split: absolute, relative to the project folder, or ``{xrv}/...``.
    files: dict[Split, str] = Field(min_length=1)
    #: The column naming each image by path, matched on the part after its first component
    #: against the end of the site's image paths (``CheXpert-v1.0/train/patient00001/...``
    #: matches ``CheXpert-v1.0-small/train/patient00001/...``) ...
    path_column: str | None = None
    #: ... or by id, matched against the site's image ids (MIMIC: ``dicom_id``).
    id_column: str | None = None
    #: The files' patient column (the patient-overlap check and the validation draw use it).
    patient_column: str
    #: Validation = the training file's rows whose ``fold_column`` equals ``val_fold`` ...
    val_fold: int | None = None
    fold_column: str = "Fold"
    #: ... or a seeded draw (``seed``) of this share of the training file's patients.
    val_fraction: Annotated[float, Field(gt=0, lt=1)] | None = None
    seed: int = 0
    #: Splits that must hold at least one image after filtering (an empty one is an error).
    required: list[Split] = Field(default_factory=lambda: ["train", "val", "test"])

    @model_validator(mode="after")
    def _one_way_each(self) -> FileSplitSpec:
        if (self.path_column is None) == (self.id_column is None):
            raise ValueError("split mode 'file' needs exactly one of path_column (images named "
                             "by path) and id_column (images named by id)")
        ways = [k for k, on in (("files.val", "val" in self.files),
                                ("val_fold", self.val_fold is not None),
                                ("val_fraction", self.val_fraction is not None)) if on]
        if len(ways) > 1:
            raise ValueError(f"split mode 'file': validation comes from one of files.val, "
                             f"val_fold and val_fraction; got {ways}")
        if ways and ways[0] != "files.val" and "train" not in self.files:
            raise ValueError(f"split mode 'file': {ways[0]} draws validation from the training "
                             "file, so files needs a 'train' entry")
        return self

    @property
    def key_column(self) -> str:
        """The column that names an image (path or id)."""
        return self.path_column or self.id_column or ""


def _split_kind(value: Any) -> str | None:
    """Which split class a ``split`` section is: by its ``mode`` (``random`` when absent)."""
    mode = value.get("mode", "random") if isinstance(value, dict) else getattr(value, "mode", None)
    return {"random": "drawn", "official": "drawn", "file": "file"}.get(mode)


#: The tags of :data:`AnySplit`'s variants (pydantic puts them in an error's location, after
#: ``split``; error messages leave them out).
SPLIT_TAGS: tuple[str, ...] = ("drawn", "file")

#: A site's split: drawn at random or official (:class:`SplitSpec`), or read from files
#: (:class:`FileSplitSpec`), told apart by ``mode``.
AnySplit = Annotated[
    Annotated[SplitSpec, Tag(SPLIT_TAGS[0])] | Annotated[FileSplitSpec, Tag(SPLIT_TAGS[1])],
    Discriminator(_split_kind, custom_error_type="split_mode",
                  custom_error_message="split.mode must be 'random', 'official' or 'file'"),
]


def _omit_later_defaults(model: BaseModel, dumped: dict[str, Any],
                         keys: tuple[str, ...]) -> dict[str, Any]:
    """``dumped`` without the ``keys`` whose value is their default: keys added to a section
    after run folders were written, so that older parameters serialise byte for byte as
    before (a run folder's ``params.json`` and every record derived from it)."""
    for key in keys:
        if key in dumped and getattr(model, key) == type(model).model_fields[key].default:
            del dumped[key]
    return dumped


class PhantomSpec(_Strict):
    """An embedded phantom site: real metadata rows rendered as procedural radiographs."""

    metadata: Literal["chexpert", "nih", "padchest"]
    style: Literal["chexpert", "nih", "padchest"]
    n_images: PositiveInt
    #: Longest side of the rendered images, in pixels (the cache resizes to data.resolution).
    image_size: PositiveInt = 64


class MimicFiles(_Strict):
    """File names inside a MIMIC-CXR-JPG root (defaults are the 2.0.0 release names)."""

    metadata: str = "mimic-cxr-2.0.0-metadata.csv.gz"
    labels: str = "mimic-cxr-2.0.0-chexpert.csv.gz"
    split: str = "mimic-cxr-2.0.0-split.csv.gz"
    #: MIMIC-IV ``patients.csv`` and ``admissions.csv`` (absolute, or relative to root).
    patients: str | None = None
    admissions: str | None = None


class ColumnMap(_Strict):
    """Column names of a generic site CSV; ``labels`` maps CheXpert names to CSV columns."""

    path: str
    patient_id: str
    image_id: str | None = None
    study_id: str | None = None
    view: str | None = None
    sex: str | None = None
    age: str | None = None
    race: str | None = None
    split: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)


class SiteSpec(_Strict):
    """One data source. ``reader`` picks how it is read; every reader yields the same manifest."""

    site: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    reader: Literal["phantom", "chexpert", "mimic", "csv"]
    role: Literal["internal", "external"] = "internal"
    #: Folder holding the CSVs and images (chexpert, mimic, csv readers).
    root: str | None = None
    #: CSV files inside root (chexpert: train.csv and valid.csv; csv reader: one file).
    csv_files: list[str] = Field(default_factory=lambda: ["train.csv", "valid.csv"])
    #: CheXpert demographics file (PATIENT, GENDER, AGE_AT_CXR, PRIMARY_RACE, ETHNICITY).
    demographics: str | None = None
    mimic: MimicFiles = Field(default_factory=MimicFiles)
    columns: ColumnMap | None = None
    phantom: PhantomSpec | None = None
    split: AnySplit = Field(default_factory=SplitSpec)
    #: This site's blank (unmentioned) labels, overriding ``data.blank``: ``nan`` where a
    #: blank means "not annotated" (NIH has no Fracture column), so the label is masked in
    #: training and left out of the site's macro AUROC instead of read as absent.
    blank: Literal["nan", "zero"] | None = None

    @model_validator(mode="after")
    def _reader_needs(self) -> SiteSpec:
        if self.reader == "phantom" and self.phantom is None:
            raise ValueError("reader 'phantom' needs a 'phantom' section")
        if self.reader in ("chexpert", "mimic", "csv") and not self.root:
            raise ValueError(f"reader '{self.reader}' needs 'root' (the dataset folder)")
        if self.reader == "csv" and self.columns is None:
            raise ValueError("reader 'csv' needs a 'columns' mapping")
        return self


class DataSpec(_Strict):
    """Data preparation: sources, label policy, view filter, resolution of the image cache."""

    resolution: PositiveInt = 64
    #: CheXpert's uncertain (-1) labels: u-ones -> 1, u-zeros -> 0, u-ignore -> NaN (masked).
    uncertainty: Literal["u-ones", "u-zeros", "u-ignore"] = "u-ignore"
    #: Blank (unmentioned) labels: NaN (unknown, masked) or 0 (negative).
    blank: Literal["nan", "zero"] = "zero"
    frontal_only: bool = True
    views: list[View] = Field(default_factory=lambda: ["AP", "PA"])
    #: Rows whose age is 0 (CheXpert's code for an unknown age): dropped, or kept as the
    #: authors' split keeps them (3 images of their CheXpert test file).
    age_zero: Literal["drop", "keep"] = "drop"
    #: Read CSVs only: no image files needed, no cache built (e.g. torchxrayvision's CSV).
    metadata_only: bool = False
    #: Race marginals for phantom sites (race is not in the public metadata files).
    race_marginals: dict[str, Fraction] = Field(
        default_factory=lambda: {
            "White": 0.56,
            "Asian": 0.16,
            "Black/African American": 0.06,
            "Pacific Islander": 0.01,
            "American Indian/Alaska Native": 0.01,
            "Other": 0.1,
            "Unknown": 0.1,
        }
    )
    #: Processes that decode images into the cache.
    workers: PositiveInt = 2
    sites: list[SiteSpec] = Field(min_length=1)

    #: Keys added after run folders were first written (:func:`_omit_later_defaults`).
    LATER_KEYS: ClassVar[tuple[str, ...]] = ("age_zero",)

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _omit_later_defaults(self, handler(self), self.LATER_KEYS)

    @model_validator(mode="after")
    def _check(self) -> DataSpec:
        names = [s.site for s in self.sites]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"site names must be unique, repeated: {dupes}")
        unknown = sorted(set(self.race_marginals) - set(RACE_VALUES))
        if unknown:
            raise ValueError(f"race_marginals: unknown groups {unknown}; use {list(RACE_VALUES)}")
        if not any(s.role == "internal" for s in self.sites):
            raise ValueError("at least one site needs role 'internal'")
        return self

    def kept_views(self) -> set[str]:
        """The views data preparation keeps: ``views``, less the lateral and other views
        with ``frontal_only``."""
        return set(self.views) - ({"LATERAL", "OTHER"} if self.frontal_only else set())


class AugmentSpec(_Strict):
    """Training-time augmentations (FACTS.md values by default); a probability of 0 switches
    one off. Applied per image on the device, after loading, so the loader stays cheap."""

    hflip: Fraction = 0.5
    vflip: Fraction = 0.5
    noise_p: Fraction = 0.5
    #: Gaussian noise standard deviation in model units ([-1, 1] images).
    noise_std: Annotated[float, Field(ge=0)] = 0.3
    affine_p: Fraction = 0.5
    #: Largest rotation in radians, relative scale change, and shift as a share of the side
    #: (the paper's 12 px at 256 px is 0.047).
    rotation: Annotated[float, Field(ge=0)] = 0.4
    scale: Annotated[float, Field(ge=0, lt=1)] = 0.1
    shift: Fraction = 0.047
    #: Share of batches mixed by Mixup or CutMix (half each), Beta(alpha, alpha) weights.
    mix_p: Fraction = 0.5
    mix_alpha: Annotated[float, Field(gt=0)] = 1.0
    #: Label smoothing of the training targets (0 -> eps/2, 1 -> 1 - eps/2).
    label_smoothing: Fraction = 0.1


class ClassifierSpec(_Strict):
    """A timm image classifier with 14 outputs, shared by the audit's judge (notebook 03) and
    the classifier experiments (notebook 04)."""

    backbone: str = "resnet18"
    #: Initial weights: ``false`` (random), ``true`` (timm's default weights of ``backbone``),
    #: a timm weight name (``convnext_base.fb_in22k_ft_in1k``; the authors'
    #: ``convnext_base_in22ft1k`` is timm's old name for it), or an absolute path to a weights
    #: file (safetensors, or a state dict read with ``weights_only``). Names are read from the
    #: local Hugging Face cache only; nothing is downloaded at run time, and missing weights fail
    #: when the model is built, with the command that fetches them.
    pretrained: bool | str = False
    #: ``steps``: every arm gets the same optimizer steps (``max_steps`` in ``epochs`` rounds;
    #: compute-matched, answers "is a synthetic image worth more than another pass over a real
    #: one at a fixed budget"). ``converged`` (the paper's): every arm trains until early
    #: stopping on its validation loss, validated every ``eval_every`` steps, under a
    #: ``max_steps`` budget no arm should reach (one that does is flagged not converged).
    protocol: Literal["steps", "converged"] = "steps"
    #: Passes over the training set; with ``max_steps`` (protocol steps), validation rounds.
    epochs: PositiveInt = 10
    #: Optimizer-step budget (None = ``epochs`` passes over the data). Under protocol steps
    #: every training set gets the same number of steps whatever its size, validated every
    #: max_steps / epochs steps; under converged it is the ceiling early stopping must not hit.
    max_steps: PositiveInt | None = None
    #: Protocol converged: optimizer steps between validations (the same for every arm).
    eval_every: PositiveInt = 50
    batch_size: PositiveInt = 64
    lr: Annotated[float, Field(gt=0)] = 1e-3
    #: ``constant``: ``lr`` throughout. ``cosine``: linear warm-up over ``warmup_steps``, then
    #: cosine decay to 1% of ``lr`` at ``lr_decay_steps`` (None = ``max_steps``), held there
    #: after (timm's CosineLRScheduler, stepped per optimizer step).
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    lr_decay_steps: PositiveInt | None = None
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    optimizer: Literal["adamw", "lion"] = "adamw"
    #: Early stopping: epochs without a better validation loss before stopping.
    patience: PositiveInt = 3
    #: Early stopping ends training only from this optimizer step on (0 = from the first
    #: round); the kept weights are still those of the lowest validation loss of any round.
    #: The validation loss of the first rounds is a transient (it rises at step 50 of the demo
    #: arm before it falls), which a short patience would take for the end of learning.
    stop_after_steps: Annotated[int, Field(ge=0)] = 0
    grad_clip: Annotated[float, Field(gt=0)] = 1.0
    #: EMA decay of the weights used for validation and evaluation (0 = no EMA).
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.0
    #: ``auto`` as for the diffusion model (:func:`cxrlib.hardware.resolve_precision`).
    mixed_precision: MixedPrecision = "no"
    #: NHWC memory layout for the model and its input batches (oneDNN's bf16 convolutions
    #: and tensor cores prefer it; the arithmetic is the same).
    channels_last: bool = False
    #: DataLoader worker processes reading the image cache (0 = in the training process).
    loader_workers: Annotated[int, Field(ge=0)] = 0
    augment: AugmentSpec = Field(default_factory=AugmentSpec)

    @model_validator(mode="after")
    def _pretrained_named(self) -> ClassifierSpec:
        if isinstance(self.pretrained, str):
            if not self.pretrained.strip():
                raise ValueError("classifier.pretrained: name timm weights or a file, or use "
                                 "true / false")
            kind = pretrained_kind(self.pretrained)
            if kind == "file" and not self.pretrained.startswith(("/", "~", "$")):
                raise ValueError(f"classifier.pretrained {self.pretrained!r}: a weights file "
                                 "needs an absolute path (or one starting with ~ or $VAR)")
            arch = self.pretrained.split(".")[0]
            if kind == "name" and "." in self.pretrained and arch != self.backbone:
                raise ValueError(f"classifier.pretrained {self.pretrained!r} are weights of "
                                 f"'{arch}', but classifier.backbone is '{self.backbone}'")
        return self

    @model_validator(mode="after")
    def _converged_needs_budget(self) -> ClassifierSpec:
        if self.protocol == "converged" and self.max_steps is None:
            raise ValueError("classifier.protocol 'converged' needs classifier.max_steps: a "
                             "budget large enough that no arm reaches it (arms that do are "
                             "flagged not converged)")
        return self

    @model_validator(mode="after")
    def _cosine_needs_horizon(self) -> ClassifierSpec:
        if self.lr_schedule == "cosine" and (self.lr_decay_steps or self.max_steps) is None:
            raise ValueError("classifier.lr_schedule 'cosine' needs classifier.lr_decay_steps "
                             "(or max_steps): the step at which the decay ends")
        return self


#: Endings of a weights file named by ``classifier.pretrained``.
WEIGHT_SUFFIXES: tuple[str, ...] = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def pretrained_kind(value: bool | str) -> Literal["none", "default", "name", "file"]:
    """What ``classifier.pretrained`` names: no weights, timm's default weights of the backbone,
    timm weights by name, or a local file (a path: it has a slash or a weights ending)."""
    if value is False:
        return "none"
    if value is True:
        return "default"
    if re.search(r"[/\\]", value) or value.lower().endswith(WEIGHT_SUFFIXES):
        return "file"
    return "name"


class ExternalExperimentSpec(_Strict):
    """The paper's MIMIC experiment: train on an external site's real training split, with
    and without ``k`` replicas of the internal site's synthetic images."""

    site: str
    #: Synthetic supplements to try (0 = the external site's real data alone).
    synthetic_k: list[Annotated[int, Field(ge=0, le=10)]] = Field(
        default_factory=lambda: [0, 10])
    #: Control: the external site's training split plus as many internal real training images
    #: as ``k`` synthetic replicas of every source add (so synthetic data is compared with the
    #: same amount of real internal data).
    real_k: list[Annotated[int, Field(ge=1, le=10)]] = Field(default_factory=list)


class ExperimentSpec(_Strict):
    """The classifier experiment grid (notebook 04). Every experiment validates on real
    internal validation rows and is tested on the internal test split and every external site.
    """

    #: Share of the internal training patients (nested, seeded draws by patient) used as the
    #: real training data. Up to ``sampling.source_fraction`` the draw lies inside the rows
    #: that have synthetic replicas; real only may run above it (all source patients, then a
    #: nested draw of the others), which extends the exchange rate's learning curve.
    real_fractions: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=lambda: [1.0])
    #: The real fractions at which the supplemented and control arms run (None = every real
    #: fraction); real only runs at every one of ``real_fractions`` (the learning curve of the
    #: exchange rate needs three or more).
    supplement_fractions: list[Annotated[float, Field(gt=0, le=1)]] | None = None
    #: Real + replicas 0..k-1 of every real training row (k = 1 is +100%; the paper: 1..10).
    supplement_k: list[Annotated[int, Field(ge=1, le=10)]] = Field(
        default_factory=lambda: [1])
    #: Synthetic replicas 0..k-1 of the real training rows only, no real images.
    synthetic_only_k: list[Annotated[int, Field(ge=1, le=10)]] = Field(
        default_factory=lambda: [1])
    #: Real + as many rebalanced synthetic images as ``real + k x replicas`` (0 = off).
    rebalance_k: Annotated[int, Field(ge=0, le=10)] = 0
    #: Control: the real rows repeated 1 + k times (as many rows as real + k replicas, same
    #: augmentations): what extra passes over the real data alone buy.
    repeated_k: list[Annotated[int, Field(ge=1, le=10)]] = Field(default_factory=list)
    #: Control: real + k replicas whose 14-label vectors are permuted across the synthetic
    #: rows: whether the gain comes from images that carry their conditions.
    shuffled_k: list[Annotated[int, Field(ge=1, le=10)]] = Field(default_factory=list)
    #: Positive control on phantom cohorts: real + k fresh phantom renders of each real row
    #: (a perfect generator; ``sampling.strategies`` must include ``oracle``).
    oracle_k: list[Annotated[int, Field(ge=1, le=10)]] = Field(default_factory=list)
    #: The perfect generator's renders alone, no real image.
    oracle_only_k: list[Annotated[int, Field(ge=1, le=10)]] = Field(default_factory=list)
    #: Real + k renders without detector noise and grain (``oracle_smooth`` strategy): whether
    #: missing detector noise costs a perfect generator its gain.
    oracle_smooth_k: list[Annotated[int, Field(ge=1, le=10)]] = Field(default_factory=list)
    #: Pretrain on replicas 0..k-1 of the real rows, then fine-tune on the real rows (both
    #: phases early-stopped under the grid's protocol; RoentGen-v2 reports pretraining beating
    #: mixing): how the same synthetic images are used, beside ``supplement_k``'s mixing.
    synthetic_pretrain_k: list[Annotated[int, Field(ge=1, le=10)]] = Field(
        default_factory=list)
    external: list[ExternalExperimentSpec] = Field(default_factory=list)
    #: Training seeds per cell of the grid; each seed also draws its own real subset (inside the
    #: rows that have synthetic replicas), since the draw is part of a recipe's variance.
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    #: Arms trained at once, each in its own process with an equal share of this process's
    #: torch threads (1 = one after another in this process). A small CPU model uses two
    #: cores poorly: on the 2-core demo machine two one-thread arms train 1.36x the images per
    #: second of one two-thread arm (``benchmarks/bench_grid_workers.py``). A run may change it;
    #: arms are seeded, but their float sums follow the thread count, and a training carries
    #: that on as another seed would (internal AUROC sd 0.017 between the two ways).
    workers: PositiveInt = 1

    @property
    def internal_arms(self) -> list[tuple[Kind, list[int]]]:
        """Each internal kind other than real only with its k values, in the grid's order:
        the arms that run at every fraction of ``supplemented``."""
        return [(Kind.REAL_PLUS_SYNTHETIC, self.supplement_k),
                (Kind.REAL_REPEATED, self.repeated_k),
                (Kind.REAL_PLUS_SHUFFLED, self.shuffled_k),
                (Kind.REAL_PLUS_ORACLE, self.oracle_k),
                (Kind.REAL_PLUS_ORACLE_SMOOTH, self.oracle_smooth_k),
                (Kind.SYNTHETIC_ONLY, self.synthetic_only_k),
                (Kind.ORACLE_ONLY, self.oracle_only_k),
                (Kind.SYNTHETIC_PRETRAIN, self.synthetic_pretrain_k),
                (Kind.REAL_PLUS_REBALANCED, [self.rebalance_k] if self.rebalance_k else [])]

    @property
    def supplemented(self) -> list[float]:
        """The real fractions at which the arms other than real only run."""
        return self.real_fractions if self.supplement_fractions is None \
            else self.supplement_fractions


class DataCheckSpec(_Strict):
    """Notebook 01's learnability check: a small classifier on the prepared cohort."""

    enabled: bool = True
    max_train_images: PositiveInt = 2000


#: Architecture presets for the diffusion UNet; keys given in the params file override them.
DIFFUSION_PRESETS: dict[str, dict[str, Any]] = {
    # The authors' model (FACTS.md): 256 px, 128 base channels, multipliers 1,1,2,2,4,4,
    # 2 residual blocks per level, self-attention at 32, 16 and 8 px with 4 heads.
    "paper": {"base_channels": 128, "channel_mult": [1, 1, 2, 2, 4, 4], "layers_per_block": 2,
              "attention_resolutions": [32, 16, 8], "attention_heads": 4, "dropout": 0.0},
    # Small enough that the CPU demo trains in about 15 minutes at 64 px.
    "demo": {"base_channels": 32, "channel_mult": [1, 2, 2, 2], "layers_per_block": 1,
             "attention_resolutions": [8], "attention_heads": 4, "dropout": 0.0},
}


class DiffusionSpec(_Strict):
    """The conditional pixel-space DDPM (notebook 02): UNet, noise schedule, training."""

    preset: Literal["paper", "demo", "custom"] = "demo"
    base_channels: PositiveInt
    channel_mult: list[PositiveInt] = Field(min_length=1)
    layers_per_block: PositiveInt
    #: Feature-map sizes (pixels) whose blocks get self-attention.
    attention_resolutions: list[PositiveInt]
    attention_heads: PositiveInt
    dropout: Fraction
    num_train_timesteps: PositiveInt = 1000
    beta_schedule: Literal["squaredcos_cap_v2", "linear", "scaled_linear"] = "squaredcos_cap_v2"
    zero_terminal_snr: bool = True
    prediction_type: Literal["v_prediction", "epsilon"] = "v_prediction"
    #: Share of training images whose condition is replaced by the null embedding (for CFG).
    cond_dropout: Fraction = 0.1
    #: How a NaN label (uncertain under u-ignore, or not annotated) enters the condition vector.
    nan_label_value: float = 0.0
    #: Add the view to the condition vector (AP = 1, PA = 0; 23 values instead of 22,
    #: :mod:`cxrlib.diffusion.condition`), so the generator can be asked for either projection. Off
    #: by
    #: default: the authors' condition vector (the paper preset) has no view.
    condition_on_view: bool = False
    #: Sites whose training split trains the model (default: the internal sites).
    sites: list[str] | None = None
    #: The training rows the generator learns from (:func:`cxrlib.core.cohort.diffusion_rows`):
    #: ``all`` training rows of ``sites``, or only the ``sources``, the rows of the patients
    #: synthetic images are made for (:func:`cxrlib.core.cohort.source_rows`, a seeded draw of
    #: ``sampling.source_fraction`` of them). It exists for the distillation confound: with
    #: ``all`` and a source fraction below 1, the generator learns from patients outside
    #: every arm's real subset, so a gain from its images may be information distilled from
    #: those patients rather than a gain from synthesis. ``sources`` keeps the paper's design,
    #: where the generator learns from exactly the training images it supplements (there: all
    #: of them); arms at a real fraction below the source fraction still get images from a
    #: generator that saw the other source patients. With a source fraction of 1 both are
    #: the same rows.
    train_on: Literal["all", "sources"] = "all"
    optimizer: Literal["lion", "adamw"] = "adamw"
    lr: Annotated[float, Field(gt=0)] = 2e-4
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    warmup_steps: Annotated[int, Field(ge=0)] = 100
    #: ``constant``: ``lr`` after a linear warm-up over ``warmup_steps``. ``cosine``: the same
    #: warm-up, then a cosine decay to 0 at ``max_steps`` (diffusers' ``get_scheduler``), so the
    #: run ends on its lowest rate; a resumed run that changes ``max_steps`` changes the decay.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    #: How a step pairs its images with their noise: ``independent`` draws (Ho et al. 2020), or
    #: ``immiscible`` (Li et al. 2024, "Immiscible Diffusion"): the batch's noise draws are
    #: reassigned to its images by the linear assignment of least total image-noise distance,
    #: so each image is noised towards nearby noise; the noise stays N(0, I) per image.
    noise_assignment: Literal["independent", "immiscible"] = "independent"
    #: How a step draws its images' timesteps: ``uniform`` over the training timesteps (Ho et
    #: al. 2020), or ``logit_normal`` (Esser et al. 2024, SD3): t / T = sigmoid(z), z ~
    #: N(``timestep_logit_mean``, ``timestep_logit_std``), which spends the steps on the middle
    #: noise levels, where the loss is hardest, and fewer on the nearly clean and pure-noise
    #: ends (diffusers' ``compute_density_for_timestep_sampling``).
    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"
    timestep_logit_mean: float = 0.0
    timestep_logit_std: Annotated[float, Field(gt=0)] = 1.0
    grad_clip: Annotated[float, Field(gt=0)] = 1.0
    ema_decay: Fraction = 0.999
    #: Images per process per step (the global batch is this times the number of processes).
    batch_size: PositiveInt = 16
    max_steps: PositiveInt = 1000
    #: ``auto``: bf16 autocast on GPUs and on CPUs with bf16 units (AMX, AVX512-BF16), fp32 on
    #: other CPUs (:func:`cxrlib.hardware.resolve_precision`).
    mixed_precision: MixedPrecision = "no"
    #: NHWC memory layout for the UNet's convolutions (faster with oneDNN and on tensor cores).
    channels_last: bool = False
    #: ``torch.compile`` the UNet for training (compiles once per process, then runs faster).
    compile: bool = False
    #: Min-SNR-gamma loss weighting (Hang et al. 2023): each timestep's loss is weighted by
    #: min(SNR, gamma) / (SNR + 1) for v targets (/ SNR for eps); None = plain MSE.
    snr_gamma: Annotated[float, Field(gt=0)] | None = None
    checkpoint_every: PositiveInt = 250
    keep_checkpoints: PositiveInt = 2
    resume: Literal["auto", "never"] = "auto"
    #: Sample grids during training: every N steps, DDIM steps, guidance w and rescale phi
    #: (w = 3 is the authors' validation-grid scale 4; see :data:`Guidance`).
    sample_every: PositiveInt = 250
    sample_steps: PositiveInt = 50
    preview_guidance: Guidance = 3.0
    guidance_rescale: Fraction = 0.7

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        return _renamed_guidance(data, "diffusion", {"sample_guidance": "preview_guidance"})

    @model_validator(mode="after")
    def _zero_snr_needs_v(self) -> DiffusionSpec:
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            raise ValueError("zero_terminal_snr needs prediction_type v_prediction: at the last "
                             "step the signal is 0 and an epsilon model cannot recover x_0")
        return self

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset", "demo") in DIFFUSION_PRESETS:
            return {**DIFFUSION_PRESETS[data.get("preset", "demo")], **data}
        return data

    #: Keys that do not change what a checkpoint holds (a resumed run may change them).
    RUN_LENGTH_KEYS: ClassVar[tuple[str, ...]] = (
        "max_steps", "checkpoint_every", "keep_checkpoints", "resume", "sample_every",
        "sample_steps", "preview_guidance", "guidance_rescale", "channels_last", "compile",
    )
    #: Keys added after checkpoints were first written: a checkpoint's identity leaves them
    #: out at their defaults, so the checkpoints made before them still resume.
    LATER_IDENTITY_KEYS: ClassVar[tuple[str, ...]] = (
        "condition_on_view", "train_on", "lr_schedule", "noise_assignment",
        "timestep_sampling", "timestep_logit_mean", "timestep_logit_std")


class RebalanceSpec(_Strict):
    """The rebalancing strategy: equal shares of the groups in ``by``, boosted labels."""

    by: list[Subgroup] = Field(
        default_factory=lambda: ["sex", "age_band"])
    #: Weight multiplier for rows positive for a label (e.g. {"Pneumothorax": 3.0}).
    label_boost: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)
    #: Images to draw; 0 means as many as the replica cohort (training rows x replicas).
    n_images: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _labels(self) -> RebalanceSpec:
        unknown = sorted(set(self.label_boost) - set(CHEXPERT_LABELS))
        if unknown:
            raise ValueError(f"label_boost: unknown labels {unknown}")
        return self


#: The samplers (:mod:`cxrlib.diffusion.samplers`): ancestral DDPM, DDIM (eta 0 and 1),
#: DPM-Solver++ as an ODE and as an SDE solver.
Sampler = Literal["ddpm", "ddim", "ddim_eta", "dpmpp", "sde_dpmpp"]


SAMPLERS: tuple[str, ...] = get_args(Sampler)


class SweepSetting(_Strict):
    """One setting of the audit's sweep: sampler, steps and guidance w."""

    sampler: Sampler
    steps: PositiveInt
    guidance: Guidance


class SamplingSpec(_Strict):
    """Sampling (notebook 03): sampler, guidance, the synthetic cohorts and the audit."""

    sampler: Sampler = "ddim"
    steps: PositiveInt = 50
    #: Guidance w (:data:`Guidance`); 0 = the plain conditional model (the authors' setting).
    guidance: Guidance = 0.0
    guidance_rescale: Fraction = 0.7
    batch_size: PositiveInt = 64
    #: The UNet's precision while sampling the cohorts and the sweep; the scheduler's
    #: arithmetic stays fp32. ``auto`` as for training.
    mixed_precision: MixedPrecision = "no"
    #: The diffusion checkpoint the cohorts, the explorer and the audit use, by its training
    #: step (None = the last). Set below ``diffusion.max_steps`` when a longer training serves
    #: the worth curves (``tradeoffs.steps``) and the run's own generator is an earlier one.
    checkpoint_step: PositiveInt | None = None
    #: Replicas per training row (k = 10 is +1000%).
    replicas: Annotated[int, Field(ge=1, le=10)] = 3
    #: Share of the training rows (drawn by patient, seeded) that get synthetic images. The
    #: paper uses all (1.0); a CPU demo can use fewer.
    source_fraction: Annotated[float, Field(gt=0, le=1)] = 1.0
    #: ``replicas`` and ``rebalance`` come from the diffusion model; ``oracle`` (fresh phantom
    #: renders of the source rows: a perfect generator) and ``oracle_smooth`` (the same without
    #: detector noise and grain) are positive controls for phantom cohorts only.
    strategies: list[Literal["replicas", "rebalance", "oracle", "oracle_smooth"]] = Field(
        default_factory=lambda: ["replicas", "rebalance"])
    rebalance: RebalanceSpec = Field(default_factory=RebalanceSpec)
    #: Images per shard file (the unit of resumption and of splitting across processes).
    shard_size: PositiveInt = 256
    #: Audit: how many synthetic and real images to compare, and the guidance sweep grid.
    audit_images: PositiveInt = 500
    sweep_guidance: list[Guidance] = Field(default_factory=lambda: [0.0, 1.0, 3.0])
    sweep_samplers: list[Sampler] = Field(
        default_factory=lambda: ["ddim", "dpmpp"])
    sweep_steps: list[PositiveInt] = Field(default_factory=lambda: [10, 25])
    #: Settings to sweep instead of the product of the three lists above (when not empty):
    #: e.g. guidance at one sampler plus another sampler at its own step count.
    sweep_settings: list[SweepSetting] = Field(default_factory=list)
    sweep_images: PositiveInt = 128

    def sweep_grid(self) -> list[tuple[str, int, float]]:
        """The (sampler, steps, guidance w) settings the audit's sweep scores."""
        if self.sweep_settings:
            return [(s.sampler, s.steps, s.guidance) for s in self.sweep_settings]
        return [(s, k, g) for s in self.sweep_samplers for k in self.sweep_steps
                for g in self.sweep_guidance]

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        return _renamed_guidance(data, "sampling", {"guidance_scale": "guidance",
                                                    "sweep_scales": "sweep_guidance"})


class DetectabilitySpec(_Strict):
    """The real-versus-synthetic classifier of the audit
    (:mod:`cxrlib.synthetic.audit.detectability`): the ``classifier`` section's backbone, optimizer,
    learning rate and precision, trained for a small budget of its own so that it stays cheap beside
    the audit."""

    #: Optimizer-step ceiling.
    max_steps: PositiveInt = 60
    #: Steps between validations (loss on held-out patients of the training half).
    eval_every: PositiveInt = 10
    #: Validations without a lower loss before stopping.
    patience: PositiveInt = 3
    batch_size: PositiveInt = 32


class AuditSpec(_Strict):
    """The audit of generated images (notebook 03, the sampler benchmark): its rules and sizes.

    Real reference images always come from the internal validation split, never the test split.
    """

    #: A label enters a macro AUROC only with at least this many positives and as many
    #: negatives among the images scored (in the synthetic and the real set alike).
    min_per_class: PositiveInt = 10
    #: Patient-bootstrap replicates for the fidelity CIs.
    n_boot: Annotated[int, Field(ge=100)] = 1000
    #: Random equal-size splits of validation images behind the real-vs-real floor.
    floor_splits: Annotated[int, Field(ge=2)] = 5
    #: k of precision / recall / density / coverage (Naeem et al. 2020 use 5).
    prdc_k: PositiveInt = 5
    #: Share of unseen real images the memorization check may flag, per similarity space.
    memorization_rate: Annotated[float, Field(gt=0, lt=0.5)] = 0.01
    #: How much recall or coverage a sweep setting may lose against the most diverse setting
    #: and still be chosen (the verdict never rewards lower diversity).
    diversity_tolerance: Fraction = 0.05
    #: A second, independent feature space, "xrv:<torchxrayvision weights>", read from local
    #: weights only (never downloaded; absent weights are an error); null = off.
    encoder: Annotated[str, Field(pattern=r"^xrv:[\w.-]+$")] | None = None
    #: Folder holding the encoder's weights file (null = torchxrayvision's own cache).
    encoder_cache: str | None = None
    detectability: DetectabilitySpec = Field(default_factory=DetectabilitySpec)


def _compared(kind: Kind) -> Kind:
    if kind in (Kind.REAL_ONLY, Kind.EXTERNAL_ONLY):
        raise ValueError(f"'{kind}' is a baseline; name a kind that is compared with one")
    return kind


#: Experiment kinds of the grid (:class:`cxrlib.core.kinds.Kind`) the analysis plan can name: every
#: kind but the two baselines; written as their values ("real_plus_synthetic").
ComparedKind = Annotated[Kind, Field(strict=False), AfterValidator(_compared)]


class PrimarySpec(_Strict):
    """The pre-specified primary analysis (notebook 05), fixed before any test result is seen."""

    #: Real-data fraction of the primary comparisons (None = the largest in the grid).
    real_fraction: Annotated[float, Field(gt=0, le=1)] | None = None
    #: Kinds whose every k at that fraction is compared with its real-only baseline: the
    #: supplementation and its controls (real rows repeated; synthetic images, labels shuffled).
    kinds: list[ComparedKind] = Field(default_factory=lambda: [
        Kind.REAL_PLUS_SYNTHETIC, Kind.REAL_REPEATED, Kind.REAL_PLUS_SHUFFLED])
    #: Supplementation families with a dose-response test (slope of delta on k).
    dose_response_kinds: list[ComparedKind] = Field(
        default_factory=lambda: [Kind.REAL_PLUS_SYNTHETIC])
    #: The subgroup analysis compares this kind at ``subgroup_k`` (None = its largest k) at the
    #: primary fraction with its baseline.
    subgroup_kind: ComparedKind = Kind.REAL_PLUS_SYNTHETIC
    subgroup_k: Annotated[int, Field(ge=1)] | None = None


class StatsSpec(_Strict):
    """Statistics (notebook 05): seeds as a random effect, patient-level bootstrap and
    clustered DeLong, equivalence, the pre-specified primary analysis and subgroups."""

    #: Patient-bootstrap replicates for the patient-level variance of every macro AUROC.
    n_boot: Annotated[int, Field(ge=100)] = 1000
    seed: int = 0
    #: Significance level after Holm correction within a family of comparisons.
    alpha: Annotated[float, Field(gt=0, lt=1)] = 0.05
    subgroups: list[Subgroup] = Field(
        default_factory=lambda: ["sex", "age_band", "race", "view"])
    #: A label enters any macro AUROC (every table) only with this many positives and as many
    #: negatives in the (sub)set evaluated.
    min_positives: Annotated[int, Field(ge=2)] = 10
    #: TOST margin on macro AUROC: "matches" only when the 90% CI of delta lies inside it.
    equivalence_margin: Annotated[float, Field(gt=0, lt=1)] = 0.02
    #: Labels with a lower prevalence in a test set are "rare" (AUPRC shown beside AUROC).
    rare_prevalence: Annotated[float, Field(gt=0, lt=1)] = 0.1
    #: Equal-width bins of the expected calibration error.
    calibration_bins: Annotated[int, Field(ge=2)] = 10
    primary: PrimarySpec = Field(default_factory=PrimarySpec)


class TradeoffSpec(_Strict):
    """The worth curves (notebook 06): what one extra image is worth in real images (the
    exchange rate, :mod:`cxrlib.study.exchange`) along four axes, every point an arm of the
    one grid at the same seeds, so differences between points are paired. The run's own
    generator (``sampling.checkpoint_step`` or the last checkpoint, at ``sampling.guidance``)
    is the reference point of every axis; the perfect generator at the same dose and real
    fraction stands beside every point when ``sampling.strategies`` has ``oracle``."""

    #: Where the compute, guidance and dose axes are measured (a fraction of
    #: ``experiments.real_fractions``): the scarce-data point of the primary comparison.
    real_fraction: Annotated[float, Field(gt=0, le=1)]
    #: The dose (+100 k %) of the compute, guidance and size axes.
    k: Annotated[int, Field(ge=1, le=10)] = 2
    #: Generator compute: cohorts from the diffusion checkpoints at these training steps,
    #: sampled as the run's own generator is.
    steps: list[PositiveInt] = Field(default_factory=list)
    #: Guidance w: cohorts of the run's own checkpoint at these w.
    guidance: list[Guidance] = Field(default_factory=list)
    #: Doses k at ``real_fraction`` from the run's own generator (and the perfect generator).
    doses: list[Annotated[int, Field(ge=1, le=10)]] = Field(default_factory=list)
    #: Real-data sizes: real fractions supplemented at ``k`` (and the perfect generator).
    sizes: list[Annotated[float, Field(gt=0, le=1)]] = Field(default_factory=list)


class RunSpec(_Strict):
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    out_dir: str = "runs"
    seed: int = 0


def _on_checkpoint(key: str, steps: list[int], d: DiffusionSpec) -> None:
    """Every step must be a checkpoint that training writes (training keeps it:
    :meth:`Params.sampled_steps`)."""
    odd = sorted(s for s in steps if s % d.checkpoint_every or s > d.max_steps)
    if odd:
        raise ValueError(f"{key} {odd}: not checkpoints of a training of diffusion.max_steps "
                         f"{d.max_steps} saved every diffusion.checkpoint_every "
                         f"{d.checkpoint_every} steps; use multiples of it up to max_steps")


class Params(_Strict):
    """A whole parameter file."""

    run: RunSpec
    data: DataSpec
    classifier: ClassifierSpec = Field(default_factory=ClassifierSpec)
    data_check: DataCheckSpec = Field(default_factory=DataCheckSpec)
    diffusion: DiffusionSpec = Field(default_factory=DiffusionSpec)
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    audit: AuditSpec = Field(default_factory=AuditSpec)
    experiments: ExperimentSpec = Field(default_factory=ExperimentSpec)
    stats: StatsSpec = Field(default_factory=StatsSpec)
    #: The worth curves (notebook 06); None = the run has none and notebook 06 is skipped.
    tradeoffs: TradeoffSpec | None = None
    #: The file these parameters were loaded from (relative paths are anchored next to it).
    _source: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _experiments_fit(self) -> Params:
        grid = self.experiments
        needed = max([*grid.supplement_k, *grid.synthetic_only_k, grid.rebalance_k,
                      *grid.shuffled_k, *grid.synthetic_pretrain_k,
                      *(k for e in grid.external for k in e.synthetic_k)],
                     default=0)
        if needed > self.sampling.replicas:
            raise ValueError(f"experiments ask for {needed} synthetic replicas but "
                             f"sampling.replicas is {self.sampling.replicas}; raise it or lower "
                             "the k values in experiments")
        if grid.rebalance_k and "rebalance" not in self.sampling.strategies:
            raise ValueError("experiments.rebalance_k needs 'rebalance' in sampling.strategies")
        for key, strategy in (("oracle_k", "oracle"), ("oracle_only_k", "oracle"),
                              ("oracle_smooth_k", "oracle_smooth")):
            ks = getattr(grid, key)
            if ks and strategy not in self.sampling.strategies:
                raise ValueError(f"experiments.{key} needs '{strategy}' in "
                                 "sampling.strategies")
            if max(ks, default=0) > self.sampling.replicas:
                raise ValueError(f"experiments.{key} asks for {max(ks)} renders per row but "
                                 f"sampling.replicas is {self.sampling.replicas}")
        oracles = [s for s in self.sampling.strategies if s in ORACLE_STRATEGIES]
        real_sites = [s.site for s in self.data.sites if s.reader != "phantom"]
        if oracles and real_sites:
            raise ValueError(
                f"sampling.strategies {oracles}: a perfect-generator control renders fresh "
                f"phantom images of a row, which real data (site(s) {real_sites}) cannot "
                "have; remove it, and use the exchange rate against real-only arms at several "
                "experiments.real_fractions as the positive control")
        beyond = sorted(f for f in grid.supplemented
                        if f > self.sampling.source_fraction + 1e-9)
        if beyond and any(ks for _, ks in grid.internal_arms):
            raise ValueError(
                f"experiments.supplement_fractions (or real_fractions, where that is unset) "
                f"has {beyond}, above sampling.source_fraction {self.sampling.source_fraction}: "
                "only the source patients have synthetic images; set "
                "experiments.supplement_fractions to fractions no larger than the source "
                "fraction (real only may run above it), or raise sampling.source_fraction")
        stray = sorted(set(grid.supplement_fractions or []) - set(grid.real_fractions))
        if stray:
            raise ValueError(f"experiments.supplement_fractions {stray} are not in "
                             f"experiments.real_fractions {grid.real_fractions}")
        external = {s.site for s in self.data.sites if s.role == "external"}
        for e in grid.external:
            if e.site not in external:
                raise ValueError(f"experiments.external: '{e.site}' is not an external site "
                                 f"(external sites: {sorted(external)})")
        return self

    @model_validator(mode="after")
    def _tradeoffs_fit(self) -> Params:
        t, d, fractions = self.tradeoffs, self.diffusion, self.experiments.real_fractions
        if self.sampling.checkpoint_step is not None:
            _on_checkpoint("sampling.checkpoint_step", [self.sampling.checkpoint_step], d)
        if t is None:
            return self
        stray = sorted({t.real_fraction, *t.sizes} - set(fractions))
        if stray:
            raise ValueError(f"tradeoffs: real fractions {stray} are not in "
                             f"experiments.real_fractions {fractions}; real only must run at "
                             "each (the arms' baselines)")
        beyond = sorted(f for f in {t.real_fraction, *t.sizes}
                        if f > self.sampling.source_fraction + 1e-9)
        if beyond:
            raise ValueError(f"tradeoffs: real fractions {beyond} lie above "
                             f"sampling.source_fraction {self.sampling.source_fraction}, so "
                             "their patients have no synthetic images; raise the source fraction")
        if max([t.k, *t.doses]) > self.sampling.replicas:
            raise ValueError(f"tradeoffs: doses up to {max([t.k, *t.doses])} need "
                             f"sampling.replicas >= that (it is {self.sampling.replicas})")
        _on_checkpoint("tradeoffs.steps", t.steps, d)
        return self

    @model_validator(mode="after")
    def _view_condition_fits(self) -> Params:
        other = sorted(self.data.kept_views() - set(VIEW_CODES))
        if self.diffusion.condition_on_view and other:
            raise ValueError(f"diffusion.condition_on_view encodes the views AP and PA only, but "
                             f"the data keeps {other} (data.views, data.frontal_only); keep "
                             "frontal views only, or set diffusion.condition_on_view to false")
        return self

    def reference_generator(self) -> GeneratorSetting:
        """The run's own generator: ``sampling.checkpoint_step`` (or the last checkpoint) at
        ``sampling.guidance``; its cohorts are the run's ordinary ones."""
        return GeneratorSetting(self.sampling.checkpoint_step or self.diffusion.max_steps,
                                self.sampling.guidance)

    def sampled_steps(self) -> frozenset[int]:
        """The training steps whose checkpoints the study samples from
        (``sampling.checkpoint_step``, ``tradeoffs.steps``): kept whatever
        ``diffusion.keep_checkpoints`` says."""
        steps = {self.sampling.checkpoint_step} - {None}
        return frozenset(steps | set(self.tradeoffs.steps if self.tradeoffs else ()))

    def generator_settings(self) -> list[GeneratorSetting]:
        """The settings other than the run's own that the worth curves (``tradeoffs``) make
        cohorts of: each step of ``tradeoffs.steps`` at the run's guidance, each w of
        ``tradeoffs.guidance`` at the run's checkpoint."""
        t, ref = self.tradeoffs, self.reference_generator()
        if t is None:
            return []
        wanted = [GeneratorSetting(s, ref.guidance) for s in t.steps] + [
            GeneratorSetting(ref.step, w) for w in t.guidance]
        return sorted({s for s in wanted if s != ref})

    def internal_sites(self) -> list[str]:
        """Names of the sites with role ``internal`` (the study's training site(s))."""
        return [s.site for s in self.data.sites if s.role == "internal"]

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str) -> Params:
        return cls.model_validate_json(text)
