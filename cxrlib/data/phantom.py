"""The embedded phantom cohort: procedural chest radiographs rendered from real metadata rows.

Real chest X-rays cannot ship, so the default cohort is rendered: each image is one real
metadata row (:mod:`cxrlib.data.metadata`) drawn as a radiograph with anatomy that follows the
row's sex, age and view, a radiologically motivated signature for every positive finding, and the
acquisition style of its site. The renderer works on an attenuation map ``mu`` (denser is
brighter on the film) built from soft masks on a normalised grid (x, y in [0, 1], patient's
right on the image left), then maps it to grey values through the site's detector curve.

Signatures (severity drawn per image; uncertain labels render weakly half the time):
cardiomegaly widens the heart (cardiothoracic ratio up); enlarged cardiomediastinum widens the
upper mediastinum; pleural effusion fills the base with a lateral meniscus; pneumothorax clears
the apex beyond a thin pleural line; consolidation, pneumonia and lung opacity add patchy
airspace density (lobar, multifocal, diffuse); edema adds bilateral perihilar haze; atelectasis
a basal plate with an elevated hemidiaphragm; lung lesion a nodule or mass; fracture a rib step
with callus; support devices tubes, lines, leads or a pacemaker; pleural other a lateral pleural
rind. "No Finding" draws nothing.

A cohort is written as a CheXpert-style folder (``train.csv``, ``demographics.csv`` and JPEG
files) that the ordinary CheXpert reader then reads, so the real-data path runs every time.
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass, replace
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage
from tqdm.auto import tqdm

from cxrlib.core.config import xrv_data_dir
from cxrlib.core.files import atomic_path, atomic_write_text
from cxrlib.core.labels import CHEXPERT_LABELS, RACE_VALUES
from cxrlib.core.schema import PhantomSpec
from cxrlib.data.metadata import METADATA_SOURCES, sample_patients

LUNG_TEMPLATE_SIZE = 48


@dataclass(frozen=True)
class SiteStyle:
    """How a site's scanner and protocol look: detector curve, noise, blur, framing, markers."""

    gamma: float
    contrast: float
    brightness: float
    noise: float
    blur: float
    aspect: float  # width / height of the stored image
    collimation: float  # fraction of the frame lost to collimator shadows, at most
    marker_corner: int  # 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right
    grain: float  # low-frequency film/processing mottle
    #: Prevalence used to draw findings that this site's metadata does not annotate (NaN).
    unannotated_rate: float


STYLES: dict[str, SiteStyle] = {
    "chexpert": SiteStyle(gamma=1.0, contrast=5.0, brightness=0.0, noise=0.05, blur=0.6,
                          aspect=1.0, collimation=0.0, marker_corner=1, grain=0.02,
                          unannotated_rate=0.03),
    "nih": SiteStyle(gamma=0.7, contrast=7.0, brightness=0.06, noise=0.06, blur=1.0,
                     aspect=0.86, collimation=0.12, marker_corner=0, grain=0.05,
                     unannotated_rate=0.12),
    "padchest": SiteStyle(gamma=1.45, contrast=3.6, brightness=-0.05, noise=0.02, blur=0.3,
                          aspect=1.16, collimation=0.05, marker_corner=3, grain=0.08,
                          unannotated_rate=0.05),
}


@lru_cache(maxsize=1)
def lung_templates() -> np.ndarray:
    """Real lung-field shapes: torchxrayvision's 500 v7labs lung masks, cropped to the lungs'
    bounding box and resized to a fixed square (float32, 0..1). Masks that are empty or not two
    lungs side by side are skipped. Decoding takes seconds, so the result is kept in the user's
    cache folder (``$XDG_CACHE_HOME/cxrlib``), keyed by the zip's size and mtime."""
    path = xrv_data_dir() / "semantic_masks_v7labs_lungs.zip"
    stat = path.stat()
    cache_root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cxrlib"
    key = f"{LUNG_TEMPLATE_SIZE}_{stat.st_size}_{int(stat.st_mtime)}"
    cached = cache_root / f"lung_templates_{key}.npy"
    if cached.exists():
        return np.load(cached)
    templates = _decode_lung_masks(path)
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        with atomic_path(cached) as tmp:
            np.save(tmp, templates)
    except OSError:
        pass  # a read-only home only costs the decoding time next run
    return templates


