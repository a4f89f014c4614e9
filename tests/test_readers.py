"""Readers and data preparation on tiny real folders: CheXpert, MIMIC-CXR-JPG, a site CSV,
bad inputs, parameter validation, the image cache and the label co-occurrence table.

Every dataset here is written into ``tmp_path`` in the layout of the real release (same file
names, same columns), with small grey JPEGs, so the readers run exactly as on the real data.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from cxrlib.core.config import load_params
from cxrlib.core.errors import ParamsError
from cxrlib.core.labels import CHEXPERT_LABELS, MANIFEST_COLUMNS, map_race
from cxrlib.core.layout import RUNS_DIR_ENV, RunLayout
from cxrlib.data.imagecache import ImageCache, build_cache, load_image, to_model_range
from cxrlib.data.readers import (
    DataError,
    DropLog,
    SplitLeakError,
    apply_label_policy,
    check_patient_splits,
    check_required_splits,
    clean_rows,
    label_cooccurrence,
    prepare_cohort,
    read_chexpert,
    read_mimic,
    read_site_csv,
)

LABELS = list(CHEXPERT_LABELS)
MANIFEST = [*MANIFEST_COLUMNS, "source_file", "source_row"]
VIEW_REASON = "view not in ['AP', 'PA']"


# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _runs_in_tmp(tmp_path, monkeypatch):
    """Every run folder goes under tmp_path, never into the repository's runs/."""
    monkeypatch.setenv(RUNS_DIR_ENV, str(tmp_path / "runs"))


def _jpeg_bytes(size: tuple[int, int] = (40, 30), value: int = 200, noise: bool = False) -> bytes:
    if noise:
        rng = np.random.default_rng(0)
        img = Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8))
    else:
        img = Image.new("L", size, value)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _write_jpeg(path: Path, size: tuple[int, int] = (40, 30), value: int = 200) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_jpeg_bytes(size, value))
    return path


def _params(tmp_path: Path, sites: list[dict], name: str = "t", **data):
    """Write a parameter file into tmp_path and load it (validated, paths checked)."""
    raw = {
        "run": {"name": name, "seed": 0},
        "data": {"resolution": 32, "workers": 1, "sites": sites, **data},
        "data_check": {"enabled": False},
    }
    file = tmp_path / f"params_{name}.yaml"
    file.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_params(file)


def _cohort(params):
    return prepare_cohort(params, RunLayout.open(params), progress=False)


def _label_row(**values) -> dict:
    """One row of the 14 label columns, blank (NaN) unless given (keys use _ for spaces)."""
    row = dict.fromkeys(LABELS, np.nan)
    for key, v in values.items():
        name = key.replace("_", " ")
        assert name in row, name
        row[name] = v
    return row


def _reasons(drops: pd.DataFrame) -> dict[str, str]:
    return dict(zip(drops["image_id"], drops["reason"], strict=True))


# --------------------------------------------------------------------------- CheXpert

CX_PREFIX = "CheXpert-v1.0-small"
P1 = f"{CX_PREFIX}/train/patient00001/study1/view1_frontal.jpg"
P1_LAT = f"{CX_PREFIX}/train/patient00001/study1/view2_lateral.jpg"
P2_AGE0 = f"{CX_PREFIX}/train/patient00002/study1/view1_frontal.jpg"
P3_SEXU = f"{CX_PREFIX}/train/patient00003/study1/view1_frontal.jpg"
P4 = f"{CX_PREFIX}/train/patient00004/study2/view1_frontal.jpg"
P5 = f"{CX_PREFIX}/train/patient00005/study1/view1_frontal.jpg"
PV = f"{CX_PREFIX}/valid/patient64541/study1/view1_frontal.jpg"


def _chexpert_row(path, sex, age, fl, appa, **labels) -> dict:
    return {"Path": path, "Sex": sex, "Age": age, "Frontal/Lateral": fl, "AP/PA": appa,
            **_label_row(**labels)}


def _make_chexpert(tmp_path: Path, demographics: dict[str, str] | None = None) -> Path:
    root = tmp_path / CX_PREFIX
    train = pd.DataFrame([
        # Cardiomegaly positive, Edema uncertain, Effusion negative, the rest blank.
        _chexpert_row(P1, "Female", 68, "Frontal", "AP", Cardiomegaly=1.0, Edema=-1.0,
                      Pleural_Effusion=0.0),
        _chexpert_row(P1_LAT, "Female", 68, "Lateral", np.nan, Cardiomegaly=1.0),
        _chexpert_row(P2_AGE0, "Male", 0, "Frontal", "PA", No_Finding=1.0),
        _chexpert_row(P3_SEXU, "Unknown", 50, "Frontal", "PA", No_Finding=1.0),
        _chexpert_row(P4, "Male", 45, "Frontal", "PA", No_Finding=1.0, Support_Devices=-1.0),
        _chexpert_row(P5, "Female", 81, "Frontal", "AP", Lung_Opacity=1.0),
    ])
    valid = pd.DataFrame([
        _chexpert_row(PV, "Male", 73, "Frontal", "AP", **{k.replace(" ", "_"): 0.0
                                                          for k in LABELS[1:]},
                      No_Finding=1.0),
    ])
    assert list(train.columns) == ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *LABELS]
    root.mkdir(parents=True)
    train.to_csv(root / "train.csv", index=False)
    valid.to_csv(root / "valid.csv", index=False)
    for rel in (*train["Path"], *valid["Path"]):
        _write_jpeg(root / rel.split("/", 1)[1])
    if demographics is not None:
        pd.DataFrame({
            "PATIENT": list(demographics),
            "GENDER": "Female",
            "AGE_AT_CXR": 60,
            "PRIMARY_RACE": list(demographics.values()),
            "ETHNICITY": "Non-Hispanic/Non-Latino",
        }).to_csv(root / "demographics.csv", index=False)
    return root


