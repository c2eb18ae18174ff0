"""nn.Module wrappers that expose one CheersModel method as one graph (inputs and outputs in spec order),
and the two export-time substitutions (`export_patches`): the backbone's attention and eval BatchNorm.

Why a different attention at export: the reference model calls SDPA with a boolean mask, and the TorchScript
exporter lowers that to an *additive* -inf mask (Where(mask, 0, -inf) + scores). STYLE forbids additive masks
(fp16 overflow -> NaN after softmax), so while the backbone is traced the LM's attention is swapped for the
same math with the mask applied by Where on the scores:

    q (B,H,S,Dh) ─ *Dh^-0.5 ─ MatMul ─ Where(mask, ·, finfo.min) ─ Softmax ─ MatMul ─ out (B,H,S,Dh)
    k/v (B,Hkv,T,Dh) ─ repeat_kv ─┘─────────────────────────────────────────────┘
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.onnx import symbolic_helper

from ..model import qwen2 as _qwen2
from ..model.layers import repeat_kv


def masked_attention(q, k, v, mask=None):
    """Grouped-query attention, boolean mask (B,1,S,T) applied with Where. q (B,H,S,Dh), k/v (B,Hkv,T,Dh)."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)                            # (B,H,T,Dh)
    scores = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-1, -2)                # (B,H,S,T)
    if mask is not None:
        # a large finite fill (not -inf): an fp16 conversion clips it to -65504, softmax still gives 0
        scores = torch.where(mask, scores, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1) @ v                                   # (B,H,S,Dh)


@symbolic_helper.parse_args("v", "v", "v", "v", "v", "i", "f", "f", "i")
def _batch_norm_eval(g, x, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled):
    """Eval BatchNorm without affine on a tensor whose channel count the tracer lost (the latent BN follows
    the patchify reshape): take the count from running_mean instead of the input, as the stock symbolic does."""
    if training:
        raise RuntimeError("batch_norm is exported in eval mode only")
    c = symbolic_helper._get_tensor_dim_size(running_mean, 0)
    if c is None:
        raise RuntimeError("batch_norm: running_mean has no static size")
    if symbolic_helper._is_none(weight):
        weight = g.op("Constant", value_t=torch.ones(c))
    if symbolic_helper._is_none(bias):
        bias = g.op("Constant", value_t=torch.zeros(c))
    return g.op("BatchNormalization", x, weight, bias, running_mean, running_var, epsilon_f=eps,
                momentum_f=1 - momentum, training_mode_i=0)


@contextlib.contextmanager
def export_patches(opset: int):
    """While tracing: the LM's attention becomes `masked_attention` and aten::batch_norm uses the symbolic
    above. Yields a counter of attention calls so the exporter can check the swap took effect (a refactor
    of qwen2.py must not silently bypass it)."""
    calls = {"n": 0}
    original = _qwen2.attention

    def counted(q, k, v, mask=None):
        calls["n"] += 1
        return masked_attention(q, k, v, mask)

    _qwen2.attention = counted
    torch.onnx.register_custom_op_symbolic("aten::batch_norm", _batch_norm_eval, opset)
    try:
        yield calls
    finally:
        _qwen2.attention = original
        torch.onnx.unregister_custom_op_symbolic("aten::batch_norm", opset)


class _Stage(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model


class VaeEncoderGraph(_Stage):
    def forward(self, pixels):
        return self.m.vae_encode(pixels)


class VisionTokenizerGraph(_Stage):
    def forward(self, latent):
        tokens, embeds = self.m.vision_tokenize(latent)
        return tokens, embeds


class CfmHeadGraph(_Stage):
    def forward(self, hidden, patch_embeds, t):
        return self.m.cfm_head(hidden, patch_embeds, t)


class VaeDecoderGraph(_Stage):
    def forward(self, latent):
        return self.m.vae_decode(latent)


class BackboneGraph(_Stage):
    """forward(inputs_embeds, position_ids, attention_mask, past.0.key, past.0.value, ...) ->
    (hidden_states, logits of the last position, present.0.key, present.0.value, ...): new entries only."""

    def forward(self, inputs_embeds, position_ids, attention_mask, *past):
        n = len(past) // 2
        pkv = [(past[2 * i], past[2 * i + 1]) for i in range(n)]
        hidden, new = self.m.backbone(inputs_embeds, position_ids, attention_mask, pkv)
        logits = self.m.logits(hidden[:, -1])                                   # (B,V)
        return (hidden, logits) + tuple(t for kv in new for t in kv)


WRAPPERS = {"vae_encoder": VaeEncoderGraph, "vision_tokenizer": VisionTokenizerGraph, "backbone": BackboneGraph,
            "cfm_head": CfmHeadGraph, "vae_decoder": VaeDecoderGraph}


def make_wrapper(name: str, model) -> nn.Module:
    return WRAPPERS[name](model).eval()
