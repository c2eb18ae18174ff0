#!/usr/bin/env python3
"""GPU correctness and speed check of the fused hi-gate kernel (engines/plugins/gated_residual).

    out = LayerNorm(low + (dot(SiLU(h), w2) + b2) * high) * ln_w + ln_b          (docs/architecture.md §10)

For every case (dtype x C x rows) it draws fresh random inputs on the GPU, poisons the output with NaN, runs the
kernel and compares with the float64 numpy reference computed from the same (rounded) inputs:
    normwise relative error  max|out - ref| / max|ref|  <=  1e-5 (fp32), 2e-3 (fp16), 1e-2 (bf16); any NaN fails.
Then it times the kernel (CUDA events, median) with a warm L2 (back-to-back launches) and a cold L2 (a 256 MiB
scratch write before each launch), times the unfused composition
    F.layer_norm(low + (F.silu(h) @ w2[:, None] + b2) * high, (C,), ln_w, ln_b, eps)
and relates the achieved bandwidth (bytes read + written / cold time) to a measured device-to-device copy.

Kernel backends (the same .cu / .cuh sources):
  ctypes  nvcc builds libcheers_gated_residual_kernel.so for this GPU; gated_residual_forward() is called through
          ctypes (the exact launcher the TensorRT plugin calls)
  cupy    CuPy RawModule(code=gated_residual_kernel.cuh) via NVRTC, launch configuration from the Python mirror
          plugin_build.kernel_launch_config(); also runs the extern "C" gated_residual_<dt> streaming entries
Device buffers / timing / the unfused reference use torch when it has CUDA, else CuPy (no bf16 then).

Usage (repository root):
  python engines/plugins/gated_residual/testing/gpu_kernel_check.py [--out PATH] [--backend auto|ctypes|cupy|all] [--quick]
  python engines/plugins/gated_residual/testing/gpu_kernel_check.py --cpu-selftest        # no GPU: checks the comparison / reference logic
Writes JSON (default bench/results/gated_residual_<date>.json), prints a table, exits 1 on any correctness failure,
2 when it cannot run (no GPU, no backend).

One file (over 400 lines): a self-contained script that is copied to a GPU machine and run alone (ctypes and CuPy
paths, references, timings, JSON), so it carries its own helpers.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[4]   # engines/plugins/gated_residual/testing -> repository root
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from cheers_deploy import fileio  # noqa: E402
from cheers_deploy.build import plugin_build as pb  # noqa: E402  (numpy-only module)

TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}
EPS = 1e-5
THREADS_PER_BLOCK = 128  # cheers_gr::kThreadsPerBlock
ROWS_PER_BLOCK = 4       # cheers_gr::kRowsPerBlock
_CUDA_T = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}
_SHORT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


# ---------------------------------------------------------------------------------------------------------------------
# comparison (shared by the GPU run and --cpu-selftest)
# ---------------------------------------------------------------------------------------------------------------------
def compare(out64: np.ndarray, ref64: np.ndarray, dtype: str) -> dict:
    """Error summary of a kernel output (already converted to float64) against the float64 reference."""
    out64 = np.asarray(out64, dtype=np.float64)
    ref64 = np.asarray(ref64, dtype=np.float64)
    if out64.shape != ref64.shape:
        return {"ok": False, "reason": f"shape {out64.shape} != {ref64.shape}", "nan_count": -1,
                "max_abs_err": math.inf, "max_rel_err": math.inf, "tol": TOLERANCE[dtype]}
    nan_count = int(np.count_nonzero(~np.isfinite(out64)))
    diff = np.abs(out64 - ref64)
    max_abs = float(np.max(diff)) if diff.size else 0.0
    scale = float(np.max(np.abs(ref64))) if ref64.size else 1.0
    max_rel = max_abs / max(scale, 1e-30)
    if nan_count:
        max_abs = max_rel = math.inf
    tol = TOLERANCE[dtype]
    ok = nan_count == 0 and max_rel <= tol
    res = {"ok": bool(ok), "nan_count": nan_count, "max_abs_err": max_abs, "max_rel_err": max_rel, "tol": tol,
           "ref_max_abs": scale}
    if not ok:
        res["reason"] = "non-finite output" if nan_count else f"max_rel_err {max_rel:.3e} > {tol:.0e}"
    return res


def float32_emulation(low, high, h, w2, b2, ln_w, ln_b, eps=EPS) -> np.ndarray:
    """The kernel's algorithm in numpy float32 (order of summation differs): shows the size of an fp32 error."""
    f = np.float32
    low, high, h = (np.asarray(a, dtype=f) for a in (low, high, h))
    w2, ln_w, ln_b = (np.asarray(a, dtype=f).reshape(-1) for a in (w2, ln_w, ln_b))
    b2 = f(np.asarray(b2, dtype=f).reshape(-1)[0])
    with np.errstate(over="ignore"):
        silu = h / (f(1) + np.exp(-h))
    g = (silu * w2).sum(axis=-1, dtype=f) + b2
    x = low + g[..., None] * high
    mean = x.mean(axis=-1, dtype=f, keepdims=True)
    var = np.square(x - mean).mean(axis=-1, dtype=f, keepdims=True)
    return ((x - mean) / np.sqrt(var + f(eps)) * ln_w + ln_b).astype(f)


