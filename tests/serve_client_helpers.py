"""Client-side helpers of tests/test_serve.py (and usable by hand): start `cheers-deploy serve` as a subprocess on a
free loopback port and stop it for sure, data: URLs, server-sent events, and a raw socket request that can be
abandoned mid-flight (a client that disconnects)."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def serve_command() -> List[str]:
    """`python -m cheers_deploy.cli.main serve` once the command is registered there, else the module's own entry
    point (the same parser)."""
    import importlib

    parser = importlib.import_module("cheers_deploy.cli.main").build_parser()
    for action in parser._actions:
        if getattr(action, "choices", None) and "serve" in action.choices:
            return [sys.executable, "-m", "cheers_deploy.cli.main", "serve"]
    return [sys.executable, "-m", "cheers_deploy.cli.serve"]


class ServerProcess:
    """`cheers-deploy serve --port 0 ARGS` in a subprocess; its output goes to files (a full pipe never blocks it).
    Use as a context manager or call stop(): the process is always gone afterwards."""

    def __init__(self, args: Sequence[str] = (), log_dir: Optional[Path] = None, env: Optional[dict] = None):
        self.args = list(args)
        self.log_dir = Path(log_dir) if log_dir else Path(os.environ.get("TMPDIR", "/tmp"))
        self.env = dict(os.environ, **(env or {}))
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc: Optional[subprocess.Popen] = None
        self.url = ""

    def start(self, timeout: float = 60.0) -> "ServerProcess":
        tag = f"serve-{os.getpid()}-{time.monotonic_ns()}"
        self.out_path, self.err_path = self.log_dir / f"{tag}.out", self.log_dir / f"{tag}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(serve_command() + ["--port", "0", "--log-level", "warning"] + self.args,
                                         stdout=out, stderr=err, cwd=ROOT, env=self.env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.out_path.read_text(errors="replace")
            for line in text.splitlines():
                if "listening on " in line:
                    self.url = line.split("listening on ", 1)[1].split()[0]
                    return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.output()}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the server did not start in {timeout} s:\n{self.output()}")

    def wait_ready(self, timeout: float = 60.0) -> dict:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                r = httpx.get(self.url + "/ready", timeout=2.0)
                if r.status_code == 200:
                    return r.json()
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.output()}")
            time.sleep(0.05)
        raise RuntimeError(f"the server was not ready in {timeout} s:\n{self.output()}")

    def output(self) -> str:
        out = self.out_path.read_text(errors="replace") if self.out_path.exists() else ""
        err = self.err_path.read_text(errors="replace") if self.err_path.exists() else ""
        return f"--- stdout\n{out}\n--- stderr\n{err[-4000:]}"

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 15.0) -> Optional[int]:
        """SIGTERM, then SIGKILL (the whole process group) if it has not exited in `timeout`; its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        return self.proc.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def png_bytes(image: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return buf.getvalue()


def data_url(image: np.ndarray, fmt: str = "PNG") -> str:
    mime = "image/png" if fmt == "PNG" else "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(png_bytes(image, fmt)).decode("ascii")


def decode_b64_png(b64: str) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(b64))) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def vqa_body(image: np.ndarray, question: str, **kw) -> dict:
    return {"model": "cheers", "messages": [{"role": "user", "content": [
        {"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": data_url(image)}}]}], **kw}


def chat_body(text: str, **kw) -> dict:
    return {"model": "cheers", "messages": [{"role": "user", "content": text}], **kw}


def sse_data(text: str) -> List[object]:
    """The data of every event of an SSE body: parsed JSON, or the string '[DONE]'."""
    out = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        data = [ln[5:].lstrip() for ln in block.split("\n") if ln.startswith("data:")]
        if data:
            payload = "\n".join(data)
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


class RawRequest:
    """An HTTP/1.1 POST written to a plain socket: read what comes back at will, or close() to walk away."""

    def __init__(self, url: str, path: str, body: dict, headers: Optional[dict] = None):
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        self.sock = socket.create_connection((host.strip("[]"), int(port)), timeout=30)
        data = json.dumps(body).encode()
        head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
                f"Content-Length: {len(data)}"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        self.received = b""

    def read_until(self, marker: bytes, timeout: float = 30.0) -> bytes:
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while marker not in self.received and time.monotonic() < deadline:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.received += chunk
        return self.received

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
