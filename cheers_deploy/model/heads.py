"""Generation heads: timestep embedder (§8), AdaLN-Zero DiT stages 1/2 (§9, §11) and the hi gate (§10).

Options: DiTStack(attn_impl=, rope_cache=) as in qwen2.py (set_attention / set_rope_cache); HiGate(fused=) runs
the Triton kernel of fused_gate.py when on, for CUDA inputs with gradients off and Triton importable, and the
plain ops otherwise. CheersModel.set_options sets them all."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fused_gate as _fused
from .layers import (AttentionOption, RMSNorm, SwiGLU, apply_rope, cached_rope_inv_freq, check_attn_impl,
                     rope_cos_sin, set_attention)
from .vision import shuffle_2x2

DIT_ROPE_BASE = 10000.0


def timestep_features(t, dim: int = 256, max_period: float = 10000.0):
    """t (B,) in [0,1] (no x1000) -> (B,dim) fp32 features, cos first (§8)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    a = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(a), torch.sin(a)], dim=-1)


class TimestepEmbedder(nn.Module):
    """`model.time_embed`: mlp_1 -> c1 (text width, stage 1); mlp_2 -> c2 (vision width, stage 2)."""

    def __init__(self, d1: int, d2: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp_1 = nn.Sequential(nn.Linear(freq_dim, d1), nn.SiLU(), nn.Linear(d1, d1))
        self.mlp_2 = nn.Sequential(nn.Linear(freq_dim, d2), nn.SiLU(), nn.Linear(d2, d2))

    def forward(self, t):
        """t (B,) -> c1 (B,1,d1), c2 (B,1,d2)."""
        dtype = self.mlp_1[0].weight.dtype
        t = t.to(dtype)                                   # the official loop materialises t in the model dtype
        e = timestep_features(t, self.freq_dim).to(dtype)
        return self.mlp_1(e)[:, None], self.mlp_2(e)[:, None]


def modulate(y, shift, scale):
    """bf16(f32(y) * (1 + f32(scale)) + f32(shift)) -- computed in fp32, rounded to y's dtype (§9.1)."""
    return (y.float() * (1 + scale.float()) + shift.float()).to(y.dtype)


class DiTAttention(AttentionOption, nn.Module):
    def __init__(self, d: int, heads: int, kv_heads: int, attn_impl: str = "sdpa"):
        super().__init__()
        self.attn_impl = check_attn_impl(attn_impl)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d // heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, cos, sin):
        b, n, d = x.shape
        # (B,N,H*Dh) -> (B,H,N,Dh)
        q = self.q_proj(x).reshape(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).reshape(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).reshape(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        a = self.attend(q, k, v)                                  # non-causal, no mask
        return self.o_proj(a.transpose(1, 2).reshape(b, n, d))


class DiTBlock(nn.Module):
    def __init__(self, d: int, heads: int, kv_heads: int, attn_impl: str = "sdpa"):
        super().__init__()
        self.input_layernorm = RMSNorm(d, 1e-6)
        self.attn = DiTAttention(d, heads, kv_heads, attn_impl)
        self.post_attention_layernorm = RMSNorm(d, 1e-6)
        self.mlp = SwiGLU(d, 4 * d)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c, cos, sin):
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = self.adaLN_modulation(c).chunk(6, dim=-1)   # each (B,1,D)
        x = x + g_a * self.attn(modulate(self.input_layernorm(x), sh_a, sc_a), cos, sin)
        return x + g_m * self.mlp(modulate(self.post_attention_layernorm(x), sh_m, sc_m))


class FinalLayer(nn.Module):
    def __init__(self, d: int, out: int):
        super().__init__()
        self.norm_final = RMSNorm(d, 1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.linear = nn.Linear(d, out)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiTStack(nn.Module):
    """`diffusion_head_a` blocks + `diffusion_head_b` final layer, 1-D RoPE base 10000."""

    def __init__(self, d: int, heads: int, kv_heads: int, depth: int, out: int, attn_impl: str = "sdpa",
                 rope_cache: bool = True):
        super().__init__()
        self.head_dim = d // heads
        self.diffusion_head_a = nn.ModuleList([DiTBlock(d, heads, kv_heads, attn_impl) for _ in range(depth)])
        self.diffusion_head_b = FinalLayer(d, out)
        self.set_rope_cache(rope_cache)

    def set_attention(self, impl: str) -> None:
        set_attention(self, impl)

    def set_rope_cache(self, on: bool) -> None:
        """As Qwen2Model.set_rope_cache: on, inv_freq per (device, dtype) in a plain dict (never in state_dict)."""
        self.rope_cache = bool(on)
        if not (on and getattr(self, "_rope_tables", None) is not None):
            self._rope_tables = {} if on else None

    def forward(self, x, c, positions):
        dtype = x.dtype
        inv = cached_rope_inv_freq(self._rope_tables, self.head_dim, DIT_ROPE_BASE, dtype, positions.device)
        cos, sin = rope_cos_sin(positions, inv, dtype)                          # (N,Dh)
        for block in self.diffusion_head_a:
            x = block(x, c, cos, sin)
        return self.diffusion_head_b(x, c)


class HiGate(nn.Module):
    """`model.hi_gate`: u = LN(low + g * high), g = Linear(SiLU(Linear(low))) -- unbounded scalar per token.

    fused=True: one Triton kernel (fused_gate.py) after the first Linear, used when the input is on CUDA, gradients
    are off (the kernel has no backward) and Triton imports; otherwise (CPU included) exactly `plain`."""

    def __init__(self, d: int, fused: bool = False):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, 1))
        self.layer_norm = nn.LayerNorm(d, eps=1e-5)
        self.fused = bool(fused)

    def set_fused(self, on: bool) -> None:
        self.fused = bool(on)

    def plain(self, low, high):
        return self.layer_norm(low + self.gate(low) * high)

    def forward(self, low, high):
        if self.fused and low.is_cuda and not torch.is_grad_enabled() and _fused.triton_available():
            return _fused.fused_gate_forward(self, low, high)
        return self.plain(low, high)


def cfm_velocity(time_embed, gen_projector, hi_gate, hi_projector, hidden, patch_embeds, t):
    """hidden (B,M,Dt) final-normed LLM states at the image positions; patch_embeds (B,4M,Dv) ViT embedding
    of the same decoded image; t (B,). Returns velocity (B,C,h,w) with h = w = sqrt(4M)."""
    b, m, _ = hidden.shape
    g = math.isqrt(4 * m)
    c1, c2 = time_embed(t)
    dev = hidden.device
    o = gen_projector(hidden, c1, torch.arange(m, device=dev))                  # (B,M,4Dv)
    low = shuffle_2x2(o, g)                                                     # (B,4M,Dv)
    u = hi_gate(low, patch_embeds.to(low.dtype))
    n = g * g
    pos2 = torch.arange(n, device=dev) % (n // 2)                               # repeating positions (§17.4)
    out = hi_projector(u, c2, pos2)                                             # (B,N,C)
    return out.transpose(1, 2).reshape(b, -1, g, g)                            # (B,C,h,w), token = i*g + j