def case_list(quick: bool) -> list[dict]:
    """(C, rows, misaligned) per dtype. rows 2048 = the official B=2 (CFG) x 1024 tokens."""
    shapes = [
        {"C": 1152, "rows": 2048, "misaligned": False},   # official
        {"C": 1152, "rows": 8192, "misaligned": False},
        {"C": 64, "rows": 2048, "misaligned": False},
        {"C": 72, "rows": 8192, "misaligned": False},
        {"C": 100, "rows": 2048, "misaligned": False},    # odd C: scalar path for fp16/bf16
        {"C": 1152, "rows": 2048, "misaligned": True},    # 2-byte/4-byte offset pointers: scalar streaming kernel
        {"C": 2560, "rows": 2048, "misaligned": False},   # wider than the register cache: vector streaming kernel
    ]
    if quick:
        shapes = [s for s in shapes if s["rows"] <= 2048]
    return [dict(s, dtype=dt) for dt in ("float32", "float16", "bfloat16") for s in shapes]


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fileio.write_json(path, payload)


def print_table(cases: list[dict], copy_gbps: float | None) -> None:
    hdr = (f"{'backend':<8} {'dtype':<5} {'C':>5} {'rows':>6} {'al':>2} {'cfg':>7} {'rel_err':>9} {'tol':>6} "
           f"{'ok':>4} {'hot_us':>8} {'cold_us':>8} {'GB/s':>7} {'%copy':>6} {'unfused_us':>10} {'speedup':>7}")
    print(hdr)
    print("-" * len(hdr))
    for c in cases:
        t = c.get("timing", {})
        err = c.get("error", {})
        cfg = c.get("launch_config")
        cfg_s = f"{cfg[0]}x{cfg[1]}" if cfg else "-"
        speed = t.get("speedup_vs_unfused_cold")

        def num(v, fmt):
            return format(v, fmt) if isinstance(v, (int, float)) and math.isfinite(v) else "-"

        print(f"{c['backend']:<8} {_SHORT[c['dtype']]:<5} {c['C']:>5} {c['rows']:>6} "
              f"{('n' if c['misaligned'] else 'y'):>2} {cfg_s:>7} {num(err.get('max_rel_err'), '9.2e')} "
              f"{num(err.get('tol'), '6.0e')} {('PASS' if c.get('ok') else 'FAIL'):>4} "
              f"{num(t.get('kernel_hot_us'), '8.2f')} {num(t.get('kernel_cold_us'), '8.2f')} "
              f"{num(t.get('achieved_GBps_cold'), '7.0f')} {num(t.get('fraction_of_copy_bw_cold'), '6.2f')} "
              f"{num(t.get('unfused_cold_us'), '10.2f')} {num(speed, '7.2f')}")
    if copy_gbps:
        print(f"device-to-device copy bandwidth (read + write): {copy_gbps:.0f} GB/s")


