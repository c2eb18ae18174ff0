"""Small file helpers used everywhere: atomic writes (temp file in the same folder, fsync, rename; removed on any
error or Ctrl-C), JSON that never holds NaN/Infinity or numpy scalars, and sha256 of files.

Reading what an untrusted workdir or checkpoint names (docs/security.md) goes through here too: `contained` (a path
read from a file stays inside that file's folder: no absolute path, no '..', no link out), `read_json` (size cap,
strict parse, depth bound, top-level type), `load_npy` (header checked, never pickles) and `exclusive_lock`."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Union

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


# ---------------------------------------------------------------------------------------------------------------------
# reading files an untrusted workdir or checkpoint names (docs/security.md)
# ---------------------------------------------------------------------------------------------------------------------
MAX_JSON_BYTES = 64 * 2 ** 20        # manifests, configs, indexes: far below this; a bigger file is refused unread
MAX_JSON_DEPTH = 64                  # nesting levels (ours use 6; deeper is an attack or a broken file)
MAX_PATH_CHARS = 1024                # a relative path written in a file


def _one_line(s) -> str:
    return " ".join(str(s).split())


def check_relative(relative, what: str) -> str:
    """`relative` as written in a file, if it names a file below its folder: a non-empty relative path without
    '..', NUL or a drive/absolute prefix. Raises CheckpointError('<what> ...') otherwise. String checks only (see
    `contained` for links)."""
    from .errors import CheckpointError

    if not isinstance(relative, str) or not relative.strip():
        raise CheckpointError(f"{what} must be a relative file name, got {relative!r:.80}")
    if len(relative) > MAX_PATH_CHARS or "\0" in relative:
        raise CheckpointError(f"{what} = {relative!r:.80} is not a usable file name")
    parts = relative.replace("\\", "/").split("/")
    if relative.startswith(("/", "\\", "~")) or os.path.isabs(relative) or (len(relative) > 1 and relative[1] == ":"):
        raise CheckpointError(f"{what} = {relative!r:.120} is an absolute path: a file named by a workdir or "
                              f"checkpoint must lie inside its folder")
    if ".." in parts:
        raise CheckpointError(f"{what} = {relative!r:.120} leaves its folder ('..'): a file named by a workdir or "
                              f"checkpoint must lie inside it")
    return relative


def allowed_roots(root) -> list:
    """Where the files of the folder `root` may really be: the folder itself (resolved: the user may reach it through
    a link), plus, for a Hugging Face cache snapshot (``models--*/snapshots/<commit>``), that repository's ``blobs``
    folder, which the snapshot's links point into."""
    real = Path(os.path.realpath(root))
    roots = [real]
    storage = real.parent.parent
    if real.parent.name == "snapshots" and storage.name.startswith(("models--", "datasets--", "spaces--")) \
            and (storage / "blobs").is_dir():
        roots.append(Path(os.path.realpath(storage / "blobs")))
    return roots


def _within(path: Path, roots) -> bool:
    p = str(path)
    return any(p == str(r) or p.startswith(str(r).rstrip(os.sep) + os.sep) for r in roots)


def contained(root, relative, what: str, kind: str = "file") -> Path:
    """``root / relative`` for a path read from a file of the folder `root` (a workdir, a checkpoint, an engine
    folder), refusing one that escapes it: an absolute path, '..', or a link whose target (every component resolved)
    lies outside `root`. Also refuses something that exists but is not a regular file (kind='file': a FIFO would
    block, a device never ends) or not a folder (kind='dir'). The path need not exist (callers say what is missing).
    `what` names the file and the field (`<file>: field 'graphs.backbone.file'`); errors are one-line
    CheckpointErrors."""
    import stat

    from .errors import CheckpointError

    check_relative(relative, what)
    root = Path(root)
    path = root / relative
    try:
        real = Path(os.path.realpath(path))
        roots = allowed_roots(root)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{what} = {relative!r:.120}: cannot resolve ({_one_line(exc)[:120]})") from None
    if not _within(real, roots):
        raise CheckpointError(f"{what} = {relative!r:.120} is a link to {_one_line(real)[:200]}, outside "
                              f"{_one_line(root)[:200]}: a file named by a workdir or checkpoint must lie inside it")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        return path
    except OSError as exc:
        raise CheckpointError(f"{what} = {relative!r:.120}: {_one_line(exc.strerror or exc)}") from None
    if kind == "file" and not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{what} = {relative!r:.120} is not a regular file")
    if kind == "dir" and not stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{what} = {relative!r:.120} is not a folder")
    return path


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def _finite_float(text):
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"number {text[:40]} is out of range")
    return v


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r:.60}")
        out[k] = v
    return out


def _depth(obj) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        deepest = max(deepest, d)
        if d > MAX_JSON_DEPTH:
            break
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values() if isinstance(v, (dict, list)))
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o if isinstance(v, (dict, list)))
    return deepest


