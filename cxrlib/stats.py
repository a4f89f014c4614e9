"""Statistics on per-image predictions: AUROC per label and macro AUROC per test set.

Rows whose target is NaN (uncertain under ``u-ignore``, or not annotated by the site) are left
out for that label; a label without both classes in a test set has no AUROC and is left out of
the macro mean, and the tables say so.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score


def auroc_table(predictions: pd.DataFrame) -> pd.DataFrame:
    """AUROC per (test_set, label) from long predictions (test_set, label, target, score)."""
    rows = []
    for (test_set, label), g in predictions.groupby(["test_set", "label"], sort=False):
        g = g[g["target"].notna()]
        pos, neg = int((g["target"] == 1).sum()), int((g["target"] == 0).sum())
        auc = roc_auc_score(g["target"], g["score"]) if pos and neg else np.nan
        rows.append({"test_set": test_set, "label": label, "n_pos": pos, "n_neg": neg,
                     "auroc": auc})
    return pd.DataFrame(rows)


def macro_auroc(table: pd.DataFrame) -> pd.DataFrame:
    """Macro AUROC per test set: mean over labels with both classes, and which were left out."""
    out = []
    for test_set, g in table.groupby("test_set", sort=False):
        present = g[g["auroc"].notna()]
        out.append({"test_set": test_set, "macro_auroc": present["auroc"].mean(),
                    "labels_used": len(present),
                    "left_out": ", ".join(g.loc[g["auroc"].isna(), "label"]) or "-"})
    return pd.DataFrame(out)
