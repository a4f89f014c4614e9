"""The sampling explorer of notebook 03: widgets for a condition, a grid of generated images.

All logic lives here so it can be tested without a browser: the widgets only hold values;
:meth:`SamplingExplorer.generate` turns the current values into images and captions, and
:meth:`SamplingExplorer.figure` draws the grid (with the condition written under each image).
The compare mode (:meth:`SamplingExplorer.generate_comparison`,
:meth:`SamplingExplorer.comparison_figure`) generates the same seeds without and with one
change (a label, the sex, another age, or the other view for a model trained with the view)
and draws the difference maps. Given the training images, each generated image can show its
nearest training image and their pixel correlation, the memorization audit's measure
(:func:`cxrlib.synthetic.audit.metrics.nearest_neighbours`).
Headless runs (papermill, nbconvert) call the same methods to show static figures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import ipywidgets as W
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from cxrlib.core.labels import CHEXPERT_LABELS, RACE_VALUES, SEXES, VIEW_CODES
from cxrlib.diffusion.condition import condition_row, describe_condition
from cxrlib.diffusion.pipeline import CXRPipeline
from cxrlib.diffusion.samplers import SAMPLERS, generate
from cxrlib.synthetic.audit.metrics import nearest_neighbours

LABEL_STATES = {"absent": 0.0, "present": 1.0}
#: What the compare mode can change: the sex, the age, the view (offered only for a model
#: trained with it), or one of the 14 labels.
COMPARE_CHOICES: tuple[str, ...] = ("sex", "age", "view", *CHEXPERT_LABELS)


@dataclass
class Comparison:
    """Images from the same seeds under two conditions that differ in one thing."""

    without: np.ndarray  # n x R x R uint8: the first row's condition
    with_: np.ndarray  # n x R x R uint8: the same seeds with the change
    titles: tuple[str, str]  # what each row shows, e.g. ("without Edema", "with Edema")
    seeds: list[int]

    @property
    def difference(self) -> np.ndarray:
        """Signed per-pixel difference, second row minus first (int16)."""
        return self.with_.astype(np.int16) - self.without.astype(np.int16)


class SamplingExplorer:
    """Widgets for sex, age, race, the view (shown only when the generator was trained with
    it), the 14 labels, guidance, sampler, steps, seed and count, the compare mode, and (with
    ``train_images``, N x R x R uint8, may be a memory map) the nearest training image under
    each generated one. ``generator`` comes from a run's checkpoint or an exported folder
    (:mod:`cxrlib.diffusion.pipeline`)."""

    def __init__(self, generator: CXRPipeline, guidance_rescale: float = 0.7,
                 sampler: str = "ddim", steps: int = 25, train_images: np.ndarray | None = None):
        self.generator = generator
        self.train_images = train_images
        self.guidance_rescale = guidance_rescale
        style = {"description_width": "90px"}
        self.sex = W.Dropdown(options=list(SEXES), value="Male", description="sex", style=style)
        self.age = W.IntSlider(value=60, min=18, max=95, description="age", style=style)
        self.race = W.Dropdown(options=list(RACE_VALUES), value="White", description="race",
                               style=style)
        self.with_view = generator.unet.conditions_on_view
        self.view = W.Dropdown(options=list(VIEW_CODES), value="PA", description="view",
                               style=style)
        self.labels = {lab: W.ToggleButtons(options=list(LABEL_STATES), value="absent",
                                            description=lab, style={"description_width": "170px"})
                       for lab in CHEXPERT_LABELS}
        self.labels["No Finding"].value = "present"
        # w: 0 the plain conditional model, -1 unconditional (cxrlib.core.schema.Guidance)
        self.guidance = W.FloatSlider(value=0.0, min=-1.0, max=7.0, step=0.5,
                                      description="guidance w", style=style)
        self.sampler = W.Dropdown(options=list(SAMPLERS), value=sampler, description="sampler",
                                  style=style)
        self.steps = W.IntSlider(value=steps, min=2, max=200, description="steps", style=style)
        self.seed = W.IntText(value=0, description="first seed", style=style)
        self.count = W.IntSlider(value=4, min=1, max=16, description="images", style=style)
        self.nearest = W.Checkbox(value=False, description="nearest training image",
                                  disabled=train_images is None, indent=False)
        self.button = W.Button(description="Generate", button_style="primary")
        choices = [c for c in COMPARE_CHOICES if c != "view" or self.with_view]
        self.compare = W.Dropdown(options=choices, value="Cardiomegaly",
                                  description="compare", style=style)
        self.compare_age = W.IntSlider(value=30, min=18, max=95, description="other age",
                                       style=style)
        self.compare_button = W.Button(description="Compare", button_style="info")
        self.output = W.Output()
        self.last: tuple[np.ndarray, list[str]] | None = None
        self.last_comparison: Comparison | None = None
        self.last_figure: plt.Figure | None = None
        self.button.on_click(self.on_generate)
        self.compare_button.on_click(self.on_compare)

    def condition_row(self) -> pd.DataFrame:
        """The widgets' condition as one manifest-like row (with the view for a model trained
        with it)."""
        return condition_row(self.age.value, self.sex.value, self.race.value,
                             {lab: LABEL_STATES[w.value] for lab, w in self.labels.items()},
                             self.view.value if self.with_view else None)

    def seeds(self) -> list[int]:
        """The seeds of the current widgets: first_seed .. first_seed + n - 1."""
        return [self.seed.value + i for i in range(self.count.value)]

    def _generate_for(self, row: pd.DataFrame, seeds: list[int]) -> tuple[np.ndarray, str]:
        cond = np.repeat(self.generator.encode(row), len(seeds), axis=0)
        images = generate(self.generator.unet, self.generator.scheduler, cond, seeds,
                          self.sampler.value, self.steps.value, self.guidance.value,
                          self.guidance_rescale)
        return images, describe_condition(cond[0])

    def generate(self) -> tuple[np.ndarray, list[str]]:
        """Images for the current widget values (seeds first_seed .. first_seed + n - 1)."""
        seeds = self.seeds()
        images, caption = self._generate_for(self.condition_row(), seeds)
        captions = [f"seed {s}\n{caption}" for s in seeds]
        self.last = (images, captions)
        return images, captions

    def comparison_rows(self) -> tuple[pd.DataFrame, pd.DataFrame, tuple[str, str]]:
        """The widgets' condition twice, differing only in what ``compare`` names, and the
        rows' titles. A label: absent, then present (a finding switched on also switches
        No Finding off, as in notebook 02). Sex: the widgets' sex, then the other one. Age:
        the widgets' age, then ``other age``. View: the widgets' view, then the other one."""
        base = self.condition_row()
        first, second = base.copy(), base.copy()
        what = self.compare.value
        if what == "sex":
            other = next(s for s in SEXES if s != self.sex.value)
            second["sex"] = other
            return first, second, (f"sex {self.sex.value}", f"sex {other}")
        if what == "view":
            other = next(v for v in VIEW_CODES if v != self.view.value)
            second["view"] = other
            return first, second, (f"view {self.view.value}", f"view {other}")
        if what == "age":
            second["age"] = float(self.compare_age.value)
            return first, second, (f"age {self.age.value}", f"age {self.compare_age.value}")
        first[what], second[what] = 0.0, 1.0
        if what != "No Finding":
            second["No Finding"] = 0.0
        return first, second, (f"without {what}", f"with {what}")

    def generate_comparison(self) -> Comparison:
        """The same seeds under both :meth:`comparison_rows` conditions."""
        first, second, titles = self.comparison_rows()
        seeds = self.seeds()
        without, _ = self._generate_for(first, seeds)
        with_, _ = self._generate_for(second, seeds)
        self.last_comparison = Comparison(without, with_, titles, seeds)
        return self.last_comparison

    def nearest_training(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each image's nearest training image: (index into ``train_images``, pixel
        correlation), the memorization audit's pixel measure."""
        if self.train_images is None:
            raise ValueError("the explorer was built without train_images")
        return nearest_neighbours(images, self.train_images, "pixel")

    def _draw(self, ax: plt.Axes, img: np.ndarray, label: str, **imshow) -> None:
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.imshow(img, **({"cmap": "gray", "vmin": 0, "vmax": 255} | imshow))
        ax.set_xlabel(self._wrap(label), fontsize=6)  # under the image; layout makes room

    def _draw_nearest(self, axes: np.ndarray, images: np.ndarray) -> None:
        idx, sim = self.nearest_training(images)
        for ax, i, r in zip(axes, idx, sim, strict=False):
            self._draw(ax, self.train_images[i], f"nearest training image {i}\nr = {r:.3f}")

    def _title(self, fig: plt.Figure, extra: str = "") -> None:
        fig.suptitle(f"{self.sampler.value}, {self.steps.value} steps, guidance w "
                     f"{self.guidance.value:g}{extra}", fontsize=8)
        fig.tight_layout()

    def figure(self, images: np.ndarray, captions: list[str],
               nearest: bool = False) -> plt.Figure:
        """A grid with the condition under each image; with ``nearest``, each image's
        nearest training image and their pixel correlation below it."""
        cols = min(4, len(images))
        rows = int(np.ceil(len(images) / cols))
        per = 2 if nearest else 1
        fig, axes = plt.subplots(rows * per, cols, figsize=(2.6 * cols, 3.2 * rows * per),
                                 squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        grid = axes[::per].ravel()
        for ax, img, cap in zip(grid, images, captions, strict=False):
            self._draw(ax, img, cap)
        if nearest:
            self._draw_nearest(axes[1::2].ravel(), images)
        self._title(fig)
        return fig

    def comparison_figure(self, cmp: Comparison, nearest: bool = False) -> plt.Figure:
        """A row without the change, a row with it (each with its nearest training images if
        ``nearest``), and a row of difference maps (with minus without, red = brighter)."""
        n = len(cmp.seeds)
        rows = [("image", cmp.without, cmp.titles[0])]
        if nearest:
            rows.append(("nearest", cmp.without, ""))
        rows.append(("image", cmp.with_, cmp.titles[1]))
        if nearest:
            rows.append(("nearest", cmp.with_, ""))
        rows.append(("difference", cmp.difference, f"{cmp.titles[1]} minus {cmp.titles[0]}"))
        fig, axes = plt.subplots(len(rows), n, figsize=(2.3 * n + 0.6, 2.7 * len(rows)),
                                 squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        vmax = max(int(np.abs(cmp.difference).max()), 1)
        for r, (kind, images, title) in enumerate(rows):
            if kind == "nearest":
                self._draw_nearest(axes[r], images)
                continue
            for ax, img, seed in zip(axes[r], images, cmp.seeds, strict=True):
                if kind == "difference":
                    self._draw(ax, img, f"seed {seed}: mean |diff| {np.abs(img).mean():.1f}",
                               cmap="RdBu_r", vmin=-vmax, vmax=vmax)
                else:
                    self._draw(ax, img, f"seed {seed}")
            axes[r, 0].set_ylabel(self._wrap(title, 24), fontsize=7)
        self._title(fig, f"; compare {self.compare.value}")
        return fig

    @staticmethod
    def _wrap(text: str, width: int = 38) -> str:
        words, lines, line = text.replace("\n", " \n ").split(" "), [], ""
        for w in words:
            if w == "\n" or len(line) + len(w) + 1 > width:
                lines.append(line)
                line = "" if w == "\n" else w
            else:
                line = f"{line} {w}".strip()
        lines.append(line)
        return "\n".join(x for x in lines if x)

    def on_generate(self, _button=None) -> None:
        """Button callback: generate and draw into the output area."""
        self._show(lambda: self.figure(*self.generate(), nearest=self.nearest.value))

    def on_compare(self, _button=None) -> None:
        """Compare button callback: the two rows and their differences, drawn in the output."""
        self._show(lambda: self.comparison_figure(self.generate_comparison(),
                                                  self.nearest.value))

    def _show(self, draw: Callable[[], plt.Figure]) -> None:
        """Draw into the output area (an error shows there too, not in a hidden log)."""
        from IPython.display import display

        self.output.clear_output(wait=True)
        with self.output:
            self.last_figure = draw()
            display(self.last_figure)
            plt.close(self.last_figure)

    def widget(self) -> W.Widget:
        demo = W.VBox([self.sex, self.age, self.race, *([self.view] if self.with_view else [])])
        how = W.VBox([self.guidance, self.sampler, self.steps, self.seed, self.count,
                      self.nearest, self.button])
        compare = W.HBox([self.compare, self.compare_age, self.compare_button])
        labels = W.VBox(list(self.labels.values()))
        return W.VBox([W.HBox([demo, how]), compare, W.Accordion([labels], titles=("labels",)),
                       self.output])