def _decode_lung_masks(path: Path) -> np.ndarray:
    out: list[np.ndarray] = []
    with zipfile.ZipFile(path) as zf:
        for name in sorted(n for n in zf.namelist() if not n.endswith("/")):
            img = Image.open(io.BytesIO(zf.read(name))).convert("L")
            img.draft("L", (256, 256))
            img.thumbnail((192, 192))
            mask = np.asarray(img) > 127
            if mask.mean() < 0.05:
                continue
            ys, xs = np.nonzero(mask)
            crop = mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
            mid = crop.shape[1] // 2
            # Two lungs: the middle column strip must be mostly empty and both halves filled.
            if crop[:, mid - 1: mid + 2].mean() > 0.25 or min(
                crop[:, :mid].mean(), crop[:, mid:].mean()
            ) < 0.15:
                continue
            small = Image.fromarray(crop.astype(np.uint8) * 255).resize(
                (LUNG_TEMPLATE_SIZE, LUNG_TEMPLATE_SIZE), Image.BILINEAR
            )
            out.append(np.asarray(small, dtype=np.float32) / 255.0)
    if not out:
        raise RuntimeError(f"no usable lung masks in {path}")
    return np.stack(out)


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float,
             soft: float) -> np.ndarray:
    """Soft ellipse mask: 1 inside, 0 outside, a logistic edge of width ``soft``."""
    d = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return 1.0 / (1.0 + np.exp(np.minimum((d - 1.0) / soft, 60.0)))


def _blob(x: np.ndarray, y: np.ndarray, cx: float, cy: float, sx: float, sy: float) -> np.ndarray:
    return np.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))


def _line(x: np.ndarray, y: np.ndarray, pts: np.ndarray, width: float) -> np.ndarray:
    """Soft polyline through ``pts`` (k x 2, normalised x/y), Gaussian profile of ``width``."""
    d2 = np.full(x.shape, np.inf)
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:], strict=False):
        vx, vy = x1 - x0, y1 - y0
        t = np.clip(((x - x0) * vx + (y - y0) * vy) / (vx * vx + vy * vy + 1e-12), 0.0, 1.0)
        d2 = np.minimum(d2, (x - x0 - t * vx) ** 2 + (y - y0 - t * vy) ** 2)
    return np.exp(-0.5 * d2 / width**2)


def _severity(value: float, u: np.ndarray, unannotated_rate: float) -> float:
    """Severity of a finding from its label and two uniforms: positive 0.3..1, uncertain weak
    half the time, unannotated (NaN) at the site's base rate, negative 0."""
    if value == 1.0:
        return 0.3 + 0.7 * float(u[0])
    if value == -1.0:
        return 0.15 + 0.25 * float(u[0]) if u[1] < 0.5 else 0.0
    if value != value:  # NaN: the source does not annotate this finding
        return 0.4 + 0.6 * float(u[0]) if u[1] < unannotated_rate else 0.0
    return 0.0


