"""Benchmark: time to quality of the generator, recipe against recipe, in one run.

For each candidate training recipe (today's demo recipe and changes to it) the run's diffusion
model is trained on the same data, and chosen checkpoints are scored with the audit's judge
(notebook 03's real-only classifier) on images generated at the demo's sampler, guidance and
precision: macro AUROC of the judge against the images' conditions (conditional fidelity),
sex-probe AUROC, recall and coverage (so a gain bought with diversity shows), texture and
detectability. The target is today's recipe's fidelity after its full ``max_steps``; a recipe
reaches it at its first checkpoint whose fidelity is at least the target less
``--tolerance``.

Minutes are measured, not read off the training runs (which share the two cores with
scoring): a throughput phase times every recipe's training step side by side, in alternating
rounds (best of ``--rounds``), plus its set-up (model, optimiser, and compilation where the
recipe compiles). A checkpoint's minutes are set-up plus steps times seconds per step.
Printed: the machine and its fp32 reference figure (img/s of today's recipe in fp32), the
checkpoint table, and per recipe the minutes to the target and the fidelity at half of
today's minutes:

    python benchmarks/bench_diffusion_fidelity.py --params params/demo.yaml \\
        --out reports/benchmarks/diffusion_ttq

``--reuse CSV`` takes the curves of the recipes an earlier score table holds (checked: its
real validation images must score as now, and each reused curve must have been trained with
today's settings for its recipe, else it is trained again) and trains only the new ones;
``--set KEY=VALUE`` changes the params as ``cxrlib run`` does (``--set run.name=demo-all
--set diffusion.train_on=all`` benchmarks the generator that learns from every training row).

Needs the run's manifest and cache (notebook 01). Trains or loads the judge in the run folder
(as notebook 03 does); the diffusion checkpoints go to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from accelerate.state import AcceleratorState

from cxrlib.core.config import diff_keys, load_params, parse_overrides
from cxrlib.core.files import atomic_write_text
from cxrlib.core.layout import RunLayout
from cxrlib.core.schema import Params
from cxrlib.data.imagecache import ImageCache
from cxrlib.data.readers import load_cohort
from cxrlib.diffusion.checkpoints import checkpoint_dirs, load_weights, read_checkpoint_state
from cxrlib.diffusion.condition import encode_conditions
from cxrlib.diffusion.network import noise_scheduler
from cxrlib.diffusion.samplers import generate
from cxrlib.diffusion.training import identity_config, train_diffusion
from cxrlib.hardware import cpu_bf16_units, resolve_precision
from cxrlib.synthetic.audit.run import audit_reference, real_row, score_setting, sweep_conditions


@dataclass(frozen=True)
class Recipe:
    """A candidate: diffusion overrides on the run's params (``lr_scale`` multiplies the rate,
    ``seed`` is the training's seed) and the steps it trains for."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    #: Steps as a share of today's ``max_steps`` (a cosine recipe decays over exactly these).
    share: float = 0.5
    #: The checkpoints scored, as shares of today's ``max_steps`` (each at most ``share``).
    score_at: tuple[float, ...] = (0.25, 0.5)
    #: A recipe that changes only how fast a step runs (compilation) shares this recipe's
    #: training math: its fidelity curve is that recipe's, on its own measured clock.
    same_math_as: str | None = None


