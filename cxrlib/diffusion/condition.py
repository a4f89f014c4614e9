"""The diffusion model's condition vector: one definition shared by training and sampling.

Layout (22 values, as in the authors' code; 23 with ``diffusion.condition_on_view``):

====== ===================================================================================
index  meaning
====== ===================================================================================
0      age in decades, ``age // 10`` (a number, not one-hot)
1-2    sex one-hot: Male, Female
3-7    race one-hot over :data:`cxrlib.core.labels.RACE_GROUPS` (Other/Unknown: all zeros)
8-21   the 14 CheXpert labels in :data:`cxrlib.core.labels.CHEXPERT_LABELS` order; a NaN label
       (uncertain under ``u-ignore``, or not annotated) is encoded as ``nan_value``
22     only with the view: the view, :data:`cxrlib.core.labels.VIEW_CODES` (AP 1, PA 0)
====== ===================================================================================

Whether the view is there is the one switch of the layout (``with_view``): training takes it
from ``diffusion.condition_on_view``, and a trained model tells it by its condition width
(:attr:`cxrlib.diffusion.network.ConditionalUNet.conditions_on_view`, from
:func:`layout_with_view`), so sampling encodes conditions as the model was trained.
:class:`ConditionEmbedding` maps the vector through Linear(22 or 23, D)-SiLU-Linear(D, D) to the
width D of the UNet's timestep embedding, to which diffusers adds it
(``class_embed_type="identity"``). A learned null embedding replaces it for a random share of
training images (classifier-free guidance) and for the unconditional branch at sampling time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

from cxrlib.core.labels import (
    CHEXPERT_LABELS,
    RACE_GROUPS,
    RACE_UNKNOWN,
    RACE_VALUES,
    SEXES,
    VIEW_CODES,
)

AGE_SLICE = slice(0, 1)
SEX_SLICE = slice(1, 1 + len(SEXES))
RACE_SLICE = slice(SEX_SLICE.stop, SEX_SLICE.stop + len(RACE_GROUPS))
LABEL_SLICE = slice(RACE_SLICE.stop, RACE_SLICE.stop + len(CHEXPERT_LABELS))
COND_DIM = LABEL_SLICE.stop  # 22: the authors' layout, without the view
VIEW_INDEX = COND_DIM  # after the labels, in the 23-value layout only


def cond_dim(with_view: bool) -> int:
    """The condition vector's width: the authors' 22 values, 23 with the view."""
    return COND_DIM + int(with_view)


def layout_with_view(width: int) -> bool:
    """Whether a condition width (a model's ``cond_dim``) is the layout with the view."""
    if width not in (cond_dim(False), cond_dim(True)):
        raise ValueError(f"a condition vector has {cond_dim(False)} values (or "
                         f"{cond_dim(True)} with the view), not {width}")
    return width == cond_dim(True)


def condition_row(age: float, sex: str, race: str,
                  findings: Mapping[str, float] | Iterable[str],
                  view: str | None = None) -> pd.DataFrame:
    """One manifest-like row for :func:`encode_conditions` from readable values: ``findings``
    names the labels present (the others absent), or maps labels to 1, 0 or NaN (uncertain;
    labels not named are absent); ``view`` (AP or PA) only for a model that conditions on it.
    Unknown names fail listing the valid ones."""
    if sex not in SEXES:
        raise ValueError(f"unknown sex '{sex}'; use one of {SEXES}")
    if race not in RACE_VALUES:
        raise ValueError(f"unknown race '{race}'; use one of {RACE_VALUES}")
    if view is not None and view not in VIEW_CODES:
        raise ValueError(f"unknown view '{view}'; use one of {tuple(VIEW_CODES)}")
    values = (dict(findings) if isinstance(findings, Mapping)
              else dict.fromkeys(findings, 1.0))
    unknown = sorted(set(values) - set(CHEXPERT_LABELS))
    if unknown:
        raise ValueError(f"unknown finding(s) {unknown}; use {CHEXPERT_LABELS}")
    row = {"age": float(age), "sex": sex, "race": race}
    row.update({lab: float(values.get(lab, 0.0)) for lab in CHEXPERT_LABELS})
    if view is not None:
        row["view"] = view
    return pd.DataFrame([row])


def encode_conditions(rows: pd.DataFrame, nan_value: float = 0.0,
                      with_view: bool = False) -> np.ndarray:
    """Manifest rows (age, sex, race, 14 labels; ``view`` too ``with_view``) -> float32
    condition vectors (n x :func:`cond_dim`). A view other than AP or PA fails naming it."""
    needed = ("age", "sex", "race", *CHEXPERT_LABELS, *(("view",) if with_view else ()))
    missing = [c for c in needed if c not in rows]
    if missing:
        raise KeyError(f"condition encoding needs columns {missing}")
    out = np.zeros((len(rows), cond_dim(with_view)), dtype=np.float32)
    out[:, AGE_SLICE.start] = np.floor(rows["age"].to_numpy(dtype=float) / 10.0)
    sex = rows["sex"].to_numpy()
    for j, name in enumerate(SEXES):
        out[:, SEX_SLICE.start + j] = sex == name
    race = rows["race"].to_numpy()
    for j, name in enumerate(RACE_GROUPS):
        out[:, RACE_SLICE.start + j] = race == name
    labels = rows[list(CHEXPERT_LABELS)].to_numpy(dtype=float)
    out[:, LABEL_SLICE] = np.where(np.isnan(labels), nan_value, labels)
    if with_view:
        view = rows["view"]
        unknown = sorted(set(view) - set(VIEW_CODES), key=str)
        if unknown:
            raise ValueError(
                f"view {unknown} cannot be encoded: diffusion.condition_on_view encodes "
                f"{' and '.join(f'{v} as {c:g}' for v, c in VIEW_CODES.items())} only; keep "
                "frontal AP and PA images (data.views: [AP, PA]) or set "
                "diffusion.condition_on_view to false")
        out[:, VIEW_INDEX] = view.map(VIEW_CODES).to_numpy(dtype=np.float32)
    return out


def decode_condition(vec: np.ndarray) -> dict[str, object]:
    """One condition vector -> readable fields (age decade, sex, race, positive labels, and
    the view where the vector holds one)."""
    sex_idx = vec[SEX_SLICE]
    race_idx = vec[RACE_SLICE]
    labels = vec[LABEL_SLICE]
    out = {
        "age_decade": int(vec[AGE_SLICE.start]),
        "sex": SEXES[int(np.argmax(sex_idx))] if sex_idx.max() > 0 else None,
        "race": RACE_GROUPS[int(np.argmax(race_idx))] if race_idx.max() > 0 else RACE_UNKNOWN,
        "labels": {name: float(v) for name, v in zip(CHEXPERT_LABELS, labels, strict=True)},
    }
    if layout_with_view(len(vec)):
        out["view"] = "AP" if vec[VIEW_INDEX] >= 0.5 else "PA"
    return out


def describe_condition(vec: np.ndarray) -> str:
    """A short caption: ``M 60s White | Cardiomegaly, Edema`` (``M 60s White AP | ...`` with
    the view)."""
    d = decode_condition(vec)
    pos = [k for k, v in d["labels"].items() if v >= 0.5]  # type: ignore[union-attr]
    sex = (d["sex"] or "?")[0]  # type: ignore[index]
    view = f" {d['view']}" if "view" in d else ""
    return f"{sex} {10 * d['age_decade']}s {d['race']}{view} | {', '.join(pos) or 'no labels'}"


class ConditionEmbedding(nn.Module):
    """Linear(cond_dim, D)-SiLU-Linear(D, D) with a learned null embedding for guidance."""

    def __init__(self, embed_dim: int, cond_dim: int = COND_DIM):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(cond_dim, embed_dim), nn.SiLU(),
                                 nn.Linear(embed_dim, embed_dim))
        self.null = nn.Parameter(torch.zeros(embed_dim))

    def forward(self, cond: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Embed ``cond`` (n x cond_dim); rows where ``drop`` is True get the null embedding.
        Vectors of the other layout fail saying which the model was trained with."""
        width = self.mlp[0].in_features
        if cond.shape[-1] != width:
            raise ValueError(
                f"condition vectors have {cond.shape[-1]} values but this model takes {width} "
                f"({cond_dim(False)} without the view, {cond_dim(True)} with it: "
                "diffusion.condition_on_view); encode them with "
                f"encode_conditions(..., with_view={width == cond_dim(True)})")
        emb = self.mlp(cond)
        if drop is not None:
            emb = torch.where(drop[:, None], self.null.to(emb.dtype).expand_as(emb), emb)
        return emb


def dropout_mask(n: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Which of ``n`` training images get the null condition (Bernoulli(rate))."""
    return torch.rand(n, generator=generator) < rate


def layout_table(with_view: bool = False) -> pd.DataFrame:
    """The condition vector's layout, one row per position (for the notebook)."""
    rows = [{"index": AGE_SLICE.start, "block": "age", "meaning": "age // 10 (decades)"}]
    rows += [{"index": SEX_SLICE.start + j, "block": "sex", "meaning": s}
             for j, s in enumerate(SEXES)]
    rows += [{"index": RACE_SLICE.start + j, "block": "race", "meaning": r}
             for j, r in enumerate(RACE_GROUPS)]
    rows += [{"index": LABEL_SLICE.start + j, "block": "label", "meaning": lab}
             for j, lab in enumerate(CHEXPERT_LABELS)]
    if with_view:
        rows.append({"index": VIEW_INDEX, "block": "view",
                     "meaning": ", ".join(f"{v} = {c:g}" for v, c in VIEW_CODES.items())})
    return pd.DataFrame(rows).set_index("index")
