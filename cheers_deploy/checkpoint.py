"""Checkpoints in the official Hugging Face layout: config.json + model.safetensors (or shards + index),
tokenizer files, preprocessor_config.json. Tensors are memory-mapped and copied into the model one by one,
so loading needs about 1x the model size in RAM. safetensors only; nothing is ever unpickled.

A checkpoint folder may come from anywhere: every file it names (index shards) stays inside it (fileio.contained),
JSON files are read through fileio.read_json, and every safetensors header is validated (bounded length, strict
JSON, known dtypes, shapes and offsets that fit the file and do not overlap) before safetensors or torch sees it."""

from __future__ import annotations

import stat
import struct
from pathlib import Path
from typing import Dict, List, Optional

from .config import CheersConfig
from .errors import CheckpointError
from .fileio import atomic_path, contained, parse_json, read_json, write_json

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# files of fixed name a checkpoint folder may hold (each read by some loader)
CHECKPOINT_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
                    "tokenizer_config.json", "vocabulary.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                    "eval.json", SINGLE, INDEX)
# Tensors the official file carries that the model may ignore or that are tied (§16, §17.23).
OPTIONAL_KEYS = ("lm_head.weight",)
OPTIONAL_SUFFIXES = (".num_batches_tracked",)


MAX_HEADER_BYTES = 100 * 2 ** 20     # safetensors' own limit
MAX_TENSORS = 1 << 20
MAX_RANK = 8
# safetensors dtype -> bytes per element (the format's list)
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


