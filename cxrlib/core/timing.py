"""Where a stage's time goes: wall-clock seconds of its named parts (notebook 03's profile).

No torch here, and nothing but the standard library and pandas.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import pandas as pd

#: The profile table's row for the time no part accounts for.
REST = "rest (loading, explorer, figures, tables)"


class Profile:
    """Seconds per named part, timed with ``with profile.part("name"):`` (a part timed twice
    adds up); the clock starts when the profile is made, so :meth:`table` can also say how
    much of the time since then no part accounts for."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Time the block under ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add({name: time.perf_counter() - start})

    def add(self, seconds: dict[str, float], prefix: str = "") -> None:
        """Parts timed elsewhere (e.g. an audit's own parts), their names prefixed."""
        for name, value in seconds.items():
            self.seconds[prefix + name] = self.seconds.get(prefix + name, 0.0) + value

    def table(self, rest: str = REST) -> pd.DataFrame:
        """One row per part in the order first timed, then ``rest`` (the time since the
        profile was made that no part covers): seconds and share of that total."""
        elapsed = time.perf_counter() - self.started
        rows = {**self.seconds, rest: max(0.0, elapsed - sum(self.seconds.values()))}
        frame = pd.DataFrame({"seconds": pd.Series(rows)}).rename_axis("part")
        return frame.assign(share=frame["seconds"] / frame["seconds"].sum()).round(
            {"seconds": 2, "share": 3})

    @staticmethod
    def sentence(table: pd.DataFrame, rest: str = REST) -> str:
        """The largest named part of a :meth:`table` and the time outside the parts, in
        words."""
        parts = table.drop(index=rest, errors="ignore")
        top = parts["seconds"].idxmax()
        line = (f"Of {table['seconds'].sum():.0f} s, the largest part is {top}: "
                f"{parts.loc[top, 'seconds']:.1f} s ({parts.loc[top, 'share']:.0%})")
        if rest in table.index:
            line += f"; {table.loc[rest, 'seconds']:.1f} s went to the {rest}"
        return line + "."
