"""A split read from files (``split: {mode: file}``), checked on the real CheXpert metadata.

The site is the CheXpert ``train.csv`` that ships inside torchxrayvision (223k real rows, no
images), read by the CheXpert reader as ``params/chexpert_metadata_splits.yaml`` reads it. The
split files are built from real rows of that CSV, written the way the authors released theirs
(``Path,PID``, gzip, paths starting ``CheXpert-v1.0/`` where the CSV's start
``CheXpert-v1.0-small/``). The expected counts are computed here from the raw CSV, apart from
the reader. With the authors' own files under ``data_splits/``, the last test checks their
cohort sizes (``shared/paper/FACTS.md``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from cxrlib.core.config import load_params, read_tree, xrv_data_dir
from cxrlib.core.errors import ParamsError
from cxrlib.core.layout import RUNS_DIR_ENV, RunLayout
from cxrlib.core.schema import FileSplitSpec, Params, SiteSpec
from cxrlib.data.figures import split_counts
from cxrlib.data.readers import (
    NOT_IN_SITE,
    NOT_IN_SPLIT_FILES,
    DataError,
    DropLog,
    SplitLeakError,
    clean_rows,
    describe_sources,
    prepare_cohort,
    read_split_files,
    split_from_files,
)

ROOT = Path(__file__).resolve().parent.parent
TRAIN_PATIENTS = range(1, 151)
TEST_PATIENTS = range(151, 301)
#: Real patient, studies that do not exist: named by the training file, missing from the site.
ABSENT = [f"CheXpert-v1.0/train/patient00001/study9{i}/view1_frontal.jpg" for i in range(3)]


@pytest.fixture(autouse=True)
def _runs_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv(RUNS_DIR_ENV, str(tmp_path / "runs"))


@pytest.fixture(scope="module")
def real() -> pd.DataFrame:
    """The raw CSV with the patient number, the authors' path form and the view."""
    df = pd.read_csv(xrv_data_dir() / "chexpert_train.csv.gz")
    prefix = "CheXpert-v1.0-small/"
    assert df["Path"].str.startswith(prefix + "train/patient").all()
    df["pid"] = [int(p.split("/")[2][len("patient"):]) for p in df["Path"]]
    df["authors_path"] = "CheXpert-v1.0/" + df["Path"].str.slice(len(prefix))
    df["ap"] = (df["Frontal/Lateral"] == "Frontal") & (df["AP/PA"] == "AP")
    df["usable"] = df["Sex"].isin(["Male", "Female"]) & (df["Age"] > 0)
    return df


def _split_file(rows: pd.DataFrame, path: Path, extra: list[str] = ()) -> Path:
    """Rows as the authors' files hold them: Path,PID (and any extra columns), gzipped."""
    out = rows[["authors_path", "pid", *extra]].rename(columns={"authors_path": "Path",
                                                                "pid": "PID"})
    out.to_csv(path, index=False)  # .csv.gz: compressed
    return path


def _site(split: dict) -> dict:
    return {"site": "chexpert", "reader": "chexpert", "root": "{xrv}",
            "csv_files": ["chexpert_train.csv.gz"], "split": split}


def _params(tmp_path: Path, split: dict, **data) -> Params:
    raw = {"run": {"name": "files", "seed": 0},
           "data": {"metadata_only": True, "views": ["AP"], "sites": [_site(split)], **data},
           "data_check": {"enabled": False}}
    file = tmp_path / "params.yaml"
    file.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_params(file)


def _files_split(train: Path, test: Path, **extra) -> dict:
    return {"mode": "file", "files": {"train": str(train), "test": str(test)},
            "path_column": "Path", "patient_column": "PID", **extra}


