"""Data preparation's figures and tables (notebook 01): split counts, demographics, label
prevalence and co-occurrence, the rows dropped and why, and a grid of sample images per
group. Each returns what the notebook shows; :class:`cxrlib.core.outputs.Outputs` saves it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from cxrlib.core.labels import CHEXPERT_LABELS

if TYPE_CHECKING:  # the figures need no torch; only sample_grid reads a cache
    from cxrlib.data.imagecache import ImageCache


def sample_grid(manifest: pd.DataFrame, cache: ImageCache, by: str, per_group: int = 6,
                seed: int = 0) -> plt.Figure:
    """Example images: one row per site (``by='site'``) or per positive label (``by='label'``)."""
    rng = np.random.default_rng(seed)
    if by == "site":
        groups = {s: manifest[manifest["site"] == s] for s in manifest["site"].unique()}
    else:
        groups = {lab: manifest[manifest[lab] == 1.0] for lab in CHEXPERT_LABELS}
    fig, axes = plt.subplots(len(groups), per_group, figsize=(1.4 * per_group, 1.5 * len(groups)),
                             squeeze=False)
    for r, (name, rows) in enumerate(groups.items()):
        pick = rows.iloc[rng.permutation(len(rows))[:per_group]] if len(rows) else rows
        for c in range(per_group):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(pick):
                rec = pick.iloc[c]
                ax.imshow(cache.get(rec["image_id"]), cmap="gray", vmin=0, vmax=255)
                ax.set_title(f"{rec['site']} {rec['view']} {rec['sex'][0]}{int(rec['age'])}",
                             fontsize=6)
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    return fig


def split_counts(manifest: pd.DataFrame) -> pd.DataFrame:
    """Images and patients per site and split."""
    g = manifest.groupby(["site", "split"])
    return pd.DataFrame({"images": g.size(), "patients": g["patient_id"].nunique()})


def demographics_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """Per site and split: images, % female, age mean (sd), % AP, and the race mix."""
    g = manifest.groupby(["site", "split"])
    table = pd.DataFrame({
        "images": g.size(),
        "female_%": g["sex"].apply(lambda s: 100 * (s == "Female").mean()).round(1),
        "age_mean": g["age"].mean().round(1),
        "age_sd": g["age"].std().round(1),
        "AP_%": g["view"].apply(lambda s: 100 * (s == "AP").mean()).round(1),
    })
    race = pd.crosstab([manifest["site"], manifest["split"]], manifest["race"], normalize="index")
    return table.join((100 * race).round(1).add_prefix("race_%: "))


def demographics_figure(manifest: pd.DataFrame) -> plt.Figure:
    """Age distribution by site and sex, and the race mix per site."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    sns.violinplot(data=manifest, x="site", y="age", hue="sex", split=True, inner="quart",
                   ax=axes[0], density_norm="width")
    axes[0].set_title("Age by site and sex")
    race = pd.crosstab(manifest["site"], manifest["race"], normalize="index")
    race.plot(kind="barh", stacked=True, ax=axes[1], colormap="tab10", width=0.7)
    axes[1].set_xlabel("share of images")
    axes[1].set_title("Race per site")
    axes[1].legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    return fig


def prevalence_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """% of images positive (label 1.0) per site and label; NaN where a site has no labels."""
    def share(g: pd.DataFrame) -> pd.Series:
        lab = g[list(CHEXPERT_LABELS)]
        known = lab.notna().sum()
        return (100 * (lab == 1.0).sum() / known.where(known > 0)).round(1)
    return manifest.groupby("site")[list(CHEXPERT_LABELS)].apply(share).T


def prevalence_figure(prevalence: pd.DataFrame) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * prevalence.shape[1], 5))
    sns.heatmap(prevalence, annot=True, fmt=".1f", cmap="rocket_r", ax=ax,
                cbar_kws={"label": "% positive"})
    ax.set_title("Label prevalence per site (blank = not annotated)")
    fig.tight_layout()
    return fig


def cooccurrence_figure(matrix: pd.DataFrame, title: str) -> plt.Figure:
    """The paper's Figure E1 layout: rows condition r, columns share also positive for c."""
    fig, ax = plt.subplots(figsize=(8.5, 7))
    sns.heatmap(matrix, annot=True, fmt=".2f", annot_kws={"size": 6}, cmap="viridis", vmin=0,
                vmax=1, ax=ax, cbar_kws={"label": "P(c | r)"})
    ax.set_xlabel("also positive for (c)")
    ax.set_ylabel("images positive for (r)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def drop_figure(summary: pd.DataFrame) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(7, 0.4 + 0.35 * max(len(summary), 1)))
    if len(summary):
        sns.barplot(data=summary, y="reason", x="rows", hue="site", ax=ax, orient="h")
        ax.set_xscale("log")
    else:
        ax.text(0.5, 0.5, "no rows dropped", ha="center", va="center")
        ax.axis("off")
    ax.set_title("Rows left out, by reason")
    fig.tight_layout()
    return fig