CX_DEMO = {
    "patient00001": "White, non-Hispanic",
    "patient00004": "Black or African American",
    "patient64541": "Asian",
    "patient00005": "Patient Refused",
}


def _chexpert_site(root: Path, **extra) -> dict:
    return {"site": "chexpert", "reader": "chexpert", "root": str(root),
            "csv_files": ["train.csv", "valid.csv"],
            "split": {"mode": "official", "required": ["train", "val"]}, **extra}


def test_chexpert_manifest_ids_paths_demographics_and_official_split(tmp_path):
    root = _make_chexpert(tmp_path, CX_DEMO)
    params = _params(tmp_path, [_chexpert_site(root, demographics="demographics.csv")])
    cohort = _cohort(params)
    m = cohort.manifest.set_index("image_id")

    assert list(cohort.manifest.columns) == MANIFEST
    assert list(cohort.manifest["image_id"]) == [
        "chexpert/train/patient00001/study1/view1_frontal",
        "chexpert/train/patient00004/study2/view1_frontal",
        "chexpert/train/patient00005/study1/view1_frontal",
        "chexpert/valid/patient64541/study1/view1_frontal",
    ]
    first = m.loc["chexpert/train/patient00001/study1/view1_frontal"]
    assert first["path"] == str(root / "train/patient00001/study1/view1_frontal.jpg")
    assert Path(first["path"]).is_file()
    assert first["patient_id"] == "chexpert/patient00001"
    assert first["study_id"] == "chexpert/patient00001/study1"
    assert (first["site"], first["view"], first["sex"], first["age"]) == (
        "chexpert", "AP", "Female", 68)
    assert first["source_file"] == str(root / "train.csv")
    assert first["source_row"] == 2
    # Official split: valid.csv -> val, train.csv -> train.
    assert m["split"].to_dict() == {
        "chexpert/train/patient00001/study1/view1_frontal": "train",
        "chexpert/train/patient00004/study2/view1_frontal": "train",
        "chexpert/train/patient00005/study1/view1_frontal": "train",
        "chexpert/valid/patient64541/study1/view1_frontal": "val",
    }
    assert m.loc["chexpert/valid/patient64541/study1/view1_frontal", "source_file"] == str(
        root / "valid.csv")
    # Race from the demographics file, per patient.
    assert m["race"].tolist() == ["White", "Black/African American", "Unknown", "Asian"]
    assert m["view"].tolist() == ["AP", "PA", "AP", "AP"]
    assert m["sex"].tolist() == ["Female", "Male", "Female", "Male"]
    # The cache holds exactly the manifest's images.
    cache = ImageCache(cohort.cache_dir)
    assert sorted(cache.image_ids) == sorted(cohort.manifest["image_id"])
    assert cache.images.shape == (4, 32, 32)


def test_chexpert_drops_lateral_age0_unknown_sex_with_reasons(tmp_path):
    root = _make_chexpert(tmp_path)
    params = _params(tmp_path, [_chexpert_site(root)])
    cohort = _cohort(params)
    ids = set(cohort.manifest["image_id"])
    lateral = "chexpert/train/patient00001/study1/view2_lateral"
    age0 = "chexpert/train/patient00002/study1/view1_frontal"
    sexu = "chexpert/train/patient00003/study1/view1_frontal"
    assert not ids & {lateral, age0, sexu}
    assert len(cohort.drops) == 3
    reasons = _reasons(cohort.drops)
    assert reasons == {lateral: VIEW_REASON, age0: "age missing or 0", sexu: "sex unknown"}
    assert "view" in reasons[lateral] and "age" in reasons[age0] and "sex" in reasons[sexu]
    d = cohort.drops.set_index("image_id")
    assert d.loc[lateral, "source_row"] == 3  # header is row 1
    assert d.loc[age0, "source_row"] == 4
    assert d.loc[sexu, "source_file"] == str(root / "train.csv")
    assert set(d["site"]) == {"chexpert"}
    assert cohort.drop_summary.set_index("reason")["rows"].to_dict() == {
        VIEW_REASON: 1, "age missing or 0": 1, "sex unknown": 1}
    # No race file: every race is Unknown.
    assert set(cohort.manifest["race"]) == {"Unknown"}
    # The manifest and drop log are saved in the run folder.
    saved = pd.read_parquet(RunLayout.open(params).manifest)
    pd.testing.assert_frame_equal(saved, cohort.manifest)