def render_phantom(labels: dict[str, float], sex: str, age: float, view: str, style: SiteStyle,
                   size: int, rng: np.random.Generator) -> np.ndarray:
    """Render one phantom radiograph as uint8 (height ``size``, width ``size * aspect``).

    Anatomy, findings and acquisition draw from separate child streams of ``rng``, and each
    finding from its own, so switching one label changes only that finding's signature.
    """
    anat, find, acq = rng.spawn(3)
    uniforms = find.random((len(CHEXPERT_LABELS), 2))
    finding_rngs = dict(zip(CHEXPERT_LABELS, find.spawn(len(CHEXPERT_LABELS)), strict=True))
    h = size
    w = max(8, int(round(size * style.aspect)))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    y = (yy + 0.5) / h
    x = (xx + 0.5) / w * style.aspect + (1 - style.aspect) / 2  # keep anatomy proportions
    female = sex == "Female"
    old = float(np.clip((age - 20) / 60, 0, 1.2))
    bone = (1.0 - 0.35 * old * (1.3 if female else 1.0)) * anat.uniform(0.85, 1.1)
    sev = {k: _severity(labels.get(k, 0.0), u, style.unannotated_rate)
           for k, u in zip(CHEXPERT_LABELS, uniforms, strict=True)}

    # Body outline and thorax frame; the patient sits slightly off-centre.
    cx = 0.5 + anat.normal(0, 0.015)
    half = (0.36 if not female else 0.33) * anat.uniform(0.93, 1.07)
    top, base = 0.16 + anat.normal(0, 0.015), 0.80 + anat.normal(0, 0.02)
    mu = 0.32 * _ellipse(x, y, cx, 0.58, half + 0.08, 0.62, 0.04)
    mu += 0.12 * _ellipse(x, y, cx, 0.0, half + 0.2, 0.18, 0.05)  # shoulders

    # Lungs from a real mask, placed in the thorax box; the bases are the hemidiaphragms.
    templates = lung_templates()
    tmpl = templates[anat.integers(len(templates))]
    elev_side = int(anat.integers(2))
    lift = 0.08 * sev["Atelectasis"]  # volume loss lifts one hemidiaphragm
    col = (x - (cx - half)) / (2 * half) * (LUNG_TEMPLATE_SIZE - 1)
    base_local = np.where((x < cx) == (elev_side == 0), base - lift, base)
    row = (y - top) / (base_local - top) * (LUNG_TEMPLATE_SIZE - 1)
    lung = ndimage.map_coordinates(tmpl, [row.ravel(), col.ravel()], order=1, cval=0.0)
    lung = lung.reshape(h, w)
    texture = ndimage.gaussian_filter(anat.normal(0, 1, (h, w)).astype(np.float32), 0.9)
    mu -= lung * (0.24 - 0.02 * texture)
    mu += 0.14 * (y > base_local) * _ellipse(x, y, cx, 0.9, half + 0.05, 0.25, 0.05)  # abdomen

    # Mediastinum, heart (projected larger on AP), spine, clavicles and ribs.
    med_w = 0.075 * (1 + 0.6 * sev["Enlarged Cardiomediastinum"]) * anat.uniform(0.8, 1.25)
    mu += 0.26 * _ellipse(x, y, cx + 0.01, 0.33, med_w, 0.2, 0.08)
    ctr = anat.uniform(0.38, 0.52) * (1.12 if view == "AP" else 1.0) * (1 + 0.05 * old)
    ctr *= 1 + 0.35 * sev["Cardiomegaly"]
    heart_rx = ctr * half
    mu += 0.3 * _ellipse(x, y, cx + 0.25 * heart_rx, base - 0.14, heart_rx, 0.15, 0.06)
    mu += 0.18 * bone * (np.abs(x - cx) < 0.03) * (0.8 + 0.2 * np.cos(y * 70))
    for side in (-1, 1):
        pts = np.array([[cx + side * 0.05, 0.17], [cx + side * 0.3, 0.13 + anat.normal(0, 0.01)]])
        mu += 0.12 * bone * _line(x, y, pts, 0.012)
    rib_gap = (base - top) / 9.5
    for i in range(9):
        y0 = top + 0.02 + i * rib_gap
        ribs = 0.5 * np.exp(-0.5 * ((y - y0 - 1.2 * (x - cx) ** 2 - 0.03) / 0.008) ** 2)
        mu += 0.07 * bone * ribs * (np.abs(x - cx) > 0.04) * (np.abs(x - cx) < half)

    # Age and sex: breast shadows over the lower zones; older lungs carry more markings.
    if female:
        for side in (-1, 1):
            mu += anat.uniform(0.06, 0.12) * _ellipse(x, y, cx + side * 0.21, base - 0.02, 0.14,
                                                    0.1, 0.15) * (y > base - 0.1)
    mu += 0.02 * old * lung * texture

    _draw_findings(mu, x, y, lung, sev, cx, half, top, base, bone, finding_rngs)
    return _acquire(mu, style, acq)


def _pick_side(rng: np.random.Generator) -> int:
    return int(rng.choice([-1, 1]))


