"""``python -m cxrlib export-generator``: a run's generator as a folder diffusers loads.

The folder is a diffusers pipeline (``save_pretrained`` of
:class:`cxrlib.diffusion.pipeline.CXRPipeline`: ``model_index.json``, ``unet/`` with the EMA weights
in safetensors, ``scheduler/`` with the training schedule), a one-line ``cxr_pipeline.py`` that
names the pipeline class in the installed cxrlib (diffusers' custom-pipeline hook:
``model_index.json`` names it, and ``trust_remote_code=True`` lets diffusers import it), and a model
card ``README.md``: the training data and its sizes, the training recipe, and the audit's numbers
copied from the run's ``summary.json`` (a number the run did not record is said to be missing). A
collaborator with cxrlib installed runs::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("generator/", trust_remote_code=True)
    images = pipe(age=70, sex="Female", findings=["Cardiomegaly"], num_images=4).images
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from cxrlib.core.cohort import diffusion_rows
from cxrlib.core.files import replace_folder
from cxrlib.core.layout import RunLayout
from cxrlib.core.schema import Params
from cxrlib.core.summary import read_summary
from cxrlib.diffusion.checkpoints import read_checkpoint_state, sampling_checkpoint
from cxrlib.diffusion.pipeline import CXRPipeline

#: The module file in an exported folder that diffusers imports the pipeline class from.
PIPELINE_MODULE = "cxr_pipeline"
#: The audit's entries of ``summary.json`` the model card reports, in this order.
AUDIT_KEYS: tuple[str, ...] = ("fidelity", "sex_fidelity", "age_fidelity", "view_fidelity",
                               "detectability", "memorization")

_MODULE_SOURCE = f'''"""This folder's pipeline class is cxrlib's (pip install cxrlib); diffusers
imports it from here, as model_index.json says, given trust_remote_code=True."""

from cxrlib.diffusion.pipeline import {CXRPipeline.__name__}  # noqa: F401
'''


def export_generator(params: Params, out: Path) -> Path:
    """Write the run's own generator (``sampling.checkpoint_step`` or the latest checkpoint;
    EMA weights) to ``out`` as a diffusers pipeline
    folder with its model card; ``out`` is replaced as a whole. Returns ``out``."""
    run = RunLayout.open(params, create=False)
    ckpt = sampling_checkpoint(run, params)
    pipe = CXRPipeline.from_checkpoint(ckpt, params.diffusion)
    with replace_folder(Path(out)) as tmp:
        pipe.save_pretrained(tmp)
        index_file = tmp / "model_index.json"
        index = json.loads(index_file.read_text())
        index["_class_name"] = [PIPELINE_MODULE, CXRPipeline.__name__]
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (tmp / f"{PIPELINE_MODULE}.py").write_text(_MODULE_SOURCE)
        (tmp / "README.md").write_text(model_card(params, run, ckpt, pipe))
    return Path(out)


def model_card(params: Params, run: RunLayout, checkpoint: Path, pipe: CXRPipeline) -> str:
    """The exported folder's README.md: what the model is, how to use it, what it was trained
    on and how, and what the audit measured."""
    state = read_checkpoint_state(checkpoint)
    n_params = sum(p.numel() for p in pipe.unet.parameters())
    sampling = params.sampling
    with_view = pipe.unet.conditions_on_view
    lines = [
        "---", "library_name: diffusers",
        "tags: [cxrlib, chest-x-ray, ddpm, conditional-image-generation]", "---", "",
        f"# cxrlib conditional chest X-ray generator: run `{run.name}`, {checkpoint.name}", "",
        f"A conditional pixel-space DDPM ({n_params:,} parameters, {run.resolution} px "
        "grayscale) trained with cxrlib. The condition is age, sex, race and the 14 CheXpert "
        f"findings{' and the view (AP or PA)' if with_view else ''} "
        f"({pipe.unet.config.cond_dim} values, `cxrlib.diffusion.condition`); "
        "classifier-free guidance "
        "with weight w (0: the plain conditional model) and rescale phi. Weights: the EMA "
        "weights of "
        f"training checkpoint `{checkpoint.name}` (step {state['step']}). For research on "
        "synthetic data only, not for clinical use.", "",
        "## Use", "",
        "Needs `pip install cxrlib` (the folder's `cxr_pipeline.py` imports the pipeline class "
        "from it; `trust_remote_code=True` lets diffusers run that file). Works offline.", "",
        "```python", "from diffusers import DiffusionPipeline",
        'pipe = DiffusionPipeline.from_pretrained("PATH/TO/THIS/FOLDER", trust_remote_code=True)',
        'images = pipe(age=70, sex="Female", race="White", findings=["Cardiomegaly"], '
        + ('view="PA", ' if with_view else '')
        + f'num_images=4, seed=0, guidance={sampling.guidance:g}, '
        f'sampler="{sampling.sampler}", steps={sampling.steps}).images', "```", "",
        "Each image has its own seed, so an image is the same in any batch and equals "
        "cxrlib's for that seed. The run's synthetic cohorts were generated with sampler "
        f"`{sampling.sampler}`, {sampling.steps} steps, guidance w {sampling.guidance:g}, "
        f"rescale {sampling.guidance_rescale:g}.", "",
        "## Training data", "", *_training_data(params, run), "",
        "## Training recipe", "", *_recipe(state), "",
        "## Audit", "",
        "Copied from the run's `summary.json`; floats rounded to 4 decimals. "
        "The audit (notebook 03) judges synthetic images with a classifier trained on real "
        "images only, against real validation images.", "",
        *_audit(read_summary(run)),
    ]
    return "\n".join(lines) + "\n"


def _training_data(params: Params, run: RunLayout) -> list[str]:
    """The run's sites, and the training rows per site from its manifest (if still there)."""
    sites = [f"- `{s.site}`: reader `{s.reader}`, role {s.role}" for s in params.data.sites]
    if not run.manifest.exists():
        return [*sites, "", f"Sizes: missing (the run's manifest {run.manifest} is not there)."]
    rows = diffusion_rows(params, pd.read_parquet(run.manifest))
    table = rows.groupby("site").agg(images=("image_id", "size"),
                                     patients=("patient_id", "nunique"))
    return [
        "Sites of the run (`phantom` readers are cxrlib's procedural phantoms drawn from public "
        "metadata, not real radiographs):", *sites, "",
        f"The model was trained on the training split of {', '.join(table.index)}"
        + (" (only the patients synthetic images are made for, `diffusion.train_on: sources`)"
           if params.diffusion.train_on == "sources" else "")
        + f": {len(rows):,} images of {rows['patient_id'].nunique():,} patients.", "",
        "| site | images | patients |", "| --- | --- | --- |",
        *[f"| {site} | {r.images:,} | {r.patients:,} |" for site, r in table.iterrows()],
    ]