#: The candidates (issue 20): throughput (compile), batch size with a scaled learning rate,
#: the schedule, and three from the literature. ``today`` trains the params' full max_steps;
#: every other recipe is relative to it. The demo's recipe was lr 1e-3 for 2,000 steps until
#: 2026-12-06 and is ``lr4x`` at half the steps since (lr 4e-3, 1,000 steps): to repeat that
#: day's table, pass ``--set diffusion.lr=0.001 --set diffusion.max_steps=2000``.
RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("today", share=1.0, score_at=(0.5, 0.75, 1.0)),
    Recipe("fp32", {"mixed_precision": "no"}),
    Recipe("compile", {"compile": True}, share=1.0, same_math_as="today"),
    # Adam's square-root rule: twice the batch at sqrt(2) times the rate, for as many images
    # as the half-length recipes see.
    Recipe("batch64", {"batch_size": 64, "lr_scale": 2 ** 0.5}, share=0.25, score_at=(0.25,)),
    # Smaller batches at today's rate (issue 20): on a 2-core CPU a step's time falls nearly
    # as fast as its batch (bf16, the bare UNet step: 296 ms at 32, 149 at 16, 100 at 8; in
    # the trainer 0.6x and 0.4x of batch 32's), so in today's minutes they take 1.7-2.5x the
    # updates, each from fewer images.
    Recipe("batch16", {"batch_size": 16}, share=1.0, score_at=(0.5, 0.75, 1.0)),
    Recipe("batch8", {"batch_size": 8}, share=1.5, score_at=(1.0, 1.25, 1.5)),
    Recipe("batch16-logit-normal", {"batch_size": 16, "timestep_sampling": "logit_normal"},
           share=1.0, score_at=(0.5, 0.75, 1.0)),
    # Twice today's rate (constant), alone and with logit-normal timesteps: in a run this
    # short the generator is still learning fast at its end, so a larger step may buy minutes.
    Recipe("lr2x", {"lr_scale": 2.0}),
    Recipe("lr2x-logit-normal", {"lr_scale": 2.0, "timestep_sampling": "logit_normal"}),
    Recipe("lr4x", {"lr_scale": 4.0}),
    # Four times the rate with a cosine decay to 0 over the run (steadier late steps), and
    # four times the rate and today's recipe at another training seed (how much of a
    # difference between two runs is the draw of the seed?).
    Recipe("lr4x-cosine", {"lr_scale": 4.0, "lr_schedule": "cosine"}, score_at=(0.5,)),
    Recipe("lr4x-seed1", {"lr_scale": 4.0, "seed": 1}),
    Recipe("today-seed1", {"seed": 1}, share=1.0, score_at=(0.5, 0.75, 1.0)),
    # Four times the rate at batch 16, for 1,600 steps: about half of today's minutes here.
    Recipe("batch16-lr4x", {"batch_size": 16, "lr_scale": 4.0}, share=0.8,
           score_at=(0.5, 0.65, 0.8)),
    Recipe("batch16-lr4x-logit-normal", {"batch_size": 16, "lr_scale": 4.0,
                                         "timestep_sampling": "logit_normal"},
           share=0.8, score_at=(0.5, 0.65, 0.8)),
    Recipe("batch16-lr2x-logit-normal", {"batch_size": 16, "lr_scale": 2.0,
                                         "timestep_sampling": "logit_normal"},
           share=1.0, score_at=(0.5, 0.75, 1.0)),
    # Scored at its end only: a cosine run's earlier checkpoints are not a shorter cosine run.
    Recipe("cosine", {"lr_schedule": "cosine"}, score_at=(0.5,)),
    Recipe("cosine-lr2x", {"lr_schedule": "cosine", "lr_scale": 2.0}, score_at=(0.5,)),
    Recipe("immiscible", {"noise_assignment": "immiscible"}),  # Li et al. 2024
    Recipe("min-snr", {"snr_gamma": 5.0}),  # Hang et al. 2023
    Recipe("logit-normal", {"timestep_sampling": "logit_normal"}),  # Esser et al. 2024
    # Issue 19's generator variants, scored like the recipes (not speed candidates):
    Recipe("view", {"condition_on_view": True}, score_at=(0.5,)),  # the view in the condition
    Recipe("sources", {"train_on": "sources"}, score_at=(0.5,)),  # source patients only
)}


def recipe_params(params: Params, recipe: Recipe, steps: int, every: int) -> Params:
    """The run's params with the recipe's diffusion overrides, trained for ``steps``
    (``seed``: another training seed, ``run.seed`` of the training alone: the judge and the
    scored conditions stay the run's)."""
    spec = params.diffusion
    over = dict(recipe.overrides)
    lr = spec.lr * over.pop("lr_scale", 1.0)
    run = params.run.model_copy(update={"seed": over.pop("seed", params.run.seed)})
    return params.model_copy(update={"run": run, "diffusion": spec.model_copy(update={
        **over, "lr": lr, "max_steps": steps, "checkpoint_every": every,
        "keep_checkpoints": steps // every + 1, "sample_every": 10**9, "sample_steps": 2,
        "resume": "never"})})


