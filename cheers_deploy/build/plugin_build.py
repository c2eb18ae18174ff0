"""Build helpers and the CPU reference of the fused hi-gate op (CUDA kernel + TensorRT plugin "CheersGatedResidual").

The op (docs/architecture.md §10), per token row of width C::

    g   = dot(SiLU(h), w2) + b2          # h = output of hi_gate.gate.0 (Linear C->C), w2/b2 = hi_gate.gate.2
    out = LayerNorm(low + g * high) * ln_w + ln_b      # hi_gate.layer_norm, eps 1e-5

No torch here: numpy for the reference, ``nvcc`` through list-argument subprocess calls for the builds.
The C++/CUDA sources live in ``engines/plugins/gated_residual/`` of the repository.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import CheersError, InputError, MissingDependencyError
DEFAULT_EPS = 1e-5

#: dtype codes of the C launcher ``gated_residual_forward``
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}
_ELEMENT_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2}

#: architectures the deployment targets (sm_87 Jetson Orin; Jetson Thor is sm_110 with CUDA >= 13, sm_101 before)
TARGET_ARCHS = (80, 86, 87, 89, 90, 100, 110)

KERNEL_SOURCE = "gated_residual_kernel.cu"
KERNEL_HEADER = "gated_residual_kernel.cuh"
KERNEL_LIBRARY = "libcheers_gated_residual_kernel.so"

# launch-configuration rule of gated_residual_kernel.cu (kVptVector / kVptScalar)
_VPT_VECTOR = (1, 2, 3, 4, 5, 6, 8, 9)
_VPT_SCALAR = (1, 2, 4, 8, 16)
_WARP = 32


# ---------------------------------------------------------------------------------------------------------------------
# sources and nvcc
# ---------------------------------------------------------------------------------------------------------------------
def kernel_source_dir() -> Path:
    """Folder with the kernel / plugin sources (``engines/plugins/gated_residual``).

    ``CHEERS_PLUGIN_SOURCE_DIR`` overrides the location (for an installed package without the repository).
    """
    override = os.environ.get("CHEERS_PLUGIN_SOURCE_DIR")
    candidates = [Path(override)] if override else []
    candidates.append(Path(__file__).resolve().parents[2] / "engines" / "plugins" / "gated_residual")
    for cand in candidates:
        if (cand / KERNEL_SOURCE).is_file():
            return cand
    raise CheersError(
        f"the gated-residual kernel sources ({KERNEL_SOURCE}) were not found in "
        f"{', '.join(str(c) for c in candidates)}; run from a repository checkout or set CHEERS_PLUGIN_SOURCE_DIR")


def kernel_source_path() -> Path:
    return kernel_source_dir() / KERNEL_SOURCE


def find_nvcc() -> str | None:
    """Path of ``nvcc`` (PATH, then $CUDA_HOME / $CUDA_PATH, then /usr/local/cuda) or None."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            cand = Path(root) / "bin" / "nvcc"
            if cand.is_file() and os.access(cand, os.X_OK):
                return str(cand)
    return None


