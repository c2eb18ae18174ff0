"""The measurements behind `cheers-deploy bench`: every backend runs the same Pipeline calls (warm-up, then R timed
runs per task), and the report keeps per-stage and end-to-end medians and p90s, peak memory and energy.

    for backend in backends:          (one at a time: its peak memory is its own)
        load ─► for task in tasks: warm-up x K ─► timed x R   (energy read around each timed run)
    --interleave: load all, then per task warm up each and alternate the timed runs (run r of every backend
    before run r+1), so that a shared machine's load drift hits every backend alike
    ratios a/b of every pair of backends, from this one invocation

Clocks: stage times come from the pipeline's StageTimer (synchronised wall clock); end-to-end marks use CUDA
events for torch on CUDA and the synchronised wall clock otherwise. Understanding runs decode exactly
--max-new-tokens tokens (the stop token and <im_start> are masked: 'ignore_eos', as LLM benchmarks do), so that
tokens/s is measured over a fixed length.

One file (over 400 lines): settings, the runs and their aggregation are one benchmark definition that the report
(report.py) and the CLI read; memory and energy readers live beside it.
"""

from __future__ import annotations

import datetime as _dt
import gc
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..constants import GRAPH_NAMES
from ..errors import CheckpointError, InputError, MissingDependencyError
from . import energy as energy_mod
from ..runtime.observer import PipelineObserver
from .environment import library_versions, machine_info
from .reproducibility import reproducibility
from .memory import GpuMemory, HostMemory, peak_rss

SCHEMA = "cheers-deploy-bench/1"
BACKENDS = ("torch", "ort", "trt")
TASKS = ("t2i", "vqa", "chat")
# pipeline StageTimer name -> report label, in pipeline order
STAGES = (("vae_encode", "VAE encode"), ("vision_tokenizer", "vision tokenizer"), ("prefill", "backbone prefill"),
          ("decode", "per-token decode (backbone + LM head of the last position)"),
          ("image_step", "image step (backbone over M image tokens)"), ("cfm_head", "CFM head"),
          ("vae_decode", "VAE decode"))
STAGE_LABELS = dict(STAGES)
T2I_PROMPT = "a red circle to the left of a blue square"
VQA_QUESTION = "What shapes are in the image?"
CHAT_PROMPT = "Describe a picture of three colored shapes."