# ---------------------------------------------------------------------------------------------------------------------
# device abstraction: torch (preferred) or CuPy
# ---------------------------------------------------------------------------------------------------------------------
class TorchDevice:
    name = "torch"

    def __init__(self):
        import torch
        import torch.nn.functional as F
        if not torch.cuda.is_available():
            raise RuntimeError("torch has no CUDA device")
        self.torch, self.F = torch, F
        self.dev = torch.device("cuda")
        self._dt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        self._flush = torch.empty(256 << 20, dtype=torch.uint8, device=self.dev)
        self.gen = torch.Generator(device=self.dev)

    def supports(self, dtype):
        return True

    def info(self):
        t = self.torch
        p = t.cuda.get_device_properties(0)
        return {"device_name": p.name, "capability": f"{p.major}.{p.minor}", "sm_count": p.multi_processor_count,
                "memory_GiB": round(p.total_memory / 2**30, 1), "torch": t.__version__,
                "torch_cuda": t.version.cuda}

    def capability(self):
        return self.torch.cuda.get_device_capability(0)

    def randn(self, shape, dtype, mean, std, seed):
        self.gen.manual_seed(seed)
        x = self.torch.randn(shape, generator=self.gen, device=self.dev, dtype=self.torch.float32)
        return (x * std + mean).to(self._dt[dtype])

    def empty(self, shape, dtype, misaligned=False):
        n = int(np.prod(shape))
        if not misaligned:
            return self.torch.empty(shape, dtype=self._dt[dtype], device=self.dev)
        base = self.torch.empty(n + 1, dtype=self._dt[dtype], device=self.dev)
        return base[1:].view(shape)  # one element off a 256-byte aligned allocation

    def misalign(self, t):
        out = self.empty(tuple(t.shape), self._dt_name(t), misaligned=True)
        out.copy_(t)
        return out

    def _dt_name(self, t):
        return {v: k for k, v in self._dt.items()}[t.dtype]

    def fill_nan(self, t):
        t.fill_(float("nan"))

    def to_f64(self, t):
        return t.detach().float().cpu().numpy().astype(np.float64)

    def ptr(self, t):
        return int(t.data_ptr())

    def stream_ptr(self):
        return int(self.torch.cuda.current_stream().cuda_stream)

    def sync(self):
        self.torch.cuda.synchronize()

    def event(self):
        return self.torch.cuda.Event(enable_timing=True)

    @staticmethod
    def elapsed_ms(a, b):
        return a.elapsed_time(b)

    def flush_l2(self):
        self._flush.zero_()

    def graph(self, fn, n):
        """A callable replaying n calls of fn captured into a CUDA graph; None if capture fails."""
        torch = self.torch
        try:
            g = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()  # warm-up on the capture stream
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(g):
                for _ in range(n):
                    fn()
            g.replay()
            self.sync()
            return g.replay
        except Exception:
            self.sync()
            return None

    def unfused(self, low, high, h, w2, b2, lnw, lnb, eps):
        F = self.F
        C = low.shape[-1]
        return F.layer_norm(low + (F.silu(h) @ w2[:, None] + b2) * high, (C,), lnw, lnb, eps)

    def copy_bandwidth(self, nbytes=1 << 30, reps=20):
        src = self.torch.empty(nbytes, dtype=self.torch.uint8, device=self.dev)
        dst = self.torch.empty_like(src)
        return _copy_bw(self, lambda: dst.copy_(src), nbytes, reps)


class CupyDevice:
    name = "cupy"

    def __init__(self):
        import cupy as cp
        self.cp = cp
        if cp.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("CuPy sees no CUDA device")
        self._dt = {"float32": cp.float32, "float16": cp.float16}
        self._flush = cp.empty(256 << 20, dtype=cp.uint8)

    def supports(self, dtype):
        return dtype in self._dt

    def info(self):
        cp = self.cp
        p = cp.cuda.runtime.getDeviceProperties(0)
        name = p["name"].decode() if isinstance(p["name"], bytes) else p["name"]
        return {"device_name": name, "capability": f"{p['major']}.{p['minor']}",
                "sm_count": p["multiProcessorCount"], "memory_GiB": round(p["totalGlobalMem"] / 2**30, 1),
                "cupy": cp.__version__}

    def capability(self):
        p = self.cp.cuda.runtime.getDeviceProperties(0)
        return p["major"], p["minor"]

    def randn(self, shape, dtype, mean, std, seed):
        rs = self.cp.random.RandomState(seed)
        return (rs.standard_normal(shape, dtype=self.cp.float32) * std + mean).astype(self._dt[dtype])

    def empty(self, shape, dtype, misaligned=False):
        n = int(np.prod(shape))
        if not misaligned:
            return self.cp.empty(shape, dtype=self._dt[dtype])
        return self.cp.empty(n + 1, dtype=self._dt[dtype])[1:].reshape(shape)

    def misalign(self, a):
        out = self.empty(a.shape, {v: k for k, v in self._dt.items()}[a.dtype.type], misaligned=True)
        out[...] = a
        return out

    def fill_nan(self, a):
        a.fill(np.nan)

    def to_f64(self, a):
        return self.cp.asnumpy(a).astype(np.float64)

    def ptr(self, a):
        return int(a.data.ptr)

    def stream_ptr(self):
        return int(self.cp.cuda.get_current_stream().ptr)

    def sync(self):
        self.cp.cuda.get_current_stream().synchronize()

    def event(self):
        return self.cp.cuda.Event()

    def elapsed_ms(self, a, b):
        return self.cp.cuda.get_elapsed_time(a, b)

    def flush_l2(self):
        self._flush.fill(0)

    def unfused(self, low, high, h, w2, b2, lnw, lnb, eps):
        cp = self.cp
        silu = h / (1 + cp.exp(-h))
        x = low + (silu @ w2[:, None] + b2) * high
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        return (x - mean) / cp.sqrt(var + eps) * lnw + lnb

    def copy_bandwidth(self, nbytes=1 << 30, reps=20):
        src = self.cp.empty(nbytes, dtype=self.cp.uint8)
        dst = self.cp.empty_like(src)
        return _copy_bw(self, lambda: dst.__setitem__(Ellipsis, src), nbytes, reps)


