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
* Arrays returned by a stage are views of that engine's output buffers, valid until the same stage runs again
  (the pipeline consumes every stage output before it calls that stage again). Strided slices such as
  ``hidden[:, -1]`` are copied.
* CUDA graphs: each stage call whose bindings (shapes, addresses, KV write position) repeat is captured on its
  second occurrence and replayed afterwards (image steps, cfm_head and the vision tokenizer inside the Euler
  loop). Host copies stay outside the graph. A change of shapes or addresses invalidates the graph; a stage whose
  capture fails runs uncaptured from then on.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..engines import build as eb
from ..engines import compat
from ..errors import CheckpointError, CheersError, InputError
from . import device_memory as dm
from .backend import Backend, lookup_embeddings
from .manifest import EMBED_FILE, Manifest, check_io

log = logging.getLogger(__name__)

GRAPHS = ("vae_encoder", "vision_tokenizer", "backbone", "cfm_head", "vae_decoder")
SUPPORTED_LAYOUTS = ("static-buffer/new-entries",)
PRECISION_PREFERENCE = ("fp16", "bf16", "mixed", "int8", "fp32")
CAPTURE_AFTER = 2            # capture a stage on the 2nd identical call (the 1st is TensorRT's warm-up enqueue)


def available_precisions(workdir, identity: dict) -> List[str]:
    """Precisions with an engine folder built for this TensorRT version and GPU architecture."""
    out = []
    for p in eb.PRECISIONS:
        d = eb.engine_dir(workdir, p, identity["tensorrt"], identity["compute_capability"])
        if (d / eb.ENGINE_MANIFEST).is_file():
            out.append(p)
    return out


class _Engine:
    """One deserialized engine: I/O metadata, a context per profile, persistent I/O buffers."""

    def __init__(self, trt, name: str, engine, entry: dict):
        self.trt, self.name, self.engine, self.entry = trt, name, engine, entry
        self.inputs: List[str] = []
        self.outputs: List[str] = []
        self.dtypes: Dict[str, np.dtype] = {}
        for i in range(engine.num_io_tensors):
            t = engine.get_tensor_name(i)
            (self.inputs if engine.get_tensor_mode(t) == trt.TensorIOMode.INPUT else self.outputs).append(t)
            self.dtypes[t] = dm.np_dtype(compat.trt_to_numpy_dtype(trt, engine.get_tensor_dtype(t)))
        self.profiles = {p["name"]: int(p["index"]) for p in entry.get("profiles", [])} or {"default": 0}
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

    def output_view(self, t: str, shape, stream, tag=None) -> dm.DeviceArray:
        return dm.DeviceArray(self.out_bufs[t], shape, self.dtypes[t], stream, tag=tag)