@pytest.mark.parametrize(
    ("uncertainty", "blank", "edema", "blank_value", "support"),
    [
        ("u-ones", "zero", 1.0, 0.0, 1.0),
        ("u-zeros", "zero", 0.0, 0.0, 0.0),
        ("u-ignore", "zero", math.nan, 0.0, math.nan),
        ("u-ones", "nan", 1.0, math.nan, 1.0),
        ("u-ignore", "nan", math.nan, math.nan, math.nan),
    ],
)
def test_chexpert_uncertainty_and_blank_policies(tmp_path, uncertainty, blank, edema,
                                                 blank_value, support):
    root = _make_chexpert(tmp_path)
    params = _params(tmp_path, [_chexpert_site(root)], uncertainty=uncertainty, blank=blank)
    m = _cohort(params).manifest.set_index("image_id")
    p1 = m.loc["chexpert/train/patient00001/study1/view1_frontal"]
    p4 = m.loc["chexpert/train/patient00004/study2/view1_frontal"]
    pv = m.loc["chexpert/valid/patient64541/study1/view1_frontal"]
    np.testing.assert_equal(p1["Cardiomegaly"], 1.0)
    np.testing.assert_equal(p1["Pleural Effusion"], 0.0)
    np.testing.assert_equal(p1["Edema"], edema)  # -1 in the CSV
    np.testing.assert_equal(p1["Fracture"], blank_value)  # blank in the CSV
    np.testing.assert_equal(p4["Support Devices"], support)  # -1 in the CSV
    np.testing.assert_equal(p4["No Finding"], 1.0)
    # valid.csv has no blanks or uncertain labels: exactly its 0/1 values.
    assert pv[LABELS].tolist() == [1.0] + [0.0] * 13
    assert m[LABELS].dtypes.eq(float).all()


def test_apply_label_policy_direct():
    raw = pd.DataFrame({"Edema": [1.0, 0.0, -1.0, np.nan], "Fracture": [np.nan, -1, 1, 0]})
    exp = {
        ("u-ones", "zero"): {"Edema": [1, 0, 1, 0], "Fracture": [0, 1, 1, 0]},
        ("u-zeros", "zero"): {"Edema": [1, 0, 0, 0], "Fracture": [0, 0, 1, 0]},
        ("u-ignore", "zero"): {"Edema": [1, 0, np.nan, 0], "Fracture": [0, np.nan, 1, 0]},
        ("u-ones", "nan"): {"Edema": [1, 0, 1, np.nan], "Fracture": [np.nan, 1, 1, 0]},
        ("u-zeros", "nan"): {"Edema": [1, 0, 0, np.nan], "Fracture": [np.nan, 0, 1, 0]},
        ("u-ignore", "nan"): {"Edema": [1, 0, np.nan, np.nan], "Fracture": [np.nan] * 2 + [1, 0]},
    }
    for (unc, blank), cols in exp.items():
        out = apply_label_policy(raw, unc, blank)
        pd.testing.assert_frame_equal(out, pd.DataFrame(cols, dtype=float), obj=f"{unc}/{blank}")
    # Text codes as they come from a CSV column that pandas read as strings.
    text = pd.DataFrame({"Edema": ["1", "-1", "0", None]})
    assert apply_label_policy(text, "u-zeros", "zero")["Edema"].tolist() == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("bad", ["yes", 2.0, 0.5])
def test_apply_label_policy_rejects_bad_codes_naming_the_column(bad):
    raw = pd.DataFrame({"Edema": [1.0, 0.0], "Pneumonia": [1.0, bad]}, dtype=object)
    with pytest.raises(DataError, match=r"label column 'Pneumonia' holds") as exc:
        apply_label_policy(raw, "u-ones", "zero")
    assert repr(bad) in str(exc.value)


def test_chexpert_bad_label_value_in_csv_is_a_data_error(tmp_path):
    root = _make_chexpert(tmp_path)
    train = pd.read_csv(root / "train.csv")
    train["Edema"] = train["Edema"].astype(object)
    train.loc[0, "Edema"] = "yes"
    train.to_csv(root / "train.csv", index=False)
    params = _params(tmp_path, [_chexpert_site(root)])
    with pytest.raises(DataError, match=r"label column 'Edema' holds 'yes'"):
        read_chexpert(params.data.sites[0], root, params)


