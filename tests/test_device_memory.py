"""cheers_deploy.runtime.device_memory: buffers, arrays, KV cache writes by position, arena, stream capture.

Two layers of tests:
* `gpu` tests run the module on a real CUDA device through cuda-python (skipped here: "needs a CUDA GPU and
  cuda-python");
* the same logic also runs on `FakeCudart`, a host-memory stand-in with cuda-python's function signatures
  (cudaMalloc returns real host addresses, copies are memmove, stream capture records and replays), so pitch
  and offset arithmetic is checked on every machine. tests/test_trt.py reuses FakeCudart.
"""
import ctypes
import enum
import itertools

import numpy as np
import pytest

from cheers_deploy.engines import compat
from cheers_deploy.runtime import device_memory as dm

GPU = compat.cuda_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU and cuda-python")


# ------------------------------------------------------------------------------------------------------ fake runtime
class _Kind(enum.IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3
    cudaMemcpyDefault = 4


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


class FakeCudart:
    """cuda-python's cudart subset on host memory. Work enqueued on a capturing stream is recorded and replayed
    by cudaGraphLaunch; `enqueue(stream, fn)` lets fake engines join that protocol."""

    cudaMemcpyKind = _Kind
    cudaStreamCaptureMode = _Mode
    cudaStreamNonBlocking = 1

    def __init__(self, name=b"Fake Orin", cc=(8, 7)):
        self.mem = {}                 # address -> numpy backing array (device allocations)
        self.host = {}                # pinned host allocations
        self.capturing = {}           # stream id -> list of recorded ops
        self.name, self.cc = name, cc
        self.calls = {"malloc": 0, "memcpy2d": 0, "graph_launch": 0, "instantiate": 0}

    # -- helpers
    def enqueue(self, stream, fn):
        sid = int(stream) if stream is not None else 0
        if sid in self.capturing:
            self.capturing[sid].append(fn)
        else:
            fn()
        return 0

    def _alloc(self, table, n):
        buf = np.zeros(max(int(n), 1), np.uint8)
        addr = buf.ctypes.data
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
        self.calls["malloc"] += 1
        return 0, self._alloc(self.mem, n)

    def cudaFree(self, p):
        self.mem.pop(int(p), None)
        return (0,)

    def cudaMallocHost(self, n):
        return 0, self._alloc(self.host, n)

    def cudaFreeHost(self, p):
        self.host.pop(int(p), None)
        return (0,)

    def _copy(self, dst, src, n, kind):
        if kind in (_Kind.cudaMemcpyHostToDevice, _Kind.cudaMemcpyDeviceToDevice):
            self._check_dev(dst, n)
        if kind in (_Kind.cudaMemcpyDeviceToHost, _Kind.cudaMemcpyDeviceToDevice):
            self._check_dev(src, n)
        ctypes.memmove(dst, src, n)

    def cudaMemcpy(self, dst, src, n, kind):
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
        return (0,)

    def cudaStreamDestroy(self, s):
        return (0,)

    def cudaStreamBeginCapture(self, s, mode):
        assert int(s) not in self.capturing, "nested capture"
        self.capturing[int(s)] = []
        return (0,)

    def cudaStreamEndCapture(self, s):
        return 0, list(self.capturing.pop(int(s)))

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


@pytest.fixture
def fake():
    f = FakeCudart()
    prev = dm.use_runtime(f)
    yield f
    dm.use_runtime(prev)


@pytest.fixture(params=["fake", pytest.param("gpu", marks=[needs_gpu, pytest.mark.gpu])])
def runtime(request):
    """The module on the host stand-in, and (where there is one) on a real GPU."""
    if request.param == "fake":
        f = FakeCudart()
        prev = dm.use_runtime(f)
        yield f
        dm.use_runtime(prev)
    else:
        prev = dm.use_runtime(None)
        dm.set_device(0)
        yield None
        dm.empty_cache()
        dm.use_runtime(prev)


# ------------------------------------------------------------------------------------------------------ tests
def test_buffer_roundtrip_and_memset(runtime):
    s = dm.CudaStream()
    a = np.arange(1000, dtype=np.float32)
    buf = dm.DeviceBuffer(a.nbytes)
    buf.copy_from_host(a, s)
    out = np.empty_like(a)
    buf.copy_to_host(out, s)
    assert np.array_equal(out, a)
    buf.memset(0, s, nbytes=400, offset=0)
    buf.copy_to_host(out, s)
    assert np.all(out[:100] == 0) and np.array_equal(out[100:], a[100:])
    other = dm.DeviceBuffer(a.nbytes)
    other.copy_from_device(buf.ptr + 400, 400, s)
    got = np.empty(100, np.float32)
    other.copy_to_host(got, s)
    assert np.array_equal(got, a[100:200])
    with pytest.raises(Exception, match="exceeds"):
        buf.copy_from_host(np.zeros(2000, np.float32), s)


def test_pool_reuses_freed_allocations(fake):
    s = dm.CudaStream()
    b = dm.DeviceBuffer(1000)
    p = b.ptr
    b.free()
    assert dm.DeviceBuffer(1000).ptr == p and fake.calls["malloc"] == 1     # same rounded size: reused
    keep = dm.DeviceBuffer(1000)
    assert dm.DeviceBuffer(1000).ptr != keep.ptr and fake.calls["malloc"] == 2
    dm.DeviceArray.empty((4, 4), "float32", s)                                # 64 B -> its own 256 B bin
    assert fake.calls["malloc"] == 3


def test_array_indexing(runtime):
    s = dm.CudaStream()
    a = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
    d = dm.DeviceArray.from_numpy(a, s)
    assert d.shape == (2, 5, 3) and len(d) == 2
    assert np.array_equal(d[1:2].to_numpy(), a[1:2])
    assert np.array_equal(d[0].to_numpy(), a[0])
    assert np.array_equal(d[:, -1].to_numpy(), a[:, -1])          # strided: one 2-D copy
    assert np.array_equal(d[:, 1:3].to_numpy(), a[:, 1:3])
    assert np.array_equal(d[1:, 2].to_numpy(), a[1:, 2])             # one row: a view
    assert np.array_equal(np.asarray(d), a)
    # arithmetic goes through the host and returns numpy
    r = d[0:1] + (d[1:2] - d[0:1]) * 2.0
    assert isinstance(r, np.ndarray) and np.array_equal(r, a[0:1] + (a[1:2] - a[0:1]) * 2.0)
    with pytest.raises(Exception):
        d[::2]


def test_concat_and_repeat(runtime):
    s = dm.CudaStream()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 4)).astype(np.float32)
    y = rng.standard_normal((1, 2, 4)).astype(np.float32)
    dy = dm.DeviceArray.from_numpy(y, s)
    seq = dm.concat([x, dy, x], axis=1, stream=s)
    assert np.array_equal(seq.to_numpy(), np.concatenate([x, y, x], axis=1))
    batch = dm.concat([seq, np.concatenate([x, y, x], axis=1) * 2], axis=0, stream=s)
    assert np.array_equal(batch.to_numpy(), np.concatenate([seq.to_numpy(), seq.to_numpy() * 2], axis=0))
    rep = dm.repeat_batch(dy, 3)
    assert np.array_equal(rep.to_numpy(), np.repeat(y, 3, axis=0))
    # float64 host parts are converted to the device dtype
    mixed = dm.concat([x.astype(np.float64), dy], axis=1, stream=s)
    assert mixed.dtype == np.float32 and np.allclose(mixed.to_numpy(), np.concatenate([x, y], axis=1))


