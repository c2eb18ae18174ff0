"""Checkpoints in the official Hugging Face layout: config.json + model.safetensors (or shards + index),
tokenizer files, preprocessor_config.json. Tensors are memory-mapped and copied into the model one by one,
so loading needs about 1x the model size in RAM. safetensors only; nothing is ever unpickled."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from .config import CheersConfig
from .errors import CheckpointError
from .fileio import atomic_path, write_json

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Tensors the official file carries that the model may ignore or that are tied (§16, §17.23).
OPTIONAL_KEYS = ("lm_head.weight",)
OPTIONAL_SUFFIXES = (".num_batches_tracked",)


def read_safetensors_header(path: Path) -> dict:
    """Parse and sanity-check a safetensors header without loading data (clear error if corrupt)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than 8 bytes")
            (n,) = struct.unpack("<Q", raw)
            if n <= 0 or n > min(size - 8, 100 * 1024 * 1024):
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(f.read(n).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        end = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            lo, hi = info["data_offsets"]
            end = max(end, hi)
        if 8 + n + end > size:
            raise ValueError(f"tensor data ends at byte {8 + n + end}, beyond the file size {size}")
        return header
    except FileNotFoundError:
        raise CheckpointError(f"missing weights file: {path}") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None


def weight_files(ckpt_dir: Path) -> Dict[str, Path]:
    """tensor name -> file holding it, for a single file or a sharded checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {ckpt_dir}")
    if (ckpt_dir / INDEX).is_file():
        try:
            index = json.loads((ckpt_dir / INDEX).read_text())
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{ckpt_dir / INDEX}: not a valid safetensors index ({exc})") from None
        files = {}
        for name, shard in weight_map.items():
            files[name] = ckpt_dir / shard
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise CheckpointError(f"missing shard {shard.name} listed in {INDEX}")
        return files
    if (ckpt_dir / SINGLE).is_file():
        header = read_safetensors_header(ckpt_dir / SINGLE)
        return {k: ckpt_dir / SINGLE for k in header if k != "__metadata__"}
    raise CheckpointError(f"{ckpt_dir}: no {SINGLE} and no {INDEX}")


def _is_optional(name: str) -> bool:
    return name in OPTIONAL_KEYS or name.endswith(OPTIONAL_SUFFIXES)


def load_state_into(model, ckpt_dir: Path, strict: bool = True) -> None:
    """Copy every tensor of the checkpoint into `model` (torch), tensor by tensor from memory maps."""
    import torch
    from safetensors import safe_open

    files = weight_files(ckpt_dir)
    for f in sorted(set(files.values())):
        read_safetensors_header(f)
    params = dict(model.state_dict(keep_vars=True))
    missing = [k for k in params if k not in files and not _is_optional(k)]
    unexpected = [k for k in files if k not in params]
    if strict and missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {missing[:3]}")
    if strict and unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}")
    by_file: Dict[Path, List[str]] = {}
    for name, f in files.items():
        if name in params:
            by_file.setdefault(f, []).append(name)
    embed_key = "model.language_model.embed_tokens.weight"
    with torch.no_grad():
        for f, names in by_file.items():
            with safe_open(str(f), framework="pt") as sf:
                for name in names:
                    if name == "lm_head.weight":
                        continue  # tied: the embedding matrix is what the head uses (checked below)
                    target = params[name]
                    shape = tuple(sf.get_slice(name).get_shape())
                    if shape != tuple(target.shape):
                        raise CheckpointError(
                            f"tensor {name}: expected shape {list(target.shape)}, found {list(shape)}")
                    target.copy_(sf.get_tensor(name).to(target.dtype))
        if "lm_head.weight" in files and embed_key in files:
            with safe_open(str(files["lm_head.weight"]), framework="pt") as sf:
                head = sf.get_tensor("lm_head.weight")
            if tuple(head.shape) != tuple(params[embed_key].shape):
                raise CheckpointError(f"tensor lm_head.weight: expected shape {list(params[embed_key].shape)}, "
                                      f"found {list(head.shape)}")
            if not torch.equal(head.to(params[embed_key].dtype), params[embed_key]):
                import warnings
                warnings.warn("lm_head.weight differs from embed_tokens.weight; using the embedding (tied)")


def save_state(model, out_dir: Path, max_shard_bytes: Optional[int] = None) -> None:
    """Write the model's tensors (lm_head copy included, as the official file does) as safetensors."""
    import torch
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    state = {k: (v.clone() if k == "lm_head.weight" else v) for k, v in state.items()}  # break tie for saving
    if max_shard_bytes is None or sum(v.numel() * v.element_size() for v in state.values()) <= max_shard_bytes:
        _atomic_save(save_file, state, out_dir / SINGLE)
        (out_dir / INDEX).unlink(missing_ok=True)
        return
    shards, cur, cur_bytes = [], {}, 0
    for k in sorted(state):
        nbytes = state[k].numel() * state[k].element_size()
        if cur and cur_bytes + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = {}, 0
        cur[k] = state[k]
        cur_bytes += nbytes
    shards.append(cur)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _atomic_save(save_file, shard, out_dir / name)
        for k, v in shard.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    write_json(out_dir / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    (out_dir / SINGLE).unlink(missing_ok=True)


def _atomic_save(save_file, tensors, path: Path):
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


FULL_HASH_BYTES = 512 * 2 ** 20      # weight files up to this size are hashed whole
_SAMPLES, _SAMPLE_BYTES = 256, 64 * 2 ** 10


def checkpoint_hash(ckpt_dir: Path) -> str:
    """Identity of a checkpoint: sha256 over config.json and the weight files' contents.

    Weight files up to FULL_HASH_BYTES are hashed whole. Larger ones (the official 5.6 GB file) are hashed by
    their header, their size and 256 evenly spaced 64 KiB samples of the data (16 MiB read): a retrained or
    fine-tuned checkpoint of the same architecture has the same header and size but different bytes
    everywhere, so it never passes for the old one.
    """
    import hashlib

    ckpt_dir = Path(ckpt_dir)
    h = hashlib.sha256()
    for name in ["config.json"] + sorted({p.name for p in weight_files(ckpt_dir).values()}):
        p = ckpt_dir / name
        size = p.stat().st_size
        h.update(name.encode())
        h.update(str(size).encode())
        with open(p, "rb") as f:
            if size <= FULL_HASH_BYTES:
                for chunk in iter(lambda: f.read(2 ** 20), b""):
                    h.update(chunk)
                continue
            (n,) = struct.unpack("<Q", f.read(8))
            f.seek(0)
            h.update(f.read(8 + n))
            span = size - (8 + n)
            for i in range(_SAMPLES):
                f.seek(8 + n + (span - _SAMPLE_BYTES) * i // (_SAMPLES - 1))
                h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()


def load_config(ckpt_dir: Path) -> CheersConfig:
    cfg = CheersConfig.from_file(Path(ckpt_dir) / "config.json")
    cfg.check()
    return cfg