def parse_json(raw: bytes, where: str, kind=dict):
    """Strict JSON from bytes: UTF-8, no NaN/Infinity or overflowing numbers, no duplicate keys, at most
    MAX_JSON_DEPTH levels; `kind` (dict, list or None = anything) is the top-level type. One-line CheckpointError
    naming `where` otherwise."""
    from .errors import CheckpointError

    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float,
                          object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise CheckpointError(f"{where}: not valid JSON (nested deeper than Python can parse)") from None
    except (ValueError, TypeError) as exc:          # JSONDecodeError, UnicodeDecodeError, int digit limit, ours
        raise CheckpointError(f"{where}: not valid JSON ({type(exc).__name__}: {_one_line(exc)[:160]})") from None
    if isinstance(data, (dict, list)) and _depth(data) > MAX_JSON_DEPTH:
        raise CheckpointError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    if kind is not None and not isinstance(data, kind):
        want = {dict: "a JSON object", list: "a JSON list"}.get(kind, kind.__name__)
        raise CheckpointError(f"{where}: must be {want}, got {type(data).__name__}")
    return data


def read_json(path: PathLike, where: Optional[str] = None, max_bytes: int = MAX_JSON_BYTES, kind=dict):
    """Read a JSON file of a workdir or checkpoint: a regular file of at most `max_bytes` (checked before reading),
    parsed by `parse_json`. Every error is a one-line CheckpointError naming the file (`where`, default the path)."""
    import stat

    from .errors import CheckpointError

    path = Path(path)
    where = where or str(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{where}: not a regular file")
        if st.st_size > max_bytes:
            raise CheckpointError(f"{where}: {st.st_size} bytes, more than the {max_bytes} a JSON file here may have")
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise CheckpointError(f"{where}: file not found") from None
    except OSError as exc:
        raise CheckpointError(f"{where}: unreadable ({_one_line(exc.strerror or exc)})") from None
    if len(raw) > max_bytes:
        raise CheckpointError(f"{where}: more than the {max_bytes} bytes a JSON file here may have")
    return parse_json(raw, where, kind)


def load_npy(path: PathLike, where: str, dtype=None, ndim: Optional[int] = None, shape=None, mmap: bool = True):
    """A .npy array, checked from its header before any data is mapped or read: never pickled objects
    (allow_pickle=False, object dtypes refused), the expected dtype / rank / shape, and a file long enough for the
    shape it declares. One-line CheckpointError naming `where` otherwise."""
    import stat

    import numpy as np
    from numpy.lib import format as npf

    from .errors import CheckpointError

    path = Path(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{where}: not a regular file")
        with open(path, "rb") as f:
            version = npf.read_magic(f)
            if version == (1, 0):
                hshape, fortran, hdtype = npf.read_array_header_1_0(f)
            elif version == (2, 0):
                hshape, fortran, hdtype = npf.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            offset = f.tell()
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{where}: file not found") from None
    except (OSError, ValueError, SyntaxError, TypeError, KeyError, EOFError, MemoryError) as exc:
        raise CheckpointError(f"{where}: not a readable .npy file ({_one_line(exc)[:160]})") from None
    hdtype = np.dtype(hdtype)
    if hdtype.hasobject:
        raise CheckpointError(f"{where}: holds Python objects (dtype {hdtype}); only plain numeric arrays are read")
    if dtype is not None and hdtype != np.dtype(dtype):
        raise CheckpointError(f"{where}: dtype {hdtype.str}, expected {np.dtype(dtype).name}")
    if ndim is not None and len(hshape) != ndim:
        raise CheckpointError(f"{where}: shape {list(hshape)} has {len(hshape)} dimension(s), expected {ndim}")
    if shape is not None and tuple(hshape) != tuple(shape):
        raise CheckpointError(f"{where}: shape {list(hshape)}, expected {list(shape)}")
    nbytes = int(np.prod(hshape, dtype=object)) * hdtype.itemsize
    if offset + nbytes > st.st_size:
        raise CheckpointError(f"{where}: truncated: shape {list(hshape)} needs {nbytes} bytes of data, the file has "
                              f"{max(st.st_size - offset, 0)}")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{where}: unreadable ({_one_line(exc)[:160]})") from None


@contextlib.contextmanager
def exclusive_lock(path: PathLike, what: str) -> Iterator[Path]:
    """Hold an exclusive advisory lock (fcntl.flock) on the file `path` for the block, or fail at once: a second
    holder gets a one-line CheersError naming the pid the first wrote into the lock file. The file is removed when the
    block ends (while still locked); a process that locked a file removed under it notices (another inode at `path`)
    and starts over, so two holders never coexist. No-op where fcntl does not exist (Windows)."""
    from .errors import CheersError

    path = Path(path)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks; one exporter at a time is then on the user
        yield path
        return
    for _ in range(5):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CheersError(f"{what}: cannot create the lock file {path} ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            except OSError:
                holder = "unknown"
            os.close(fd)
            raise CheersError(f"{what}: another process (pid {holder[:20]}) holds {path}; wait for it to finish "
                              f"(or remove the lock file if no such process runs)") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)                      # the holder removed it as we opened it: lock the new one
    else:  # pragma: no cover - five exporters racing one another
        raise CheersError(f"{what}: could not take the lock {path} (other exports keep replacing it)")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
