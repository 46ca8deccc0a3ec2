"""Progress reporting and cancellation, shared by every slow operation.

Slow functions take ``progress: ProgressCallback | None`` and ``cancel: CancelToken | None``. They call
``report(progress, fraction, message)`` and ``check(cancel)`` between units of work (a window, an epoch).
The CLI maps the callback to a tqdm bar; Slicer maps it to its progress bar and the Cancel button sets the token.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Optional

from .errors import Cancelled

ProgressCallback = Callable[[float, str], None]


class CancelToken:
    """A thread-safe flag: the UI thread calls ``cancel()``, the worker calls ``raise_if_cancelled()``."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled()


def report(progress: Optional[ProgressCallback], fraction: float, message: str = "") -> None:
    if progress is not None:
        progress(min(max(float(fraction), 0.0), 1.0), message)


def check(cancel: Optional[CancelToken]) -> None:
    if cancel is not None:
        cancel.raise_if_cancelled()


def scaled(progress: Optional[ProgressCallback], start: float, stop: float) -> Optional[ProgressCallback]:
    """A callback that maps a sub-task's 0..1 onto ``start..stop`` of the parent's bar."""
    if progress is None:
        return None
    return lambda fraction, message="": progress(start + (stop - start) * fraction, message)


@contextlib.contextmanager
def interrupt_cancels(cancel: CancelToken):
    """Within the block, Ctrl+C (SIGINT) cancels ``cancel`` (long work stops at its next check and raises
    ``Cancelled``); a second Ctrl+C interrupts at once. A KeyboardInterrupt raised wherever Python happens to be
    can land in a finaliser, where Python prints and ignores it, and the work would go on: a cancel check cannot
    be missed. Outside the main thread (where signals cannot be handled) the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_interrupt(signum, frame):
        if cancel.cancelled:
            raise KeyboardInterrupt
        cancel.cancel()

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
