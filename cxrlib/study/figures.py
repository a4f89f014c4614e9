"""The statistics stage's figures (notebook 05): supplementation against real-only, the
exchange rate on the real-only learning curve, external test sets, the real fraction, and
subgroups. Each takes the tables of :mod:`cxrlib.study.plan` or :mod:`cxrlib.study.exchange`
and returns a matplotlib figure; :class:`cxrlib.core.outputs.Outputs` saves it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

from cxrlib.core.kinds import Kind

if TYPE_CHECKING:  # the figures need no torch; only sample_grid reads a cache
    pass


def _external(summary: pd.DataFrame) -> pd.Series:
    """Rows of experiments trained on an external site's own data."""
    return summary["kind"].map(lambda kind: Kind(kind).external).astype(bool)


def _errorbar(ax: plt.Axes, frame: pd.DataFrame, x: str, label: str, **style) -> None:
    """Points with their CI as error bars, joined by a line."""
    frame = frame.sort_values(x)
    yerr = np.vstack([frame["macro_auroc"] - frame["ci_low"],
                      frame["ci_high"] - frame["macro_auroc"]])
    ax.errorbar(frame[x], frame["macro_auroc"], yerr=yerr, label=label, capsize=3, marker="o",
                **style)


def supplementation_figure(summary: pd.DataFrame, fraction: float) -> plt.Figure:
    """Figure 3 shape at one real-data fraction: macro AUROC (95% CI) against % synthetic
    supplementation per test set; real-only baseline as a line with its CI band, the
    synthetic-only curve beside it; the rebalanced strategy and the two controls (real rows
    repeated, synthetic labels shuffled; x: the k they match) as their own markers.

    ``summary``: macro AUROC rows with the grid columns ``kind``, ``k``, ``real_fraction``.
    """
    sub = summary[np.isclose(summary["real_fraction"], fraction) & ~_external(summary)]
    tests = list(dict.fromkeys(sub["test_set"]))
    fig, axes = plt.subplots(1, len(tests), figsize=(4.6 * len(tests), 3.8), squeeze=False,
                             sharey=True)
    palette = sns.color_palette()
    for ax, test in zip(axes[0], tests, strict=True):
        t = sub[sub["test_set"] == test].assign(pct=lambda d: 100 * d["k"])
        base = t[t["kind"] == Kind.REAL_ONLY].iloc[0]
        ax.axhline(base["macro_auroc"], color="red", lw=1.5,
                   label=f"{Kind.REAL_ONLY.label} (baseline)")
        ax.axhspan(base["ci_low"], base["ci_high"], color="red", alpha=0.1)
        for kind, style in ((Kind.REAL_PLUS_SYNTHETIC, {"color": palette[0]}),
                            (Kind.SYNTHETIC_ONLY, {"color": palette[1], "ls": "--"}),
                            (Kind.SYNTHETIC_PRETRAIN, {"color": palette[3], "ls": ":"})):
            curve = t[t["kind"] == kind]
            if len(curve):  # a kind the grid did not run gets no (empty) legend entry
                _errorbar(ax, curve, "pct", kind.label, **style)
        for kind, colour in ((Kind.REAL_PLUS_REBALANCED, palette[2]),  # red is the baseline's
                             (Kind.REAL_REPEATED, palette[5]),
                             (Kind.REAL_PLUS_SHUFFLED, palette[4]),
                             (Kind.REAL_PLUS_ORACLE, palette[6]),
                             (Kind.REAL_PLUS_ORACLE_SMOOTH, palette[7]),
                             (Kind.ORACLE_ONLY, palette[8])):
            marked = t[t["kind"] == kind]
            if len(marked):
                _errorbar(ax, marked, "pct", kind.label, color=colour, ls="none", markersize=9)
        ax.set_title(test)
        ax.set_xlabel("synthetic images, % of real training images")
        ax.set_ylabel("macro AUROC (95% CI)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Synthetic supplementation at {fraction:.0%} of the real training data")
    fig.tight_layout()
    return fig


def exchange_figure(curve: pd.DataFrame, rates: pd.DataFrame) -> plt.Figure:
    """The learning curve of real-only arms per test set (points: seed means; line: the fit
    of :data:`cxrlib.study.exchange.CURVE_FORM`), with every placed arm drawn at its own real images
    and joined by an arrow to the real images it is worth (its AUROC on the curve); an arm
    beyond the measured sizes is drawn hollow (extrapolated)."""
    tests = list(dict.fromkeys(curve["test_set"]))
    fig, axes = plt.subplots(1, len(tests), figsize=(4.8 * len(tests), 4.0), squeeze=False)
    colours = sns.color_palette("tab10")[1:]  # red (the curve) left out
    palette = {e: colours[i % len(colours)]
               for i, e in enumerate(dict.fromkeys(rates["experiment"]))}
    for ax, test in zip(axes[0], tests, strict=True):
        c = curve[curve["test_set"] == test].sort_values("real_images")
        grid_n = np.geomspace(c["real_images"].min() / 1.5, c["real_images"].max() * 2, 60)
        a, b = c["a"].iloc[0], c["b"].iloc[0]
        ax.plot(grid_n, a + b * np.log(grid_n), color="red", lw=1, alpha=0.7,
                label=f"fit: {a:.3f} + {b:.3f} ln n")
        ax.plot(c["real_images"], c["macro_auroc"], "o", color="red", label="real only")
        placed = rates[(rates["test_set"] == test) & np.isfinite(rates["rate"])]
        for r in placed.to_dict("records"):
            y = a + b * np.log(r["real_equivalent"])
            colour = palette[r["experiment"]]
            ax.annotate("", xy=(r["real_equivalent"], y), xytext=(max(r["n_real"], 1), y),
                        arrowprops={"arrowstyle": "->", "color": colour, "lw": 1.2})
            ax.plot(r["real_equivalent"], y, "s", color=colour,
                    mfc="none" if r["extrapolated"] else colour,
                    label=f"{Kind(r['kind']).label} x{int(r['k'])}: r {r['rate']:.2f}")
        ax.set_xscale("log")
        # plain counts at 1-2-5 steps: the default minor labels (2x10^2, 3x10^2, ...) overlap
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(test)
        ax.set_xlabel("real training images (log scale)")
        ax.set_ylabel("macro AUROC (mean over seeds)")
        ax.legend(fontsize=7)
    fig.suptitle("Exchange rate: the real images each arm is worth on the real-only curve")
    fig.tight_layout()
    return fig


