"""Running the service: bind the socket, start the device worker (it loads and warms up the model while the server
already answers /health), serve with uvicorn until SIGTERM / SIGINT, drain, exit.

SIGTERM or SIGINT (Ctrl-C): the server stops taking requests (POST /v1/... -> 503, /ready -> 503) but keeps
listening, waits for the queued and running requests and their responses to finish (at most --timeout plus a few
seconds), then closes and returns normally (exit code 0). A second signal exits at once.
"""

from __future__ import annotations

import logging
import socket
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import uvicorn
from prometheus_client import disable_created_metrics

from ..errors import CheersError, InputError
from .app import create_app
from .service import ServeConfig, Service

log = logging.getLogger("cheers_deploy.serve")


@dataclass
class ListenOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    access_log: bool = True


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one); a one-line InputError when that is impossible."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InputError(f"--host {host}: {exc.strerror or exc}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


class _Server(uvicorn.Server):
    """uvicorn, with a draining first signal (and no re-raised signal afterwards: the process exits 0)."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service
        self.drain_deadline: Optional[float] = None

    def handle_exit(self, sig, frame) -> None:
        svc = self.service
        if self.drain_deadline is not None or svc.worker.state != "ready":
            self.should_exit = True           # a second signal, or nothing to drain: stop now
            if self.drain_deadline is not None:
                self.force_exit = True
            return
        svc.begin_drain()
        self.drain_deadline = time.monotonic() + svc.config.timeout + 5.0

    async def on_tick(self, counter: int) -> bool:
        svc = self.service
        if svc.worker.state == "failed":
            self.should_exit = True
        elif self.drain_deadline is not None and (svc.idle() or time.monotonic() > self.drain_deadline):
            if not svc.idle():
                log.warning("drain timeout: closing with requests still in flight")
            self.should_exit = True
        return await super().on_tick(counter)


def run_server(factory: Callable[[], object], config: ServeConfig, listen: ListenOptions,
               announce: Callable[[str], None] = None) -> int:
    """Serve until a signal; returns 0 after a clean drain. Raises the model's load error (CheersError: the CLI
    prints it on one line) when the pipeline could not be loaded."""
    announce = announce or (lambda line: print(line, flush=True))
    disable_created_metrics()                  # no *_created series (a process-wide prometheus-client setting)
    sock = bind(listen.host, listen.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}"

    def ready(worker):
        announce(f"ready: {config.model_name} on {config.backend} ({config.precision}), loaded in "
                 f"{worker.load_seconds:.1f} s, warmed up in {worker.warmup_seconds:.1f} s")

    service = Service(factory, config, on_ready=ready)
    app = create_app(service)
    uconfig = uvicorn.Config(app, log_level=listen.log_level, access_log=listen.access_log, lifespan="off",
                             server_header=False, timeout_graceful_shutdown=5,
                             limit_concurrency=max(64, 4 * (config.max_queue + 1)), timeout_keep_alive=5)
    server = _Server(uconfig, service)
    announce(f"cheers-deploy serve: listening on {url} (model {config.model_name}: loading)")
    service.start()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        service.worker.stop()
    if service.worker.state == "failed":
        exc = service.worker.error
        if isinstance(exc, CheersError):
            raise exc
        raise CheersError(f"loading the model failed: {type(exc).__name__}: {exc}") from exc
    announce("cheers-deploy serve: stopped")
    return 0


def configure_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