def _draw_findings(mu: np.ndarray, x: np.ndarray, y: np.ndarray, lung: np.ndarray,
                   sev: dict[str, float], cx: float, half: float, top: float, base: float,
                   bone: float, rngs: dict[str, np.random.Generator]) -> None:
    """Add each finding's signature to the attenuation map, in place.

    Args:
        mu: the attenuation map (h x w, denser = brighter), modified in place.
        x: normalised column coordinate of each pixel (0..1, patient's right on the left).
        y: normalised row coordinate of each pixel (0 top .. 1 bottom).
        lung: soft lung-field mask (h x w, 0..1); airspace findings are confined to it.
        sev: severity of each CheXpert label (0 = absent, up to 1); the heart and mediastinum
            widening and the lifted hemidiaphragm are drawn with the anatomy, not here.
        cx: x of the body's midline.
        half: half-width of the thorax, in x units.
        top: y of the lung apices.
        base: y of the hemidiaphragms (lung bases).
        bone: bone density factor (lower for older and female patients); scales fracture.
        rngs: one random stream per label, so that changing one label changes only its
            signature.
    """
    span = base - top
    if s := sev["Pleural Effusion"]:
        g = rngs["Pleural Effusion"]
        for side in ([_pick_side(g)] if g.random() < 0.6 else [-1, 1]):
            lateral = np.clip(side * (x - cx) / half, 0, 1)
            level = base - span * (0.12 + 0.3 * s) + 0.12 * lateral  # meniscus rises laterally
            fluid = (np.sign(x - cx) == side) * (y > level - 0.2 * lateral ** 2)
            mu += 0.22 * s * fluid * np.clip(lung * 3, 0, 1)
    if s := sev["Pneumothorax"]:
        g = rngs["Pneumothorax"]
        side = _pick_side(g)
        edge = cx + side * half * g.uniform(0.55, 0.8)
        apex = (y < top + span * (0.25 + 0.25 * s)) & ((x - edge) * side > 0)
        mu -= 0.16 * s * apex * np.clip(lung * 2, 0, 1)
        pts = np.array([[edge, top], [edge - side * 0.03, top + span * (0.25 + 0.25 * s)]])
        mu += 0.18 * s * _line(x, y, pts, 0.006)
    if s := sev["Consolidation"]:
        g = rngs["Consolidation"]
        side = _pick_side(g)
        cy = g.uniform(top + 0.3 * span, base - 0.1)
        mu += 0.36 * s * lung * _blob(x, y, cx + side * half * 0.5, cy, 0.09, 0.07)
    if s := sev["Pneumonia"]:
        g = rngs["Pneumonia"]
        for _ in range(int(g.integers(2, 5))):
            px = cx + _pick_side(g) * half * g.uniform(0.25, 0.75)
            mu += 0.22 * s * lung * _blob(x, y, px, g.uniform(top + 0.2, base - 0.05), 0.05, 0.05)
    if s := sev["Lung Opacity"]:
        g = rngs["Lung Opacity"]
        px = cx + _pick_side(g) * half * g.uniform(0.3, 0.7)
        mu += 0.2 * s * lung * _blob(x, y, px, g.uniform(top + 0.2, base - 0.1), 0.13, 0.11)
    if s := sev["Edema"]:
        g = rngs["Edema"]
        for side in (-1, 1):  # bilateral, perihilar "bat wing"
            mu += 0.15 * s * lung * _blob(x, y, cx + side * 0.13, 0.47, 0.1, 0.12)
    if s := sev["Atelectasis"]:
        g = rngs["Atelectasis"]
        side = _pick_side(g)
        cy = base - span * g.uniform(0.12, 0.22)
        band = np.exp(-0.5 * ((y - cy - 0.05 * (x - cx)) / 0.018) ** 2) * (np.sign(x - cx) == side)
        mu += 0.3 * s * band * lung
    if s := sev["Lung Lesion"]:
        g = rngs["Lung Lesion"]
        r = g.uniform(0.025, 0.045) if g.random() < 0.6 else g.uniform(0.06, 0.09)
        px = cx + _pick_side(g) * half * g.uniform(0.3, 0.7)
        mu += (0.2 + 0.25 * s) * _ellipse(x, y, px, g.uniform(top + 0.1, base - 0.15), r, r,
                                          0.12) * (lung > 0.3)
    if s := sev["Fracture"]:
        g = rngs["Fracture"]
        side = _pick_side(g)
        px = cx + side * half * g.uniform(0.55, 0.9)
        py = top + span * g.uniform(0.15, 0.7)
        mu += 0.3 * s * bone * _blob(x, y, px, py, 0.022, 0.014)  # callus
        mu -= 0.12 * s * bone * _blob(x, y, px + side * 0.02, py + 0.01, 0.006, 0.02)  # step
    if s := sev["Support Devices"]:
        g = rngs["Support Devices"]
        kinds = g.random(4) < np.array([0.55, 0.5, 0.5, 0.25])
        if not kinds.any():
            kinds[g.integers(4)] = True
        if kinds[0]:  # endotracheal / nasogastric tube down the midline
            mu += 0.5 * _line(x, y, np.array([[cx, 0.0], [cx + 0.005, top + 0.15 * span]]), 0.007)
        if kinds[1]:  # central venous line from the subclavian vein to the SVC
            side = _pick_side(g)
            pts = np.array([[cx + side * 0.3, 0.13], [cx + side * 0.12, 0.2], [cx + side * 0.03,
                                                                                   0.33]])
            mu += 0.45 * _line(x, y, pts, 0.006)
        if kinds[2]:  # ECG leads
            for _ in range(int(g.integers(2, 5))):
                mu += 0.55 * _ellipse(x, y, g.uniform(0.2, 0.8), g.uniform(0.15, 0.8), 0.018,
                                      0.018, 0.15)
        if kinds[3]:  # pacemaker generator in the left infraclavicular region
            mu += 0.7 * _ellipse(x, y, cx + 0.27, 0.2, 0.05, 0.035, 0.1)
    if s := sev["Pleural Other"]:
        g = rngs["Pleural Other"]
        side = _pick_side(g)
        rim = lung * (1 - ndimage.gaussian_filter(lung, 1.5)) * (np.sign(x - cx) == side)
        mu += 0.3 * s * np.clip(rim * 2.5, 0, 1)


