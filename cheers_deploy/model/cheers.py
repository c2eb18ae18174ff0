"""The whole Cheers network with the official module tree (`model.*`, `lm_head`), exposing one method per
exported stage: vae_encode, vision_tokenize, backbone, cfm_head, vae_decode."""

import torch
import torch.nn as nn

from ..config import CheersConfig
from .heads import DiTStack, HiGate, TimestepEmbedder, cfm_velocity
from .qwen2 import Qwen2Model
from .vae import VAE, DecoderProjector
from .vision import UndProjector, VisionTower


class _Inner(nn.Module):
    def __init__(self, cfg: CheersConfig):
        super().__init__()
        t, v = cfg.text_config, cfg.vision_representation_config
        self.vae_model = VAE(cfg.vae_encoder_config, cfg.vae_decoder_config)
        self.vae_decoder_projector = DecoderProjector(cfg.vae_decoder_config)
        self.vision_representation = VisionTower(v)
        self.und_projector = UndProjector(v.hidden_size, t.hidden_size)
        self.language_model = Qwen2Model(t)
        self.time_embed = TimestepEmbedder(t.hidden_size, v.hidden_size)
        # stage 1: text width/heads/kv heads; stage 2: vision width/heads, *text* kv heads (§19.1, §17.5)
        self.gen_projector = DiTStack(t.hidden_size, t.num_attention_heads, t.num_key_value_heads,
                                      cfg.gen_head_depth, 4 * v.hidden_size)
        self.hi_gate = HiGate(v.hidden_size)
        self.hi_projector = DiTStack(v.hidden_size, v.num_attention_heads, t.num_key_value_heads,
                                     cfg.hi_head_depth, cfg.vae_decoder_config.ch)


class CheersModel(nn.Module):
    def __init__(self, cfg: CheersConfig):
        super().__init__()
        cfg.check()
        self.config = cfg
        self.model = _Inner(cfg)
        t = cfg.text_config
        self.lm_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        self.tie_weights()

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

    def backbone(self, inputs_embeds, position_ids, mask=None, past=None):
        """Qwen2 over embeddings -> (final-normed hidden (B,S,Dt), new KV per layer)."""
        return self.model.language_model(inputs_embeds, position_ids, mask, past)

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
