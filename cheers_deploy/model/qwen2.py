"""Qwen2 decoder over `inputs_embeds` with an explicit KV interface (§7).

Each layer takes the cached (already rotated) keys/values of earlier positions and returns the new
entries; who stores them (a concatenated cache, a static buffer written by position) is the caller's
business, so the same module serves prefill, decode and the image step.

The static-cache path (`static=StaticKV(...)`, gpt-fast style): each layer writes its new K/V into the caller's
preallocated (B,Hkv,T,Dh) buffers in place (`index_copy_` at the given slots) and attends over the buffer itself,
either its first `kv_len` slots or, with kv_len None, all T slots with the mask hiding the unused ones (as the
exported backbone graph does). No torch.cat of past and new entries, so with kv_len None every decode step has the
same shapes (what CUDA graphs and torch.compile need). With kv_len = start + S the keys and values are the same
numbers the concatenating path builds, in the same order.

Options (constructor keywords, or `set_attention` / `set_rope_cache`; CheersModel.set_options sets them all):
attn_impl, the attention implementation of every layer (layers.ATTENTION_IMPLS), and rope_cache, whether RoPE
inv_freq is built once per (device, dtype) and kept on the module (True) or rebuilt on the host at every call
and copied to the device (False, the official code's behaviour). Both give the same values.
"""

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn

from .layers import (AttentionOption, RMSNorm, SwiGLU, apply_rope, cached_rope_inv_freq, check_attn_impl,
                     rope_cos_sin, set_attention)


class StaticKV(NamedTuple):
    """The caller's static KV cache for one backbone call (see the module docstring)."""
    k: Sequence[torch.Tensor]            # per layer (B,Hkv,T,Dh), written in place
    v: Sequence[torch.Tensor]
    slots: torch.Tensor                  # (S,) int64 on the buffers' device: new entry j goes to slot slots[j]
    kv_len: Optional[int] = None         # attend over buffer[:, :, :kv_len]; None: all T slots (mask required)


class Qwen2Attention(AttentionOption, nn.Module):
    def __init__(self, cfg, attn_impl: str = "sdpa"):
        super().__init__()
        self.attn_impl = check_attn_impl(attn_impl)
        d, self.heads, self.kv_heads = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = d // self.heads
        self.q_proj = nn.Linear(d, self.heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=False)

    def forward(self, x, cos, sin, mask, past_k=None, past_v=None, static=None):
        """static: None, or (k buffer, v buffer, slots, kv_len) of this layer (StaticKV per layer)."""
        b, s, _ = x.shape
        # (B,S,H*Dh) -> (B,H,S,Dh)
        q = self.q_proj(x).reshape(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).reshape(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).reshape(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if static is not None:
            kb, vb, slots, kv_len = static
            kb.index_copy_(2, slots, k)                                          # in place, no reallocation
            vb.index_copy_(2, slots, v)
            k_all = kb if kv_len is None else kb[:, :, :kv_len]                  # (B,Hkv,T|kv_len,Dh) views
            v_all = vb if kv_len is None else vb[:, :, :kv_len]
        else:
            k_all = k if past_k is None else torch.cat([past_k, k], dim=2)      # (B,Hkv,T,Dh)
            v_all = v if past_v is None else torch.cat([past_v, v], dim=2)
        a = self.attend(q, k_all, v_all, mask)                                   # (B,H,S,Dh)
        return self.o_proj(a.transpose(1, 2).reshape(b, s, -1)), k, v


class Qwen2Layer(nn.Module):
    def __init__(self, cfg, attn_impl: str = "sdpa"):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen2Attention(cfg, attn_impl)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, mask, past_k=None, past_v=None, static=None):
        a, k, v = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_k, past_v, static)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


class Qwen2Model(nn.Module):
    """`model.language_model`."""

    def __init__(self, cfg, attn_impl: str = "sdpa", rope_cache: bool = True):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Qwen2Layer(cfg, attn_impl) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.set_rope_cache(rope_cache)

    def set_attention(self, impl: str) -> None:
        set_attention(self, impl)

    def set_rope_cache(self, on: bool) -> None:
        """on: inv_freq per (device, dtype) in a plain dict (not a buffer: never in state_dict); off: the official
        per-call host tensor. Switching off drops what was cached; switching on again starts empty."""
        self.rope_cache = bool(on)
        if not (on and getattr(self, "_rope_tables", None) is not None):
            self._rope_tables = {} if on else None

    def rope(self, position_ids, dtype):
        """position_ids (B,S) -> cos, sin (B,S,Dh) in `dtype`."""
        inv = cached_rope_inv_freq(self._rope_tables, self.cfg.head_dim, self.cfg.rope_theta, dtype,
                                   position_ids.device)
        return rope_cos_sin(position_ids, inv, dtype)

    def forward(self, inputs_embeds, position_ids, mask, past=None, static: Optional[StaticKV] = None):
        """inputs_embeds (B,S,D), position_ids (B,S), mask bool (B,1,S,T) or None (= all allowed),
        past: list of (k, v) per layer, each (B,Hkv,P,Dh), or None; static: a StaticKV instead of past (the
        mask then covers the kv_len, or all T, slots attended).
        Returns final-normed hidden states (B,S,D) and the new (k, v) per layer, each (B,Hkv,S,Dh)."""
        if static is not None and past is not None:
            raise ValueError("pass either past (concatenating cache) or static (in-place cache), not both")
        dtype = inputs_embeds.dtype
        cos, sin = self.rope(position_ids, dtype)                               # (B,S,Dh)
        x, new = inputs_embeds, []
        for i, layer in enumerate(self.layers):
            pk, pv = past[i] if past is not None else (None, None)
            st = None if static is None else (static.k[i], static.v[i], static.slots, static.kv_len)
            x, k, v = layer(x, cos, sin, mask, pk, pv, st)
            new.append((k, v))
        return self.norm(x), new
