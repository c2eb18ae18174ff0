"""The gated-residual plugin library at run and build time: where to find it, checking it before it is loaded (sha256,
the CUDA runtime it links: docs/security.md), loading it into TensorRT's plugin registry, and checking that the creator
it registers is ours (name/version from constants.py)."""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import Dict, Optional

from ..constants import PLUGIN_ENV, PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION
from ..errors import CheckpointError, CheersError, InputError
from ..fileio import sha256_file
from . import compat
from .compat import import_tensorrt

log = logging.getLogger(__name__)

_LOADED: Dict[str, object] = {}


def _exports(path: Path, symbol: str) -> bool:
    """Whether the library exports ``symbol`` (read from its ELF dynamic symbol table; nothing is loaded)."""
    return symbol in compat.read_elf_dynamic(path).exports


def check_plugin_cuda_runtime(path: Path, trt) -> Optional[int]:
    """Refuse a plugin library that would put a second CUDA runtime into the process or cannot load its own: its
    DT_NEEDED ``libcudart.so.N`` must have the CUDA major TensorRT was built for, and the dynamic loader must find it
    (already loaded, the library's RUNPATH, LD_LIBRARY_PATH or the ld.so cache). Returns N (None: the library needs
    no shared CUDA runtime). Nothing of the plugin is loaded."""
    info = compat.read_elf_dynamic(path)
    major = compat.cudart_major(info.needed)
    if major is None:
        return None
    soname = next(n for n in info.needed if n.startswith("libcudart.so."))
    trt_cuda, source = compat.tensorrt_cuda_major(trt)
    if trt_cuda is not None and trt_cuda != major:
        raise CheersError(f"plugin library {path} links the CUDA {major} runtime ({soname}), but TensorRT "
                          f"{getattr(trt, '__version__', '?')} in this process is built for CUDA {trt_cuda} "
                          f"({source}): loading it would put two CUDA runtimes in one process. Rebuild the plugin "
                          f"with the CUDA {trt_cuda} toolkit (engines/plugins/gated_residual/README.md), or use the "
                          f"TensorRT build for CUDA {major}")
    if trt_cuda is None:
        log.warning("cannot tell which CUDA major TensorRT was built for (%s): plugin %s (%s) loaded unchecked",
                    source, path, soname)
    if compat.find_shared_library(soname, info.search_dirs(path)) is None:
        where = ", ".join(str(d) for d in info.search_dirs(path)) or "none"
        raise CheersError(f"plugin library {path} needs {soname}, which the dynamic loader cannot find (not loaded, "
                          f"not in the library's RUNPATH ({where}), not on LD_LIBRARY_PATH or in the ld.so cache): "
                          f"install the CUDA {major} runtime (JetPack: /usr/local/cuda/lib64; x86: the CUDA toolkit or "
                          f"`pip install nvidia-cuda-runtime-cu{major}`) and put its lib folder on LD_LIBRARY_PATH "
                          f"before starting Python")
    return major


def load_plugin_library(path, check_creator: bool = True, expected_sha256: Optional[str] = None,
                        where: str = "the engine manifest") -> Path:
    """Load the gated-residual plugin library once per process and check that ``CheersGatedResidual`` v1 is
    registered. ``libcheers_plugins.so`` (exports ``getCreators`` and ``setLoggerFinder``, as NVIDIA's own V3 plugin
    libraries do) goes through ``trt.get_plugin_registry().load_library``; ``libcheers_plugins_static_reg.so``
    registers itself when it is dlopen'ed (ctypes). Loading both in one process makes TensorRT refuse the second
    (duplicate creator).

    Before anything is dlopen'ed: `expected_sha256` (what `cheers-deploy build` recorded in the engine manifest
    `where`) must equal the library's sha256 (a mismatch is a CheckpointError naming both hashes), and the CUDA
    runtime the library links must be TensorRT's and findable (check_plugin_cuda_runtime)."""
    trt = import_tensorrt()
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise InputError(f"plugin library not found: {path} (build it: see engines/plugins/gated_residual/README.md)")
    if expected_sha256 is not None:
        have = sha256_file(path)
        if have != expected_sha256:
            raise CheckpointError(f"plugin library {path} has sha256 {have}, but {where} records {expected_sha256} "
                                  f"(field 'plugin.sha256'): not the library the engines were built with; pass the "
                                  f"right one or rebuild the engines with this one")
    key = str(path)
    if key not in _LOADED:
        check_plugin_cuda_runtime(path, trt)
        if _exports(path, "getCreators"):
            handle = trt.get_plugin_registry().load_library(key)
            if handle is None:
                raise CheersError(f"TensorRT refused the plugin library {path} (see the TensorRT log above; a "
                                  f"library with the same creator may already be loaded)")
        else:
            try:
                handle = ctypes.CDLL(key, mode=getattr(os, "RTLD_GLOBAL", 0x100))
            except OSError as exc:
                raise CheersError(f"cannot load the plugin library {path}: {exc}") from exc
        _LOADED[key] = handle
    if check_creator and not plugin_registered():
        raise CheersError(f"{path} loaded, but TensorRT's plugin registry has no {PLUGIN_NAME} version "
                          f"{PLUGIN_VERSION}: is it the gated-residual plugin library built for this TensorRT?")
    return path


def plugin_registered(name: str = PLUGIN_NAME, version: str = PLUGIN_VERSION,
                      namespace: str = PLUGIN_NAMESPACE) -> bool:
    trt = import_tensorrt()
    reg = trt.get_plugin_registry()
    for getter in ("get_creator", "get_plugin_creator"):     # get_creator: TensorRT >= 10 (V3 creators)
        fn = getattr(reg, getter, None)
        if fn is None:
            continue
        try:
            if fn(name, version, namespace) is not None:
                return True
        except Exception:  # noqa: BLE001 - a missing creator raises in some versions
            continue
    return False


def default_plugin_library() -> Optional[Path]:
    """$CHEERS_TRT_PLUGIN, else the CMake build folder of the repository checkout, else None (places the user or the
    package chose; a path recorded in a workdir is never a default)."""
    env = os.environ.get(PLUGIN_ENV)
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[2] / "engines" / "plugins" / "gated_residual"
    for cand in (root / "build" / "libcheers_plugins.so", root.parents[2] / "build" / "libcheers_plugins.so"):
        if cand.is_file():
            return cand
    return None