def test_chexpert_demographics_white_or_caucasian_is_white(tmp_path):
    root = _make_chexpert(tmp_path, {"patient00001": "White or Caucasian"})
    params = _params(tmp_path, [_chexpert_site(root, demographics="demographics.csv")])
    df = read_chexpert(params.data.sites[0], root, params)
    assert df.loc[df["patient_id"] == "chexpert/patient00001", "race"].unique().tolist() == [
        "White"]


# --------------------------------------------------------------------------- MIMIC-CXR-JPG

D1 = "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014"  # s1, PA
D2 = "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962"  # s1, LATERAL
D3 = "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab"  # s2, AP, validate
D4 = "68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714"  # s3, PA, test
D5 = "ea030e7a-2e3b1346-bc518786-7a8fd698-f673b44c"  # s4, PA, study without labels


def _make_mimic(tmp_path: Path) -> Path:
    root = tmp_path / "mimic-cxr-jpg" / "2.0.0"
    root.mkdir(parents=True)
    meta = pd.DataFrame({
        "dicom_id": [D1, D2, D3, D4, D5],
        "subject_id": [10000032, 10000032, 10000033, 10000034, 10000035],
        "study_id": [50414267, 50414267, 53189527, 53911762, 56699142],
        "ViewPosition": ["PA", "LATERAL", "AP", "PA", "PA"],
        "StudyDate": [21800506, 21800506, 21830101, 21500910, 21800101],
    })
    meta.to_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", index=False)
    labels = pd.DataFrame([
        {"subject_id": 10000032, "study_id": 50414267,
         **_label_row(Cardiomegaly=1.0, Edema=-1.0, Pneumonia=0.0)},
        {"subject_id": 10000033, "study_id": 53189527, **_label_row(No_Finding=1.0)},
        {"subject_id": 10000034, "study_id": 53911762, **_label_row(Pleural_Effusion=1.0)},
    ])
    labels.to_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", index=False)
    split = meta[["dicom_id", "study_id", "subject_id"]].assign(
        split=["train", "train", "validate", "test", "train"])
    split.to_csv(root / "mimic-cxr-2.0.0-split.csv.gz", index=False)
    hosp = tmp_path / "mimiciv" / "hosp"
    hosp.mkdir(parents=True)
    pd.DataFrame({
        "subject_id": [10000032, 10000033, 10000034, 10000035],
        "gender": ["F", "M", "F", "M"],
        "anchor_age": [52, 40, 70, 30],
        "anchor_year": [2180, 2181, 2150, 2180],
    }).to_csv(hosp / "patients.csv", index=False)
    pd.DataFrame({
        "subject_id": [10000032, 10000032, 10000033, 10000033, 10000033, 10000035],
        "race": ["UNKNOWN", "WHITE - RUSSIAN", "BLACK/AFRICAN AMERICAN", "WHITE",
                 "BLACK/CAPE VERDEAN", "ASIAN - CHINESE"],
    }).to_csv(hosp / "admissions.csv", index=False)
    for d, row in meta.set_index("dicom_id").iterrows():
        s, t = str(row["subject_id"]), str(row["study_id"])
        _write_jpeg(root / "files" / f"p{s[:2]}" / f"p{s}" / f"s{t}" / f"{d}.jpg", (30, 40))
    return root


def _mimic_site(root: Path, tmp_path: Path) -> dict:
    hosp = tmp_path / "mimiciv" / "hosp"
    return {"site": "mimic", "reader": "mimic", "root": str(root),
            "mimic": {"patients": str(hosp / "patients.csv"),
                      "admissions": str(hosp / "admissions.csv")},
            "split": {"mode": "official"}}


def test_mimic_manifest(tmp_path):
    root = _make_mimic(tmp_path)
    params = _params(tmp_path, [_mimic_site(root, tmp_path)], uncertainty="u-ones")
    cohort = _cohort(params)
    m = cohort.manifest.set_index("image_id")
    assert list(cohort.manifest.columns) == MANIFEST
    assert list(m.index) == [f"mimic/{D1}", f"mimic/{D3}", f"mimic/{D4}"]
    assert m.loc[f"mimic/{D1}", "path"] == str(
        root / "files" / "p10" / "p10000032" / "s50414267" / f"{D1}.jpg")
    assert m["patient_id"].tolist() == ["mimic/10000032", "mimic/10000033", "mimic/10000034"]
    assert m["study_id"].tolist() == ["mimic/50414267", "mimic/53189527", "mimic/53911762"]
    assert m["view"].tolist() == ["PA", "AP", "PA"]
    assert m["split"].tolist() == ["train", "val", "test"]
    assert m["sex"].tolist() == ["Female", "Male", "Female"]
    # Age at the study: anchor_age + (study year - anchor_year).
    assert m["age"].tolist() == [52.0, 42.0, 70.0]
    # 10000032: UNKNOWN + WHITE - RUSSIAN -> White; 10000033: two Black answers, one White ->
    # Black (the most frequent); 10000034 has no admission -> Unknown.
    assert m["race"].tolist() == ["White", "Black/African American", "Unknown"]
    assert m.loc[f"mimic/{D1}", ["Cardiomegaly", "Edema", "Pneumonia", "Fracture"]].tolist() == [
        1.0, 1.0, 0.0, 0.0]
    assert m.loc[f"mimic/{D3}", "No Finding"] == 1.0
    assert m.loc[f"mimic/{D4}", "Pleural Effusion"] == 1.0
    assert m.loc[f"mimic/{D1}", "source_file"] == str(root / "mimic-cxr-2.0.0-metadata.csv.gz")
    assert m["source_row"].tolist() == [2, 4, 5]
    # The lateral view and the study without labels are dropped, each with a counted reason.
    assert _reasons(cohort.drops) == {f"mimic/{D2}": VIEW_REASON,
                                      f"mimic/{D5}": "no label row for the study"}
    assert cohort.drop_summary.set_index("reason")["rows"].to_dict() == {
        VIEW_REASON: 1, "no label row for the study": 1}


