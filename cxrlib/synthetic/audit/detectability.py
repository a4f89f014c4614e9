"""Detectability: can a classifier tell synthetic images from real ones?

A real-versus-synthetic classifier (the run's ``classifier`` backbone, optimizer and
precision, :func:`cxrlib.classifier.training.train_binary`, under the small budget of
``audit.detectability``) is trained on one half of the patients and scored on the other: the
real validation images are halved by patient, the synthetic images by their source patient,
so no patient is on both sides. Early stopping uses a fifth of the training half's patients,
never the scored half, so the kept step is not chosen on the images that are scored. The
AUROC on the scored half (synthetic = positive) is the headline: 0.5 = the classifier cannot
tell them apart, 1 = every synthetic image is recognised. Its CI resamples the scored
patients (:func:`cxrlib.stats.patient_bootstrap_weights`); the classifier is held fixed, so
it covers the scored sample, not training noise. Where the two sets do not differ, a
classifier that picks up cues of its training patients can land somewhat below 0.5 on the
other half of the same fixed pools (seen at 0.39-0.53 over three seeds for two halves of 80
phantoms): an AUROC at or below 0.5 reads "indistinguishable" alike.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupShuffleSplit

from cxrlib.classifier.training import predict_images, train_binary
from cxrlib.core.schema import ClassifierSpec, DetectabilitySpec
from cxrlib.stats import patient_bootstrap_weights, weighted_auroc

#: Share of the training half's patients kept aside for early stopping.
VAL_SHARE = 0.2
#: Patients each set needs: two halves, and a training half with fit and validation patients.
MIN_PATIENTS = 4


def patient_split(groups: Sequence[Hashable], share: float, seed: int) -> np.ndarray:
    """Mask of the images whose patient is in a seeded draw of ``share`` of the patients
    (sklearn's GroupShuffleSplit: ``ceil(share * patients)`` of them)."""
    groups = np.asarray(groups)
    split = GroupShuffleSplit(n_splits=1, test_size=share, random_state=seed)
    _, picked = next(split.split(np.zeros(len(groups)), groups=groups))
    mask = np.zeros(len(groups), dtype=bool)
    mask[picked] = True
    return mask


def patient_parts(groups: Sequence[Hashable], seed: int) -> np.ndarray:
    """Each image's part, by patient: ``scored`` (half of the patients), ``val``
    (:data:`VAL_SHARE` of the others, for early stopping) or ``fit``."""
    groups = np.asarray(groups)
    if len(set(groups)) < MIN_PATIENTS:
        raise ValueError(f"detectability needs at least {MIN_PATIENTS} patients per set; "
                         f"got {len(set(groups))}")
    scored = patient_split(groups, 0.5, seed)
    parts = np.where(scored, "scored", "fit").astype(object)
    val = patient_split(groups[~scored], VAL_SHARE, seed + 1)
    parts[np.flatnonzero(~scored)[val]] = "val"
    return parts


@dataclass
class DetectabilityResult:
    """The scored half's AUROC (synthetic = positive) with its CI, and how training went."""

    auroc: float
    ci_low: float
    ci_high: float
    n_fit: int
    n_val: int
    n_scored: int
    steps: int
    kept_step: int
    seconds: float
    alpha: float

    def row(self) -> dict[str, float | int]:
        """One row of the audit's detectability table."""
        return {"auroc": self.auroc, "ci_low": self.ci_low, "ci_high": self.ci_high,
                "n_fit": self.n_fit, "n_val": self.n_val, "n_scored": self.n_scored,
                "steps": self.steps, "kept_step": self.kept_step, "seconds": self.seconds}

    def summary_entry(self) -> dict[str, float | int]:
        """``detectability_auroc`` for :func:`cxrlib.core.summary.update_summary`."""
        return {"value": self.auroc, "ci_low": self.ci_low, "ci_high": self.ci_high,
                "n_scored": self.n_scored, "n_fit": self.n_fit, "steps": self.steps,
                "kept_step": self.kept_step, "ci_level": 1 - self.alpha}

    def verdict(self) -> str:
        """The AUROC's CI against chance (0.5), in a few words: ``detectable`` (CI above
        0.5) or ``not detectable`` (the CI includes 0.5, or lies below it, which reads as
        indistinguishable too: see the module's note)."""
        if not np.isfinite(self.auroc):
            return "not estimable"
        return "detectable" if self.ci_low > 0.5 else "not detectable"

    def sentence(self, synthetic: str = "synthetic images") -> str:
        """The AUROC against chance, in words (:meth:`verdict`)."""
        if self.verdict() == "detectable":
            verdict = "a classifier tells them apart better than chance"
        elif self.ci_high < 0.5:
            verdict = ("below chance, which reads as indistinguishable too (cues of its "
                       "training patients that do not transfer)")
        else:
            verdict = "not distinguishable from chance (0.5) at this sample size"
        return (f"Detectability: a real-versus-synthetic classifier scores AUROC "
                f"{self.auroc:.3f} ({1 - self.alpha:.0%} CI {self.ci_low:.3f}-"
                f"{self.ci_high:.3f}) on {self.n_scored} held-out images of patients it never "
                f"saw ({synthetic} against real validation images; trained on {self.n_fit}, "
                f"step {self.kept_step} of {self.steps} kept): {verdict}.")


def detectability(real: np.ndarray, real_groups: Sequence[Hashable], synthetic: np.ndarray,
                  synthetic_groups: Sequence[Hashable], classifier: ClassifierSpec,
                  budget: DetectabilitySpec, n_boot: int = 1000, seed: int = 0,
                  alpha: float = 0.05) -> DetectabilityResult:
    """Train a real-versus-synthetic classifier on half the patients, score the other half.

    Each set is split by :func:`patient_parts`. When there are more real images than
    synthetic ones, a seeded sample of as many is used, so both classes weigh the same.

    Args:
        real: real images (n x R x R uint8), the negatives.
        real_groups: each real image's patient.
        synthetic: synthetic images (m x R x R uint8), the positives.
        synthetic_groups: each synthetic image's source patient.
        classifier: the run's classifier settings (backbone, optimizer, learning rate,
            precision), with ``budget`` laid over them.
        budget: the small training budget (``audit.detectability``: steps, validation
            interval, patience, batch size).
        n_boot: patient-bootstrap replicates of the AUROC's CI.
        seed: seeds the real subsample, the patient splits, the training and the bootstrap.
        alpha: the CI is at level 1 - alpha.
    """
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    real_groups = np.asarray(real_groups)
    if len(real) > len(synthetic):
        keep = np.sort(rng.choice(len(real), len(synthetic), replace=False))
        real, real_groups = real[keep], real_groups[keep]
    sets = ((np.asarray(real), real_groups, "real"),
            (np.asarray(synthetic), np.asarray(synthetic_groups), "synthetic"))
    xs: dict[str, list[np.ndarray]] = {"fit": [], "val": [], "scored": []}
    ys: dict[str, list[np.ndarray]] = {"fit": [], "val": [], "scored": []}
    scored_groups = []
    for target, (images, groups, name) in enumerate(sets):
        parts = patient_parts(groups, seed)
        for part in xs:
            xs[part].append(images[parts == part])
            ys[part].append(np.full((parts == part).sum(), float(target), dtype=np.float32))
        # the sets' patients are told apart: their ids may coincide but they are independent
        scored_groups.append(np.char.add(f"{name}/", groups[parts == "scored"].astype(str)))
    x = {k: np.concatenate(v) for k, v in xs.items()}
    y = {k: np.concatenate(v) for k, v in ys.items()}
    spec = classifier.model_copy(update=budget.model_dump())
    trained = train_binary(spec, x["fit"], y["fit"], x["val"], y["val"], seed)
    score = predict_images(trained.model, x["scored"])[:, 0]
    weights = patient_bootstrap_weights(np.concatenate(scored_groups), n_boot, seed)
    low, high = np.nanquantile(weighted_auroc(y["scored"], score, weights),
                               [alpha / 2, 1 - alpha / 2])
    return DetectabilityResult(
        float(roc_auc_score(y["scored"], score)), float(low), float(high), len(y["fit"]),
        len(y["val"]), len(y["scored"]), trained.steps, trained.best_step,
        time.perf_counter() - started, alpha)
