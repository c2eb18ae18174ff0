"""nn.Module wrappers that expose one CheersModel method as one graph (inputs and outputs in spec order),
and the export-time settings (`export_settings`): the backbone's attention option and eval BatchNorm.

Why a different attention at export: the reference model calls SDPA with a boolean mask, and the TorchScript
exporter lowers that to an *additive* -inf mask (Where(mask, 0, -inf) + scores). STYLE forbids additive masks
(fp16 overflow -> NaN after softmax), so while the backbone is traced the LM runs with its attention option
set to "masked" (model.layers.masked_attention): the same math with the mask applied by Where on the scores:

    q (B,H,S,Dh) ─ *Dh^-0.5 ─ MatMul ─ Where(mask, ·, finfo.min) ─ Softmax ─ MatMul ─ out (B,H,S,Dh)
    k/v (B,Hkv,T,Dh) ─ repeat_kv ─┘─────────────────────────────────────────────┘
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.onnx import symbolic_helper

from ..model.layers import AttentionOption, count_attention_calls, masked_attention  # noqa: F401 (moved there)

EXPORT_ATTENTION = "masked"


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
def export_settings(model, opset: int):
    """While tracing `model` (a CheersModel): its LM's attention option is EXPORT_ATTENTION ("masked"; the DiT
    stacks keep theirs) and aten::batch_norm uses the symbolic above; both are restored on exit. Yields a Counter
    {attention implementation: calls} of the attention calls made meanwhile, so the exporter can check the
    backbone trace really took the masked path (a refactor of qwen2.py must not silently bypass it)."""
    lm = model.model.language_model
    previous = {m: m.attn_impl for m in lm.modules() if isinstance(m, AttentionOption)}
    lm.set_attention(EXPORT_ATTENTION)
    torch.onnx.register_custom_op_symbolic("aten::batch_norm", _batch_norm_eval, opset)
    try:
        with count_attention_calls() as calls:
            yield calls
    finally:
        for m, impl in previous.items():
            m.set_attention(impl)
        torch.onnx.unregister_custom_op_symbolic("aten::batch_norm", opset)


def traced_masked(calls) -> bool:
    """Whether the attention calls counted by `export_settings` were all, and at least one, "masked"."""
    return calls[EXPORT_ATTENTION] > 0 and calls[EXPORT_ATTENTION] == sum(calls.values())


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
