"""Checkpoint files of a training run (docs/training.md): the output directory is a loadable checkpoint
(config.json, model.safetensors, tokenizer, preprocessor_config.json) plus what resuming needs:

    trainer_state.json               step, stage, recipe (TrainConfig), flags; written last, so a save in
                                     progress has none and is never resumed from
    trainer/model.safetensors        raw weights when model.safetensors holds the EMA weights
    trainer/optimizer.safetensors    AdamW exp_avg / exp_avg_sq / step per parameter name (+ EMA);
                                     metadata: step, stage

Weights go through `checkpoint.save_state` / `fileio.atomic_path`, the state file through `fileio.write_json`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from ..checkpoint import load_state_into, save_state
from ..errors import CheckpointError
from ..fileio import atomic_path, write_json
from ..fileio import atomic_write_text

STATE_FILE = "trainer_state.json"
TRAINER_DIR = "trainer"
OPTIMIZER_FILE = "optimizer.safetensors"


# ---------------------------------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------------------------------
def save_checkpoint(out_dir, model, cfg, tokenizer, *, step: int, stage: str, counters: dict, train_config: dict,
                    ema: Optional[Dict[str, torch.Tensor]] = None, optimizer: Optional[Tuple] = None,
                    t_start: Optional[float] = None) -> None:
    """Checkpoint after `step` completed steps. The deployable weights (EMA when enabled) go to
    model.safetensors; raw weights (if different) and the optimizer (`optimizer` = (torch optimizer, parameter
    names)) to trainer/; trainer_state.json last, holding `counters` and `train_config`. Flush loss.csv first."""
    out = Path(out_dir)
    tdir = out / TRAINER_DIR
    out.mkdir(parents=True, exist_ok=True)
    tdir.mkdir(exist_ok=True)
    (out / STATE_FILE).unlink(missing_ok=True)             # an incomplete save is never resumed from
    cfg.save(out / "config.json")
    tokenizer.save(out)
    res = cfg.vision_representation_config.image_size
    atomic_write_text(out / "preprocessor_config.json", json.dumps({
        "image_processor_type": "UMMImageProcessor", "processor_class": "UMMProcessor",
        "scale_resolution": res, "patch_size": cfg.vision_representation_config.patch_size}, indent=2) + "\n")
    if ema is not None:
        save_state(model, tdir)                             # raw weights (resume)
        with swapped_weights(model, ema):
            save_state(model, out)
    else:
        save_state(model, out)
        (tdir / "model.safetensors").unlink(missing_ok=True)
    opt_file = tdir / OPTIMIZER_FILE
    if optimizer is not None:
        save_optimizer(*optimizer, opt_file, step, stage, ema)
    else:
        opt_file.unlink(missing_ok=True)
    t0 = time.perf_counter() if t_start is None else t_start
    state = {"step": step, "stage": stage, **counters, "has_optimizer": optimizer is not None,
             "train_config": train_config, "elapsed_s": round(time.perf_counter() - t0, 2)}
    # the state file names a complete checkpoint: flush everything to disk before writing it
    for f in [out / "model.safetensors", tdir / "model.safetensors", opt_file, out / "loss.csv"]:
        _fsync(f)
    write_json(out / STATE_FILE, state)


@contextlib.contextmanager
def swapped_weights(model, weights: Dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily copy `weights` (by parameter name) into the model's parameters; restored on exit."""
    backup = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(weights[n].to(p.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(backup[n])


def save_optimizer(opt, names: List[str], path: Path, step: int, stage: str,
                   ema: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """AdamW state per parameter name (`names[i]` is the optimizer's parameter i), plus the EMA weights."""
    from safetensors.torch import save_file

    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            v = v if torch.is_tensor(v) else torch.tensor(v)
            tensors[f"{names[idx]}.{k}"] = v.detach().to("cpu").contiguous()
    if ema is not None:
        for n, v in ema.items():
            tensors[f"ema.{n}"] = v.detach().to("cpu").contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"step": str(step), "stage": stage, "format": "pt"})


def _fsync(path: Path) -> None:
    if path.is_file():
        with open(path, "rb+") as f:
            os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Resumed:
    """What a resumed run continues from; the optimizer file is read when its stage starts."""

    step: int
    vae_finalized: bool
    ema_steps: int
    optimizer_file: Optional[Path] = None
    ema: Optional[Dict[str, torch.Tensor]] = None


def read_state(out_dir) -> Optional[dict]:
    """The trainer_state.json of a complete checkpoint in `out_dir`, or None when there is none."""
    path = Path(out_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        if path.stat().st_size > MAX_STATE_BYTES:
            raise ValueError(f"{path.stat().st_size} bytes, more than a trainer state holds")
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"cannot read {path}: {' '.join(str(exc).split()) or type(exc).__name__}; remove it "
                              f"to train from scratch") from None
    problem = _state_problem(state)
    if problem:
        raise CheckpointError(f"{path}: {problem}; remove it to train from scratch")
    return state


MAX_STATE_BYTES = 16 << 20


def _state_problem(state) -> str:
    """Why a trainer_state.json cannot be resumed from, or ''."""
    if not isinstance(state, dict):
        return f"expected a JSON object, got {type(state).__name__}"
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"field 'step' must be a non-negative integer, got {step!r:.40}"
    if not isinstance(state.get("vae_finalized"), bool):
        return "field 'vae_finalized' must be true or false"
    ema_steps = state.get("ema_steps", 0)
    if isinstance(ema_steps, bool) or not isinstance(ema_steps, int) or ema_steps < 0:
        return "field 'ema_steps' must be a non-negative integer"
    if not isinstance(state.get("train_config"), dict):
        return "field 'train_config' must be an object"
    if not isinstance(state.get("stage", ""), str):
        return "field 'stage' must be a string"
    return ""


def load_checkpoint(out_dir, state: dict, model, device) -> Resumed:
    """Resume: raw weights into `model`, counters from `state`, EMA from the optimizer file (on `device`)."""
    out = Path(out_dir)
    tdir = out / TRAINER_DIR
    raw_dir = tdir if (tdir / "model.safetensors").is_file() else out
    load_state_into(model, raw_dir)
    resumed = Resumed(step=int(state["step"]), vae_finalized=bool(state["vae_finalized"]),
                      ema_steps=int(state.get("ema_steps", 0)))
    opt_file = tdir / OPTIMIZER_FILE
    if state.get("has_optimizer") and opt_file.is_file():
        resumed.optimizer_file = opt_file
        from safetensors import safe_open
        with safe_open(str(opt_file), framework="pt") as f:
            ema = {k[4:]: f.get_tensor(k).to(device) for k in f.keys() if k.startswith("ema.")}
        if ema:
            resumed.ema = ema
    return resumed


def load_optimizer(opt, names: List[str], path: Path, stage: str) -> None:
    """Load the AdamW state saved by `save_optimizer` into `opt`, if it was saved in the same stage."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("stage") != stage:
            return
        state = {}
        for idx, n in enumerate(names):
            keys = [k for k in ("step", "exp_avg", "exp_avg_sq") if f"{n}.{k}" in f.keys()]
            if keys:
                state[idx] = {k: f.get_tensor(f"{n}.{k}") for k in keys}
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)
