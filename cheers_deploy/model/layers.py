"""Shared building blocks: RMSNorm, rotate-half RoPE (with an optional per-device table cache), grouped-query
attention in three implementations (an option of each attention module), SwiGLU MLP."""

import collections
import contextlib
from typing import Dict, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.torch_version import TorchVersion


class RMSNorm(nn.Module):
    """y = w * cast(x32 * rsqrt(mean(x32^2) + eps)) -- rounded to the input dtype before the weight (§7.2)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(dim: int, base: float, dtype: torch.dtype) -> torch.Tensor:
    """inv_freq in fp32, rounded through the model dtype as the official whole-model cast does (§7.3, §19.3)."""
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if dtype != torch.float32:
        inv = inv.to(dtype).float()
    return inv


def cached_rope_inv_freq(cache: Optional[dict], dim: int, base: float, dtype: torch.dtype,
                         device: torch.device) -> torch.Tensor:
    """`rope_inv_freq` built once per (device, dtype) and kept in `cache` (a plain dict owned by the module: no
    buffer, so not in state_dict or checkpoints). cache None: the official behaviour, a fresh host tensor per call
    (copied to the device by `rope_cos_sin`). Same values either way."""
    if cache is None:
        return rope_inv_freq(dim, base, dtype)
    key = (device, dtype)
    inv = cache.get(key)
    if inv is None:
        inv = rope_inv_freq(dim, base, dtype).to(device)
        cache[key] = inv
    return inv


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """positions (...,S) -> cos, sin (...,S,D) in `dtype`; both halves repeat the D/2 angles (rotate-half)."""
    angle = positions.float()[..., None] * inv_freq.to(positions.device)  # (..., S, D/2) fp32
    emb = torch.cat([angle, angle], dim=-1)                               # (..., S, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    d = x.shape[-1] // 2
    return torch.cat([-x[..., d:], x[..., :d]], dim=-1)


def apply_rope(x, cos, sin):
    """x (B,H,S,D); cos/sin (B,S,D) or (S,D)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # (B,1,S,D)
    return x * cos + rotate_half(x) * sin


def repeat_kv(x, n_rep: int):
    """(B,Hkv,T,D) -> (B,Hkv*n_rep,T,D); query head h uses KV head h // n_rep."""
    if n_rep == 1:
        return x
    b, hkv, t, d = x.shape
    return x[:, :, None].expand(b, hkv, n_rep, t, d).reshape(b, hkv * n_rep, t, d)


def attention(q, k, v, mask=None):
    """"sdpa": SDPA with GQA by repeat_kv. q (B,H,S,D), k/v (B,Hkv,T,D), mask: bool (B,1,S,T) True = may attend,
    or None."""
    n_rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask)


SDPA_HAS_GQA = TorchVersion(torch.__version__) >= (2, 5)          # scaled_dot_product_attention(enable_gqa=)


def attention_gqa(q, k, v, mask=None):
    """"sdpa_gqa": SDPA's native GQA (no repeated K/V in memory) where the installed torch has it, else "sdpa"."""
    if not SDPA_HAS_GQA:
        return attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def masked_attention(q, k, v, mask=None):
    """"masked": the same maths with the boolean mask (B,1,S,T) applied by Where on the scores, never as an
    additive -inf mask (what ONNX export needs: see export/wrappers.py). q (B,H,S,Dh), k/v (B,Hkv,T,Dh)."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)                            # (B,H,T,Dh)
    scores = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-1, -2)                # (B,H,S,T)
    if mask is not None:
        # a large finite fill (not -inf): an fp16 conversion clips it to -65504, softmax still gives 0
        scores = torch.where(mask, scores, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1) @ v                                   # (B,H,S,Dh)


ATTENTION_IMPLS = {"sdpa": attention, "sdpa_gqa": attention_gqa, "masked": masked_attention}

_ATTENTION_OBSERVERS: list = []          # Counters opened by `count_attention_calls`


def check_attn_impl(impl: str) -> str:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose from {sorted(ATTENTION_IMPLS)}")
    return impl


@contextlib.contextmanager
def count_attention_calls() -> Iterator[collections.Counter]:
    """Observe attention: yields a Counter {implementation: calls} of every attention module's calls while open
    (the exporter checks that the backbone trace really took the "masked" path)."""
    counts: collections.Counter = collections.Counter()
    _ATTENTION_OBSERVERS.append(counts)
    try:
        yield counts
    finally:
        _ATTENTION_OBSERVERS.remove(counts)


class AttentionOption:
    """Mixin of the attention modules: the implementation is the module's own option `attn_impl`, one of
    ATTENTION_IMPLS, set at construction or with `set_attention`."""

    attn_impl = "sdpa"

    def set_attention(self, impl: str) -> None:
        self.attn_impl = check_attn_impl(impl)

    def attend(self, q, k, v, mask=None):
        impl = self.attn_impl
        for counts in _ATTENTION_OBSERVERS:
            counts[impl] += 1
        return ATTENTION_IMPLS[impl](q, k, v, mask)


def set_attention(module: nn.Module, impl: str) -> int:
    """Set `impl` on every attention module under `module` (itself included); returns how many."""
    check_attn_impl(impl)
    n = 0
    for m in module.modules():
        if isinstance(m, AttentionOption):
            m.set_attention(impl)
            n += 1
    return n


def attention_impls(module: nn.Module) -> Dict[str, str]:
    """{qualified name: attn_impl} of the attention modules under `module`."""
    return {name: m.attn_impl for name, m in module.named_modules() if isinstance(m, AttentionOption)}


class SwiGLU(nn.Module):
    """down(SiLU(gate(x)) * up(x)), no biases (LLM and DiT MLPs)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
