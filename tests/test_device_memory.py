"""cheers_deploy.trt.device_memory: buffers, arrays, KV cache writes by position, arena, stream capture.

Two layers of tests:
* `gpu` tests run the module on a real CUDA device through cuda-python (skipped here: "needs a CUDA GPU and
  cuda-python");
* the same logic also runs on `FakeCudart`, a host-memory stand-in with cuda-python's function signatures
  (cudaMalloc returns real host addresses, copies are memmove, stream capture records and replays), so pitch
  and offset arithmetic is checked on every machine. FakeCudart lives in tests/fakes/cuda.py (test_trt.py uses it too).
"""
import numpy as np
import pytest

from cheers_deploy.trt import compat
from cheers_deploy.trt import device_memory as dm
from fakes.cuda import FakeCudart  # (tests/ is on sys.path)

GPU = compat.cuda_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU and cuda-python")


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


def test_failed_capture_clears_the_last_error(runtime):
    """A capture-unsafe call (cudaMalloc) fails the capture; capture() ends it and, as trtexec does, resets the
    calling thread's 'last error' of cuda-python's runtime (and of every shared libcudart in the process), so the
    next call does not see the stale error."""
    s = dm.CudaStream()
    if runtime is not None:
        runtime.libcudart.record(900)                  # what a capture-unsafe call inside TensorRT leaves there
    with pytest.raises(compat.CudaError, match="cudaMalloc"):
        with s.capture() as cap:
            dm.DeviceBuffer(12345 * 256 + 7)           # a size the pool does not hold: a real cudaMalloc
    assert cap.graph is None and cap.cleared.get("cuda-python", 0) != 0
    assert dm.clear_last_errors().get("cuda-python", 0) == 0           # nothing left behind
    if runtime is not None:
        assert not runtime.capturing and runtime.last_error == 0
        assert cap.cleared["libcudart.so.12"] == 900 and runtime.libcudart.last_error == 0
    buf = dm.DeviceBuffer(64)                          # the stream and the runtime work again
    buf.memset(0, s)
    s.synchronize()


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
