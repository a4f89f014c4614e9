"""Figures of the audit (notebook 03): distance against its floor, fidelity, memorization,
texture and detectability, sweep.

No torch here; inputs are the tables and results of :mod:`cxrlib.synthetic.audit.metrics`,
:mod:`cxrlib.synthetic.audit.fidelity` and :mod:`cxrlib.synthetic.audit.run`.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from cxrlib.core.labels import CHEXPERT_LABELS
from cxrlib.synthetic.audit.metrics import MemorizationResult


def legend_outside(ax: plt.Axes, **kwargs) -> None:
    """Move the axes' legend to the right of it, where it cannot cover data (``bbox_inches=
    "tight"`` saves it with the figure)."""
    if ax.get_legend() is not None:
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), frameon=False, **kwargs)


def figure_legend_below(fig: plt.Figure, axes: list[plt.Axes], ncol: int = 4) -> None:
    """One legend for the whole figure, below its axes: the first legend found among
    ``axes`` (the axes share their colours), every axes' own legend removed."""
    legends = [ax.get_legend() for ax in axes if ax.get_legend() is not None]
    if not legends:
        return
    handles, labels = legends[0].legend_handles, [t.get_text() for t in legends[0].get_texts()]
    for legend in legends:
        legend.remove()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(ncol, len(labels)), frameon=False, fontsize=8)


def distance_figure(table: pd.DataFrame) -> plt.Figure:
    """Each distance metric per split: real vs real (the floor) beside real vs synthetic."""
    metrics = ("fid", "kid_mean", "precision", "recall", "density", "coverage")
    frame = table.melt(id_vars=[c for c in ("space", "comparison", "split") if c in table],
                       value_vars=list(metrics), var_name="metric")
    if "space" in frame:
        frame["comparison"] = frame["space"] + ": " + frame["comparison"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.6 * len(metrics), 3.4))
    for ax, metric in zip(axes, metrics, strict=True):
        part = frame[frame["metric"] == metric]
        sns.stripplot(data=part, x="comparison", y="value", hue="comparison", ax=ax,
                      legend=False, size=5)
        ax.set_title(metric)
        ax.set_xlabel("")
        ax.set_ylabel("")
        ax.tick_params(axis="x", rotation=60, labelsize=7)
    n, dim = int(table["n"].iloc[0]), int(table["dim"].iloc[0])
    fig.suptitle(f"Distance to real validation images: n = {n} per set, judge features "
                 f"d = {dim}, {table['split'].nunique()} random splits")
    fig.tight_layout()
    return fig