def test_split_files_on_the_real_chexpert_metadata_count_every_row(tmp_path, real):
    """Counts per split, the fold, the rows no file names and the rows the site lacks, all
    against the raw CSV; named rows the filters drop count under the filter's reason."""
    train_rows = real[real["pid"].isin(TRAIN_PATIENTS)]  # every view: laterals are named too
    test_rows = real[real["pid"].isin(TEST_PATIENTS) & real["ap"]]
    train = train_rows.assign(Fold=train_rows["pid"] % 5)
    train = pd.concat([train, pd.DataFrame({"authors_path": ABSENT, "pid": 1, "Fold": 1})])
    params = _params(tmp_path, _files_split(
        _split_file(train, tmp_path / "cxp_tr.csv.gz", ["Fold"]),
        _split_file(test_rows, tmp_path / "cxp_ts.csv.gz"), val_fold=0,
        required=["train", "val", "test"]))
    cohort = prepare_cohort(params, RunLayout.open(params), progress=False)
    m = cohort.manifest

    kept = real["ap"] & real["usable"]
    expected = {
        "train": kept & real["pid"].isin(TRAIN_PATIENTS) & (real["pid"] % 5 != 0),
        "val": kept & real["pid"].isin(TRAIN_PATIENTS) & (real["pid"] % 5 == 0),
        "test": kept & real["pid"].isin(TEST_PATIENTS),
    }
    counts = split_counts(m).loc["chexpert"]
    for split, rows in expected.items():
        assert counts.loc[split, "images"] == rows.sum() > 0, split
        assert counts.loc[split, "patients"] == real.loc[rows, "pid"].nunique(), split
        assert set(m.loc[m["split"] == split, "image_id"]) == set(
            "chexpert/" + real.loc[rows, "authors_path"].str[len("CheXpert-v1.0/"):-4])
    # Validation is fold 0 of the training file: its patients, every usable AP image of them.
    assert m.loc[m["split"] == "val", "patient_id"].nunique() == 18  # of the 30 in fold 0

    summary = cohort.drop_summary.set_index("reason")
    named = real["pid"].isin(TRAIN_PATIENTS) | (real["pid"].isin(TEST_PATIENTS) & real["ap"])
    known_sex = real["Sex"].isin(["Male", "Female"])
    reasons = {
        "view not in ['AP']": (~real["ap"]).sum(),  # the named laterals among them
        "sex unknown": (real["ap"] & ~known_sex).sum(),
        "age missing or 0": (real["ap"] & known_sex & ~(real["Age"] > 0)).sum(),
        NOT_IN_SPLIT_FILES: (kept & ~named).sum(),
        NOT_IN_SITE: len(ABSENT),
    }
    assert summary["rows"].to_dict() == {k: v for k, v in reasons.items() if v}
    assert (~real["ap"] & named).sum() > 0 and reasons["age missing or 0"] > 0
    assert summary["rows"].sum() + len(m) == len(real) + len(ABSENT)
    absent = cohort.drops[cohort.drops["reason"] == NOT_IN_SITE]
    assert absent["path"].tolist() == ABSENT
    assert absent["source_file"].eq(str(tmp_path / "cxp_tr.csv.gz")).all()
    assert absent["source_row"].tolist() == [len(train) - 1, len(train), len(train) + 1]
    assert summary.loc[NOT_IN_SITE, "e.g."] == ", ".join(
        f"chexpert/train/patient00001/study9{i}/view1_frontal" for i in range(3))
    # No patient in two splits, and the sources table states each file's size.
    assert m.groupby("patient_id")["split"].nunique().max() == 1
    described = describe_sources(params).loc["chexpert", "split (by patient)"]
    assert (f"test: cxp_ts.csv.gz ({len(test_rows):,} images, {test_rows['pid'].nunique()} "
            "patients)") in described
    assert "val: Fold 0 of the training file" in described


