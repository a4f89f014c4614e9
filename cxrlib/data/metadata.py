"""Real metadata shipped inside torchxrayvision, as rows for the embedded phantom cohort.

Every phantom is one whole real row (sex, age, view, findings) of a public dataset's metadata:
CheXpert's ``chexpert_train.csv.gz`` for the internal site, NIH ChestX-ray14's
``Data_Entry_2017_v2020.csv.gz`` and PadChest's label CSV for two external sites. The external
findings are mapped to the CheXpert label names where a counterpart exists
(:data:`NIH_TO_CHEXPERT`, :data:`PADCHEST_TO_CHEXPERT`); CheXpert labels a source does not
annotate stay blank (unknown). No images ship with these files.
"""

from __future__ import annotations

import ast
from functools import cache

import numpy as np
import pandas as pd

from cxrlib.core.config import xrv_data_dir
from cxrlib.core.labels import CHEXPERT_LABELS

#: NIH ChestX-ray14 finding -> CheXpert label. Emphysema, Fibrosis and Hernia have no
#: counterpart; Enlarged Cardiomediastinum, Fracture and Support Devices are not annotated by NIH.
NIH_TO_CHEXPERT: dict[str, str] = {
    "No Finding": "No Finding",
    "Cardiomegaly": "Cardiomegaly",
    "Effusion": "Pleural Effusion",
    "Pneumothorax": "Pneumothorax",
    "Consolidation": "Consolidation",
    "Pneumonia": "Pneumonia",
    "Atelectasis": "Atelectasis",
    "Edema": "Edema",
    "Nodule": "Lung Lesion",
    "Mass": "Lung Lesion",
    "Infiltration": "Lung Opacity",
    "Pleural_Thickening": "Pleural Other",
}
NIH_UNMAPPED: tuple[str, ...] = ("Emphysema", "Fibrosis", "Hernia")

#: PadChest label -> CheXpert label (PadChest annotates all 14 through these terms); its many
#: other terms (COPD signs, scoliosis, aortic elongation, ...) have no CheXpert counterpart.
PADCHEST_TO_CHEXPERT: dict[str, str] = {
    "normal": "No Finding",
    "cardiomegaly": "Cardiomegaly",
    "mediastinal enlargement": "Enlarged Cardiomediastinum",
    "superior mediastinal enlargement": "Enlarged Cardiomediastinum",
    "pleural effusion": "Pleural Effusion",
    "costophrenic angle blunting": "Pleural Effusion",
    "pneumothorax": "Pneumothorax",
    "consolidation": "Consolidation",
    "pneumonia": "Pneumonia",
    "atelectasis": "Atelectasis",
    "laminar atelectasis": "Atelectasis",
    "lobar atelectasis": "Atelectasis",
    "segmental atelectasis": "Atelectasis",
    "total atelectasis": "Atelectasis",
    "pulmonary edema": "Edema",
    "nodule": "Lung Lesion",
    "multiple nodules": "Lung Lesion",
    "pulmonary mass": "Lung Lesion",
    "mass": "Lung Lesion",
    "infiltrates": "Lung Opacity",
    "alveolar pattern": "Lung Opacity",
    "increased density": "Lung Opacity",
    "ground glass pattern": "Lung Opacity",
    "pleural thickening": "Pleural Other",
    "apical pleural thickening": "Pleural Other",
    "calcified pleural thickening": "Pleural Other",
    "rib fracture": "Fracture",
    "callus rib fracture": "Fracture",
    "clavicle fracture": "Fracture",
    "vertebral fracture": "Fracture",
    "humeral fracture": "Fracture",
    "NSG tube": "Support Devices",
    "endotracheal tube": "Support Devices",
    "tracheostomy tube": "Support Devices",
    "central venous catheter": "Support Devices",
    "central venous catheter via jugular vein": "Support Devices",
    "central venous catheter via subclavian vein": "Support Devices",
    "central venous catheter via umbilical vein": "Support Devices",
    "pacemaker": "Support Devices",
    "dual chamber device": "Support Devices",
    "single chamber device": "Support Devices",
    "chest drain tube": "Support Devices",
    "electrical device": "Support Devices",
}

