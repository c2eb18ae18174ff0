"""Where engines live in a workdir and whether a folder of them fits this machine: the engine layout that the builder
writes and the TensorRT backend reads (no TensorRT import here).

    <workdir>/engines/<precision>/trt<TensorRT version>/sm<compute capability>/<graph>.plan + engine_manifest.json
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..constants import ENGINE_FORMAT, ENGINE_MANIFEST, ENGINES_DIR, PRECISIONS, sm_key
from ..errors import CheckpointError, InputError
from ..fileio import contained, read_json, write_json
from ..manifest import DTYPES, Manifest, _Reader


def _safe(s: str) -> str:
    return re.sub(r"[^0-9A-Za-z._-]+", "_", str(s)).strip("_") or "unknown"


def version_key(tensorrt_version: str) -> str:
    """'10.3.0.30' -> 'trt10.3.0.30' (engines are only valid for the exact TensorRT version that built them)."""
    return "trt" + _safe(tensorrt_version)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def engine_dir(workdir, precision: str, tensorrt_version: str, compute_capability: str) -> Path:
    """``<workdir>/engines/<precision>/trt<version>/sm<cc>``: one folder per (precision, TensorRT, GPU arch)."""
    check_precision(precision)
    return Path(workdir) / ENGINES_DIR / precision / version_key(tensorrt_version) / sm_key(compute_capability)


def contained_engine_dir(workdir, folder) -> Path:
    """`folder` (an engine folder below `workdir`), refused when a link takes it (or its manifest) out of the
    workdir: engine folders are read from untrusted workdirs too."""
    workdir = Path(workdir)
    rel = Path(folder).relative_to(workdir).as_posix()
    contained(workdir, rel, f"workdir {workdir}: engine folder", kind="dir")
    contained(workdir, f"{rel}/{ENGINE_MANIFEST}", f"workdir {workdir}: engine manifest")
    return Path(folder)


def plan_path(workdir, precision: str, tensorrt_version: str, compute_capability: str, graph: str) -> Path:
    return engine_dir(workdir, precision, tensorrt_version, compute_capability) / f"{graph}.plan"


def how_to_make(workdir, precision: str) -> str:
    """The command that writes the graphs of `precision` into a workdir."""
    wd = shlex.quote(str(workdir))
    if precision == "fp32":
        return f"cheers-deploy export --out {wd}"
    if precision in ("fp16", "bf16"):
        return f"cheers-deploy calibrate convert --workdir {wd} --precision {precision}"
    make_int8 = f"cheers-deploy calibrate capture --workdir {wd} && cheers-deploy calibrate quantize --workdir {wd}"
    return make_int8 if precision == "int8" else f"{make_int8} && cheers-deploy calibrate sweep --workdir {wd}"


def graph_source(man: Manifest, graph: str, precision: str) -> Tuple[Path, Optional[Path]]:
    """(graph file, external data file or None) of ``graph`` in ``precision``: the exported entry for the manifest's
    own precision (fp32), else the precision variant written by the calibration/conversion workflow."""
    check_precision(precision)
    entry = man.graph(graph)
    wd = man.workdir
    v = entry.variant(precision) if (precision == man.precision or precision in entry.precisions) else None
    if v is None:
        have = sorted({man.precision, *entry.precisions})
        raise CheckpointError(f"workdir {wd} has no {precision} graph for '{graph}' (available: {', '.join(have)}): "
                              f"make it with `{how_to_make(wd, precision)}`, or build the graphs that exist with "
                              f"--precision {have[0]}")
    man.check_provenance()                                  # never build engines from a mixed workdir
    src, data = man.graph_files(graph, precision)          # contained in the workdir (or refused)
    for f in (src, data):
        if f is not None and not f.is_file():
            raise CheckpointError(f"workdir {wd}: graph '{graph}' ({precision}) is missing {f.name}; re-run "
                                  f"`{how_to_make(wd, precision)}`")
    return src, data


def compat_differences(engine_manifest: "EngineManifest", runtime: dict, allow_other_gpu: bool = False) -> List[str]:
    """What differs between the machine an engine folder was built on and ``runtime``
    ({"tensorrt": ..., "gpu": ..., "compute_capability": ...}). Empty = compatible."""
    diffs = []
    built_trt = engine_manifest.tensorrt
    if str(built_trt) != str(runtime.get("tensorrt")):
        diffs.append(f"TensorRT {built_trt} (this machine runs TensorRT {runtime.get('tensorrt')}; plans only load "
                     f"in the TensorRT version that built them)")
    gpu = engine_manifest.gpu or {}
    if str(gpu.get("compute_capability")) != str(runtime.get("compute_capability")):
        diffs.append(f"compute capability {gpu.get('compute_capability')} ({gpu.get('name')}) (this GPU: "
                     f"{runtime.get('compute_capability')}, {runtime.get('gpu')})")
    elif not allow_other_gpu and str(gpu.get("name")) != str(runtime.get("gpu")):
        diffs.append(f"GPU '{gpu.get('name')}' (this GPU: '{runtime.get('gpu')}'; same compute capability, but "
                     f"TensorRT tunes tactics per GPU model)")
    return diffs


def check_engine_compat(engine_manifest: "EngineManifest", runtime: dict, where: str = "", workdir="W", precision: str = "fp16",
                        allow_other_gpu: bool = False) -> None:
    """Raise CheckpointError naming every difference (TensorRT version, compute capability, GPU name)."""
    diffs = compat_differences(engine_manifest, runtime, allow_other_gpu)
    if diffs:
        raise CheckpointError(f"{where or 'engines'} were built for {'; '.join(diffs)}: rebuild them on this machine "
                              f"with `cheers-deploy build --workdir {workdir} --precision {precision}`")


def find_engine_dir(workdir, precision: str, runtime: dict, allow_other_gpu: bool = False) -> Path:
    """The engine folder of ``precision`` for this machine; a clear error when there is none or when only folders
    built elsewhere exist (naming what differs)."""
    workdir = Path(workdir)
    check_precision(precision)
    want = engine_dir(workdir, precision, runtime["tensorrt"], runtime["compute_capability"])
    contained_engine_dir(workdir, want)
    if (want / ENGINE_MANIFEST).is_file():
        em = read_engine_manifest(want)
        check_engine_compat(em, runtime, where=str(want), workdir=workdir, precision=precision,
                            allow_other_gpu=allow_other_gpu)
        return want
    others = sorted((workdir / ENGINES_DIR / precision).glob(f"*/*/{ENGINE_MANIFEST}"))
    if others:
        contained_engine_dir(workdir, others[0].parent)
        em = read_engine_manifest(others[0].parent)
        diffs = compat_differences(em, runtime, allow_other_gpu) or ["another TensorRT/GPU folder layout"]
        raise CheckpointError(f"no {precision} engines for this machine in {workdir / 'engines' / precision}: the "
                              f"engines in {others[0].parent} were built for {'; '.join(diffs)}: rebuild with "
                              f"`cheers-deploy build --workdir {workdir} --precision {precision}`")
    raise CheckpointError(f"workdir {workdir} has no {precision} TensorRT engines: build them with "
                          f"`cheers-deploy build --workdir {workdir} --precision {precision}`")


@dataclass
class EngineEntry:
    """One built engine (a plan file) and what it was built from."""
    file: str
    profiles: List[dict] = field(default_factory=list)       # [{"name": mode, "index": i, "shapes": {...}}]
    inputs: List[dict] = field(default_factory=list)         # [{"name", "dtype", "shape"}] as the engine reports
    outputs: List[dict] = field(default_factory=list)
    source_id: Optional[dict] = None
    fingerprint: Optional[str] = None
    fused_gates: int = 0
    size_bytes: int = 0
    device_memory_bytes: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)

    KNOWN = ("file", "profiles", "inputs", "outputs", "source_id", "fingerprint", "fused_gates", "size_bytes",
             "device_memory_bytes")

    @classmethod
    def from_dict(cls, name: str, d, where: str) -> "EngineEntry":
        r = _Reader(d, where, f"engines.{name}")
        profiles = r.items("profiles", list, [])
        for i, p in enumerate(profiles):
            pr = _Reader(p, where, f"engines.{name}.profiles[{i}]")
            pr.get("name", str), pr.int_in("index", 0, 1023)
        tensors = {}
        for key in ("inputs", "outputs"):
            tensors[key] = r.items(key, list, [])
            for i, t in enumerate(tensors[key]):
                tr = _Reader(t, where, f"engines.{name}.{key}[{i}]")
                tr.get("name", str)
                if tr.get("dtype", str) not in DTYPES:
                    raise CheckpointError(f"{where}: field 'engines.{name}.{key}[{i}].dtype' = {t['dtype']!r:.40} is "
                                          f"not one of {', '.join(DTYPES)}; rebuild with --force")
        return cls(r.file("file"), profiles, tensors["inputs"], tensors["outputs"],
                   r.get("source_id", dict, None, allow_none=True), r.get("fingerprint", str, None, allow_none=True),
                   r.int_in("fused_gates", 0, 1 << 20, 0, allow_none=True) or 0, r.int_in("size_bytes", 0, 1 << 50, 0),
                   r.int_in("device_memory_bytes", 0, 1 << 50, 0), r.rest(cls.KNOWN))

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self.KNOWN}
        out.update(self.extra)
        return out

    def profile_index(self, mode: str) -> int:
        """Index of a named profile (the runtime picks contexts by mode)."""
        for p in self.profiles:
            if p["name"] == mode:
                return int(p["index"])
        raise CheckpointError(f"engine {self.file} has no '{mode}' profile (has: {[p['name'] for p in self.profiles]})")

    def tensor_dtypes(self) -> Dict[str, str]:
        return {t["name"]: t["dtype"] for t in self.inputs + self.outputs if isinstance(t, dict) and "name" in t}


@dataclass
class EngineManifest:
    """`engine_manifest.json` of one engine folder: the machine it was built for, the plugin, the engines."""
    precision: str
    tensorrt: str
    gpu: Dict[str, Any] = field(default_factory=dict)
    engines: Dict[str, EngineEntry] = field(default_factory=dict)
    plugin: Optional[Dict[str, Any]] = None                  # {"path", "sha256", "name", "version"}
    extra: Dict[str, Any] = field(default_factory=dict)
    format: str = ENGINE_FORMAT

    KNOWN = ("format", "precision", "tensorrt", "gpu", "engines", "plugin")

    @classmethod
    def from_dict(cls, data, where: str) -> "EngineManifest":
        r = _Reader(data, where)
        if r.get("format", str, None, allow_none=True) != ENGINE_FORMAT:
            raise CheckpointError(f"{where}: engine manifest format is not {ENGINE_FORMAT!r}; rebuild with --force")
        engines = {g: EngineEntry.from_dict(g, d, where) for g, d in r.items("engines", dict, {}).items()}
        plugin = r.get("plugin", dict, None, allow_none=True)
        if plugin is not None:
            pr = _Reader(plugin, where, "plugin")
            for k in ("path", "sha256", "name", "version"):
                pr.get(k, str, None, allow_none=True)
            sha = plugin.get("sha256")
            if sha is not None and not re.fullmatch(r"[0-9a-f]{64}", sha):
                raise CheckpointError(f"{where}: field 'plugin.sha256' = {sha!r:.80} is not a sha256 hex digest; "
                                      f"rebuild with --force")
        return cls(r.get("precision", str), r.get("tensorrt", str), r.get("gpu", dict, {}), engines, plugin,
                   r.rest(cls.KNOWN))

    def to_dict(self) -> dict:
        out = {"format": self.format, "precision": self.precision, "tensorrt": self.tensorrt, "gpu": self.gpu,
               "plugin": self.plugin, "engines": {g: e.to_dict() for g, e in self.engines.items()}}
        out.update(self.extra)
        return out

def read_engine_manifest(folder) -> EngineManifest:
    """`engine_manifest.json` of an engine folder, read with fileio.read_json (size cap, strict JSON) and typed
    field by field; every error is one line naming the file and the field."""
    path = Path(folder) / ENGINE_MANIFEST
    return EngineManifest.from_dict(read_json(path, f"{path} (engine manifest; rebuild with --force)"), str(path))


def plan_file(folder, em: EngineManifest, graph: str) -> Path:
    """The plan file of `graph` in the engine folder `folder`, contained in it (the engine manifest names it)."""
    return contained(folder, em.engines[graph].file, f"{Path(folder) / ENGINE_MANIFEST}: field 'engines.{graph}.file'")


def write_engine_manifest(folder, em: EngineManifest) -> Path:
    return write_json(Path(folder) / ENGINE_MANIFEST, em.to_dict())


def file_stamp(path: Optional[Path]) -> Optional[list]:
    if path is None:
        return None
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


def source_id(man: Manifest, graph: str, precision: str) -> Optional[dict]:
    """What identifies the graph an engine was built from, robust to copying the workdir: the export manifest's
    hashes of the entry (and of the precision variant) plus the file size. None when the graph file is gone (a
    deployment may delete the ONNX files after building)."""
    try:
        src, data = graph_source(man, graph, precision)
    except CheckpointError:
        return None
    entry = man.graph(graph)
    variant = entry.precisions.get(precision)
    return {"file": src.name, "size": src.stat().st_size, "data_size": data.stat().st_size if data else None,
            "spec_hash": entry.spec_hash, "source_hash": entry.source_hash,
            "variant": variant.hashes() if variant is not None else {}}

