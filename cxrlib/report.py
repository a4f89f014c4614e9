"""Figures and tables for the notebooks, each also saved under the run folder.

Every function returns what the notebook displays (a matplotlib figure or a DataFrame) after
writing it to ``<run>/<stage>/`` as PNG or CSV (temporary name, then rename), so a collaborator
finds everything the notebook showed without opening it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter
from pydantic import BaseModel

from cxrlib.io import atomic_path, atomic_write_parquet, atomic_write_text
from cxrlib.kinds import Kind
from cxrlib.labels import CHEXPERT_LABELS
from cxrlib.runlock import claim, finish

if TYPE_CHECKING:  # the figures need no torch; only sample_grid reads a cache
    from cxrlib.imagecache import ImageCache
    from cxrlib.layout import RunLayout


class Outputs:
    """Where one stage of a run saves what it shows: :meth:`RunLayout.stage`. Every file a
    notebook writes goes through one of these methods (temporary name, then rename).

    Made in a notebook's first cell, it claims the run's one-writer lock for the stage
    (:func:`cxrlib.runlock.claim`: the earlier stages' files checked first); the last cell's
    :meth:`finish` records the stage and lets go. Under ``cxrlib run`` the runner does both.
    """

    def __init__(self, run: RunLayout, stage: str):
        claim(run, stage)
        self._run, self._stage = run, stage
        self.folder = run.stage(stage)
        self.folder.mkdir(parents=True, exist_ok=True)

    def finish(self) -> None:
        """The stage is done: record its files (:mod:`cxrlib.records`) and release the run's
        lock, where this kernel took it."""
        finish(self._run, self._stage)

    def text(self, text: str, name: str) -> str:
        """A statement or finding, as ``<name>.txt``; returns the text for printing."""
        atomic_write_text(self.folder / f"{name}.txt", text + "\n")
        return text

    def parquet(self, df: pd.DataFrame, name: str) -> pd.DataFrame:
        """A frame too long for CSV (per-image predictions), as ``<name>.parquet``."""
        atomic_write_parquet(df, self.folder / f"{name}.parquet")
        return df

    def figure(self, fig: plt.Figure, name: str) -> plt.Figure:
        with atomic_path(self.folder / f"{name}.png") as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
        return fig

    def table(self, df: pd.DataFrame, name: str) -> pd.DataFrame:
        with atomic_path(self.folder / f"{name}.csv") as tmp:
            df.to_csv(tmp, index=df.index.name is not None or not isinstance(df.index,
                                                                              pd.RangeIndex))
        return df


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


def learning_curve(history: pd.DataFrame, best_epoch: int) -> plt.Figure:
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


def schedule_figure(scheduler) -> plt.Figure:
    """alpha_t, sigma_t and log SNR of the training schedule (zero terminal SNR: alpha_T = 0)."""
    abar = scheduler.alphas_cumprod.numpy().astype(float)
    t = np.arange(len(abar))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    axes[0].plot(t, np.sqrt(abar), label=r"$\alpha_t$ (signal)")
    axes[0].plot(t, np.sqrt(1 - abar), label=r"$\sigma_t$ (noise)")
    axes[0].set_xlabel("timestep t")
    axes[0].legend()
    with np.errstate(divide="ignore"):
        axes[1].plot(t, np.log(abar / (1 - abar)))
    axes[1].set_xlabel("timestep t")
    axes[1].set_ylabel("log SNR")
    axes[1].set_title(f"alpha at T: {np.sqrt(abar[-1]):.2e}")
    fig.tight_layout()
    return fig


def loss_curve(history: pd.DataFrame, window: int = 50) -> plt.Figure:
    """Training loss per step with a rolling mean, and the learning rate."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3))
    axes[0].plot(history["step"], history["loss"], alpha=0.3, lw=0.8, label="per step")
    axes[0].plot(history["step"], history["loss"].rolling(window, min_periods=1).mean(),
                 label=f"rolling mean ({window})")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("MSE (v)")
    axes[0].set_yscale("log")
    axes[0].legend()
    axes[1].plot(history["step"], history["lr"])
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("learning rate")
    fig.tight_layout()
    return fig


def image_grid(images: dict[str, np.ndarray], title: str = "") -> plt.Figure:
    """Columns = named image sets (same seeds down each row), e.g. condition pairs."""
    names = list(images)
    n = len(next(iter(images.values())))
    fig, axes = plt.subplots(n, len(names), figsize=(1.6 * len(names), 1.6 * n), squeeze=False)
    for c, name in enumerate(names):
        for r in range(n):
            ax = axes[r, c]
            ax.imshow(images[name][r], cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def difference_maps(images: dict[str, np.ndarray], reference: str) -> dict[str, np.ndarray]:
    """Mean |image - reference| over seeds (R x R) for each other condition."""
    ref = images[reference].astype(float)
    return {k: np.abs(v.astype(float) - ref).mean(0) for k, v in images.items() if k != reference}


def condition_effect(images: dict[str, np.ndarray], reference: str) -> pd.DataFrame:
    """Mean |change| in grey levels per condition against ``reference`` (the difference maps'
    averages): how strongly each switched-on condition changes the same seeds' images."""
    effect = {k: float(m.mean()) for k, m in difference_maps(images, reference).items()}
    return pd.Series(effect, name="mean |change|").round(2).to_frame()


def difference_grid(images: dict[str, np.ndarray], reference: str) -> plt.Figure:
    """Mean |image - reference| over seeds for each condition: where the condition acts."""
    maps = difference_maps(images, reference)
    fig, axes = plt.subplots(1, len(maps), figsize=(2.2 * len(maps), 2.4), squeeze=False)
    vmax = max(float(m.max()) for m in maps.values()) or 1
    for ax, (name, diff) in zip(axes[0], maps.items(), strict=True):
        ax.imshow(diff, cmap="magma", vmin=0, vmax=vmax)
        ax.set_title(f"{name}\nvs {reference}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Notebook 04: the classifier experiment grid


def grid_learning_curves(histories: pd.DataFrame, results: pd.DataFrame) -> plt.Figure:
    """Validation loss per validation round (x: optimizer step) for every experiment (mean
    over seeds), one panel per group of experiments (real fraction, or the external site),
    taken from the recipes in ``results`` (:func:`cxrlib.grid.grid_results`)."""
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
    """Macro AUROC (mean over seeds, :func:`cxrlib.study_tables.seed_spread`) per experiment and
    test set."""
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


# ---------------------------------------------------------------------------------------------
# Notebook 05: statistics (the paper's Figure 3 and 4 shapes, real-data fraction, subgroups)


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
    of :data:`cxrlib.exchange.CURVE_FORM`), with every placed arm drawn at its own real images
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