def _time_ms(dev, fn, *, reps, cold):
    """Median milliseconds of fn: cold = one launch per measurement after an L2 flush, hot = batches of launches."""
    for _ in range(5):
        fn()
    dev.sync()
    samples = []
    if cold:
        for _ in range(reps):
            dev.flush_l2()
            a, b = dev.event(), dev.event()
            a.record()
            fn()
            b.record()
            b.synchronize()
            samples.append(dev.elapsed_ms(a, b))
    else:
        # back-to-back launches; replayed from a CUDA graph where possible so that Python / ctypes launch overhead
        # (several us per call) does not leave the GPU idle between the ~10 us kernels
        inner = 20
        body = dev.graph(fn, inner) if hasattr(dev, "graph") else None
        for _ in range(max(3, reps // inner)):
            a, b = dev.event(), dev.event()
            a.record()
            if body is not None:
                body()
            else:
                for _ in range(inner):
                    fn()
            b.record()
            b.synchronize()
            samples.append(dev.elapsed_ms(a, b) / inner)
    return float(np.median(samples))


def _copy_bw(dev, fn, nbytes, reps):
    ms = _time_ms(dev, fn, reps=reps, cold=False)
    return 2.0 * nbytes / (ms * 1e-3) / 1e9  # GB/s counting read + write


# ---------------------------------------------------------------------------------------------------------------------
# kernel backends
# ---------------------------------------------------------------------------------------------------------------------
class CtypesKernel:
    name = "ctypes"

    def __init__(self, arch: int, build_dir: Path):
        self.lib_path = pb.build_kernel_library(build_dir, archs=[arch])
        self.lib = ctypes.CDLL(str(self.lib_path))
        f = self.lib.gated_residual_forward
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 8 + [ctypes.c_int, ctypes.c_int, ctypes.c_float,
                                                                ctypes.c_void_p]
        cfg = self.lib.gated_residual_launch_config
        cfg.restype = ctypes.c_int
        cfg.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int),
                        ctypes.POINTER(ctypes.c_int)]

    def launch_config(self, dtype, C, aligned):
        v, n = ctypes.c_int(0), ctypes.c_int(0)
        rc = self.lib.gated_residual_launch_config(pb.DTYPE_CODES[dtype], C, int(aligned), ctypes.byref(v),
                                                   ctypes.byref(n))
        if rc != 0:
            raise RuntimeError(f"gated_residual_launch_config returned {rc}")
        return v.value, n.value

    def prepare(self, dev, dtype, C, aligned):
        return None

    def run(self, dev, dtype, ptrs, rows, C, eps, state):
        rc = self.lib.gated_residual_forward(pb.DTYPE_CODES[dtype], *[ctypes.c_void_p(p) for p in ptrs], rows, C,
                                             ctypes.c_float(eps), ctypes.c_void_p(dev.stream_ptr()))
        if rc != 0:
            raise RuntimeError(f"gated_residual_forward returned {rc}")


