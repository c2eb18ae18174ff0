"""The one compatibility layer for TensorRT, Polygraphy and cuda-python: optional imports with actionable errors,
version helpers, GPU identification and the few TensorRT API names that differ between
TensorRT 10.x (JetPack 6.2 ships 10.3) and 11.x. Nothing else in the package imports these libraries directly.

Every import is lazy: importing this module needs none of them.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Dict, Optional, Tuple

from ..constants import sm_key
from ..errors import CheersError, MissingDependencyError


_TRT_HINT = ("TensorRT is not installed: on x86_64 `pip install tensorrt` (or NVIDIA's tarball / "
             "libnvinfer packages + python3-libnvinfer); on Jetson it comes with JetPack (`sudo apt install "
             "nvidia-jetpack`, python module from python3-libnvinfer). Needed for `cheers-deploy build` and "
             "--backend trt")
_POLY_HINT = "Polygraphy is not installed: pip install polygraphy (needed for `cheers-deploy build`)"
_CUDA_HINT = ("cuda-python is not installed: pip install 'cuda-python>=12.6,<13' for CUDA 12.x (JetPack 6) or "
              "'cuda-python>=13,<14' for CUDA 13 (JetPack 7); needed for --backend trt and device memory")


# ---------------------------------------------------------------------------------------------------------------------
# imports
# ---------------------------------------------------------------------------------------------------------------------
def import_tensorrt():
    """The ``tensorrt`` module (>= 10) or MissingDependencyError("TensorRT is not installed: ...")."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise MissingDependencyError(f"{_TRT_HINT} ({exc})") from exc
    except OSError as exc:   # the python module is there but libnvinfer.so is not loadable
        raise MissingDependencyError(f"TensorRT is installed but its libraries do not load ({exc}); check "
                                     f"LD_LIBRARY_PATH / the libnvinfer packages") from exc
    major = version_tuple(getattr(trt, "__version__", "0"))[0]
    if major < 10:
        raise MissingDependencyError(f"TensorRT {trt.__version__} is too old: cheers-deploy needs TensorRT >= 10 "
                                     f"(IPluginV3, name-based I/O, execute_async_v3); JetPack 6.2 ships 10.3")
    return trt


def tensorrt_available() -> bool:
    try:
        import_tensorrt()
        return True
    except MissingDependencyError:
        return False


def import_polygraphy_trt():
    """``polygraphy.backend.trt`` (needs TensorRT too)."""
    import_tensorrt()
    try:
        from polygraphy.backend import trt as pg_trt
    except ImportError as exc:
        raise MissingDependencyError(f"{_POLY_HINT} ({exc})") from exc
    return pg_trt


def import_cudart():
    """The CUDA runtime bindings of cuda-python: ``cuda.bindings.runtime`` (cuda-python >= 12.6) or the older
    ``cuda.cudart``."""
    try:
        from cuda.bindings import runtime as cudart
        return cudart
    except ImportError:
        pass
    try:
        from cuda import cudart  # cuda-python < 12.6
        return cudart
    except ImportError as exc:
        raise MissingDependencyError(f"{_CUDA_HINT} ({exc})") from exc


def cuda_available() -> bool:
    """cuda-python importable and at least one CUDA device visible."""
    try:
        cudart = import_cudart()
        err, n = cudart.cudaGetDeviceCount()
        return _err_code(err) == 0 and n > 0
    except Exception:  # noqa: BLE001 - a probe never raises
        return False


# ---------------------------------------------------------------------------------------------------------------------
# CUDA error checking
# ---------------------------------------------------------------------------------------------------------------------
def _err_code(err) -> int:
    try:
        return int(err)
    except (TypeError, ValueError):
        return int(getattr(err, "value", 1))


class CudaError(CheersError):
    """A CUDA runtime call failed."""


def check_cuda(result, what: str = "CUDA call"):
    """cuda-python calls return ``(err, *values)``: raise CudaError on a non-zero error, else return the value(s)."""
    if isinstance(result, tuple):
        err, vals = result[0], result[1:]
    else:
        err, vals = result, ()
    code = _err_code(err)
    if code != 0:
        name = getattr(err, "name", str(err))
        raise CudaError(f"{what} failed: {name} ({code})")
    if not vals:
        return None
    return vals[0] if len(vals) == 1 else vals


# ---------------------------------------------------------------------------------------------------------------------
# versions and GPU identity
# ---------------------------------------------------------------------------------------------------------------------
def version_tuple(v: str) -> Tuple[int, ...]:
    """'10.3.0.30' -> (10, 3, 0, 30); non-numeric suffixes are dropped ('10.13.0.35+cuda13' -> (10, 13, 0, 35))."""
    out = []
    for part in str(v).split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
    return tuple(out) or (0,)


def trt_version() -> str:
    return import_tensorrt().__version__


def trt_major(version: Optional[str] = None) -> int:
    return version_tuple(version or trt_version())[0]


