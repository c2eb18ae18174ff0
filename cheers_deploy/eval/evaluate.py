"""`cheers-deploy eval`: understanding exact-match and GenEval-style generation scores on the held-out shapes world.

Understanding: every question of `n` held-out scenes (color, shape, position, count, exists) asked through
`pipe.answer` (greedy); exact match of the normalised answer word. Generation: canonical prompts of held-out
single-object and two-object scenes through `pipe.generate`, judged by the OpenCV detector
(`cheers_deploy.eval.detector.score_generation`). All fractions in [0, 1]; deterministic given `seed`.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import numpy as np

from ..data import shapes as W
from ..errors import InputError
from ..fileio import atomic_write_bytes, atomic_write_text
from ..runtime.pipeline import SEED_MAX, check_seed, check_setting
from .detector import score_generation

DEFAULTS = {"n": 100, "steps": 25, "cfg_scale": 3.0, "alpha": 1.0}
MAX_ITEMS = 100_000      # held-out scenes / prompts of one evaluation

# progress: None/False = silent; True = a tqdm bar on stderr per phase; a callable(i, n) is called after each item
Progress = Union[None, bool, Callable[[int, int], None]]


@contextlib.contextmanager
def progress_reporter(progress: Progress, desc: str, total: int, unit: str = "item"):
    """A callable(i, n) for one loop of `total` items: calls `progress` when it is callable, drives a tqdm bar on
    stderr when it is True, does nothing when it is None/False."""
    bar = None
    if progress and not callable(progress) and total > 0:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)

    def step(i: int, n: int) -> None:
        if callable(progress):
            progress(i, n)
        if bar is not None:
            bar.update(1)

    try:
        yield step
    finally:
        if bar is not None:
            bar.close()


def normalize_answer(text: str) -> str:
    """First word of the reply, lower case, without punctuation (answers are single words)."""
    words = W.words(text)
    words = [w for w in words if w.isalpha()]
    return words[0] if words else ""


def _scenes(split: str, seed: int, n_single: int, n_two: int) -> tuple:
    """The first n_single one-object and n_two two-object scenes of a seeded draw of `split`."""
    single, two = [], []
    i, block = 0, 4 * max(1, n_single + n_two)
    while len(single) < n_single or len(two) < n_two:
        for s in W.make_split(split, i + block, seed=seed)[i:]:   # prefix-stable: sample i depends on (seed, i)
            if len(s.scene.objects) == 1 and len(single) < n_single:
                single.append(s)
            elif len(s.scene.objects) == 2 and len(two) < n_two:
                two.append(s)
        i += block
    return single, two


def evaluate_understanding(pipe, n: int, seed: int = 0, split: str = "heldout", max_new_tokens: int = 6,
                           progress: Progress = None) -> dict:
    res = pipe.processor.resolution
    samples = W.make_split(split, n, seed=seed, resolution=res)
    per_type: Dict[str, List[bool]] = {t: [] for t in W.QUESTION_TYPES}
    examples = []
    with progress_reporter(progress, "understanding", len(samples), "scene") as step:
        for i, s in enumerate(samples):
            for qtype, q, a in s.qa:
                out = pipe.answer(s.image, q, max_new_tokens=max_new_tokens)
                pred = normalize_answer(out.text)
                per_type[qtype].append(pred == a)
                if len(examples) < 12:
                    examples.append({"question": q, "answer": a, "prediction": out.text.strip()})
            step(i + 1, len(samples))
    flat = [x for v in per_type.values() for x in v]
    return {"exact_match": float(np.mean(flat)) if flat else 0.0,
            "per_type": {t: float(np.mean(v)) if v else 0.0 for t, v in per_type.items()},
            "n_questions": len(flat), "n_scenes": len(samples), "examples": examples}


def evaluate_generation(pipe, n_single: int, n_two: int, seed: int = 0, steps: int = DEFAULTS["steps"],
                        cfg_scale: Optional[float] = DEFAULTS["cfg_scale"], alpha: float = DEFAULTS["alpha"],
                        split: str = "heldout", keep_images: int = 0, progress: Progress = None) -> dict:
    single, two = _scenes(split, seed + 1, n_single, n_two)
    rows, images = [], []
    items = single + two
    with progress_reporter(progress, "generation", len(items), "image") as step:
        for i, s in enumerate(items):
            prompt = s.prompts[0]                       # canonical prompt (with sizes), parses back exactly
            out = pipe.generate(prompt, steps=steps, cfg_scale=cfg_scale, alpha=alpha,
                                seed=(seed * 100_003 + i) % (SEED_MAX + 1))       # stays a valid seed
            sc = score_generation(out.image, prompt)
            rows.append(sc)
            if len(images) < keep_images:
                images.append((prompt, out.image))
            step(i + 1, len(items))
    s1 = [r for r in rows if r["n_targets"] == 1]
    s2 = [r for r in rows if r["n_targets"] == 2]
    mean = lambda rs, k: float(np.mean([bool(r[k]) for r in rs])) if rs else 0.0  # noqa: E731
    out = {
        "color": mean(s1, "color"), "shape": mean(s1, "shape"), "position": mean(s1, "position"),
        "size": mean(s1, "size"), "single_object": mean(s1, "single_object"),
        "two_object": mean(s2, "two_object"), "two_object_position": mean(s2, "position"),
        "counting": mean(rows, "count"),
        "n_single": len(s1), "n_two": len(s2),
    }
    # GenEval-style overall: mean of the task scores
    out["overall"] = float(np.mean([out["single_object"], out["two_object"], out["counting"], out["color"],
                                    out["position"]]))
    if keep_images:
        out["_images"] = images
    return out


def evaluate(pipe, n: int = DEFAULTS["n"], seed: int = 0, steps: int = DEFAULTS["steps"],
             cfg_scale: Optional[float] = DEFAULTS["cfg_scale"], alpha: float = DEFAULTS["alpha"],
             n_gen: Optional[int] = None, n_two: Optional[int] = None, split: str = "heldout",
             understanding: bool = True, generation: bool = True, keep_images: int = 0,
             progress: Progress = None) -> dict:
    """Understanding on `n` held-out scenes (all their questions); generation on `n_gen` single-object prompts
    (default n) and `n_two` two-object prompts (default n_gen // 2). progress: True = a tqdm bar per phase on
    stderr, a callable(i, n) = called after each scene / prompt of each phase, None/False = silent.
    Returns a JSON-ready dict:
    {"understanding": {"exact_match", "per_type": {...}}, "generation": {"color", "shape", "position", "size",
    "single_object", "two_object", "counting", "overall", ...}, "settings": {...}}."""
    n_gen = n if n_gen is None else n_gen
    n_two = n_gen // 2 if n_two is None else n_two
    for name, v in (("n", n), ("n_gen", n_gen), ("n_two", n_two)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v <= MAX_ITEMS:
            raise InputError(f"{name} must be an integer in 0..{MAX_ITEMS}, got {v!r}")
    seed = check_seed(seed)
    if generation:                       # the settings of every image, refused before any work
        check_setting("steps", steps)
        check_setting("alpha", alpha)
        if cfg_scale is not None:
            check_setting("cfg_scale", cfg_scale)
    t0 = time.perf_counter()
    result: dict = {"settings": {"n": n, "n_gen": n_gen, "n_two": n_two, "seed": seed, "steps": steps,
                                 "cfg_scale": cfg_scale, "alpha": alpha, "split": split,
                                 "resolution": pipe.processor.resolution}}
    if understanding:
        result["understanding"] = evaluate_understanding(pipe, n, seed, split, progress=progress)
    if generation:
        result["generation"] = evaluate_generation(pipe, n_gen, n_two, seed, steps, cfg_scale, alpha, split,
                                                   keep_images, progress=progress)
    result["settings"]["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def format_table(result: dict) -> str:
    """Markdown table of the scores."""
    lines = ["| task | metric | score |", "|---|---|---|"]
    u = result.get("understanding")
    if u:
        lines.append(f"| understanding | exact match (all, {u['n_questions']} q.) | {u['exact_match']:.3f} |")
        for t, v in u["per_type"].items():
            lines.append(f"| understanding | {t} | {v:.3f} |")
    g = result.get("generation")
    if g:
        for k, label in (("color", "color (single)"), ("shape", "shape (single)"),
                         ("position", "position (single)"), ("size", "size (single)"),
                         ("single_object", "single object (color+shape)"), ("two_object", "two objects"),
                         ("two_object_position", "two objects, positions"), ("counting", "counting"),
                         ("overall", "overall (GenEval-style mean)")):
            lines.append(f"| generation | {label} | {g[k]:.3f} |")
    s = result.get("settings", {})
    lines.append(f"\n{s.get('n')} understanding scenes, {s.get('n_gen')}+{s.get('n_two')} generation prompts, "
                 f"{s.get('steps')} steps, cfg {s.get('cfg_scale')}, alpha {s.get('alpha')}, seed {s.get('seed')}, "
                 f"{s.get('split')} split")
    return "\n".join(lines)


def save_grid(images, path, scale: int = 2) -> None:
    """PNG grid of (prompt, uint8 image) pairs, 8 per row (prompts go to a .txt beside it)."""
    import cv2

    if not images:
        return
    tiles = [np.kron(im, np.ones((scale, scale, 1), np.uint8)) for _, im in images]
    h, w = tiles[0].shape[:2]
    cols = min(8, len(tiles))
    rows = -(-len(tiles) // cols)
    grid = np.full((rows * (h + 2), cols * (w + 2), 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        grid[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = t
    ok, png = cv2.imencode(".png", grid[:, :, ::-1])
    if ok:
        atomic_write_bytes(path, png.tobytes())
    atomic_write_text(Path(path).with_suffix(".txt"), "\n".join(p for p, _ in images) + "\n")
