"""The ONNX Runtime backend: one InferenceSession per exported graph behind the backend contract, numpy arrays
on the host, and a static KV cache (numpy, max_context positions) written by position. No torch.

    Pipeline ─► OrtBackend.backbone(cache, embeds, start, mask)
                  feed: inputs_embeds, position_ids, attention_mask (B,1,S,Tmax+S) bool, the whole cache buffer
                  ─► GraphRunner("backbone") ─► hidden_states, logits (last position), present = new K/V
                  ─► cache.k[i][:, :, start:start+S] = present   (no reallocation, no concatenation)

Names, shapes and the cache layout come from manifest.json; every session is checked against it on load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from ..errors import CheckpointError, InputError, MissingDependencyError
from .backend import Backend, lookup_embeddings
from .manifest import EMBED_FILE, Manifest, check_io

GRAPHS = ("vae_encoder", "vision_tokenizer", "backbone", "cfm_head", "vae_decoder")
SUPPORTED_LAYOUTS = ("static-buffer/new-entries",)
ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
             "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}
# providers whose buffers live on a device: their sessions run through IO binding
DEVICE_PROVIDERS = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda",
                    "ROCMExecutionProvider": "cuda", "DmlExecutionProvider": "dml"}

Provider = Union[str, tuple]


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - onnxruntime is a base dependency
        raise MissingDependencyError("the ort backend needs onnxruntime: pip install onnxruntime "
                                     "(or onnxruntime-gpu for CUDA/TensorRT)") from exc
    return ort


def _provider_name(p: Provider) -> str:
    return p[0] if isinstance(p, tuple) else p


def tensorrt_profile_options(entry: dict) -> Dict[str, str]:
    """TensorRT EP explicit-profile options from a manifest graph entry: one profile per mode (prefill /
    decode / image step for the backbone), an input repeated once per profile."""
    keys = ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")
    parts: Dict[str, List[str]] = {k: [] for k in keys}
    for prof in entry.get("profiles", {}).values():
        for name, shapes in prof.items():
            for k, shape in zip(keys, shapes):
                parts[k].append(f"{name}:{'x'.join(str(int(d)) for d in shape)}")
    return {k: ",".join(v) for k, v in parts.items() if v}


class GraphRunner:
    """One graph: an InferenceSession checked against its manifest entry. `run(feed)` returns the outputs in
    manifest order as fresh numpy arrays (never a buffer the next call overwrites).

    With a device provider the session runs through IO binding: host inputs are bound with bind_cpu_input
    (one copy to the device), outputs are allocated on the device and copied back once. Keeping outputs on the
    device between stages (OrtValue in, OrtValue out) is the next step and fits this structure."""

    def __init__(self, name: str, path: Path, entry: dict, providers: Sequence[Provider], session_options,
                 io_binding: Optional[bool] = None, where: str = ""):
        ort = _import_ort()
        self.name = name
        try:
            self.session = ort.InferenceSession(str(path), session_options, providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise CheckpointError(f"{where}: cannot load graph '{name}' from {path.name}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else exc!r}") from None
        check_io(name, entry,
                 [(i.name, ORT_TYPES.get(i.type, i.type), i.shape) for i in self.session.get_inputs()],
                 [(o.name, ORT_TYPES.get(o.type, o.type), o.shape) for o in self.session.get_outputs()],
                 where=where)
        self.input_names = [t["name"] for t in entry["inputs"]]
        self.output_names = [t["name"] for t in entry["outputs"]]
        self.input_dtypes = {t["name"]: np.dtype(t["dtype"]) for t in entry["inputs"]}
        first = _provider_name(self.session.get_providers()[0])
        self.device = DEVICE_PROVIDERS.get(first, "cpu")
        self.io_binding = (self.device != "cpu") if io_binding is None else bool(io_binding)

    def _prepare(self, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise InputError(f"graph '{self.name}': no value for input '{missing[0]}'")
        return {n: np.ascontiguousarray(feed[n], dtype=self.input_dtypes[n]) for n in self.input_names}

    def run(self, feed: Dict[str, np.ndarray]) -> List[np.ndarray]:
        feed = self._prepare(feed)
        if not self.io_binding:
            return self.session.run(self.output_names, feed)
        binding = self.session.io_binding()
        for n, a in feed.items():
            binding.bind_cpu_input(n, a)
        for n in self.output_names:
            binding.bind_output(n, self.device)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()


class OrtCache:
    """Per layer K and V buffers (B,Hkv,T,Dh), allocated once per generation and written by position."""

    def __init__(self, batch: int, max_len: int, layers: int, kv_heads: int, head_dim: int, dtype="float32"):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [np.zeros(shape, dtype) for _ in range(layers)]
        self.v = [np.zeros(shape, dtype) for _ in range(layers)]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]


class OrtBackend(Backend):
    name = "ort"

    def __init__(self, workdir, providers: Optional[Sequence[Provider]] = None, manifest: Optional[Manifest] = None,
                 threads: Optional[int] = None, io_binding: Optional[bool] = None, graphs: Sequence[str] = GRAPHS,
                 cache_len: str = "auto", precision: Optional[str] = None):
        """workdir: an exported workdir (manifest.json + graphs). providers: onnxruntime providers in priority
        order (default CPU). threads: intra-op threads (default: onnxruntime's choice). io_binding: None =
        on for device providers. cache_len: size of the static KV buffer, allocated once per generation and
        never reallocated inside it: 'max_context' (the manifest's; identical shapes in every call, what
        TensorRT profiles and CUDA graphs want), 'request' (the positions the pipeline asks for, rounded up
        to 64: fewer masked slots to attend over, measured faster on CPU, docs/export.md), or 'auto' =
        'max_context' with a device provider, else 'request'."""
        ort = _import_ort()
        self.workdir = Path(workdir)
        self.manifest = manifest if manifest is not None else Manifest.load(self.workdir)
        if self.manifest.workdir is None:
            self.manifest.workdir = self.workdir
        self.manifest.check_files(graphs)
        where = f"workdir {self.workdir}"
        cache = self.manifest.cache
        if cache.get("layout") not in SUPPORTED_LAYOUTS:
            raise CheckpointError(f"{where}: KV cache layout {cache.get('layout')!r} is not supported by this "
                                  f"runtime ({', '.join(SUPPORTED_LAYOUTS)}); re-export with this version")
        if self.manifest.data.get("precision", "fp32") != "fp32":
            raise CheckpointError(f"{where}: precision {self.manifest.data.get('precision')!r}: the ort backend "
                                  f"runs the fp32 export")
        self.precision = precision or "fp32"
        if cache_len not in ("auto", "max_context", "request"):
            raise InputError("cache_len must be 'auto', 'max_context' or 'request'")

        providers = list(providers) if providers else ["CPUExecutionProvider"]
        available = ort.get_available_providers()
        absent = [_provider_name(p) for p in providers if _provider_name(p) not in available]
        if absent:
            raise MissingDependencyError(f"onnxruntime provider(s) {absent} not available here (available: "
                                         f"{available}); for CUDA/TensorRT install onnxruntime-gpu")
        self.providers = providers
        on_device = _provider_name(providers[0]) in DEVICE_PROVIDERS
        self.cache_len = ("max_context" if on_device else "request") if cache_len == "auto" else cache_len
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = int(threads)
        self.runners: Dict[str, GraphRunner] = {}
        for g in graphs:
            entry = self.manifest.graph(g)
            provs = self._providers_for(entry)
            path = self.manifest.graph_path(g)
            if self.precision != "fp32":
                variant = (entry.get("precisions") or {}).get(self.precision)
                if not variant or not (self.workdir / variant["file"]).is_file():
                    raise CheckpointError(f"{where}: no {self.precision} file for graph '{g}' (run cheers-deploy "
                                          f"calibrate convert/quantize --workdir {self.workdir})")
                path = self.workdir / variant["file"]
            self.runners[g] = GraphRunner(g, path, entry, provs, so, io_binding, where)

        emb = self.manifest.data.get("embed_tokens", {}).get("file", EMBED_FILE)
        self.embed_table = np.load(self.workdir / emb, mmap_mode="r")        # (V,D) float32, memory-mapped
        self.max_context = self.manifest.max_context
        self.num_layers = int(cache["num_layers"])
        self.kv_heads, self.head_dim = int(cache["num_kv_heads"]), int(cache["head_dim"])
        bb = self.manifest.graph("backbone") if "backbone" in self.manifest.graphs else None
        if bb is not None:
            self._bb_in = [t["name"] for t in bb["inputs"][:3]]        # inputs_embeds, position_ids, attention_mask
            self._bb_out = [t["name"] for t in bb["outputs"][:2]]      # hidden_states, logits
            fmt = lambda key: [cache[key].format(i=i) for i in range(self.num_layers)]  # noqa: E731
            self._past_k, self._past_v = fmt("past_key"), fmt("past_value")
            self._present_k, self._present_v = fmt("present_key"), fmt("present_value")
            if bb["inputs"][1]["dtype"] != "int64" or bb["inputs"][2]["dtype"] != "bool":
                raise CheckpointError(f"{where}: backbone inputs 2-3 must be int64 position_ids and a bool "
                                      f"attention_mask; re-export")
        self._last = None          # (hidden of the last position, its logits) of the latest backbone call
        self._mask_memo = None

    def _providers_for(self, entry):
        out = []
        for p in self.providers:
            if _provider_name(p) == "TensorrtExecutionProvider" and not isinstance(p, tuple):
                p = (p, tensorrt_profile_options(entry))
            out.append(p)
        return out

    # -- host <-> backend
    def from_numpy(self, a):
        a = np.asarray(a)
        return np.ascontiguousarray(a, np.float32) if np.issubdtype(a.dtype, np.floating) else a

    def to_numpy(self, a):
        return np.asarray(a)

    def repeat_batch(self, a, n):
        return np.repeat(np.asarray(a), n, axis=0)

    def concat_seq(self, parts):
        return np.concatenate([np.asarray(p) for p in parts], axis=1)

    def concat_batch(self, parts):
        return np.concatenate([np.asarray(p) for p in parts], axis=0)

    # -- stages
    def embed(self, ids):
        return lookup_embeddings(self.embed_table, ids)

    def _run1(self, graph: str, *arrays):
        r = self.runners[graph]
        return r.run(dict(zip(r.input_names, arrays)))

    def vae_encode(self, pixels):
        return self._run1("vae_encoder", pixels)[0]

    def vision_tokenize(self, latent):
        tokens, embeds = self._run1("vision_tokenizer", latent)
        return tokens, embeds

    def cfm_head(self, hidden, patch_embeds, t):
        return self._run1("cfm_head", hidden, patch_embeds, np.asarray(t, np.float32))[0]

    def vae_decode(self, latent):
        return self._run1("vae_decoder", latent)[0]

    def new_cache(self, batch, max_len):
        if max_len > self.max_context:
            raise InputError(f"{max_len} positions requested, more than the context of {self.max_context} this "
                             f"workdir was exported for (re-export with a larger --max-context)")
        n = self.max_context if self.cache_len == "max_context" else min(self.max_context, -(-max_len // 64) * 64)
        return OrtCache(batch, n, self.num_layers, self.kv_heads, self.head_dim)

    def _mask(self, b: int, s: int, start: int, total: int, mask: Optional[np.ndarray]) -> np.ndarray:
        """(B,1,S,T+S) bool over [cache slots 0..T-1, the S new positions]: slots < start are the past,
        slots >= start are stale or empty and always hidden."""
        if mask is None:
            key = (b, s, start, total)
            if self._mask_memo is not None and self._mask_memo[0] == key:
                return self._mask_memo[1]            # image steps repeat the same shape and start
        full = np.zeros((b, 1, s, total + s), dtype=bool)
        if mask is None:
            full[..., :start] = True
            full[..., total:] = True
            self._mask_memo = (key, full)
            return full
        mask = np.asarray(mask, dtype=bool)
        if mask.shape[-2:] != (s, start + s):
            raise InputError(f"mask must have shape (S, start+S) = {(s, start + s)}, got {mask.shape}")
        m = mask if mask.ndim == 3 else mask[None]  # (B|1,S,start+S)
        full[:, 0, :, :start] = m[..., :start]
        full[:, 0, :, total:] = m[..., start:]
        return full

    def backbone(self, cache: OrtCache, embeds, start, mask):
        embeds = np.ascontiguousarray(embeds, dtype=np.float32)
        b, s, _ = embeds.shape
        total = cache.max_len
        if b > cache.batch:
            raise InputError(f"batch {b} exceeds the cache batch {cache.batch}")
        if start < 0 or start + s > total:
            raise InputError(f"KV cache overflow: positions {start}..{start + s - 1} do not fit {total} slots")
        pos = np.ascontiguousarray(np.broadcast_to(np.arange(start, start + s, dtype=np.int64), (b, s)))
        feed = dict(zip(self._bb_in, (embeds, pos, self._mask(b, s, start, total, mask))))
        for i in range(self.num_layers):
            feed[self._past_k[i]] = cache.k[i][:b]             # leading-axis slice: contiguous, no copy
            feed[self._past_v[i]] = cache.v[i][:b]
        outs = dict(zip(self.runners["backbone"].output_names, self.runners["backbone"].run(feed)))
        for i in range(self.num_layers):                        # write the new entries by position
            cache.k[i][:b, :, start:start + s] = outs[self._present_k[i]]
            cache.v[i][:b, :, start:start + s] = outs[self._present_v[i]]
        hidden, logits = outs[self._bb_out[0]], outs[self._bb_out[1]]
        self._last = (hidden[:, -1].copy(), logits)
        return hidden

    def logits(self, hidden_last):
        """The backbone graph already computed the last position's logits; reuse them when asked for that
        very hidden state, else project on the host with the (tied) embedding table."""
        h = np.asarray(hidden_last, dtype=np.float32)
        if self._last is not None and self._last[0].shape == h.shape and np.array_equal(self._last[0], h):
            return self._last[1].copy()
        return h @ np.asarray(self.embed_table).T
