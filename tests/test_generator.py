"""The generator as a diffusers pipeline: export, loading in a fresh process, same images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from cxrlib.__main__ import main
from cxrlib.core.cohort import training_rows
from cxrlib.core.config import load_params
from cxrlib.core.layout import RunLayout
from cxrlib.core.summary import update_summary
from cxrlib.data.imagecache import ImageCache
from cxrlib.data.readers import prepare_cohort
from cxrlib.diffusion.checkpoints import load_weights
from cxrlib.diffusion.condition import condition_row, encode_conditions
from cxrlib.diffusion.network import noise_scheduler
from cxrlib.diffusion.pipeline import CXRPipeline
from cxrlib.diffusion.samplers import generate
from cxrlib.diffusion.training import train_diffusion
from cxrlib.synthetic.cohorts import diffusion_source, generate_cohort, replica_plan

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "params" / "smoke.yaml"
#: Two settings the fresh process samples: deterministic DPM-Solver++ with guidance and
#: rescale, and ancestral DDPM (step noise from each image's generator).
CALLS = [
    {"age": 71, "sex": "Female", "race": "Asian", "findings": ["Cardiomegaly", "Edema"],
     "seed": [3, 11, 12], "guidance": 1.0, "guidance_rescale": 0.7, "sampler": "dpmpp",
     "steps": 3},
    {"age": 45, "sex": "Male", "race": "White", "findings": ["No Finding"], "seed": 5,
     "num_images": 2, "guidance": 0.0, "guidance_rescale": 0.0, "sampler": "ddpm",
     "steps": 2},
]
#: Run in a fresh interpreter: only diffusers and cxrlib are imported.
LOADER = """
import json, sys
from diffusers import DiffusionPipeline
folder, out, calls = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
for i, call in enumerate(calls):
    pipe(**call, output_type="np").images.tofile(f"{out}/{i}.u8")
import cxrlib, cxrlib.synthetic.explorer, cxrlib.synthetic.cohorts, cxrlib.synthetic.audit.run
print(json.dumps({"pipeline": type(pipe).__name__, "cxrlib": cxrlib.__file__,
                  "trainer_imported": "cxrlib.diffusion.training" in sys.modules,
                  "checkpoint": pipe.config.checkpoint}))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory, one_torch_thread):
    """The smoke model trained for 4 steps, a summary with one audit entry, and the folder
    ``export-generator`` writes from them."""
    runs = tmp_path_factory.mktemp("runs")
    out = tmp_path_factory.mktemp("export") / "generator"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CXRLIB_RUNS_DIR", str(runs))
        params = load_params(SMOKE)
        run = RunLayout.open(params)
        cohort = prepare_cohort(params, run, progress=False)
        outcome = train_diffusion(params, cohort.manifest, ImageCache(cohort.cache_dir), run,
                                  progress=False)
        update_summary(run, fidelity={"synthetic_macro_auroc": 0.78627717, "ratio": 0.96096,
                                      "ratio_ci": [0.91992, 1.00282]})
        assert main(["export-generator", "--params", str(SMOKE), "--out", str(out)]) == 0
    return params, cohort.manifest, run, outcome.checkpoint, out


def test_exported_folder_is_a_diffusers_pipeline_of_the_ema_weights(exported):
    _, _, _, ckpt, out = exported
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ["cxr_pipeline", "CXRPipeline"]
    assert index["unet"] == ["cxrlib.diffusion.network", "ConditionalUNet"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert index["checkpoint"] == ckpt.name
    weights = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    ema = load_file(ckpt / "ema.safetensors")
    assert set(ema) <= set(weights)  # the checkpoint's keys; buffers besides
    assert all(np.array_equal(weights[k].numpy(), ema[k].numpy()) for k in ema)
    assert not list(out.glob("**/*.bin")) and not list(out.glob("**/*.pt"))


def test_diffusers_in_a_fresh_process_reproduces_cxrlib_images(exported, tmp_path):
    params, _, _, ckpt, out = exported
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", LOADER, str(out), str(tmp_path),
                           json.dumps(CALLS)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["pipeline"] == "CXRPipeline" and info["checkpoint"] == ckpt.name
    assert Path(info["cxrlib"]).is_relative_to(ROOT)  # this checkout's cxrlib, not another
    assert not info["trainer_imported"]  # sampling needs the network, not the trainer
    model, sched = load_weights(ckpt), noise_scheduler(params.diffusion)
    for i, call in enumerate(CALLS):
        seeds = call["seed"] if isinstance(call["seed"], list) else [5, 6]
        cond = encode_conditions(condition_row(call["age"], call["sex"], call["race"],
                                               call["findings"]))
        ours = generate(model, sched, np.repeat(cond, len(seeds), axis=0), seeds,
                        call["sampler"], call["steps"], call["guidance"],
                        call["guidance_rescale"])
        theirs = np.fromfile(tmp_path / f"{i}.u8", dtype=np.uint8).reshape(ours.shape)
        assert np.array_equal(theirs, ours), f"call {i}: diffusers' images differ"
        assert len(np.unique(ours)) > 10  # images, not a constant


def test_model_card_reports_data_recipe_and_audit_without_inventing(exported):
    params, manifest, _, ckpt, out = exported
    card = (out / "README.md").read_text()
    rows = training_rows(params, manifest)
    assert card.startswith("---\nlibrary_name: diffusers\n")
    assert 'DiffusionPipeline.from_pretrained("PATH/TO/THIS/FOLDER", trust_remote_code' in card
    assert f"{len(rows):,} images of {rows['patient_id'].nunique():,} patients" in card
    assert f"(step {int(ckpt.name.split('-')[1])})" in card
    assert f'| optimizer | "{params.diffusion.optimizer}" |' in card
    assert "| snr_gamma | null |" in card  # parameter values as in the parameter file
    assert "| synthetic_macro_auroc | 0.7863 |" in card
    assert "| ratio_ci | [0.9199, 1.0028] |" in card
    for absent in ("sex_fidelity", "detectability", "memorization"):
        section = card.split(f"### {absent}\n", 1)[1].split("###", 1)[0]
        assert "Missing: the run's summary.json has no such entry." in section


def test_cohort_from_the_exported_folder_equals_the_checkpoints(exported, tmp_path):
    params, manifest, run, ckpt, out = exported
    plan = replica_plan(params, manifest, ckpt.name).head(6)
    shards = {}
    for name, gen in (("checkpoint", CXRPipeline.from_checkpoint(ckpt, params.diffusion)),
                      ("exported", CXRPipeline.from_exported(out))):
        here = RunLayout(tmp_path / name, run.resolution, run.name, run.project)
        generate_cohort(params, plan, diffusion_source(params, gen), here, "replicas",
                        progress=False)
        shards[name] = np.load(here.synthetic_shard("replicas", 0))
    assert np.array_equal(shards["checkpoint"]["images"], shards["exported"]["images"])
    assert str(shards["exported"]["checkpoint"]) == ckpt.name
