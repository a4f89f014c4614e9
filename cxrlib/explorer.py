"""The sampling explorer of notebook 03: widgets for a condition, a grid of generated images.

All logic lives here so it can be tested without a browser: the widgets only hold values;
:meth:`SamplingExplorer.generate` turns the current values into images and captions, and
:meth:`SamplingExplorer.figure` draws the grid (with the condition written under each image).
Headless runs (papermill, nbconvert) call the same two methods to show a static grid.
"""

from __future__ import annotations

import ipywidgets as W
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from diffusers import DDPMScheduler

from cxrlib.condition import describe_condition, encode_conditions
from cxrlib.diffusion import ConditionalUNet
from cxrlib.labels import CHEXPERT_LABELS, RACE_VALUES, SEXES
from cxrlib.sampling import SAMPLERS, generate

LABEL_STATES = {"absent": 0.0, "present": 1.0}


class SamplingExplorer:
    """Widgets for sex, age, race, the 14 labels, guidance, sampler, steps, seed and count."""

    def __init__(self, model: ConditionalUNet, train_scheduler: DDPMScheduler,
                 nan_value: float = 0.0, guidance_rescale: float = 0.7, sampler: str = "ddim",
                 steps: int = 25):
        self.model = model
        self.train_scheduler = train_scheduler
        self.nan_value = nan_value
        self.guidance_rescale = guidance_rescale
        style = {"description_width": "90px"}
        self.sex = W.Dropdown(options=list(SEXES), value="Male", description="sex", style=style)
        self.age = W.IntSlider(value=60, min=18, max=95, description="age", style=style)
        self.race = W.Dropdown(options=list(RACE_VALUES), value="White", description="race",
                               style=style)
        self.labels = {lab: W.ToggleButtons(options=list(LABEL_STATES), value="absent",
                                            description=lab, style={"description_width": "170px"})
                       for lab in CHEXPERT_LABELS}
        self.labels["No Finding"].value = "present"
        self.guidance = W.FloatSlider(value=0.0, min=0.0, max=8.0, step=0.5,
                                      description="guidance", style=style)
        self.sampler = W.Dropdown(options=list(SAMPLERS), value=sampler, description="sampler",
                                  style=style)
        self.steps = W.IntSlider(value=steps, min=2, max=200, description="steps", style=style)
        self.seed = W.IntText(value=0, description="first seed", style=style)
        self.count = W.IntSlider(value=4, min=1, max=16, description="images", style=style)
        self.button = W.Button(description="Generate", button_style="primary")
        self.output = W.Output()
        self.last: tuple[np.ndarray, list[str]] | None = None
        self.last_figure: plt.Figure | None = None
        self.button.on_click(self.on_generate)

    def condition_row(self) -> pd.DataFrame:
        """The widgets' condition as one manifest-like row."""
        row = {"age": float(self.age.value), "sex": self.sex.value, "race": self.race.value}
        row.update({lab: LABEL_STATES[w.value] for lab, w in self.labels.items()})
        return pd.DataFrame([row])

    def generate(self) -> tuple[np.ndarray, list[str]]:
        """Images for the current widget values (seeds first_seed .. first_seed + n - 1)."""
        n = self.count.value
        cond = np.repeat(encode_conditions(self.condition_row(), self.nan_value), n, axis=0)
        seeds = [self.seed.value + i for i in range(n)]
        images = generate(self.model, self.train_scheduler, cond, seeds, self.sampler.value,
                          self.steps.value, self.guidance.value, self.guidance_rescale)
        caption = describe_condition(cond[0])
        captions = [f"seed {s}\n{caption}" for s in seeds]
        self.last = (images, captions)
        return images, captions

    def figure(self, images: np.ndarray, captions: list[str]) -> plt.Figure:
        """A grid with the condition under each image."""
        cols = min(4, len(images))
        rows = int(np.ceil(len(images) / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 3.2 * rows), squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        for ax, img, cap in zip(axes.ravel(), images, captions, strict=False):
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.imshow(img, cmap="gray", vmin=0, vmax=255)
            ax.set_xlabel(self._wrap(cap), fontsize=6)  # under the image; layout makes room
        fig.suptitle(f"{self.sampler.value}, {self.steps.value} steps, guidance "
                     f"{self.guidance.value:g}", fontsize=8)
        fig.tight_layout()
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
        from IPython.display import display

        self.output.clear_output(wait=True)
        with self.output:
            self.last_figure = self.figure(*self.generate())
            display(self.last_figure)
            plt.close(self.last_figure)

    def widget(self) -> W.Widget:
        demo = W.VBox([self.sex, self.age, self.race])
        how = W.VBox([self.guidance, self.sampler, self.steps, self.seed, self.count,
                      self.button])
        labels = W.VBox(list(self.labels.values()))
        return W.VBox([W.HBox([demo, how]), W.Accordion([labels], titles=("labels",)),
                       self.output])
