"""Diffusion training's figures (notebook 02): the noise schedule, the loss curve, image grids
of samples, and the difference maps that show what each condition changes.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


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