#: Columns of every metadata frame returned here (labels hold 1/0/-1/NaN as in CheXpert).
META_COLUMNS: tuple[str, ...] = ("patient", "sex", "age", "view", *CHEXPERT_LABELS)


@cache
def chexpert_metadata() -> pd.DataFrame:
    """CheXpert train.csv (223k rows), frontal and lateral, labels as released (1/0/-1/NaN)."""
    df = pd.read_csv(xrv_data_dir() / "chexpert_train.csv.gz")
    patient = df["Path"].str.extract(r"(patient\d+)")[0]
    view = np.where(df["Frontal/Lateral"] == "Lateral", "LATERAL", df["AP/PA"].fillna("OTHER"))
    out = pd.DataFrame({"patient": patient, "sex": df["Sex"], "age": df["Age"], "view": view})
    for label in CHEXPERT_LABELS:
        out[label] = df[label].astype(float)
    return out


@cache
def nih_metadata() -> pd.DataFrame:
    """NIH ChestX-ray14 rows with findings mapped to CheXpert labels (1, 0 or blank)."""
    df = pd.read_csv(xrv_data_dir() / "Data_Entry_2017_v2020.csv.gz")
    findings = df["Finding Labels"].str.split("|")
    out = pd.DataFrame(
        {
            "patient": "nih" + df["Patient ID"].astype(str).str.zfill(5),
            "sex": df["Patient Gender"].map({"M": "Male", "F": "Female"}),
            "age": df["Patient Age"].astype(float),
            "view": df["View Position"],
        }
    )
    mapped = set(NIH_TO_CHEXPERT.values())
    for label in CHEXPERT_LABELS:
        if label not in mapped:
            out[label] = np.nan
            continue
        sources = {k for k, v in NIH_TO_CHEXPERT.items() if v == label}
        out[label] = findings.map(lambda f, s=sources: float(bool(s & set(f))))
    return out


def _parse_padchest_labels(text: object) -> list[str]:
    if not isinstance(text, str):
        return []
    try:
        values = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return []
    return [str(v).strip() for v in values]


@cache
def padchest_metadata() -> pd.DataFrame:
    """PadChest rows with labels mapped to CheXpert labels (1, 0; age from birth year)."""
    cols = ["PatientID", "PatientBirth", "StudyDate_DICOM", "PatientSex_DICOM", "Projection",
            "Labels"]
    df = pd.read_csv(
        xrv_data_dir() / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz", usecols=cols
    )
    year = df["StudyDate_DICOM"].astype(str).str[:4].astype(float)
    view = df["Projection"].map({"PA": "PA", "AP": "AP", "AP_horizontal": "AP", "L": "LATERAL"})
    out = pd.DataFrame(
        {
            "patient": "pc" + df["PatientID"].astype(str).str[:12],
            "sex": df["PatientSex_DICOM"].map({"M": "Male", "F": "Female"}),
            "age": (year - df["PatientBirth"]).astype(float),
            "view": view.fillna("OTHER"),
        }
    )
    labels = df["Labels"].map(_parse_padchest_labels)
    for label in CHEXPERT_LABELS:
        sources = {k for k, v in PADCHEST_TO_CHEXPERT.items() if v == label}
        out[label] = labels.map(lambda f, s=sources: float(bool(s & set(f))))
    return out


METADATA_SOURCES = {
    "chexpert": chexpert_metadata,
    "nih": nih_metadata,
    "padchest": padchest_metadata,
}


def sample_patients(meta: pd.DataFrame, n_images: int, rng: np.random.Generator,
                    frontal_only: bool = True) -> pd.DataFrame:
    """Draw whole patients (all their rows) at random until ``n_images`` rows are collected.

    Sampling by patient keeps the real images-per-patient structure, so patient-level splits
    downstream behave as they do on the real dataset.
    """
    if frontal_only:
        meta = meta[meta["view"].isin(["AP", "PA"])]
    groups = meta.groupby("patient", sort=True).indices
    patients = np.array(sorted(groups))
    order = rng.permutation(len(patients))
    picked: list[np.ndarray] = []
    total = 0
    for idx in order:
        rows = groups[patients[idx]]
        picked.append(rows)
        total += len(rows)
        if total >= n_images:
            break
    rows = np.concatenate(picked)[:n_images]
    return meta.iloc[np.sort(rows)].reset_index(drop=True)