def _check_header(header: dict, data_bytes: int) -> None:
    """Every tensor entry: a known dtype, a shape of sizes, data_offsets [begin, end] inside the data section, of
    the size dtype x shape says, no two tensors overlapping. Raises ValueError naming the tensor and the field."""
    if len(header) > MAX_TENSORS:
        raise ValueError(f"{len(header)} entries (at most {MAX_TENSORS})")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in info.items()):
                raise ValueError("field '__metadata__' must map strings to strings")
            continue
        if not isinstance(info, dict):
            raise ValueError(f"tensor {name!r:.80}: entry must be an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"tensor {name!r:.80}: field 'dtype' = {dtype!r:.20} is not a safetensors dtype")
        if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= data_bytes for d in shape):
            raise ValueError(f"tensor {name!r:.80}: field 'shape' = {shape!r:.60} is not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise ValueError(f"tensor {name!r:.80}: field 'data_offsets' = {offsets!r:.60} is not [begin, end]")
        lo, hi = offsets
        if not 0 <= lo <= hi <= data_bytes:
            raise ValueError(f"tensor {name!r:.80}: field 'data_offsets' = {offsets} is outside the {data_bytes} "
                             f"bytes of data")
        n = DTYPE_BYTES[dtype]
        for d in shape:
            n *= d
            if n > data_bytes:
                break
        if hi - lo != n:
            raise ValueError(f"tensor {name!r:.80}: field 'data_offsets' = {offsets} spans {hi - lo} bytes, dtype "
                             f"{dtype} x shape {shape} needs {n}")
        spans.append((lo, hi, name))
    spans.sort()
    for (lo0, hi0, a), (lo1, hi1, b) in zip(spans, spans[1:]):
        if lo1 < hi0:
            raise ValueError(f"tensors {a!r:.60} and {b!r:.60} overlap (field 'data_offsets')")


def read_safetensors_header(path: Path) -> dict:
    """Parse and validate a safetensors header without loading data: the 8-byte length bounded by the file and
    MAX_HEADER_BYTES (checked before it is read), strict JSON (fileio.parse_json), every tensor entry checked
    (_check_header). One-line CheckpointError naming the file and the field."""
    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        size = st.st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than 8 bytes")
            (n,) = struct.unpack("<Q", raw)
            if n < 2 or n > min(size - 8, MAX_HEADER_BYTES):
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            blob = f.read(n)
        if len(blob) != n:
            raise ValueError("file shorter than its header")
        header = parse_json(blob, f"{path}: safetensors header")
        _check_header(header, size - 8 - n)
        return header
    except FileNotFoundError:
        raise CheckpointError(f"missing weights file: {path}") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: unreadable ({exc.strerror or exc})") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None


def check_files(ckpt_dir: Path) -> None:
    """The files of fixed name a checkpoint may have stay inside it (none is a link out of the folder)."""
    for name in CHECKPOINT_FILES:
        contained(ckpt_dir, name, f"checkpoint {ckpt_dir}: {name}")


def weight_files(ckpt_dir: Path) -> Dict[str, Path]:
    """tensor name -> file holding it, for a single file or a sharded checkpoint. Every shard the index names is
    contained in the folder, and every file's header is validated and holds the tensors the index puts there."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {ckpt_dir}")
    index_path = contained(ckpt_dir, INDEX, f"checkpoint {ckpt_dir}: {INDEX}")
    if index_path.is_file():
        index = read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or len(weight_map) > MAX_TENSORS:
            raise CheckpointError(f"{index_path}: field 'weight_map' must be an object of tensor name -> shard file")
        files = {}
        for name, shard in weight_map.items():
            files[name] = contained(ckpt_dir, shard, f"{index_path}: field 'weight_map.{name:.80}'")
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise CheckpointError(f"missing shard {shard.name} listed in {INDEX}")
        headers = {shard: read_safetensors_header(shard) for shard in sorted(set(files.values()))}
        for name, shard in files.items():
            if name not in headers[shard]:
                raise CheckpointError(f"{index_path}: field 'weight_map.{name:.80}' names {shard.name}, which has no "
                                      f"tensor {name!r:.80}")
        return files
    single = contained(ckpt_dir, SINGLE, f"checkpoint {ckpt_dir}: {SINGLE}")
    if single.is_file():
        header = read_safetensors_header(single)
        return {k: single for k in header if k != "__metadata__"}
    raise CheckpointError(f"{ckpt_dir}: no {SINGLE} and no {INDEX}")


def _is_optional(name: str) -> bool:
    return name in OPTIONAL_KEYS or name.endswith(OPTIONAL_SUFFIXES)


def load_state_into(model, ckpt_dir: Path, strict: bool = True) -> None:
    """Copy every tensor of the checkpoint into `model` (torch), tensor by tensor from memory maps."""
    import torch
    from safetensors import safe_open

    files = weight_files(ckpt_dir)            # headers validated, shards contained
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
    with torch.no_grad(), safetensors_errors():
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


class safetensors_errors:
    """Turn what safetensors / torch raise on a file that passed the header checks but still cannot be read (a
    short read, an unsupported dtype for the framework) into one CheckpointError line."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, CheckpointError) or not isinstance(exc, Exception):
            return False
        try:
            from safetensors import SafetensorError
        except ImportError:  # pragma: no cover
            SafetensorError = ()
        if isinstance(exc, (SafetensorError, OSError, ValueError, TypeError, RuntimeError)):
            raise CheckpointError(f"cannot read the checkpoint's weights: {type(exc).__name__}: "
                                  f"{' '.join(str(exc).split())[:200]}") from None
        return False


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
    files = weight_files(ckpt_dir)                    # contained, headers validated (bounded lengths)
    for name in ["config.json"] + sorted({p.name for p in files.values()}):
        p = contained(ckpt_dir, name, f"checkpoint {ckpt_dir}: {name}")
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
    """The checkpoint's config.json, typed and checked (bounds, couplings). Checks first that none of the
    checkpoint's files of fixed name is a link out of the folder (every loader starts here)."""
    ckpt_dir = Path(ckpt_dir)
    check_files(ckpt_dir)
    path = ckpt_dir / "config.json"
    cfg = CheersConfig.from_file(path)
    cfg.check(str(path))
    return cfg
