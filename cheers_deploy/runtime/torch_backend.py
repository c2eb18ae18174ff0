"""The torch backend: the reference modules of `cheers_deploy.model` behind the backend contract,
with a static KV cache written by position."""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np

from ..errors import InputError, require_torch
from .backend import IMAGE_STEP, Backend, check_mode

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


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

    @property
    def max_len(self):
        return self.k[0].shape[2]


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


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model, device: str = "cpu", dtype: str = "float32", threads: Optional[int] = None,
                 max_context: Optional[int] = None):
        """model: a CheersModel; device: 'cpu', 'cuda', 'cuda:1'; dtype: float32 (the parity reference), bfloat16 or
        float16; threads: intra-op CPU threads for torch (see runtime.threads.set_torch_threads); max_context: the
        most positions a KV cache may hold (default: the config's max_position_embeddings, else
        DEFAULT_MAX_CONTEXT). The pipeline sizes each cache for its request and never beyond this, and refuses a
        max_new_tokens larger than it before anything is allocated."""
        torch = require_torch()
        self.torch = torch
        if dtype not in DTYPES:
            raise InputError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.max_context = context_limit(getattr(model, "config", None), max_context)
        from .threads import set_torch_threads

        self.threads = set_torch_threads(threads)
        self.dtype = getattr(torch, DTYPES[dtype])
        self.device = torch.device(device)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.cfg = model.config

    def from_numpy(self, a):
        t = self.torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
        return t.to(self.dtype) if t.is_floating_point() else t

    def to_numpy(self, a):
        return a.detach().float().cpu().numpy() if a.is_floating_point() else a.cpu().numpy()

    def repeat_batch(self, a, n):
        return a.expand(n, *a.shape[1:])

    def concat_seq(self, parts):
        return self.torch.cat(list(parts), dim=1)

    def concat_batch(self, parts):
        return self.torch.cat(list(parts), dim=0)

    @_no_grad
    def embed(self, ids):
        return self.model.embed(self.torch.from_numpy(np.asarray(ids, dtype=np.int64)).to(self.device))

    @_no_grad
    def vae_encode(self, pixels):
        return self.model.vae_encode(self.from_numpy(pixels))

    @_no_grad
    def vision_tokenize(self, latent):
        return self.model.vision_tokenize(latent)

    def new_cache(self, batch, max_len):
        if max_len > self.max_context:
            raise InputError(f"{max_len} positions requested, more than the context of {self.max_context} "
                             f"this model holds")
        t = self.cfg.text_config
        shape = (batch, t.num_key_value_heads, max_len, t.head_dim)
        mk = lambda: self.torch.zeros(shape, dtype=self.dtype, device=self.device)  # noqa: E731
        return TorchCache([mk() for _ in range(t.num_hidden_layers)], [mk() for _ in range(t.num_hidden_layers)])

    @_no_grad
    def backbone(self, cache, embeds, start, mask: Optional[np.ndarray], mode: str):
        check_mode(mode)
        torch = self.torch
        b, s, _ = embeds.shape
        if start + s > cache.max_len:
            raise RuntimeError(f"KV cache overflow: {start + s} > {cache.max_len}")
        pos = torch.arange(start, start + s, device=self.device)[None].expand(b, s)
        m = None if mask is None else torch.from_numpy(mask).to(self.device)[None, None]   # (1,1,S,T)
        past = [(k[:b, :, :start], v[:b, :, :start]) for k, v in zip(cache.k, cache.v)]
        hidden, new = self.model.backbone(embeds, pos, m, past)
        for i, (k, v) in enumerate(new):           # write by position: no reallocation
            cache.k[i][:b, :, start:start + s] = k
            cache.v[i][:b, :, start:start + s] = v
        if mode == IMAGE_STEP:
            return hidden, None
        return hidden, self.model.logits(hidden[:, -1]).detach().float().cpu().numpy()

    @_no_grad
    def cfm_head(self, hidden, patch_embeds, t):
        return self.model.cfm_head(hidden, patch_embeds, self.torch.from_numpy(np.asarray(t, np.float32)).to(self.device))

    @_no_grad
    def vae_decode(self, latent):
        return self.to_numpy(self.model.vae_decode(latent))

    def synchronize(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
