"""The TensorRT backend: the engines built by ``cheers-deploy build`` behind the backend contract (backend.py).

    TrtBackend(workdir, precision)
      engines/<precision>/trt<ver>/sm<cc>/engine_manifest.json ─ refuse if TensorRT version / GPU differ
      plugin library (if cfm_head was built with CheersGatedResidual) ─ trt.Runtime ─ 5 engines
      execution contexts: one per engine, three for the backbone (prefill, decode, image_step profiles), all
      created with user-managed activation memory pointing at ONE shared arena (stages run one after another
      on one stream), sized to the largest engine.device_memory_size
      persistent I/O buffers per engine (max profile shapes); KV cache (B,Hkv,max_context,Dh) per layer on the
      device, written by position with one cudaMemcpy2DAsync per tensor

    per Euler step (CFG, B = 2):
      latent x (host, [1,C,h,w]) ─H2D─ vision_tokenizer ─► tokens, patch_embeds (device)
        ─ repeat_batch (D2D) ─► backbone image_step (device, KV entries written in place) ─► hidden (device)
        ─► cfm_head ─► velocity ─D2H─ host: CFG combine + Euler update (numpy)

Design choices (docs/tensorrt.md):
* Latent arithmetic on the host. The pipeline's ``+ - *`` act on the latent and the velocity only, [B,C,h,w]
  (128 x 32 x 32 floats for the official model at 512 px: 0.5 MiB). Keeping them on the host costs one small
  D2H (velocity) and one H2D (latent) per step and needs no kernel compiler on the device (CuPy/NVRTC are not
  part of a default JetPack install). Tokens, hidden states, the CFG batch and the KV cache never leave the GPU.
* Stage outputs belong to the caller: each is copied (device to device) out of the engine's persistent output
  buffer. A device array fed to an engine is copied into that engine's persistent input buffer, so the addresses an
  engine is bound to never change between calls (what lets a CUDA graph replay); only KV-cache buffers, which live
  as long as the cache, are bound in place.
* CUDA graphs: each stage call whose bindings (shapes, addresses, KV write position) repeat is captured on its
  second occurrence and replayed afterwards (image steps, cfm_head and the vision tokenizer inside the Euler
  loop). Host copies stay outside the graph. A change of shapes or addresses invalidates the graph; a stage whose
  capture fails runs uncaptured from then on, after the stale CUDA "last error" of the failed capture is cleared
  (device_memory.clear_last_errors, as trtexec does).
* Plans are deserialized from a read-only memory map of the file (compat.deserialize_engine): no host copy of the
  plan coexists with the engine.

One file (over 400 lines): loading, buffer sizing, binding, CUDA-graph capture and the stages act on the same
engines, contexts and buffers; the device memory and the engine layout live in trt/.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import constants as C
from ..errors import CheckpointError, CheersError, InputError
from ..manifest import Manifest, check_io
from ..trt import compat
from ..trt import device_memory as dm
from ..trt import layout as tl
from ..trt import plugin as trt_plugin
from .backend import IMAGE_STEP, check_mode
from .graph_backend import GraphBackend

log = logging.getLogger(__name__)

GRAPHS = C.GRAPH_NAMES
PRECISION_PREFERENCE = ("fp16", "bf16", "mixed", "int8", "fp32")
CAPTURE_AFTER = 2            # capture a stage on the 2nd identical call (the 1st is TensorRT's warm-up enqueue)


def available_precisions(workdir, identity: dict) -> List[str]:
    """Precisions with an engine folder built for this TensorRT version and GPU architecture."""
    out = []
    for p in C.PRECISIONS:
        d = tl.engine_dir(workdir, p, identity["tensorrt"], identity["compute_capability"])
        if (d / C.ENGINE_MANIFEST).is_file():
            out.append(p)
    return out


class _Engine:
    """One deserialized engine: I/O metadata, a context per profile, persistent I/O buffers."""

    def __init__(self, trt, name: str, engine, entry: tl.EngineEntry):
        self.trt, self.name, self.engine, self.entry = trt, name, engine, entry
        self.inputs: List[str] = []
        self.outputs: List[str] = []
        self.dtypes: Dict[str, np.dtype] = {}
        for i in range(engine.num_io_tensors):
            t = engine.get_tensor_name(i)
            (self.inputs if engine.get_tensor_mode(t) == trt.TensorIOMode.INPUT else self.outputs).append(t)
            self.dtypes[t] = dm.np_dtype(compat.trt_to_numpy_dtype(trt, engine.get_tensor_dtype(t)))
        self.profiles = {p["name"]: int(p["index"]) for p in entry.profiles} or {"default": 0}
        self.contexts: Dict[str, object] = {}
        self.in_bufs: Dict[str, dm.DeviceBuffer] = {}
        self.out_bufs: Dict[str, dm.DeviceBuffer] = {}
        self.in_bytes: Dict[str, int] = {}
        self.out_bytes: Dict[str, int] = {}
        self.static_inputs: Dict[str, object] = {}     # input name -> key of the content already uploaded

    def shape(self, t: str) -> Tuple:
        return tuple(int(d) for d in self.engine.get_tensor_shape(t))

    def profile_shapes(self, t: str, index: int):
        return [tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(t, index)]

    def input_view(self, t: str, shape, stream) -> dm.DeviceArray:
        if t not in self.in_bufs:
            self.in_bufs[t] = dm.DeviceBuffer(self.in_bytes[t])
        return dm.DeviceArray(self.in_bufs[t], shape, self.dtypes[t], stream)

    def output_view(self, t: str, shape, stream) -> dm.DeviceArray:
        return dm.DeviceArray(self.out_bufs[t], shape, self.dtypes[t], stream)


class TrtBackend(GraphBackend):
    name = "trt"

    def __init__(self, workdir, precision: Optional[str] = None, manifest: Optional[Manifest] = None,
                 plugin_lib=None, device: int = 0, cuda_graphs: bool = True, allow_other_gpu: bool = False,
                 graphs: Sequence[str] = GRAPHS, trt_module=None, identity: Optional[dict] = None):
        """workdir: exported workdir with engines (cheers-deploy build). precision: which engine folder (default:
        the built one for this machine, preferring fp16 > bf16 > mixed > int8 > fp32). plugin_lib: the
        gated-residual plugin library if cfm_head uses it (default: $CHEERS_TRT_PLUGIN, else the package's CMake
        build folder; never the path recorded in the workdir's engine manifest), loaded only when its sha256 is the
        one recorded at build time. cuda_graphs: capture repeated stage calls.
        allow_other_gpu: accept engines built on another GPU model of the same compute capability.
        (trt_module / identity replace TensorRT and the machine identity in tests.)"""
        graphs = list(graphs)
        # a deployment may delete the ONNX files once the engines are built: only the manifest entries are needed
        self._open_workdir(workdir, manifest, graphs, graph_files=False)
        self.trt = trt_module if trt_module is not None else compat.import_tensorrt()
        dm.rt()                                           # cuda-python present (clear error otherwise)
        dm.set_device(device)
        self.identity = dict(identity) if identity is not None else compat.runtime_identity(device)
        if precision is None:
            have = available_precisions(self.workdir, self.identity)
            precision = next((p for p in PRECISION_PREFERENCE if p in have), None)
            if precision is None:
                tl.find_engine_dir(self.workdir, "fp16", self.identity, allow_other_gpu)   # raises, naming why
        self.precision = tl.check_precision(precision)
        self.engine_dir = tl.find_engine_dir(self.workdir, precision, self.identity, allow_other_gpu)
        self.engine_manifest = tl.read_engine_manifest(self.engine_dir)
        ems = self.engine_manifest.engines
        plans = {g: tl.plan_file(self.engine_dir, self.engine_manifest, g) for g in graphs if g in ems}   # contained
        missing = [g for g in graphs if g not in plans or not plans[g].is_file()]
        if missing:
            raise CheckpointError(f"{self.engine_dir}: no engine for {', '.join(missing)}: run `cheers-deploy build "
                                  f"--workdir {self.workdir} --precision {precision}`")
        self._check_fresh(graphs, ems)
        self._load_plugin(graphs, ems, plugin_lib)

        self.stream = dm.CudaStream()
        self.cuda_graphs = bool(cuda_graphs)
        runtime = self.trt.Runtime(compat.trt_logger())
        self._runtime = runtime
        self.engines: Dict[str, _Engine] = {}
        for g in graphs:
            path = plans[g]
            engine = compat.deserialize_engine(runtime, path)      # from a memory map: no host copy of the plan
            if engine is None:
                raise CheckpointError(f"TensorRT could not deserialize {path} (see the TensorRT log; built by another "
                                      f"TensorRT version, or a plugin is missing?): rebuild with --force")
            e = _Engine(self.trt, g, engine, ems[g])
            self._check_engine_io(e)
            self.engines[g] = e
        # one activation arena for every context (stages never overlap on the stream)
        self.arena = dm.DeviceArena(max([compat.engine_device_memory_size(e.engine) for e in self.engines.values()]
                                        + [1]))
        for e in self.engines.values():
            for mode, idx in e.profiles.items():
                ctx = compat.create_user_managed_context(e.engine)
                compat.set_context_memory(ctx, self.arena.ptr, compat.engine_device_memory_size(e.engine))
                try:
                    ok = ctx.set_optimization_profile_async(idx, self.stream.ptr)
                except RuntimeError as exc:   # the real bindings raise; older ones return False
                    raise CheersError(f"engine '{e.name}': cannot select optimization profile {idx} ({mode}): "
                                      f"{exc}") from None
                if not ok:
                    raise CheersError(f"engine '{e.name}': cannot select optimization profile {idx} ({mode})")
                e.contexts[mode] = ctx
            self._size_buffers(e)
        self.stream.synchronize()

        self._graphs: Dict[Tuple[str, str], dict] = {}

    # ------------------------------------------------------------------ loading checks
    def _check_fresh(self, graphs, ems):
        """Refuse an engine whose source graph was re-exported (or re-calibrated) after the build."""
        for g in graphs:
            built = ems[g].source_id
            now = tl.source_id(self.manifest, g, self.precision) if built else None
            if built and now is not None and now != built:
                raise CheckpointError(f"graph '{g}' ({now['file']}) changed after its engine was built: rebuild with "
                                      f"`cheers-deploy build --workdir {self.workdir} --precision {self.precision}`")

    def _load_plugin(self, graphs, ems, plugin_lib):
        """Native code is loaded only from a place the user chose (plugin_lib=, $CHEERS_TRT_PLUGIN) or the package's
        own build folder, never from the path a workdir's engine manifest records, and only when the library's
        sha256 is the one recorded at build time (trt_plugin.load_plugin_library checks it before any dlopen)."""
        needs = [g for g in graphs if ems[g].fused_gates]
        if not needs:
            return
        where = self.engine_dir / C.ENGINE_MANIFEST
        recorded = self.engine_manifest.plugin or {}
        want = recorded.get("sha256")
        if not want:
            raise CheckpointError(f"{where}: the {', '.join(needs)} engine uses the {C.PLUGIN_NAME} plugin but field "
                                  f"'plugin.sha256' is missing: rebuild with `cheers-deploy build --workdir "
                                  f"{self.workdir} --precision {self.precision} --force`")
        cand = plugin_lib or trt_plugin.default_plugin_library()
        if cand is None:
            name = Path(str(recorded.get("path") or "libcheers_plugins.so")).name
            raise CheckpointError(f"the {', '.join(needs)} engine uses the {C.PLUGIN_NAME} plugin, but no plugin "
                                  f"library was given (it was built with {name}, sha256 {want[:12]}; the path an "
                                  f"engine manifest records is never loaded): pass plugin_lib= or set "
                                  f"{C.PLUGIN_ENV}")
        trt_plugin.load_plugin_library(cand, expected_sha256=want, where=str(where))

    def _check_engine_io(self, e: _Engine) -> None:
        entry = self.manifest.graph(e.name)
        decl = {t.name: t.dtype for t in entry.inputs + entry.outputs}
        # names, ranks and static sizes against the export manifest (dtypes follow the built precision)
        check_io(e.name, entry,
                 [(t, decl.get(t, e.dtypes[t].name), [d if d >= 0 else "?" for d in e.shape(t)]) for t in e.inputs],
                 [(t, decl.get(t, e.dtypes[t].name), [d if d >= 0 else "?" for d in e.shape(t)]) for t in e.outputs],
                 where=str(self.engine_dir))
        built = e.entry.tensor_dtypes()
        for t, dt in e.dtypes.items():
            if t in built and built[t] != dt.name:
                raise CheckpointError(f"{self.engine_dir}: engine '{e.name}' tensor '{t}' is {dt.name}, the engine "
                                      f"manifest says {built[t]}; rebuild with --force")

    def _size_buffers(self, e: _Engine) -> None:
        """Max bytes of every input (profile max shapes) and output (shapes TensorRT infers from them)."""
        for mode, idx in e.profiles.items():
            ctx = e.contexts[mode]
            for t in e.inputs:
                mx = e.profile_shapes(t, idx)[2]
                e.in_bytes[t] = max(e.in_bytes.get(t, 0), int(np.prod(mx, dtype=np.int64)) * e.dtypes[t].itemsize)
                if not ctx.set_input_shape(t, mx):
                    raise CheersError(f"engine '{e.name}' rejects its own profile max shape {mx} for '{t}'")
            for t in e.outputs:
                shape = tuple(int(d) for d in ctx.get_tensor_shape(t))
                if any(d < 0 for d in shape):
                    raise CheersError(f"engine '{e.name}': output '{t}' has a data-dependent shape {shape}; "
                                      f"not supported")
                e.out_bytes[t] = max(e.out_bytes.get(t, 0),
                                     int(np.prod(shape, dtype=np.int64)) * e.dtypes[t].itemsize)
        for t, n in e.out_bytes.items():
            e.out_bufs[t] = dm.DeviceBuffer(n)

    # ------------------------------------------------------------------ execution
    def _bind_input(self, e: _Engine, t: str, value, static_key=None, in_place: bool = False) -> dm.DeviceArray:
        """The array the engine input `t` is bound to. KV-cache views (`in_place`) are bound as they are; any other
        device array is copied into the engine's own input buffer (a stable, 256-byte aligned address); host arrays
        are uploaded there, skipped when `static_key` says the buffer already holds them."""
        want = e.dtypes[t]
        if isinstance(value, dm.DeviceArray) and value.dtype == want:
            if in_place and value.ptr % dm.ALIGN == 0:
                return value
            view = e.input_view(t, value.shape, self.stream)
            view.copy_from(value)
            e.static_inputs[t] = None
            return view
        host = value.to_numpy() if isinstance(value, dm.DeviceArray) else value
        host = np.ascontiguousarray(np.asarray(host), dtype=want)
        if host.nbytes > e.in_bytes[t]:
            raise InputError(f"graph '{e.name}': input '{t}' of shape {host.shape} exceeds the engine's largest "
                             f"profile shape")
        view = e.input_view(t, host.shape, self.stream)
        if static_key is None or e.static_inputs.get(t) != static_key:
            view.copy_from(host)
            e.static_inputs[t] = static_key
        return view

    def _execute(self, graph: str, mode: str, feeds: Dict[str, object], static: Optional[Dict[str, object]] = None,
                 post=None, post_key=None, in_place: Sequence[str] = ()) -> Dict[str, dm.DeviceArray]:
        """Bind inputs (device arrays as they are, host arrays copied into the engine's input buffers unless their
        ``static`` key says the buffer already holds them), outputs (the engine's output buffers), run through
        ``_launch``; ``post(outs)`` enqueues follow-up device work (KV writes) that belongs to the same graph."""
        e = self.engines[graph]
        ctx = e.contexts[mode]
        static = static or {}
        bound = []
        for t in e.inputs:
            if t not in feeds:
                raise InputError(f"graph '{graph}': no value for input '{t}'")
            arr = self._bind_input(e, t, feeds[t], static.get(t), t in in_place)
            if not ctx.set_input_shape(t, arr.shape):
                idx = e.profiles[mode]
                mn, _, mx = e.profile_shapes(t, idx)
                raise InputError(f"graph '{graph}' ({mode} profile): input '{t}' shape {arr.shape} is outside the "
                                 f"engine's range {mn}..{mx} (rebuild with larger profiles: re-export with a larger "
                                 f"--max-context / --batch-max)")
            ctx.set_tensor_address(t, arr.ptr)
            bound.append((t, arr.shape, arr.ptr))
        outs = {}
        for t in e.outputs:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(t))
            arr = e.output_view(t, shape, self.stream)
            ctx.set_tensor_address(t, arr.ptr)
            bound.append((t, shape, arr.ptr))
            outs[t] = arr
        self._launch(graph, mode, ctx, (tuple(bound), post_key), (lambda: post(outs)) if post else None)
        return outs

    def _launch(self, graph: str, mode: str, ctx, key, post) -> None:
        def run():
            if not ctx.execute_async_v3(self.stream.ptr):
                raise CheersError(f"TensorRT execution of '{graph}' ({mode}) failed (see the TensorRT log)")
            if post is not None:
                post()

        st = self._graphs.setdefault((graph, mode), {"key": None, "seen": 0, "graph": None,
                                                     "disabled": not self.cuda_graphs})
        if st["disabled"]:
            run()
            return
        if st["key"] != key:
            if st["graph"] is not None:
                st["graph"].close()
            st.update(key=key, seen=0, graph=None)
        st["seen"] += 1
        if st["graph"] is not None:
            st["graph"].launch(self.stream)
            return
        if st["seen"] < CAPTURE_AFTER:
            run()
            return
        cap = None
        try:
            with self.stream.capture() as cap:
                run()
        except Exception as exc:  # noqa: BLE001 - some engines cannot be captured: run them plainly
            st["disabled"] = True
            # the stale "last error" of the failed capture must not fail the retry (the plugin's launcher reports
            # cudaGetLastError()): capture() cleared it; a capture that never began did not, so clear it here
            cleared = cap.cleared if cap is not None and cap.cleared is not None else dm.clear_last_errors()
            stale = {k: v for k, v in cleared.items() if v}
            log.warning("CUDA graph capture of %s (%s) failed (%s); running it uncaptured%s", graph, mode, exc,
                        f" (cleared stale CUDA errors {stale})" if stale else "")
            run()
            return
        st["graph"] = cap.graph
        cap.graph.launch(self.stream)

    def cuda_graph_stats(self) -> Dict[str, dict]:
        """Per stage: captured or not, calls with the current bindings (for benchmarks and tests)."""
        return {f"{g}/{m}": {"captured": st["graph"] is not None, "calls": st["seen"], "disabled": st["disabled"]}
                for (g, m), st in self._graphs.items()}

    # ------------------------------------------------------------------ host <-> backend
    def to_numpy(self, a):
        if isinstance(a, dm.DeviceArray):
            out = a.to_numpy()
            return out.astype(np.float32) if out.dtype.kind == "f" and out.dtype != np.float32 else out
        return np.asarray(a)

    def repeat_batch(self, a, n):
        if not isinstance(a, dm.DeviceArray):
            return np.repeat(np.asarray(a), n, axis=0)
        return dm.repeat_batch(a, n)

    def _embeds_dtype(self):
        e = self.engines.get("backbone")
        return e.dtypes[self._bb_in[0]] if e is not None else np.dtype(np.float32)

    def concat_seq(self, parts):
        parts = list(parts)
        if not any(isinstance(p, dm.DeviceArray) for p in parts):
            return np.concatenate([np.asarray(p) for p in parts], axis=1)
        return dm.concat(parts, axis=1, stream=self.stream, dtype=self._embeds_dtype())

    def concat_batch(self, parts):
        parts = list(parts)
        if not any(isinstance(p, dm.DeviceArray) for p in parts):
            return np.concatenate([np.asarray(p) for p in parts], axis=0)
        return dm.concat(parts, axis=0, stream=self.stream, dtype=self._embeds_dtype())

    # ------------------------------------------------------------------ stages
    def _outputs(self, graph: str, outs: Dict[str, dm.DeviceArray]) -> List[dm.DeviceArray]:
        """The engine outputs in manifest order, copied out of the engine's buffers (the caller owns them)."""
        return [outs[n].copy() for n in self.manifest.graph(graph).output_names]

    def _run1(self, graph: str, *arrays):
        e = self.engines[graph]
        names = self.manifest.graph(graph).input_names
        return self._execute(graph, next(iter(e.profiles)), dict(zip(names, arrays)))

    def vae_encode(self, pixels):
        outs = self._run1("vae_encoder", np.asarray(pixels, np.float32))
        return self.to_numpy(outs[self.manifest.graph("vae_encoder").output_names[0]])

    def vision_tokenize(self, latent):
        tokens, embeds = self._outputs("vision_tokenizer", self._run1("vision_tokenizer", latent))
        return tokens, embeds

    def cfm_head(self, hidden, patch_embeds, t):
        outs = self._run1("cfm_head", hidden, patch_embeds, np.asarray(t, np.float32))
        return self.to_numpy(outs[self.manifest.graph("cfm_head").output_names[0]])

    def vae_decode(self, latent):
        outs = self._run1("vae_decoder", latent)
        return self.to_numpy(outs[self.manifest.graph("vae_decoder").output_names[0]])

    def new_cache(self, batch, max_len):
        self._check_new_cache(max_len)
        e = self.engines["backbone"]
        batch_max = max(e.profile_shapes(self._bb_in[0], i)[2][0] for i in e.profiles.values())
        if batch > batch_max:
            raise InputError(f"batch {batch} exceeds the engines' largest batch {batch_max} (--batch-max)")
        dtype = e.dtypes[self._past_k[0]]
        return dm.DeviceKVCache(batch, self.max_context, self.num_layers, self.kv_heads, self.head_dim, dtype,
                                self.stream)

    def backbone(self, cache: dm.DeviceKVCache, embeds, start, mask, mode):
        check_mode(mode)
        b, s = int(embeds.shape[0]), int(embeds.shape[1])
        total = cache.max_len
        self._check_bounds(cache.batch, total, b, s, start)
        profiles = self.engines["backbone"].profiles
        profile = mode if mode in profiles else next(iter(profiles))     # an engine built with one profile
        full, mask_key = self._attention_mask(b, s, start, total, mask)
        feeds = dict(zip(self._bb_in, (embeds, self._positions(b, s, start), full)))
        for i in range(self.num_layers):
            feeds[self._past_k[i]] = cache.past(i, "key", b)
            feeds[self._past_v[i]] = cache.past(i, "value", b)
        static = {self._bb_in[2]: mask_key, self._bb_in[1]: ("pos", b, s, start)}

        def write_kv(outs):
            for i in range(self.num_layers):
                cache.write(i, "key", outs[self._present_k[i]], start)
                cache.write(i, "value", outs[self._present_v[i]], start)

        outs = self._execute("backbone", profile, feeds, static=static, post=write_kv, post_key=("kv", start),
                             in_place=self._past_k + self._past_v)
        hidden = outs[self._bb_out[0]].copy()
        if mode == IMAGE_STEP:
            return hidden, None
        return hidden, np.asarray(outs[self._bb_out[1]].to_numpy(), dtype=np.float32)

    def synchronize(self):
        self.stream.synchronize()

    def close(self):
        """Release graphs, contexts and engines (device memory returns to the pool)."""
        self.synchronize()
        for st in self._graphs.values():
            if st.get("graph") is not None:
                st["graph"].close()
        self._graphs.clear()
        for e in self.engines.values():
            e.contexts.clear()
        self.engines.clear()

    def describe(self) -> dict:
        """Memory and engine summary (for `doctor`-style reports and benchmarks)."""
        return {"precision": self.precision, "engine_dir": str(self.engine_dir),
                "tensorrt": self.identity.get("tensorrt"), "gpu": self.identity.get("gpu"),
                "activation_arena_bytes": self.arena.nbytes,
                "io_buffer_bytes": sum(sum(e.out_bytes.values()) + sum(e.in_bytes.values())
                                       for e in self.engines.values()),
                "engines": {g: {"profiles": list(e.profiles), "plan_bytes": e.entry.size_bytes}
                            for g, e in self.engines.items()}}


def engine_manifest_summary(workdir, precision: str, identity: dict) -> str:
    """One JSON line describing the engine folder this machine would load (for bug reports)."""
    d = tl.find_engine_dir(workdir, precision, identity)
    em = tl.read_engine_manifest(d)
    return json.dumps({"dir": str(d), "tensorrt": em.tensorrt, "gpu": em.gpu, "engines": sorted(em.engines)})
