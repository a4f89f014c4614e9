"""Label, demographic and manifest conventions shared by every stage.

One place defines the 14 CheXpert labels, the race groups of the paper and the manifest
columns, so readers, the phantom renderer, the diffusion condition vector and the classifiers
all agree on order and spelling.
"""

from __future__ import annotations

#: The 14 CheXpert observations, in the order of CheXpert's CSV files (and torchxrayvision).
CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

#: The five race groups of the paper's condition vector (one-hot, in this order).
RACE_GROUPS: tuple[str, ...] = (
    "American Indian/Alaska Native",
    "Black/African American",
    "White",
    "Pacific Islander",
    "Asian",
)
#: Values the ``race`` column may hold besides the five groups; they encode as all zeros.
RACE_OTHER = "Other"
RACE_UNKNOWN = "Unknown"
RACE_VALUES: tuple[str, ...] = (*RACE_GROUPS, RACE_OTHER, RACE_UNKNOWN)

SEXES: tuple[str, ...] = ("Male", "Female")
VIEWS: tuple[str, ...] = ("AP", "PA", "LATERAL", "OTHER")
#: The frontal views as numbers, AP 1 and PA 0: the view of the condition vector
#: (``diffusion.condition_on_view``) and the target of the audit's view probe.
VIEW_CODES: dict[str, float] = {"PA": 0.0, "AP": 1.0}
SPLITS: tuple[str, ...] = ("train", "val", "test")

#: Manifest columns shared by every source, before the 14 label columns.
MANIFEST_ID_COLUMNS: tuple[str, ...] = (
    "image_id",
    "path",
    "patient_id",
    "study_id",
    "site",
    "split",
    "view",
    "sex",
    "age",
    "race",
)
MANIFEST_COLUMNS: tuple[str, ...] = (*MANIFEST_ID_COLUMNS, *CHEXPERT_LABELS)


def map_race(value: object) -> str:
    """Map a free-text race entry (CheXpert demographics, MIMIC-IV admissions, a site CSV) to
    one of :data:`RACE_VALUES`.

    Matching is by keyword, case-insensitive, so "White, non-Hispanic", "WHITE - RUSSIAN" and
    "White or Caucasian" all map to White. Multi-race, refused and unknown entries are kept
    apart: "Other" for a stated race outside the five groups, "Unknown" for missing answers.
    """
    if value is None or (isinstance(value, float) and value != value):
        return RACE_UNKNOWN
    text = str(value).strip().lower()
    if not text or any(k in text for k in ("unknown", "declined", "refused", "unable", "not ")):
        return RACE_UNKNOWN
    if "multiple" in text or "multi" in text:
        return RACE_OTHER
    if "white" in text or "caucasian" in text:  # before "asian": "caucasian" contains it
        return RACE_GROUPS[2]
    if "american indian" in text or "alaska" in text or "native american" in text:
        return RACE_GROUPS[0]
    if "black" in text or "african" in text:
        return RACE_GROUPS[1]
    if "pacific islander" in text or "hawaiian" in text:
        return RACE_GROUPS[3]
    if "asian" in text:
        return RACE_GROUPS[4]
    return RACE_OTHER


def map_sex(value: object) -> str | None:
    """Map 'M'/'F'/'Male'/'female'/... to ``Male``/``Female``; anything else gives ``None``."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in ("m", "male", "man"):
        return "Male"
    if text in ("f", "female", "woman"):
        return "Female"
    return None
