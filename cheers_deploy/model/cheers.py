"""The whole Cheers network with the official module tree (`model.*`, `lm_head`), exposing one method per
exported stage: vae_encode, vision_tokenize, backbone, cfm_head, vae_decode."""

from typing import Dict, Optional

import torch
import torch.nn as nn

from ..config import CheersConfig
from .heads import DiTStack, HiGate, TimestepEmbedder, cfm_velocity
from .layers import attention_impls, set_attention
from .qwen2 import Qwen2Model
from .vae import VAE, DecoderProjector
from .vision import UndProjector, VisionTower


class _Inner(nn.Module):
    def __init__(self, cfg: CheersConfig, attn_impl: str = "sdpa", rope_cache: bool = True,
                 fused_gate: bool = False):
        super().__init__()
        t, v = cfg.text_config, cfg.vision_representation_config
        self.vae_model = VAE(cfg.vae_encoder_config, cfg.vae_decoder_config)
        self.vae_decoder_projector = DecoderProjector(cfg.vae_decoder_config)
        self.vision_representation = VisionTower(v)
        self.und_projector = UndProjector(v.hidden_size, t.hidden_size)
        self.language_model = Qwen2Model(t, attn_impl, rope_cache)
        self.time_embed = TimestepEmbedder(t.hidden_size, v.hidden_size)
        # stage 1: text width/heads/kv heads; stage 2: vision width/heads, *text* kv heads (§19.1, §17.5)
        self.gen_projector = DiTStack(t.hidden_size, t.num_attention_heads, t.num_key_value_heads,
                                      cfg.gen_head_depth, 4 * v.hidden_size, attn_impl, rope_cache)
        self.hi_gate = HiGate(v.hidden_size, fused_gate)
        self.hi_projector = DiTStack(v.hidden_size, v.num_attention_heads, t.num_key_value_heads,
                                     cfg.hi_head_depth, cfg.vae_decoder_config.ch, attn_impl, rope_cache)


class CheersModel(nn.Module):
    """Cheers with the official parameter names. Run-time options (constructor keywords, or `set_options`; none of
    them changes the parameters or the state_dict):

    attn_impl   "sdpa" (default): SDPA with K/V repeated per query head (repeat_kv), the official maths;
                "sdpa_gqa": SDPA's native GQA (enable_gqa=True) where the installed torch has it, else "sdpa";
                "masked": explicit softmax(QK^T) with the boolean mask applied by Where on the scores (what ONNX
                export traces for the backbone: no additive -inf mask).
                Applies to every attention module: the Qwen2 LM and both DiT stacks (`set_attention(impl)`;
                a single stack: `model.model.language_model.set_attention(impl)`).
    rope_cache  True (default): RoPE inv_freq built once per (device, dtype) and kept on the LM / DiT modules (a
                plain attribute, not a buffer: never in state_dict or a checkpoint); False: rebuilt on the host at
                every call and copied to the device, as the official code does (a pageable H2D copy per call,
                illegal inside CUDA-graph capture). The values are identical (rounded through the model dtype).
    fused_gate  False (default): the hi gate as plain torch ops; True: the Triton kernel of fused_gate.py when the
                input is on CUDA, gradients are off and Triton imports, the plain ops otherwise (CPU: exactly
                the plain result).
    """

    def __init__(self, cfg: CheersConfig, attn_impl: str = "sdpa", rope_cache: bool = True,
                 fused_gate: bool = False):
        super().__init__()
        cfg.check()
        self.config = cfg
        self.model = _Inner(cfg, attn_impl, rope_cache, fused_gate)
        t = cfg.text_config
        self.lm_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        self.tie_weights()

    # ---- options (see the class docstring)
    def set_options(self, attn_impl: Optional[str] = None, rope_cache: Optional[bool] = None,
                    fused_gate: Optional[bool] = None) -> None:
        """Set the given options (None leaves one as it is)."""
        if attn_impl is not None:
            self.set_attention(attn_impl)
        if rope_cache is not None:
            for mod in self.modules():
                if mod is not self and hasattr(mod, "set_rope_cache"):
                    mod.set_rope_cache(rope_cache)
        if fused_gate is not None:
            self.model.hi_gate.set_fused(fused_gate)

    def set_attention(self, impl: str) -> None:
        """`impl` on every attention module (LM and DiT stacks)."""
        set_attention(self, impl)

    def options(self) -> Dict[str, object]:
        """The current options. attn_impl / rope_cache are one value when every module agrees, else a dict
        {module name: value} (e.g. after `model.model.language_model.set_attention("masked")`)."""
        impls = attention_impls(self)
        caches = {n: s.rope_cache for n, s in self.named_modules() if hasattr(s, "set_rope_cache")}

        def one(d):
            vals = set(d.values())
            return vals.pop() if len(vals) == 1 else d
        return {"attn_impl": one(impls), "rope_cache": one(caches), "fused_gate": self.model.hi_gate.fused}

    def tie_weights(self):
        """lm_head uses the embedding matrix (§17.23); call again after `to_empty`, which unties parameters."""
        self.lm_head.weight = self.model.language_model.embed_tokens.weight

    # ---- stages (each one exported graph) ----
    def vae_encode(self, pixels):
        """pixels (B,3,H,W) in [0,1] -> normalised latent (B,C,h,w)."""
        return self.model.vae_model.encode(pixels.to(self.dtype))

    def vision_tokenize(self, latent):
        """latent x_t (B,C,h,w) -> semantic tokens (B,M,Dt), patch embeddings (B,4M,Dv)."""
        m = self.model
        pixels = m.vae_decoder_projector(latent.to(self.dtype))                 # (B,3,16h,16w)
        embeds = m.vision_representation.embeddings(pixels)                      # (B,4M,Dv)
        feats = m.vision_representation.forward_embeddings(embeds)              # (B,4M,Dv)
        return m.und_projector(feats), embeds

    def backbone(self, inputs_embeds, position_ids, mask=None, past=None, static=None):
        """Qwen2 over embeddings -> (final-normed hidden (B,S,Dt), new KV per layer). past: per layer (k, v) of the
        earlier positions (concatenated with the new ones); static: a qwen2.StaticKV, the caller's preallocated
        cache written in place and attended directly (qwen2.py)."""
        return self.model.language_model(inputs_embeds, position_ids, mask, past, static)

    def logits(self, hidden):
        return hidden @ self.model.language_model.embed_tokens.weight.t()

    def cfm_head(self, hidden, patch_embeds, t):
        """hidden (B,M,Dt), patch_embeds (B,4M,Dv), t (B,) -> velocity (B,C,h,w)."""
        m = self.model
        return cfm_velocity(m.time_embed, m.gen_projector, m.hi_gate, m.hi_projector, hidden, patch_embeds, t)

    def vae_decode(self, latent):
        return self.model.vae_model.decode(latent.to(self.dtype))

    def embed(self, ids):
        return self.model.language_model.embed_tokens(ids)

    @property
    def dtype(self):
        return self.lm_head.weight.dtype
