"""A host-memory stand-in for cuda-python's cudart: `FakeCudart` has cuda-python's function signatures
(cudaMalloc returns real host addresses, 256-byte aligned like the real one; copies are memmove; stream capture
records and replays), so code written against cudart (cheers_deploy.trt.device_memory, the TensorRT backend) runs
on every machine. Like CUDA, a capture that is not in relaxed mode forbids capture-unsafe calls (cudaMalloc,
cudaFree, synchronous copies, synchronising the capturing stream): they fail with
cudaErrorStreamCaptureUnsupported and invalidate the capture (cudaStreamEndCapture then fails with
cudaErrorStreamCaptureInvalidated).

Like CUDA, every failing call also records its error as the runtime's "last error", which stays until
cudaGetLastError() reads it (cudaPeekAtLastError() reads without resetting). Two runtimes with separate last errors,
as in a real process: FakeCudart itself is cuda-python's (which links the CUDA runtime statically), and
`FakeCudart.libcudart` (a `FakeLibcudart`, what `process_runtimes()` returns) is the shared libcudart.so that TensorRT
plugins call through ctypes-like functions returning plain ints.
Used by tests/test_device_memory.py and tests/test_trt.py."""
import ctypes
import enum
import itertools

import numpy as np


class _Kind(enum.IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3
    cudaMemcpyDefault = 4


class _Err(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2
    cudaErrorIllegalState = 401
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901


ALIGN = 256                           # cudaMalloc returns at least 256-byte aligned addresses


class _Mode(enum.IntEnum):
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1
    cudaStreamCaptureModeRelaxed = 2


class _Stream:
    _ids = itertools.count(1)

    def __init__(self):
        self.id = next(self._ids)

    def __int__(self):
        return self.id


class _Props:
    def __init__(self, name, major, minor, mem):
        self.name, self.major, self.minor, self.totalGlobalMem, self.integrated = name, major, minor, mem, 1


class FakeLibcudart:
    """The shared libcudart.so.N of the process as ctypes sees it: functions return an int; own last error."""

    soname = "libcudart.so.12"

    def __init__(self):
        self.last_error = 0

    def record(self, err) -> int:
        self.last_error = int(err)
        return int(err)

    def cudaGetLastError(self) -> int:
        err, self.last_error = self.last_error, 0
        return err

    def cudaPeekAtLastError(self) -> int:
        return self.last_error


class FakeCudart:
    """cuda-python's cudart subset on host memory. Work enqueued on a capturing stream is recorded and replayed
    by cudaGraphLaunch; `enqueue(stream, fn)` lets fake engines join that protocol."""

    cudaMemcpyKind = _Kind
    cudaStreamCaptureMode = _Mode
    cudaError_t = _Err
    cudaStreamNonBlocking = 1

    def __init__(self, name=b"Fake Orin", cc=(8, 7)):
        self.mem = {}                 # address -> numpy backing array (device allocations)
        self.host = {}                # pinned host allocations
        self.capturing = {}           # stream id -> list of recorded ops
        self.capture_mode = {}        # stream id -> capture mode
        self.invalidated = set()      # stream ids whose capture saw a capture-unsafe call
        self.name, self.cc = name, cc
        self.calls = {"malloc": 0, "memcpy2d": 0, "graph_launch": 0, "instantiate": 0, "unsafe_in_capture": 0}
        self.last_error = 0           # cuda-python's own runtime state
        self.libcudart = FakeLibcudart()

    def _fail(self, err):
        """Return `err` the way CUDA does: also recorded as the last error."""
        self.last_error = int(err)
        return err

    def process_runtimes(self):
        """The shared CUDA runtimes loaded in this 'process' (device_memory.clear_last_errors resets them)."""
        return [(self.libcudart.soname, self.libcudart)]

    def cudaGetLastError(self):
        err, self.last_error = self.last_error, 0
        return (_Err(err),)

    def cudaPeekAtLastError(self):
        return (_Err(self.last_error),)

    # -- helpers
    def enqueue(self, stream, fn):
        sid = int(stream) if stream is not None else 0
        if sid in self.capturing:
            self.capturing[sid].append(fn)
        else:
            fn()
        return 0

    def _unsafe(self):
        """A capture-unsafe call: refused (and the capture invalidated) while a non-relaxed capture runs."""
        strict = [s for s, m in self.capture_mode.items() if m != _Mode.cudaStreamCaptureModeRelaxed]
        if not strict:
            return False
        self.calls["unsafe_in_capture"] += 1
        self.invalidated.update(strict)
        return True

    def _alloc(self, table, n):
        n = max(int(n), 1)
        raw = np.zeros(n + ALIGN, np.uint8)
        skip = (-raw.ctypes.data) % ALIGN
        buf = raw[skip:skip + n]                                # keeps `raw` alive through .base
        addr = buf.ctypes.data
        assert addr % ALIGN == 0
        table[addr] = buf
        return addr

    def _check_dev(self, ptr, n):
        for base, buf in self.mem.items():
            if base <= ptr and ptr + n <= base + buf.size:
                return
        raise AssertionError(f"device access 0x{ptr:x}+{n} outside every allocation")

    # -- device
    def cudaGetDeviceCount(self):
        return 0, 1

    def cudaSetDevice(self, d):
        return (0,)

    def cudaGetDeviceProperties(self, d):
        return 0, _Props(self.name, *self.cc, 8 << 30)

    def cudaDriverGetVersion(self):
        return 0, 12060

    def cudaRuntimeGetVersion(self):
        return 0, 12060

    def cudaMemGetInfo(self):
        return 0, 4 << 30, 8 << 30

    # -- memory
    def cudaMalloc(self, n):
        if self._unsafe():
            return self._fail(_Err.cudaErrorStreamCaptureUnsupported), None
        self.calls["malloc"] += 1
        return 0, self._alloc(self.mem, n)

    def cudaFree(self, p):
        if self._unsafe():
            return (self._fail(_Err.cudaErrorStreamCaptureUnsupported),)
        self.mem.pop(int(p), None)
        return (0,)

    def cudaMallocHost(self, n):
        if self._unsafe():
            return self._fail(_Err.cudaErrorStreamCaptureUnsupported), None
        return 0, self._alloc(self.host, n)

    def cudaFreeHost(self, p):
        if self._unsafe():
            return (self._fail(_Err.cudaErrorStreamCaptureUnsupported),)
        self.host.pop(int(p), None)
        return (0,)

    def _copy(self, dst, src, n, kind):
        if kind in (_Kind.cudaMemcpyHostToDevice, _Kind.cudaMemcpyDeviceToDevice):
            self._check_dev(dst, n)
        if kind in (_Kind.cudaMemcpyDeviceToHost, _Kind.cudaMemcpyDeviceToDevice):
            self._check_dev(src, n)
        ctypes.memmove(dst, src, n)

    def cudaMemcpy(self, dst, src, n, kind):
        if self._unsafe():                                      # synchronous: not capturable
            return (self._fail(_Err.cudaErrorStreamCaptureUnsupported),)
        self._copy(int(dst), int(src), int(n), kind)
        return (0,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        if kind == _Kind.cudaMemcpyHostToDevice and int(stream) not in self.capturing:
            data = ctypes.string_at(int(src), int(n))          # pageable source: staged at call time
            return self.enqueue(stream, lambda: self._copy_bytes(int(dst), data)),
        return self.enqueue(stream, lambda: self._copy(int(dst), int(src), int(n), kind)),

    def _copy_bytes(self, dst, data):
        self._check_dev(dst, len(data))
        ctypes.memmove(dst, data, len(data))

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        assert width <= dpitch and width <= spitch
        self.calls["memcpy2d"] += 1

        def run():
            for r in range(int(height)):
                self._copy(int(dst) + r * int(dpitch), int(src) + r * int(spitch), int(width), kind)
        return self.enqueue(stream, run),

    def cudaMemsetAsync(self, ptr, value, n, stream):
        def run():
            self._check_dev(int(ptr), int(n))
            ctypes.memset(int(ptr), int(value), int(n))
        return self.enqueue(stream, run),

    # -- streams and graphs
    def cudaStreamCreateWithFlags(self, flags):
        return 0, _Stream()

    def cudaStreamSynchronize(self, s):
        if int(s) in self.capturing:
            self.invalidated.add(int(s))
            return (self._fail(_Err.cudaErrorStreamCaptureUnsupported),)
        return (0,)

    def cudaStreamDestroy(self, s):
        return (0,)

    def cudaStreamBeginCapture(self, s, mode):
        if int(s) in self.capturing:                            # already capturing
            return (self._fail(_Err.cudaErrorIllegalState),)
        self.capturing[int(s)] = []
        self.capture_mode[int(s)] = _Mode(int(mode))
        return (0,)

    def cudaStreamEndCapture(self, s):
        if int(s) not in self.capturing:
            return self._fail(_Err.cudaErrorIllegalState), None
        ops = self.capturing.pop(int(s))
        self.capture_mode.pop(int(s), None)
        if int(s) in self.invalidated:
            self.invalidated.discard(int(s))
            return self._fail(_Err.cudaErrorStreamCaptureInvalidated), None
        return 0, list(ops)

    def cudaGraphInstantiate(self, graph, flags):
        self.calls["instantiate"] += 1
        return 0, ("exec", graph)

    def cudaGraphLaunch(self, exe, stream):
        self.calls["graph_launch"] += 1
        for fn in exe[1]:
            self.enqueue(stream, fn)
        return (0,)

    def cudaGraphExecDestroy(self, e):
        return (0,)

    def cudaGraphDestroy(self, g):
        return (0,)