class CupyKernel:
    """NVRTC build of the .cuh; the templates are reached through name_expressions."""
    name = "cupy"

    def __init__(self):
        import cupy as cp
        self.cp = cp
        src_dir = pb.kernel_source_dir()
        self.code = (src_dir / pb.KERNEL_HEADER).read_text()
        self.options = ["-std=c++17"]
        cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
        if (Path(cuda_home) / "include" / "cuda_fp16.h").is_file():
            self.options.append(f"-I{Path(cuda_home) / 'include'}")
        self._modules = {}

    @staticmethod
    def template_name(dtype, vec, vpt):
        t = _CUDA_T[dtype]
        if vpt == 0:
            return f"cheers_gr::gated_residual_stream_kernel<{t},{vec}>"
        return f"cheers_gr::gated_residual_warp_kernel<{t},{vec},{vpt}>"

    def launch_config(self, dtype, C, aligned):
        return pb.kernel_launch_config(dtype, C, aligned)

    def prepare(self, dev, dtype, C, aligned):
        vec, vpt = pb.kernel_launch_config(dtype, C, aligned)
        name = self.template_name(dtype, vec, vpt)
        if name not in self._modules:
            mod = self.cp.RawModule(code=self.code, options=tuple(self.options), name_expressions=[name])
            self._modules[name] = mod.get_function(name)
        return self._modules[name]

    def run(self, dev, dtype, ptrs, rows, C, eps, state):
        grid = ((rows + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK,)
        args = tuple(np.uint64(p) for p in ptrs) + (np.int32(rows), np.int32(C), np.float32(eps))
        with self.cp.cuda.ExternalStream(dev.stream_ptr()):
            state(grid, (THREADS_PER_BLOCK,), args)


class CupyCEntryKernel(CupyKernel):
    """The extern "C" gated_residual_<dt> scalar streaming entries (RawModule.get_function by plain name)."""
    name = "cupy_c"

    def launch_config(self, dtype, C, aligned):
        return (1, 0)

    def prepare(self, dev, dtype, C, aligned):
        name = f"gated_residual_{_SHORT[dtype]}"
        if name not in self._modules:
            mod = self.cp.RawModule(code=self.code, options=tuple(self.options))
            self._modules[name] = mod.get_function(name)
        return self._modules[name]


# ---------------------------------------------------------------------------------------------------------------------
# GPU run
# ---------------------------------------------------------------------------------------------------------------------
def run_case(dev, kern, case, *, reps, seed, copy_gbps) -> dict:
    dtype, C, rows, mis = case["dtype"], case["C"], case["rows"], case["misaligned"]
    res = {"backend": kern.name, "dtype": dtype, "C": C, "rows": rows, "misaligned": mis, "ok": False}
    if not dev.supports(dtype):
        res.update(skipped=f"{dev.name} buffers do not support {dtype}", ok=True)
        return res
    try:
        res["launch_config"] = list(kern.launch_config(dtype, C, not mis))
        low = dev.randn((rows, C), dtype, 0.3, 1.0, seed + 1)
        high = dev.randn((rows, C), dtype, -0.2, 1.0, seed + 2)
        h = dev.randn((rows, C), dtype, 0.0, 2.0, seed + 3)
        w2 = dev.randn((C,), dtype, 0.0, 1.0 / math.sqrt(C), seed + 4)
        b2 = dev.randn((1,), dtype, 0.1, 0.5, seed + 5)
        lnw = dev.randn((C,), dtype, 1.0, 0.2, seed + 6)
        lnb = dev.randn((C,), dtype, 0.0, 0.2, seed + 7)
        out = dev.empty((rows, C), dtype, misaligned=mis)
        if mis:
            low, high, h = dev.misalign(low), dev.misalign(high), dev.misalign(h)
        tensors = [low, high, h, w2, b2, lnw, lnb, out]
        ptrs = [dev.ptr(t) for t in tensors]
        state = kern.prepare(dev, dtype, C, not mis)

        dev.fill_nan(out)
        dev.sync()
        kern.run(dev, dtype, ptrs, rows, C, EPS, state)
        dev.sync()
        ref = pb.numpy_reference(*(dev.to_f64(t) for t in tensors[:7]), eps=EPS)
        res["error"] = compare(dev.to_f64(out), ref, dtype)
        unf = dev.unfused(low, high, h, w2, b2, lnw, lnb, EPS)
        dev.sync()
        res["unfused_error"] = compare(dev.to_f64(unf), ref, dtype)  # informational
        res["ok"] = res["error"]["ok"]

        run = lambda: kern.run(dev, dtype, ptrs, rows, C, EPS, state)  # noqa: E731
        run_unf = lambda: dev.unfused(low, high, h, w2, b2, lnw, lnb, EPS)  # noqa: E731
        elt = {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]
        nbytes = (4 * rows * C + 3 * C + 1) * elt  # read low, high, h, w2, ln_w, ln_b, b2; write out
        hot = _time_ms(dev, run, reps=reps, cold=False)
        cold = _time_ms(dev, run, reps=reps, cold=True)
        unf_hot = _time_ms(dev, run_unf, reps=reps, cold=False)
        unf_cold = _time_ms(dev, run_unf, reps=reps, cold=True)
        gbps_cold = nbytes / (cold * 1e-3) / 1e9
        res["timing"] = {
            "bytes_moved": nbytes,
            "kernel_hot_us": hot * 1e3, "kernel_cold_us": cold * 1e3,
            "unfused_hot_us": unf_hot * 1e3, "unfused_cold_us": unf_cold * 1e3,
            "achieved_GBps_hot": nbytes / (hot * 1e-3) / 1e9, "achieved_GBps_cold": gbps_cold,
            "fraction_of_copy_bw_cold": gbps_cold / copy_gbps if copy_gbps else None,
            "speedup_vs_unfused_hot": unf_hot / hot, "speedup_vs_unfused_cold": unf_cold / cold,
        }
    except Exception as exc:  # one broken case must not hide the others
        res["ok"] = False
        res["exception"] = f"{type(exc).__name__}: {exc}"
        res["traceback"] = traceback.format_exc(limit=6)
    return res


def _nvcc_version():
    nvcc = pb.find_nvcc()
    if not nvcc:
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
        return out.strip().splitlines()[-1] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def gpu_main(args) -> int:
    dev = None
    errors = []
    for cls in (TorchDevice, CupyDevice):
        try:
            dev = cls()
            break
        except Exception as exc:  # ImportError, no CUDA, ...
            errors.append(f"{cls.name}: {type(exc).__name__}: {exc}")
    if dev is None:
        print("cannot run: no CUDA device through torch or CuPy\n  " + "\n  ".join(errors), file=sys.stderr)
        return 2
    major, minor = dev.capability()
    arch = major * 10 + minor

    kernels, kernel_errors = [], []
    want = {"auto": ["ctypes", "cupy"], "all": ["ctypes", "cupy", "cupy_c"]}.get(args.backend, [args.backend])
    build_dir = Path(tempfile.mkdtemp(prefix="cheers_gr_build_"))
    for name in want:
        try:
            if name == "ctypes":
                kernels.append(CtypesKernel(arch, build_dir))
            elif name == "cupy":
                kernels.append(CupyKernel())
            elif name == "cupy_c":
                kernels.append(CupyCEntryKernel())
        except Exception as exc:
            kernel_errors.append(f"{name}: {type(exc).__name__}: {exc}")
    if not kernels:
        print("cannot run: no kernel backend\n  " + "\n  ".join(kernel_errors), file=sys.stderr)
        return 2

    copy_gbps = dev.copy_bandwidth()
    cases = []
    for kern in kernels:
        for i, case in enumerate(case_list(args.quick)):
            r = run_case(dev, kern, case, reps=args.reps, seed=args.seed + 100 * i, copy_gbps=copy_gbps)
            cases.append(r)
            if r.get("exception"):
                print(f"[{kern.name}] {case}: {r['exception']}", file=sys.stderr)

    # the C launcher and its Python mirror must pick the same configuration
    cfg_mismatch = []
    ck = next((k for k in kernels if isinstance(k, CtypesKernel)), None)
    if ck is not None:
        for dt in pb.DTYPE_CODES:
            for C in (1, 7, 8, 64, 72, 100, 128, 1152, 1153, 2304, 2560, 4096, 8192):
                for al in (True, False):
                    if ck.launch_config(dt, C, al) != pb.kernel_launch_config(dt, C, al):
                        cfg_mismatch.append([dt, C, al])

    passed = all(c["ok"] for c in cases) and not cfg_mismatch
    payload = {
        "tool": "engines/plugins/gated_residual/testing/gpu_kernel_check.py",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": dev.info(),
        "cuda_arch": f"sm_{arch}",
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "nvcc": _nvcc_version(),
                     "buffers": dev.name},
        "kernel_backends": [k.name for k in kernels],
        "kernel_backend_errors": kernel_errors,
        "tolerance": TOLERANCE,
        "eps": EPS,
        "copy_bandwidth_GBps": copy_gbps,
        "launch_config_mismatches": cfg_mismatch,
        "cases": cases,
        "passed": passed,
    }
    try:
        import cupy  # noqa: F401
        payload["versions"]["cupy"] = cupy.__version__
    except Exception:
        pass
    out = Path(args.out) if args.out else REPO_ROOT / "bench" / "results" / (
        f"gated_residual_{_dt.date.today().isoformat()}.json")
    write_json(out, payload)
    print_table(cases, copy_gbps)
    if kernel_errors:
        print("backends not run: " + "; ".join(kernel_errors))
    if cfg_mismatch:
        print(f"launch-config mismatches C launcher vs Python mirror: {cfg_mismatch}")
    n_fail = sum(not c["ok"] for c in cases)
    print(f"{len(cases) - n_fail} passed, {n_fail} failed")
    print(f"wrote {out}")
    return 0 if passed else 1


