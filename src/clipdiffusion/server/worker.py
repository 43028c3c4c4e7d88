"""The one thread that owns the pipeline. Torch-free itself (the pipeline factory imports what it needs).

HTTP handlers validate a request, wrap the work in a `Job` and `submit` it; the worker runs jobs one at a time in
submission order and completes each job's `concurrent.futures.Future`, which the handler awaits. The queue is
bounded: a full queue raises `QueueFull` at once (the server answers 503), so a burst of clients cannot pile up
unbounded latency or memory. A job that raises fails only its own future; the worker goes on with the next one.

Interrupting sets the running job's stop flag, which the pipeline polls through `should_stop` between sampler
steps. Stopping the worker cancels every queued job (their futures raise `WorkerStopped`), interrupts the
running one and joins the thread.

`Worker(..., threads=n)` runs up to n jobs at once from the same bounded queue, for pipelines that are cheap proxies
safe to share between threads (`serve --ray`'s ingress, whose jobs wait on model replicas); the in-process server
keeps the default of one thread, so one model runs one job at a time. With several threads, `snapshot` and
`interrupt` see the most recently started job, and `stop` interrupts that one, cancels the queue and joins them all.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable


class QueueFull(RuntimeError):
    """The job queue is at capacity; try again later (HTTP 503)."""


class WorkerStopped(RuntimeError):
    """The server is shutting down; the job was not run (HTTP 503)."""


class JobControl:
    """What a running job sees of the worker: its stop flag and a place to report sampler steps.

    The pipeline calls `on_step` after each sampler step and polls `should_stop` before each."""

    def __init__(self, steps: int = 0, iterations: int = 1):
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.steps = steps
        self.iterations = iterations
        self.iteration = 0
        self.step = 0
        self.started = time.monotonic()

    def should_stop(self) -> bool:
        return self._stop.is_set()

    def interrupt(self) -> None:
        self._stop.set()

    @property
    def interrupted(self) -> bool:
        return self._stop.is_set()

    def on_step(self, step: int, total: int, latents=None) -> None:
        """The samplers' `callback(step, total, x)`: step `step` (from 1) of `total` is done."""
        with self._lock:
            self.step, self.steps = step, total
            if self.steps:
                self.step = min(self.step, self.steps)

    def begin_iteration(self, index: int, steps: int | None = None) -> None:
        with self._lock:
            self.iteration = index
            self.step = 0
            if steps is not None:
                self.steps = steps

    def fraction(self) -> float:
        """Done fraction over all iterations, in [0, 1]."""
        with self._lock:
            per = (self.step / self.steps) if self.steps else 0.0
            return min(1.0, (self.iteration + per) / max(1, self.iterations))


@dataclass
class Job:
    """Work for the worker: `work(pipeline, control)` runs in the worker thread with the model `model` loaded."""

    kind: str
    model: str
    work: Callable[[Any, JobControl], Any]
    control: JobControl = field(default_factory=JobControl)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    submitted: float = field(default_factory=time.time)


class Worker:
    def __init__(self, pipeline_factory: Callable[[str], Any], queue_size: int = 8, shutdown_timeout: float = 10.0,
                 threads: int = 1):
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads {threads!r}: must be an integer >= 1")
        self._factory = pipeline_factory
        self._thread_count = threads
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._shutdown_timeout = shutdown_timeout
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._pipeline_lock = threading.Lock()
        self._stopping = False
        self._current: Job | None = None
        self._pipeline = None
        self._model: str | None = None
        self.completed = 0
        self.failed = 0

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> "Worker":
        with self._lock:
            if not self._threads:
                self._threads = [threading.Thread(target=self._loop, daemon=True,
                                                  name="clipdiffusion-worker" + (f"-{i}" if i else ""))
                                 for i in range(self._thread_count)]
                for thread in self._threads:
                    thread.start()
        return self

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def alive(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def _cancel_queued(self) -> None:
        """Fail every job still queued with WorkerStopped (they never ran)."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None and job.future.set_running_or_notify_cancel():
                job.future.set_exception(WorkerStopped("server is shutting down; the job was not run"))

    def stop(self, timeout: float | None = None) -> bool:
        """Cancel queued jobs, interrupt the running one, join the threads. True when they have all ended."""
        with self._lock:
            self._stopping = True
            current = self._current
            if current is not None:
                # Interrupt together with the flag: whoever sees `stopping` also sees the running job told to stop,
                # so it cannot run on to its last step while the queue is being drained.
                current.control.interrupt()
        self._cancel_queued()
        for _ in self._threads:  # one wake-up per thread
            try:
                self._queue.put_nowait(None)
            except queue.Full:  # a submit raced the drain; the loop also exits on _stopping
                break
        end = time.monotonic() + (self._shutdown_timeout if timeout is None else timeout)
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))
        return not self.alive

    # -- client side ----------------------------------------------------------------------------------------
    def submit(self, job: Job) -> concurrent.futures.Future:
        with self._lock:
            if self._stopping:
                raise WorkerStopped("server is shutting down")
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise QueueFull(f"the job queue is full ({self._queue.maxsize} waiting); retry later") from None
        return job.future

    def interrupt(self) -> bool:
        """Stop the running job at its next sampler step. False when nothing is running."""
        job = self._current
        if job is None:
            return False
        job.control.interrupt()
        return True

    def snapshot(self) -> dict:
        """Progress of the running job and the queue length, for /sdapi/v1/progress."""
        job = self._current
        pending = self._queue.qsize()
        if job is None:
            return {"running": None, "pending": pending, "model": self._model}
        return {"running": job, "pending": pending, "model": self._model}

    # -- worker thread --------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                continue  # the client went away before its turn
            with self._lock:  # with stop(): a job either starts before the flag (and is interrupted) or never
                stopping = self._stopping
                if not stopping:
                    self._current = job
            if stopping:
                job.future.set_exception(WorkerStopped("server is shutting down; the job was not run"))
                continue
            job.control.started = time.monotonic()
            try:
                result = job.work(self._pipeline_for(job.model), job.control)
            except BaseException as exc:  # noqa: BLE001 - a failing job must not end the worker
                self.failed += 1
                job.future.set_exception(exc)
            else:
                self.completed += 1
                job.future.set_result(result)
            finally:
                with self._lock:
                    if self._current is job:  # another thread's job may have started since
                        self._current = None
            if self._stopping:
                return

    def _pipeline_for(self, model: str):
        with self._pipeline_lock:
            if self._pipeline is None or self._model != model:
                # Drop the old model before loading the next, so two never sit in memory together.
                self._pipeline, self._model = None, None
                self._pipeline = self._factory(model)
                self._model = model
            return self._pipeline
