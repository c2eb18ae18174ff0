"""Build one TensorRT engine per exported graph through Polygraphy's TensorRT backend.

    workdir/manifest.json ─► graph file for the precision ─► (cfm_head: fuse the hi gate into the plugin node)
       ─► strongly typed network (ONNX parser) ─► one optimization profile per manifest mode
       ─► engine plan ─► workdir/engines/<precision>/trt<version>/sm<cc>/<graph>.plan + engine_manifest.json

* Strongly typed: the engine runs the dtypes written in the graph (fp32 graphs -> fp32 engine, fp16/bf16 graphs ->
  fp16/bf16, Q/DQ graphs -> int8 where the Q/DQ nodes say so). No builder precision flags: TensorRT 11 removed
  them, 10.x deprecates weak typing. A precision is therefore a *graph* property: fp16/bf16/int8/mixed graphs come
  from the calibration/conversion workflow (`cheers-deploy calibrate`), fp32 graphs from `cheers-deploy export`.
* Profiles come from the manifest (GraphSpec.profiles()): the backbone gets ONE engine with three profiles
  (prefill, decode, image_step) sharing one copy of the weights; every other graph one profile (docs/tensorrt.md).
* Idempotent: a plan is rebuilt only when its fingerprint (source graph files, plugin library, profiles, TensorRT
  version, GPU, build options) changed, or with ``force``.
* The timing cache (per TensorRT version and GPU) is loaded and updated, so rebuilds are fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import CheckpointError, CheersError, InputError
from ..runtime.manifest import MANIFEST_NAME, Manifest
from . import compat

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "mixed")
GRAPHS = ("vae_encoder", "vision_tokenizer", "backbone", "cfm_head", "vae_decoder")
ENGINE_MANIFEST = "engine_manifest.json"
ENGINE_FORMAT = "cheers-deploy-engines/1"
TIMING_CACHE = "timing.cache"
FUSED_DIR = "fused"
PLUGIN_GRAPHS = ("cfm_head",)            # graphs that contain a hi gate

Profiles = List[Tuple[str, Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]]]]


# ---------------------------------------------------------------------------------------------------------------------
# paths
# ---------------------------------------------------------------------------------------------------------------------
def _safe(s: str) -> str:
    return re.sub(r"[^0-9A-Za-z._-]+", "_", str(s)).strip("_") or "unknown"


def version_key(tensorrt_version: str) -> str:
    """'10.3.0.30' -> 'trt10.3.0.30' (engines are only valid for the exact TensorRT version that built them)."""
    return "trt" + _safe(tensorrt_version)


def sm_key(compute_capability: str) -> str:
    """'8.7' -> 'sm87', '11.0' -> 'sm110'."""
    parts = str(compute_capability).split(".")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise InputError(f"compute capability must look like '8.7', got {compute_capability!r}")
    return f"sm{int(parts[0])}{int(parts[1])}"


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def engine_dir(workdir, precision: str, tensorrt_version: str, compute_capability: str) -> Path:
    """``<workdir>/engines/<precision>/trt<version>/sm<cc>``: one folder per (precision, TensorRT, GPU arch)."""
    check_precision(precision)
    return Path(workdir) / "engines" / precision / version_key(tensorrt_version) / sm_key(compute_capability)


def plan_path(workdir, precision: str, tensorrt_version: str, compute_capability: str, graph: str) -> Path:
    return engine_dir(workdir, precision, tensorrt_version, compute_capability) / f"{graph}.plan"


# ---------------------------------------------------------------------------------------------------------------------
# manifest -> sources and profiles
# ---------------------------------------------------------------------------------------------------------------------
def graph_source(man: Manifest, graph: str, precision: str) -> Tuple[Path, Optional[Path]]:
    """(graph file, external data file or None) of ``graph`` in ``precision``.

    The exported graphs carry the manifest's ``precision`` (fp32). Other precisions are looked up in
    ``manifest.graphs[graph]["precisions"][precision] = {"file": ..., "external_data": ...}`` (written by the
    calibration/conversion workflow)."""
    check_precision(precision)
    entry = man.graph(graph)
    wd = man.workdir
    variants = entry.get("precisions") or {}
    if precision in variants:
        v = variants[precision]
    elif precision == man.data.get("precision", "fp32"):
        v = entry
    else:
        have = sorted({man.data.get("precision", "fp32"), *variants})
        how = ("run `cheers-deploy calibrate --workdir {wd} --precision {p}` first (int8/mixed graphs need "
               "calibration data)" if precision in ("int8", "mixed") else
               "convert the graphs first (`cheers-deploy calibrate --workdir {wd} --precision {p}` writes "
               "fp16/bf16 graphs)").format(wd=wd, p=precision)
        raise CheckpointError(f"workdir {wd} has no {precision} graph for '{graph}' (available: {', '.join(have)}): "
                              f"{how}, or build the exported graphs with --precision {have[0]}")
    if not v.get("file"):
        raise CheckpointError(f"{wd / MANIFEST_NAME}: graph '{graph}' ({precision}) has no file entry; re-export")
    src = wd / v["file"]
    data = wd / v["external_data"] if v.get("external_data") else None
    for f in (src, data):
        if f is not None and not f.is_file():
            raise CheckpointError(f"workdir {wd}: graph '{graph}' ({precision}) is missing {f.name}; re-run "
                                  f"cheers-deploy export{'' if precision == 'fp32' else ' / calibrate'}")
    return src, data


def profiles_for(entry: dict, graph: str = "") -> Profiles:
    """[(mode, {input: (min, opt, max)})] from a manifest graph entry, in manifest order (backbone: prefill, decode,
    image_step; other graphs: default). Every input must have three shapes of its rank with min <= opt <= max."""
    profs = entry.get("profiles")
    if not isinstance(profs, dict) or not profs:
        raise CheckpointError(f"manifest entry of graph '{graph}' has no build profiles; re-export")
    inputs = {t["name"]: t for t in entry.get("inputs", [])}
    out: Profiles = []
    for mode, shapes in profs.items():
        prof = {}
        missing = [n for n in inputs if n not in shapes]
        if missing:
            raise CheckpointError(f"graph '{graph}' profile '{mode}' has no shapes for input '{missing[0]}'; "
                                  f"re-export")
        for name, triple in shapes.items():
            if name not in inputs:
                raise CheckpointError(f"graph '{graph}' profile '{mode}' names unknown input '{name}'; re-export")
            if not isinstance(triple, (list, tuple)) or len(triple) != 3:
                raise CheckpointError(f"graph '{graph}' profile '{mode}' input '{name}': expected [min, opt, max]")
            mn, opt, mx = (tuple(int(d) for d in s) for s in triple)
            rank = len(inputs[name]["shape"])
            if not len(mn) == len(opt) == len(mx) == rank:
                raise CheckpointError(f"graph '{graph}' profile '{mode}' input '{name}': shapes of rank "
                                      f"{len(mn)}/{len(opt)}/{len(mx)}, the input has rank {rank}")
            for axis, (a, b, c, decl) in enumerate(zip(mn, opt, mx, inputs[name]["shape"])):
                if not (1 <= a <= b <= c):
                    raise CheckpointError(f"graph '{graph}' profile '{mode}' input '{name}' axis {axis}: "
                                          f"min/opt/max {a}/{b}/{c} are not ordered")
                if isinstance(decl, int) and not a == b == c == decl:
                    raise CheckpointError(f"graph '{graph}' profile '{mode}' input '{name}' axis {axis} is static "
                                          f"({decl}) but the profile says {a}/{b}/{c}")
            prof[name] = (mn, opt, mx)
        out.append((mode, prof))
    return out


def profile_index(engine_entry: dict, mode: str) -> int:
    """Index of a named profile in an engine-manifest entry (the runtime picks contexts by mode)."""
    for p in engine_entry.get("profiles", []):
        if p["name"] == mode:
            return int(p["index"])
    names = [p["name"] for p in engine_entry.get("profiles", [])]
    raise CheckpointError(f"engine has no '{mode}' profile (has: {names})")


# ---------------------------------------------------------------------------------------------------------------------
# compatibility of built engines with this machine
# ---------------------------------------------------------------------------------------------------------------------
def compat_differences(engine_manifest: dict, runtime: dict, allow_other_gpu: bool = False) -> List[str]:
    """What differs between the machine an engine folder was built on and ``runtime``
    ({"tensorrt": ..., "gpu": ..., "compute_capability": ...}). Empty = compatible."""
    diffs = []
    built_trt = engine_manifest.get("tensorrt")
    if str(built_trt) != str(runtime.get("tensorrt")):
        diffs.append(f"TensorRT {built_trt} (this machine runs TensorRT {runtime.get('tensorrt')}; plans only load "
                     f"in the TensorRT version that built them)")
    gpu = engine_manifest.get("gpu") or {}
    if str(gpu.get("compute_capability")) != str(runtime.get("compute_capability")):
        diffs.append(f"compute capability {gpu.get('compute_capability')} ({gpu.get('name')}) (this GPU: "
                     f"{runtime.get('compute_capability')}, {runtime.get('gpu')})")
    elif not allow_other_gpu and str(gpu.get("name")) != str(runtime.get("gpu")):
        diffs.append(f"GPU '{gpu.get('name')}' (this GPU: '{runtime.get('gpu')}'; same compute capability, but "
                     f"TensorRT tunes tactics per GPU model)")
    return diffs


def check_engine_compat(engine_manifest: dict, runtime: dict, where: str = "", workdir="W", precision: str = "fp16",
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
    if (want / ENGINE_MANIFEST).is_file():
        em = read_engine_manifest(want)
        check_engine_compat(em, runtime, where=str(want), workdir=workdir, precision=precision,
                            allow_other_gpu=allow_other_gpu)
        return want
    others = sorted((workdir / "engines" / precision).glob(f"*/*/{ENGINE_MANIFEST}"))
    if others:
        em = read_engine_manifest(others[0].parent)
        diffs = compat_differences(em, runtime, allow_other_gpu) or ["another TensorRT/GPU folder layout"]
        raise CheckpointError(f"no {precision} engines for this machine in {workdir / 'engines' / precision}: the "
                              f"engines in {others[0].parent} were built for {'; '.join(diffs)}: rebuild with "
                              f"`cheers-deploy build --workdir {workdir} --precision {precision}`")
    raise CheckpointError(f"workdir {workdir} has no {precision} TensorRT engines: build them with "
                          f"`cheers-deploy build --workdir {workdir} --precision {precision}`")


def read_engine_manifest(folder) -> dict:
    path = Path(folder) / ENGINE_MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable engine manifest ({exc}); rebuild with --force") from None
    if not isinstance(data, dict) or data.get("format") != ENGINE_FORMAT:
        raise CheckpointError(f"{path}: engine manifest format is not {ENGINE_FORMAT!r}; rebuild with --force")
    return data


def write_engine_manifest(folder, data: dict) -> Path:
    path = Path(folder) / ENGINE_MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# fingerprints
# ---------------------------------------------------------------------------------------------------------------------
def _file_stamp(path: Optional[Path]) -> Optional[list]:
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
    variant = (entry.get("precisions") or {}).get(precision, {})
    return {"file": src.name, "size": src.stat().st_size, "data_size": data.stat().st_size if data else None,
            "spec_hash": entry.get("spec_hash"), "source_hash": entry.get("source_hash"),
            "variant": {k: v for k, v in variant.items() if "hash" in k or k == "sha256"}}


def fingerprint(source: Path, data: Optional[Path], profiles: Profiles, identity: dict, plugin_sha: Optional[str],
                options: dict) -> str:
    blob = {"source": _file_stamp(source), "data": _file_stamp(data), "profiles": [[m, {k: [list(s) for s in v]
            for k, v in p.items()}] for m, p in profiles], "identity": identity, "plugin": plugin_sha,
            "options": options}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# TensorRT side (thin)
# ---------------------------------------------------------------------------------------------------------------------
class ParseError(CheersError):
    """TensorRT's ONNX parser rejected the graph."""