# ---------------------------------------------------------------------------------------------------------------------
# CPU self-test (no GPU): the comparison, the reference, the case list, the JSON / table writers and the run_case
# plumbing (through a numpy stand-in for the device and the kernel)
# ---------------------------------------------------------------------------------------------------------------------
class _HostEvent:
    def __init__(self):
        self.t = 0.0

    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass


class NumpyDevice:
    """Host stand-in with the device interface (no bf16, like the CuPy buffers)."""
    name = "numpy"

    def __init__(self):
        self._reg = {}

    def supports(self, dtype):
        return dtype in ("float32", "float16")

    def randn(self, shape, dtype, mean, std, seed):
        return (np.random.default_rng(seed).standard_normal(shape) * std + mean).astype(dtype)

    def empty(self, shape, dtype, misaligned=False):
        return np.empty(shape, dtype=dtype)

    def misalign(self, a):
        return a.copy()

    def fill_nan(self, a):
        a.fill(np.nan)

    def to_f64(self, a):
        return np.asarray(a, dtype=np.float64)

    def ptr(self, a):
        self._reg[id(a)] = a
        return id(a)

    def stream_ptr(self):
        return 0

    def sync(self):
        pass

    def event(self):
        return _HostEvent()

    @staticmethod
    def elapsed_ms(a, b):
        return (b.t - a.t) * 1e3

    def flush_l2(self):
        pass

    def unfused(self, low, high, h, w2, b2, lnw, lnb, eps):
        return pb.numpy_reference(low, high, h, w2, b2, lnw, lnb, eps).astype(low.dtype)


