"""The one compatibility layer for TensorRT, Polygraphy and cuda-python: optional imports with actionable errors,
version helpers, GPU identification and the few TensorRT API names that differ between
TensorRT 10.x (JetPack 6.2 ships 10.3) and 11.x. Nothing else in the package imports these libraries directly.

Every import is lazy: importing this module needs none of them.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, FrozenSet, List, Optional, Tuple

from ..constants import sm_key
from ..errors import CheersError, MissingDependencyError


_TRT_HINT = ("TensorRT is not installed: on x86_64 `pip install tensorrt` (or NVIDIA's tarball / "
             "libnvinfer packages + python3-libnvinfer); on Jetson it comes with JetPack (`sudo apt install "
             "nvidia-jetpack`, python module from python3-libnvinfer). Needed for `cheers-deploy build` and "
             "--backend trt")
_POLY_HINT = "Polygraphy is not installed: pip install polygraphy (needed for `cheers-deploy build`)"
_CUDA_HINT = ("cuda-python is not installed: pip install 'cheers-deploy[trt-cu12]' (cuda-python>=12.6,<13: CUDA 12.x, "
              "JetPack 6) or 'cheers-deploy[trt-cu13]' (cuda-python>=13,<14: CUDA 13, JetPack 7; needs an R580+ "
              "driver); needed for --backend trt and device memory")


# ---------------------------------------------------------------------------------------------------------------------
# the TensorRT Python API this package uses
# ---------------------------------------------------------------------------------------------------------------------
ALL = (10, None)          # every supported TensorRT (10.x and 11.x)
ONLY_10 = (10, 11)        # TensorRT 10.x only: 11.x dropped it, the code reaches it through a fallback

#: Every name of the ``tensorrt`` module (owner "tensorrt") and of its classes that cheers_deploy/trt/*,
#: build/engines.py and runtime/trt_backend.py use, with the TensorRT majors that must have it.
#: tests/test_trt_real_api.py checks that an AST walk of those files finds no access missing here, and that NVIDIA's
#: real bindings (tensorrt-cu12-bindings 10.3.0, 10.13.3.9, 11.4.0.106) have every entry (kind and signature
#: included) in the versions given; the fakes (tests/fakes/trt.py) are checked against the same bindings.
TRT_API: Dict[str, Dict[str, Tuple[int, Optional[int]]]] = {
    "tensorrt": {"__version__": ALL, "Logger": ALL, "Runtime": ALL, "OnnxParser": ALL, "DataType": ALL,
                 "TensorIOMode": ALL, "ExecutionContextAllocationStrategy": ALL, "NetworkDefinitionCreationFlag": ALL,
                 "MemoryPoolType": ALL, "init_libnvinfer_plugins": ALL, "get_plugin_registry": ALL},
    "Logger": {"WARNING": ALL},
    "DataType": {"FLOAT": ALL, "HALF": ALL, "BF16": ALL, "INT8": ALL, "INT32": ALL, "INT64": ALL, "BOOL": ALL,
                 "UINT8": ALL, "FP8": ALL},
    "TensorIOMode": {"INPUT": ALL},
    "ExecutionContextAllocationStrategy": {"USER_MANAGED": ALL},
    # deprecated and ignored in 11.x (strong typing is always on) but still there; 10.x needs it
    "NetworkDefinitionCreationFlag": {"STRONGLY_TYPED": ALL},
    "MemoryPoolType": {"WORKSPACE": ALL},
    "Runtime": {"deserialize_cuda_engine": ALL},
    "ICudaEngine": {"num_io_tensors": ALL, "get_tensor_name": ALL, "get_tensor_mode": ALL, "get_tensor_dtype": ALL,
                    "get_tensor_shape": ALL, "get_tensor_profile_shape": ALL, "num_optimization_profiles": ALL,
                    "device_memory_size_v2": ALL, "device_memory_size": ONLY_10, "create_execution_context": ALL,
                    "create_execution_context_without_device_memory": ONLY_10},
    "IExecutionContext": {"set_device_memory": ALL, "device_memory": ALL, "set_optimization_profile_async": ALL,
                          "set_input_shape": ALL, "get_tensor_shape": ALL, "set_tensor_address": ALL,
                          "execute_async_v3": ALL},
    "OnnxParser": {"parse_from_file": ALL, "num_errors": ALL, "get_error": ALL},
    "ParserError": {"node": ALL, "node_name": ALL, "node_operator": ALL, "desc": ALL, "code": ALL},
    "IPluginRegistry": {"load_library": ALL, "get_creator": ALL, "get_plugin_creator": ONLY_10},
}


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
    """``set_device_memory(memory, size)`` (TensorRT >= 10.1; the bindings 10.3, 10.13 and 11.4 all take both
    arguments) or, on 10.0, the ``device_memory`` property."""
    fn = getattr(context, "set_device_memory", None)
    if fn is not None:
        fn(int(ptr), int(size))
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


def deserialize_engine(runtime, path):
    """``runtime.deserialize_cuda_engine`` on a read-only memory map of the plan file (None if TensorRT cannot read
    it, or the file is empty). Every supported binding takes any buffer there (``serialized_engine: buffer``) and
    hands its pointer to ``IRuntime::deserializeCudaEngine`` without a copy, so no host copy of the plan exists
    next to the engine: the mapped pages are file-backed page cache, which the kernel can drop, and they are
    unmapped when this returns."""
    with open(path, "rb") as f:
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:                        # an empty file cannot be mapped
            return None
    with mm:
        view = memoryview(mm)
        try:
            return runtime.deserialize_cuda_engine(view)
        finally:
            view.release()


# ---------------------------------------------------------------------------------------------------------------------
# native libraries: ELF dynamic sections, CUDA runtime majors
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class ElfDynamic:
    """What the dynamic loader reads from a shared library: DT_NEEDED sonames, DT_RPATH/DT_RUNPATH entries (as
    written, ``$ORIGIN`` unexpanded), the defined, default-visibility symbols of ``.dynsym`` and the undefined ones
    it needs from elsewhere."""

    needed: List[str] = field(default_factory=list)
    rpath: List[str] = field(default_factory=list)
    exports: FrozenSet[str] = frozenset()
    imports: FrozenSet[str] = frozenset()          # undefined, non-weak global symbols (resolved from DT_NEEDED)
    soname: Optional[str] = None

    def search_dirs(self, path) -> List[Path]:
        origin = str(Path(path).resolve().parent)
        return [Path(d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin)) for d in self.rpath if d]


def read_elf_dynamic(path) -> ElfDynamic:
    """Parse the ELF header, section headers, ``.dynamic`` and ``.dynsym`` of a shared library (32/64-bit, either
    byte order; no external tool, nothing is loaded). CheersError if it is not an ELF file with a dynamic section."""
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return _parse_elf(m, path)
    except (OSError, ValueError) as exc:
        raise CheersError(f"cannot read {path} as a shared library: {exc}") from None
    except struct.error:
        raise CheersError(f"{path} is not a valid ELF shared library (truncated headers)") from None


def _parse_elf(m, path: Path) -> ElfDynamic:
    if m[:4] != b"\x7fELF" or m[4] not in (1, 2) or m[5] not in (1, 2):
        raise CheersError(f"{path} is not an ELF shared library")
    is64, end = m[4] == 2, "<" if m[5] == 1 else ">"
    ehdr = struct.unpack_from(end + ("HHIQQQIHHHHHH" if is64 else "HHIIIIIHHHHHH"), m, 16)
    shoff, shentsize, shnum = ehdr[5], ehdr[10], ehdr[11]
    sh_fmt = end + ("IIQQQQIIQQ" if is64 else "IIIIIIIIII")
    if shoff and shnum == 0:                                  # >= 0xff00 sections: the count is in section 0
        shnum = struct.unpack_from(sh_fmt, m, shoff)[5]
    sections = [struct.unpack_from(sh_fmt, m, shoff + i * shentsize) for i in range(shnum)] if shoff else []

    def cstr(table_off: int, table_size: int, off: int) -> str:
        if off >= table_size:
            return ""
        stop = m.find(b"\0", table_off + off, table_off + table_size)
        return bytes(m[table_off + off:stop if stop >= 0 else table_off + table_size]).decode(errors="replace")

    out = ElfDynamic()
    exports, imports = set(), set()
    for sh in sections:
        sh_type, sh_offset, sh_size, sh_link = sh[1], sh[4], sh[5], sh[6]
        if sh_type not in (6, 11) or sh_link >= len(sections):        # SHT_DYNAMIC, SHT_DYNSYM
            continue
        strtab = sections[sh_link]
        str_off, str_size = strtab[4], strtab[5]
        if sh_type == 6:
            fmt = end + ("qQ" if is64 else "iI")
            step = struct.calcsize(fmt)
            for i in range(sh_size // step):
                tag, val = struct.unpack_from(fmt, m, sh_offset + i * step)
                if tag == 0:                                          # DT_NULL
                    break
                if tag == 1:                                          # DT_NEEDED
                    out.needed.append(cstr(str_off, str_size, val))
                elif tag == 14:                                       # DT_SONAME
                    out.soname = cstr(str_off, str_size, val)
                elif tag in (15, 29):                                 # DT_RPATH, DT_RUNPATH
                    out.rpath += cstr(str_off, str_size, val).split(":")
        else:
            fmt = end + ("IBBHQQ" if is64 else "IIIBBH")
            step = struct.calcsize(fmt)
            for i in range(1, sh_size // step):
                st = struct.unpack_from(fmt, m, sh_offset + i * step)
                name, info, other, shndx = (st[0], st[1], st[2], st[3]) if is64 else (st[0], st[3], st[4], st[5])
                if shndx != 0 and (info >> 4) in (1, 2, 10) and (other & 3) in (0, 3):   # defined, global/weak/
                    exports.add(cstr(str_off, str_size, name))                           # unique, default/protected
                elif shndx == 0 and (info >> 4) == 1:                                    # undefined, global
                    imports.add(cstr(str_off, str_size, name))
    if not any(sh[1] == 6 for sh in sections):
        raise CheersError(f"{path} has no ELF dynamic section: not a shared library")
    out.exports, out.imports = frozenset(exports), frozenset(imports)
    return out


def cudart_major(needed) -> Optional[int]:
    """N of the ``libcudart.so.N`` among DT_NEEDED sonames (``libcudart.so.11.0`` -> 11), or None."""
    for name in needed:
        m = re.match(r"libcudart\.so\.(\d+)", name)
        if m:
            return int(m.group(1))
    return None


def _mapped_libraries(pattern: str) -> List[str]:
    """Paths of the shared objects mapped into this process whose file name matches ``pattern`` (Linux)."""
    out: List[str] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/maps").read_text().splitlines():
            parts = line.split(None, 5)
            if len(parts) == 6 and re.search(pattern, os.path.basename(parts[5])) and parts[5] not in out:
                out.append(parts[5])
    return out


def loaded_cudart_libraries() -> List[Tuple[str, object]]:
    """(file, ctypes handle) of every shared CUDA runtime (``libcudart.so.N``) already loaded into this process -
    the one TensorRT plugins and other native code call; ``RTLD_NOLOAD``, so nothing new is loaded. cuda-python is
    not among them: it links the CUDA runtime statically (its own runtime state)."""
    out = []
    for p in _mapped_libraries(r"^libcudart\.so\.\d+"):
        with contextlib.suppress(OSError):
            out.append((os.path.basename(p), ctypes.CDLL(p, mode=getattr(os, "RTLD_NOLOAD", 4))))
    return out


def find_shared_library(name: str, extra_dirs=()) -> Optional[str]:
    """Where the dynamic loader would get ``name`` for a library with RUNPATH ``extra_dirs``: already loaded, in one of
    ``extra_dirs``, or loadable by name (LD_LIBRARY_PATH as the process started, the ld.so cache, the default
    directories; this loads it). None if none of them has it."""
    mode = getattr(os, "RTLD_NOLOAD", 4)
    with contextlib.suppress(OSError):
        ctypes.CDLL(name, mode=mode)
        return name
    for d in extra_dirs:
        if (Path(d) / name).is_file():
            return str(Path(d) / name)
    with contextlib.suppress(OSError):
        ctypes.CDLL(name, mode=getattr(os, "RTLD_GLOBAL", 0x100))
        return name
    return None


_DPKG_STATUS = Path("/var/lib/dpkg/status")


def _dpkg_cuda_major(trt_major_: int) -> Optional[int]:
    """JetPack / Debian packages: ``libnvinfer<N>`` version ``10.3.0.30-1+cuda12.5`` -> 12."""
    try:
        text = _DPKG_STATUS.read_text(errors="replace")
    except OSError:
        return None
    for para in text.split("\n\n"):
        if re.search(rf"^Package: libnvinfer{trt_major_}$", para, re.M) and "install ok installed" in para:
            m = re.search(r"^Version: .*\+cuda(\d+)", para, re.M)
            if m:
                return int(m.group(1))
    return None


def _pip_tensorrt_cuda_majors() -> set:
    """N of every installed pip distribution named ``tensorrt-cuN...`` (tensorrt-cu12, tensorrt-cu12-libs, ...)."""
    majors = set()
    with contextlib.suppress(Exception):
        from importlib import metadata

        for dist in metadata.distributions():
            m = re.match(r"tensorrt[-_]cu(\d+)", str(dist.metadata.get("Name") or "").lower())
            if m:
                majors.add(int(m.group(1)))
    return majors


def tensorrt_cuda_major(trt=None) -> Tuple[Optional[int], str]:
    """(CUDA major TensorRT was built for, how it was found) or (None, why not), for the TensorRT in this process:
    its version string (``...+cuda13``), the DT_NEEDED ``libcudart.so.N`` of the loaded libnvinfer, the pip
    distributions (``tensorrt-cu12-*``), the Debian/JetPack package version (``libnvinfer10 10.3.0.30-1+cuda12.5``) or
    a ``cuda-12.x`` in the path of the loaded libnvinfer (NVIDIA's tarballs)."""
    trt = trt if trt is not None else import_tensorrt()
    version = str(getattr(trt, "__version__", ""))
    m = re.search(r"(?:\+|[._-])cu(?:da)?-?(\d+)", version)
    if m:
        return int(m.group(1)), f"TensorRT version {version}"
    libs = _mapped_libraries(r"^libnvinfer\.so\.\d+")
    for lib in libs:
        with contextlib.suppress(CheersError):
            major = cudart_major(read_elf_dynamic(lib).needed)
            if major is not None:
                return major, f"{lib} needs libcudart.so.{major}"
    majors = _pip_tensorrt_cuda_majors()
    if len(majors) == 1:
        major = majors.pop()
        return major, f"pip package tensorrt-cu{major}"
    deb = _dpkg_cuda_major(version_tuple(version)[0])
    if deb is not None:
        return deb, f"package libnvinfer{version_tuple(version)[0]} (+cuda{deb})"
    for lib in libs:
        pm = re.search(r"cuda-?(\d+)\.\d+", lib)
        if pm:
            return int(pm.group(1)), f"the path of {lib}"
    why = "pip packages for several CUDA majors" if majors else "no libcudart in libnvinfer's DT_NEEDED, no " \
          "tensorrt-cuNN pip package, no libnvinfer Debian package"
    return None, f"unknown ({why})"