def test_mimic_reader_without_mimic_iv_files_leaves_sex_and_age_unknown(tmp_path):
    root = _make_mimic(tmp_path)
    params = _params(tmp_path, [{"site": "mimic", "reader": "mimic", "root": str(root),
                                 "split": {"mode": "official"}}])
    df = read_mimic(params.data.sites[0], root, params)
    assert len(df) == 5
    assert df["sex"].isna().all() and df["age"].isna().all()
    assert set(df["race"]) == {"Unknown"}
    assert df["official_split"].tolist() == ["train", "train", "val", "test", "train"]
    assert df["view"].tolist() == ["PA", "LATERAL", "AP", "PA", "PA"]
    drops = DropLog()
    assert clean_rows(df, params, drops, "mimic").empty
    assert drops.frame()["reason"].value_counts().to_dict() == {"sex unknown": 4, VIEW_REASON: 1}


# --------------------------------------------------------------------------- site CSV


def _make_site_csv(tmp_path: Path, rows: list[dict], name: str = "site") -> Path:
    root = tmp_path / name
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root


def _csv_site(root: Path, labels: dict[str, str] | None = None, **extra) -> dict:
    cols = {"path": "file", "patient_id": "pid", "sex": "sex", "age": "age",
            "labels": labels if labels is not None else {"Cardiomegaly": "cm"}}
    return {"site": "hosp", "reader": "csv", "root": str(root), "csv_files": ["labels.csv"],
            "columns": cols,
            "split": {"mode": "random", "fractions": {"test": 1.0}, "required": ["test"]},
            **extra}


SITE_ROWS = [
    {"file": "img/a.jpg", "pid": "P1", "sex": "M", "age": 61, "cm": 1},
    {"file": "img/b.jpg", "pid": "P1", "sex": "M", "age": 61, "cm": -1},
    {"file": "img/c.jpg", "pid": "P2", "sex": "f", "age": 33, "cm": np.nan},
    {"file": "img/d.jpg", "pid": "P3", "sex": "F", "age": 47, "cm": 0},
]


@pytest.mark.parametrize(("blank", "other"), [("zero", 0.0), ("nan", math.nan)])
def test_site_csv_reads_mapped_label_and_fills_others_by_blank_policy(tmp_path, blank, other):
    root = _make_site_csv(tmp_path, SITE_ROWS)
    for r in SITE_ROWS:
        _write_jpeg(root / r["file"])
    params = _params(tmp_path, [_csv_site(root)], blank=blank, uncertainty="u-ones")
    df = read_site_csv(params.data.sites[0], root, params)
    np.testing.assert_equal(df["Cardiomegaly"].to_numpy(), [1.0, 1.0, other, 0.0])
    for lab in LABELS:
        if lab != "Cardiomegaly":
            np.testing.assert_equal(df[lab].to_numpy(), np.full(4, other), err_msg=lab)
    assert df["image_id"].tolist() == ["hosp/img/a", "hosp/img/b", "hosp/img/c", "hosp/img/d"]
    assert df["path"].tolist() == [str(root / r["file"]) for r in SITE_ROWS]
    assert df["patient_id"].tolist() == ["hosp/P1", "hosp/P1", "hosp/P2", "hosp/P3"]
    assert df["sex"].tolist() == ["Male", "Male", "Female", "Female"]
    assert df["age"].tolist() == [61, 61, 33, 47]
    assert df["source_row"].tolist() == [2, 3, 4, 5]

    cohort = _cohort(params)
    assert list(cohort.manifest.columns) == MANIFEST
    assert len(cohort.manifest) == 4 and cohort.drops.empty
    assert set(cohort.manifest["split"]) == {"test"}
    assert set(cohort.manifest["view"]) == {"PA"}


def test_site_csv_unknown_label_name_is_a_data_error(tmp_path):
    root = _make_site_csv(tmp_path, SITE_ROWS)
    params = _params(tmp_path, [_csv_site(root, labels={"Cardiomegally": "cm"})])
    with pytest.raises(DataError, match=r"site 'hosp'.*'Cardiomegally'"):
        read_site_csv(params.data.sites[0], root, params)


