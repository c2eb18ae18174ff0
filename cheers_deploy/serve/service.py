"""What the routes share: the configuration, the device worker, the metrics, the draining flag; a handler's view of
one job (`Waiter`: its events under the deadline, cancellation when the client disconnects); the event-stream
response."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Tuple

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .errors import APIError, internal_error
from .images import DEFAULT_MAX_IMAGE_PIXELS
from .metrics import Metrics
from .schemas import sse
from .worker import READY, DeviceWorker, Job, NotAccepting, QueueFull

log = logging.getLogger("cheers_deploy.serve")


@dataclass
class ServeConfig:
    model_name: str = "cheers"
    backend: str = "ort"
    precision: str = "fp32"
    max_queue: int = 16
    timeout: float = 300.0                    # seconds from arrival to the last token / image, queue wait included
    max_body_bytes: int = 16 << 20
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    allow_remote_images: bool = False
    remote_timeout: float = 10.0
    api_keys: Sequence[bytes] = field(default_factory=tuple)
    default_seed: int = 0
    warmup: bool = True


class Service:
    """What the routes share: the configuration, the device worker, the metrics and the draining flag."""

    def __init__(self, factory: Callable[[], object], config: ServeConfig,
                 on_ready: Optional[Callable[[DeviceWorker], None]] = None):
        self.config = config
        self.metrics = Metrics()
        self.metrics.info.labels(config.model_name, config.backend, config.precision).set(1)
        self.worker = DeviceWorker(factory, self.metrics, config.max_queue, warmup=config.warmup, on_ready=on_ready)
        self.draining = False
        self.http_active = 0                  # requests inside the app (the gate counts them)
        self.created = int(time.time())

    @property
    def pipe(self):
        return self.worker.pipe

    def start(self) -> None:
        self.worker.start()

    def begin_drain(self) -> None:
        self.draining = True
        self.worker.drain()
        log.info("draining: new requests get 503; waiting for the ones in flight")

    def idle(self) -> bool:
        return self.worker.idle() and self.http_active == 0

    def unavailable(self) -> Optional[APIError]:
        """Why /v1 requests get 503 now, or None."""
        if self.draining:
            return APIError(503, "the server is shutting down", code="shutting_down")
        state = self.worker.state
        if state == READY:
            return None
        if state == "loading":
            return APIError(503, "the model is loading; retry when /ready answers 200", code="loading",
                            headers={"Retry-After": "5"})
        return APIError(503, f"the model is not available ({state})", code="unavailable")

    def _refusal(self, exc: Exception) -> APIError:
        if isinstance(exc, QueueFull):
            return APIError(429, f"the server is busy: {self.config.max_queue} request(s) are already waiting; "
                                 f"retry later", code="queue_full", headers={"Retry-After": str(exc.retry_after)})
        err = self.unavailable()
        return err if err is not None else APIError(503, "the server is shutting down", code="shutting_down")

    def check_capacity(self) -> None:
        try:
            self.worker.check_capacity()
        except (QueueFull, NotAccepting) as exc:
            raise self._refusal(exc) from None

    def submit(self, request: Request, kind: str, func, stream_text: bool = False, progress: bool = False) -> Job:
        job = Job(kind, func, asyncio.get_running_loop(), self.config.timeout, stream_text, progress,
                  arrived=request.scope.get("cheers.arrived"))
        try:
            self.worker.submit(job)
        except (QueueFull, NotAccepting) as exc:
            raise self._refusal(exc) from None
        return job


class Waiter:
    """A handler's side of one job: its events with the deadline applied, and a watcher that cancels the job when
    the client disconnects (the body has been read, so the next ASGI message is the disconnect)."""

    def __init__(self, service: Service, job: Job, request: Request):
        self.service, self.job, self.scope = service, job, request.scope
        self.watch = asyncio.ensure_future(self._watch(request.receive))

    async def _watch(self, receive):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.scope["cheers.client_gone"] = True
                self.service.worker.cancel(self.job, "client_disconnected")
                return

    async def next(self, keepalive: Optional[float] = None) -> Tuple[str, object]:
        """The next event; ("timeout", None) once the deadline passed (the job is then cancelled); with `keepalive`,
        ("keepalive", None) after that many quiet seconds."""
        job = self.job
        remaining = job.deadline - time.monotonic()
        if remaining <= 0:
            self.service.worker.cancel(job, "timeout")
            return ("timeout", None)
        wait = min(remaining, keepalive) if keepalive else remaining
        try:
            return await asyncio.wait_for(job.events.get(), wait)
        except asyncio.TimeoutError:
            if time.monotonic() >= job.deadline:
                self.service.worker.cancel(job, "timeout")
                return ("timeout", None)
            return ("keepalive", None)

    async def first(self) -> Tuple[str, object]:
        """The first event that says something (text, progress or the end); a failure before any output raises, so
        the route still answers with a proper status."""
        while True:
            kind, value = await self.next()
            if kind == "started":
                continue
            if kind in ("delta", "step", "done"):
                return kind, value
            self._raise(kind, value)

    async def result(self):
        while True:
            kind, value = await self.next()
            if kind == "done":
                return value
            if kind in ("started", "delta", "step"):
                continue
            self._raise(kind, value)

    def _raise(self, kind, value):
        if kind == "error":
            raise value
        if kind == "timeout" or (kind == "cancelled" and value == "timeout"):
            raise timeout_error(self.service.config.timeout)
        raise APIError(503, "the request was cancelled", code="cancelled")

    def close(self) -> None:
        self.watch.cancel()
        if not self.job.finished:
            self.service.worker.cancel(self.job, "client_disconnected")


def timeout_error(seconds: float) -> APIError:
    return APIError(504, f"the request did not finish within the server's timeout of {seconds:g} s (--timeout)",
                    code="timeout")


class SSEResponse(Response):
    """Server-sent events from an async iterator of bytes; `on_close` runs however the response ends."""

    media_type = "text/event-stream"

    def __init__(self, events, on_close: Callable[[], None], headers: Optional[dict] = None):
        self.status_code = 200
        self.background = None
        fixed = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache",
                 "x-accel-buffering": "no"}          # nginx: pass events through unbuffered
        fixed.update({k.lower(): v for k, v in (headers or {}).items()})
        self.raw_headers = [(k.encode("latin-1"), str(v).encode("latin-1")) for k, v in fixed.items()]
        self.events = events
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            try:
                async for chunk in self.events:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except Exception:  # noqa: BLE001 - headers are out: end the stream with an error event
                log.exception("streaming a response failed")
                await send({"type": "http.response.body", "body": sse(internal_error().body()), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self.events.aclose()
            self.on_close()


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

