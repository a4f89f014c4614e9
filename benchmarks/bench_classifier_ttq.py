"""Benchmark: the classifier's time to quality, today's settings against candidate recipes.

    python benchmarks/bench_classifier_ttq.py --params params/demo.yaml [--arm real_only.f05]
        [--judge] [--seeds 3] [--recipes today fp32 ...] [--baseline RECIPE]

Trains one arm of the grid (default: real only at the smallest real fraction, the primary
comparisons' baseline) as notebook 04 does, until early stopping on its validation loss, under
the preset's classifier settings (``today``) and under each candidate recipe, for ``--seeds``
training seeds (each draws its own real subset, as in the grid). ``--judge`` trains notebook
03's judge instead (every training row of the diffusion sites, early-stopped on their internal
validation split: :func:`cxrlib.synthetic.audit.run.judge_rows`), whose training is the largest part
of stage 03 (issue 20, item 4); its seeds are training seeds on the same rows (the judge trains
at ``run.seed``). Every training runs in its own process (Accelerate fixes the precision once
per process; peak memory is its own), seeds outer and recipes inner, so a noisy machine affects
them alike. A recipe that is today's settings on this machine (``bf16`` where ``auto``
resolves to it) is not trained twice.

After each validation round the weights it scored (the EMA) are scored on the whole internal
validation set: macro AUROC, outside the round's timed seconds. Printed side by side, means
over seeds, against a baseline recipe (``--baseline``, default ``today``; e.g. the settings
of an earlier day, to show what a change to the preset saved):

- ``to target``: training minutes (the rounds' steps and validation) until the validation macro
  AUROC first reaches the baseline's converged one (mean over seeds of its kept weights) less
  0.005;
- ``minutes``: until early stopping ended the arm, what the grid spends on it;
- ``final`` and ``delta``: validation macro AUROC of the kept weights, and against the
  baseline's;
- the kept step, images/s (validation included), and each recipe's minutes over the
  baseline's.

The target (issue 20): the converged arm in at most half of today's minutes at equal internal
validation AUROC (within 0.005, 3 seeds). The first line gives the machine and, as its
reference figure, the fp32 recipe's images/s. Needs the run's manifest and cache (notebook
01); an arm with synthetic images needs notebook 03's cohorts too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrlib.core.config import load_params
from cxrlib.core.schema import ClassifierSpec, Params
from cxrlib.hardware import cpu_bf16_units, precision_label, resolve_precision

#: How close to today's converged validation macro AUROC counts as reaching it.
TOLERANCE = 0.005
#: Target ratio of a recipe's minutes to today's.
TARGET_RATIO = 0.5


#: The ``--arm`` value of a judge training (``--judge``): not a grid arm.
JUDGE = "judge"

#: The printed table's columns, in order, and their headings.
COLUMNS: dict[str, str] = {
    "ran": "ran", "seeds": "seeds", "reached": "reached", "to_target": "min to target",
    "minutes": "min", "final": "final AUROC", "final_sd": "sd", "delta": "delta",
    "kept_step": "kept step", "img_s": "img/s", "to_target_ratio": "x baseline (to target)",
    "minutes_ratio": "x baseline (min)", "verdict": "<= 0.5x at delta >= -0.005"}


def _cosine_over(rounds: int, lr_factor: float) -> Callable[[ClassifierSpec], dict[str, Any]]:
    """``lr_factor`` times the learning rate, warmed up over 2 validation rounds and decayed by
    cosine over ``rounds`` (to 1% of it), at the preset's precision, with a ceiling 2 rounds
    after the decay (the kept weights are still those of the lowest validation loss). For the
    judge, which keeps steps near 1,200 at a constant rate: at 1% of the rate the validation
    loss keeps falling by tiny amounts, so early stopping alone would run to ``max_steps``."""
    return lambda s: {"lr": lr_factor * s.lr, "lr_schedule": "cosine",
                      "warmup_steps": 2 * s.eval_every, "lr_decay_steps": rounds * s.eval_every,
                      "max_steps": (rounds + 2) * s.eval_every}


def _cosine(spec: ClassifierSpec) -> dict[str, Any]:
    """Twice the learning rate, warmed up over 2 validation rounds and decayed by cosine over
    32 (800 steps in the demo, where today's arms keep steps 350-1,100)."""
    return {"mixed_precision": "bf16", "lr": 2 * spec.lr, "lr_schedule": "cosine",
            "warmup_steps": 2 * spec.eval_every, "lr_decay_steps": 32 * spec.eval_every}


def _per_tensor_adamw(model: Any, name: str, lr: float, weight_decay: float) -> Any:
    """The optimizer as it was before 2026-12-06: timm's AdamW without torch's fused kernel
    (a Python loop over the parameter tensors)."""
    import timm.optim

    return timm.optim.create_optimizer_v2(model, opt=name, lr=lr, weight_decay=weight_decay)


#: Each recipe's changes to the preset's classifier settings, the share of validation
#: patients its early stopping sees (``val_share``; the AUROC is always on all of them), and
#: whether AdamW runs torch's fused kernel (``fused_adamw``, default true as in the trainer).
RECIPES: dict[str, Callable[[ClassifierSpec], dict[str, Any]]] = {
    "today": lambda s: {},
    "fp32": lambda s: {"mixed_precision": "no"},
    "bf16": lambda s: {"mixed_precision": "bf16"},
    "bf16 + channels_last": lambda s: {"mixed_precision": "bf16", "channels_last": True},
    "bf16, lr x2, cosine": _cosine,
    "bf16, validate half as often": lambda s: {
        "mixed_precision": "bf16", "eval_every": 2 * s.eval_every,
        "patience": max(1, s.patience // 2)},
    "bf16, early-stop on half the val": lambda s: {"mixed_precision": "bf16",
                                                   "val_share": 0.5},
    "bf16 + channels_last, patience halved": lambda s: {
        "mixed_precision": "bf16", "channels_last": True, "patience": max(1, s.patience // 2)},
    "bf16 + channels_last, lr x2, cosine, patience halved": lambda s: {
        **_cosine(s), "channels_last": True, "patience": max(1, s.patience // 2)},
    "bf16 + channels_last, patience halved, half the val": lambda s: {
        "mixed_precision": "bf16", "channels_last": True, "patience": max(1, s.patience // 2),
        "val_share": 0.5},
    # Half the batch (issue 20), validating every 25 steps (half the images between rounds)
    # or every 50 (as many). Measured on the bf16 EPYC: a batch-32 step (validation included)
    # costs 0.82x a batch-64 one, not half, and the arm took 0.99x today's minutes
    # (reports/benchmarks/classifier_ttq_batch.txt).
    "batch 32": lambda s: {"batch_size": s.batch_size // 2},
    "batch 32, validate every 50 steps": lambda s: {"batch_size": s.batch_size // 2,
                                                    "eval_every": 2 * s.eval_every},
    "lr x2, cosine over 20 rounds": _cosine_over(20, 2.0),
    "lr x2, cosine over 14 rounds": _cosine_over(14, 2.0),
    "cosine over 20 rounds": _cosine_over(20, 1.0),
    # The optimizer step was 16 of a 63 ms step (cProfile, 2026-12-06); fused: 2 ms.
    "per-tensor AdamW": lambda s: {"fused_adamw": False},
    # The EMA's warm-up (timm: decay 1 - (1 + step)^(-2/3), capped at ema_decay) is below 0.99
    # for the first 1,000 steps, so in arms of 200-400 steps the cap rarely binds.
    "EMA decay 0.95": lambda s: {"ema_decay": 0.95},
    "no EMA": lambda s: {"ema_decay": 0.0},
    # The settings before 2026-12-06: per-tensor AdamW, patience 4 rounds.
    "per-tensor AdamW, patience 4": lambda s: {"fused_adamw": False, "patience": 4},
    # The validation loss rises at step 50 before it falls (3/3 seeds of the 5% arm), so a
    # short patience may stop only after that transient: from round 4 on.
    "patience halved, from round 4": lambda s: {
        "patience": max(1, s.patience // 2), "stop_after_steps": 4 * s.eval_every},
    "patience 3, from round 4": lambda s: {"patience": 3, "stop_after_steps": 4 * s.eval_every},
    "patience halved, from round 4, warm-up 2 rounds": lambda s: {
        "patience": max(1, s.patience // 2), "stop_after_steps": 4 * s.eval_every,
        "lr_schedule": "cosine", "warmup_steps": 2 * s.eval_every,
        "lr_decay_steps": s.max_steps},
}


def recipe_settings(spec: ClassifierSpec, recipe: str) -> tuple[ClassifierSpec, float, bool]:
    """A recipe's classifier settings, the share of validation patients it stops on and
    whether AdamW is fused."""
    changes = RECIPES[recipe](spec)
    share = changes.pop("val_share", 1.0)
    fused = changes.pop("fused_adamw", True)
    return spec.model_copy(update=changes), share, fused


def _as_run_here(spec: ClassifierSpec) -> dict[str, Any]:
    """The settings as they run on this machine (``auto`` and fallbacks resolved)."""
    return {**spec.model_dump(), "mixed_precision": resolve_precision(spec.mixed_precision)}


def arm_experiments(params: Params, arm: str | None, seeds: int):
    """The arm's experiment at seeds 0..``seeds``-1 (default arm: real only at the smallest
    real fraction)."""
    from cxrlib.core.kinds import Kind
    from cxrlib.experiments.grid import plan_grid

    plan = plan_grid(params)
    if arm is None:
        smallest = min(params.experiments.real_fractions)
        arm = next(e.name for e in plan
                   if e.kind is Kind.REAL_ONLY and e.real_fraction == smallest)
    template = next((e for e in plan if e.name == arm), None)
    if template is None:
        raise SystemExit(f"no arm '{arm}' in the grid of {params.run.name}; arms: "
                         f"{', '.join(dict.fromkeys(e.name for e in plan))}")
    return [replace(template, seed=s) for s in range(seeds)]


def train_one(params_file: str, arm: str | None, seed: int, recipe: str) -> dict[str, Any]:
    """One training of the arm (``judge``: notebook 03's judge) under a recipe: per round its
    seconds, step and validation macro AUROC (all validation rows), and where it stopped."""
    from cxrlib.classifier.training import predict, predictions_frame, train_classifier
    from cxrlib.core.cohort import patient_subset
    from cxrlib.core.layout import RunLayout
    from cxrlib.data.imagecache import ImageCache
    from cxrlib.data.readers import load_cohort
    from cxrlib.experiments.runner import GridData, experiment_validation, grid_data, training_set
    from cxrlib.stats import auroc_table, macro_auroc
    from cxrlib.synthetic.audit.run import judge_rows

    params = load_params(params_file)
    run = RunLayout.open(params, create=False)
    exp = None if arm == JUDGE else arm_experiments(params, arm, seed + 1)[seed]
    if exp is None or exp.kind.recipe.synthetic == "none":
        cohort = load_cohort(params, run)
        data = GridData(cohort.manifest, ImageCache(cohort.cache_dir), {}, {})
    else:
        data = grid_data(params, run)
    if exp is None:
        train, val = judge_rows(params, data.manifest)  # real rows only
        cache = data.cache
    else:
        train = training_set(exp, params, data)
        val = experiment_validation(exp, params, data.manifest)
        cache = data.combined_cache() if (train["source"] == "synthetic").any() else data.cache
    spec, share, fused = recipe_settings(params.classifier, recipe)
    if not fused:
        import cxrlib.classifier.training

        cxrlib.classifier.training.make_optimizer = _per_tensor_adamw
    aurocs: list[float] = []

    def score(model, _row) -> None:
        preds = predictions_frame(val, predict(model, val, data.cache), "validation")
        aurocs.append(float(macro_auroc(auroc_table(preds))["macro_auroc"].iloc[0]))

    result = train_classifier(spec, train, patient_subset(val, share, seed), cache,
                              seed if exp is None else exp.seed, progress=False, on_round=score)
    hist = result.history.assign(val_macro_auroc=aurocs)
    return {"rounds": hist[["step", "seconds", "images_seen", "val_loss", "val_macro_auroc"]]
            .to_dict("list"), "best_epoch": result.best_epoch, "best_step": result.best_step,
            "steps": result.steps, "stopped_early": result.stopped_early,
            "precision": result.precision, "train_images": len(train), "val_images": len(val),
            "arm": JUDGE if exp is None else exp.name}


def summarise(runs: pd.DataFrame, today: str = "today") -> tuple[pd.DataFrame, float]:
    """Per recipe, means over seeds: minutes to the baseline's (``today``) target, minutes,
    final AUROC, kept step, images/s and the ratios to the baseline's; and the target AUROC."""
    def final(r: pd.Series) -> float:
        return r["rounds"]["val_macro_auroc"][r["best_epoch"] - 1]

    runs = runs.assign(final=runs.apply(final, axis=1))
    target = float(runs.loc[runs["recipe"] == today, "final"].mean())

    def per_run(r: pd.Series) -> pd.Series:
        minutes = np.cumsum(r["rounds"]["seconds"]) / 60
        reached = np.flatnonzero(np.asarray(r["rounds"]["val_macro_auroc"])
                                 >= target - TOLERANCE)
        return pd.Series({"to_target": minutes[reached[0]] if len(reached) else np.nan,
                          "minutes": minutes[-1],
                          "img_s": r["rounds"]["images_seen"][-1] / (minutes[-1] * 60)})

    runs = runs.join(runs.apply(per_run, axis=1))
    table = runs.groupby("recipe", sort=False).agg(
        ran=("precision", lambda v: v.iloc[0].split(" (")[0]), seeds=("seed", "count"),
        reached=("to_target", lambda v: f"{v.notna().sum()}/{len(v)}"),
        to_target=("to_target", "mean"), minutes=("minutes", "mean"),
        final=("final", "mean"), final_sd=("final", "std"), kept_step=("best_step", "mean"),
        img_s=("img_s", "mean"))
    table["delta"] = table["final"] - target
    for col in ("to_target", "minutes"):
        table[f"{col}_ratio"] = table[col] / table.loc[today, col]
    table["verdict"] = np.where((table["minutes_ratio"] <= TARGET_RATIO)
                                & (table["delta"] >= -TOLERANCE), "PASS", "-")
    return table, target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params/demo.yaml")
    ap.add_argument("--arm", help="grid arm to train (default: real only, smallest fraction)")
    ap.add_argument("--judge", action="store_true",
                    help="train notebook 03's judge instead of a grid arm")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--baseline", default="today", choices=list(RECIPES),
                    help="the recipe whose converged AUROC is the target and whose minutes the "
                         "ratios divide by (default: today's settings)")
    ap.add_argument("--out", type=Path, help="also write every training's rounds (CSV)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(train_one(args.params, args.arm, args.seed, args.worker)))
        return
    params = load_params(args.params)
    spec = params.classifier
    recipes = list(dict.fromkeys(["today", args.baseline, *args.recipes]))
    here = {r: (_as_run_here(recipe_settings(spec, r)[0]), *recipe_settings(spec, r)[1:])
            for r in recipes}
    same = {r: next(s for s in recipes if here[s] == here[r]) for r in recipes}
    if args.judge:
        args.arm = JUDGE
        seeds = [(JUDGE, s) for s in range(args.seeds)]
    else:
        seeds = [(e.name, e.seed) for e in arm_experiments(params, args.arm, args.seeds)]
    print(f"machine: {os.cpu_count()} CPUs, {os.environ.get('OMP_NUM_THREADS', 'all')} OMP "
          f"threads, CPU bf16 units {', '.join(cpu_bf16_units()) or 'none'}; "
          f"preset {Path(args.params).name}: {spec.backbone}, batch {spec.batch_size}, lr "
          f"{spec.lr:g}, validation every {spec.eval_every} steps, patience {spec.patience}, "
          f"mixed_precision {spec.mixed_precision} -> "
          f"{precision_label(resolve_precision(spec.mixed_precision))}")
    aliases = [f"{r} = {same[r]} here, not trained again" for r in recipes if same[r] != r]
    print("; ".join([f"arm {seeds[0][0]}, seeds {[s for _, s in seeds]}", *aliases]))
    rows = []
    for name, seed in seeds:
        for recipe in (r for r in recipes if same[r] == r):
            cmd = [sys.executable, __file__, "--worker", recipe, "--seed", str(seed),
                   "--params", args.params, "--arm", name]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"{recipe}, seed {seed} failed:\n{proc.stderr[-3000:]}")
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            rows += [{"recipe": r, "seed": seed, **out} for r in recipes
                     if same[r] == recipe]
            print(f"  seed {seed} {recipe}: kept step {out['best_step']} of "
                  f"{out['steps']}, {sum(out['rounds']['seconds']) / 60:.2f} min", flush=True)
    runs = pd.DataFrame(rows)
    table, target = summarise(runs, args.baseline)
    first = runs.iloc[0]
    print(f"{first['train_images']} training images, {first['val_images']} validation images; "
          f"target: {args.baseline}'s converged validation macro AUROC {target:.4f} - "
          f"{TOLERANCE}; ratios against {args.baseline}")
    if "fp32" in table.index:
        print(f"reference: fp32 {table.loc['fp32', 'img_s']:.0f} img/s (validation included)")
    with pd.option_context("display.width", 250, "display.max_columns", 30,
                           "display.float_format", "{:.3f}".format):
        print(table.rename(columns=COLUMNS)[list(COLUMNS.values())].to_string())
    if args.out:
        from cxrlib.core.files import atomic_path

        long = pd.concat([pd.DataFrame(r["rounds"]).assign(recipe=r["recipe"], seed=r["seed"])
                          for _, r in runs.iterrows()], ignore_index=True)
        with atomic_path(args.out) as tmp:
            long.to_csv(tmp, index=False)


if __name__ == "__main__":
    main()
