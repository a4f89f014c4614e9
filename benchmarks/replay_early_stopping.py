"""Replay early-stopping rules on a finished run's saved classifier histories, exactly.

    python benchmarks/replay_early_stopping.py --params params/demo.yaml
        [--rules 4 3 2@100 ...]

A classifier's training does not depend on its early-stopping rule until the rule stops it:
the batches, augmentations and learning rate of every step are seeded and fixed in advance
(:func:`cxrlib.classifier.training.round_plans`). So a less patient rule run on a saved history (the
validation loss of every round) tells, without training anything, where that rule would have
stopped and which round's weights it would have kept, exactly as a new run would. This
measures what the issue "time to quality" asks of a cheaper stopping rule: that it keeps the
kept weights the same (and so every AUROC) while it spends fewer steps.

Each rule is ``PATIENCE`` or ``PATIENCE@STEP`` (stop no earlier than optimizer step ``STEP``,
``classifier.stop_after_steps``). Every classifier the run saved is replayed (notebook 03's
judge, notebook 04's arms, pre-training phases), with
:class:`cxrlib.classifier.training.EarlyStopping`, the trainer's own bookkeeping. The run's own rule
is replayed first and must reproduce each saved classifier's kept step and last step, or the script
stops (a history that does not replay cannot answer). A rule that would not stop within a history
the run's rule ended early cannot be replayed past the saved end and is refused. Printed per rule:
trainings whose kept weights stay the same, their optimizer steps and training seconds (the rounds'
recorded seconds up to the stop) against the run's, and every training whose kept step would change.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import pandas as pd

from cxrlib.classifier.training import EarlyStopping
from cxrlib.core.config import load_params
from cxrlib.core.layout import RunLayout
from cxrlib.core.schema import ClassifierSpec


@dataclass(frozen=True)
class Rule:
    """Early stopping after ``patience`` rounds without a lower validation loss, not before
    optimizer step ``stop_after``."""

    patience: int
    stop_after: int = 0

    @classmethod
    def parse(cls, text: str) -> Rule:
        patience, _, after = text.partition("@")
        try:
            return cls(int(patience), int(after or 0))
        except ValueError:
            raise SystemExit(f"--rules: '{text}' is not PATIENCE or PATIENCE@STEP "
                             "(e.g. 3 or 2@100)") from None

    def __str__(self) -> str:
        return f"patience {self.patience}" + (f" from step {self.stop_after}"
                                              if self.stop_after else "")


def replay(history: pd.DataFrame, rule: Rule) -> tuple[int, int, float, bool]:
    """Where ``rule`` stops on ``history`` (its rows: one per validation round): the last
    step, the kept step, the training seconds up to the stop, and whether the rule stopped
    (False: the history ended first)."""
    stopper = EarlyStopping(rule.patience, rule.stop_after)
    stopped = False
    for row in history.itertuples():
        if stopped := stopper.update(row.val_loss, row.epoch, row.step, None):
            break
    ran = history["step"] <= row.step
    return int(row.step), stopper.best_step, float(history.loc[ran, "seconds"].sum()), stopped


def saved_classifiers(run: RunLayout
                      ) -> list[tuple[str, ClassifierSpec, int, bool, pd.DataFrame]]:
    """Every classifier the run saved: its folder (relative to the run), settings, kept step,
    whether early stopping ended it, and its history."""
    found = []
    for meta_file in sorted(run.root.rglob("classifier.json")):
        meta = json.loads(meta_file.read_text())
        found.append((str(meta_file.parent.relative_to(run.root)),
                      ClassifierSpec.model_validate(meta["spec"]), int(meta["best_step"]),
                      bool(meta["stopped_early"]), pd.read_csv(meta_file.parent / "history.csv")))
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params/demo.yaml")
    ap.add_argument("--rules", nargs="+", default=["3", "2@100", "2"], type=Rule.parse)
    args = ap.parse_args()
    params = load_params(args.params)
    run = RunLayout.open(params, create=False)
    trainings = saved_classifiers(run)
    if not trainings:
        raise SystemExit(f"{run.root} has no saved classifier (run notebooks 03 and 04 first)")
    rows = []
    for name, spec, kept, stopped_early, history in trainings:
        own = Rule(spec.patience, spec.stop_after_steps)
        stop, own_kept, seconds, own_stopped = replay(history, own)
        if (stop, own_kept, own_stopped) != (int(history["step"].iloc[-1]), kept, stopped_early):
            raise SystemExit(f"{name}: its own rule ({own}) replays to kept step {own_kept}, "
                             f"last step {stop}; saved: {kept}, {history['step'].iloc[-1]}. "
                             "This history cannot be replayed.")
        for rule in args.rules:
            r_stop, r_kept, r_seconds, r_stopped = replay(history, rule)
            if stopped_early and not r_stopped:
                raise SystemExit(f"{rule} does not stop within {name}'s history, which its own "
                                 f"rule ({own}) ended early: its stop lies past the saved end")
            val = history.set_index("step")["val_loss"]
            rows.append({"rule": str(rule), "classifier": name, "kept": kept,
                         "kept now": r_kept, "val loss kept": val[kept],
                         "val loss now": val[r_kept], "steps": stop, "steps now": r_stop,
                         "seconds": seconds, "seconds now": r_seconds})
    table = pd.DataFrame(rows)
    print(f"run {run.root}: {len(trainings)} saved classifiers, each replayed under its own "
          "rule to its saved kept step and last step")
    summary = table.groupby("rule", sort=False).apply(lambda g: pd.Series({
        "same kept weights": f"{(g['kept'] == g['kept now']).sum()}/{len(g)}",
        "steps x": g["steps now"].sum() / g["steps"].sum(),
        "seconds x": g["seconds now"].sum() / g["seconds"].sum()}), include_groups=False)
    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
        print(summary.to_string())
        changed = table[table["kept"] != table["kept now"]].sort_values(
            ["classifier", "steps now"], ascending=[True, False])
        if len(changed):
            print("\ntrainings whose kept weights would change:")
            print(changed.drop(columns=["seconds", "seconds now"]).to_string(index=False))


if __name__ == "__main__":
    main()