def _acquire(mu: np.ndarray, style: SiteStyle, rng: np.random.Generator) -> np.ndarray:
    """Detector and processing: blur, a logistic contrast curve with the site's gamma, mottle,
    quantum noise, collimation and a burned-in laterality marker; returns uint8."""
    h, w = mu.shape
    if style.blur > 0:
        mu = ndimage.gaussian_filter(mu, style.blur)
    exposure = rng.normal(0, 0.03)
    img = 1.0 / (1.0 + np.exp(-style.contrast * (mu - 0.2 + exposure)))
    img = np.clip(img + style.brightness, 1e-4, 1.0) ** style.gamma
    if style.grain > 0:
        mottle = ndimage.zoom(rng.normal(0, 1, (6, 6)), (h / 6, w / 6), order=1)[:h, :w]
        img = img + style.grain * mottle
    img = img + rng.normal(0, style.noise, (h, w))
    if style.collimation > 0:
        cut_t = int(h * rng.uniform(0, style.collimation))
        cut_b = int(h * rng.uniform(0, style.collimation))
        img[:cut_t] *= 0.25
        img[h - cut_b:] *= 0.25
    m = max(2, h // 16)
    r0 = 1 if style.marker_corner < 2 else h - m - 1
    c0 = 1 if style.marker_corner % 2 == 0 else w - m - 1
    img[r0: r0 + m, c0: c0 + m] = 0.97
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def draw_race(n: int, marginals: dict[str, float], rng: np.random.Generator) -> np.ndarray:
    """Race for phantom rows, drawn from the params' marginals (it has no visual effect)."""
    groups = [g for g in RACE_VALUES if marginals.get(g, 0) > 0]
    p = np.array([marginals[g] for g in groups], dtype=float)
    return rng.choice(groups, size=n, p=p / p.sum())


#: JPEG quality of every stored phantom (the cohort's files and the oracle's renders).
JPEG_QUALITY = 95


def smooth_style(style: SiteStyle) -> SiteStyle:
    """The site's style without detector noise and film grain (the ``oracle_smooth``
    control: what a generator that misses the detector's texture would draw)."""
    return replace(style, noise=0.0, grain=0.0)


def _encoded(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def render_jpeg(labels: dict[str, float], sex: str, age: float, view: str, style: SiteStyle,
                size: int, entropy: int | list[int]) -> bytes:
    """One phantom as the JPEG bytes a site folder holds (labels as raw codes 1, 0, -1, NaN),
    from the random stream ``entropy`` seeds: a site's own images use [seed, site key, row],
    the perfect generator's renders [image seed, ORACLE_STREAM], so the two never share one."""
    return _encoded(render_phantom(labels, sex, age, view, style, size,
                                   np.random.default_rng(entropy)))


def _render_job(args: tuple) -> bytes:
    labels, sex, age, view, style_name, size, seed = args
    return render_jpeg(labels, sex, age, view, STYLES[style_name], size, seed)


#: The second entropy word of every oracle render (see :func:`render_jpeg`).
ORACLE_STREAM = 0x0AC1E


def write_phantom_site(folder: Path, site: str, spec: PhantomSpec, seed: int,
                       race_marginals: dict[str, float], workers: int = 1,
                       progress: bool = True) -> Path:
    """Render a phantom site into a CheXpert-style folder and return it.

    The folder holds ``train.csv`` (CheXpert's columns: Path, Sex, Age, Frontal/Lateral, AP/PA
    and the 14 labels with 1/0/-1/blank), ``demographics.csv`` (CheXpert's demographics columns)
    and ``train/patientX/studyY/viewZ_frontal.jpg``. Deterministic for (seed, site). A folder
    that is already complete (its ``train.csv`` is written last) is reused.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "train.csv").exists():
        return folder
    site_key = int.from_bytes(site.encode()[:8].ljust(8, b"\0"), "little")
    rng = np.random.default_rng([seed, site_key])
    meta = sample_patients(METADATA_SOURCES[spec.metadata](), spec.n_images, rng)
    race = draw_race(len(meta), race_marginals, rng)
    patient_codes = {p: f"patient{i + 1:05d}" for i, p in enumerate(dict.fromkeys(meta["patient"]))}
    rows, jobs = [], []
    study_counter: dict[str, int] = {}
    for i, rec in enumerate(meta.itertuples(index=False)):
        code = patient_codes[rec.patient]
        study_counter[code] = study_counter.get(code, 0) + 1
        rel = f"train/{code}/study{study_counter[code]}/view1_frontal.jpg"
        labels = {k: float(v) for k, v in zip(CHEXPERT_LABELS, rec[4:], strict=True)}
        jobs.append((labels, rec.sex, float(rec.age), rec.view, spec.style, spec.image_size,
                     [seed, site_key, i]))
        rows.append({"Path": f"{folder.name}/{rel}", "Sex": rec.sex, "Age": rec.age,
                     "Frontal/Lateral": "Frontal", "AP/PA": rec.view,
                     **{k: (np.nan if v != v else v) for k, v in labels.items()}})
    ctx = get_context("fork")
    lung_templates()  # load once before forking so workers share it
    pool = ctx.Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_render_job, jobs, chunksize=64) if pool else map(_render_job, jobs)
        for row, data in tqdm(zip(rows, results, strict=True), total=len(rows),
                              desc=f"render {site}", disable=not progress):
            dest = folder / row["Path"].split("/", 1)[1]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
    finally:
        if pool:
            pool.close()
            pool.join()
    demo = pd.DataFrame({"PATIENT": list(patient_codes.values())})
    first = pd.DataFrame(rows).assign(PATIENT=[r["Path"].split("/")[2] for r in rows],
                                      RACE=race).drop_duplicates("PATIENT")
    demo = demo.merge(first[["PATIENT", "Sex", "Age", "RACE"]], on="PATIENT")
    demo = demo.rename(columns={"Sex": "GENDER", "Age": "AGE_AT_CXR", "RACE": "PRIMARY_RACE"})
    demo["ETHNICITY"] = "Unknown"
    atomic_write_text(folder / "demographics.csv", demo.to_csv(index=False))
    atomic_write_text(folder / "train.csv", pd.DataFrame(rows).to_csv(index=False))
    return folder
