"""Main-process writes under ``accelerate launch``.

Several processes run the same code there; files shared by all of them are written by the
main process only (:func:`on_main`), while the others wait, and a failure on the main process
is raised on every process instead of hanging at the next barrier. accelerate (and torch) are
imported only when one of these functions runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from accelerate import PartialState
T = TypeVar("T")


def process_state() -> PartialState:
    """accelerate's state of this process, set up as cxrlib's Accelerators are (on the CPU where
    there is no GPU), so that it is right even before any Accelerator exists: a bare
    ``PartialState()`` under ``accelerate launch`` on a CPU-only machine sees one process."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    """True on the process that writes shared files: rank 0 under ``accelerate launch``, and
    the only process otherwise."""
    return process_state().is_main_process


class MainProcessError(RuntimeError):
    """Raised on the other processes when work done on the main process failed."""


def on_main(fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on the main process only; every process returns once it has finished.

    Returns ``fn``'s result on the main process and None on the others. If ``fn`` raises, the
    main process re-raises it and every other process raises :class:`MainProcessError` naming
    it, instead of waiting at the next barrier until a collective timeout hides the cause.
    """
    from accelerate.utils import broadcast_object_list

    result, failure = None, None
    if is_main_process():
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the others are told
            failure = exc
    state = process_state()
    if state.num_processes > 1:
        state.wait_for_everyone()
        flag = [None if failure is None else f"{type(failure).__name__}: {failure}"]
        broadcast_object_list(flag)
        if failure is None and flag[0] is not None:
            raise MainProcessError(f"the main process failed: {flag[0]}")
    if failure is not None:
        raise failure
    return result
