"""The engine worker: one persistent thread, jobs in order, progress and errors handed to the caller's thread."""
from __future__ import annotations

import threading

import pytest

import scene_builders  # noqa: F401 - puts the module folder on sys.path, as Slicer does

from MedSegXSlicerLib.worker import EngineWorker, Job
from medsegx_core.errors import Cancelled, PromptError
from medsegx_core.progress import CancelToken


@pytest.fixture
def worker():
    worker = EngineWorker()
    yield worker
    worker.shutdown()


def test_jobs_run_in_order_on_one_persistent_thread(worker):
    threads, order = [], []

    def job(n):
        def run(progress, cancel):
            threads.append(threading.get_ident())
            order.append(n)
            return n * 10
        return run

    jobs = [worker.submit(job(n)) for n in range(4)]
    assert [j.wait(timeout_s=10) for j in jobs] == [0, 10, 20, 30]
    assert order == [0, 1, 2, 3]
    assert len(set(threads)) == 1 and threads[0] != threading.get_ident()
    assert all(j.state == Job.DONE for j in jobs)


def test_progress_reaches_the_waiting_thread_and_errors_are_re_raised_there(worker):
    step = threading.Event()

    def run(progress, cancel):
        progress(0.5, "half way")
        step.wait(5)
        raise PromptError("the engine's own error")

    job = worker.submit(run)
    seen = []

    def on_progress(fraction, message):
        seen.append((fraction, message, threading.get_ident()))
        step.set()

    with pytest.raises(PromptError, match="the engine's own error"):
        job.wait(on_progress=on_progress, timeout_s=10)
    assert seen[0][:2] == (0.5, "half way") and seen[0][2] == threading.get_ident()
    assert job.state == Job.FAILED and isinstance(job.error, PromptError)


def test_cancel_while_running_and_while_queued(worker):
    started, token = threading.Event(), CancelToken()

    def long_job(progress, cancel):
        started.set()
        while True:
            cancel.raise_if_cancelled()
            threading.Event().wait(0.01)

    running = worker.submit(long_job, token)
    queued = worker.submit(lambda progress, cancel: "never runs")
    assert started.wait(5)
    queued.cancel()
    running.cancel()
    with pytest.raises(Cancelled):
        running.wait(timeout_s=10)
    with pytest.raises(Cancelled):
        queued.wait(timeout_s=10)
    assert running.state == queued.state == Job.CANCELLED
    assert worker.submit(lambda progress, cancel: "still serving").wait(timeout_s=10) == "still serving"


def test_result_before_the_end_is_an_error(worker):
    gate = threading.Event()
    job = worker.submit(lambda progress, cancel: gate.wait(5))
    with pytest.raises(RuntimeError, match="has not finished"):
        job.result()
    gate.set()
    assert job.wait(timeout_s=10) is True


def test_wait_forwards_every_report_even_when_the_engine_reports_faster_than_it_polls(worker):
    def run(progress, cancel):
        for step in range(1, 201):
            progress(step / 200, f"step {step}/200")
        return "done"

    seen = []
    assert worker.submit(run).wait(on_progress=lambda fraction, message: seen.append(message), poll_s=0.5) == "done"
    assert seen == [f"step {step}/200" for step in range(1, 201)] + ["done"]
