"""The progress-bar policy: a log gets a few redraws, a terminal a live bar."""

from __future__ import annotations

import io

import pytest

from cxrlib.core import progress
from cxrlib.core.progress import LOG_INTERVAL_S, PROGRESS_ENV, progress_mode, tqdm


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_mode_follows_the_stream_and_the_environment(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    assert progress_mode(_Terminal()) == "terminal"
    assert progress_mode(io.StringIO()) == "log"  # a file, outside any Jupyter kernel
    monkeypatch.setattr(progress, "_in_jupyter_kernel", lambda: True)
    assert progress_mode(io.StringIO()) == "notebook"
    monkeypatch.setenv(PROGRESS_ENV, "log")
    assert progress_mode(_Terminal()) == "log"
    monkeypatch.setenv(PROGRESS_ENV, "loud")
    with pytest.raises(ValueError, match="CXRLIB_PROGRESS='loud'"):
        progress_mode()


def test_a_log_gets_few_redraws_with_a_rate(monkeypatch):
    """10,000 fast steps written to a file: the first and last state only, not one per step."""
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    log = io.StringIO()
    bar = tqdm(range(10_000), desc="diffusion steps", file=log)
    assert bar.mininterval == LOG_INTERVAL_S
    for step in bar:
        bar.set_postfix(loss=f"{1 / (step + 1):.4f}")  # as the training loops do every step
    text = log.getvalue()
    states = [s for s in text.replace("\n", "\r").split("\r") if s.strip()]
    assert len(states) <= 3, states
    assert "diffusion steps: 100%" in states[-1] and "it/s" in states[-1]
    assert "loss=0.0001" in states[-1]  # the last postfix is drawn when the bar closes
    assert text.count("\n") == 1  # redrawn in place; one line when the bar closes


def test_a_terminal_gets_a_live_bar_and_explicit_settings_win(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    assert tqdm(range(3), file=_Terminal()).mininterval == progress.TERMINAL_INTERVAL_S
    assert tqdm(range(3), file=io.StringIO(), mininterval=2.0).mininterval == 2.0
    off = tqdm(range(3), file=io.StringIO(), disable=True)
    off.set_postfix(loss="1")  # a disabled bar ignores postfixes
    assert off.disable
