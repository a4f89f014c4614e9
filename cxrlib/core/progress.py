"""One progress-bar policy for cxrlib's long loops (diffusion training, generation, the grid).

:func:`tqdm` takes tqdm's arguments and picks the bar for where its output goes:

* ``terminal``: a text bar with its rate, redrawn at most every :data:`TERMINAL_INTERVAL_S`;
* ``notebook``: tqdm's widget bar (a notebook a person opened in Jupyter);
* ``log``: a text bar redrawn in place (``\\r``) at most every :data:`LOG_INTERVAL_S`, so an
  hour-long loop adds a few hundred short updates to a log file, never one per step, and a
  rendered notebook keeps only the last one.

The mode is guessed from the output stream (a terminal, a Jupyter kernel, anything else);
the environment variable ``CXRLIB_PROGRESS`` overrides the guess. ``python -m cxrlib run``
sets it for the notebook kernels it starts, whose output it streams to its own terminal.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm import tqdm as text_tqdm
from tqdm.auto import tqdm as auto_tqdm

#: Environment variable naming the mode (``terminal``, ``notebook`` or ``log``).
PROGRESS_ENV = "CXRLIB_PROGRESS"
MODES: tuple[str, ...] = ("terminal", "notebook", "log")
#: Least seconds between two redraws of a bar on a terminal.
TERMINAL_INTERVAL_S = 0.5
#: Least seconds between two redraws of a bar written to a log (file, CI, streamed kernel).
LOG_INTERVAL_S = 20.0


def _in_jupyter_kernel() -> bool:
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and "IPKernelApp" in shell.config


def progress_mode(stream: Any = None) -> str:
    """The bar for output to ``stream`` (default stderr): ``CXRLIB_PROGRESS`` if set, else
    ``terminal`` for a TTY, ``notebook`` inside a Jupyter kernel, ``log`` otherwise."""
    mode = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if mode:
        if mode not in MODES:
            raise ValueError(f"{PROGRESS_ENV}={mode!r}: expected one of {', '.join(MODES)}")
        return mode
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return "terminal"
    return "notebook" if _in_jupyter_kernel() else "log"


class _TextBar(text_tqdm):
    """A text bar whose postfix changes redraw it only once ``mininterval`` has passed since
    the last redraw (tqdm redraws on every change: a loop that sets its loss every step
    would write one state per step, whatever ``mininterval`` says)."""

    def _redraw_due(self) -> bool:
        return not self.disable and self._time() - self.last_print_t >= self.mininterval

    def set_postfix(self, ordered_dict: Any = None, refresh: bool | None = True,
                    **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=refresh and self._redraw_due(), **kwargs)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        super().set_postfix_str(s, refresh=refresh and self._redraw_due())


def tqdm(*args: Any, **kwargs: Any) -> text_tqdm:
    """A tqdm bar (same arguments) drawn as :func:`progress_mode` says; an explicit
    ``mininterval`` wins over the mode's."""
    mode = progress_mode(kwargs.get("file"))
    if mode == "notebook":
        return auto_tqdm(*args, **kwargs)
    interval = TERMINAL_INTERVAL_S if mode == "terminal" else LOG_INTERVAL_S
    kwargs.setdefault("mininterval", interval)
    kwargs.setdefault("maxinterval", max(interval, kwargs["mininterval"]))
    if mode == "log":
        kwargs.setdefault("dynamic_ncols", False)
        kwargs.setdefault("ncols", 100)
    return _TextBar(*args, **kwargs)
