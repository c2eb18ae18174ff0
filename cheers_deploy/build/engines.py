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

import gc
import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..constants import (ENGINE_MANIFEST, GRAPH_NAMES, MANIFEST_NAME, PLUGIN_GRAPHS, PLUGIN_NAME,
                         PLUGIN_VERSION)
from ..errors import CheckpointError, CheersError, InputError
from ..fileio import atomic_write_bytes, sha256_file, sha256_json
from ..manifest import GraphEntry, Manifest
from ..trt import compat, plugin as trt_plugin
from ..trt.layout import (EngineEntry, EngineManifest, check_precision, engine_dir, file_stamp, graph_source,
                          how_to_make, read_engine_manifest, source_id, write_engine_manifest)

TIMING_CACHE = "timing.cache"
FUSED_DIR = "fused"

Profiles = List[Tuple[str, Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]]]]


# ---------------------------------------------------------------------------------------------------------------------
# manifest -> sources and profiles
# ---------------------------------------------------------------------------------------------------------------------
def profiles_for(entry: GraphEntry, graph: str = "") -> Profiles:
    """[(mode, {input: (min, opt, max)})] from a manifest graph entry, in manifest order (backbone: prefill, decode,
    image_step; other graphs: default). Every input must have three shapes of its rank with min <= opt <= max."""
    profs = entry.profiles
    if not profs:
        raise CheckpointError(f"manifest entry of graph '{graph}' has no build profiles; re-export")
    inputs = {t.name: t for t in entry.inputs}
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
            rank = len(inputs[name].shape)
            if not len(mn) == len(opt) == len(mx) == rank:
                raise CheckpointError(f"graph '{graph}' profile '{mode}' input '{name}': shapes of rank "
                                      f"{len(mn)}/{len(opt)}/{len(mx)}, the input has rank {rank}")
            for axis, (a, b, c, decl) in enumerate(zip(mn, opt, mx, inputs[name].shape)):
                if not (1 <= a <= b <= c):
                    raise CheckpointError(f"graph '{graph}' profile '{mode}' input '{name}' axis {axis}: "
                                          f"min/opt/max {a}/{b}/{c} are not ordered")
                if isinstance(decl, int) and not a == b == c == decl:
                    raise CheckpointError(f"graph '{graph}' profile '{mode}' input '{name}' axis {axis} is static "
                                          f"({decl}) but the profile says {a}/{b}/{c}")
            prof[name] = (mn, opt, mx)
        out.append((mode, prof))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# compatibility of built engines with this machine
# ---------------------------------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------------------------------
# fingerprints
# ---------------------------------------------------------------------------------------------------------------------
def fingerprint(source: Path, data: Optional[Path], profiles: Profiles, identity: dict, plugin_sha: Optional[str],
                options: dict) -> str:
    blob = {"source": file_stamp(source), "data": file_stamp(data), "profiles": [[m, {k: [list(s) for s in v]
            for k, v in p.items()}] for m, p in profiles], "identity": identity, "plugin": plugin_sha,
            "options": options}
    return sha256_json(blob)


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
    if e.get("op") == PLUGIN_NAME or PLUGIN_NAME in e.get("desc", ""):
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


def inspect_engine(trt, plan) -> dict:
    """I/O tensors (name, dtype, shape with -1 for dynamic), per-profile shapes and activation memory of a plan (a
    file, deserialized from a memory map, or a buffer). The build calls it on the written file once the builder and
    the serialized plan are gone, so only this engine is in memory."""
    runtime = trt.Runtime(compat.trt_logger())
    if isinstance(plan, (str, os.PathLike)):
        engine = compat.deserialize_engine(runtime, plan)
    else:
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
    return sha256_file(path) if path is not None else None


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
    found = trt_plugin.default_plugin_library()
    return found.resolve() if found is not None and found.is_file() else None


def default_precision(man: Manifest, names: Sequence[str]) -> Tuple[str, Optional[str]]:
    """What `cheers-deploy build` builds without --precision: fp16 when every graph has an fp16 variant
    (`cheers-deploy calibrate convert`), else the exported precision (fp32), with a note saying how to make fp16."""
    if names and all(man.precision == "fp16" or "fp16" in man.graph(g).precisions for g in names):
        return "fp16", None
    note = (f"note: workdir {man.workdir} has no fp16 graphs: building the exported {man.precision} graphs. fp16 "
            f"engines are recommended, on Jetson above all (half the weights in the shared memory, faster, less "
            f"memory to build): `{how_to_make(man.workdir, 'fp16')}`, then `cheers-deploy build --workdir "
            f"{man.workdir}` again")
    return man.precision, note