@dataclass
class BenchSettings:
    workdir: str
    backends: List[str]
    tasks: List[str] = field(default_factory=lambda: list(TASKS))
    checkpoint: Optional[str] = None
    steps: int = 20
    runs: int = 5
    warmup: int = 1
    energy: bool = False
    max_new_tokens: int = 32
    cfg_scale: float = 9.5
    alpha: float = 0.5
    seed: int = 0
    device: str = "cpu"             # torch backend
    dtype: str = "float32"          # torch backend
    providers: Optional[List[str]] = None   # ort backend
    threads: Optional[int] = None
    interleave: bool = False        # load every backend, alternate their timed runs
    quiet: bool = False

    def check(self) -> None:
        if not self.backends:
            raise InputError("--backends is empty; choose from " + ",".join(BACKENDS))
        bad = [b for b in self.backends if b not in BACKENDS]
        if bad:
            raise InputError(f"unknown backend '{bad[0]}' in --backends; choose from {','.join(BACKENDS)}")
        if len(set(self.backends)) != len(self.backends):
            raise InputError("--backends lists a backend twice")
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise InputError(f"unknown task '{bad[0] if bad else ''}' in --task; choose from {','.join(TASKS)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise InputError("--task lists a task twice")
        from ..runtime.pipeline import MAX_NEW_TOKENS, MAX_STEPS, check_seed, check_setting

        for name, v, lo, hi in (("--steps", self.steps, 1, MAX_STEPS), ("--runs", self.runs, 1, 10_000),
                                ("--warmup", self.warmup, 0, 1_000),
                                ("--max-new-tokens", self.max_new_tokens, 2, MAX_NEW_TOKENS)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise InputError(f"{name} must be an integer, got {v!r}")
            if v < lo:
                raise InputError(f"{name} must be >= {lo}, got {v}")
            if v > hi:
                raise InputError(f"{name} must be <= {hi}, got {v}")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"--threads must be >= 1, got {self.threads}")
        self.seed = check_seed(self.seed)
        check_setting("cfg_scale", self.cfg_scale)
        check_setting("alpha", self.alpha)


# ================================================================================================ statistics

def stats(values: Sequence[float]) -> Dict[str, float]:
    """median, p90 (linear interpolation), mean, min, max and n of a sample."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        raise ValueError("empty sample")
    return {"median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "mean": float(a.mean()),
            "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


# ================================================================================================ clocks

class WallClock:
    """perf_counter after the backend has drained its queue (a no-op on host backends)."""

    name = "time.perf_counter after backend.synchronize()"

    def __init__(self, backend):
        self._sync = backend.synchronize

    def mark(self):
        self._sync()
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        return b - a


class CudaEventClock:
    """torch.cuda.Event marks: device time between two points of the stream, no host sync per mark."""

    name = "torch.cuda.Event (elapsed_time)"

    def __init__(self, torch):
        self._torch = torch

    def mark(self):
        e = self._torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def seconds(self, a, b) -> float:
        b.synchronize()
        return a.elapsed_time(b) / 1e3


def clock_for(backend):
    dev = getattr(backend, "device", None)
    if getattr(dev, "type", None) == "cuda" and hasattr(backend, "torch"):
        return CudaEventClock(backend.torch)
    return WallClock(backend)


# ================================================================================================ setup

def prepare_workdir(s: BenchSettings, log: Callable[[str], None]) -> Dict[str, object]:
    """Find the checkpoint, export the workdir when a graph backend needs graphs it lacks, and check that the
    torch backend and the graphs come from the same weights (else the ratios compare different models)."""
    from ..checkpoint import checkpoint_hash
    from ..hub import resolve_checkpoint
    from ..manifest import Manifest

    wd = Path(s.workdir)
    if wd.exists() and not wd.is_dir():
        raise InputError(f"--workdir {wd} is a file, not a folder")
    try:
        man = Manifest.load(wd)
    except CheckpointError:
        man = None
    recorded = man.checkpoint if man is not None else {}
    need_graphs = any(b in ("ort", "trt") for b in s.backends)
    complete = False
    if man is not None:
        try:
            man.check_files(GRAPH_NAMES)
            complete = True
        except CheckpointError:
            complete = False
    need_ckpt = "torch" in s.backends or (need_graphs and not complete)

    ckpt = None
    if s.checkpoint is not None:
        ckpt = resolve_checkpoint(s.checkpoint)
    elif need_ckpt:
        rec = recorded.get("path")
        if rec and Path(rec).is_dir():
            ckpt = Path(rec)
        else:
            ckpt = resolve_checkpoint(None)
    info: Dict[str, object] = {"workdir": str(wd.resolve()), "checkpoint": str(Path(ckpt).resolve()) if ckpt else None,
                               "exported_now": False}
    if ckpt is not None:
        info["checkpoint_hash"] = checkpoint_hash(Path(ckpt))
    if need_graphs and not complete:
        from ..export.exporter import export_all

        log(f"{wd}: no complete set of exported graphs, exporting {ckpt} first (cheers-deploy export)")
        t0 = time.perf_counter()
        man = export_all(ckpt, wd, progress=not s.quiet)
        info["exported_now"] = True
        info["export_s"] = time.perf_counter() - t0
        recorded = man.checkpoint
    if man is not None:
        info["workdir_checkpoint"] = recorded.get("path")
        info["workdir_checkpoint_hash"] = recorded.get("hash")
        info["max_context"] = man.max_context
        info["precision"] = man.precision
        if man.image is not None:
            info["resolution"] = man.image.resolution
            info["tokens_per_image"] = man.image.tokens_per_image
    if "torch" in s.backends and need_graphs and recorded.get("hash") and info.get("checkpoint_hash") \
            and recorded["hash"] != info["checkpoint_hash"]:
        raise CheckpointError(f"{wd} was exported from {recorded.get('path')}, not from the checkpoint {ckpt} the "
                              f"torch backend would run (different weights: the ratios would be meaningless); "
                              f"re-export it (cheers-deploy export --checkpoint {ckpt} --out {wd} --force) or pass "
                              f"the matching --checkpoint")
    return info


def _check_backend_available(name: str) -> None:
    import importlib

    mods = {"torch": ("torch",), "ort": ("onnxruntime",), "trt": ("cheers_deploy.runtime.trt_backend", "tensorrt")}
    for mod in mods[name]:
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            raise MissingDependencyError(f"the '{name}' backend is not available here ({mod}: {exc}); drop it from "
                                         f"--backends or install it") from None


def load_pipeline(name: str, s: BenchSettings, info: Dict[str, object]):
    from ..runtime.pipeline import Pipeline

    if name == "torch":
        return Pipeline.from_pretrained(info["checkpoint"], backend="torch", device=s.device, dtype=s.dtype,
                                        threads=s.threads)
    kw = {}
    if name == "ort":
        if s.providers:
            kw["providers"] = list(s.providers)
        kw["threads"] = s.threads
    return Pipeline.from_workdir(s.workdir, backend=name, **kw)


def backend_info(name: str, pipe, s: BenchSettings, clock) -> Dict[str, object]:
    be = pipe.backend
    out: Dict[str, object] = {"clock": clock.name}
    if name == "torch":
        out.update(device=str(be.device), dtype=str(be.dtype).replace("torch.", ""),
                   threads=int(be.torch.get_num_threads()))
    elif name == "ort":
        runner = next(iter(be.runners.values()))
        out.update(providers=list(runner.session.get_providers()), device=runner.device,
                   threads=be.threads, cache_len=be.cache_len)
    else:
        out.update(device="cuda", precision=getattr(be, "precision", None),
                   engine_dir=str(getattr(be, "engine_dir", "")) or None)
    return out


def backend_device(name: str, pipe) -> str:
    """'cpu' or the CUDA device the backend computes on (for the energy source and the GPU memory reader)."""
    be = pipe.backend
    if name == "torch":
        return str(be.device)
    if name == "trt":
        return "cuda"
    runner = next(iter(be.runners.values()))
    return "cuda" if runner.device == "cuda" else "cpu"


# ================================================================================================ one run

class _TokenMarks(PipelineObserver):
    """Marks the clock when each token has been sampled (its logits are on the host): time to first token and the
    decode rate. The stop tokens are suppressed through the pipeline's `suppress_tokens` (ignore_eos), so every
    run decodes the same number of tokens."""

    def __init__(self, clock):
        self.clock = clock
        self.marks: List[object] = []

    def on_token(self, index, token_id, logits):
        self.marks.append(self.clock.mark())


def _stage_times(pipe) -> Dict[str, List[float]]:
    return {k: list(v) for k, v in pipe.timer.times.items()}


def run_t2i(pipe, clock, s: BenchSettings, seed: int) -> Dict[str, object]:
    marks: List[object] = []

    def progress(i, n):
        marks.append(clock.mark())

    t0 = clock.mark()
    res = pipe.generate(T2I_PROMPT, steps=s.steps, cfg_scale=s.cfg_scale, alpha=s.alpha, seed=seed,
                        max_new_tokens=1, progress=progress)
    t1 = clock.mark()
    if res.image is None:
        raise InputError("the model produced no image in the text-to-image run")
    stages = _stage_times(pipe)
    total = clock.seconds(t0, t1)
    if len(marks) >= 2:                       # between the ends of step 1 and step N: N-1 whole steps
        step = clock.seconds(marks[0], marks[-1]) / (len(marks) - 1)
    else:                                     # one step: its stages (vision tokenizer, image step, head)
        step = sum(stages.get(k, [0.0])[-1] for k in ("vision_tokenizer", "image_step", "cfm_head"))
    return {"stages": stages, "metrics": {"image_ms": 1e3 * total, "euler_step_ms": 1e3 * step}, "images": 1,
            "tokens": 0}


def run_understanding(pipe, clock, s: BenchSettings, seed: int, task: str) -> Dict[str, object]:
    from ..processor import make_dummy_image

    sp = pipe.special
    probe = _TokenMarks(clock)
    banned = (sp.chat_end, sp.img_start)
    t0 = clock.mark()
    if task == "vqa":
        res = pipe.answer(make_dummy_image((seed + 1) % 2 ** 32), VQA_QUESTION, max_new_tokens=s.max_new_tokens,
                          seed=seed, suppress_tokens=banned, observer=probe)
    else:
        res = pipe.chat(CHAT_PROMPT, max_new_tokens=s.max_new_tokens, seed=seed, suppress_tokens=banned,
                        observer=probe)
    t1 = clock.mark()
    n = len(res.token_ids)
    if n < 2 or len(probe.marks) < n:
        raise InputError(f"the {task} run decoded {n} tokens, expected {s.max_new_tokens}")
    ttft = clock.seconds(t0, probe.marks[0])
    span = clock.seconds(probe.marks[0], probe.marks[n - 1])      # tokens 2..n
    metrics = {"ttft_ms": 1e3 * ttft, "total_ms": 1e3 * clock.seconds(t0, t1)}
    if span > 0:
        metrics["tokens_per_s"] = (n - 1) / span
    return {"stages": _stage_times(pipe), "metrics": metrics, "images": 0, "tokens": n}


def run_task(task: str, pipe, clock, s: BenchSettings, seed: int) -> Dict[str, object]:
    if task == "t2i":
        return run_t2i(pipe, clock, s, seed)
    return run_understanding(pipe, clock, s, seed, task)


# ================================================================================================ aggregation

METRIC_UNITS = {"image_ms": "ms", "euler_step_ms": "ms", "ttft_ms": "ms", "total_ms": "ms", "tokens_per_s": "tok/s"}


def summarise(runs: List[Dict[str, object]]) -> Dict[str, object]:
    """Per stage: per-call times pooled over the timed runs, and per-run totals (the breakdown of one run)."""
    names = [k for k, _ in STAGES] + sorted({k for r in runs for k in r["stages"]} - set(STAGE_LABELS))
    stages, totals = {}, {}
    for k in names:
        calls = [1e3 * t for r in runs for t in r["stages"].get(k, [])]
        if not calls:
            continue
        st = stats(calls)
        st["calls_per_run"] = len(calls) / len(runs)
        stages[k] = st
        totals[k] = stats([1e3 * sum(r["stages"].get(k, [])) for r in runs])
    metrics = {}
    for m in METRIC_UNITS:
        vals = [r["metrics"][m] for r in runs if m in r["metrics"]]
        if vals:
            metrics[m] = dict(stats(vals), unit=METRIC_UNITS[m])
    return {"stages_ms": stages, "stage_totals_ms": totals, "end_to_end": metrics}


def energy_summary(sampler, joules: Optional[float], elapsed: Optional[float], images: int,
                   tokens: int, peak_w: Optional[float] = None) -> Dict[str, object]:
    base = {"source": sampler.source, "method": sampler.method or None, "detail": sampler.detail}
    if joules is None or not elapsed or not math.isfinite(joules) or joules <= 0:
        reason = sampler.detail if sampler.source is None else f"{sampler.source}: counter did not advance or unreadable"
        return dict(base, status="unavailable", reason=reason)
    out = dict(base, status="ok", joules=joules, elapsed_s=elapsed, avg_power_w=joules / elapsed)
    if peak_w is not None:
        out["peak_power_w"] = peak_w
    if images:
        out["joules_per_image"] = joules / images
    if tokens:
        out["joules_per_token"] = joules / tokens
    return out


def ratio_table(backends: Dict[str, Dict[str, object]], order: Sequence[str]) -> Dict[str, object]:
    """a/b for every pair in --backends order, on medians of times (throughput is inverted to a time), so that
    > 1 always means b is faster."""
    out: Dict[str, object] = {}
    for i, a in enumerate(order):
        for b in order[i + 1:]:
            ta, tb = backends[a]["tasks"], backends[b]["tasks"]
            pair: Dict[str, object] = {}
            for task in ta:
                if task not in tb:
                    continue
                st = {k: ta[task]["stages_ms"][k]["median"] / tb[task]["stages_ms"][k]["median"]
                      for k in ta[task]["stages_ms"] if k in tb[task]["stages_ms"]
                      and tb[task]["stages_ms"][k]["median"] > 0}
                e2e = {}
                for m, v in ta[task]["end_to_end"].items():
                    w = tb[task]["end_to_end"].get(m)
                    if w is None or v["median"] <= 0 or w["median"] <= 0:
                        continue
                    e2e[m] = w["median"] / v["median"] if m == "tokens_per_s" else v["median"] / w["median"]
                pair[task] = {"stages": st, "end_to_end": e2e}
            out[f"{a}/{b}"] = pair
    return out


# ================================================================================================ driver

class _Loaded:
    """One backend under test: its pipeline, clock, device, memory readers and energy sampler."""

    def __init__(self, name: str, s: BenchSettings, model: Dict[str, object], interleaved: bool):
        self.name = name
        self.host = HostMemory()
        self.host.start()
        t0 = time.perf_counter()
        self.pipe = load_pipeline(name, s, model)
        self.load_s = time.perf_counter() - t0
        # interleaved: the next backend's load resets the high-water mark, so keep this load's peak now
        self.host_load = self.host.stop() if interleaved else None
        self.clock = clock_for(self.pipe.backend)
        self.info = backend_info(name, self.pipe, s, self.clock)
        self.device = backend_device(name, self.pipe)
        self.gpu = GpuMemory(self.device, torch_cuda=(name == "torch" and self.device.startswith("cuda")))
        self.gpu.start()
        self.sampler = energy_mod.discover(self.device) if s.energy else None
        self.tasks: Dict[str, object] = {}

    def timed(self, task: str, s: BenchSettings, acc: Dict[str, float]) -> Dict[str, object]:
        """One timed run; energy is read around it and accumulated in acc (joules, seconds, failed)."""
        if self.sampler is not None:
            self.sampler.start()
        r = run_task(task, self.pipe, self.clock, s, s.seed)
        if self.sampler is not None:
            j = self.sampler.stop()
            if j is None:
                acc["failed"] = 1.0
            else:
                acc["joules"] = acc.get("joules", 0.0) + j
            acc["seconds"] = acc.get("seconds", 0.0) + (self.sampler.elapsed_s or 0.0)
            if self.sampler.peak_w is not None:
                acc["peak_w"] = max(acc.get("peak_w", 0.0), self.sampler.peak_w)
        return r

    def finish(self) -> Dict[str, object]:
        if self.sampler is not None:
            self.sampler.close()
        gpu = self.gpu.stop()
        self.gpu.close()
        host = self.host_load if self.host_load is not None else self.host.stop()
        if self.host_load is not None and "source" in host:
            host = dict(host, source=f"{host['source']} during its load (interleaved run: the runs share the "
                                     f"process, see process_peak_rss)")
        out = {"info": self.info, "load_s": self.load_s, "memory": {"host_peak_rss": host, "gpu": gpu},
               "tasks": self.tasks}
        close = getattr(self.pipe.backend, "close", None)
        if callable(close):                    # TensorRT: give engines and device buffers back
            close()
        self.pipe = None
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and self.device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()
        return out


def _measure(task: str, group: List[_Loaded], s: BenchSettings, log: Callable[[str], None]) -> None:
    """Warm-up and timed runs of one task; with several backends in `group` the timed runs alternate between
    them (run 1 of each, run 2 of each, ...), so that a change of machine load hits all of them alike."""
    for lb in group:
        for k in range(s.warmup):
            run_task(task, lb.pipe, lb.clock, s, s.seed)
            log(f"{lb.name} {task}: warm-up {k + 1}/{s.warmup} done")
    runs: Dict[str, List[Dict[str, object]]] = {lb.name: [] for lb in group}
    acc: Dict[str, Dict[str, float]] = {lb.name: {} for lb in group}
    for r in range(s.runs):
        for lb in group:
            runs[lb.name].append(lb.timed(task, s, acc[lb.name]))
            m = runs[lb.name][-1]["metrics"]
            log(f"{lb.name} {task}: run {r + 1}/{s.runs} " + ", ".join(f"{k}={v:.2f}" for k, v in m.items()))
    for lb in group:
        rr = runs[lb.name]
        summary = summarise(rr)
        if lb.sampler is not None:
            a = acc[lb.name]
            joules = None if a.get("failed") else a.get("joules")
            summary["energy"] = energy_summary(lb.sampler, joules, a.get("seconds"), sum(x["images"] for x in rr),
                                               sum(x["tokens"] for x in rr), a.get("peak_w"))
        else:
            summary["energy"] = {"status": "not requested (--energy)"}
        summary["tokens_per_run"] = rr[-1]["tokens"]
        summary["images_per_run"] = rr[-1]["images"]
        lb.tasks[task] = summary


def run_benchmark(s: BenchSettings, command: str = "") -> Dict[str, object]:
    """Run everything and return the report dict (report.py writes it out)."""
    s.check()
    log = (lambda msg: None) if s.quiet else (lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True))
    for b in s.backends:
        _check_backend_available(b)
    started = _dt.datetime.now(_dt.timezone.utc)
    machine = machine_info()
    repro = {"at_start": reproducibility()}
    model = prepare_workdir(s, log)

    results: Dict[str, Dict[str, object]] = {}
    loaded: List[_Loaded] = []
    try:
        if s.interleave:
            for name in s.backends:
                loaded.append(_Loaded(name, s, model, interleaved=True))
                log(f"{name}: loaded in {loaded[-1].load_s:.1f} s ({loaded[-1].info})")
            for task in s.tasks:
                _measure(task, loaded, s, log)
            for lb in loaded:
                results[lb.name] = lb.finish()
        else:
            for name in s.backends:
                lb = _Loaded(name, s, model, interleaved=False)
                loaded = [lb]
                log(f"{name}: loaded in {lb.load_s:.1f} s ({lb.info})")
                for task in s.tasks:
                    _measure(task, [lb], s, log)
                results[name] = lb.finish()
                loaded = []
    finally:                                   # after an error: stop the sampler/NVML threads of what is loaded
        for lb in loaded:
            if lb.sampler is not None:
                lb.sampler.close()
            lb.gpu.close()
    process_peak = peak_rss()
    repro["at_end"] = reproducibility()          # clocks and power state right after the timed runs

    try:
        machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    settings = asdict(s)
    settings.update(ignore_eos=True, t2i_prompt=T2I_PROMPT, vqa_question=VQA_QUESTION, chat_prompt=CHAT_PROMPT,
                    vqa_image="processor.make_dummy_image(seed + 1) (random 256x256)",
                    backend_order=("interleaved: all loaded, timed runs alternate between backends" if s.interleave
                                   else "sequential, one backend loaded at a time, in --backends order"))
    return {"schema": SCHEMA, "date": started.isoformat(timespec="seconds"),
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "machine": machine, "libraries": library_versions(), "reproducibility": repro,
            "model": model,
            "settings": settings, "stage_labels": STAGE_LABELS, "backends": results,
            "process_peak_rss": process_peak, "ratios": ratio_table(results, s.backends)}