# --------------------------------------------------------------------------- bad input




def _bad_image_site(tmp_path: Path) -> Path:
    rows = [
        {"file": "good.jpg", "pid": "P1", "sex": "M", "age": 50, "cm": 1},
        {"file": "missing.jpg", "pid": "P2", "sex": "M", "age": 50, "cm": 0},
        {"file": "truncated.jpg", "pid": "P3", "sex": "F", "age": 50, "cm": 0},
        {"file": "corrupt.jpg", "pid": "P4", "sex": "F", "age": 50, "cm": 0},
        {"file": "good2.jpg", "pid": "P5", "sex": "F", "age": 50, "cm": 0},
    ]
    root = _make_site_csv(tmp_path, rows)
    _write_jpeg(root / "good.jpg")
    _write_jpeg(root / "good2.jpg", (30, 40), 90)
    whole = _jpeg_bytes((200, 150), noise=True)
    (root / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "corrupt.jpg").write_bytes(np.random.default_rng(1).bytes(2000))
    return root


def test_load_image_failure_reasons(tmp_path):
    root = _bad_image_site(tmp_path)
    img, why = load_image(str(root / "missing.jpg"), 32)
    assert img is None and why == "image file missing"
    img, why = load_image(str(root / "truncated.jpg"), 32)
    assert img is None and why.startswith("image unreadable: OSError")
    img, why = load_image(str(root / "corrupt.jpg"), 32)
    assert img is None and why.startswith("image unreadable: UnidentifiedImageError")
    img, why = load_image(str(root / "good.jpg"), 32)
    assert why is None and img.shape == (32, 32) and img.dtype == np.uint8


def test_bad_images_are_dropped_with_counted_reasons(tmp_path):
    root = _bad_image_site(tmp_path)
    cohort = _cohort(_params(tmp_path, [_csv_site(root)]))

    assert cohort.manifest["image_id"].tolist() == ["hosp/good", "hosp/good2"]
    reasons = _reasons(cohort.drops)
    assert set(reasons) == {"hosp/missing", "hosp/truncated", "hosp/corrupt"}
    assert reasons["hosp/missing"] == "image file missing"
    assert reasons["hosp/truncated"].startswith("image unreadable")
    assert reasons["hosp/corrupt"].startswith("image unreadable")
    assert cohort.drop_summary.set_index("reason")["rows"].to_dict() == {
        "image file missing": 1, "image unreadable": 2}
    d = cohort.drops.set_index("image_id")
    assert d.loc["hosp/truncated", "path"] == str(root / "truncated.jpg")
    assert d.loc["hosp/truncated", "source_row"] == 4
    # The cache holds only the readable images, and they are the manifest's.
    cache = ImageCache(cohort.cache_dir)
    assert cache.image_ids == ["hosp/good", "hosp/good2"]
    assert cache.images.shape == (2, 32, 32)


@pytest.mark.parametrize("kind", ["directory", "binary"])
def test_unreadable_csv_is_a_data_error_naming_the_file(tmp_path, kind):
    root = _make_chexpert(tmp_path)
    target = root / "train.csv"
    target.unlink()
    if kind == "directory":
        target.mkdir()
    else:
        target.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe" + np.random.default_rng(2).bytes(
            3000))
    params = _params(tmp_path, [_chexpert_site(root)])
    with pytest.raises(DataError) as exc:
        _cohort(params)
    assert str(target) in str(exc.value)


def test_missing_csv_file_is_a_data_error(tmp_path):
    root = _make_chexpert(tmp_path)
    (root / "valid.csv").unlink()
    params = _params(tmp_path, [_chexpert_site(root)])
    with pytest.raises(DataError, match="file not found") as exc:
        _cohort(params)
    assert str(root / "valid.csv") in str(exc.value)


def test_missing_column_is_a_data_error_listing_it(tmp_path):
    root = _make_chexpert(tmp_path)
    train = pd.read_csv(root / "train.csv").drop(columns=["AP/PA"])
    train.to_csv(root / "train.csv", index=False)
    params = _params(tmp_path, [_chexpert_site(root)])
    with pytest.raises(DataError, match=r"missing column\(s\) \['AP/PA'\]") as exc:
        _cohort(params)
    assert str(root / "train.csv") in str(exc.value)


def test_missing_mimic_label_column_is_a_data_error(tmp_path):
    root = _make_mimic(tmp_path)
    path = root / "mimic-cxr-2.0.0-chexpert.csv.gz"
    pd.read_csv(path).drop(columns=["Pleural Other"]).to_csv(path, index=False)
    params = _params(tmp_path, [_mimic_site(root, tmp_path)])
    with pytest.raises(DataError, match=r"\['Pleural Other'\]") as exc:
        read_mimic(params.data.sites[0], root, params)
    assert str(path) in str(exc.value)