class TrtBackend(Backend):
    name = "trt"

    def __init__(self, workdir, precision: Optional[str] = None, manifest: Optional[Manifest] = None,
                 plugin_lib=None, device: int = 0, cuda_graphs: bool = True, allow_other_gpu: bool = False,
                 graphs: Sequence[str] = GRAPHS, trt_module=None, identity: Optional[dict] = None):
        """workdir: exported workdir with engines (cheers-deploy build). precision: which engine folder (default:
        the built one for this machine, preferring fp16 > bf16 > mixed > int8 > fp32). plugin_lib: the
        gated-residual plugin library if cfm_head uses it (default: the path recorded at build time,
        $CHEERS_TRT_PLUGIN, the CMake build folder). cuda_graphs: capture repeated stage calls.
        allow_other_gpu: accept engines built on another GPU model of the same compute capability.
        (trt_module / identity replace TensorRT and the machine identity in tests.)"""
        self.workdir = Path(workdir)
        self.manifest = manifest if manifest is not None else Manifest.load(self.workdir)
        if self.manifest.workdir is None:
            self.manifest.workdir = self.workdir
        self.manifest.check_files([])                     # embedding table + tokenizer files
        where = f"workdir {self.workdir}"
        cache = self.manifest.cache
        if cache.get("layout") not in SUPPORTED_LAYOUTS:
            raise CheckpointError(f"{where}: KV cache layout {cache.get('layout')!r} is not supported by this "
                                  f"runtime ({', '.join(SUPPORTED_LAYOUTS)}); re-export with this version")
        self.trt = trt_module if trt_module is not None else compat.import_tensorrt()
        dm.rt()                                           # cuda-python present (clear error otherwise)
        dm.set_device(device)
        self.identity = dict(identity) if identity is not None else compat.runtime_identity(device)
        if precision is None:
            have = available_precisions(self.workdir, self.identity)
            precision = next((p for p in PRECISION_PREFERENCE if p in have), None)
            if precision is None:
                eb.find_engine_dir(self.workdir, "fp16", self.identity, allow_other_gpu)   # raises, naming why
        self.precision = eb.check_precision(precision)
        self.engine_dir = eb.find_engine_dir(self.workdir, precision, self.identity, allow_other_gpu)
        self.engine_manifest = eb.read_engine_manifest(self.engine_dir)
        ems = self.engine_manifest.get("engines", {})
        graphs = list(graphs)
        missing = [g for g in graphs if g not in ems or not (self.engine_dir / ems[g]["file"]).is_file()]
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
            path = self.engine_dir / ems[g]["file"]
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
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
                if not ctx.set_optimization_profile_async(idx, self.stream.ptr):
                    raise CheersError(f"engine '{e.name}': cannot select optimization profile {idx} ({mode})")
                e.contexts[mode] = ctx
            self._size_buffers(e)
        self.stream.synchronize()

        emb = self.manifest.data.get("embed_tokens", {}).get("file", EMBED_FILE)
        self.embed_table = np.load(self.workdir / emb, mmap_mode="r")
        self.max_context = self.manifest.max_context
        self.tokens_per_image = int(self.manifest.image["tokens_per_image"])
        self.num_layers = int(cache["num_layers"])
        self.kv_heads, self.head_dim = int(cache["num_kv_heads"]), int(cache["head_dim"])
        if "backbone" in self.engines:
            bb = self.manifest.graph("backbone")
            self._bb_in = [t["name"] for t in bb["inputs"][:3]]
            self._bb_out = [t["name"] for t in bb["outputs"][:2]]
            fmt = lambda key: [cache[key].format(i=i) for i in range(self.num_layers)]  # noqa: E731
            self._past_k, self._past_v = fmt("past_key"), fmt("past_value")
            self._present_k, self._present_v = fmt("present_key"), fmt("present_value")
        self._graphs: Dict[Tuple[str, str], dict] = {}
        self._repeat: Dict[tuple, dm.DeviceArray] = {}
        self._calls = 0
        self._last = None
        self._mask_memo = None

    # ------------------------------------------------------------------ loading checks
    def _check_fresh(self, graphs, ems):
        """Refuse an engine whose source graph was re-exported (or re-calibrated) after the build."""
        for g in graphs:
            built = ems[g].get("source_id")
            now = eb.source_id(self.manifest, g, self.precision) if built else None
            if built and now is not None and now != built:
                raise CheckpointError(f"graph '{g}' ({now['file']}) changed after its engine was built: rebuild with "
                                      f"`cheers-deploy build --workdir {self.workdir} --precision {self.precision}`")

    def _load_plugin(self, graphs, ems, plugin_lib):
        needs = [g for g in graphs if ems[g].get("fused_gates")]
        if not needs:
            return
        recorded = (self.engine_manifest.get("plugin") or {}).get("path")
        cand = plugin_lib or (recorded if recorded and Path(recorded).is_file() else None) \
            or compat.default_plugin_library()
        if cand is None:
            raise CheckpointError(f"the {', '.join(needs)} engine uses the {compat.PLUGIN_NAME} plugin, but no plugin "
                                  f"library was found (built from {recorded or 'engines/plugins/gated_residual'}): "
                                  f"pass plugin_lib= or set CHEERS_TRT_PLUGIN")
        compat.load_plugin_library(cand)

    def _check_engine_io(self, e: _Engine) -> None:
        entry = self.manifest.graph(e.name)
        decl = {t["name"]: t["dtype"] for t in entry["inputs"] + entry["outputs"]}
        # names, ranks and static sizes against the export manifest (dtypes follow the built precision)
        check_io(e.name, entry,
                 [(t, decl.get(t, e.dtypes[t].name), [d if d >= 0 else "?" for d in e.shape(t)]) for t in e.inputs],
                 [(t, decl.get(t, e.dtypes[t].name), [d if d >= 0 else "?" for d in e.shape(t)]) for t in e.outputs],
                 where=str(self.engine_dir))
        built = {t["name"]: t["dtype"] for t in e.entry.get("inputs", []) + e.entry.get("outputs", [])}
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
    def _bind_input(self, e: _Engine, t: str, value, static_key=None) -> dm.DeviceArray:
        want = e.dtypes[t]
        if isinstance(value, dm.DeviceArray) and value.dtype == want:
            if value.ptr % dm.ALIGN == 0:
                return value                      # bound in place (zero copy)
            view = e.input_view(t, value.shape, self.stream)   # TensorRT wants 256-byte aligned I/O addresses
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
                 post=None, post_key=None) -> Dict[str, dm.DeviceArray]:
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
            arr = self._bind_input(e, t, feeds[t], static.get(t))
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
        try:
            with self.stream.capture() as cap:
                run()
        except Exception as exc:  # noqa: BLE001 - some engines cannot be captured: run them plainly
            st["disabled"] = True
            log.warning("CUDA graph capture of %s (%s) failed (%s); running it uncaptured", graph, mode, exc)
            run()
            return
        st["graph"] = cap.graph
        cap.graph.launch(self.stream)

    def cuda_graph_stats(self) -> Dict[str, dict]:
        """Per stage: captured or not, calls with the current bindings (for benchmarks and tests)."""
        return {f"{g}/{m}": {"captured": st["graph"] is not None, "calls": st["seen"], "disabled": st["disabled"]}
                for (g, m), st in self._graphs.items()}

    # ------------------------------------------------------------------ host <-> backend
    def from_numpy(self, a):
        a = np.asarray(a)
        return np.ascontiguousarray(a, np.float32) if np.issubdtype(a.dtype, np.floating) else a

    def to_numpy(self, a):
        if isinstance(a, dm.DeviceArray):
            out = a.to_numpy()
            return out.astype(np.float32) if out.dtype.kind == "f" and out.dtype != np.float32 else out
        return np.asarray(a)

    def repeat_batch(self, a, n):
        if not isinstance(a, dm.DeviceArray):
            return np.repeat(np.asarray(a), n, axis=0)
        key = (a.ptr, a.shape, a.dtype.name, int(n))
        out = self._repeat.get(key)
        if out is None:
            if len(self._repeat) > 16:
                self._repeat.clear()
            out = self._repeat[key] = dm.DeviceArray.empty((int(n),) + a.shape[1:], a.dtype, self.stream)
        return dm.repeat_batch(a, n, out=out)

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
    def embed(self, ids):
        return lookup_embeddings(self.embed_table, ids)

    def _run1(self, graph: str, *arrays):
        e = self.engines[graph]
        mode = next(iter(e.profiles))
        return self._execute(graph, mode, dict(zip(e.inputs, arrays)))

    def vae_encode(self, pixels):
        out = self._run1("vae_encoder", np.asarray(pixels, np.float32))
        return self.to_numpy(next(iter(out.values())))

    def vision_tokenize(self, latent):
        outs = self._run1("vision_tokenizer", latent)
        names = [t["name"] for t in self.manifest.graph("vision_tokenizer")["outputs"]]
        return outs[names[0]], outs[names[1]]

    def cfm_head(self, hidden, patch_embeds, t):
        e = self.engines["cfm_head"]
        names = [x["name"] for x in self.manifest.graph("cfm_head")["inputs"]]
        out = self._execute("cfm_head", next(iter(e.profiles)),
                            dict(zip(names, (hidden, patch_embeds, np.asarray(t, np.float32)))))
        return self.to_numpy(next(iter(out.values())))

    def vae_decode(self, latent):
        out = self._run1("vae_decoder", latent)
        return self.to_numpy(next(iter(out.values())))

    def new_cache(self, batch, max_len):
        if max_len > self.max_context:
            raise InputError(f"{max_len} positions requested, more than the context of {self.max_context} the "
                             f"engines were built for (re-export with a larger --max-context and rebuild)")
        e = self.engines["backbone"]
        batch_max = max(e.profile_shapes(self._bb_in[0], i)[2][0] for i in e.profiles.values())
        if batch > batch_max:
            raise InputError(f"batch {batch} exceeds the engines' largest batch {batch_max} (--batch-max)")
        dtype = e.dtypes[self._past_k[0]]
        return dm.DeviceKVCache(batch, self.max_context, self.num_layers, self.kv_heads, self.head_dim, dtype,
                                self.stream)

    def _mode(self, s: int, mask) -> str:
        profiles = self.engines["backbone"].profiles
        if mask is None and s == 1 and "decode" in profiles:
            return "decode"
        if mask is None and s == self.tokens_per_image and "image_step" in profiles:
            return "image_step"
        return "prefill" if "prefill" in profiles else next(iter(profiles))

    def _mask(self, b: int, s: int, start: int, total: int, mask: Optional[np.ndarray]):
        """(B,1,S,T+S) bool over [cache slots 0..T-1, the S new positions] (as the ort backend) and a key that
        identifies its content when it is the all-allowed mask (uploaded once per key)."""
        if mask is None:
            key = ("all", b, s, start, total)
            if self._mask_memo is not None and self._mask_memo[0] == key:
                return self._mask_memo[1], key
            full = np.zeros((b, 1, s, total + s), dtype=bool)
            full[..., :start] = True
            full[..., total:] = True
            self._mask_memo = (key, full)
            return full, key
        mask = np.asarray(mask, dtype=bool)
        if mask.shape[-2:] != (s, start + s):
            raise InputError(f"mask must have shape (S, start+S) = {(s, start + s)}, got {mask.shape}")
        m = mask if mask.ndim == 3 else mask[None]
        full = np.zeros((b, 1, s, total + s), dtype=bool)
        full[:, 0, :, :start] = m[..., :start]
        full[:, 0, :, total:] = m[..., start:]
        return full, None

    def backbone(self, cache: dm.DeviceKVCache, embeds, start, mask):
        b, s = int(embeds.shape[0]), int(embeds.shape[1])
        total = cache.max_len
        if b > cache.batch:
            raise InputError(f"batch {b} exceeds the cache batch {cache.batch}")
        if start < 0 or start + s > total:
            raise InputError(f"KV cache overflow: positions {start}..{start + s - 1} do not fit {total} slots")
        mode = self._mode(s, mask)
        pos = np.ascontiguousarray(np.broadcast_to(np.arange(start, start + s, dtype=np.int64), (b, s)))
        full, mask_key = self._mask(b, s, start, total, mask)
        feeds = dict(zip(self._bb_in, (embeds, pos, full)))
        for i in range(self.num_layers):
            feeds[self._past_k[i]] = cache.past(i, "key", b)
            feeds[self._past_v[i]] = cache.past(i, "value", b)
        static = {self._bb_in[2]: mask_key, self._bb_in[1]: ("pos", b, s, start)}

        def write_kv(outs):
            for i in range(self.num_layers):
                cache.write(i, "key", outs[self._present_k[i]], start)
                cache.write(i, "value", outs[self._present_v[i]], start)

        self._calls += 1
        call = ("hidden", self._calls)
        outs = self._execute("backbone", mode, feeds, static=static, post=write_kv, post_key=("kv", start))
        hidden = outs[self._bb_out[0]]
        hidden.tag = call
        self._last = {"tag": call, "b": b, "s": s, "shape": hidden.shape, "logits": outs[self._bb_out[1]]}
        return hidden

    def logits(self, hidden_last):
        """The backbone engine already computed the last position's logits: reuse them when asked for
        ``hidden[:, -1]`` of the latest backbone call, else project on the host with the (tied) embedding table."""
        last = self._last
        if isinstance(hidden_last, dm.DeviceArray) and last is not None:
            want = (last["tag"], dm._norm_key((slice(None), -1), last["shape"]))
            if hidden_last.tag == want:
                return np.asarray(last["logits"].to_numpy(), dtype=np.float32)
        h = self.to_numpy(hidden_last).astype(np.float32)
        return h @ np.asarray(self.embed_table).T

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
                "engines": {g: {"profiles": list(e.profiles), "plan_bytes": e.entry.get("size_bytes")}
                            for g, e in self.engines.items()}}


def engine_manifest_summary(workdir, precision: str, identity: dict) -> str:
    """One JSON line describing the engine folder this machine would load (for bug reports)."""
    d = eb.find_engine_dir(workdir, precision, identity)
    em = eb.read_engine_manifest(d)
    return json.dumps({"dir": str(d), "tensorrt": em.get("tensorrt"), "gpu": em.get("gpu"),
                       "engines": sorted(em.get("engines", {}))})