def curve_settings(params: Params, recipe: Recipe) -> str:
    """What a recipe's scores depend on besides the judge and the conditions (which the real
    row checks): its training's checkpoint identity
    (:func:`cxrlib.diffusion.training.identity_config`: architecture, schedule, optimiser,
    ``train_on``, seed), the precisions ``auto`` resolves to on this machine (an fp32 curve from a
    CPU without bf16 units is not a bf16 curve) and the sampler, as JSON. An earlier curve is reused
    only where they are the same: a preset that changed since (the demo's generator learning only
    from the source patients) gives other curves."""
    s, run = params.sampling, recipe_params(params, recipe, 1, 1)
    return json.dumps({**identity_config(run),
                       "trained_in": resolve_precision(run.diffusion.mixed_precision),
                       "sampling": [s.sampler, s.steps, s.guidance, s.guidance_rescale,
                                    resolve_precision(s.mixed_precision)]}, sort_keys=True)


def matching_curves(old: pd.DataFrame, path: Path, params: Params,
                    recipes: list[Recipe]) -> tuple[set[str], dict[str, list[str]]]:
    """The recipes whose curves in an earlier score table were trained with today's settings
    for them, and for the others the dotted keys that differ."""
    if "settings" not in old:
        raise SystemExit(f"{path}: this score table does not record the settings each curve "
                         "was trained with (it predates them), so its curves cannot be checked "
                         "against today's recipes; train every recipe again")
    same, differ = set(), {}
    for recipe in recipes:
        stored = old.loc[old["recipe"] == recipe.name, "settings"].unique()
        if len(stored) == 0:
            continue
        now = curve_settings(params, recipe)
        if list(stored) == [now]:
            same.add(recipe.name)
        else:
            differ[recipe.name] = sorted(set().union(*(
                diff_keys(json.loads(s), json.loads(now)) for s in stored)))
    return same, differ


def _fresh_precision() -> None:
    """Forget the precision Accelerate fixed for this process: recipes of another precision
    (``fp32`` beside bf16 ``auto``) train in the same process here, and Accelerate otherwise
    refuses a second precision. Its own test helpers reset the state the same way."""
    AcceleratorState._reset_state(reset_partial_state=True)


def _stamp(stamps: dict[int, float], step: int) -> None:
    stamps[step] = time.perf_counter()


