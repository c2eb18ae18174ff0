"""Shared building blocks: RMSNorm, rotate-half RoPE, grouped-query attention, SwiGLU MLP."""

import torch
import torch.nn as nn
import torch.nn.functional as F


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
    """SDPA with GQA. q (B,H,S,D), k/v (B,Hkv,T,D), mask: bool (B,1,S,T) True = may attend, or None."""
    n_rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask)


class SwiGLU(nn.Module):
    """down(SiLU(gate(x)) * up(x)), no biases (LLM and DiT MLPs)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