def _recipe(state: dict) -> list[str]:
    """The checkpoint's identity: steps, processes, seed and the diffusion parameters."""
    spec = state["identity"]["diffusion"]
    return [f"Trained for {state['step']:,} optimiser steps on {state.get('world', 1)} "
            f"process(es), run seed {state['identity']['seed']}; the diffusion parameters "
            "(`diffusion:` of the run's parameter file):", "",
            "| key | value |", "| --- | --- |",
            *[f"| {k} | {json.dumps(v)} |" for k, v in spec.items()]]


def _audit(summary: dict[str, Any]) -> list[str]:
    """A table per :data:`AUDIT_KEYS` entry of the summary; a missing entry is said so."""
    lines = []
    for key in AUDIT_KEYS:
        entry = summary.get(key)
        lines += [f"### {key}", ""]
        if entry is None:
            lines += ["Missing: the run's summary.json has no such entry.", ""]
            continue
        items = entry.items() if isinstance(entry, dict) else [(key, entry)]
        lines += ["| measure | value |", "| --- | --- |",
                  *[f"| {k} | {_fmt(v)} |" for k, v in items], ""]
    return lines


def _fmt(value: Any) -> str:
    """An audit value for a table cell: floats rounded to 4 decimals, null said as missing."""
    if value is None:
        return "missing"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)