def test_empty_required_split_is_a_data_error_naming_site_and_split(tmp_path):
    rows = [{"file": "a.jpg", "pid": "P1", "sex": "M", "age": 50, "cm": 1},
            {"file": "b.jpg", "pid": "P1", "sex": "M", "age": 50, "cm": 0}]
    root = _make_site_csv(tmp_path, rows)
    for r in rows:
        _write_jpeg(root / r["file"])
    site = _csv_site(root)
    site["split"] = {"mode": "random", "fractions": {"train": 0.7, "val": 0.1, "test": 0.2}}
    params = _params(tmp_path, [site])
    with pytest.raises(DataError, match=r"site 'hosp' has no images in split\(s\) \['val', "
                                        r"'test'\]"):
        _cohort(params)
    # The check alone, on a hand-made manifest.
    manifest = pd.DataFrame({"site": ["hosp", "hosp"], "split": ["train", "test"]})
    with pytest.raises(DataError, match=r"site 'hosp' has no images in split\(s\) \['val'\]"):
        check_required_splits(manifest, params.data.sites[0])
    check_required_splits(manifest.assign(split=["val", "test"]).pipe(
        lambda f: pd.concat([f, manifest])), params.data.sites[0])


def test_patient_split_leak_names_the_patient():
    manifest = pd.DataFrame({
        "patient_id": ["s/p1", "s/p1", "s/p2", "s/p3", "s/p3"],
        "split": ["train", "test", "val", "train", "train"],
    })
    with pytest.raises(SplitLeakError, match=r"^1 patient\(s\) appear in more than one split: "
                                             r"s/p1$"):
        check_patient_splits(manifest)
    check_patient_splits(manifest.iloc[2:])  # no leak: no error


# --------------------------------------------------------------------------- params validation


def _yaml_file(tmp_path: Path, text: str, name: str = "bad.yaml") -> Path:
    file = tmp_path / name
    file.write_text(text)
    return file


BASE_SITE = """\
    - site: hosp
      reader: csv
      root: {root}
      csv_files: [labels.csv]
      columns: {{path: file, patient_id: pid}}
"""


def _params_text(root: Path, data_extra: str = "", site_extra: str = "") -> str:
    return ("run: {name: v}\ndata:\n" + data_extra + "  sites:\n"
            + BASE_SITE.format(root=root) + site_extra)


def test_valid_params_file_loads(tmp_path):
    (tmp_path / "site").mkdir()
    params = load_params(_yaml_file(tmp_path, _params_text(tmp_path / "site")))
    assert params.data.sites[0].columns.path == "file"
    assert params.data.resolution == 64


@pytest.mark.parametrize(
    ("data_extra", "site_extra", "key", "words"),
    [
        ("", "      foo: 1\n", "data.sites[0].foo", "unknown key"),
        ("  resolutoin: 64\n", "", "data.resolutoin", "unknown key"),
        ("  resolution: '64'\n", "", "data.resolution", "valid integer"),
        ("  uncertainty: u-maybe\n", "", "data.uncertainty", "u-ones"),
        ("", "      split: {mode: random, fractions: {train: 0.6, val: 0.1, test: 0.2}}\n",
         "data.sites[0].split", "fractions must sum to 1, got 0.9000"),
    ],
)
def test_params_errors_name_file_and_key(tmp_path, data_extra, site_extra, key, words):
    (tmp_path / "site").mkdir()
    file = _yaml_file(tmp_path, _params_text(tmp_path / "site", data_extra, site_extra))
    with pytest.raises(ParamsError) as exc:
        load_params(file)
    msg = str(exc.value)
    assert str(file) in msg
    assert f"key '{key}'" in msg
    assert words in msg


def test_params_missing_root_folder_names_key_and_file(tmp_path):
    missing = tmp_path / "no" / "CheXpert-v1.0-small"
    file = _yaml_file(tmp_path, f"""\
run: {{name: v}}
data:
  sites:
    - site: chexpert
      reader: chexpert
      root: {missing}
""")
    with pytest.raises(ParamsError) as exc:
        load_params(file)
    msg = str(exc.value)
    assert "key 'data.sites[0].root'" in msg
    assert str(file) in msg and str(missing) in msg


def test_params_chexpert_without_root_is_an_error(tmp_path):
    file = _yaml_file(tmp_path, "run: {name: v}\ndata:\n  sites:\n"
                                "    - {site: chexpert, reader: chexpert}\n")
    with pytest.raises(ParamsError, match=r"key 'data.sites\[0\]'.*needs 'root'") as exc:
        load_params(file)
    assert str(file) in str(exc.value)


def test_params_missing_demographics_file_is_an_error(tmp_path):
    root = _make_chexpert(tmp_path)
    with pytest.raises(ParamsError, match=r"key 'data.sites\[0\].demographics'") as exc:
        _params(tmp_path, [_chexpert_site(root, demographics="CHEXPERT DEMO.csv")])
    assert str(root / "CHEXPERT DEMO.csv") in str(exc.value)