def is_jetson() -> bool:
    """L4T / JetPack device (integrated GPU, unified memory)."""
    return Path("/etc/nv_tegra_release").is_file() or Path("/sys/module/tegra_fuse").exists()


def jetpack_release() -> Optional[str]:
    """The L4T release line of a Jetson ("R36 (release), REVISION: 4.3, ...") or None."""
    p = Path("/etc/nv_tegra_release")
    try:
        return p.read_text().splitlines()[0].lstrip("# ").strip() if p.is_file() else None
    except OSError:
        return None


def gpu_info(device: int = 0) -> Dict[str, object]:
    """Name, compute capability ("8.7"), sm key ("sm87"), memory and driver/runtime versions of a CUDA device,
    through cuda-python (no TensorRT needed)."""
    cudart = import_cudart()
    count = check_cuda(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
    if device >= count:
        raise CheersError(f"CUDA device {device} not found ({count} device(s) visible)")
    prop = check_cuda(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
    major, minor = int(prop.major), int(prop.minor)
    info = {"name": str(name).strip(), "compute_capability": f"{major}.{minor}", "sm": sm_key((major, minor)),
            "total_memory": int(prop.totalGlobalMem), "integrated": bool(getattr(prop, "integrated", 0))}
    try:
        info["driver_version"] = int(check_cuda(cudart.cudaDriverGetVersion(), "cudaDriverGetVersion"))
        info["runtime_version"] = int(check_cuda(cudart.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion"))
    except CudaError:
        pass
    if is_jetson():
        info["jetson"] = jetpack_release() or True
    return info


def runtime_identity(device: int = 0) -> Dict[str, str]:
    """What an engine is tied to: TensorRT version, GPU name, compute capability (for engine_manifest.json)."""
    info = gpu_info(device)
    return {"tensorrt": trt_version(), "gpu": info["name"], "compute_capability": info["compute_capability"]}


# ---------------------------------------------------------------------------------------------------------------------
# TensorRT API differences (10.x <-> 11.x)
# ---------------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def trt_logger():
    """One ILogger for the process (Polygraphy's, when available, so that its and our messages interleave)."""
    trt = import_tensorrt()
    try:
        from polygraphy.backend.trt import util as pg_util

        return pg_util.get_trt_logger()
    except Exception:  # noqa: BLE001 - Polygraphy is optional at runtime
        return trt.Logger(trt.Logger.WARNING)


def strongly_typed_flag(trt) -> int:
    """Network creation flags for a strongly typed network. TensorRT 11 networks are always strongly typed
    (the flag is accepted and ignored); on 10.x it must be set."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def engine_device_memory_size(engine) -> int:
    """Activation memory an execution context needs (max over profiles): ``device_memory_size_v2`` (TensorRT
    >= 10.1; the only name in 11.x) or ``device_memory_size``."""
    for attr in ("device_memory_size_v2", "device_memory_size"):
        if hasattr(engine, attr):
            return int(getattr(engine, attr))
    raise CheersError("this TensorRT engine reports no device memory size")


def create_user_managed_context(engine):
    """An execution context whose activation memory the caller provides (``set_context_memory``)."""
    trt = import_tensorrt()
    strategy = getattr(getattr(trt, "ExecutionContextAllocationStrategy", None), "USER_MANAGED", None)
    if strategy is not None:
        ctx = engine.create_execution_context(strategy)
    else:  # pragma: no cover - TensorRT 10.0 without the enum binding
        ctx = engine.create_execution_context_without_device_memory()
    if ctx is None:
        raise CheersError("TensorRT could not create an execution context (out of memory?)")
    return ctx


def set_context_memory(context, ptr: int, size: int) -> None:
    """``set_device_memory(ptr, size)`` (V2 semantics, TensorRT >= 10.1) or the older ``device_memory`` property."""
    fn = getattr(context, "set_device_memory", None)
    if fn is not None:
        try:
            fn(int(ptr), int(size))
            return
        except TypeError:
            fn(int(ptr))
            return
    context.device_memory = int(ptr)


def trt_to_numpy_dtype(trt, dt) -> str:
    """numpy dtype name of a ``trt.DataType`` (bf16 as 'bfloat16', the ml_dtypes name)."""
    names = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
             "INT64": "int64", "BOOL": "bool", "UINT8": "uint8", "FP8": "float8_e4m3fn"}
    name = getattr(dt, "name", str(dt).split(".")[-1])
    if name not in names:
        raise CheersError(f"unsupported TensorRT data type {dt}")
    return names[name]


def parser_errors(parser) -> list:
    """Parser errors as dicts (node index/name/op, description) across TensorRT versions."""
    out = []
    for i in range(int(getattr(parser, "num_errors", 0))):
        e = parser.get_error(i)

        def get(attr, default=None):
            fn = getattr(e, attr, None)
            try:
                return fn() if callable(fn) else default
            except Exception:  # noqa: BLE001
                return default

        out.append({"node": get("node", -1), "name": get("node_name", "") or "", "op": get("node_operator", "") or "",
                    "desc": str(get("desc", "") or e), "code": str(get("code", ""))})
    return out