def build_engines(workdir, precision: Optional[str] = None, plugin_lib=None, force: bool = False, timing_cache=None,
                  graphs: Optional[Sequence[str]] = None, fuse: bool = True, builder_optimization_level=None,
                  workspace_mib: Optional[int] = None, log: Callable[[str], None] = print) -> EngineManifest:
    """Build (or reuse) one engine per graph. Returns the engine manifest (also written next to the plans).
    precision None: fp16 if the workdir has fp16 graphs, else the exported fp32 ones (with a note, default_precision).

    Memory: each plan is written from TensorRT's own buffer (no copy), and inspected by deserializing the written
    file from a memory map after the builder, the network, the parsed weights and the serialized plan are released
    (Polygraphy's engine_bytes_from_network keeps none of them), so the peaks of building and inspecting do not
    add up (docs/jetson.md, "Memory while building and loading")."""
    workdir = Path(workdir)
    man = Manifest.load(workdir)
    names = list(graphs) if graphs else [g for g in GRAPH_NAMES if g in man.graphs]
    unknown = [g for g in names if g not in man.graphs]
    if unknown:
        raise InputError(f"graph(s) {unknown} not in {workdir / MANIFEST_NAME} (has: {sorted(man.graphs)})")
    if precision is None:
        precision, note = default_precision(man, names)
        if note:
            log(note)
    check_precision(precision)
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
        trt_plugin.load_plugin_library(plugin)
    elif fuse and any(g in PLUGIN_GRAPHS for g in names):
        log("note: no gated-residual plugin library (--plugin-lib, $CHEERS_TRT_PLUGIN or build/libcheers_plugins.so):"
            " the hi gate is built from plain TensorRT layers")
    plugin_sha = _plugin_sha(plugin)

    em = None
    if (out / ENGINE_MANIFEST).is_file():
        try:
            em = read_engine_manifest(out)
        except CheckpointError:
            em = None
    em = em or EngineManifest(precision, ident["tensorrt"])
    em.precision, em.tensorrt = precision, ident["tensorrt"]
    em.gpu = {k: gpu[k] for k in ("name", "compute_capability", "sm", "total_memory") if k in gpu}
    em.plugin = None if plugin is None else {"path": str(plugin), "sha256": plugin_sha, "name": PLUGIN_NAME,
                                             "version": PLUGIN_VERSION}
    em.extra.update({"cuda": {k: gpu[k] for k in ("driver_version", "runtime_version") if k in gpu},
                     "jetson": gpu.get("jetson"), "workdir_manifest": str(workdir / MANIFEST_NAME),
                     "timing_cache": str(cache_path)})
    engines = em.engines
    options = {"precision": precision, "fuse": bool(fuse and plugin is not None),
               "opt_level": builder_optimization_level, "workspace_mib": workspace_mib, "tf32": precision != "fp32"}
    for g in names:
        src, data = sources[g]
        plan = out / f"{g}.plan"
        use_plugin = plugin is not None and g in PLUGIN_GRAPHS
        fp = fingerprint(src, data, profiles[g], ident, plugin_sha if use_plugin else None, options)
        old = engines.get(g)
        if not force and plan.is_file() and old is not None and old.fingerprint == fp:
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
        with memoryview(blob) as view:             # IHostMemory exposes the buffer protocol: written without a copy
            atomic_write_bytes(plan, view)
        del blob                                   # the last reference to the serialized plan (builder already gone)
        gc.collect()
        info = inspect_engine(trt, plan)           # deserialized from the file, nothing else of this build alive
        plan_bytes = plan.stat().st_size
        build_s = round(time.perf_counter() - t0, 1)
        engines[g] = EngineEntry(
            file=plan.name,
            profiles=[{"name": m, "index": i, "shapes": {k: [list(s) for s in v] for k, v in p.items()}}
                      for i, (m, p) in enumerate(profiles[g])],
            inputs=info["inputs"], outputs=info["outputs"], source_id=source_id(man, g, precision), fingerprint=fp,
            fused_gates=int(fused or 0) if use_plugin else 0, size_bytes=plan_bytes,
            device_memory_bytes=info["device_memory_bytes"],
            extra={"source": os.path.relpath(src, workdir), "built_from": os.path.relpath(build_src, workdir),
                   "build_s": build_s, "num_profiles": info["num_profiles"]})
        write_engine_manifest(out, em)
        log(f"{g:17s} {plan_bytes / 2**20:8.1f} MiB  {build_s:.0f} s  -> {plan}")
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


def summary_lines(em: EngineManifest) -> List[str]:
    lines = [f"TensorRT {em.tensorrt} on {em.gpu.get('name')} (sm {em.gpu.get('compute_capability')}), "
             f"precision {em.precision}"]
    for g, e in em.engines.items():
        prof = ", ".join(p["name"] for p in e.profiles)
        lines.append(f"  {g:17s} {e.size_bytes / 2**20:8.1f} MiB  activations "
                     f"{e.device_memory_bytes / 2**20:7.1f} MiB  profiles: {prof}")
    return lines