def throughput(params: Params, cohort, cache: ImageCache, layout: RunLayout,
               recipes: list[Recipe], steps: int, rounds: int) -> pd.DataFrame:
    """Seconds per training step and set-up seconds per recipe: ``rounds`` alternating
    rounds of ``steps`` steps each (the first few steps are warm-up), best round kept."""
    best: dict[str, tuple[float, float]] = {}
    for _ in range(rounds):
        for recipe in recipes:
            run = recipe_params(params, recipe, steps, steps)
            stamps: dict[int, float] = {}
            _fresh_precision()
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                train_diffusion(run, cohort.manifest, cache, replace(layout, root=Path(tmp)),
                                progress=False, on_step=partial(_stamp, stamps))
            warm = max(5, steps // 4)
            per_step = (stamps[steps - 1] - stamps[warm]) / (steps - 1 - warm)
            setup = stamps[1] - t0 - per_step
            old = best.get(recipe.name)
            if old is None or per_step < old[0]:
                best[recipe.name] = (per_step, max(setup, 0.0))
    return pd.DataFrame([{"recipe": name, "s_per_step": s, "setup_s": setup,
                          "img_per_s": recipe_params(params, RECIPES[name], 1, 1)
                          .diffusion.batch_size / s}
                         for name, (s, setup) in best.items()])


def fidelity_curve(params: Params, cohort, cache: ImageCache, layout: RunLayout, ref,
                   recipe: Recipe, seeds, rows, labels: list[str]) -> list[dict]:
    """Train one recipe and score its ``score_at`` checkpoints at the demo's sampling
    settings, the conditions encoded in the recipe's own layout."""
    today = params.diffusion.max_steps
    steps = round(today * recipe.share)
    scored = {round(today * a) for a in recipe.score_at}
    run = recipe_params(params, recipe, steps, math.gcd(*scored))
    sched, s = noise_scheduler(run.diffusion), params.sampling
    cond = encode_conditions(rows, run.diffusion.nan_label_value,
                             with_view=run.diffusion.condition_on_view)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = replace(layout, root=Path(tmp))
        _fresh_precision()
        train_diffusion(run, cohort.manifest, cache, scratch, progress=True)
        for ckpt in checkpoint_dirs(scratch.checkpoints):
            step = read_checkpoint_state(ckpt)["step"]
            if step not in scored:
                continue
            images = generate(load_weights(ckpt), sched, cond, seeds, s.sampler, s.steps,
                              s.guidance, s.guidance_rescale, s.batch_size,
                              precision=resolve_precision(s.mixed_precision))
            out.append({"recipe": recipe.name, "step": step,
                        **score_setting(ref, rows, images, labels),
                        "settings": curve_settings(params, recipe)})
            print(pd.DataFrame(out[-1:]).to_string(index=False), flush=True)
    return out


def reused_curves(path: Path, real: dict, params: Params,
                  recipes: list[Recipe]) -> tuple[list[dict], set[str]]:
    """The real row and the curves of ``recipes`` from an earlier score table, after checking
    that its real validation images scored as ``real`` does now (scores of another judge or
    other conditions are not comparable, and the run fails saying so), and only the curves
    trained with today's settings for their recipe (:func:`matching_curves`; the others are
    trained again, and said so)."""
    old = pd.read_csv(path)
    before = old[old["recipe"] == "real validation images"]
    keys = ("fidelity_macro_auroc", "sex_auroc")
    if len(before) != 1 or any(abs(float(before.iloc[0][k]) - real[k]) > 1e-6 for k in keys):
        raise SystemExit(
            f"{path}: its real validation images score "
            f"{before[list(keys)].to_dict('records')} but {({k: real[k] for k in keys})} now: "
            "another judge or other conditions; train every recipe again (leave out --reuse)")
    names, differ = matching_curves(old, path, params,
                                    [r for r in recipes if r.same_math_as is None])
    for name, keys in differ.items():
        print(f"not reused: {name}, trained with other settings ({', '.join(keys[:6])})")
    kept = old[old["recipe"].isin(names)]
    return [real, *kept.to_dict("records")], names


def summarise(curves: pd.DataFrame, speed: pd.DataFrame, target: float, tolerance: float,
              today_minutes: float) -> pd.DataFrame:
    """Per recipe: minutes to the target (NaN if never reached), fidelity at the last
    checkpoint within half of today's minutes (1% slack: today's own half-way checkpoint
    carries the set-up of the whole run), and both as ratios to today."""
    rows = []
    for name, curve in curves.groupby("recipe", sort=False):
        reached = curve[curve["fidelity_macro_auroc"] >= target - tolerance]
        half = curve[curve["minutes"] <= today_minutes / 2 * 1.01]
        at_half = half.iloc[-1] if len(half) else None
        minutes = float(reached["minutes"].iloc[0]) if len(reached) else np.nan
        rows.append({
            "recipe": name, "img_per_s": float(speed.set_index("recipe").at[name, "img_per_s"]),
            "steps_to_target": int(reached["step"].iloc[0]) if len(reached) else None,
            "minutes_to_target": minutes, "x_today": minutes / today_minutes,
            "fidelity_at_half": float(at_half["fidelity_macro_auroc"]) if at_half is not None
            else np.nan,
            "step_at_half": int(at_half["step"]) if at_half is not None else None,
            "best_fidelity": float(curve["fidelity_macro_auroc"].max())})
    return pd.DataFrame(rows).astype({"steps_to_target": "Int64", "step_at_half": "Int64"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params/demo.yaml")
    ap.add_argument("--recipes", nargs="+", default=["today", "compile", "batch64", "cosine",
                                                     "immiscible"], choices=list(RECIPES))
    ap.add_argument("--images", type=int, default=400, help="generated images per score")
    ap.add_argument("--tolerance", type=float, default=0.01,
                    help="a recipe reaches the target at fidelity >= target - tolerance")
    ap.add_argument("--speed-steps", type=int, default=40, help="steps per throughput round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", help="write <out>.txt (what is printed) and <out>.csv")
    ap.add_argument("--curves", help="take the checkpoint scores from this earlier <out>.csv "
                    "and only measure the speeds (the curves need not run alone; the speeds "
                    "do)")
    ap.add_argument("--reuse", help="take the curves of the recipes an earlier <out>.csv holds "
                    "and train only the others; refused unless its real validation images "
                    "score as they do now (the same judge and conditions)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a dotted key over the params file, as for cxrlib run (repeatable)")
    args = ap.parse_args()

    params = load_params(args.params, parse_overrides(args.set))
    layout = RunLayout.open(params, create=False)
    cohort = load_cohort(params, layout)
    cache = ImageCache(cohort.cache_dir)
    recipes = [RECIPES[n] for n in dict.fromkeys(["today", *args.recipes])]
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    if args.curves:
        scores = pd.read_csv(args.curves)
        recipes = [r for r in recipes if r.name in set(scores["recipe"])]
        _, differ = matching_curves(scores, Path(args.curves), params,
                                    [r for r in recipes if r.same_math_as is None])
        if differ:
            raise SystemExit(f"{args.curves}: curves trained with other settings than today's "
                             f"recipes: {differ}; train them again (leave out --curves)")
    else:
        ref = audit_reference(params, cohort.manifest, cache, layout, progress=False)
        rows, _, seeds, labels = sweep_conditions(params, ref, args.images, with_view=False,
                                                  key="fidelity")
        real = real_row(ref, len(rows), labels)
        curves: list[dict] = [{"recipe": "real validation images", "step": 0, **real}]
        done: set[str] = set()
        if args.reuse:
            curves, done = reused_curves(Path(args.reuse), curves[0], params, recipes)
            print(f"reused from {args.reuse}: {', '.join(sorted(done)) or 'nothing'}")
        for recipe in (r for r in recipes if r.same_math_as is None and r.name not in done):
            curves += fidelity_curve(params, cohort, cache, layout, ref, recipe, seeds, rows,
                                     labels)
            if args.out:  # a later failure keeps the scores: rerun with --curves
                atomic_write_text(Path(f"{args.out}.csv"),
                                  pd.DataFrame(curves).to_csv(index=False))
        for recipe in (r for r in recipes if r.same_math_as is not None):
            curves += [{**c, "recipe": recipe.name} for c in curves
                       if c["recipe"] == recipe.same_math_as]
        scores = pd.DataFrame(curves)
    speed = throughput(params, cohort, cache, layout, [*recipes, RECIPES["fp32"]]
                       if "fp32" not in args.recipes else recipes, args.speed_steps, args.rounds)
    fp32 = speed.set_index("recipe").at["fp32", "img_per_s"]
    say(f"machine: {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, bf16 units "
        f"{', '.join(cpu_bf16_units()) or 'none'}, cuda {torch.cuda.is_available()}; "
        f"reference figure: today's recipe in fp32 trains at {fp32:.1f} img/s")
    say(f"today's recipe: {params.diffusion.mixed_precision} precision, batch "
        f"{params.diffusion.batch_size}, lr {params.diffusion.lr:g} "
        f"{params.diffusion.lr_schedule}, {params.diffusion.max_steps} steps; sampler "
        f"{params.sampling.sampler} {params.sampling.steps} steps, guidance "
        f"{params.sampling.guidance:g}, {int(scores['n'].max())} images per score (at most "
        "half the judge's held-out rows)")
    with pd.option_context("display.width", 200, "display.precision", 3):
        say("training speed (side by side, best of "
            f"{args.rounds} alternating rounds of {args.speed_steps} steps):\n"
            + speed.to_string(index=False))

    real = scores[scores["recipe"] == "real validation images"].iloc[0]
    table = scores.merge(speed, on="recipe")
    table["minutes"] = (table["setup_s"] + table["step"] * table["s_per_step"]) / 60
    today = table[table["recipe"] == "today"]
    target = float(today.loc[today["step"].idxmax(), "fidelity_macro_auroc"])
    today_minutes = float(today["minutes"].max())
    summary = summarise(table, speed, target, args.tolerance, today_minutes)
    cols = ["recipe", "step", "minutes", "fidelity_macro_auroc", "fidelity_ci_low",
            "fidelity_ci_high", "sex_auroc", "view_auroc", "recall", "coverage",
            "texture_hf_ratio",
            "detectability_auroc"]
    with pd.option_context("display.width", 220, "display.precision", 3):
        say(f"real validation images: judge macro AUROC {real['fidelity_macro_auroc']:.3f}, "
            f"sex probe {real['sex_auroc']:.3f}, view probe {real['view_auroc']:.3f}")
        say("checkpoints (minutes = set-up + steps x measured s/step):\n"
            + table[cols].to_string(index=False))
        say(f"target: today's fidelity after {today['step'].max()} steps, {target:.3f} "
            f"(ratio to real {target / real['fidelity_macro_auroc']:.3f}), reached at >= "
            f"{target - args.tolerance:.3f}; today's minutes {today_minutes:.2f}\n"
            + summary.to_string(index=False))
    if args.out:
        atomic_write_text(Path(f"{args.out}.txt"), "\n".join(lines) + "\n")
        atomic_write_text(Path(f"{args.out}.csv"), scores.to_csv(index=False))


if __name__ == "__main__":
    main()