def describe_parse_errors(errors: Sequence[dict], path: Path) -> str:
    if not errors:
        return f"TensorRT's ONNX parser could not read {path} (not a valid ONNX model?)"
    e = errors[0]
    name = e.get("name") or (f"#{e['node']}" if int(e.get("node", -1)) >= 0 else "?")
    msg = f"TensorRT's ONNX parser rejected node '{name}'"
    if e.get("op"):
        msg += f" (op {e['op']})"
    msg += f" of {path.name}: {e.get('desc', '').strip()}"
    if e.get("op") == compat.PLUGIN_NAME or compat.PLUGIN_NAME in e.get("desc", ""):
        msg += " -- the gated-residual plugin is not loaded: pass --plugin-lib (libcheers_plugins.so)"
    if len(errors) > 1:
        msg += f" (+{len(errors) - 1} more parser error(s))"
    return msg.replace("\n", " ")


def _network_loader(trt, pg, path: Path):
    """Callable for Polygraphy's engine builders: (builder, network, parser) of a strongly typed network, with
    parser errors turned into one ParseError naming the node."""

    def load():
        builder, network = pg.create_network(strongly_typed=bool(compat.strongly_typed_flag(trt)))
        logger = compat.trt_logger()
        trt.init_libnvinfer_plugins(logger, "")
        parser = trt.OnnxParser(network, logger)
        ok = parser.parse_from_file(str(path))
        errs = compat.parser_errors(parser)
        if not ok or errs:
            raise ParseError(describe_parse_errors(errs, path))
        return builder, network, parser

    return load


