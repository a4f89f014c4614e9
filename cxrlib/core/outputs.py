"""What a notebook shows is also saved under its run: :class:`Outputs`.

A notebook's first cell makes ``Outputs(run, stage)``: every figure and table it displays
goes through it to ``<run>/<stage>/`` as PNG or CSV (temporary name, then rename), so a
collaborator finds everything the notebook showed without opening it. It also holds the run
for the notebook's writes (:func:`cxrlib.core.records.claim`) from the first cell and records
the stage at the last (:meth:`Outputs.finish`). The figures themselves live with their stage
(``cxrlib.<stage>.figures``).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import pandas as pd

from cxrlib.core.files import atomic_path, atomic_write_parquet, atomic_write_text
from cxrlib.core.records import claim, finish
from cxrlib.core.vocabulary import readable, with_labels

if TYPE_CHECKING:
    from cxrlib.core.layout import RunLayout


class Outputs:
    """Where one stage of a run saves what it shows: :meth:`RunLayout.stage`. Every file a
    notebook writes goes through one of these methods (temporary name, then rename).

    Made in a notebook's first cell, it claims the run's one-writer lock for the stage
    (:func:`cxrlib.core.records.claim`: the earlier stages' files checked first); the last cell's
    :meth:`finish` records the stage and lets go. Under ``cxrlib run`` the runner does both.
    """

    def __init__(self, run: RunLayout, stage: str):
        claim(run, stage)
        self._run, self._stage = run, stage
        #: Identifiers (arms, test sets) -> the labels tables and sentences show.
        self.labels: dict[str, str] = {}
        self.folder = run.stage(stage)
        self.folder.mkdir(parents=True, exist_ok=True)

    def finish(self) -> None:
        """The stage is done: record its files (:mod:`cxrlib.core.records`) and release the run's
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

    def table(self, df: pd.DataFrame, name: str) -> Shown:
        """``df`` as ``<name>.csv`` (identifiers, full precision); returns it to display as a
        page shows it (:meth:`show`)."""
        with atomic_path(self.folder / f"{name}.csv") as tmp:
            df.to_csv(tmp, index=df.index.name is not None or not isinstance(df.index,
                                                                              pd.RangeIndex))
        return self.show(df)

    def show(self, df: pd.DataFrame) -> Shown:
        """``df`` displayed with labels for identifiers, no index, numbers to 3 decimals;
        still the same DataFrame to compute with."""
        shown = Shown(df)
        shown.attrs.update(df.attrs)  # what a table carries beside its rows (e.g. totals)
        shown._labels = self.labels
        return shown

    def say(self, sentences: Sequence[str], name: str | None = None) -> Prose:
        """Generated sentences as paragraphs, identifiers shown as labels; saved as
        ``<name>.txt`` when named."""
        lines = [with_labels(s, self.labels) for s in sentences]
        if name:
            self.text("\n".join(lines), name)
        return Prose(lines)


class Shown(pd.DataFrame):
    """A table as saved (identifiers, full precision) that a notebook displays as a page
    shows it (:func:`cxrlib.core.vocabulary.readable`: labels, no index, 3 decimals). Any
    operation on it gives a plain DataFrame back."""

    _metadata = ["_labels"]

    @property
    def _constructor(self) -> type[pd.DataFrame]:
        return pd.DataFrame

    def _repr_html_(self) -> str:
        frame = readable(pd.DataFrame(self), getattr(self, "_labels", None) or {})
        return frame.to_html(index=False, border=0, classes="dataframe", na_rep="-")


class Prose:
    """Generated sentences a notebook displays as paragraphs (proportional type, wrapped by
    the page), and as plain lines in a terminal."""

    def __init__(self, sentences: list[str]):
        self.sentences = sentences

    def __repr__(self) -> str:
        return "\n\n".join(self.sentences)

    def _repr_html_(self) -> str:
        return "".join(f"<p>{html.escape(s)}</p>" for s in self.sentences)