# --------------------------------------------------------------------------- image cache


def test_cache_round_trip(tmp_path):
    src = tmp_path / "img"
    paths = [_write_jpeg(src / "wide.jpg", (40, 30), 200),
             _write_jpeg(src / "tall.jpg", (30, 40), 100),
             _write_jpeg(src / "square.jpg", (48, 48), 255)]
    ids = ["s/wide", "s/tall", "s/square"]
    failed = build_cache([str(p) for p in paths], ids, tmp_path / "cache", 32, progress=False)
    assert failed.empty and list(failed.columns) == ["image_id", "reason"]
    cache = ImageCache(tmp_path / "cache")
    assert cache.images.shape == (3, 32, 32) and cache.images.dtype == np.uint8
    assert cache.image_ids == ids and len(cache) == 3 and cache.resolution == 32
    wide = cache.get("s/wide").astype(int)
    # 40x30 -> 32x24, centred: 4 zero rows at the top and the bottom, no side padding.
    assert (wide[:4] == 0).all() and (wide[28:] == 0).all()
    assert np.abs(wide[4:28] - 200).max() <= 2
    tall = cache.get("s/tall").astype(int)
    assert (tall[:, :4] == 0).all() and (tall[:, 28:] == 0).all()
    assert np.abs(tall[:, 4:28] - 100).max() <= 2
    assert cache.get("s/square").min() >= 253
    assert cache.rows_for(["s/square", "s/wide"]).tolist() == [2, 0]
    with pytest.raises(KeyError, match=r"1 manifest image\(s\) are not in the cache.*s/unknown"):
        cache.rows_for(["s/wide", "s/unknown"])
    model = to_model_range(np.asarray(cache.images))
    assert model.dtype == np.float32
    assert model[0, 0, 0] == -1.0  # padding is black
    np.testing.assert_array_equal(to_model_range(np.array([0, 255], dtype=np.uint8)),
                                  np.array([-1.0, 1.0], dtype=np.float32))
    assert to_model_range(np.array([0, 255], dtype=np.uint8)).tolist() == [-1.0, 1.0]


def test_cache_with_failures_compacts_rows(tmp_path):
    good = _write_jpeg(tmp_path / "a.jpg", (40, 30), 50)
    good2 = _write_jpeg(tmp_path / "c.jpg", (40, 30), 150)
    failed = build_cache([str(good), str(tmp_path / "nope.jpg"), str(good2)], ["a", "b", "c"],
                         tmp_path / "cache", 16, progress=False)
    assert failed.to_dict("records") == [{"image_id": "b", "reason": "image file missing"}]
    cache = ImageCache(tmp_path / "cache")
    assert cache.image_ids == ["a", "c"] and cache.images.shape == (2, 16, 16)
    assert abs(int(cache.get("c")[8, 8]) - 150) <= 2
    assert abs(int(cache.get("a")[8, 8]) - 50) <= 2


def test_image_cache_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no image cache"):
        ImageCache(tmp_path / "nothing")


# --------------------------------------------------------------------------- co-occurrence


def test_label_cooccurrence_exact():
    labels = pd.DataFrame({
        "A": [1.0, 1.0, 0.0, 1.0],
        "B": [1.0, -1.0, 1.0, np.nan],
        "C": [0.0, np.nan, -1.0, 0.0],
    })
    out = label_cooccurrence(labels)
    assert list(out.index) == ["A", "B", "C"] and list(out.columns) == ["A", "B", "C"]
    expected = np.array([
        [1.0, 1 / 3, 0.0],  # A positive in rows 0, 1, 3; B positive only in row 0 of those
        [1 / 2, 1.0, 0.0],  # B positive in rows 0, 2 (row 1 is -1: not positive)
        [np.nan, np.nan, np.nan],  # C has no positives
    ])
    np.testing.assert_allclose(out.to_numpy(), expected, equal_nan=True)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    """A 16-bit export keeps its grey levels (min-max to 8 bits), not a white image."""
    ramp = np.tile(np.linspace(0, 65535, 64, dtype=np.uint16), (48, 1))
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    img, reason = load_image(str(path), 64)
    assert reason is None
    assert (img == 255).mean() < 0.1
    assert img[32, 1] < 20 and img[32, 62] > 235


@pytest.mark.parametrize("text,expected", [
    ("White or Caucasian", "White"), ("Native American, non-Hispanic",
                                      "American Indian/Alaska Native"),
    ("Asian, non-Hispanic", "Asian"), ("BLACK/AFRICAN AMERICAN", "Black/African American"),
    ("Native Hawaiian or Other Pacific Islander", "Pacific Islander"),
    ("MULTIPLE RACE/ETHNICITY", "Other"), ("PATIENT DECLINED TO ANSWER", "Unknown"),
])
def test_map_race_keywords(text, expected):
    assert map_race(text) == expected
