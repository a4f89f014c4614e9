"""The run's headline numbers in one JSON file, :attr:`cxrlib.core.layout.RunLayout.summary`.

Each stage adds its own keys (notebook 03 the generator's fidelity, texture and
detectability, notebook 05 the baseline, the primary comparisons, the manipulation checks,
the paper's claims and each arm's protocol and steps, the pipeline the stage times and, from
the stages' training histories, the precision each stage trained in: :func:`stage_precisions`);
:func:`update_summary` merges them atomically, so a stage never loses what another wrote.
The pipeline copies the file to ``reports/<run>/summary.json`` beside the rendered pages. No
torch here.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd

from cxrlib.core.files import atomic_write_text
from cxrlib.core.layout import STAGES, RunLayout

#: Keys every finished run's summary holds, and the type of each (issue 11's schema).
SCHEMA: dict[str, type | tuple[type, ...]] = {
    "minutes_total": (int, float),
    "minutes_per_stage": dict,
    "precision": dict,
    "fidelity": dict,
    "sex_fidelity": dict,
    "texture_hf_ratio": dict,
    "detectability_auroc": dict,
    "baseline_internal_macro_auroc": (int, float),
    "internal_test_images": int,
    "seeds": list,
    "optimizer_steps": dict,
    "kept_step": dict,
    "protocol": dict,
    "primary": list,
    "manipulation_checks": list,
    "claims": list,
    "exchange_rate": dict,
    "worth_vs_perfect": dict,  # {generator arm: ratio and paired difference to the oracle's}
    "labels": dict,  # {"arms": {experiment: label}, "test_sets": {test set: label}}
    "provenance": dict,  # cxrlib.core.provenance.provenance: images, date, commit, machine
}
#: Keys inside the nested entries.
NESTED: dict[str, tuple[str, ...]] = {
    "fidelity": ("synthetic_macro_auroc", "real_macro_auroc", "ratio"),
    "sex_fidelity": ("synthetic_auroc", "real_auroc"),
    "texture_hf_ratio": ("value", "ci_low", "ci_high"),
    "detectability_auroc": ("value", "ci_low", "ci_high"),
}
#: Keys of each row of the list entries: a primary comparison (``mde`` and ``mde_holm`` from
#: t at its df, at alpha and at its family's first Holm level; ``df`` null = infinite, one
#: seed), a manipulation check, a claim.
PRIMARY_KEYS: tuple[str, ...] = ("experiment", "baseline", "test_set", "delta", "ci_low",
                                 "ci_high", "df", "p", "p_holm", "mde", "mde_holm", "verdict")
CHECK_KEYS: tuple[str, ...] = ("experiment", "baseline", "check", "expected", "test_set",
                               "delta", "ci_low", "ci_high", "verdict", "held")
CLAIM_KEYS: tuple[str, ...] = ("claim", "statement", "test_set", "tested", "delta", "ci_low",
                               "ci_high", "mde", "mde_holm", "verdict", "confounds",
                               "exchange_rate", "exchange_ci_low", "exchange_ci_high",
                               "exchange_extrapolated")
ROW_KEYS: dict[str, tuple[str, ...]] = {"primary": PRIMARY_KEYS,
                                        "manipulation_checks": CHECK_KEYS,
                                        "claims": CLAIM_KEYS}


def read_summary(run: RunLayout) -> dict[str, Any]:
    """The run's summary so far (empty when no stage has written one)."""
    return json.loads(run.summary.read_text()) if run.summary.exists() else {}


def _plain(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN to None, tuples to lists, recursively."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def update_summary(run: RunLayout, **entries: Any) -> dict[str, Any]:
    """Merge ``entries`` (top-level keys, replaced whole) into the run's summary; atomic."""
    summary = {**read_summary(run), **_plain(entries)}
    atomic_write_text(run.summary, json.dumps(summary, indent=1, sort_keys=True))
    return summary


def stage_precisions(run: RunLayout) -> dict[str, str]:
    """The precision each stage trained in, from its training histories' ``precision``
    column (:meth:`RunLayout.training_histories`): ``{"02_diffusion_training": "bf16 autocast
    (CPU bf16 units: avx512_bf16)", ...}``, the distinct values joined by ``; `` (a run resumed
    on another machine has two). Stages that trained nothing, or wrote no such column, are
    left out."""
    found = {}
    for stage in STAGES:
        values = [v for path in run.training_histories(stage)
                  for v in pd.read_csv(path, usecols=lambda c: c == "precision")
                  .get("precision", pd.Series(dtype=object)).dropna()]
        if values:
            found[stage] = "; ".join(dict.fromkeys(values))
    return found


def schema_problems(summary: dict[str, Any]) -> list[str]:
    """What a finished run's summary lacks or has of the wrong type (empty when it is whole)."""
    problems = []
    for key, kind in SCHEMA.items():
        if key not in summary:
            problems.append(f"missing key '{key}'")
        elif not isinstance(summary[key], kind) or isinstance(summary[key], bool):
            problems.append(f"key '{key}' is {type(summary[key]).__name__}")
    for key, inner in NESTED.items():
        entry = summary.get(key)
        if isinstance(entry, dict):
            problems += [f"key '{key}.{k}' missing" for k in inner if k not in entry]
    for key, inner in ROW_KEYS.items():
        for i, row in enumerate(summary.get(key) or []):
            missing = [k for k in inner if k not in row]
            if missing:
                problems.append(f"{key}[{i}] lacks {missing}")
    if isinstance(summary.get("claims"), list) and not summary["claims"]:
        problems.append("key 'claims' is empty (every claim has a row, tested or not)")
    return problems
