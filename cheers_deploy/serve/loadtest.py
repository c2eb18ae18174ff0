"""A bounded load test of `cheers-deploy serve`, with the offline pipeline's throughput on the same request mix as the
yardstick (docs/performance.md, "Serving").

    python -m cheers_deploy.serve.loadtest --requests 120 --concurrency 8
    python -m cheers_deploy.serve.loadtest --url http://127.0.0.1:8000 --requests 60      # a server already running

1. The request mix: chat (text only), vqa (a question about a PNG sent as a data: URL) and image generation, in turn,
   each with its own seed.
2. Offline: the same requests, one after another, straight through a Pipeline in this process (that also gives the
   expected answer and image of every request).
3. Server: a `cheers-deploy serve` subprocess on a free loopback port (unless --url), `--concurrency` client threads
   with keep-alive connections send the requests; the responses are checked against the offline results after the
   clock stops (so checking costs the server nothing).
4. Steps 2-3 alternate --rounds times (a shared machine's load drifts); the round with the median overhead is
   printed: requests/s and p50/p99 latency of both, the server overhead (1 - server req/s / offline req/s), how busy
   the device was during the server pass (its job times / wall time), failed and wrong responses. Exit code 1 when
   any request failed, was lost or answered differently.

Only the standard library on the client side (http.client, threads).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional
from urllib.parse import urlsplit

import numpy as np

GEN_PROMPTS = ("a red circle on the left", "a small blue star on the right", "a green square at the top",
               "a large yellow triangle at the bottom", "a purple cross in the center",
               "a red square on the left and a blue circle on the right")
QUESTIONS = ("what color is the circle?", "what shape is on the left?", "how many shapes are there?",
             "where is the star?", "what color is the square?")
CHATS = ("where is the red circle?", "what color is the star?", "is there a blue square?")
KINDS = ("chat", "vqa", "gen")


@dataclass
class Item:
    kind: str
    path: str
    body: dict
    call: tuple                               # (method, args, kwargs) of the same request on a Pipeline
    expected: object = None                   # text, or the image (uint8 HxWx3)


@dataclass
class Result:
    latency: float = 0.0
    status: int = 0
    body: bytes = b""
    error: str = ""


@dataclass
class Stats:
    seconds: float
    latencies: List[float] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds > 0 else 0.0

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")


def _png_data_url(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def build_mix(pipe, n: int, steps: Optional[int] = None, seed0: int = 0) -> List[Item]:
    """`n` requests: chat, vqa, gen in turn. vqa images are drawn once by the pipeline (3 scenes)."""
    scenes = [pipe.generate(p, seed=100 + i).image for i, p in enumerate(GEN_PROMPTS[:3])]
    urls = [_png_data_url(im) for im in scenes]
    items = []
    for i in range(n):
        kind, seed = KINDS[i % len(KINDS)], seed0 + i
        if kind == "chat":
            text = CHATS[i % len(CHATS)]
            body = {"model": "cheers", "messages": [{"role": "user", "content": text}], "seed": seed}
            items.append(Item(kind, "/v1/chat/completions", body, ("chat", (text,), {"seed": seed})))
        elif kind == "vqa":
            q, k = QUESTIONS[i % len(QUESTIONS)], i % len(scenes)
            body = {"model": "cheers", "seed": seed, "messages": [{"role": "user", "content": [
                {"type": "text", "text": q}, {"type": "image_url", "image_url": {"url": urls[k]}}]}]}
            items.append(Item(kind, "/v1/chat/completions", body, ("answer", (scenes[k], q), {"seed": seed})))
        else:
            p = GEN_PROMPTS[i % len(GEN_PROMPTS)]
            kw = {"seed": seed} if steps is None else {"seed": seed, "steps": steps}
            body = {"model": "cheers", "prompt": p, "response_format": "b64_json", **kw}
            items.append(Item(kind, "/v1/images/generations", body, ("generate", (p,), kw)))
    return items


def run_offline(pipe, items: List[Item]) -> Stats:
    """Every request straight through the pipeline, one after another; fills `item.expected`."""
    for it in items[:3]:                      # warm-up: the first call of each kind is slower (not timed)
        method, args, kw = it.call
        getattr(pipe, method)(*args, **kw)
    lat = []
    t0 = time.perf_counter()
    for it in items:
        method, args, kw = it.call
        t = time.perf_counter()
        out = getattr(pipe, method)(*args, **kw)
        lat.append(time.perf_counter() - t)
        it.expected = out.image if method == "generate" else out.text
    return Stats(time.perf_counter() - t0, lat)


def run_load(url: str, items: List[Item], concurrency: int, api_key: Optional[str] = None,
             timeout: float = 120.0) -> (Stats, List[Result]):
    """Send every item with `concurrency` client threads (each its own keep-alive connection)."""
    parts = urlsplit(url)
    results: List[Optional[Result]] = [None] * len(items)
    nxt = {"i": 0}
    lock = threading.Lock()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    bodies = [json.dumps(it.body).encode() for it in items]

    def client():
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        try:
            while True:
                with lock:
                    i = nxt["i"]
                    nxt["i"] += 1
                if i >= len(items):
                    return
                res = Result()
                t = time.perf_counter()
                try:
                    conn.request("POST", items[i].path, body=bodies[i], headers=headers)
                    resp = conn.getresponse()
                    res.status, res.body = resp.status, resp.read()
                except (OSError, http.client.HTTPException) as exc:
                    res.error = f"{type(exc).__name__}: {exc}"
                    conn.close()
                    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
                res.latency = time.perf_counter() - t
                results[i] = res
        finally:
            conn.close()

    threads = [threading.Thread(target=client, name=f"load-{k}") for k in range(concurrency)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    seconds = time.perf_counter() - t0
    done = [r for r in results if r is not None]
    return Stats(seconds, [r.latency for r in done]), results


def check(items: List[Item], results: List[Optional[Result]]) -> (List[str], List[str]):
    """(failed, wrong): requests without a 200, and 200s whose answer or image differs from the pipeline's."""
    from PIL import Image

    failed, wrong = [], []
    for i, (it, res) in enumerate(zip(items, results)):
        if res is None:
            failed.append(f"#{i} {it.kind}: lost (no response)")
            continue
        if res.error or res.status != 200:
            failed.append(f"#{i} {it.kind}: {res.error or res.status} {res.body[:200]!r}")
            continue
        body = json.loads(res.body)
        if it.kind == "gen":
            with Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))) as img:
                got = np.asarray(img.convert("RGB"))
            if got.shape != it.expected.shape or not np.array_equal(got, it.expected):
                wrong.append(f"#{i} gen: the image differs from Pipeline.generate")
        else:
            text = body["choices"][0]["message"]["content"]
            if text != it.expected:
                wrong.append(f"#{i} {it.kind}: {text!r} != {it.expected!r}")
    return failed, wrong


def start_server(extra: List[str], log_dir: Path, timeout: float = 120.0):
    """`python -m cheers_deploy.cli.serve --port 0 EXTRA` (the serve command's own entry point); (process, url)."""
    out_path, err_path = log_dir / "loadtest-serve.out", log_dir / "loadtest-serve.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "cheers_deploy.cli.serve", "--port", "0", "--log-level",
                                 "warning"] + extra, stdout=out, stderr=err, start_new_session=True)
    deadline = time.monotonic() + timeout
    url = None
    while time.monotonic() < deadline:
        text = out_path.read_text(errors="replace")
        if url is None and "listening on " in text:
            url = text.split("listening on ", 1)[1].split()[0]
        if url is not None and "ready:" in text:
            return proc, url
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    stop_server(proc)
    raise RuntimeError(f"the server did not become ready:\n{out_path.read_text()}\n{err_path.read_text()[-3000:]}")


def stop_server(proc, timeout: float = 30.0) -> Optional[int]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode


def device_seconds(url: str, api_key: Optional[str] = None) -> Optional[float]:
    """The server's total device time so far (sum of cheers_job_duration_seconds), or None."""
    parts = urlsplit(url)
    try:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
        text = conn.getresponse().read().decode()
        conn.close()
    except (OSError, http.client.HTTPException):
        return None
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("cheers_job_duration_seconds_sum"))


def overhead(offline: Stats, server: Stats) -> float:
    return 1.0 - server.rps / offline.rps if offline.rps else float("nan")


def report(n: int, concurrency: int, offline: Stats, server: Stats, failed, wrong, device_busy=None,
           rounds: Optional[List[float]] = None) -> str:
    mix = {k: sum(1 for i in range(n) if KINDS[i % len(KINDS)] == k) for k in KINDS}
    lines = [f"requests {n} ({', '.join(f'{k} {v}' for k, v in mix.items())}), concurrency {concurrency}",
             f"offline pipeline : {offline.rps:7.2f} req/s   p50 {1e3 * offline.pct(50):8.1f} ms   "
             f"p99 {1e3 * offline.pct(99):8.1f} ms   ({offline.seconds:.2f} s, one at a time)",
             f"server           : {server.rps:7.2f} req/s   p50 {1e3 * server.pct(50):8.1f} ms   "
             f"p99 {1e3 * server.pct(99):8.1f} ms   ({server.seconds:.2f} s, {concurrency} clients)",
             f"server overhead  : {100 * overhead(offline, server):+.1f} % of throughput (goal: under 10 %)"]
    if rounds and len(rounds) > 1:
        lines[-1] += f"; rounds: {', '.join(f'{100 * r:+.1f} %' for r in rounds)} (median shown)"
    if device_busy is not None:
        lines.append(f"device busy      : {100 * device_busy:.1f} % of the server's wall time (sum of job times)")
    lines += [f"failed or lost   : {len(failed)}", f"wrong answers    : {len(wrong)}"]
    lines += [f"  {x}" for x in (failed + wrong)[:10]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cheers_deploy.serve.loadtest",
                                description="Load-test cheers-deploy serve against the offline pipeline on the "
                                            "same request mix (chat, vqa, generation).")
    p.add_argument("--requests", type=int, default=120, help="number of requests (default 120)")
    p.add_argument("--concurrency", type=int, default=8, help="client threads (default 8)")
    p.add_argument("--steps", type=int, default=None, help="Euler steps per image (default: the model's)")
    p.add_argument("--url", default=None, help="an already running server (default: start one on loopback)")
    p.add_argument("--api-key", default=None, help="bearer key for --url")
    p.add_argument("--workdir", default=None, help="exported graphs (default: the bundled model)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of both pipelines (default: physical "
                                                            "cores)")
    p.add_argument("--rounds", type=int, default=3,
                   help="offline and server passes alternate this many times; the median round is reported "
                        "(default 3: a shared machine's load changes)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the numbers as JSON")
    args = p.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        p.error("--requests and --concurrency must be positive")

    from ..hub import bundled_workdir
    from ..runtime.pipeline import Pipeline

    extra = (["--workdir", args.workdir] if args.workdir else []) + \
            (["--threads", str(args.threads)] if args.threads else []) + ["--max-queue", str(max(16, args.requests))]
    proc, url = None, args.url
    log_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    if url is None:
        proc, url = start_server(extra, log_dir)
    passes = []                               # (offline, server, device busy) per round
    failed, wrong = [], []
    try:
        pipe = Pipeline.from_workdir(args.workdir or bundled_workdir(), threads=args.threads)
        items = build_mix(pipe, args.requests, args.steps)
        for _ in range(max(1, args.rounds)):
            offline = run_offline(pipe, items)
            before = device_seconds(url, args.api_key)
            server, results = run_load(url, items, args.concurrency, args.api_key)
            after = device_seconds(url, args.api_key)
            busy = (after - before) / server.seconds if before is not None and after is not None else None
            f, w = check(items, results)
            failed += f
            wrong += w
            passes.append((offline, server, busy))
    finally:
        rc = stop_server(proc) if proc is not None else None
    ranked = sorted(passes, key=lambda p: overhead(p[0], p[1]))
    offline, server, busy = ranked[len(ranked) // 2]
    print(report(args.requests, args.concurrency, offline, server, failed, wrong, busy,
                 [overhead(o, s) for o, s, _ in passes]))
    if rc is not None:
        print(f"server exit code after SIGTERM: {rc}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "requests": args.requests, "concurrency": args.concurrency, "rounds": len(passes),
            "offline": {"rps": offline.rps, "p50_ms": 1e3 * offline.pct(50), "p99_ms": 1e3 * offline.pct(99)},
            "server": {"rps": server.rps, "p50_ms": 1e3 * server.pct(50), "p99_ms": 1e3 * server.pct(99)},
            "overhead": overhead(offline, server), "overhead_rounds": [overhead(o, s) for o, s, _ in passes],
            "device_busy": busy, "failed": len(failed), "wrong": len(wrong)}, indent=2))
    return 1 if failed or wrong or (rc not in (None, 0)) else 0


if __name__ == "__main__":
    sys.exit(main())