def memorization_figure(result: MemorizationResult) -> plt.Figure:
    """Nearest-training-image similarity of synthetic and held-out real images, both spaces,
    with the calibrated thresholds."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    spaces = (("pixel correlation", "pixel", result.pixel_threshold),
              ("centred judge-feature cosine", "feature", result.feature_threshold))
    for ax, (name, space, thr) in zip(axes, spaces, strict=True):
        data = pd.concat([
            pd.DataFrame({"similarity": getattr(result.synthetic, f"{space}_sim"),
                          "set": "synthetic -> train"}),
            pd.DataFrame({"similarity": getattr(result.heldout, f"{space}_sim"),
                          "set": "held-out real -> train"})], ignore_index=True)
        sns.histplot(data=data, x="similarity", hue="set", stat="density", common_norm=False,
                     element="step", bins=40, ax=ax)
        ax.axvline(thr, color="k", ls="--", lw=1)
        ax.text(thr, 0.98, f" held-out q{1 - result.rate:g}",
                transform=ax.get_xaxis_transform(), va="top", fontsize=8)
        ax.set_xlabel(f"nearest-neighbour {name}")
        ax.set_title(name)
    s = result.summary()
    fig.suptitle(f"Memorization audit: {s['flagged']} of {s['audited']} synthetic images "
                 f"flagged (95% upper bound {s['share_upper95']:.1%}); held-out real flagged "
                 f"{s['heldout_share_flagged']:.1%}")
    fig.tight_layout()
    figure_legend_below(fig, list(axes))
    return fig


def closest_pairs_figure(syn_images: np.ndarray, train_images: np.ndarray,
                         pairs: pd.DataFrame) -> plt.Figure:
    """Each pair of :func:`cxrlib.synthetic.audit.metrics.closest_pairs` side by side:
    synthetic, training."""
    n = max(len(pairs), 1)
    fig, axes = plt.subplots(n, 2, figsize=(4.2, 2.1 * n), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, row in enumerate(pairs.itertuples(index=False)):
        axes[i, 0].imshow(syn_images[row.syn_index], cmap="gray", vmin=0, vmax=255)
        axes[i, 0].set_title(f"synthetic {row.syn_index}"
                             + (" (flagged)" if row.flagged else ""), fontsize=8)
        axes[i, 1].imshow(train_images[row.train_index], cmap="gray", vmin=0, vmax=255)
        axes[i, 1].set_title(f"train {row.train_index}: r={row.pixel_similarity:.3f}, "
                             f"cos={row.feature_similarity:.3f}", fontsize=8)
    fig.tight_layout()
    return fig


def fidelity_figure(per_label: pd.DataFrame) -> plt.Figure:
    """Per-label AUROC, synthetic (against conditions) beside real; labels outside the macro
    are greyed and marked, labels without an AUROC say "n/a"; the dashed line is chance."""
    long = per_label.melt(id_vars=["label", "in_macro"],
                          value_vars=["synthetic_auroc", "real_auroc"], var_name="set",
                          value_name="auroc")
    long["set"] = long["set"].str.replace("_auroc", "")
    order = [lab for lab in CHEXPERT_LABELS if lab in set(long["label"])]
    fig, ax = plt.subplots(figsize=(7, 0.8 + 0.35 * len(order)))
    known = long.dropna(subset=["auroc"])
    if len(known):
        sns.barplot(data=known, y="label", x="auroc", hue="set", order=order, ax=ax,
                    orient="h")
    else:
        ax.set_yticks(range(len(order)), order)
        ax.set_ylim(len(order) - 0.5, -0.5)
    in_macro = per_label.set_index("label")["in_macro"]
    missing = long.groupby("label")["auroc"].apply(lambda s: s.isna().all())
    for i, lab in enumerate(order):
        if missing.get(lab, False):
            ax.text(0.51, i, "n/a", va="center", fontsize=8, color="grey")
        elif not in_macro.get(lab, False):
            ax.text(0.01, i, "not in macro", va="center", fontsize=7, color="grey")
    ax.axvline(0.5, color="k", ls="--", lw=1)
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("AUROC (synthetic: against the conditions)")
    ax.set_ylabel("")
    legend_outside(ax, title=None)
    fig.tight_layout()
    return fig


def texture_figure(texture: pd.DataFrame, detectability: pd.DataFrame) -> plt.Figure:
    """Left: each cohort's synthetic / real power ratio per frequency band with its CI (log
    scale; 1 = real texture). Right: each cohort's detectability AUROC with its CI (0.5 =
    indistinguishable). Inputs: the ``texture`` and ``detectability`` tables of
    :func:`cxrlib.synthetic.audit.run.audit_tables`."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [2, 1]})
    for cohort, bands in texture.groupby(level="cohort", sort=False):
        centre = (bands["f_low"] + bands["f_high"]) / 2
        axes[0].errorbar(centre, bands["ratio"], yerr=[bands["ratio"] - bands["ci_low"],
                                                       bands["ci_high"] - bands["ratio"]],
                         marker="o", capsize=3, label=cohort)
    axes[0].axhline(1.0, color="k", ls="--", lw=1)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("radial frequency (cycles/pixel; 0.5 = Nyquist)")
    axes[0].set_ylabel("power ratio, synthetic / real")
    axes[0].set_title("Texture: power per frequency band")
    axes[0].legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2),
                   ncol=max(1, min(4, len(axes[0].get_legend_handles_labels()[1]))),
                   frameon=False)
    names = list(detectability.index)
    auroc = detectability["auroc"].astype(float)
    axes[1].errorbar(auroc, range(len(names)),
                     xerr=[auroc - detectability["ci_low"].astype(float),
                           detectability["ci_high"].astype(float) - auroc],
                     fmt="o", capsize=3)
    axes[1].axvline(0.5, color="k", ls="--", lw=1)
    axes[1].set_yticks(range(len(names)), names)
    axes[1].set_ylim(len(names) - 0.5, -0.5)
    axes[1].set_xlim(0.0, 1.03)
    axes[1].set_xlabel("AUROC, real vs synthetic")
    axes[1].set_title("Detectability (0.5 = indistinguishable)")
    fig.tight_layout()
    return fig


def sweep_figure(table: pd.DataFrame) -> plt.Figure:
    """Guidance sweep: conditional fidelity against coverage (diversity), recall, the
    texture's high-frequency power ratio and the detectability AUROC against guidance."""
    runs = table[table["sampler"] != "real"].assign(
        setting=lambda d: d["sampler"] + " x" + d["steps"].astype(str))
    floor = table[table["sampler"] == "real"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.2))
    axes = axes.ravel()
    sns.scatterplot(data=runs, x="coverage", y="fidelity_macro_auroc", hue="setting",
                    size="guidance", ax=axes[0])
    if len(floor):
        axes[0].axvline(float(floor["coverage"].iloc[0]), color="grey", ls="--", lw=1,
                        label="real vs real coverage")
        axes[0].axhline(float(floor["fidelity_macro_auroc"].iloc[0]), color="grey", ls=":",
                        lw=1, label="judge on real images")
    axes[0].set_xlabel("coverage (diversity; higher is better)")
    axes[0].set_ylabel("macro AUROC of the judge\nagainst the condition")
    sns.lineplot(data=runs, x="guidance", y="recall", hue="setting", marker="o", ax=axes[1])
    axes[1].set_ylabel("recall (diversity)")
    for ax, column, name, level in ((axes[2], "texture_hf_ratio",
                                     "high-frequency power ratio\n(1 = real; log scale)", 1.0),
                                    (axes[3], "detectability_auroc",
                                     "detectability AUROC\n(0.5 = indistinguishable)", 0.5)):
        sns.lineplot(data=runs, x="guidance", y=column, hue="setting", marker="o", ax=ax)
        ax.axhline(level, color="grey", ls="--", lw=1)
        ax.set_ylabel(name)
    axes[2].set_yscale("log")
    # One legend, right of the panels: the settings' colours are the same in every panel
    # (the first panel's legend also has the guidance sizes and the real reference lines).
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes:
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.8, 0.5), frameon=False,
               fontsize=8)
    return fig
