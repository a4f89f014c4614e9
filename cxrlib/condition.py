"""The diffusion model's condition vector: one definition shared by training and sampling.

Layout (22 values, as in the authors' code):

====== ===================================================================================
index  meaning
====== ===================================================================================
0      age in decades, ``age // 10`` (a number, not one-hot)
1-2    sex one-hot: Male, Female
3-7    race one-hot over :data:`cxrlib.labels.RACE_GROUPS` (Other/Unknown: all zeros)
8-21   the 14 CheXpert labels in :data:`cxrlib.labels.CHEXPERT_LABELS` order; a NaN label
       (uncertain under ``u-ignore``, or not annotated) is encoded as ``nan_value``
====== ===================================================================================

:class:`ConditionEmbedding` maps it through Linear(22, D)-SiLU-Linear(D, D) to the width D of
the UNet's timestep embedding, to which diffusers adds it (``class_embed_type="identity"``).
A learned null embedding replaces it for a random share of training images (classifier-free
guidance) and for the unconditional branch at sampling time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

from cxrlib.labels import CHEXPERT_LABELS, RACE_GROUPS, RACE_UNKNOWN, RACE_VALUES, SEXES

AGE_SLICE = slice(0, 1)
SEX_SLICE = slice(1, 1 + len(SEXES))
RACE_SLICE = slice(SEX_SLICE.stop, SEX_SLICE.stop + len(RACE_GROUPS))
LABEL_SLICE = slice(RACE_SLICE.stop, RACE_SLICE.stop + len(CHEXPERT_LABELS))
COND_DIM = LABEL_SLICE.stop  # 22


def condition_row(age: float, sex: str, race: str,
                  findings: Mapping[str, float] | Iterable[str]) -> pd.DataFrame:
    """One manifest-like row for :func:`encode_conditions` from readable values: ``findings``
    names the labels present (the others absent), or maps labels to 1, 0 or NaN (uncertain;
    labels not named are absent). Unknown names fail listing the valid ones."""
    if sex not in SEXES:
        raise ValueError(f"unknown sex '{sex}'; use one of {SEXES}")
    if race not in RACE_VALUES:
        raise ValueError(f"unknown race '{race}'; use one of {RACE_VALUES}")
    values = (dict(findings) if isinstance(findings, Mapping)
              else dict.fromkeys(findings, 1.0))
    unknown = sorted(set(values) - set(CHEXPERT_LABELS))
    if unknown:
        raise ValueError(f"unknown finding(s) {unknown}; use {CHEXPERT_LABELS}")
    row = {"age": float(age), "sex": sex, "race": race}
    row.update({lab: float(values.get(lab, 0.0)) for lab in CHEXPERT_LABELS})
    return pd.DataFrame([row])


def encode_conditions(rows: pd.DataFrame, nan_value: float = 0.0) -> np.ndarray:
    """Manifest rows (age, sex, race, 14 labels) -> float32 condition vectors (n x 22)."""
    missing = [c for c in ("age", "sex", "race", *CHEXPERT_LABELS) if c not in rows]
    if missing:
        raise KeyError(f"condition encoding needs columns {missing}")
    out = np.zeros((len(rows), COND_DIM), dtype=np.float32)
    out[:, AGE_SLICE.start] = np.floor(rows["age"].to_numpy(dtype=float) / 10.0)
    sex = rows["sex"].to_numpy()
    for j, name in enumerate(SEXES):
        out[:, SEX_SLICE.start + j] = sex == name
    race = rows["race"].to_numpy()
    for j, name in enumerate(RACE_GROUPS):
        out[:, RACE_SLICE.start + j] = race == name
    labels = rows[list(CHEXPERT_LABELS)].to_numpy(dtype=float)
    out[:, LABEL_SLICE] = np.where(np.isnan(labels), nan_value, labels)
    return out


def decode_condition(vec: np.ndarray) -> dict[str, object]:
    """One condition vector -> readable fields (age decade, sex, race, positive labels)."""
    sex_idx = vec[SEX_SLICE]
    race_idx = vec[RACE_SLICE]
    labels = vec[LABEL_SLICE]
    return {
        "age_decade": int(vec[AGE_SLICE.start]),
        "sex": SEXES[int(np.argmax(sex_idx))] if sex_idx.max() > 0 else None,
        "race": RACE_GROUPS[int(np.argmax(race_idx))] if race_idx.max() > 0 else RACE_UNKNOWN,
        "labels": {name: float(v) for name, v in zip(CHEXPERT_LABELS, labels, strict=True)},
    }


def describe_condition(vec: np.ndarray) -> str:
    """A short caption: ``M 60s White | Cardiomegaly, Edema``."""
    d = decode_condition(vec)
    pos = [k for k, v in d["labels"].items() if v >= 0.5]  # type: ignore[union-attr]
    sex = (d["sex"] or "?")[0]  # type: ignore[index]
    return f"{sex} {10 * d['age_decade']}s {d['race']} | {', '.join(pos) or 'no labels'}"


class ConditionEmbedding(nn.Module):
    """Linear(22, D)-SiLU-Linear(D, D) with a learned null embedding for guidance."""

    def __init__(self, embed_dim: int, cond_dim: int = COND_DIM):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(cond_dim, embed_dim), nn.SiLU(),
                                 nn.Linear(embed_dim, embed_dim))
        self.null = nn.Parameter(torch.zeros(embed_dim))

    def forward(self, cond: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Embed ``cond`` (n x 22); rows where ``drop`` is True get the null embedding."""
        emb = self.mlp(cond)
        if drop is not None:
            emb = torch.where(drop[:, None], self.null.to(emb.dtype).expand_as(emb), emb)
        return emb


def dropout_mask(n: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Which of ``n`` training images get the null condition (Bernoulli(rate))."""
    return torch.rand(n, generator=generator) < rate


def layout_table() -> pd.DataFrame:
    """The condition vector's layout, one row per position (for the notebook)."""
    rows = [{"index": AGE_SLICE.start, "block": "age", "meaning": "age // 10 (decades)"}]
    rows += [{"index": SEX_SLICE.start + j, "block": "sex", "meaning": s}
             for j, s in enumerate(SEXES)]
    rows += [{"index": RACE_SLICE.start + j, "block": "race", "meaning": r}
             for j, r in enumerate(RACE_GROUPS)]
    rows += [{"index": LABEL_SLICE.start + j, "block": "label", "meaning": lab}
             for j, lab in enumerate(CHEXPERT_LABELS)]
    return pd.DataFrame(rows).set_index("index")
