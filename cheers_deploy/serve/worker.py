"""The device worker: ONE thread owns the pipeline (the pipeline is not thread-safe, and a GPU backend wants one
thread anyway) and runs requests one at a time, in arrival order, from a bounded queue.

    submit(job) ── full? ──► QueueFull (the route answers 429 + Retry-After at once; nothing ever waits for room)
        │
        ▼
    [ waiting jobs (≤ max_queue) ] ──► device thread: job.func(pipe, observer) ──► events to the request's loop
                                                         │ on_stage_start / on_token / on_step
                                                         └► cancelled or past its deadline? raise _Cancelled

A job talks to its request through `job.events` (an asyncio queue on the server's loop): ("started", None),
("delta", text) for streamed text, ("step", (i, n)) for Euler progress, then exactly one of ("done", result),
("error", APIError) or ("cancelled", reason). A cancelled job that is still waiting leaves the queue at once; a
running one stops at its next token, Euler step or stage boundary (the observer raises), which frees the device.

The thread loads the pipeline itself and warms it up (one tiny generate + one answer) before it accepts jobs.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections import deque
from typing import Callable, Deque, Optional

import numpy as np

from ..errors import CheersError, InputError
from ..runtime.observer import PipelineObserver
from ..runtime.streaming import TextDeltas
from .errors import APIError, bad_request, internal_error

log = logging.getLogger("cheers_deploy.serve")

LOADING, READY, FAILED, STOPPED = "loading", "ready", "failed", "stopped"


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__("the queue is full")
        self.retry_after = retry_after


class NotAccepting(Exception):
    """The worker takes no job now: `reason` is loading, failed, draining or stopped."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Cancelled(Exception):
    """Raised by a job's observer inside the pipeline: the request was cancelled or ran out of time."""