def _pg_profiles(pg, profiles: Profiles):
    out = []
    for _, prof in profiles:
        p = pg.Profile()
        for name, (mn, opt, mx) in prof.items():
            p.add(name, mn, opt, mx)
        out.append(p)
    return out


def inspect_engine(trt, plan: bytes) -> dict:
    """I/O tensors (name, dtype, shape with -1 for dynamic), per-profile shapes and activation memory of a plan."""
    runtime = trt.Runtime(compat.trt_logger())
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise CheersError("TensorRT could not deserialize the engine it just built")
    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        t = {"name": name, "dtype": compat.trt_to_numpy_dtype(trt, engine.get_tensor_dtype(name)),
             "shape": [int(d) for d in engine.get_tensor_shape(name)]}
        (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(t)
    info = {"inputs": inputs, "outputs": outputs, "num_profiles": int(engine.num_optimization_profiles),
            "device_memory_bytes": compat.engine_device_memory_size(engine)}
    del engine, runtime
    return info


def _plugin_sha(path: Optional[Path]) -> Optional[str]:
    return compat.file_sha256(path) if path is not None else None


# ---------------------------------------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------------------------------------
def resolve_plugin(plugin_lib) -> Optional[Path]:
    """An explicit library must exist; without one the default location is used if a build is there."""
    if plugin_lib is not None:
        p = Path(plugin_lib).expanduser()
        if not p.is_file():
            raise InputError(f"--plugin-lib {p}: file not found (build the plugin: engines/plugins/gated_residual/"
                             f"README.md)")
        return p.resolve()
    found = compat.default_plugin_library()
    return found.resolve() if found is not None and found.is_file() else None


def build_engines(workdir, precision: str = "fp16", plugin_lib=None, force: bool = False, timing_cache=None,
                  graphs: Optional[Sequence[str]] = None, fuse: bool = True, builder_optimization_level=None,
                  workspace_mib: Optional[int] = None, log: Callable[[str], None] = print) -> dict:
    """Build (or reuse) one engine per graph. Returns the engine manifest (also written next to the plans)."""
    workdir = Path(workdir)
    check_precision(precision)
    man = Manifest.load(workdir)
    names = list(graphs) if graphs else [g for g in GRAPHS if g in man.graphs]
    unknown = [g for g in names if g not in man.graphs]
    if unknown:
        raise InputError(f"graph(s) {unknown} not in {workdir / MANIFEST_NAME} (has: {sorted(man.graphs)})")
    # cheap checks first: every source file and profile, before TensorRT is even imported
    sources = {g: graph_source(man, g, precision) for g in names}
    profiles = {g: profiles_for(man.graph(g), g) for g in names}
    plugin = resolve_plugin(plugin_lib) if fuse else None

    trt = compat.import_tensorrt()
    pg = compat.import_polygraphy_trt()
    ident = compat.runtime_identity()
    gpu = compat.gpu_info()
    out = engine_dir(workdir, precision, ident["tensorrt"], ident["compute_capability"])
    out.mkdir(parents=True, exist_ok=True)
    cache_path = Path(timing_cache) if timing_cache else out / TIMING_CACHE
    if plugin is not None:
        compat.load_plugin_library(plugin)
    elif fuse and any(g in PLUGIN_GRAPHS for g in names):
        log("note: no gated-residual plugin library (--plugin-lib, $CHEERS_TRT_PLUGIN or build/libcheers_plugins.so):"
            " the hi gate is built from plain TensorRT layers")
    plugin_sha = _plugin_sha(plugin)

    em = {}
    if (out / ENGINE_MANIFEST).is_file():
        try:
            em = read_engine_manifest(out)
        except CheckpointError:
            em = {}
    em.update({"format": ENGINE_FORMAT, "precision": precision, "tensorrt": ident["tensorrt"],
               "gpu": {k: gpu[k] for k in ("name", "compute_capability", "sm", "total_memory") if k in gpu},
               "cuda": {k: gpu[k] for k in ("driver_version", "runtime_version") if k in gpu},
               "jetson": gpu.get("jetson"), "workdir_manifest": str(workdir / MANIFEST_NAME),
               "timing_cache": str(cache_path),
               "plugin": None if plugin is None else {"path": str(plugin), "sha256": plugin_sha,
                                                      "name": compat.PLUGIN_NAME, "version": compat.PLUGIN_VERSION}})
    engines = em.setdefault("engines", {})
    options = {"precision": precision, "fuse": bool(fuse and plugin is not None),
               "opt_level": builder_optimization_level, "workspace_mib": workspace_mib, "tf32": precision != "fp32"}
    for g in names:
        src, data = sources[g]
        plan = out / f"{g}.plan"
        use_plugin = plugin is not None and g in PLUGIN_GRAPHS
        fp = fingerprint(src, data, profiles[g], ident, plugin_sha if use_plugin else None, options)
        old = engines.get(g, {})
        if not force and plan.is_file() and old.get("fingerprint") == fp:
            log(f"{g:17s} up to date: {plan}")
            continue
        t0 = time.perf_counter()
        build_src, fused = src, None
        if use_plugin:
            build_src, fused = _fuse_for_build(src, out / FUSED_DIR / f"{g}.onnx", log)
        cfg = pg.CreateConfig(profiles=_pg_profiles(pg, profiles[g]),
                              load_timing_cache=str(cache_path) if cache_path.is_file() else None,
                              tf32=options["tf32"], builder_optimization_level=builder_optimization_level,
                              memory_pool_limits=({trt.MemoryPoolType.WORKSPACE: int(workspace_mib) << 20}
                                                  if workspace_mib else None))
        log(f"{g:17s} building from {build_src.name} ({len(profiles[g])} profile(s)) ...")
        try:
            blob = pg.engine_bytes_from_network(_network_loader(trt, pg, build_src), config=cfg,
                                                save_timing_cache=str(cache_path))
        except ParseError:
            raise
        except Exception as exc:  # Polygraphy raises PolygraphyException after logging TensorRT's errors
            raise CheersError(f"TensorRT could not build the '{g}' engine from {build_src}: "
                              f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r} "
                              f"(see the TensorRT log above)") from None
        if not blob:
            raise CheersError(f"TensorRT returned no engine for '{g}' (see the TensorRT log above)")
        data_bytes = bytes(blob)
        del blob
        tmp = plan.with_suffix(".plan.tmp")
        tmp.write_bytes(data_bytes)
        os.replace(tmp, plan)
        info = inspect_engine(trt, data_bytes)
        engines[g] = {
            "file": plan.name, "source": os.path.relpath(src, workdir),
            "built_from": os.path.relpath(build_src, workdir), "fingerprint": fp,
            "source_id": source_id(man, g, precision), "size_bytes": len(data_bytes),
            "build_s": round(time.perf_counter() - t0, 1),
            "profiles": [{"name": m, "index": i, "shapes": {k: [list(s) for s in v] for k, v in p.items()}}
                         for i, (m, p) in enumerate(profiles[g])],
            **info,
        }
        if use_plugin:
            engines[g]["fused_gates"] = fused
        write_engine_manifest(out, em)
        log(f"{g:17s} {len(data_bytes) / 2**20:8.1f} MiB  {engines[g]['build_s']:.0f} s  -> {plan}")
    write_engine_manifest(out, em)
    return em


def _fuse_for_build(src: Path, dst: Path, log) -> Tuple[Path, int]:
    """Fused copy of a graph for TensorRT (no reference function). Falls back to the unfused graph, with a
    message, when no hi gate matches."""
    from . import surgery

    reports: list = []
    n = surgery.fuse_gated_residual(src, dst, report=reports)
    rep = reports[0]
    if n == 0:
        log(f"warning: no hi gate matched in {src.name} ({rep.summary()}); building it without the plugin")
        return src, 0
    log(f"{src.stem:17s} {rep.summary()}")
    return dst, n


def summary_lines(em: dict) -> List[str]:
    lines = [f"TensorRT {em.get('tensorrt')} on {em.get('gpu', {}).get('name')} "
             f"(sm {em.get('gpu', {}).get('compute_capability')}), precision {em.get('precision')}"]
    for g, e in em.get("engines", {}).items():
        prof = ", ".join(p["name"] for p in e.get("profiles", []))
        lines.append(f"  {g:17s} {e.get('size_bytes', 0) / 2**20:8.1f} MiB  activations "
                     f"{e.get('device_memory_bytes', 0) / 2**20:7.1f} MiB  profiles: {prof}")
    return lines
