"""`cheers-deploy calibrate capture`: record every graph's real inputs while the FP32 ONNX Runtime pipeline runs a
calibration set.

    calibration item (image + question, t2i prompt) ─► Pipeline(ort, observer + feed hook = FeedRecorder)
        answer(image, question)   vae_encoder, vision_tokenizer (t=1, clean latent), backbone prefill + decode
        generate(prompt, CFG)     backbone prefill (B=2) + image steps, vision_tokenizer + cfm_head at Euler steps
                                  sampled across t in [0, 1], decode after the image, vae_decoder
    ─► <workdir>/calib/<item>.npz (keys "graph|mode|k|input") + calib/calib_manifest.json

Resumable (items already in the manifest are skipped), capped in size (--max-mb: stops before the shard that would
exceed it). The calibration set is the shapes world's *train* split (never the held-out eval scenes) for the tiny
model, or a JSONL file of {"image": path, "question": str, "prompt": str} for a real model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..errors import InputError
from ..fileio import atomic_path
from ..runtime.observer import PipelineObserver
from .common import calib_dir, load_calib_manifest, save_calib_manifest, shard_key

DEFAULT_STEPS = 25          # the eval default: calibration sees the same time grid as deployment
DEFAULT_CFG = 3.0
DEFAULT_ALPHA = 1.0
EULER_SAMPLES = 6           # Euler steps recorded per image, evenly spread over t in [0, 1]
DECODE_SAMPLES = 3          # decode steps recorded per generation


class FeedRecorder(PipelineObserver):
    """Records every graph's input feed while the pipeline runs: the pipeline tells it the phase of each stage
    (observer hook), the ORT backend hands it each feed before the graph runs (its `on_feed` option).
    `begin(steps)` starts an item (which Euler steps to keep), `take()` returns {graph: {mode: [feed, ...]}}.

    Modes: the backbone's own (prefill / decode / image_step); the vision tokenizer's 'understand' (the clean
    image latent at t = 1, phase encode) or 'euler' (phase denoise); 'default' for the other graphs."""

    def __init__(self, euler_samples: int = EULER_SAMPLES, decode_samples: int = DECODE_SAMPLES):
        self.euler_samples, self.decode_samples = euler_samples, decode_samples
        self.phase = None
        self.input_dtypes: Dict[str, Dict[str, np.dtype]] = {}
        self.begin(0)

    def begin(self, steps: int) -> None:
        self.counts: Dict[tuple, int] = {}
        self.records: Dict[str, Dict[str, List[dict]]] = {}
        n = max(1, min(self.euler_samples, steps)) if steps else 0
        self.keep_steps = set(np.unique(np.round(np.linspace(0, steps - 1, n)).astype(int)).tolist()) if steps else set()

    def take(self) -> Dict[str, Dict[str, List[dict]]]:
        out, self.records = self.records, {}
        return out

    # pipeline observer: which phase the next stage call belongs to
    def on_stage_start(self, stage, phase):
        self.phase = phase

    def _mode(self, graph: str, backbone_mode: Optional[str]) -> str:
        if graph == "backbone":
            return backbone_mode or "prefill"
        if graph == "vision_tokenizer":
            return "euler" if self.phase == "denoise" else "understand"
        return "default"

    def _keep(self, graph: str, mode: str, k: int) -> bool:
        if mode in ("image_step", "euler") or graph == "cfm_head":
            return k in self.keep_steps
        if mode == "decode":
            return k < self.decode_samples
        return True

    # backend option: the feed of each graph call
    def on_feed(self, graph: str, backbone_mode: Optional[str], feed: Dict[str, np.ndarray]) -> None:
        mode = self._mode(graph, backbone_mode)
        k = self.counts.get((graph, mode), 0)
        self.counts[(graph, mode)] = k + 1
        if self._keep(graph, mode, k):
            self.records.setdefault(graph, {}).setdefault(mode, []).append(
                {n: np.array(a, copy=True) for n, a in feed.items()})


# --------------------------------------------------------------------------------------------- calibration sets
def shapes_items(n: int, seed: int = 1000, split: str = "train") -> List[dict]:
    """n shapes-world calibration items (train split, a seed disjoint from training's default)."""
    from ..data import shapes as W

    items = []
    for i, s in enumerate(W.make_split(split, n, seed=seed)):
        qtype, q, _ = s.qa[i % len(s.qa)]
        items.append({"id": f"shapes-{seed}-{i:05d}", "image": s.image, "question": q, "prompt": s.prompts[0]})
    return items


def jsonl_items(path) -> List[dict]:
    """A JSONL file of {"image": path (relative to the file), "question": str, "prompt": str}; any field may be
    absent (an item without image/question only generates, one without prompt only answers)."""
    path = Path(path)
    if path.is_dir():
        path = path / "calibration.jsonl"
    if not path.is_file():
        raise InputError(f"--data {path}: not found (a JSONL file of image/question/prompt records)")
    items = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise InputError(f"--data {path}, line {i + 1}: not valid JSON ({' '.join(str(exc).split())[:120]})") \
                from None
        if not isinstance(rec, dict) or not all(isinstance(rec.get(k, ""), (str, type(None)))
                                                for k in ("image", "question", "prompt")):
            raise InputError(f"--data {path}, line {i + 1}: must be an object of image/question/prompt strings")
        if rec.get("image"):
            rec["image"] = str((path.parent / rec["image"]).resolve())
        rec.setdefault("id", f"user-{i:05d}")
        items.append(rec)
    return items


# --------------------------------------------------------------------------------------------- capture
def capture(workdir, n: int = 16, max_mb: float = 512.0, data=None, seed: int = 1000, steps: int = DEFAULT_STEPS,
            cfg_scale: float = DEFAULT_CFG, alpha: float = DEFAULT_ALPHA, euler_samples: int = EULER_SAMPLES,
            progress: bool = True, log=print, threads: Optional[int] = None) -> dict:
    """Run the fp32 ORT pipeline on the calibration items and store their graph inputs. Returns the calib
    manifest."""
    workdir = Path(workdir)
    items = jsonl_items(data)[:n] if data else shapes_items(n, seed)
    cm = load_calib_manifest(workdir)
    todo = [it for it in items if it["id"] not in cm["items"]]
    if len(todo) < len(items):
        log(f"capture: {len(items) - len(todo)} item(s) already captured, {len(todo)} to go")
    if not todo:
        return cm
    rec = FeedRecorder(euler_samples)
    pipe = _recording_pipeline(workdir, rec, threads)
    cap = int(max_mb * 1e6)
    d = calib_dir(workdir)
    d.mkdir(parents=True, exist_ok=True)
    bar = _bar(len(todo), progress)
    for it in todo:
        arrays: Dict[str, np.ndarray] = {}
        counts: Dict[str, Dict[str, int]] = {}
        if it.get("question") and it.get("image") is not None:
            rec.begin(0)
            pipe.answer(it["image"], it["question"], max_new_tokens=4)
            _collect(rec.take(), arrays, counts, "u")
        if it.get("prompt"):
            rec.begin(steps)
            pipe.generate(it["prompt"], steps=steps, cfg_scale=cfg_scale, alpha=alpha,
                          seed=int(it.get("seed", 0)), max_new_tokens=2)
            _collect(rec.take(), arrays, counts, "g")
        nbytes = sum(a.nbytes for a in arrays.values())
        if cm["total_bytes"] + nbytes > cap:
            log(f"capture: size cap {max_mb:g} MB reached after {len(cm['items'])} item(s); stopping")
            break
        fname = f"{it['id']}.npz"
        with atomic_path(d / fname) as tmp:
            np.savez(tmp, **arrays)
        cm["items"][it["id"]] = {"file": fname, "bytes": nbytes, "graphs": counts,
                                 "prompt": it.get("prompt"), "question": it.get("question")}
        cm["total_bytes"] += nbytes
        cm.update({"steps": steps, "cfg_scale": cfg_scale, "alpha": alpha, "euler_samples": euler_samples})
        save_calib_manifest(workdir, cm)             # after every shard: an interrupted capture resumes here
        bar.update(1)
    bar.close()
    return cm


def _recording_pipeline(workdir, rec: FeedRecorder, threads: Optional[int] = None):
    """The fp32 ORT pipeline with the recorder as its observer and as its backend's feed hook (no timings: they
    are not needed and would only add work)."""
    from ..runtime.pipeline import Pipeline

    return Pipeline.from_workdir(workdir, backend="ort", threads=threads, on_feed=rec.on_feed, observers=[rec],
                                 timings=False)


def _collect(records, arrays, counts, prefix):
    for g, modes in records.items():
        for mode, feeds in modes.items():
            m = f"{prefix}-{mode}"
            for k, feed in enumerate(feeds):
                for name, a in feed.items():
                    arrays[shard_key(g, m, k, name)] = a
            counts.setdefault(g, {})[m] = len(feeds)


def _bar(total, enabled):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc="capture", unit="item", disable=not enabled)
    except ImportError:  # pragma: no cover
        class _Null:
            def update(self, n): pass
            def close(self): pass
        return _Null()


def summary(cm: dict) -> str:
    per: Dict[str, int] = {}
    for item in cm["items"].values():
        for g, modes in item["graphs"].items():
            per[g] = per.get(g, 0) + sum(modes.values())
    calls = ", ".join(f"{g} {n}" for g, n in sorted(per.items()))
    return f"{len(cm['items'])} item(s), {cm['total_bytes'] / 1e6:.1f} MB; recorded calls: {calls}"
