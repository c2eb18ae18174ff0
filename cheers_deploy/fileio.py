"""Small file helpers used everywhere: atomic writes (temp file in the same folder, fsync, rename; removed on any
error or Ctrl-C), JSON that never holds NaN/Infinity or numpy scalars, and sha256 of files."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_path(path: PathLike, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path next to `path`; when the block succeeds it is fsynced and renamed onto `path`, when
    it fails (or is interrupted) it is removed. For writers that want a file name (onnx.save, np.save,
    safetensors, PIL). The temp name keeps the suffix, so libraries that dispatch on it still work."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=str(path.parent or "."), prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)          # mkstemp makes 0600 files; our outputs are meant to be read by others
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            f.write(text)
    return Path(path)


def json_safe(o):
    """A JSON-safe copy: numpy scalars and arrays become Python numbers and lists, non-finite floats become the
    strings 'nan'/'inf'/'-inf' (they should not occur; if they do, they stay visible), keys become strings, any other
    object its str()."""
    if isinstance(o, dict):
        return {str(k): json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    if hasattr(o, "tolist") and hasattr(o, "dtype"):          # numpy scalar or array
        return json_safe(o.tolist())
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if o is None or isinstance(o, (bool, int, float, str)):
        return o
    return str(o)                                             # anything else: visible, never a crash


def dumps_json(data) -> str:
    return json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n"


def write_json(path: PathLike, data) -> Path:
    """Atomically write `data` as indented, strictly valid JSON."""
    return atomic_write_text(path, dumps_json(data))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(blob) -> str:
    """sha256 of a JSON-serialisable object in canonical form (sorted keys)."""
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


@functools.lru_cache(maxsize=256)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: PathLike) -> str:
    """sha256 of a file's contents (memoised per path, size and mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    return _sha256_cached(str(p), st.st_size, st.st_mtime_ns)