def cuda_include_dir(nvcc: str | None = None) -> Path | None:
    """CUDA runtime headers (``cuda_runtime_api.h``) matching ``nvcc``: <nvcc dir>/../include (symlinks resolved),
    $CUDA_HOME / $CUDA_PATH, /usr/local/cuda; None when not found."""
    roots = []
    nvcc = nvcc or find_nvcc()
    if nvcc:
        roots += [Path(nvcc).parent.parent, Path(nvcc).resolve().parent.parent]
    roots += [Path(r) for r in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")) if r]
    roots.append(Path("/usr/local/cuda"))
    for root in roots:
        for inc in (root / "include", root / "targets" / "x86_64-linux" / "include",
                    root / "targets" / "sbsa-linux" / "include", root / "targets" / "aarch64-linux" / "include"):
            if (inc / "cuda_runtime_api.h").is_file():
                return inc
    return None


def require_nvcc() -> str:
    nvcc = find_nvcc()
    if nvcc is None:
        raise MissingDependencyError(
            "nvcc (the CUDA compiler) was not found on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin: install the "
            "CUDA toolkit (e.g. apt install cuda-nvcc-12-6 / cuda-toolkit-13-0, or JetPack's CUDA) or add it to PATH")
    return nvcc


def _run(cmd: Sequence[str], what: str, timeout: float) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise MissingDependencyError(f"{what}: cannot execute {cmd[0]!r}: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise CheersError(f"{what}: timed out after {timeout:.0f} s: {' '.join(cmd)}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-30:]
        raise CheersError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n" + "\n".join(tail))
    return proc


@functools.lru_cache(maxsize=8)
def _supported_archs_cached(nvcc: str) -> tuple[int, ...]:
    proc = _run([nvcc, "--list-gpu-arch"], "nvcc --list-gpu-arch", timeout=60)
    archs = {int(m) for m in re.findall(r"compute_(\d+)", proc.stdout)}
    return tuple(sorted(archs))


def supported_archs(nvcc: str | None = None) -> list[int]:
    """Virtual architectures the local nvcc can target (``nvcc --list-gpu-arch``), e.g. [75, 80, 86, ...]."""
    return list(_supported_archs_cached(nvcc or require_nvcc()))


def _check_arch(arch: int | str) -> int:
    try:
        value = int(str(arch).removeprefix("sm_").removeprefix("compute_"))
    except ValueError as exc:
        raise InputError(f"CUDA architecture must be an integer like 90 or 'sm_90', got {arch!r}") from exc
    if not 50 <= value <= 999:
        raise InputError(f"CUDA architecture out of range: {arch!r}")
    return value


def gencode_flags(archs: Iterable[int | str], *, ptx_for_last: bool = False) -> list[str]:
    """``-gencode arch=compute_XX,code=sm_XX`` for each arch (plus PTX of the last one when asked)."""
    values = [_check_arch(a) for a in archs]
    if not values:
        raise InputError("at least one CUDA architecture is needed")
    flags: list[str] = []
    for a in values:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    if ptx_for_last:
        flags += ["-gencode", f"arch=compute_{values[-1]},code=compute_{values[-1]}"]
    return flags


def compile_kernel_object(arch: int | str | Sequence[int | str], out_dir: str | os.PathLike, *,
                          extra_flags: Sequence[str] = (), threads: int | None = None, timeout: float = 600) -> Path:
    """Compile ``gated_residual_kernel.cu`` with ``nvcc -std=c++17 -O3 -c``; returns the ``.o``.

    ``arch`` is one architecture (90, "sm_90") or a sequence of them: a sequence gives one fat object with a
    ``-gencode`` per architecture, compiled by one nvcc call (``--threads`` architectures in parallel; default: CPUs)
    so the host-side compilation runs once.
    """
    nvcc = require_nvcc()
    archs = [_check_arch(a) for a in (arch if isinstance(arch, (list, tuple)) else [arch])]
    src_dir = kernel_source_dir()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    obj = out / f"gated_residual_kernel_sm{'_'.join(str(a) for a in archs)}.o"
    cmd = [nvcc, "-std=c++17", "-O3", "-c", *gencode_flags(archs), "-I", str(src_dir), *extra_flags]
    if len(archs) > 1:
        cmd += ["--threads", str(threads if threads is not None else max(1, min(len(archs), os.cpu_count() or 1)))]
    cmd += ["-o", str(obj), str(src_dir / KERNEL_SOURCE)]
    _run(cmd, f"nvcc ({', '.join(f'sm_{a}' for a in archs)})", timeout)
    return obj


def build_kernel_library(out_dir: str | os.PathLike, archs: Iterable[int | str] | None = None, *,
                         threads: int | None = None, extra_flags: Sequence[str] = (), timeout: float = 900) -> Path:
    """Build ``libcheers_gated_residual_kernel.so`` (kernel + C launcher, no TensorRT) with one nvcc call.

    The CUDA runtime is linked statically, so ctypes can load the library next to torch / CuPy whatever libcudart
    they bring (all runtimes share the device's primary context, so their pointers and streams are valid here).

    ``archs`` defaults to every entry of TARGET_ARCHS the local nvcc supports; PTX of the highest one is embedded so
    newer GPUs can JIT it. ``threads`` is nvcc's ``--threads`` (architectures compiled in parallel; default: CPUs).
    """
    nvcc = require_nvcc()
    if archs is None:
        have = set(supported_archs(nvcc))
        archs = [a for a in TARGET_ARCHS if a in have]
    archs = [_check_arch(a) for a in archs]
    src_dir = kernel_source_dir()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lib = out / KERNEL_LIBRARY
    n_threads = threads if threads is not None else max(1, min(len(archs), os.cpu_count() or 1))
    cmd = [nvcc, "-std=c++17", "-O3", "-shared", "-Xcompiler", "-fPIC", "--cudart", "static",
           "--threads", str(n_threads), *gencode_flags(archs, ptx_for_last=True), "-I", str(src_dir),
           *extra_flags, "-o", str(lib), str(src_dir / KERNEL_SOURCE)]
    _run(cmd, "nvcc (kernel library)", timeout)
    return lib


def kernel_launch_config(dtype: str, C: int, aligned16: bool = True) -> tuple[int, int]:
    """(vector width, vectors per lane) that ``gated_residual_forward`` picks; vectors per lane 0 = streaming kernel.

    Python mirror of ``gated_residual_launch_config`` (tests compare the two). The register-cached kernel template
    for a config is ``cheers_gr::gated_residual_warp_kernel<T, vec, vpt>``, the streaming one
    ``cheers_gr::gated_residual_stream_kernel<T, vec>``.
    """
    if dtype not in _ELEMENT_SIZE:
        raise InputError(f"dtype must be one of {sorted(_ELEMENT_SIZE)}, got {dtype!r}")
    if int(C) < 1:
        raise InputError(f"C must be >= 1, got {C}")
    vec_max = 16 // _ELEMENT_SIZE[dtype]
    vec = vec_max if (aligned16 and C % vec_max == 0) else 1
    per_lane = -(-(C // vec) // _WARP)
    vpt = next((v for v in (_VPT_SCALAR if vec == 1 else _VPT_VECTOR) if per_lane <= v), 0)
    return vec, vpt


# ---------------------------------------------------------------------------------------------------------------------
# CPU reference (float64)
# ---------------------------------------------------------------------------------------------------------------------
def _silu64(x: np.ndarray) -> np.ndarray:
    # x * sigmoid(x), overflow-free for both signs
    with np.errstate(over="ignore"):
        e = np.exp(-np.abs(x))
    sig = np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return x * sig


def numpy_reference(low, high, h, w2, b2, ln_w, ln_b, eps: float = DEFAULT_EPS) -> np.ndarray:
    """Float64 reference of the fused op. ``low``/``high``/``h``: [..., C]; ``w2``: [C] or [1, C]; ``b2``: [1] or
    scalar; ``ln_w``/``ln_b``: [C]. Returns float64 [..., C]. Any float input dtype (incl. ml_dtypes bfloat16)."""
    low64 = np.asarray(low).astype(np.float64)
    high64 = np.asarray(high).astype(np.float64)
    h64 = np.asarray(h).astype(np.float64)
    if low64.ndim < 1 or low64.shape[-1] < 1:
        raise InputError(f"low must have shape [..., C] with C >= 1, got {low64.shape}")
    C = low64.shape[-1]
    if high64.shape != low64.shape or h64.shape != low64.shape:
        raise InputError(f"low, high and h must have one shape, got {low64.shape}, {high64.shape}, {h64.shape}")
    w2_64 = np.asarray(w2).astype(np.float64).reshape(-1)
    b2_64 = np.asarray(b2).astype(np.float64).reshape(-1)
    lnw64 = np.asarray(ln_w).astype(np.float64).reshape(-1)
    lnb64 = np.asarray(ln_b).astype(np.float64).reshape(-1)
    for name, arr in (("w2", w2_64), ("ln_w", lnw64), ("ln_b", lnb64)):
        if arr.shape != (C,):
            raise InputError(f"{name} must hold C={C} values, got {arr.size}")
    if b2_64.shape != (1,):
        raise InputError(f"b2 must hold one value, got {b2_64.size}")
    if not (np.isfinite(eps) and eps >= 0):
        raise InputError(f"eps must be finite and >= 0, got {eps}")
    g = _silu64(h64) @ w2_64 + b2_64[0]                       # [...]: one gate per row
    x = low64 + g[..., None] * high64                          # [..., C]
    mean = x.mean(axis=-1, keepdims=True)
    var = np.square(x - mean).mean(axis=-1, keepdims=True)     # biased, as LayerNorm
    return (x - mean) / np.sqrt(var + float(eps)) * lnw64 + lnb64
