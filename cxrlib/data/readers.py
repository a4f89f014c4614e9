"""Data preparation: readers for every source, one manifest schema, splits and their checks.

Every reader (CheXpert, MIMIC-CXR-JPG, any site's CSV, and the embedded phantom cohort, which
is written as a CheXpert folder and read by the CheXpert reader) returns rows in the manifest
schema of :data:`cxrlib.core.labels.MANIFEST_COLUMNS`: ids, path, patient, study, site, split, view,
sex, age, race and the 14 labels as floats (1, 0, NaN) after the uncertainty policy.

Rows that cannot be used are never dropped silently: each is recorded in a :class:`DropLog`
with its site, source file, row and reason, and the notebook shows the counts.

A site's split is drawn by patient, taken from the dataset's official split, or read from
split files (:class:`cxrlib.core.schema.FileSplitSpec`, :func:`split_from_files`): then the
site's rows no file names are dropped (:data:`NOT_IN_SPLIT_FILES`) and the rows a file names
that the site lacks are logged too (:data:`NOT_IN_SITE`), so the drop table counts both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxrlib.core.config import params_base, resolve_path
from cxrlib.core.files import atomic_write_parquet
from cxrlib.core.labels import CHEXPERT_LABELS, MANIFEST_COLUMNS, RACE_UNKNOWN, map_race, map_sex
from cxrlib.core.layout import RunLayout
from cxrlib.core.schema import FileSplitSpec, Params, SiteSpec, SplitSpec
from cxrlib.data.imagecache import build_cache
from cxrlib.data.phantom import write_phantom_site


class DataError(ValueError):
    """A data source cannot be read as configured; the message says which file and why."""


class SplitLeakError(DataError):
    """A patient appears in more than one split."""


@dataclass
class DropLog:
    """Rows left out of the manifest, with reasons (shown as a table, saved with the run)."""

    records: list[pd.DataFrame] = field(default_factory=list)

    def add(self, rows: pd.DataFrame, reason: str, site: str) -> None:
        if len(rows):
            cols = [c for c in ("image_id", "path", "source_file", "source_row") if c in rows]
            self.records.append(rows[cols].assign(site=site, reason=reason))

    def frame(self) -> pd.DataFrame:
        if not self.records:
            return pd.DataFrame(columns=["image_id", "path", "source_file", "source_row", "site",
                                         "reason"])
        return pd.concat(self.records, ignore_index=True)


def read_csv_checked(path: Path, required: list[str] | tuple[str, ...], **kwargs) -> pd.DataFrame:
    """Read a CSV (optionally gzipped) or Excel file; an unreadable file or a missing column is
    a :class:`DataError` naming the file and the columns."""
    try:
        if path.suffix.lower() in (".xlsx", ".xls"):
            df = pd.read_excel(path, **kwargs)
        else:
            df = pd.read_csv(path, low_memory=False, **kwargs)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except ImportError as exc:
        raise DataError(f"{path}: cannot read this format ({exc}); save it as CSV") from None
    except Exception as exc:  # noqa: BLE001 - any parser failure becomes one clear message
        raise DataError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {missing}; found {list(df.columns)[:20]}"
        )
    return df


def apply_label_policy(labels: pd.DataFrame, uncertainty: str, blank: str) -> pd.DataFrame:
    """CheXpert codes (1, 0, -1, blank) -> floats (1, 0, NaN) by the params' policies.

    ``u-ones``/``u-zeros`` map uncertain to 1/0, ``u-ignore`` to NaN (masked from losses and
    metrics); blank (unmentioned) becomes NaN or 0 as ``blank`` says.
    """
    out = labels.apply(pd.to_numeric, errors="coerce").astype(float)
    bad = (out.notna() & ~out.isin([1.0, 0.0, -1.0])) | (out.isna() & labels.notna())
    if bad.any().any():
        col = bad.any().idxmax()
        example = labels.loc[bad[col], col].iloc[0]
        raise DataError(f"label column '{col}' holds {example!r}; expected 1, 0, -1 or blank")
    if blank == "zero":
        out = out.fillna(0.0)
    return out.replace(-1.0, {"u-ones": 1.0, "u-zeros": 0.0, "u-ignore": np.nan}[uncertainty])


def _normalise_view(values: pd.Series) -> pd.Series:
    v = values.astype(str).str.strip().str.upper()
    return v.map(lambda s: s if s in ("AP", "PA") else "LATERAL" if s in ("LATERAL", "LL", "L")
                 else "OTHER")


_SPLIT_NAMES = {"train": "train", "training": "train", "valid": "val", "val": "val",
                "validate": "val", "validation": "val", "test": "test", "testing": "test"}


def _split_from_name(path: Path, site: SiteSpec) -> str | None:
    """CheXpert's official split from a CSV name (train.csv, valid.csv, test*.csv). Only used
    by ``split.mode: official``; an unrecognised name there is an error, never a silent train."""
    stem = path.name.split(".")[0].lower().replace("chexpert_", "")
    for prefix in ("train", "valid", "val", "test"):
        if stem.startswith(prefix):
            return _SPLIT_NAMES[prefix]
    if site.split.mode == "official":
        raise DataError(f"{path}: cannot tell its official split from the file name; name it "
                        "train*.csv, valid*.csv or test*.csv, or use split.mode: random "
                        f"(site '{site.site}', key data.sites[].csv_files)")
    return None


def _labels_checked(raw: pd.DataFrame, params: Params, site: SiteSpec,
                    where: str) -> pd.DataFrame:
    """The label policy (the site's own blank policy where it has one), with any bad value
    reported against the file it came from."""
    try:
        return apply_label_policy(raw, params.data.uncertainty, site.blank or params.data.blank)
    except DataError as err:
        raise DataError(f"{where}: {err}") from None


def read_chexpert(site: SiteSpec, root: Path, params: Params) -> pd.DataFrame:
    """CheXpert v1.0 / v1.0-small: ``train.csv``/``valid.csv`` (+ optional demographics)."""
    frames = []
    for name in site.csv_files:
        path = resolve_path(name, root)
        df = read_csv_checked(path, ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA",
                                     *CHEXPERT_LABELS])
        df["source_file"] = str(path)
        df["source_row"] = np.arange(len(df)) + 2  # spreadsheet row (header is row 1)
        df["official_split"] = _split_from_name(path, site)
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    rel = df["Path"].astype(str)
    parts = rel.str.split("/", n=1)
    # CheXpert paths start with the dataset folder's name ("CheXpert-v1.0-small/train/...").
    first = parts.str[0]
    strip = first.eq(root.name) | first.str.startswith("CheXpert-v1.0")
    rel = rel.where(~strip, parts.str[1])
    patient = rel.str.extract(r"(patient\d+)")[0]
    study = rel.str.extract(r"(patient\d+/study\d+)")[0]
    view = np.where(df["Frontal/Lateral"].astype(str).str.lower() == "lateral", "LATERAL",
                    _normalise_view(df["AP/PA"].fillna("OTHER")))
    out = pd.DataFrame({
        "image_id": site.site + "/" + rel.str.replace(r"\.[A-Za-z]+$", "", regex=True),
        "path": [str(root / r) for r in rel],
        "patient_id": site.site + "/" + patient.fillna(rel),
        "study_id": site.site + "/" + study.fillna(rel),
        "site": site.site,
        "view": view,
        "sex": df["Sex"].map(map_sex),
        "age": pd.to_numeric(df["Age"], errors="coerce"),
        "race": RACE_UNKNOWN,
        "official_split": df["official_split"],
        "source_file": df["source_file"],
        "source_row": df["source_row"],
    })
    if site.demographics:
        demo_path = resolve_path(site.demographics, root)
        demo = read_csv_checked(demo_path, ["PATIENT", "PRIMARY_RACE"])
        race = demo.drop_duplicates("PATIENT").set_index("PATIENT")["PRIMARY_RACE"].map(map_race)
        out["race"] = patient.map(race).fillna(RACE_UNKNOWN).to_numpy()
    labels = _labels_checked(df[list(CHEXPERT_LABELS)], params, site,
                             ", ".join(str(resolve_path(n, root)) for n in site.csv_files))
    return pd.concat([out, labels.reset_index(drop=True)], axis=1)


def _mimic_path(root: Path, subject: str, study: str, dicom: str) -> str:
    return str(root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg")


def read_mimic(site: SiteSpec, root: Path, params: Params) -> pd.DataFrame:
    """MIMIC-CXR-JPG 2.x: metadata + CheXpert (or NegBio) labels + official split, with sex,
    age at the study and race joined from MIMIC-IV ``patients.csv`` and ``admissions.csv``."""
    files = site.mimic
    meta_path = resolve_path(files.metadata, root)
    meta = read_csv_checked(meta_path, ["dicom_id", "subject_id", "study_id", "ViewPosition"])
    labels = read_csv_checked(resolve_path(files.labels, root),
                              ["subject_id", "study_id", *CHEXPERT_LABELS])
    split = read_csv_checked(resolve_path(files.split, root), ["dicom_id", "split"])
    df = meta.merge(labels, on=["subject_id", "study_id"], how="left", indicator=True)
    df = df.merge(split[["dicom_id", "split"]], on="dicom_id", how="left")
    df["source_file"] = str(meta_path)
    df["source_row"] = np.arange(len(df)) + 2
    subject = df["subject_id"].astype(str)
    study = df["study_id"].astype(str)
    out = pd.DataFrame({
        "image_id": site.site + "/" + df["dicom_id"].astype(str),
        "path": [_mimic_path(root, s, t, d) for s, t, d in zip(subject, study,
                                                                df["dicom_id"].astype(str),
                                                                strict=True)],
        "patient_id": site.site + "/" + subject,
        "study_id": site.site + "/" + study,
        "site": site.site,
        "view": _normalise_view(df["ViewPosition"].fillna("OTHER")),
        "sex": None,
        "age": np.nan,
        "race": RACE_UNKNOWN,
        "official_split": df["split"].map({"train": "train", "validate": "val", "test": "test"}),
        "source_file": df["source_file"],
        "source_row": df["source_row"],
        "_has_labels": (df["_merge"] == "both").to_numpy(),
    })
    if files.patients:
        pat = read_csv_checked(resolve_path(files.patients, root),
                               ["subject_id", "gender", "anchor_age"])
        pat = pat.drop_duplicates("subject_id").set_index("subject_id")
        sid = df["subject_id"]
        out["sex"] = sid.map(pat["gender"]).map(map_sex).to_numpy()
        age = sid.map(pat["anchor_age"]).astype(float)
        if "anchor_year" in pat and "StudyDate" in df:
            # Age at the study: anchor_age is the age in anchor_year (shifted dates in MIMIC).
            year = pd.to_numeric(df["StudyDate"].astype(str).str[:4], errors="coerce")
            shift = year - sid.map(pat["anchor_year"]).astype(float)
            age = age + shift.fillna(0)
        out["age"] = age.to_numpy()
    if files.admissions:
        adm = read_csv_checked(resolve_path(files.admissions, root), ["subject_id", "race"])
        mapped = adm.assign(race=adm["race"].map(map_race))
        known = mapped[mapped["race"] != RACE_UNKNOWN]
        # A subject's race: the most frequent known answer across admissions.
        mode = known.groupby("subject_id")["race"].agg(lambda s: s.value_counts().index[0])
        out["race"] = df["subject_id"].map(mode).fillna(RACE_UNKNOWN).to_numpy()
    lab = _labels_checked(df[list(CHEXPERT_LABELS)], params, site,
                          str(resolve_path(files.labels, root)))
    return pd.concat([out, lab.reset_index(drop=True)], axis=1)


def read_site_csv(site: SiteSpec, root: Path, params: Params) -> pd.DataFrame:
    """Any other site: its CSV file(s) and a column mapping from params (``columns``)."""
    cmap = site.columns
    assert cmap is not None  # guaranteed by SiteSpec validation
    needed = [c for c in (cmap.path, cmap.patient_id, cmap.image_id, cmap.study_id, cmap.view,
                          cmap.sex, cmap.age, cmap.race, cmap.split, *cmap.labels.values()) if c]
    unknown = sorted(set(cmap.labels) - set(CHEXPERT_LABELS))
    if unknown:
        raise DataError(f"site '{site.site}': columns.labels has unknown label names {unknown}")
    return pd.concat([_read_one_csv(site, resolve_path(name, root), root, params, needed)
                      for name in site.csv_files], ignore_index=True)


def _read_one_csv(site: SiteSpec, path: Path, root: Path, params: Params,
                  needed: list[str]) -> pd.DataFrame:
    cmap = site.columns
    assert cmap is not None
    df = read_csv_checked(path, needed)
    rel = df[cmap.path].astype(str)
    n = len(df)
    split = None
    if cmap.split:
        raw = df[cmap.split]
        split = raw.where(raw.isna(), raw.astype(str).str.strip().str.lower()).map(_SPLIT_NAMES)
        bad = raw.notna() & split.isna()
        if bad.any():
            raise DataError(f"{path}: column '{cmap.split}' has split values "
                            f"{sorted(raw[bad].astype(str).unique())[:5]}; use train, val "
                            "(or valid/validation) and test")
    out = pd.DataFrame({
        "image_id": site.site + "/" + (df[cmap.image_id].astype(str) if cmap.image_id
                                       else rel.str.replace(r"\.[A-Za-z]+$", "", regex=True)),
        "path": [str(resolve_path(r, root)) for r in rel],
        "patient_id": site.site + "/" + df[cmap.patient_id].astype(str),
        "study_id": site.site + "/" + (df[cmap.study_id].astype(str) if cmap.study_id
                                       else rel),
        "site": site.site,
        "view": _normalise_view(df[cmap.view]) if cmap.view else "PA",
        "sex": df[cmap.sex].map(map_sex) if cmap.sex else None,
        "age": pd.to_numeric(df[cmap.age], errors="coerce") if cmap.age else np.full(n, np.nan),
        "race": df[cmap.race].map(map_race) if cmap.race else RACE_UNKNOWN,
        "official_split": split,
        "source_file": str(path),
        "source_row": np.arange(n) + 2,
    })
    raw = pd.DataFrame({lab: df[cmap.labels[lab]] if lab in cmap.labels else np.nan
                        for lab in CHEXPERT_LABELS})
    return pd.concat([out, _labels_checked(raw, params, site, str(path))], axis=1)


READERS = {"chexpert": read_chexpert, "mimic": read_mimic, "csv": read_site_csv}


def clean_rows(df: pd.DataFrame, params: Params, drops: DropLog, site: str) -> pd.DataFrame:
    """Drop (and log) rows with unknown sex, missing, zero (unless ``data.age_zero: keep``) or
    implausible age, unwanted views or missing labels."""
    views = params.data.kept_views()
    age_ok = (df["age"] > 0) | ((df["age"] == 0) & (params.data.age_zero == "keep"))
    checks = [
        (df["view"].isin(views), f"view not in {sorted(views)}"),
        (df["sex"].isin(["Male", "Female"]), "sex unknown"),
        (df["age"].notna() & age_ok,
         "age missing or 0" if params.data.age_zero == "drop" else "age missing"),
        (df["age"].isna() | (df["age"] <= 120), "age implausible (>120)"),
    ]
    if "_has_labels" in df:
        checks.append((df["_has_labels"].astype(bool), "no label row for the study"))
    keep = pd.Series(True, index=df.index)
    for ok, reason in checks:
        drops.add(df[keep & ~ok], reason, site)
        keep &= ok
    return df[keep].drop(columns=[c for c in ("_has_labels",) if c in df])


def assign_splits(df: pd.DataFrame, spec: SplitSpec, site: str) -> pd.Series:
    """Patient-level split: ``official`` keeps the dataset's own split column, ``random`` draws
    patients into train/val/test by the fractions with a seeded generator."""
    if spec.mode == "official":
        if df["official_split"].isna().any():
            n = int(df["official_split"].isna().sum())
            raise DataError(f"site '{site}': {n} row(s) have no official split; use "
                            "split.mode: random")
        return df["official_split"].astype(str)
    patients = np.array(sorted(df["patient_id"].unique()))
    rng = np.random.default_rng(spec.seed)
    order = patients[rng.permutation(len(patients))]
    names = [s for s in ("train", "val", "test") if spec.fractions.get(s, 0) > 0]
    cuts = np.cumsum([spec.fractions[s] for s in names]) * len(order)
    bounds = np.round(cuts).astype(int)
    assignment: dict[str, str] = {}
    start = 0
    for name, end in zip(names, bounds, strict=True):
        for p in order[start:end]:
            assignment[p] = name
        start = end
    return df["patient_id"].map(assignment).fillna(names[-1])


#: Drop reasons of a split read from files: a site row no split file names, and a row a
#: split file names that the site does not have (logged with the file's name for it).
NOT_IN_SPLIT_FILES = "not in any split file"
NOT_IN_SITE = "named by a split file, not in the site"
#: How many patients, images or rows an error message names before "...".
NAMED = 5


def _after_first_component(names: pd.Series) -> pd.Series:
    """A path without its first component (``CheXpert-v1.0/train/x.jpg`` -> ``train/x.jpg``);
    a bare file name stays whole."""
    clean = names.str.replace("\\", "/", regex=False).str.replace(r"^(?:\./|/)+", "",
                                                                   regex=True)
    rest = clean.str.split("/", n=1).str[1]
    return rest.where(rest.notna() & (rest != ""), clean)


def _named(values: pd.Series | list, n: int = NAMED) -> str:
    values = list(values)
    return ", ".join(str(v) for v in values[:n]) + (" ..." if len(values) > n else "")


def read_split_files(spec: FileSplitSpec, base: Path) -> pd.DataFrame:
    """Every row of a site's split files: ``name`` (the image as the file names it), ``key``
    (what is matched: the path after its first component, or the id), ``patient``,
    ``split`` (train rows of the validation fold or draw become ``val``), ``source_file`` and
    ``source_row``. An image named twice or a patient in two splits is an error naming them."""
    frames = []
    for split, name in spec.files.items():
        path = resolve_path(name, base)
        fold = split == "train" and spec.val_fold is not None
        cols = [spec.key_column, spec.patient_column, *([spec.fold_column] if fold else [])]
        raw = read_csv_checked(path, cols, dtype={spec.key_column: str,
                                                  spec.patient_column: str})
        blank = raw[spec.key_column].isna() | raw[spec.patient_column].isna()
        if blank.any():
            raise DataError(f"{path}: {int(blank.sum())} row(s) have no {spec.key_column} or "
                            f"{spec.patient_column} (rows {_named(np.flatnonzero(blank) + 2)})")
        frame = pd.DataFrame({
            "name": raw[spec.key_column].str.strip(),
            "patient": raw[spec.patient_column].str.strip(),
            "split": split,
            "source_file": str(path),
            "source_row": np.arange(len(raw)) + 2,
        })
        if fold:
            folds = pd.to_numeric(raw[spec.fold_column], errors="coerce")
            if folds.isna().any():
                raise DataError(f"{path}: column '{spec.fold_column}' must hold fold numbers; "
                                f"rows {_named(np.flatnonzero(folds.isna()) + 2)} do not")
            if not (folds == spec.val_fold).any():
                raise DataError(f"{path}: no row has {spec.fold_column} == {spec.val_fold} "
                                f"(split.val_fold); its folds are {sorted(set(folds.tolist()))}")
            frame.loc[(folds == spec.val_fold).to_numpy(), "split"] = "val"
        frames.append(frame)
    rows = pd.concat(frames, ignore_index=True)
    if spec.val_fraction is not None:
        train = rows["split"] == "train"
        patients = np.array(sorted(rows.loc[train, "patient"].unique()))
        order = np.random.default_rng(spec.seed).permutation(len(patients))
        val = set(patients[order[: max(1, round(spec.val_fraction * len(patients)))]])
        rows.loc[train & rows["patient"].isin(val), "split"] = "val"
    rows["key"] = (_after_first_component(rows["name"]) if spec.path_column else rows["name"])
    twice = rows[rows["key"].duplicated(keep=False)]
    if len(twice):
        first = twice[twice["key"] == twice["key"].iloc[0]]
        raise DataError(f"{twice['key'].nunique()} image(s) are named more than once by the "
                        f"split files, e.g. {first['name'].iloc[0]!r} in "
                        + _named([f"{Path(f).name} row {r}" for f, r in
                                  zip(first["source_file"], first["source_row"], strict=True)]))
    pairs = rows.drop_duplicates(["patient", "split"])
    leaked = pairs[pairs["patient"].duplicated(keep=False)].sort_values(["patient", "split"])
    if len(leaked):
        patients = leaked["patient"].unique()
        named = []
        for patient in patients[:NAMED]:
            mine = leaked[leaked["patient"] == patient]
            files = [f"{s} in {Path(f).name}" for s, f in
                     zip(mine["split"], mine["source_file"], strict=True)]
            named.append(f"{patient} ({', '.join(files)})")
        raise SplitLeakError(f"{len(patients)} patient(s) (column '{spec.patient_column}') "
                             f"are in more than one split: {'; '.join(named)}"
                             f"{' ...' if len(patients) > NAMED else ''}")
    return rows


def _site_keys(df: pd.DataFrame, spec: FileSplitSpec, site: str, depth: int) -> pd.Series:
    """What a split file's key is matched against: the last ``depth`` components of each
    site row's path, or the row's image id without the site's prefix."""
    if spec.id_column:
        return df["image_id"].astype(str).str.slice(len(site) + 1)
    paths = df["path"].astype(str).str.replace("\\", "/", regex=False)
    return pd.Series(["/".join(p.rsplit("/", depth)[-depth:]) for p in paths], index=df.index)


def split_from_files(df: pd.DataFrame, site: SiteSpec, base: Path, drops: DropLog) -> pd.Series:
    """The split of each site row (aligned with ``df``; NaN where no split file names the
    row), read from the site's split files (:func:`read_split_files`). Rows a file names that
    the site lacks are logged in ``drops`` (:data:`NOT_IN_SITE`, with the file and row).
    A name that fits more than one site row is an error naming it."""
    spec = site.split
    assert isinstance(spec, FileSplitSpec)
    files = read_split_files(spec, base)
    depth = files["key"].str.count("/") + 1
    found = pd.Series(-1, index=files.index)
    for d in sorted(depth.unique()) if spec.path_column else [1]:
        at = (depth == d) if spec.path_column else pd.Series(True, index=files.index)
        keys = _site_keys(df, spec, site.site, int(d))
        lookup = pd.Series(np.arange(len(df)), index=keys.to_numpy())
        dupes = lookup.index.duplicated(keep=False)
        ambiguous = files.loc[at, "key"].isin(set(lookup.index[dupes]))
        if ambiguous.any():
            name = files.loc[ambiguous[ambiguous].index[0], "name"]
            raise DataError(f"site '{site.site}': split file name {name!r} fits more than one "
                            f"image of the site ({int(ambiguous.sum())} such name(s)); name "
                            "images by a longer path or by id (split.id_column)")
        lookup = lookup[~dupes]
        found[at] = files.loc[at, "key"].map(lookup).fillna(-1).astype(int)
    missing = files[found < 0]
    if len(missing):
        stem = missing["key"].str.replace(r"\.[A-Za-z]+$", "", regex=True)
        drops.add(pd.DataFrame({"image_id": site.site + "/" + stem, "path": missing["name"],
                                "source_file": missing["source_file"],
                                "source_row": missing["source_row"]}), NOT_IN_SITE, site.site)
    split = np.full(len(df), None, dtype=object)
    hit = found >= 0
    split[found[hit].to_numpy()] = files.loc[hit, "split"].to_numpy()
    return pd.Series(split, index=df.index, name="split")


def check_patient_splits(manifest: pd.DataFrame) -> None:
    """Fail loudly, naming patients, if any patient has images in more than one split."""
    per_patient = manifest.groupby("patient_id")["split"].nunique()
    leaked = per_patient[per_patient > 1]
    if len(leaked):
        names = ", ".join(leaked.index[:10])
        raise SplitLeakError(f"{len(leaked)} patient(s) appear in more than one split: {names}"
                             f"{' ...' if len(leaked) > 10 else ''}")


def check_required_splits(manifest: pd.DataFrame, site: SiteSpec) -> None:
    counts = manifest.loc[manifest["site"] == site.site, "split"].value_counts()
    empty = [s for s in site.split.required if counts.get(s, 0) == 0]
    if empty:
        raise DataError(
            f"site '{site.site}' has no images in split(s) {empty} after filtering "
            f"(rows per split: {counts.to_dict()}); adjust data.sites[].split (fractions or "
            "required) or the view/age filters"
        )


def label_cooccurrence(labels: pd.DataFrame) -> pd.DataFrame:
    """The paper's Figure E1: row r, column c = share of images positive for r that are also
    positive for c (positive means 1.0; -1, 0 and NaN are not positive). A label with no
    positives gives a row of NaN. Returns a square frame indexed by label."""
    pos = (labels.to_numpy(dtype=float) == 1.0).astype(np.float64)
    both = pos.T @ pos
    counts = pos.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = both / counts[:, None]
    share[counts == 0] = np.nan
    return pd.DataFrame(share, index=labels.columns, columns=labels.columns)


@dataclass
class Cohort:
    """What data preparation produced: the manifest, the drop log and where files live."""

    manifest: pd.DataFrame
    drops: pd.DataFrame
    cache_dir: Path | None

    @property
    def drop_summary(self) -> pd.DataFrame:
        """Rows left out per site and reason, with the first few image ids of each."""
        if not len(self.drops):
            return pd.DataFrame(columns=["site", "reason", "rows", "e.g."])
        groups = self.drops.groupby(["site", "reason"])
        return pd.DataFrame({
            "rows": groups.size(),
            "e.g.": groups["image_id"].agg(lambda ids: _named(ids.dropna(), 3)),
        }).reset_index()


def _read_site(site: SiteSpec, params: Params, run: RunLayout, progress: bool) -> pd.DataFrame:
    if site.reader == "phantom":
        assert site.phantom is not None
        root = write_phantom_site(run.phantom(site.site), site.site, site.phantom,
                                  params.run.seed, params.data.race_marginals,
                                  workers=params.data.workers, progress=progress)
        spec = site.model_copy(update={"csv_files": ["train.csv"],
                                       "demographics": "demographics.csv"})
        return read_chexpert(spec, root, params)
    root = resolve_path(site.root or "", params_base(params))
    return READERS[site.reader](site, root, params)


def load_cohort(params: Params, run: RunLayout) -> Cohort:
    """The cohort notebook 01 prepared for this run (an error if it has not run yet)."""
    if not run.manifest.exists():
        raise DataError(f"no manifest at {run.manifest}; run notebook 01 (data preparation) "
                        "for this run first")
    cache_dir = None if params.data.metadata_only else run.image_cache
    drops = pd.read_parquet(run.dropped) if run.dropped.exists() else DropLog().frame()
    return Cohort(pd.read_parquet(run.manifest), drops, cache_dir)


def prepare_cohort(params: Params, run: RunLayout, progress: bool = True) -> Cohort:
    """Read every site, filter, split by patient, check, build the image cache, and write the
    manifest and drop log (:attr:`RunLayout.cohort`).

    Reuses a finished preparation in the same run folder (the run folder guarantees that its
    parameters are the same).
    """
    cache_dir = None if params.data.metadata_only else run.image_cache
    if run.manifest.exists() and run.dropped.exists():
        return load_cohort(params, run)
    run.cohort.mkdir(parents=True, exist_ok=True)
    drops = DropLog()
    parts = []
    for site in params.data.sites:
        df = _read_site(site, params, run, progress)
        if isinstance(site.split, FileSplitSpec):
            # Matched before filtering, so a named row the filters drop counts under its
            # filter's reason, not as missing from the site.
            df["split"] = split_from_files(df, site, params_base(params), drops).to_numpy()
        df = clean_rows(df, params, drops, site.site)
        if isinstance(site.split, FileSplitSpec):
            unnamed = df["split"].isna()
            drops.add(df[unnamed], NOT_IN_SPLIT_FILES, site.site)
            df = df[~unnamed]
        else:
            df["split"] = assign_splits(df, site.split, site.site).to_numpy()
        parts.append(df)
    manifest = pd.concat(parts, ignore_index=True)
    dupes = manifest["image_id"].duplicated()
    drops.add(manifest[dupes], "duplicate image id", "all")
    manifest = manifest[~dupes]
    if cache_dir is not None:
        failed = build_cache(manifest["path"].tolist(), manifest["image_id"].tolist(), cache_dir,
                             params.data.resolution, params.data.workers, progress)
        bad = manifest["image_id"].isin(failed["image_id"])
        lost = manifest[bad].assign(
            why=manifest.loc[bad, "image_id"].map(failed.set_index("image_id")["reason"])
            .str.split(":").str[0])
        for (site_name, reason), rows in lost.groupby(["site", "why"]):
            drops.add(rows, reason, site_name)
        manifest = manifest[~bad]
    check_patient_splits(manifest)
    for site in params.data.sites:
        check_required_splits(manifest, site)
    manifest = manifest[list(MANIFEST_COLUMNS) + ["source_file", "source_row"]]
    manifest = manifest.reset_index(drop=True)
    atomic_write_parquet(drops.frame(), run.dropped)
    atomic_write_parquet(manifest, run.manifest)  # written last: it marks completion
    return Cohort(manifest, drops.frame(), cache_dir)


def describe_sources(params: Params) -> pd.DataFrame:
    """One row per configured site: reader, role, where it comes from, how it is split."""
    rows = []
    for s in params.data.sites:
        if s.reader == "phantom" and s.phantom is not None:
            origin = (f"phantom: {s.phantom.n_images} images from real {s.phantom.metadata} "
                      f"metadata (torchxrayvision), {s.phantom.style} style")
        else:
            origin = str(resolve_path(s.root or "", params_base(params)))
        if isinstance(s.split, FileSplitSpec):
            split = _describe_files(s.split, params_base(params))
        elif s.split.mode == "official":
            split = f"official ({', '.join(s.split.required)} required)"
        else:
            split = ", ".join(f"{k} {v:.0%}" for k, v in s.split.fractions.items())
        rows.append({"site": s.site, "reader": s.reader, "role": s.role, "source": origin,
                     "split (by patient)": split})
    return pd.DataFrame(rows).set_index("site")


def _describe_files(spec: FileSplitSpec, base: Path) -> str:
    """A file split in words: each file with its images and patients, and where validation
    comes from."""
    rows = read_split_files(spec, base)
    parts = []
    for split, name in spec.files.items():
        mine = rows[rows["source_file"] == str(resolve_path(name, base))]
        parts.append(f"{split}: {Path(name).name} ({len(mine):,} images, "
                     f"{mine['patient'].nunique():,} patients)")
    if spec.val_fold is not None:
        parts.append(f"val: {spec.fold_column} {spec.val_fold} of the training file")
    elif spec.val_fraction is not None:
        parts.append(f"val: {spec.val_fraction:.0%} of the training file's patients "
                     f"(seed {spec.seed})")
    return "files: " + "; ".join(parts)
