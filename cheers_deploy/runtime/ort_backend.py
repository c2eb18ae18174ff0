"""The ONNX Runtime backend: one InferenceSession per exported graph behind the backend contract, numpy arrays
on the host, and a static KV cache (numpy, max_context positions) written by position. No torch.

    Pipeline ─► OrtBackend.backbone(cache, embeds, start, mask, mode)
                  feed: inputs_embeds, position_ids, attention_mask (B,1,S,Tmax+S) bool, the whole cache buffer
                  ─► GraphRunner("backbone") ─► hidden_states, logits (last position), present = new K/V
                  ─► cache.k[i][:, :, start:start+S] = present   (no reallocation, no concatenation)
                  ─► (hidden, logits)

Names, shapes and the cache layout come from manifest.json; every session is checked against it on load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from ..constants import EXPORT_PRECISION, GRAPH_NAMES as GRAPHS
from ..errors import CheckpointError, InputError, MissingDependencyError
from ..manifest import GraphEntry, Manifest, check_io
from .backend import IMAGE_STEP, check_mode
from .graph_backend import GraphBackend
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


def tensorrt_profile_options(entry: GraphEntry) -> Dict[str, str]:
    """TensorRT EP explicit-profile options from a manifest graph entry: one profile per mode (prefill /
    decode / image step for the backbone), an input repeated once per profile."""
    keys = ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")
    parts: Dict[str, List[str]] = {k: [] for k in keys}
    for prof in entry.profiles.values():
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

    def __init__(self, name: str, path: Path, entry: GraphEntry, providers: Sequence[Provider], session_options,
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
        self.input_names = entry.input_names
        self.output_names = entry.output_names
        try:
            self.input_dtypes = {t.name: np.dtype(t.dtype) for t in entry.inputs}
        except TypeError as exc:
            raise CheckpointError(f"{where}: graph '{name}' has an input dtype numpy cannot feed ({exc})") from None
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


FeedHook = Callable[[str, Optional[str], Dict[str, np.ndarray]], None]


class OrtBackend(GraphBackend):
    name = "ort"

    def __init__(self, workdir, providers: Optional[Sequence[Provider]] = None, manifest: Optional[Manifest] = None,
                 threads: Optional[int] = None, io_binding: Optional[bool] = None, graphs: Sequence[str] = GRAPHS,
                 cache_len: str = "auto", precision: Optional[str] = None, on_feed: Optional[FeedHook] = None,
                 spin: bool = False):
        """workdir: an exported workdir (manifest.json + graphs). providers: onnxruntime providers in priority
        order (default CPU). threads: intra-op threads (default: onnxruntime's choice). io_binding: None =
        on for device providers. cache_len: size of the static KV buffer, allocated once per generation and
        never reallocated inside it: 'max_context' (the manifest's; identical shapes in every call, what
        TensorRT profiles and CUDA graphs want), 'request' (the positions the pipeline asks for, rounded up
        to 64: fewer masked slots to attend over, measured faster on CPU, docs/export.md), or 'auto' =
        'max_context' with a device provider, else 'request'. precision: which graph files to run (fp32 = the
        export; fp16/bf16/int8/mixed from `cheers-deploy calibrate`). on_feed(graph, mode, feed): called with
        every graph's input feed before it runs (mode: the backbone's phase, else None) - how calibration
        records real activations. spin: let idle intra-op threads spin (onnxruntime's default) instead of
        sleeping; off by default because spinning threads slow everything down on a shared machine and were not
        faster on an idle one either (python -m cheers_deploy.bench.threads, docs/performance.md)."""
        ort = _import_ort()
        self._open_workdir(workdir, manifest, graphs)
        if self.manifest.precision != EXPORT_PRECISION:
            raise CheckpointError(f"{self.where}: precision {self.manifest.precision!r}: the ort backend runs the "
                                  f"{EXPORT_PRECISION} export")
        self.precision = precision or EXPORT_PRECISION
        if cache_len not in ("auto", "max_context", "request"):
            raise InputError("cache_len must be 'auto', 'max_context' or 'request'")
        self.on_feed = on_feed

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
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        self.threads, self.spin = threads, bool(spin)
        self.runners: Dict[str, GraphRunner] = {}
        for g in graphs:
            entry = self.manifest.graph(g)
            src, data = self.manifest.graph_files(g, self.precision)     # contained in the workdir (or refused)
            if src is None or not src.is_file():
                raise CheckpointError(f"{self.where}: no {self.precision} file for graph '{g}' (run cheers-deploy "
                                      f"calibrate convert/quantize --workdir {self.workdir})")
            if data is not None and not data.is_file():
                raise CheckpointError(f"{self.where}: graph '{g}' ({self.precision}) is missing its external data "
                                      f"{data.name} (re-run the step that wrote it)")
            self.runners[g] = GraphRunner(g, src, entry, self._providers_for(entry), so, io_binding, self.where)

    def _providers_for(self, entry):
        out = []
        for p in self.providers:
            if _provider_name(p) == "TensorrtExecutionProvider" and not isinstance(p, tuple):
                p = (p, tensorrt_profile_options(entry))
            out.append(p)
        return out

    # -- stages
    def _run(self, graph: str, feed: Dict[str, np.ndarray], mode: Optional[str] = None) -> List[np.ndarray]:
        if self.on_feed is not None:
            self.on_feed(graph, mode, feed)
        return self.runners[graph].run(feed)

    def _run1(self, graph: str, *arrays):
        r = self.runners[graph]
        return self._run(graph, dict(zip(r.input_names, arrays)))

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
        self._check_new_cache(max_len)
        n = self.max_context if self.cache_len == "max_context" else min(self.max_context, -(-max_len // 64) * 64)
        return OrtCache(batch, n, self.num_layers, self.kv_heads, self.head_dim)

    def backbone(self, cache: OrtCache, embeds, start, mask, mode):
        check_mode(mode)
        embeds = np.ascontiguousarray(embeds, dtype=np.float32)
        b, s, _ = embeds.shape
        total = cache.max_len
        self._check_bounds(cache.batch, total, b, s, start)
        full, _ = self._attention_mask(b, s, start, total, mask)
        feed = dict(zip(self._bb_in, (embeds, self._positions(b, s, start), full)))
        for i in range(self.num_layers):
            feed[self._past_k[i]] = cache.k[i][:b]             # leading-axis slice: contiguous, no copy
            feed[self._past_v[i]] = cache.v[i][:b]
        outs = dict(zip(self.runners["backbone"].output_names, self._run("backbone", feed, mode)))
        for i in range(self.num_layers):                        # write the new entries by position
            cache.k[i][:b, :, start:start + s] = outs[self._present_k[i]]
            cache.v[i][:b, :, start:start + s] = outs[self._present_v[i]]
        hidden, logits = outs[self._bb_out[0]], outs[self._bb_out[1]]
        return hidden, (None if mode == IMAGE_STEP else np.asarray(logits, dtype=np.float32))
