"""The torch backend: the reference modules of `cheers_deploy.model` behind the backend contract, with a static KV
cache written by position, and the GPU fast path as options (docs/performance.md, "GPU fast path"):

    static_cache  the LM writes new K/V into the cache in place and attends over the buffer (model/qwen2.py
                  StaticKV): no torch.cat; a decode step has the same shapes at every position
    cuda_graphs   the fixed-shape stages (vision tokenizer, the backbone's image step and one-token decode, the CFM
                  head) captured once per shape and cache as CUDA graphs and replayed; prefill, VAE and the Euler
                  update stay eager
    compile       torch.compile of the same stages (None | "default" | "reduce-overhead" | "max-autotune")
    split_batch   batch rows of the backbone and head run one at a time (the unbatched CFG of the official loop;
                  an ablation and memory knob)

The backend does not synchronise the device by itself: results stay on the device except where the contract hands
them to the host (logits, VAE pixels, to_numpy), and host inputs go through pinned memory without a stream sync.
Only a graph capture (once per shape) waits for the device; stage timings (Pipeline(timings=True)) sync per stage.
"""

from __future__ import annotations

import collections
import functools
import time
import weakref
from typing import Dict, Optional, Tuple

import numpy as np

from ..errors import InputError, require_torch
from .backend import DECODE, IMAGE_STEP, Backend, check_mode

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
GRAPHING_MODES = {"reduce-overhead", "max-autotune"}      # inductor records CUDA graphs itself in these modes
CACHE_BUCKET = 64          # with graphs/compile, cache lengths round up to this: fewer distinct shapes to capture
MAX_GRAPHS = 32            # captured graphs kept (least recently used dropped); they share one memory pool
MAX_POOLED_CACHES = 4      # cache buffers kept for reuse once their request is over (graphs and compile only)


def _no_grad(fn):
    """Stage methods run without autograd; the process-wide grad mode is left alone (training shares it)."""
    @functools.wraps(fn)
    def wrap(self, *a, **k):
        with self.torch.no_grad():
            return fn(self, *a, **k)
    return wrap


class TorchCache:
    def __init__(self, k, v):
        self.k, self.v = k, v          # per layer: (B,Hkv,Tmax,Dh)
        self._sig = None

    @property
    def max_len(self):
        return self.k[0].shape[2]

    @property
    def signature(self) -> Tuple:
        """Shapes and addresses of the buffers (fixed: a cache is never reallocated): part of a graph's key."""
        if self._sig is None:
            self._sig = (tuple(self.k[0].shape), str(self.k[0].dtype),
                         tuple(t.data_ptr() for t in self.k), tuple(t.data_ptr() for t in self.v))
        return self._sig


DEFAULT_MAX_CONTEXT = 32768    # positions, when a config gives no usable max_position_embeddings (Qwen2-1.5B's)
MAX_CONTEXT = 1 << 20          # never more, whatever a config says (the pipeline's MAX_NEW_TOKENS)


def context_limit(config, max_context: Optional[int] = None) -> int:
    """The most positions a torch KV cache may hold: `max_context` when given (1..MAX_CONTEXT), else the config's
    text_config.max_position_embeddings (the positions the model was trained for, at most MAX_CONTEXT), else
    DEFAULT_MAX_CONTEXT."""
    if max_context is not None:
        if isinstance(max_context, bool) or not isinstance(max_context, (int, np.integer)) \
                or not 1 <= int(max_context) <= MAX_CONTEXT:
            raise InputError(f"max_context must be an integer in 1..{MAX_CONTEXT}, got {max_context!r}")
        return int(max_context)
    mpe = getattr(getattr(config, "text_config", None), "max_position_embeddings", None)
    if isinstance(mpe, bool) or not isinstance(mpe, (int, np.integer)) or mpe < 1:
        return DEFAULT_MAX_CONTEXT
    return min(int(mpe), MAX_CONTEXT)


def check_fast_path(device: str, static_cache: Optional[bool], cuda_graphs: bool, compile: Optional[str]) -> bool:
    """Validate the fast-path options (before anything is loaded); returns the static_cache to use."""
    if compile is not None and compile not in COMPILE_MODES:
        raise InputError(f"compile must be None or one of {', '.join(COMPILE_MODES)}, got {compile!r}")
    if cuda_graphs and not str(device).startswith("cuda"):
        raise InputError(f"CUDA graphs (cuda_graphs / --cuda-graphs) need a CUDA device (--device cuda); this runs "
                         f"on {device}: leave them off (compile works on the CPU)")
    if cuda_graphs and compile == "reduce-overhead":
        raise InputError(f"compile mode {compile!r} records CUDA graphs itself: use it without cuda_graphs "
                         f"(--cuda-graphs), or cuda_graphs with compile 'default'")
    fast = bool(cuda_graphs) or compile is not None
    if static_cache is False and fast:
        raise InputError("cuda_graphs and compile need static_cache=True (fixed shapes across decode steps)")
    return fast if static_cache is None else bool(static_cache)


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model, device: str = "cpu", dtype: str = "float32", threads: Optional[int] = None,
                 max_context: Optional[int] = None, static_cache: Optional[bool] = None, cuda_graphs: bool = False,
                 compile: Optional[str] = None, split_batch: bool = False, _compile_backend: str = "inductor"):
        """model: a CheersModel; device: 'cpu', 'cuda', 'cuda:1'; dtype: float32 (the parity reference), bfloat16 or
        float16; threads: intra-op CPU threads for torch (see runtime.threads.set_torch_threads); max_context: the
        most positions a KV cache may hold (default: the config's max_position_embeddings, else
        DEFAULT_MAX_CONTEXT). The pipeline sizes each cache for its request and never beyond this, and refuses a
        max_new_tokens larger than it before anything is allocated.

        Fast path (module docstring): static_cache (default: on exactly when cuda_graphs or compile is), cuda_graphs
        (CUDA only; needs the model's rope_cache option, its default), compile (a torch.compile mode; with
        cuda_graphs only 'default' or 'max-autotune', which then compiles without inductor's own graphs),
        split_batch. Capture and compile happen on the first call of each shape; `warmup_s` adds up their time.
        Compiled kernels are cached on disk by inductor (TORCHINDUCTOR_CACHE_DIR), so a restarted process
        recompiles faster. `_compile_backend` is a test knob ('eager' traces without inductor)."""
        torch = require_torch()
        self.torch = torch
        if dtype not in DTYPES:
            raise InputError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.static_cache = check_fast_path(device, static_cache, cuda_graphs, compile)
        self.max_context = context_limit(getattr(model, "config", None), max_context)
        from .threads import set_torch_threads

        self.threads = set_torch_threads(threads)
        self.dtype = getattr(torch, DTYPES[dtype])
        self.device = torch.device(device)
        if cuda_graphs and not torch.cuda.is_available():
            raise InputError("cuda_graphs: torch sees no CUDA device (torch.cuda.is_available() is False)")
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.cfg = model.config
        from ..model.qwen2 import StaticKV

        self._static_kv = StaticKV
        self.cuda_graphs, self.compile_mode, self.split_batch = bool(cuda_graphs), compile, bool(split_batch)
        self._compile_backend = _compile_backend
        self.warmup_s = 0.0                       # seconds spent capturing graphs and compiling (first calls)
        self.captures = self.replays = 0
        self._graphs: "collections.OrderedDict" = collections.OrderedDict()
        self._pool = None
        self._compiled: Dict[str, object] = {}
        self._seen = set()                        # (stage, key) already run once (compile warm-up accounting)
        self._free_caches: list = []             # (weakref to a cache, (batch, max_len), k, v), newest first
        if compile is not None and self.device.type == "cuda":
            from ..model import fused_gate

            if fused_gate.triton_available():       # the hi gate's kernel defined before any tracing: dynamo then
                fused_gate.gate_kernel()             # sees a plain Triton launch when fused_gate is on
        mods = list(self.model.modules())
        self._opt_mods = ([m for m in mods if hasattr(m, "attn_impl")], [m for m in mods if hasattr(m, "rope_cache")],
                          [m for m in mods if hasattr(m, "set_fused")])

    # ------------------------------------------------------------------ host <-> device
    def _h2d(self, a: np.ndarray):
        """A host array on the device; on CUDA through pinned memory without a stream sync (the caching host
        allocator keeps the pinned block until the copy has run)."""
        t = self.torch.from_numpy(np.ascontiguousarray(a))
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def from_numpy(self, a):
        t = self._h2d(a)
        return t.to(self.dtype) if t.is_floating_point() else t

    def to_numpy(self, a):
        return a.detach().float().cpu().numpy() if a.is_floating_point() else a.cpu().numpy()

    def repeat_batch(self, a, n):
        return a.expand(n, *a.shape[1:])

    def concat_seq(self, parts):
        return self.torch.cat(list(parts), dim=1)

    def concat_batch(self, parts):
        return self.torch.cat(list(parts), dim=0)

    # ------------------------------------------------------------------ fast-path machinery
    def _options_key(self) -> tuple:
        """The model options a captured graph or compiled stage was made with (changing one recaptures)."""
        attn, rope, gate = self._opt_mods
        return (tuple(m.attn_impl for m in attn), tuple(m.rope_cache for m in rope), tuple(m.fused for m in gate))

    def _stage_fn(self, name: str, fn):
        """`fn`, or its torch.compile'd version (one per stage, so each stage keeps its own compile cache)."""
        if self.compile_mode is None:
            return fn
        c = self._compiled.get(name)
        if c is None:
            mode = self.compile_mode
            if self.cuda_graphs and mode == "max-autotune":
                mode = "max-autotune-no-cudagraphs"          # our own capture records the graph
            kw = {"mode": mode} if self._compile_backend == "inductor" else {}
            c = self._compiled[name] = self.torch.compile(fn, backend=self._compile_backend, **kw)
        return c

    def _run(self, name: str, fn, tensors: tuple, extra: tuple = (), key: tuple = ()):
        """Run stage `name`: fn(*tensors, *extra) -> tuple of tensors, eagerly, compiled, and/or as a CUDA graph
        keyed by (name, input shapes, key, model options). Returns tensors the caller owns."""
        fast = self.compile_mode is not None or self.cuda_graphs
        if not fast:
            return fn(*tensors, *extra)
        torch = self.torch
        fn = self._stage_fn(name, fn)
        full = (name, tuple((tuple(t.shape), t.dtype) for t in tensors), key, self._options_key())
        if not self.cuda_graphs:
            first = full not in self._seen
            t0 = time.perf_counter()
            if self.device.type == "cuda" and self.compile_mode in GRAPHING_MODES:
                torch.compiler.cudagraph_mark_step_begin()
                out = tuple(o.clone() for o in fn(*tensors, *extra))   # inductor's graph outputs are reused
            else:
                out = fn(*tensors, *extra)
            if first:
                if len(self._seen) > 4096:                    # bounded in a long-running service
                    self._seen.clear()
                self._seen.add(full)
                self.warmup_s += time.perf_counter() - t0
            return out
        entry = self._graphs.get(full)
        if entry is None:
            entry = self._capture(full, fn, tensors, extra)
        else:
            self._graphs.move_to_end(full)
            for dst, src in zip(entry[1], tensors):
                dst.copy_(src)
        entry[0].replay()
        self.replays += 1
        return tuple(o.clone() for o in entry[2])

    def _capture(self, full, fn, tensors, extra):
        torch = self.torch
        rope = self._options_key()[1]
        if not all(rope):
            raise InputError("cuda_graphs needs the model's rope_cache option on (CheersModel.set_options("
                             "rope_cache=True)): host-built RoPE tables are host-to-device copies, which a CUDA "
                             "graph cannot record")
        t0 = time.perf_counter()
        static = tuple(t.clone() for t in tensors)           # the graph's input buffers (copied into per call)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):                        # warm-up outside the capture: lazy init, autotune,
            for _ in range(2):                               # compilation (cache writes repeat the same values)
                fn(*static, *extra)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._pool):           # outputs are cloned right after each replay, so
            out = fn(*static, *extra)                        # graphs may share one pool in any replay order
        entry = self._graphs[full] = (g, static, tuple(out))
        while len(self._graphs) > MAX_GRAPHS:
            self._graphs.popitem(last=False)
        self.captures += 1
        self.warmup_s += time.perf_counter() - t0
        return entry

    def reset_graphs(self) -> None:
        """Drop captured graphs and compiled stages (e.g. after replacing parameter tensors, not copying into them)."""
        self._graphs.clear()
        self._compiled.clear()
        self._seen.clear()

    # ------------------------------------------------------------------ stages
    @_no_grad
    def embed(self, ids):
        return self.model.embed(self._h2d(np.asarray(ids, dtype=np.int64)))

    @_no_grad
    def vae_encode(self, pixels):
        return self.model.vae_encode(self.from_numpy(pixels))

    def _vt_fn(self, latent):
        return self.model.vision_tokenize(latent)

    @_no_grad
    def vision_tokenize(self, latent):
        return self._run("vision_tokenizer", self._vt_fn, (latent,))

    def new_cache(self, batch, max_len):
        if max_len > self.max_context:
            raise InputError(f"{max_len} positions requested, more than the context of {self.max_context} "
                             f"this model holds")
        t = self.cfg.text_config
        fast = self.cuda_graphs or self.compile_mode is not None
        if fast:            # a few shapes, reused buffers: graphs and compiled stages serve the next request too
            max_len = min(-(-max_len // CACHE_BUCKET) * CACHE_BUCKET, self.max_context)
            for i, (ref, shape_key, k, v) in enumerate(self._free_caches):
                if shape_key == (batch, max_len) and ref() is None:   # its last user is gone: reuse the buffers
                    for x in k + v:
                        x.zero_()
                    cache = TorchCache(k, v)
                    self._free_caches[i] = (weakref.ref(cache), shape_key, k, v)
                    return cache
        shape = (batch, t.num_key_value_heads, max_len, t.head_dim)
        mk = lambda: self.torch.zeros(shape, dtype=self.dtype, device=self.device)  # noqa: E731
        k = [mk() for _ in range(t.num_hidden_layers)]
        v = [mk() for _ in range(t.num_hidden_layers)]
        cache = TorchCache(k, v)
        if fast:
            if self.compile_mode in GRAPHING_MODES and self.device.type == "cuda":
                for x in k + v:              # mutated inputs of inductor's CUDA graphs; no identity guard, so a
                    self.torch._dynamo.mark_static_address(x, guard=False)    # new cache does not recompile
            self._free_caches.insert(0, (weakref.ref(cache), (batch, max_len), k, v))
            del self._free_caches[MAX_POOLED_CACHES:]
        return cache

    # the static-cache LM calls (model/qwen2.py StaticKV); cache buffers are passed whole, rows r0:r1 sliced inside
    def _lm_static(self, embeds, ks, vs, slots, mask, kv_len, r0, r1):
        b, s = embeds.shape[:2]
        ks, vs = [k[r0:r1] for k in ks], [v[r0:r1] for v in vs]
        static = self._static_kv(ks, vs, slots, kv_len)
        return self.model.backbone(embeds, slots[None].expand(b, s), mask, static=static)[0]

    def _image_fn(self, embeds, ks, vs, start, r0, r1):
        s = embeds.shape[1]
        slots = self.torch.arange(start, start + s, device=embeds.device)
        return (self._lm_static(embeds, ks, vs, slots, None, start + s, r0, r1),)

    def _decode_fn(self, embeds, slots, ks, vs, r0, r1):
        t = ks[0].shape[2]
        mask = (self.torch.arange(t, device=slots.device) <= slots[-1]).view(1, 1, 1, t)   # hide unused slots
        hidden = self._lm_static(embeds, ks, vs, slots, mask, None, r0, r1)
        return hidden, self.model.logits(hidden[:, -1])

    def _backbone_rows(self, cache, embeds, start, m, mode, r0, r1):
        """(hidden, last-position logits or None) of batch rows r0:r1."""
        torch = self.torch
        b, s, _ = embeds.shape
        if not self.static_cache:                # the reference path: past views concatenated inside attention
            pos = torch.arange(start, start + s, device=self.device)[None].expand(b, s)
            past = [(k[r0:r1, :, :start], v[r0:r1, :, :start]) for k, v in zip(cache.k, cache.v)]
            hidden, new = self.model.backbone(embeds, pos, m, past)
            for i, (k, v) in enumerate(new):           # write by position: no reallocation
                cache.k[i][r0:r1, :, start:start + s] = k
                cache.v[i][r0:r1, :, start:start + s] = v
            return hidden, None if mode == IMAGE_STEP else self.model.logits(hidden[:, -1])
        key = (cache.signature, r0, r1)
        if mode == IMAGE_STEP and m is None:
            return self._run("image_step", self._image_fn, (embeds,), (cache.k, cache.v, start, r0, r1),
                             key + (start,))[0], None
        if mode == DECODE and m is None and s == 1:
            slots = torch.full((1,), start, dtype=torch.int64, device=self.device)     # a fill: no host copy
            return self._run("decode", self._decode_fn, (embeds, slots), (cache.k, cache.v, r0, r1), key)
        slots = torch.arange(start, start + s, device=self.device)                      # prefill: eager
        hidden = self._lm_static(embeds, cache.k, cache.v, slots, m, start + s, r0, r1)
        return hidden, None if mode == IMAGE_STEP else self.model.logits(hidden[:, -1])

    def _rows(self, b):
        return [(r, r + 1) for r in range(b)] if self.split_batch and b > 1 else [(0, b)]

    @_no_grad
    def backbone(self, cache, embeds, start, mask: Optional[np.ndarray], mode: str):
        check_mode(mode)
        torch = self.torch
        b, s, _ = embeds.shape
        if start + s > cache.max_len:
            raise RuntimeError(f"KV cache overflow: {start + s} > {cache.max_len}")
        m = None if mask is None else self._h2d(np.asarray(mask, dtype=bool))[None, None]   # (1,1,S,T)
        outs = [self._backbone_rows(cache, embeds[r0:r1], start, m, mode, r0, r1) for r0, r1 in self._rows(b)]
        hidden = outs[0][0] if len(outs) == 1 else torch.cat([o[0] for o in outs])
        if mode == IMAGE_STEP:
            return hidden, None
        logits = outs[0][1] if len(outs) == 1 else torch.cat([o[1] for o in outs])
        return hidden, logits.detach().float().cpu().numpy()

    def _head_fn(self, hidden, patch_embeds, t):
        return (self.model.cfm_head(hidden, patch_embeds, t),)

    @_no_grad
    def cfm_head(self, hidden, patch_embeds, t):
        tt = self._h2d(np.asarray(t, np.float32))
        outs = [self._run("cfm_head", self._head_fn, (hidden[r0:r1], patch_embeds[r0:r1], tt[r0:r1]))[0]
                for r0, r1 in self._rows(hidden.shape[0])]
        return outs[0] if len(outs) == 1 else self.torch.cat(outs)

    @_no_grad
    def vae_decode(self, latent):
        return self.to_numpy(self.model.vae_decode(latent))

    def synchronize(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def close(self):
        self.reset_graphs()
        self._free_caches.clear()
