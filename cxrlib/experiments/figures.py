"""The classifier grid's figures and tables (notebook 04): the settings every arm shares,
each arm's learning curves, where early stopping ended them, and per-experiment AUROC.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from pydantic import BaseModel

from cxrlib.core.kinds import Kind


def settings_table(spec: BaseModel) -> pd.DataFrame:
    """A parameter section as one ``value`` column, nested keys dotted (``augment.flip``)."""
    def flat(tree: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    return pd.Series(flat(spec.model_dump()), name="value").to_frame()


def grid_learning_curves(histories: pd.DataFrame, results: pd.DataFrame) -> plt.Figure:
    """Validation loss per validation round (x: optimizer step) for every experiment (mean
    over seeds), one panel per group of experiments (real fraction, or the external site),
    taken from the recipes in ``results`` (:func:`cxrlib.experiments.grid.grid_results`)."""
    recipes = results.drop_duplicates("experiment").set_index("experiment")
    group = {e: "external site" if Kind(r["kind"]).external
             else f"{r['real_fraction']:.0%} real" for e, r in recipes.iterrows()}
    frame = histories.assign(group=histories["experiment"].map(group))
    groups = list(dict.fromkeys(frame["group"]))
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.6), squeeze=False)
    for ax, group in zip(axes[0], groups, strict=True):
        sub = frame[frame["group"] == group]
        sns.lineplot(data=sub, x="step", y="val_loss", hue="experiment", marker="o",
                     errorbar=None, ax=ax)
        ax.set_xlabel("optimizer step")
        ax.set_title(f"validation loss ({group})")
        ax.set_ylabel("masked BCE (real internal val)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def early_stop_figure(results: pd.DataFrame) -> plt.Figure:
    """Optimizer step of the kept (best-validation) weights against the share of synthetic
    data, beside the step budget every arm had: the authors saw training stop earlier as
    synthetic data grew."""
    frame = results.assign(**{"synthetic %": results["synthetic %"].fillna(-100)})
    fig, ax = plt.subplots(figsize=(6, 3.6))
    sns.stripplot(data=frame, x="synthetic %", y="best_step", hue="kind", dodge=False,
                  size=7, ax=ax)
    ax.axhline(frame["optimizer_steps"].max(), color="grey", ls="--", lw=1,
               label="steps run (most)")
    ax.set_xlabel("synthetic images, % of the real training images (-100 = synthetic only)")
    ax.set_ylabel("step of the kept weights")
    ax.set_title("Optimizer step of the best validation loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def experiment_auroc_heatmap(spread: pd.DataFrame) -> plt.Figure:
    """Macro AUROC (mean over seeds, :func:`cxrlib.experiments.diagnostics.seed_spread`) per
    experiment and test set."""
    table = spread.pivot(index="experiment", columns="test_set", values="macro_auroc_mean")
    table = table.reindex(index=list(dict.fromkeys(spread["experiment"])),
                          columns=list(dict.fromkeys(spread["test_set"])))
    fig, ax = plt.subplots(figsize=(2.5 + 1.8 * table.shape[1], 1 + 0.42 * len(table)))
    sns.heatmap(table, annot=True, fmt=".3f", cmap="RdYlGn", ax=ax,
                cbar_kws={"label": "macro AUROC"})
    ax.set_title("Macro AUROC per experiment and test set (first look, mean over seeds)")
    ax.set_xlabel("")
    fig.tight_layout()
    return fig
