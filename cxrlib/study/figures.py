"""The statistics stage's figures (notebook 05): supplementation against real-only, the
exchange rate on the real-only learning curve, external test sets, the real fraction, and
subgroups. Each takes the tables of :mod:`cxrlib.study.plan` or :mod:`cxrlib.study.exchange`
and returns a matplotlib figure; :class:`cxrlib.core.outputs.Outputs` saves it.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

from cxrlib.core.kinds import Kind
from cxrlib.core.vocabulary import kind_colour


def _external(summary: pd.DataFrame) -> pd.Series:
    """Rows of experiments trained on an external site's own data."""
    return summary["kind"].map(lambda kind: Kind(kind).external).astype(bool)


def _errorbar(ax: plt.Axes, frame: pd.DataFrame, x: str, label: str, **style) -> None:
    """Points with their CI as error bars, joined by a line."""
    frame = frame.sort_values(x)
    yerr = np.vstack([frame["macro_auroc"] - frame["ci_low"],
                      frame["ci_high"] - frame["macro_auroc"]])
    ax.errorbar(frame[x], frame["macro_auroc"], yerr=yerr, label=label, capsize=3,
                **{"marker": "o", **style})


def supplementation_figure(summary: pd.DataFrame, fraction: float) -> plt.Figure:
    """Figure 3 shape at one real-data fraction: macro AUROC (95% CI) against the synthetic
    dose per test set, the dose on a categorical axis (0% is the real-only baseline, then
    every dose the grid ran); the baseline is also a line with its CI band; real +
    synthetic, synthetic only and pretraining as curves; the rebalanced strategy and the
    controls (real rows repeated, labels shuffled, the perfect generator) as their own
    markers at the dose they match, each kind in its one colour
    (:func:`cxrlib.core.vocabulary.kind_colour`).

    ``summary``: macro AUROC rows with the grid columns ``kind``, ``k``, ``real_fraction``.
    """
    sub = summary[np.isclose(summary["real_fraction"], fraction) & ~_external(summary)]
    tests = list(dict.fromkeys(sub["test_set"]))
    doses = sorted({0, *sub["k"].astype(int)})
    place = {k: i for i, k in enumerate(doses)}
    width = max(3.4, 1.2 * len(doses) + 1.4)
    fig, axes = plt.subplots(1, len(tests), figsize=(width * len(tests), 3.8), squeeze=False,
                             sharey=True)
    curves = ((Kind.REAL_PLUS_SYNTHETIC, "-"), (Kind.SYNTHETIC_ONLY, "--"),
              (Kind.SYNTHETIC_PRETRAIN, ":"))
    markers = (Kind.REAL_PLUS_REBALANCED, Kind.REAL_REPEATED, Kind.REAL_PLUS_SHUFFLED,
               Kind.REAL_PLUS_ORACLE, Kind.REAL_PLUS_ORACLE_SMOOTH, Kind.ORACLE_ONLY)
    for ax, test in zip(axes[0], tests, strict=True):
        t = sub[sub["test_set"] == test].assign(pos=lambda d: d["k"].astype(int).map(place))
        base = t[t["kind"] == Kind.REAL_ONLY].iloc[0]
        colour = kind_colour(Kind.REAL_ONLY)
        ax.axhline(base["macro_auroc"], color=colour, lw=1.2)
        ax.axhspan(base["ci_low"], base["ci_high"], color=colour, alpha=0.1)
        _errorbar(ax, t[t["kind"] == Kind.REAL_ONLY], "pos", f"{Kind.REAL_ONLY.label} "
                  "(line and band: its CI)", color=colour, ls="none")
        for kind, line in curves:
            curve = t[t["kind"] == kind]
            if len(curve):  # a kind the grid did not run gets no (empty) legend entry
                _errorbar(ax, curve, "pos", kind.label, color=kind_colour(kind), ls=line)
        for n, kind in enumerate(markers):
            marked = t[t["kind"] == kind]
            if len(marked):  # beside the curve's point at the same dose, not on it
                _errorbar(ax, marked.assign(pos=marked["pos"] + 0.12 * (n + 1)), "pos",
                          kind.label, color=kind_colour(kind), ls="none", markersize=8,
                          marker="D" if n % 2 else "s")
        ax.set_xticks(range(len(doses)), [f"+{100 * k}%" if k else "0%\n(real only)"
                                          for k in doses])
        ax.set_xlim(-0.5, len(doses) - 0.3)
        ax.set_title(test, fontsize=10)
    axes[0][0].set_ylabel("macro AUROC (95% CI)")
    fig.supxlabel("synthetic images added, % of the real training images", fontsize=9)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(3, len(names)), fontsize=8,
               frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(f"Synthetic supplementation at {fraction:.0%} of the real training data")
    fig.tight_layout(rect=(0, 0.08 + 0.03 * (len(names) // 3), 1, 1))
    return fig


def exchange_figure(curve: pd.DataFrame, rates: pd.DataFrame) -> plt.Figure:
    """The learning curve of real-only arms per test set (points: seed means; line: the fit
    of :data:`cxrlib.study.exchange.CURVE_FORM`), with every placed arm drawn at its own real images
    and joined by an arrow to the real images it is worth (its AUROC on the curve); an arm
    beyond the measured sizes is drawn hollow (extrapolated)."""
    tests = list(dict.fromkeys(curve["test_set"]))
    fig, axes = plt.subplots(1, len(tests), figsize=(4.8 * len(tests), 4.0), squeeze=False)
    real = kind_colour(Kind.REAL_ONLY)
    for ax, test in zip(axes[0], tests, strict=True):
        c = curve[curve["test_set"] == test].sort_values("real_images")
        grid_n = np.geomspace(c["real_images"].min() / 1.5, c["real_images"].max() * 2, 60)
        a, b = c["a"].iloc[0], c["b"].iloc[0]
        ax.plot(grid_n, a + b * np.log(grid_n), color=real, lw=1, alpha=0.7,
                label=f"fit: {a:.3f} + {b:.3f} ln n")
        ax.plot(c["real_images"], c["macro_auroc"], "o", color=real, label="real only")
        placed = rates[(rates["test_set"] == test) & np.isfinite(rates["rate"])]
        for r in placed.to_dict("records"):
            y = a + b * np.log(r["real_equivalent"])
            colour = kind_colour(r["kind"])
            ax.annotate("", xy=(r["real_equivalent"], y), xytext=(max(r["n_real"], 1), y),
                        arrowprops={"arrowstyle": "->", "color": colour, "lw": 1.2})
            ax.plot(r["real_equivalent"], y, "s", color=colour,
                    mfc="none" if r["extrapolated"] else colour,
                    label=f"{r['experiment']}: r {r['rate']:.2f}")
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
        for kind, style in ((Kind.REAL_ONLY, {}), (Kind.REAL_PLUS_SYNTHETIC, {}),
                            (Kind.SYNTHETIC_ONLY, {"ls": "--"})):
            rows = t[t["kind"] == kind]
            if len(rows) == 0:
                continue
            k = rows["k"].max()
            rows = rows[rows["k"] == k]
            label = kind.label + (f" (+{100 * k:g}%)" if k else "")
            _errorbar(ax, rows, "pct", label, color=kind_colour(kind), **style)
        ax.set_xscale("log")
        ax.set_xticks(sorted(t["pct"].unique()), [f"{p:g}%" for p in sorted(t["pct"].unique())])
        ax.xaxis.set_minor_formatter(NullFormatter())  # no stray 6x10^0 between the ticks
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
    palette = [kind_colour(Kind.REAL_ONLY), *sns.color_palette("colorblind")[:1],
               *sns.color_palette("colorblind")[2:]]  # the baseline first, in its colour
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


#: The forest plot's file name under the statistics stage (and beside the landing page).
def label_gain_figure(both: pd.DataFrame, arm: str, rho: dict[str, float]) -> plt.Figure:
    """Per finding: the arm's paired AUROC gain over its baseline (95% CI) against the
    generator's conditional fidelity for that finding (synthetic over real judge AUROC), each
    point named; the Spearman correlation in the title."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    yerr = np.vstack([both["gain"] - both["ci_low"], both["ci_high"] - both["gain"]])
    ax.errorbar(both["fidelity"], both["gain"], yerr=yerr, fmt="o", capsize=3,
                color=kind_colour(Kind.REAL_PLUS_SYNTHETIC))
    for row in both.itertuples(index=False):
        ax.annotate(row.label, (row.fidelity, row.gain), fontsize=7, xytext=(4, 2),
                    textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xlabel="conditional fidelity (judge AUROC synthetic / real)",
           ylabel="AUROC gain over its baseline")
    title = f"{arm}: gain per finding"
    if np.isfinite(rho.get("rho", np.nan)):
        title += (f"; Spearman rho {rho['rho']:+.2f} "
                  f"(95% CI {rho['ci_low']:+.2f} to {rho['ci_high']:+.2f})")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


FOREST_FIGURE = "forest.png"


def forest_figure(comparisons: pd.DataFrame, kinds: dict[str, str],
                  labels: dict[str, str]) -> plt.Figure:
    """The paired differences the tests judge: each comparison's difference in macro AUROC
    against its baseline (mean over seeds) with its 95% CI, one panel per test set, and a
    grey band of +/- its MDE (a difference inside it could be missed at 80% power). The
    figure that matches the paired test, unlike two arms' own CIs side by side.

    ``comparisons``: rows with experiment, baseline, test_set, delta, ci_low, ci_high, mde
    (the primary comparisons and the manipulation checks); ``kinds``: experiment -> kind, for
    its colour; ``labels``: identifiers (arms, test sets) -> the names pages show.
    """
    tests = list(dict.fromkeys(comparisons["test_set"]))
    pairs = list(dict.fromkeys(zip(comparisons["experiment"], comparisons["baseline"],
                                   strict=True)))
    height = 0.9 + 0.42 * len(pairs)
    fig, axes = plt.subplots(1, len(tests), figsize=(3.6 * len(tests) + 2.6, height),
                             sharey=True, squeeze=False)
    rows = {pair: i for i, pair in enumerate(reversed(pairs))}
    span = np.nanmax(np.abs(comparisons[["ci_low", "ci_high", "mde"]].to_numpy(float)))
    for ax, test in zip(axes[0], tests, strict=True):
        here = comparisons[comparisons["test_set"] == test]
        for r in here.itertuples(index=False):
            y = rows[(r.experiment, r.baseline)]
            if np.isfinite(r.mde):
                ax.fill_betweenx([y - 0.3, y + 0.3], -r.mde, r.mde, color="0.88", lw=0)
            colour = kind_colour(kinds.get(r.experiment, Kind.REAL_PLUS_SYNTHETIC))
            ax.plot([r.ci_low, r.ci_high], [y, y], color=colour, lw=2)
            ax.plot(r.delta, y, "o", color=colour, markersize=6)
        ax.axvline(0, color="0.3", lw=1)
        ax.set_xlim(-1.1 * span, 1.1 * span)
        ax.set_title(labels.get(test, test), fontsize=10)
        ax.set_xlabel("difference in macro AUROC")
        ax.grid(axis="x", alpha=0.3)
    names = [f"{labels.get(e, e)}\nvs {labels.get(b, b)}" for e, b in reversed(pairs)]
    axes[0][0].set_yticks(range(len(pairs)), names, fontsize=8)
    axes[0][0].set_ylim(-0.6, len(pairs) - 0.4)
    fig.suptitle("Paired differences against the baseline (95% CI; grey: +/- the MDE)",
                 fontsize=11)
    fig.tight_layout()
    return fig


def _rate_points(ax: plt.Axes, frame: pd.DataFrame, prefix: str, label: str,
                 colour: str) -> None:
    """Rates with their CI against x, joined by a line; extrapolated points hollow."""
    frame = frame.dropna(subset=[prefix + "rate"]).sort_values("x")
    if frame.empty:
        return
    rate = frame[prefix + "rate"]
    yerr = np.vstack([rate - frame[prefix + "ci_low"], frame[prefix + "ci_high"] - rate])
    ax.errorbar(frame["x"], rate, yerr=yerr, color=colour, capsize=3, lw=1.2, label=label,
                fmt="-")
    extrapolated = frame[prefix + "extrapolated"].to_numpy(dtype=bool)
    ax.scatter(frame["x"][~extrapolated], rate[~extrapolated], color=colour, zorder=3, s=28)
    ax.scatter(frame["x"][extrapolated], rate[extrapolated], facecolor="white",
               edgecolor=colour, zorder=3, s=28)


def worth_curves_figure(curve: pd.DataFrame, axis_titles: dict[str, str]) -> plt.Figure:
    """One panel per axis of the worth curves: the generator's exchange rate r (real images
    one extra image is worth) with its 95% CI at each point, the perfect generator's at the
    same dose and real fraction beside it, r = 0 and r = 1 as guides, and the run's own
    setting ringed.
    Hollow points are extrapolated beyond the learning curve."""
    axes_present = list(dict.fromkeys(curve["axis"]))
    ncol = min(2, len(axes_present))
    nrow = int(np.ceil(len(axes_present) / ncol))
    fig, grid = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.6 * nrow), squeeze=False)
    for ax, axis in zip(grid.flat, axes_present, strict=False):
        part = curve[curve["axis"] == axis]
        ax.set(xlabel=axis_titles[axis], ylabel="r (real images per extra image)")
        ax.set_title(axis_titles[axis].split(" (")[0], fontsize=10)
        if part[["rate", "perfect_rate"]].isna().all(axis=None):
            ax.text(0.5, 0.5, "no exchange rate on this test set\n(the learning curve is flat)",
                    ha="center", va="center", transform=ax.transAxes, fontsize=9)
            continue
        _rate_points(ax, part, "", "generator", kind_colour(Kind.REAL_PLUS_SYNTHETIC))
        _rate_points(ax, part, "perfect_", "perfect generator",
                     kind_colour(Kind.REAL_PLUS_ORACLE))
        own = part[part["reference"]].dropna(subset=["rate"])
        ax.scatter(own["x"], own["rate"], s=170, facecolor="none", edgecolor="black",
                   lw=1.2, zorder=4, label="the run's own setting")
        for level in (0, 1):
            ax.axhline(level, color="grey", lw=0.7, ls=":" if level else "-")
        if axis in ("compute", "size"):
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(StrMethodFormatter(
                "{x:,.0f}" if axis == "compute" else "{x:.0%}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(sorted(part["x"].unique()))
    for ax in list(grid.flat)[len(axes_present):]:
        ax.set_visible(False)
    handles, labels = grid.flat[0].get_legend_handles_labels()
    for ax in grid.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if labels:
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8,
                   frameon=False)
    fig.tight_layout(rect=(0, 0.06 if labels else 0, 1, 1))
    return fig


def measures_figure(settings: pd.DataFrame, correlations: pd.DataFrame) -> plt.Figure:
    """Each cheap measure of the generator settings (x) against the settings' exchange rate
    (y, with its 95% CI), one panel per measure, its Spearman rho (oriented: higher = closer
    to real) in the title; the run's own setting ringed."""
    rows = correlations.to_dict("records")
    ncol = 5
    nrow = int(np.ceil(len(rows) / ncol))
    fig, grid = plt.subplots(nrow, ncol, figsize=(2.9 * ncol, 2.6 * nrow), squeeze=False,
                             sharey=True)
    colour = kind_colour(Kind.REAL_PLUS_SYNTHETIC)
    for ax, row in zip(grid.flat, rows, strict=False):
        part = settings.dropna(subset=[row["column"], "rate"])
        yerr = np.vstack([part["rate"] - part["ci_low"], part["ci_high"] - part["rate"]])
        ax.errorbar(part[row["column"]], part["rate"], yerr=yerr, fmt="o", color=colour,
                    capsize=2, ms=4)
        own = part[part["reference"]]
        ax.scatter(own[row["column"]], own["rate"], s=110, facecolor="none", edgecolor="black")
        rho = (f"rho {row['rho']:+.2f} ({row['ci_low']:+.2f} to {row['ci_high']:+.2f})"
               if np.isfinite(row["rho"]) else "rho: too few settings")
        ax.set_title(f"{row['measure']}\n{rho}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.axhline(0, color="grey", lw=0.6)
    for ax in grid[:, 0]:
        ax.set_ylabel("r", fontsize=8)
    for ax in list(grid.flat)[len(rows):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig
