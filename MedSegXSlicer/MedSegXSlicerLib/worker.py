"""One persistent background thread that runs engine work, so Slicer's interface never freezes.

Why one long-lived thread rather than a thread per click: CUDA (and cuDNN/cuBLAS handles, autocast state) is
per thread, so re-creating threads would re-initialise it on every click; a single worker keeps it warm
(nnInteractive does the same). Jobs run one at a time, in submission order.

Why polling rather than callbacks into the GUI: MRML and Qt objects may only be touched from the main thread.
The worker therefore never calls back into Slicer; it records progress and the outcome on the ``Job``, and the
main thread reads them: the widget with a ``QTimer``, the console/batch path with :meth:`Job.wait`.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Optional

from medsegx_core.errors import Cancelled
from medsegx_core.progress import CancelToken

#: Progress reports a Job keeps for wait() between two polls (older ones are dropped first).
UNSEEN_REPORTS_KEPT = 1000

#: ``fn(progress, cancel) -> result``: the engine work; runs on the worker thread, must not touch MRML or Qt.
JobFunction = Callable[[Callable[[float, str], None], CancelToken], Any]


class Job:
    """One unit of engine work: its state, latest progress, and result or error (all thread-safe to read)."""

    QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"

    def __init__(self, fn: JobFunction, cancel: Optional[CancelToken] = None, description: str = ""):
        self._fn = fn
        self.cancel_token = cancel or CancelToken()
        self.description = description
        self._lock = threading.Lock()
        self._finished = threading.Event()
        self._state = Job.QUEUED
        self._progress = (0.0, "waiting for the engine")
        # Every report since the last wait() poll, so a console caller sees each message (a validation Dice,
        # a finished structure) even when the engine reports faster than it polls; bounded for callers that
        # only read ``progress`` (the widget).
        self._unseen: Deque[tuple] = deque(maxlen=UNSEEN_REPORTS_KEPT)
        self._result: Any = None
        self._error: Optional[BaseException] = None

    # ---- read from any thread ---------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        with self._lock:
            return self._state

    @property
    def progress(self) -> tuple:
        """``(fraction, message)`` last reported by the engine."""
        with self._lock:
            return self._progress

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    @property
    def error(self) -> Optional[BaseException]:
        with self._lock:
            return self._error

    def cancel(self) -> None:
        """Ask the engine to stop at its next check point; the job then ends in state ``cancelled``."""
        self.cancel_token.cancel()

    def result(self) -> Any:
        """The engine's result; re-raises the engine's exception (``Cancelled`` included) in the caller's thread."""
        if not self.finished:
            raise RuntimeError(f"job {self.description!r} has not finished yet")
        with self._lock:
            if self._error is not None:
                raise self._error
            return self._result

    def wait(self, on_progress: Optional[Callable[[float, str], None]] = None, poll_s: float = 0.05,
             timeout_s: Optional[float] = None) -> Any:
        """Block the calling thread until the job ends, forwarding progress to ``on_progress`` in this thread.

        Used by the console and batch paths; the widget polls instead so that Qt keeps processing events.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._finished.wait(poll_s):
            self._forward(on_progress)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.description!r} did not finish within {timeout_s} s")
        self._forward(on_progress)
        if on_progress is not None and self.state == Job.DONE:
            on_progress(1.0, "done")
        return self.result()

    def _forward(self, on_progress: Optional[Callable[[float, str], None]]) -> None:
        with self._lock:
            reports = list(self._unseen)
            self._unseen.clear()
        if on_progress is not None:
            for report in reports:
                on_progress(*report)

    # ---- called on the worker thread --------------------------------------------------------------------------
    def _report(self, fraction: float, message: str = "") -> None:
        with self._lock:
            self._progress = (min(max(float(fraction), 0.0), 1.0), message)
            self._unseen.append(self._progress)

    def _run(self) -> None:
        with self._lock:
            self._state = Job.RUNNING
        try:
            self.cancel_token.raise_if_cancelled()  # cancelled while still queued
            outcome, error, state = self._fn(self._report, self.cancel_token), None, Job.DONE
        except Cancelled as exc:
            outcome, error, state = None, exc, Job.CANCELLED
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which re-raises it
            outcome, error, state = None, exc, Job.FAILED
        with self._lock:
            self._result, self._error, self._state = outcome, error, state
        self._finished.set()


class EngineWorker:
    """A single daemon thread consuming a queue of :class:`Job`; started lazily on the first submission."""

    def __init__(self, name: str = "MedSegX engine"):
        self._name = name
        self._queue: "queue.Queue[Optional[Job]]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._start_lock = threading.Lock()

    @property
    def thread(self) -> Optional[threading.Thread]:
        return self._thread

    def submit(self, fn: JobFunction, cancel: Optional[CancelToken] = None, description: str = "") -> Job:
        job = Job(fn, cancel, description)
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
        self._queue.put(job)
        return job

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop the thread after the jobs already queued (module cleanup, tests)."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join(timeout_s)
        self._thread = None

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            job._run()


@dataclass
class BackgroundTask:
    """A download or a training run in flight (``job.progress`` for the bar, ``cancel()`` for the button)."""

    job: Job
    kind: str            # "download", "training"
    description: str

    def cancel(self) -> None:
        self.job.cancel()