class NumpyKernel:
    name = "numpy"

    def launch_config(self, dtype, C, aligned):
        return pb.kernel_launch_config(dtype, C, aligned)

    def prepare(self, dev, dtype, C, aligned):
        return None

    def run(self, dev, dtype, ptrs, rows, C, eps, state):
        arrs = [dev._reg[p] for p in ptrs]
        arrs[7][...] = float32_emulation(*arrs[:7], eps=eps).astype(arrs[7].dtype)


def cpu_selftest(args) -> int:
    rng = np.random.default_rng(0)
    failures = []

    def expect(cond, what):
        if not cond:
            failures.append(what)

    for C, rows in ((1152, 64), (64, 32), (72, 16), (100, 8)):
        low = rng.normal(0.3, 1.0, (rows, C)).astype(np.float32)
        high = rng.normal(-0.2, 1.0, (rows, C)).astype(np.float32)
        h = rng.normal(0.0, 2.0, (rows, C)).astype(np.float32)
        w2 = rng.normal(0.0, 1.0 / math.sqrt(C), C).astype(np.float32)
        b2 = np.array([0.1], np.float32)
        lnw = rng.normal(1.0, 0.2, C).astype(np.float32)
        lnb = rng.normal(0.0, 0.2, C).astype(np.float32)
        ref = pb.numpy_reference(low, high, h, w2, b2, lnw, lnb, eps=EPS)
        emu = float32_emulation(low, high, h, w2, b2, lnw, lnb)
        r = compare(emu, ref, "float32")
        expect(r["ok"], f"fp32 emulation within tolerance C={C}: {r}")
        for dt, npdt in (("float16", np.float16),):
            r16 = compare(emu.astype(npdt).astype(np.float64), ref, dt)
            expect(r16["ok"], f"fp16-rounded output within tolerance C={C}: {r16}")
        bf = (emu.view(np.uint32) + 0x7FFF + ((emu.view(np.uint32) >> 16) & 1)) & 0xFFFF0000  # RNE to bf16
        rbf = compare(bf.view(np.float32).astype(np.float64), ref, "bfloat16")
        expect(rbf["ok"], f"bf16-rounded output within tolerance C={C}: {rbf}")
        poisoned = emu.astype(np.float64).copy()
        poisoned[rows // 2, C // 3] = np.nan
        expect(not compare(poisoned, ref, "float32")["ok"], "a NaN must fail")
        off = ref.copy()
        off[0, 0] += 1e-3 * np.abs(ref).max()
        expect(not compare(off, ref, "float32")["ok"], "a 1e-3 error must fail fp32")
        expect(compare(off, ref, "bfloat16")["ok"], "a 1e-3 error passes bf16")
        expect(not compare(ref[:, :-1], ref, "float32")["ok"], "shape mismatch must fail")

    dev, kern = NumpyDevice(), NumpyKernel()
    for case in ({"dtype": "float32", "C": 1152, "rows": 64, "misaligned": False},
                 {"dtype": "float16", "C": 72, "rows": 16, "misaligned": True},
                 {"dtype": "bfloat16", "C": 64, "rows": 8, "misaligned": False}):
        r = run_case(dev, kern, case, reps=3, seed=7, copy_gbps=100.0)
        expect(r["ok"] and "exception" not in r, f"run_case plumbing {case}: {r.get('exception') or r}")
        if case["dtype"] == "bfloat16":
            expect("skipped" in r, "bf16 skipped without bf16 buffers")
        else:
            expect(r["launch_config"] == list(pb.kernel_launch_config(case["dtype"], case["C"],
                                                                          not case["misaligned"])), "config")
            expect(r["timing"]["bytes_moved"] == (4 * case["rows"] * case["C"] + 3 * case["C"] + 1)
                   * np.dtype(case["dtype"]).itemsize, "bytes moved")
            expect(r["error"]["nan_count"] == 0 and r["unfused_error"]["ok"], "errors recorded")

    class _Broken(NumpyKernel):
        def run(self, *a):
            raise RuntimeError("boom")

    r = run_case(dev, _Broken(), {"dtype": "float32", "C": 64, "rows": 4, "misaligned": False}, reps=3, seed=1,
                 copy_gbps=None)
    expect(not r["ok"] and "boom" in r.get("exception", ""), "a failing launch is recorded, not raised")

    class _NoWrite(NumpyKernel):
        def run(self, *a):
            pass  # leaves the NaN poison in place

    r = run_case(dev, _NoWrite(), {"dtype": "float32", "C": 64, "rows": 4, "misaligned": False}, reps=3, seed=1,
                 copy_gbps=None)
    expect(not r["ok"] and r["error"]["nan_count"] == 4 * 64, "unwritten output (NaN poison) fails")

    cases = case_list(quick=False)
    expect(len(cases) == 21 and {c["dtype"] for c in cases} == set(TOLERANCE), "case list")
    for c in cases:
        vec, vpt = pb.kernel_launch_config(c["dtype"], c["C"], not c["misaligned"])
        expect(vec >= 1 and vpt >= 0, f"launch config {c}")
    expect(pb.kernel_launch_config("float32", 1152) == (4, 9), "fp32 C=1152 -> float4 x 9")
    expect(pb.kernel_launch_config("bfloat16", 1152) == (8, 5), "bf16 C=1152 -> 8-wide x 5")
    expect(pb.kernel_launch_config("float16", 1152, aligned16=False) == (1, 0), "misaligned -> scalar stream")
    expect(CupyKernel.template_name("bfloat16", 8, 5) == "cheers_gr::gated_residual_warp_kernel<__nv_bfloat16,8,5>",
           "template name")
    header = (pb.kernel_source_dir() / pb.KERNEL_HEADER).read_text()
    for name in ("gated_residual_warp_kernel", "gated_residual_stream_kernel", "gated_residual_f32",
                 "gated_residual_f16", "gated_residual_bf16", "kThreadsPerBlock = kWarpSize * kRowsPerBlock",
                 "kRowsPerBlock = 4"):
        expect(name in header, f"kernel header defines {name}")

    fake = [{"backend": "ctypes", "dtype": "float32", "C": 1152, "rows": 2048, "misaligned": False, "ok": True,
             "launch_config": [4, 9], "error": {"max_rel_err": 1e-7, "tol": 1e-5},
             "timing": {"kernel_hot_us": 10.0, "kernel_cold_us": 12.0, "achieved_GBps_cold": 3000.0,
                        "fraction_of_copy_bw_cold": 0.9, "unfused_cold_us": 40.0, "speedup_vs_unfused_cold": 3.3}},
            {"backend": "cupy", "dtype": "bfloat16", "C": 72, "rows": 8192, "misaligned": True, "ok": False,
             "exception": "RuntimeError: x"}]
    print_table(fake, 3300.0)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp()) / "selftest.json"
    write_json(out, {"cases": fake, "passed": False, "nan": float("nan"), "inf": math.inf, "np": np.float32(2.5)})
    back = json.loads(out.read_text())
    expect(back["cases"][0]["C"] == 1152 and back["nan"] == "nan" and back["inf"] == "inf" and back["np"] == 2.5,
           "strict JSON round trip")

    for f in failures:
        print("FAIL:", f)
    print(f"cpu self-test: {'ok' if not failures else f'{len(failures)} failure(s)'}")
    return 0 if not failures else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="JSON path (default bench/results/gated_residual_<date>.json)")
    ap.add_argument("--backend", default="auto", choices=["auto", "ctypes", "cupy", "cupy_c", "all"],
                    help="auto = ctypes and cupy where available; all adds the extern \"C\" streaming entries")
    ap.add_argument("--reps", type=int, default=100, help="timed launches per measurement (median)")
    ap.add_argument("--seed", type=int, default=20240611)
    ap.add_argument("--quick", action="store_true", help="rows <= 2048 only")
    ap.add_argument("--cpu-selftest", action="store_true", help="no GPU: check the comparison/reference logic")
    args = ap.parse_args(argv)
    t0 = time.time()
    rc = cpu_selftest(args) if args.cpu_selftest else gpu_main(args)
    print(f"({time.time() - t0:.1f} s)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