def test_kv_cache_writes_by_position(runtime):
    s = dm.CudaStream()
    b, h, t, d = 2, 3, 16, 4
    cache = dm.DeviceKVCache(b, t, layers=2, kv_heads=h, head_dim=d, dtype="float16", stream=s)
    ref_k = np.zeros((b, h, t, d), np.float16)
    rng = np.random.default_rng(1)
    start = 0
    for sl in (5, 1, 1, 4):
        pres = rng.standard_normal((b, h, sl, d)).astype(np.float16)
        cache.write(1, "key", dm.DeviceArray.from_numpy(pres, s), start)
        ref_k[:, :, start:start + sl] = pres
        start += sl
    assert np.array_equal(cache.k[1].to_numpy(), ref_k)
    assert not cache.k[0].to_numpy().any() and not cache.v[1].to_numpy().any()
    # a smaller batch writes the leading rows only; past() is the contiguous leading slice
    pres = rng.standard_normal((1, h, 2, d)).astype(np.float16)
    cache.write(0, "value", dm.DeviceArray.from_numpy(pres, s), 7)
    got = cache.v[0].to_numpy()
    assert np.array_equal(got[0, :, 7:9], pres[0]) and not got[1].any()
    assert cache.past(0, "value", 1).shape == (1, h, t, d) and cache.past(0, "value", 1).ptr == cache.v[0].ptr
    with pytest.raises(Exception, match="overflow"):
        cache.write(0, "key", dm.DeviceArray.from_numpy(np.zeros((b, h, 3, d), np.float16), s), 14)
    with pytest.raises(Exception, match="dtype"):
        cache.write(0, "key", dm.DeviceArray.from_numpy(np.zeros((b, h, 1, d), np.float32), s), 0)
    assert cache.nbytes == 4 * b * h * t * d * 2