class Job:
    def __init__(self, kind: str, func: Callable, loop: asyncio.AbstractEventLoop, timeout: float,
                 stream_text: bool = False, progress: bool = False, arrived: Optional[float] = None):
        self.id = uuid.uuid4().hex[:24]
        self.kind = kind                      # answer, chat, generate, edit (metrics label)
        self.func = func                      # func(pipe, observer) -> result, run on the device thread
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.enqueued = time.monotonic()
        # the deadline counts from the request's arrival (time.monotonic()), queue wait included
        self.deadline = (arrived if arrived is not None else self.enqueued) + timeout
        self.stream_text = stream_text
        self.progress = progress
        self.cancel_reason: Optional[str] = None
        self.started: Optional[float] = None
        self.finished = False

    def post(self, kind: str, value=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:                  # the loop is closed: nobody is listening any more
            pass


class _JobObserver(PipelineObserver):
    """Cancellation at every boundary, streamed text, Euler progress and per-stage metrics for one job."""

    def __init__(self, job: Job, tokenizer, metrics):
        self.job = job
        self.metrics = metrics
        self.deltas = TextDeltas(tokenizer) if job.stream_text else None

    def check(self):
        job = self.job
        if job.cancel_reason is None and time.monotonic() > job.deadline:
            job.cancel_reason = "timeout"
        if job.cancel_reason is not None:
            raise _Cancelled(job.cancel_reason)

    def on_stage_start(self, stage, phase):
        self.check()

    def on_stage(self, stage, phase, seconds):
        if seconds is not None:
            self.metrics.stage.labels(stage, phase).observe(seconds)

    def on_token(self, index, token_id, logits):
        self.metrics.tokens.inc()
        self.check()
        if self.deltas is not None:
            delta = self.deltas.push(token_id)
            if delta:
                self.job.post("delta", delta)

    def on_step(self, step, num_steps, t, latent):
        self.check()
        if self.job.progress:
            self.job.post("step", (step, num_steps))


def warm_up(pipe) -> None:
    """One tiny generate (1 Euler step) and one answer of one token: every graph runs once before /ready."""
    out = pipe.generate("a red circle", steps=1, seed=0)
    image = out.image if out.image is not None else np.zeros((pipe.processor.resolution,) * 2 + (3,), np.uint8)
    pipe.answer(image, "what color is the circle?", max_new_tokens=1)


class DeviceWorker:
    def __init__(self, factory: Callable[[], object], metrics, max_queue: int = 16, warmup: bool = True,
                 on_ready: Optional[Callable[["DeviceWorker"], None]] = None):
        self.factory = factory
        self.metrics = metrics
        self.max_queue = int(max_queue)
        self.warmup = warmup
        self.on_ready = on_ready
        self.pipe = None
        self.state = LOADING
        self.error: Optional[BaseException] = None
        self.load_seconds = 0.0
        self.warmup_seconds = 0.0
        self._queue: Deque[Job] = deque()
        self._cond = threading.Condition()
        self._running: Optional[Job] = None
        self._accepting = True
        self._stopping = False
        self._job_seconds = 1.0               # running mean of a job's device time (Retry-After)
        self.thread = threading.Thread(target=self._main, name="cheers-device", daemon=True)

    # ------------------------------------------------------------------ the server's side
    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job` or raise QueueFull / NotAccepting at once."""
        with self._cond:
            self.check_capacity()
            self._queue.append(job)
            self.metrics.queue_depth.set(len(self._queue))
            self._cond.notify_all()

    def check_capacity(self) -> None:
        """Raise QueueFull / NotAccepting if a job submitted now would be refused."""
        with self._cond:
            if self.state != READY:
                raise NotAccepting(self.state)
            if not self._accepting:
                raise NotAccepting("draining")
            # an idle device takes the first queued job at once: that one is not waiting
            limit = self.max_queue if self._running is not None else self.max_queue + 1
            if len(self._queue) >= limit:
                raise QueueFull(self.retry_after())

    def retry_after(self) -> int:
        return max(1, math.ceil(self._job_seconds * (len(self._queue) + 1)))

    def cancel(self, job: Job, reason: str) -> None:
        """Stop `job`: a waiting one leaves the queue now, a running one at its next boundary."""
        with self._cond:
            if job.finished:
                return
            if job.cancel_reason is None:
                job.cancel_reason = reason
            if job in self._queue:
                self._queue.remove(job)
                self.metrics.queue_depth.set(len(self._queue))
                job.finished = True
                self.metrics.cancelled.labels(job.cancel_reason).inc()
                job.post("cancelled", job.cancel_reason)

    def drain(self) -> None:
        """Take no new job; the queued and running ones finish."""
        with self._cond:
            self._accepting = False

    def idle(self) -> bool:
        with self._cond:
            return not self._queue and self._running is None

    def stop(self, timeout: float = 10.0) -> None:
        """End the thread: cancel what is left and wait for it (not while it is still loading the model)."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            for job in list(self._queue):
                job.cancel_reason = job.cancel_reason or "shutdown"
            if self._running is not None and self._running.cancel_reason is None:
                self._running.cancel_reason = "shutdown"
            self._cond.notify_all()
        if self.state != LOADING and self.thread.is_alive():
            self.thread.join(timeout)

    # ------------------------------------------------------------------ the device thread
    def _main(self) -> None:
        try:
            t0 = time.perf_counter()
            pipe = self.factory()
            t1 = time.perf_counter()
            if self.warmup:
                warm_up(pipe)
            self.load_seconds, self.warmup_seconds = t1 - t0, time.perf_counter() - t1
        except BaseException as exc:  # noqa: BLE001 - reported by the server, which then exits
            self.error = exc
            self.state = FAILED
            log.error("loading the model failed: %s", exc)
            return
        self.pipe = pipe
        with self._cond:
            self.state = READY
        self.metrics.ready.set(1)
        if self.on_ready is not None:
            self.on_ready(self)
        while True:
            job = self._take()
            if job is None:
                break
            self._run(job)
        self.state = STOPPED
        self.metrics.ready.set(0)

    def _take(self) -> Optional[Job]:
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            job = self._queue.popleft()
            self._running = job
            self.metrics.queue_depth.set(len(self._queue))
            self.metrics.inflight.set(1)
            return job

    def _run(self, job: Job) -> None:
        m = self.metrics
        job.started = time.perf_counter()
        m.queue_wait.observe(time.monotonic() - job.enqueued)
        obs = _JobObserver(job, self.pipe.tokenizer, m)
        try:
            obs.check()
            job.post("started")
            result = job.func(self.pipe, obs)
            if obs.deltas is not None:
                rest = obs.deltas.finish()
                if rest:
                    job.post("delta", rest)
            job.post("done", result)
        except _Cancelled as exc:
            m.cancelled.labels(str(exc)).inc()
            job.post("cancelled", str(exc))
        except InputError as exc:
            job.post("error", bad_request(str(exc)))
        except APIError as exc:
            job.post("error", exc)
        except CheersError as exc:
            log.error("request %s failed: %s", job.id, exc)
            job.post("error", APIError(500, f"the model could not complete the request: {exc}", code="model_error"))
        except Exception:  # noqa: BLE001 - logged with its traceback here; the client gets a plain error object
            log.exception("request %s failed", job.id)
            job.post("error", internal_error())
        finally:
            seconds = time.perf_counter() - job.started
            m.job_time.labels(job.kind).observe(seconds)
            with self._cond:
                self._job_seconds = 0.8 * self._job_seconds + 0.2 * seconds
                self._running = None
                job.finished = True
                m.inflight.set(0)
                self._cond.notify_all()
