"""The classifier's figures: one training's history (the learnability check of notebook 01)
and a per-label AUROC heatmap.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from cxrlib.core.labels import CHEXPERT_LABELS


def history_figure(history: pd.DataFrame, best_epoch: int) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5, 3))
    long = history.melt(id_vars="epoch", value_vars=["train_loss", "val_loss"], var_name="loss")
    sns.lineplot(data=long, x="epoch", y="value", hue="loss", marker="o", ax=ax)
    ax.axvline(best_epoch, color="grey", ls="--", lw=1, label="kept")
    ax.set_ylabel("masked BCE")
    ax.set_title("Learnability check: training curve")
    fig.tight_layout()
    return fig


def auroc_heatmap(per_label: pd.DataFrame, macro: pd.DataFrame) -> plt.Figure:
    table = per_label.pivot(index="label", columns="test_set", values="auroc")
    table = table.reindex(list(CHEXPERT_LABELS))[list(macro["test_set"])]
    table.loc["macro"] = macro.set_index("test_set")["macro_auroc"]
    fig, ax = plt.subplots(figsize=(2 + 1.8 * table.shape[1], 6))
    sns.heatmap(table, annot=True, fmt=".2f", cmap="RdYlGn", vmin=0.4, vmax=1.0, ax=ax,
                cbar_kws={"label": "AUROC"})
    ax.set_title("AUROC per label and test set")
    fig.tight_layout()
    return fig