def test_a_patient_in_two_split_files_is_an_error_naming_the_patient(tmp_path, real):
    rows = real[real["pid"].isin(range(1, 20)) & real["ap"]]
    pid = rows["pid"].value_counts().sort_index().loc[lambda n: n > 1].index[0]  # 2+ images
    second = rows[rows["pid"] == pid].index[1:]  # its later images go to the test file
    train = _split_file(rows[(rows["pid"] < 10) & ~rows.index.isin(second)],
                        tmp_path / "tr.csv.gz")
    test = _split_file(rows[(rows["pid"] >= 10) | rows.index.isin(second)],
                       tmp_path / "ts.csv.gz")
    spec = FileSplitSpec.model_validate(_files_split(train, test))
    with pytest.raises(SplitLeakError, match=rf"^1 patient\(s\) \(column 'PID'\) are in more "
                       rf"than one split: {pid} \(test in ts\.csv\.gz, train in tr\.csv\.gz\)$"):
        read_split_files(spec, tmp_path)
    # A fold column that is not patient-level puts a patient in train and val: the same error.
    folds = rows[rows["pid"] < 10].assign(Fold=lambda d: np.arange(len(d)) % 3)
    split = _files_split(_split_file(folds, tmp_path / "f.csv.gz", ["Fold"]), test, val_fold=0)
    split["files"]["test"] = str(_split_file(rows[rows["pid"] >= 10], tmp_path / "t2.csv.gz"))
    with pytest.raises(SplitLeakError, match=r"train in f\.csv\.gz, val in f\.csv\.gz"):
        read_split_files(FileSplitSpec.model_validate(split), tmp_path)


def test_validation_drawn_from_the_training_file_is_seeded_and_patient_level(tmp_path, real):
    rows = real[real["pid"].isin(TRAIN_PATIENTS) & real["ap"]]
    test_rows = real[real["pid"].isin(TEST_PATIENTS) & real["ap"]]
    train = _split_file(rows, tmp_path / "tr.csv.gz")
    test = _split_file(test_rows, tmp_path / "ts.csv")

    def val_patients(seed: int) -> set[str]:
        spec = FileSplitSpec.model_validate(_files_split(train, test, val_fraction=0.2,
                                                         seed=seed))
        files = read_split_files(spec, tmp_path)
        assert files.groupby("patient")["split"].nunique().max() == 1  # whole patients
        assert set(files.loc[files["split"] == "test", "patient"]) == set(
            test_rows["pid"].astype(str))  # the test file is untouched
        return set(files.loc[files["split"] == "val", "patient"])

    first = val_patients(3)
    assert len(first) == round(0.2 * rows["pid"].nunique())
    assert first <= {str(p) for p in TRAIN_PATIENTS}
    assert val_patients(3) == first and val_patients(4) != first


def test_images_named_by_id_and_names_that_fit_two_images(tmp_path):
    """An id column (MIMIC's dicom_id) matches the site's image ids; a name matching the ends
    of two site paths, or named twice, is an error naming it."""
    site = SiteSpec.model_validate({
        "site": "m", "reader": "csv", "root": str(tmp_path), "columns": {
            "path": "p", "patient_id": "s", "image_id": "d"},
        "split": {"mode": "file", "files": {"test": "ts.csv"}, "id_column": "dicom_id",
                  "patient_column": "subject_id", "required": ["test"]}})
    df = pd.DataFrame({"image_id": ["m/a1", "m/a2", "m/b1"],
                       "path": ["/x/p1/s1/a1.jpg", "/x/p1/s2/a2.jpg", "/x/p2/s3/b1.jpg"]})
    pd.DataFrame({"dicom_id": ["b1", "a2", "zz"], "subject_id": [2, 1, 9]}).to_csv(
        tmp_path / "ts.csv", index=False)
    drops = DropLog()
    split = split_from_files(df, site, tmp_path, drops)
    assert split.fillna("-").tolist() == ["-", "test", "test"]
    assert drops.frame()[["image_id", "source_row"]].values.tolist() == [["m/zz", 4]]

    by_path = site.model_copy(update={"split": FileSplitSpec.model_validate({
        "mode": "file", "files": {"test": "ts.csv"}, "path_column": "Path",
        "patient_column": "PID"})})
    pd.DataFrame({"Path": ["root/p1/s2/a2.jpg", "root/s1/a1.jpg"], "PID": [1, 1]}).to_csv(
        tmp_path / "ts.csv", index=False)
    df.loc[2, "path"] = "/y/p3/s1/a1.jpg"  # two site images end in s1/a1.jpg
    with pytest.raises(DataError, match=r"'root/s1/a1\.jpg' fits more than one image of the "
                                        r"site \(1 such name"):
        split_from_files(df, by_path, tmp_path, DropLog())
    pd.DataFrame({"Path": ["A/p1/s1/a1.jpg", "B/p1/s1/a1.jpg"], "PID": [1, 1]}).to_csv(
        tmp_path / "ts.csv", index=False)
    with pytest.raises(DataError, match=r"1 image\(s\) are named more than once.*'A/p1/s1/a1"
                                        r"\.jpg' in ts\.csv row 2, ts\.csv row 3"):
        split_from_files(df, by_path, tmp_path, DropLog())