def test_arena(runtime):
    arena = dm.DeviceArena(4096)
    p1 = arena.alloc(100)
    p2 = arena.alloc(100)
    assert p1 == arena.ptr and p2 == arena.ptr + 256 and arena.used == 356
    with pytest.raises(Exception, match="exhausted"):
        arena.alloc(4000)
    arena.reset()
    assert arena.alloc(4096) == arena.ptr


def test_pinned_host_buffer(runtime):
    s = dm.CudaStream()
    hb = dm.HostBuffer(64)
    v = hb.array((4, 4), "float32")
    v[:] = np.arange(16, dtype=np.float32).reshape(4, 4)
    d = dm.DeviceArray.empty((4, 4), "float32", s)
    d.owner.copy_from_host(v, s)
    assert np.array_equal(d.to_numpy(), v)


def test_stream_capture_replays(runtime):
    """A captured D2D copy replays with whatever the source holds at launch time."""
    s = dm.CudaStream()
    src = dm.DeviceArray.from_numpy(np.zeros(8, np.float32), s)
    dst = dm.DeviceArray.empty((8,), "float32", s)
    with s.capture() as cap:
        dst.owner.copy_from_device(src.ptr, src.nbytes, s)
    for k in (1.0, 2.0):
        src.copy_from(np.full(8, k, np.float32))
        cap.graph.launch(s)
        assert np.array_equal(dst.to_numpy(), np.full(8, k, np.float32))
    cap.graph.close()


def test_capture_ends_on_error(fake):
    s = dm.CudaStream()
    with pytest.raises(RuntimeError):
        with s.capture():
            raise RuntimeError("boom")
    assert not fake.capturing                                      # the stream is usable again
    buf = dm.DeviceBuffer(16)
    buf.memset(1, s)


def test_cuda_errors_are_cheers_errors(fake):
    def failing(n):
        return 2, None                                             # cudaErrorMemoryAllocation
    fake.cudaMalloc = failing
    with pytest.raises(compat.CudaError, match="cudaMalloc"):
        dm.DeviceBuffer(1 << 40)


@needs_gpu
@pytest.mark.gpu
def test_gpu_identity_through_cuda_python():
    info = compat.gpu_info(0)
    assert info["name"] and info["sm"].startswith("sm") and info["total_memory"] > 0
    free, total = dm.mem_info()
    assert 0 < free <= total
