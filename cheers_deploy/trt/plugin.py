"""The gated-residual plugin library at run and build time: where to find it, loading it into TensorRT's plugin registry,
and checking that the creator it registers is ours (name/version from constants.py)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Dict, Optional

from ..constants import PLUGIN_ENV, PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION
from ..errors import CheckpointError, CheersError, InputError
from ..fileio import sha256_file
from .compat import import_tensorrt

_LOADED: Dict[str, object] = {}


def _exports(path: Path, symbol: str) -> bool:
    try:
        lib = ctypes.CDLL(str(path), mode=getattr(os, "RTLD_LAZY", 1) | getattr(os, "RTLD_LOCAL", 0))
    except OSError as exc:
        raise CheersError(f"cannot load the plugin library {path}: {exc}") from exc
    return hasattr(lib, symbol)


def load_plugin_library(path, check_creator: bool = True, expected_sha256: Optional[str] = None,
                        where: str = "the engine manifest") -> Path:
    """Load the gated-residual plugin library once per process and check that ``CheersGatedResidual`` v1 is
    registered. ``libcheers_plugins.so`` (exports ``getCreators``) goes through
    ``trt.get_plugin_registry().load_library``; ``libcheers_plugins_static_reg.so`` registers itself when it is
    dlopen'ed (ctypes). Loading both in one process makes TensorRT refuse the second (duplicate creator).

    `expected_sha256` (what `cheers-deploy build` recorded in the engine manifest `where`): the library's sha256
    must equal it, checked before anything is dlopen'ed; a mismatch is a CheckpointError naming both hashes."""
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
        if _exports(path, "getCreators"):
            handle = trt.get_plugin_registry().load_library(key)
            if handle is None:
                raise CheersError(f"TensorRT refused the plugin library {path} (see the TensorRT log above; a "
                                  f"library with the same creator may already be loaded)")
        else:
            handle = ctypes.CDLL(key, mode=getattr(os, "RTLD_GLOBAL", 0x100))
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
