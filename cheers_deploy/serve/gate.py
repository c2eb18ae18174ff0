"""The gate in front of every route (pure ASGI middleware): the API key, 503 while loading or draining, the body size
limit, and the request metrics (by route and status; 499 when the client went away)."""

from __future__ import annotations

import hmac
import time
from typing import Awaitable, Callable, Optional, Sequence

from .errors import APIError, bad_request
from .service import Service, error_response

OPEN_PATHS = ("/health", "/ready")            # answered without the API key
ROUTES = ("/v1/chat/completions", "/v1/images/generations", "/v1/images/edits", "/v1/models", "/health", "/ready",
          "/metrics")
DISCARD_MAX = 64 << 20                        # read (and drop) at most this much of a too-large body before a 413


def _header(scope, name: bytes) -> Optional[bytes]:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v
    return None


def authorized(scope, keys: Sequence[bytes]) -> bool:
    """`Authorization: Bearer <key>` against every key, each in constant time (hmac.compare_digest)."""
    value = _header(scope, b"authorization") or b""
    scheme, _, token = value.partition(b" ")
    token = token.strip() if scheme.lower() == b"bearer" else b""
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(token, key)
    return ok and bool(token)


class Gate:
    """Pure ASGI middleware: auth, 503 while loading/draining, body size limit, request metrics."""

    def __init__(self, app, service: Service):
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        svc, path = self.service, scope["path"]
        route = path if path in ROUTES else "/v1/models" if path.startswith("/v1/models/") else "other"
        status = {"code": 500}
        t0 = time.perf_counter()
        scope["cheers.arrived"] = time.monotonic()

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        svc.http_active += 1
        try:
            err = None
            if svc.config.api_keys and path not in OPEN_PATHS and not authorized(scope, svc.config.api_keys):
                err = APIError(401, "missing or invalid API key (send Authorization: Bearer <key>)",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            elif path.startswith("/v1/") and scope["method"] == "POST":
                err = svc.unavailable()
            if err is None and scope["method"] in ("POST", "PUT", "PATCH"):
                body, err = await _read_body(scope, receive, svc.config.max_body_bytes)
                if err is None and body is None:                   # the client left while sending
                    scope["cheers.client_gone"] = True
                    return
                if err is None:
                    receive = _replay(body, receive)
            if err is not None:
                await error_response(err)(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            svc.http_active -= 1
            code = "499" if scope.get("cheers.client_gone") else str(status["code"])
            svc.metrics.requests.labels(route, code).inc()
            svc.metrics.latency.labels(route).observe(time.perf_counter() - t0)


async def _read_body(scope, receive, limit: int):
    """(body, None), (None, None) when the client disconnected, or (None, 413 error) once the body passes `limit`
    (the rest is read and dropped, up to DISCARD_MAX, so that the client gets to read the answer)."""
    too_big = APIError(413, f"the request body is larger than {limit} bytes (--max-body-mb)", code="body_too_large",
                       headers={"Connection": "close"})
    declared = _header(scope, b"content-length")
    try:
        declared_n = int(declared) if declared is not None else None
    except ValueError:
        return None, bad_request("bad Content-Length header")
    chunks, size, over = [], 0, declared_n is not None and declared_n > limit
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None, None
        part = message.get("body", b"")
        size += len(part)
        if size > limit:
            over = True
        if over:
            if size > DISCARD_MAX:
                return None, too_big
        else:
            chunks.append(part)
        if not message.get("more_body", False):
            break
    return (None, too_big) if over else (b"".join(chunks), None)


def _replay(body: bytes, receive) -> Callable[[], Awaitable[dict]]:
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
