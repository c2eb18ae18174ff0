"""Device memory with cuda-python only (no TensorRT, no torch, no CuPy): buffers, pinned host buffers, typed
device arrays, a static KV cache written by position, one CUDA stream, CUDA-graph capture and an arena for the
activation memory that all TensorRT execution contexts share.

Everything is stream-ordered on the caller's stream: copies are ``cudaMemcpyAsync`` / ``cudaMemcpy2DAsync`` on
that stream, device-to-host copies synchronise it before returning numpy data. Freed buffers go back to a
per-size pool (no ``cudaFree``, which would synchronise the device, during generation), so the addresses that
CUDA graphs captured stay valid as long as the arrays they point into are alive.

    KV cache (per layer K and V): (B, Hkv, T=max_context, Dh), allocated once.
    write(layer, present (B', Hkv, S, Dh), start):  one cudaMemcpy2DAsync per tensor,
        rows = B'*Hkv, row width = S*Dh*itemsize, dst pitch = T*Dh*itemsize, dst offset = start*Dh*itemsize.

The CUDA runtime module is cuda-python's (``compat.import_cudart``); ``use_runtime`` swaps in another object with
the same functions (the tests run the logic on host memory that way).

One file (over 400 lines) because it is one memory model: buffers, arrays, the KV cache and CUDA graphs share the
pool, the stream ordering and the runtime override that the tests use.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import compat
from ..errors import CheersError, InputError

ALIGN = 256                                # TensorRT wants 256-byte aligned activation memory; cudaMalloc gives more

_runtime = None
_generation = 0                            # bumped by use_runtime: memory of an older runtime never re-enters the pool
_lock = threading.Lock()


def use_runtime(runtime):
    """Use ``runtime`` (an object with cuda-python's cudart functions) instead of cuda-python; returns the previous
    override (None = cuda-python). Tests only. The pool is emptied first; buffers still alive from the previous
    runtime are not recycled into the new one."""
    global _runtime, _generation
    _POOL.clear()
    prev, _runtime = _runtime, runtime
    _generation += 1
    return prev


def rt():
    return _runtime if _runtime is not None else compat.import_cudart()


def check(result, what: str):
    return compat.check_cuda(result, what)


def _kind(name: str):
    return getattr(rt().cudaMemcpyKind, name)


def np_dtype(name) -> np.dtype:
    """numpy dtype, including 'bfloat16' (through ml_dtypes)."""
    if isinstance(name, np.dtype):
        return name
    if str(name) == "bfloat16":
        import ml_dtypes  # noqa: F401 - registers the dtype

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def set_device(device: int = 0) -> None:
    check(rt().cudaSetDevice(int(device)), f"cudaSetDevice({device})")


def mem_info() -> Tuple[int, int]:
    """(free, total) bytes of the current device."""
    free, total = check(rt().cudaMemGetInfo(), "cudaMemGetInfo")
    return int(free), int(total)


# ---------------------------------------------------------------------------------------------------------------------
# stream and graphs
# ---------------------------------------------------------------------------------------------------------------------
class CudaStream:
    """A non-blocking CUDA stream (does not synchronise with the legacy default stream)."""

    def __init__(self, non_blocking: bool = True):
        r = rt()
        flags = int(getattr(r, "cudaStreamNonBlocking", 1)) if non_blocking else 0
        self.handle = check(r.cudaStreamCreateWithFlags(flags), "cudaStreamCreateWithFlags")
        self._closed = False

    @property
    def ptr(self) -> int:
        """The stream as an integer (what TensorRT's execute_async_v3 takes)."""
        return int(self.handle)

    def synchronize(self) -> None:
        check(rt().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(Exception):
                rt().cudaStreamDestroy(self.handle)

    def __del__(self):
        self.close()

    @contextlib.contextmanager
    def capture(self):
        """``with stream.capture() as cap: <enqueue work>``; afterwards ``cap.graph`` is an instantiated CudaGraph.
        Capture always ends (also on errors), so the stream is usable afterwards. After a failed capture the
        per-thread "last error" of every reachable CUDA runtime is cleared, as trtexec does
        (``clear_last_errors``; what it held is in ``cap.cleared``), so that an uncaptured retry does not fail on
        the stale error."""
        r = rt()
        mode = r.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(r.cudaStreamBeginCapture(self.handle, mode), "cudaStreamBeginCapture")
        cap = _Capture()
        ended = ok = False
        try:
            yield cap
            graph = check(r.cudaStreamEndCapture(self.handle), "cudaStreamEndCapture")
            ended = True
            cap.graph = CudaGraph(graph)
            ok = True
        finally:
            if not ended:
                with contextlib.suppress(Exception):
                    res = r.cudaStreamEndCapture(self.handle)
                    if isinstance(res, tuple) and len(res) > 1 and res[1] is not None:
                        r.cudaGraphDestroy(res[1])
            if not ok:
                cap.cleared = clear_last_errors()


def clear_last_errors() -> Dict[str, int]:
    """Read and reset the calling thread's "last error" of every CUDA runtime this process can reach: cuda-python's
    (``cudaGetLastError``; cuda-python links the CUDA runtime statically, so this is its own state) and every shared
    ``libcudart.so.N`` already loaded (the one the gated-residual plugin links, whose kernel launcher reports
    ``cudaGetLastError()``), through ctypes without loading anything. A runtime linked statically into another
    library (TensorRT's own, if it has one) cannot be reached; sticky errors (a device fault) cannot be cleared by
    anyone. Returns {runtime: the error code it held (0 = none)}."""
    out: Dict[str, int] = {}
    r = rt()
    fn = getattr(r, "cudaGetLastError", None)
    if fn is not None:
        with contextlib.suppress(Exception):
            res = fn()
            out["cuda-python"] = compat._err_code(res[0] if isinstance(res, tuple) else res)
    for name, lib in _process_runtimes():
        with contextlib.suppress(Exception):
            f = lib.cudaGetLastError
            with contextlib.suppress(AttributeError, TypeError):
                f.restype, f.argtypes = ctypes.c_int, ()
            out[name] = int(f())
    return out


def _process_runtimes():
    """The shared CUDA runtimes in the process: the override's (``process_runtimes()``, tests) or the real ones."""
    if _runtime is not None:
        return list(getattr(_runtime, "process_runtimes", lambda: [])())
    return compat.loaded_cudart_libraries()


class _Capture:
    graph: Optional["CudaGraph"] = None
    cleared: Optional[Dict[str, int]] = None       # set after a failed capture: what clear_last_errors() reset


class CudaGraph:
    """An instantiated CUDA graph (from stream capture). ``launch(stream)`` replays it."""

    def __init__(self, graph):
        r = rt()
        self._graph = graph
        try:
            self._exec = check(r.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        except Exception:
            with contextlib.suppress(Exception):
                r.cudaGraphDestroy(graph)
            raise

    def launch(self, stream: CudaStream) -> None:
        check(rt().cudaGraphLaunch(self._exec, stream.handle), "cudaGraphLaunch")

    def close(self) -> None:
        r = rt()
        if getattr(self, "_exec", None) is not None:
            with contextlib.suppress(Exception):
                r.cudaGraphExecDestroy(self._exec)
            self._exec = None
        if getattr(self, "_graph", None) is not None:
            with contextlib.suppress(Exception):
                r.cudaGraphDestroy(self._graph)
            self._graph = None

    def __del__(self):
        self.close()


# ---------------------------------------------------------------------------------------------------------------------
# buffers
# ---------------------------------------------------------------------------------------------------------------------
class _Pool:
    """Freed device allocations by exact size, reused before calling cudaMalloc again."""

    def __init__(self):
        self.free: Dict[int, List[int]] = {}

    def get(self, nbytes: int) -> Optional[int]:
        with _lock:
            lst = self.free.get(nbytes)
            return lst.pop() if lst else None

    def put(self, nbytes: int, ptr: int) -> None:
        with _lock:
            self.free.setdefault(nbytes, []).append(ptr)

    def clear(self) -> None:
        with _lock:
            items = [(n, p) for n, ps in self.free.items() for p in ps]
            self.free = {}
        for _, p in items:
            with contextlib.suppress(Exception):
                rt().cudaFree(p)


_POOL = _Pool()


def _release(cap: int, ptr: int, generation: int) -> None:
    if generation == _generation:
        _POOL.put(cap, ptr)


def empty_cache() -> None:
    """Really free the pooled allocations (synchronises the device)."""
    _POOL.clear()


def _round(n: int) -> int:
    return max(ALIGN, -(-int(n) // ALIGN) * ALIGN)


class DeviceBuffer:
    """One device allocation (cudaMalloc, or a pooled one of the same rounded size). ``ptr`` is its address."""

    def __init__(self, nbytes: int):
        if nbytes < 0:
            raise InputError(f"negative allocation size {nbytes}")
        self.nbytes = int(nbytes)
        self._cap = _round(nbytes)
        ptr = _POOL.get(self._cap)
        if ptr is None:
            ptr = check(rt().cudaMalloc(self._cap), f"cudaMalloc({self._cap} bytes)")
        self.ptr = int(ptr)
        self._finalizer = weakref.finalize(self, _release, self._cap, self.ptr, _generation)

    def free(self) -> None:
        """Return the memory to the pool now (the object must not be used afterwards)."""
        self._finalizer()

    # ---- copies (stream-ordered)
    def copy_from_host(self, a: np.ndarray, stream: CudaStream, offset: int = 0) -> None:
        a = np.ascontiguousarray(a)
        if offset + a.nbytes > self.nbytes:
            raise InputError(f"host copy of {a.nbytes} bytes at offset {offset} exceeds the {self.nbytes}-byte buffer")
        if a.nbytes:
            check(rt().cudaMemcpyAsync(self.ptr + offset, a.ctypes.data, a.nbytes, _kind("cudaMemcpyHostToDevice"),
                                       stream.handle), "cudaMemcpyAsync H2D")

    def copy_to_host(self, out: np.ndarray, stream: CudaStream, offset: int = 0, sync: bool = True) -> np.ndarray:
        if not out.flags.c_contiguous:
            raise InputError("the host destination must be C-contiguous")
        if offset + out.nbytes > self.nbytes:
            raise InputError(f"device copy of {out.nbytes} bytes at offset {offset} exceeds the {self.nbytes}-byte "
                             f"buffer")
        if out.nbytes:
            check(rt().cudaMemcpyAsync(out.ctypes.data, self.ptr + offset, out.nbytes,
                                       _kind("cudaMemcpyDeviceToHost"), stream.handle), "cudaMemcpyAsync D2H")
        if sync:
            stream.synchronize()
        return out

    def copy_from_device(self, src_ptr: int, nbytes: int, stream: CudaStream, offset: int = 0) -> None:
        if offset + nbytes > self.nbytes:
            raise InputError(f"device copy of {nbytes} bytes at offset {offset} exceeds the {self.nbytes}-byte buffer")
        if nbytes:
            check(rt().cudaMemcpyAsync(self.ptr + offset, int(src_ptr), int(nbytes), _kind("cudaMemcpyDeviceToDevice"),
                                       stream.handle), "cudaMemcpyAsync D2D")

    def memset(self, value: int, stream: CudaStream, nbytes: Optional[int] = None, offset: int = 0) -> None:
        n = self.nbytes - offset if nbytes is None else int(nbytes)
        if n:
            check(rt().cudaMemsetAsync(self.ptr + offset, int(value), n, stream.handle), "cudaMemsetAsync")


class HostBuffer:
    """Page-locked host memory (cudaMallocHost): copies from/to it are truly asynchronous and may be captured in
    CUDA graphs. ``array(shape, dtype)`` is a numpy view on it."""

    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        self.ptr = int(check(rt().cudaMallocHost(max(1, self.nbytes)), f"cudaMallocHost({nbytes})"))
        self._finalizer = weakref.finalize(self, _free_host, self.ptr, _generation)

    def array(self, shape, dtype) -> np.ndarray:
        dt = np_dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if n > self.nbytes:
            raise InputError(f"pinned view of {n} bytes exceeds the {self.nbytes}-byte buffer")
        raw = (ctypes.c_char * max(n, 1)).from_address(self.ptr)
        return np.frombuffer(raw, dtype=dt, count=int(np.prod(shape, dtype=np.int64))).reshape(shape)

    def free(self) -> None:
        self._finalizer()


def _free_host(ptr: int, generation: int) -> None:
    if generation == _generation:
        with contextlib.suppress(Exception):
            rt().cudaFreeHost(ptr)


def copy_2d(dst_ptr: int, dpitch: int, src_ptr: int, spitch: int, width: int, height: int, stream: CudaStream,
            kind: str = "cudaMemcpyDeviceToDevice") -> None:
    """``height`` rows of ``width`` bytes, rows ``dpitch`` / ``spitch`` bytes apart (cudaMemcpy2DAsync)."""
    if width > dpitch or width > spitch:
        raise InputError(f"2-D copy: row width {width} exceeds the pitch ({dpitch}, {spitch})")
    if width and height:
        check(rt().cudaMemcpy2DAsync(int(dst_ptr), int(dpitch), int(src_ptr), int(spitch), int(width), int(height),
                                     _kind(kind), stream.handle), "cudaMemcpy2DAsync")


# ---------------------------------------------------------------------------------------------------------------------
# typed arrays
# ---------------------------------------------------------------------------------------------------------------------
class DeviceArray:
    """A C-contiguous typed view on device memory: (owner buffer, byte offset, shape, dtype).

    Supports what the pipeline does with backend arrays: ``.shape``, ``len``, batch-axis slicing ``a[i:j]`` and
    ``a[i]`` (views), ``a[:, k]`` / ``a[:, i:j]`` (copied with one 2-D memcpy), ``to_numpy()``. Arithmetic
    (``+ - *``) goes through the host and returns numpy arrays: latents are tiny and live on the host in the
    TensorRT backend (one host round trip per Euler step, docs/tensorrt.md)."""

    __array_priority__ = 1000                 # numpy defers `ndarray op DeviceArray` to our reflected operators

    def __init__(self, owner: DeviceBuffer, shape: Sequence[int], dtype, stream: CudaStream, offset: int = 0):
        self.owner = owner
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np_dtype(dtype)
        self.stream = stream
        self.offset = int(offset)
        if self.offset + self.nbytes > owner.nbytes:
            raise InputError(f"array of {self.nbytes} bytes at offset {offset} does not fit its {owner.nbytes}-byte "
                             f"buffer")

    # ---- construction
    @classmethod
    def empty(cls, shape, dtype, stream: CudaStream) -> "DeviceArray":
        dt = np_dtype(dtype)
        return cls(DeviceBuffer(int(np.prod(shape, dtype=np.int64)) * dt.itemsize), shape, dt, stream)

    @classmethod
    def from_numpy(cls, a: np.ndarray, stream: CudaStream, dtype=None) -> "DeviceArray":
        a = np.ascontiguousarray(a, dtype=np_dtype(dtype) if dtype is not None else None)
        out = cls.empty(a.shape, a.dtype, stream)
        out.owner.copy_from_host(a, stream, out.offset)
        return out

    # ---- properties
    @property
    def ptr(self) -> int:
        return self.owner.ptr + self.offset

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype.name}, ptr=0x{self.ptr:x})"

    def _row_bytes(self, axis: int) -> int:
        return int(np.prod(self.shape[axis + 1:], dtype=np.int64)) * self.dtype.itemsize

    # ---- host transfer
    def to_numpy(self, out: Optional[np.ndarray] = None) -> np.ndarray:
        if out is None:
            out = np.empty(self.shape, self.dtype)
        elif out.shape != self.shape or out.dtype != self.dtype:
            raise InputError(f"out has shape {out.shape}/{out.dtype}, the array {self.shape}/{self.dtype}")
        return self.owner.copy_to_host(out, self.stream, self.offset)

    def __array__(self, dtype=None, copy=None):
        a = self.to_numpy()
        return a if dtype is None else a.astype(dtype)

    def copy_from(self, src) -> None:
        """Fill from a numpy array or a DeviceArray of the same byte size (stream-ordered)."""
        if isinstance(src, DeviceArray):
            if src.nbytes != self.nbytes:
                raise InputError(f"copy of {src.nbytes} bytes into a {self.nbytes}-byte array")
            self.owner.copy_from_device(src.ptr, src.nbytes, self.stream, self.offset)
        else:
            a = np.ascontiguousarray(src, dtype=self.dtype)
            if a.nbytes != self.nbytes:
                raise InputError(f"copy of {a.shape} into an array of shape {self.shape}")
            self.owner.copy_from_host(a, self.stream, self.offset)

    def view(self, shape, dtype=None, offset_bytes: int = 0) -> "DeviceArray":
        return DeviceArray(self.owner, shape, dtype or self.dtype, self.stream, self.offset + offset_bytes)

    def copy(self) -> "DeviceArray":
        """A new array with the same content (one stream-ordered device-to-device copy)."""
        out = DeviceArray.empty(self.shape, self.dtype, self.stream)
        out.copy_from(self)
        return out

    # ---- indexing
    def __getitem__(self, key) -> "DeviceArray":
        key = key if isinstance(key, tuple) else (key,)
        if len(key) > 2 or self.ndim < len(key) or any(k is Ellipsis or k is None for k in key):
            raise InputError(f"DeviceArray supports indexing on the first two axes only, got {key!r}")
        ranges = []
        for axis, k in enumerate(key):
            n = self.shape[axis]
            if isinstance(k, (int, np.integer)):
                i = int(k) + n if k < 0 else int(k)
                if not 0 <= i < n:
                    raise IndexError(f"index {k} out of range for axis {axis} of size {n}")
                ranges.append((i, i + 1, True))
            elif isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step != 1:
                    raise InputError("DeviceArray slices must have step 1")
                ranges.append((start, max(start, stop), False))
            else:
                raise InputError(f"unsupported DeviceArray index {k!r}")
        (a0, b0, int0) = ranges[0]
        if len(ranges) == 1 or (ranges[1][0] == 0 and ranges[1][1] == self.shape[1] and not ranges[1][2]):
            shape = ((b0 - a0,) if not int0 else ()) + self.shape[1:]
            return self.view(shape, offset_bytes=a0 * self._row_bytes(0))
        (a1, b1, int1) = ranges[1]
        rows = b0 - a0
        shape = ((rows,) if not int0 else ()) + ((b1 - a1,) if not int1 else ()) + self.shape[2:]
        src = self.ptr + a0 * self._row_bytes(0) + a1 * self._row_bytes(1)
        width = (b1 - a1) * self._row_bytes(1)
        if rows <= 1:                         # one row: the block is contiguous, a view will do
            return self.view(shape, offset_bytes=src - self.ptr)
        out = DeviceArray.empty(shape, self.dtype, self.stream)
        copy_2d(out.ptr, width, src, self._row_bytes(0), width, rows, self.stream)
        return out

    # ---- arithmetic through the host (latents are host arrays in the TensorRT backend; this is a fallback)
    def _host(self, other):
        return other.to_numpy() if isinstance(other, DeviceArray) else other

    def __add__(self, o):
        return self.to_numpy() + self._host(o)

    def __radd__(self, o):
        return self._host(o) + self.to_numpy()

    def __sub__(self, o):
        return self.to_numpy() - self._host(o)

    def __rsub__(self, o):
        return self._host(o) - self.to_numpy()

    def __mul__(self, o):
        return self.to_numpy() * self._host(o)

    def __rmul__(self, o):
        return self._host(o) * self.to_numpy()


def concat(parts: Sequence, axis: int, stream: CudaStream, dtype=None, out: Optional[DeviceArray] = None
           ) -> DeviceArray:
    """Concatenate numpy arrays and DeviceArrays along axis 0 or 1 into one DeviceArray (H2D / D2D 2-D copies).
    All parts must share the other dimensions; numpy parts are converted to ``dtype`` (default: the first
    DeviceArray's dtype, else the first part's)."""
    if not parts:
        raise InputError("nothing to concatenate")
    if axis not in (0, 1):
        raise InputError("concat supports axis 0 or 1")
    dev = [p for p in parts if isinstance(p, DeviceArray)]
    dt = np_dtype(dtype) if dtype is not None else (dev[0].dtype if dev else np.asarray(parts[0]).dtype)
    shapes = [tuple(p.shape) for p in parts]
    rest = [s[:axis] + s[axis + 1:] for s in shapes]
    if any(r != rest[0] for r in rest):
        raise InputError(f"concat: shapes {shapes} differ outside axis {axis}")
    total = sum(s[axis] for s in shapes)
    shape = list(shapes[0])
    shape[axis] = total
    if out is None:
        out = DeviceArray.empty(shape, dt, stream)
    elif out.shape != tuple(shape) or out.dtype != dt:
        raise InputError(f"concat: out has shape {out.shape}/{out.dtype}, need {tuple(shape)}/{dt}")
    rows = int(np.prod(shape[:axis], dtype=np.int64))                        # 1 for axis 0
    dst_pitch = out._row_bytes(axis - 1) if axis else out.nbytes
    pos = 0
    for p, s in zip(parts, shapes):
        width = int(np.prod(s[axis:], dtype=np.int64)) * dt.itemsize
        dst = out.ptr + pos * int(np.prod(s[axis + 1:], dtype=np.int64)) * dt.itemsize
        if isinstance(p, DeviceArray):
            if p.dtype != dt:
                p = np.ascontiguousarray(p.to_numpy(), dtype=dt)
            else:
                copy_2d(dst, dst_pitch, p.ptr, width, width, rows, stream)
        if not isinstance(p, DeviceArray):
            a = np.ascontiguousarray(p, dtype=dt)
            copy_2d(dst, dst_pitch, a.ctypes.data, width, width, rows, stream, kind="cudaMemcpyHostToDevice")
        pos += s[axis]
    return out


def repeat_batch(a: DeviceArray, n: int, out: Optional[DeviceArray] = None) -> DeviceArray:
    """(1, ...) -> (n, ...) with n D2D copies."""
    if a.shape[0] != 1:
        raise InputError(f"repeat_batch expects a batch of 1, got {a.shape}")
    shape = (int(n),) + a.shape[1:]
    if out is None:
        out = DeviceArray.empty(shape, a.dtype, a.stream)
    elif out.shape != shape or out.dtype != a.dtype:
        raise InputError(f"repeat_batch: out has shape {out.shape}, need {shape}")
    for i in range(int(n)):
        out.owner.copy_from_device(a.ptr, a.nbytes, a.stream, out.offset + i * a.nbytes)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------------------------------
class DeviceKVCache:
    """Per layer K and V device buffers (B, Hkv, T, Dh), T = max_context, preallocated once and zeroed; new entries
    are written by position with one 2-D copy per tensor (no reallocation, no concatenation)."""

    def __init__(self, batch: int, max_len: int, layers: int, kv_heads: int, head_dim: int, dtype, stream: CudaStream):
        self.stream = stream
        self.dtype = np_dtype(dtype)
        shape = (int(batch), int(kv_heads), int(max_len), int(head_dim))
        self.k = [DeviceArray.empty(shape, self.dtype, stream) for _ in range(layers)]
        self.v = [DeviceArray.empty(shape, self.dtype, stream) for _ in range(layers)]
        for a in self.k + self.v:
            a.owner.memset(0, stream)

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k + self.v)

    def past(self, layer: int, kind: str, batch: int) -> DeviceArray:
        """The first ``batch`` rows of the whole buffer (leading-axis slice: contiguous)."""
        buf = (self.k if kind == "key" else self.v)[layer]
        return buf[:batch]

    def write(self, layer: int, kind: str, present: DeviceArray, start: int) -> None:
        """cache[layer][:b, :, start:start+S] = present (b, Hkv, S, Dh)."""
        buf = (self.k if kind == "key" else self.v)[layer]
        b, h, s, d = present.shape
        _, hh, t, dd = buf.shape
        if h != hh or d != dd or b > buf.shape[0]:
            raise InputError(f"present {present.shape} does not fit the cache {buf.shape}")
        if start < 0 or start + s > t:
            raise InputError(f"KV cache overflow: positions {start}..{start + s - 1} do not fit {t} slots")
        if present.dtype != self.dtype:
            raise InputError(f"present dtype {present.dtype} differs from the cache dtype {self.dtype}")
        es = self.dtype.itemsize
        copy_2d(buf.ptr + start * d * es, t * d * es, present.ptr, s * d * es, s * d * es, b * h, self.stream)

    def clear(self) -> None:
        for a in self.k + self.v:
            a.owner.memset(0, self.stream)


# ---------------------------------------------------------------------------------------------------------------------
# arena
# ---------------------------------------------------------------------------------------------------------------------
class DeviceArena:
    """One allocation handed out in 256-byte aligned pieces. The TensorRT backend sizes it to the largest
    activation requirement of all its execution contexts and points every context at its start: stages run one
    after another on one stream, so they can share the memory."""

    def __init__(self, nbytes: int):
        self.buffer = DeviceBuffer(max(int(nbytes), 1))
        self._used = 0

    @property
    def ptr(self) -> int:
        return self.buffer.ptr

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    @property
    def used(self) -> int:
        return self._used

    def alloc(self, nbytes: int, align: int = ALIGN) -> int:
        """Address of ``nbytes`` bytes inside the arena (bump allocation; ``reset()`` frees everything)."""
        start = -(-self._used // align) * align
        if start + nbytes > self.nbytes:
            raise CheersError(f"device arena of {self.nbytes} bytes exhausted ({start} used, {nbytes} requested)")
        self._used = start + int(nbytes)
        return self.ptr + start

    def reset(self) -> None:
        self._used = 0

    def free(self) -> None:
        self.buffer.free()