def test_age_zero_is_kept_only_when_asked(tmp_path, real):
    row = real[real["ap"] & (real["Age"] == 0)].iloc[:1]  # CheXpert records some ages as 0
    assert len(row) == 1
    frame = pd.DataFrame({"view": ["AP"], "sex": ["Female"], "age": [0.0], "image_id": ["x"]})
    for age_zero, kept in (("drop", 0), ("keep", 1)):
        params = Params.model_validate({**read_tree(ROOT / "params" / "smoke.yaml"),
                                        "data": {**read_tree(ROOT / "params" / "smoke.yaml")[
                                            "data"], "age_zero": age_zero}})
        drops = DropLog()
        assert len(clean_rows(frame, params, drops, "s")) == kept
        assert len(drops.frame()) == 1 - kept


def test_file_split_parameters_validate_and_old_files_serialise_as_before(tmp_path):
    smoke = read_tree(ROOT / "params" / "smoke.yaml")
    dumped = json.loads(Params.model_validate(smoke).to_json())
    assert "age_zero" not in dumped["data"]  # a key at its default is left out, as before it
    keep = Params.model_validate({**smoke, "data": {**smoke["data"], "age_zero": "keep"}})
    assert json.loads(keep.to_json())["data"]["age_zero"] == "keep"
    assert Params.from_json(keep.to_json()) == keep
    train = tmp_path / "tr.csv"
    train.write_text("Path,PID\n")
    for split, words in (
            ({"files": {"train": str(train)}, "patient_column": "PID"}, "exactly one of"),
            ({"files": {"train": str(train)}, "patient_column": "PID", "path_column": "Path",
              "val_fold": 0, "val_fraction": 0.1}, "one of files.val, val_fold"),
            ({"files": {"test": str(train)}, "patient_column": "PID", "path_column": "Path",
              "val_fraction": 0.1}, "needs a 'train' entry"),
            ({"files": {"train": str(train), "test": str(tmp_path / "nowhere.csv.gz")},
              "patient_column": "PID", "path_column": "Path"},
             r"split\.files\.test': split file .*nowhere\.csv\.gz' does not exist"),
            ({"mode": "files"}, "split.mode must be 'random', 'official' or 'file'")):
        with pytest.raises(ParamsError, match=words):
            _params(tmp_path, {"mode": "file", **split})


AUTHORS = ROOT / "data_splits" / "CheXpert"


@pytest.mark.skipif(not (AUTHORS / "cxp_tr.csv.gz").exists(),
                    reason="the authors' split files are not under data_splits/ (README.md)")
def test_the_authors_split_files_give_their_cohort_sizes(tmp_path):
    """FACTS.md: train 72,053 images / 29,517 patients, test 56,448 / 23,842, every image
    frontal AP and found in the CSV, the other 33,089 frontal AP images in neither."""
    params = load_params(ROOT / "params" / "chexpert_metadata_splits.yaml")
    cohort = prepare_cohort(params, RunLayout.open(params), progress=False)
    m = cohort.manifest
    train = m[m["split"].isin(["train", "val"])]
    test = m[m["split"] == "test"]
    assert (len(train), train["patient_id"].nunique()) == (72053, 29517)
    assert (len(test), test["patient_id"].nunique()) == (56448, 23842)
    assert not set(train["patient_id"]) & set(test["patient_id"])
    assert cohort.drop_summary.set_index("reason")["rows"].to_dict() == {
        NOT_IN_SPLIT_FILES: 33089, "view not in ['AP']": 61824}