def external_figure(summary: pd.DataFrame) -> plt.Figure:
    """Figure 4 shape: an external site's real training data alone and with internal
    synthetic images, macro AUROC (95% CI) on every test set."""
    sub = summary[_external(summary)].copy()
    fig, ax = plt.subplots(figsize=(2.2 + 2.4 * sub["test_set"].nunique(), 3.8))
    sns.barplot(data=sub, x="test_set", y="macro_auroc", hue="experiment", ax=ax, alpha=0.85)
    for bar_container, (_, g) in zip(ax.containers, sub.groupby("experiment", sort=False),
                                     strict=False):
        g = g.set_index("test_set").reindex([t.get_text() for t in ax.get_xticklabels()])
        xs = [b.get_x() + b.get_width() / 2 for b in bar_container]
        ax.errorbar(xs, g["macro_auroc"], yerr=[g["macro_auroc"] - g["ci_low"],
                                                 g["ci_high"] - g["macro_auroc"]],
                    fmt="none", color="black", capsize=3)
    ax.set_ylim(max(0.0, sub["ci_low"].min() - 0.05), min(1.0, sub["ci_high"].max() + 0.03))
    ax.set_xlabel("")
    ax.set_ylabel("macro AUROC (95% CI)")
    ax.set_title("External site's training data, without and with internal synthetic images")
    fig.tight_layout()
    return fig


def fraction_figure(summary: pd.DataFrame) -> plt.Figure:
    """Macro AUROC against the share of real training data: real only, real + the largest
    synthetic supplement, synthetic only at the largest k: where does synthetic data help?"""
    sub = summary[~_external(summary)]
    tests = list(dict.fromkeys(sub["test_set"]))
    fig, axes = plt.subplots(1, len(tests), figsize=(4.6 * len(tests), 3.8), squeeze=False,
                             sharey=True)
    for ax, test in zip(axes[0], tests, strict=True):
        t = sub[sub["test_set"] == test].assign(pct=lambda d: 100 * d["real_fraction"])
        for kind, style in ((Kind.REAL_ONLY, {"color": "red"}),
                            (Kind.REAL_PLUS_SYNTHETIC, {}), (Kind.SYNTHETIC_ONLY, {"ls": "--"})):
            rows = t[t["kind"] == kind]
            if len(rows) == 0:
                continue
            k = rows["k"].max()
            rows = rows[rows["k"] == k]
            label = kind.label + (f" (x{k})" if k else "")
            _errorbar(ax, rows, "pct", label, **style)
        ax.set_xscale("log")
        ax.set_xticks(sorted(t["pct"].unique()), [f"{p:g}%" for p in sorted(t["pct"].unique())])
        ax.set_title(test)
        ax.set_xlabel("real training data (share of patients)")
        ax.set_ylabel("macro AUROC (95% CI)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def subgroup_figure(subgroups: pd.DataFrame, experiments: list[str]) -> plt.Figure:
    """Macro AUROC (95% CI) per subgroup for the given experiments: one row of panels per
    test set, one column per attribute (sex, age band, race, view)."""
    sub = subgroups[subgroups["experiment"].isin(experiments)]
    tests, bys = list(dict.fromkeys(sub["test_set"])), list(dict.fromkeys(sub["by"]))
    fig, axes = plt.subplots(len(tests), len(bys), figsize=(3.6 * len(bys), 2.9 * len(tests)),
                             squeeze=False, sharey=True)
    offsets = np.linspace(-0.15, 0.15, len(experiments))
    palette = sns.color_palette()
    for i, test in enumerate(tests):
        for j, by in enumerate(bys):
            ax = axes[i][j]
            t = sub[(sub["test_set"] == test) & (sub["by"] == by)]
            groups = list(dict.fromkeys(t["group"]))
            for n, exp in enumerate(experiments):
                e = t[t["experiment"] == exp].set_index("group").reindex(groups)
                x = np.arange(len(groups)) + offsets[n]
                ax.errorbar(x, e["macro_auroc"], yerr=[e["macro_auroc"] - e["ci_low"],
                                                        e["ci_high"] - e["macro_auroc"]],
                            fmt="o", capsize=2, color=palette[n], label=exp)
            ax.set_xticks(range(len(groups)), groups, rotation=30, fontsize=7)
            ax.set_xlim(-0.5, len(groups) - 0.5)
            ax.set_title(f"{test}: {by}", fontsize=9)
            if j == 0:
                ax.set_ylabel("macro AUROC")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig
