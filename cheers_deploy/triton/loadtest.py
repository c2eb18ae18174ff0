"""Load test of the Triton model repository on a real `tritonserver` (cheers_deploy.triton.local), with the offline
pipeline on the same request mix as the yardstick (docs/performance.md, "Triton").

    python -m cheers_deploy.triton.loadtest --requests 48 --concurrency 4 --instances 1,2 [--rounds 3] [--json F]

1. The mix: chat (text only), vqa (a question about an image) and image generation, in turn, each with its own seed.
2. Offline: the same requests one after another through one Pipeline in this process (that also gives the expected
   answer of every request).
3. Triton, once per instance count: a repository written with `--instances N` (CPU, ort), a tritonserver on free
   loopback ports, `--concurrency` client threads (one gRPC client each: generation is a unary call, chat and vqa
   a gRPC stream to the decoupled model, timed to the final response). Every response is compared with the offline
   one after the clock stops. Then the server is stopped.
4. Steps 2-3 repeat --rounds times (a shared machine's load drifts); each configuration reports its median round:
   requests/s, p50/p99 latency, failed and wrong responses. Exit code 1 when any request failed or differed.

Each instance runs the physical cores divided by the instance count in threads (the repository's default), so
1 and 2 instances use the same cores: the comparison is of how the work is split, not of more hardware.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import queue
import shlex
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np

GEN_PROMPTS = ("a red circle on the left", "a small blue star on the right", "a green square at the top",
               "a large yellow triangle at the bottom", "a purple cross in the center")
QUESTIONS = ("what color is the circle?", "what shape is on the left?", "how many shapes are there?",
             "where is the star?")
CHATS = ("where is the red circle?", "what color is the star?", "is there a blue square?")
KINDS = ("chat", "vqa", "gen")


@dataclass
class Item:
    kind: str
    text: str
    seed: int
    image: Optional[np.ndarray] = None
    expected: object = None                   # text, or the image


@dataclass
class Stats:
    seconds: float
    latencies: List[float] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds > 0 else 0.0

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")


def build_mix(pipe, n: int) -> List[Item]:
    scenes = [pipe.generate(p, seed=100 + i).image for i, p in enumerate(GEN_PROMPTS[:3])]
    items = []
    for i in range(n):
        kind = KINDS[i % 3]
        if kind == "chat":
            items.append(Item(kind, CHATS[i % len(CHATS)], i))
        elif kind == "vqa":
            items.append(Item(kind, QUESTIONS[i % len(QUESTIONS)], i, scenes[i % len(scenes)]))
        else:
            items.append(Item(kind, GEN_PROMPTS[i % len(GEN_PROMPTS)], i))
    return items


def run_offline(pipe, items: List[Item]) -> Stats:
    lat = []
    t0 = time.perf_counter()
    for it in items:
        t = time.perf_counter()
        if it.kind == "chat":
            res = pipe.chat(it.text, seed=it.seed).text
        elif it.kind == "vqa":
            res = pipe.answer(it.image, it.text, seed=it.seed).text
        else:
            res = pipe.generate(it.text, seed=it.seed).image
        lat.append(time.perf_counter() - t)
        if it.expected is None:
            it.expected = res
    return Stats(time.perf_counter() - t0, lat)


class Client:
    """One gRPC client: unary calls to cheers_generate, a stream to cheers_chat (one request at a time)."""

    def __init__(self, url: str):
        import tritonclient.grpc as tg

        self.tg = tg
        self.client = tg.InferenceServerClient(url)
        self.responses: "queue.Queue" = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))

    def _input(self, name, array, dtype):
        x = self.tg.InferInput(name, list(array.shape), dtype)
        x.set_data_from_numpy(array)
        return x

    def generate(self, prompt: str, seed: int) -> np.ndarray:
        prompt_in = self._input("prompt", np.array([prompt.encode()], np.object_), "BYTES")
        r = self.client.infer("cheers_generate", [prompt_in, self._input("seed", np.array([seed], np.int64), "INT64")])
        return r.as_numpy("image")

    def chat(self, text: str, seed: int, image: Optional[np.ndarray] = None, timeout: float = 300) -> List[str]:
        inputs = [self._input("prompt", np.array([text.encode()], np.object_), "BYTES"),
                  self._input("seed", np.array([seed], np.int64), "INT64")]
        if image is not None:
            inputs.append(self._input("image", image, "UINT8"))
        self.client.async_stream_infer("cheers_chat", inputs)
        parts = []
        while True:
            result, error = self.responses.get(timeout=timeout)
            if error is not None:
                raise RuntimeError(str(error))
            t = result.as_numpy("text")
            if t is not None:
                parts.append(t.reshape(-1)[0].decode("utf-8"))
            if result.get_response().parameters["triton_final_response"].bool_param:
                return parts

    def close(self):
        self.client.stop_stream()
        self.client.close()


def run_load(url: str, items: List[Item], concurrency: int):
    """(Stats, results): results[i] is the text or image of item i, or an Exception."""
    results: List[object] = [None] * len(items)
    lat: List[Optional[float]] = [None] * len(items)
    nxt = iter(range(len(items)))
    lock = threading.Lock()
    clients = [Client(url) for _ in range(concurrency)]
    start = threading.Barrier(concurrency + 1)

    def worker(c: Client):
        start.wait()
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            it = items[i]
            t = time.perf_counter()
            try:
                if it.kind == "gen":
                    results[i] = c.generate(it.text, it.seed)
                else:
                    results[i] = "".join(c.chat(it.text, it.seed, it.image))
            except Exception as exc:  # noqa: BLE001 - counted as a failed request
                results[i] = exc
            lat[i] = time.perf_counter() - t

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in clients]
    for th in threads:
        th.start()
    start.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    seconds = time.perf_counter() - t0
    for c in clients:
        c.close()
    return Stats(seconds, [x for x in lat if x is not None]), results


def check(items: List[Item], results) -> tuple:
    failed, wrong = [], []
    for i, (it, r) in enumerate(zip(items, results)):
        if r is None or isinstance(r, Exception):
            failed.append(f"{i} {it.kind}: {r}")
        elif it.kind == "gen":
            if not (isinstance(r, np.ndarray) and np.array_equal(r, it.expected)):
                wrong.append(f"{i} gen: image differs")
        elif r != it.expected:
            wrong.append(f"{i} {it.kind}: {r!r} != {it.expected!r}")
    return failed, wrong


def main(argv=None) -> int:
    from ..bench.environment import library_versions, machine_info
    from ..hub import bundled_workdir
    from ..runtime.pipeline import Pipeline
    from .local import LocalTriton, ensure_client, install, model_metric, parse_metrics
    from .repository import RepositoryOptions, write_repository

    p = argparse.ArgumentParser(prog="python -m cheers_deploy.triton.loadtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=None, help="exported workdir (default: the bundled model's graphs)")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--instances", default="1,2", help="comma-separated instance counts to measure")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    counts = [int(x) for x in a.instances.split(",") if x.strip()]
    machine = machine_info()
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    workdir = Path(a.workdir) if a.workdir else bundled_workdir()
    ensure_client()
    inst = install()
    pipe = Pipeline.from_workdir(workdir, backend="ort", timings=False)
    items = build_mix(pipe, a.requests)
    rows = {"offline": []}
    rows.update({f"triton x{n}": [] for n in counts})
    extra = {}
    with tempfile.TemporaryDirectory(prefix="cheers-triton-load-") as tmp:
        for r in range(a.rounds):
            rows["offline"].append((run_offline(pipe, items), [], []))
            for n in counts:
                repo = Path(tmp) / f"repo{n}"
                write_repository(workdir, repo, RepositoryOptions(instances=n), overwrite=True)
                srv = LocalTriton(repo, inst, Path(tmp) / f"server{n}-{r}.log")
                try:
                    srv.start()
                    stats, results = run_load(srv.grpc_url, items, a.concurrency)
                    m = parse_metrics(srv.metrics())
                    extra[f"triton x{n}"] = {"ready_s": round(srv.ready_s, 2), "success": {
                        model: model_metric(m, "nv_inference_request_success", model)
                        for model in ("cheers_generate", "cheers_chat")}}
                finally:
                    srv.stop()
                failed, wrong = check(items, results)
                rows[f"triton x{n}"].append((stats, failed, wrong))
    machine["loadavg_end"] = list(os.getloadavg())
    print(f"{a.requests} requests (chat, vqa, generate in turn), {a.concurrency} clients, {a.rounds} round(s); "
          f"median round per configuration; load average {machine.get('loadavg_start')} -> "
          f"{[round(x, 2) for x in machine['loadavg_end']]}")
    print(f"{'configuration':<14} {'req/s':>7} {'p50 s':>7} {'p99 s':>7} {'failed':>7} {'wrong':>6}")
    out = {}
    bad = 0
    for name, rs in rows.items():
        st, failed, wrong = sorted(rs, key=lambda x: x[0].rps)[len(rs) // 2]
        bad += len(failed) + len(wrong)
        rounds = ", ".join(f"{x[0].rps:.2f}" for x in rs)
        server = "   " + json.dumps(extra[name]) if name in extra else ""
        print(f"{name:<14} {st.rps:7.2f} {st.pct(50):7.3f} {st.pct(99):7.3f} {len(failed):7d} {len(wrong):6d}"
              f"   rounds req/s: {rounds}{server}")
        for line in (failed + wrong)[:5]:
            print(f"    {line}")
        out[name] = {"requests_per_s": round(st.rps, 3), "p50_s": round(st.pct(50), 4), "p99_s": round(st.pct(99), 4),
                     "failed": len(failed), "wrong": len(wrong), "rounds_rps": [round(x[0].rps, 3) for x in rs],
                     **extra.get(name, {})}
    if a.json:
        from ..fileio import write_json

        write_json(a.json, {"date": started,
                            "command": "python -m cheers_deploy.triton.loadtest " + shlex.join(argv or sys.argv[1:]),
                            "machine": machine, "libraries": library_versions(), "results": out})
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
