"""SigLIP2-style vision tower (§5) and the understanding projector with 2x2 token merge (§6)."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.grid = cfg.image_size // cfg.patch_size
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(self.grid * self.grid, cfg.hidden_size)

    def forward(self, pixels):
        """pixels (B,3,H,W) -> (B,N,D), N = (H/p)(W/p) in raster order, + learned positions."""
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))   # (B,D,gh,gw)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)                                         # (B,N,D)
        pos = self.position_embedding.weight
        if (gh, gw) != (self.grid, self.grid):
            # §19.4: interpolate whenever the patch grid differs from the learned table (bicubic, a=-0.75)
            d = pos.shape[-1]
            pos = pos.reshape(1, self.grid, self.grid, d).permute(0, 3, 1, 2)     # (1,D,G,G)
            pos = F.interpolate(pos.float(), size=(gh, gw), mode="bicubic", align_corners=False).to(x.dtype)
            pos = pos.permute(0, 2, 3, 1).reshape(gh * gw, d)                    # (N,D)
        return x + pos


class VisionAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, n, d = x.shape
        # (B,N,D) -> (B,H,N,Dh)
        q, k, v = (p(x).reshape(b, n, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v)                              # non-causal, no mask
        return self.out_proj(a.transpose(1, 2).reshape(b, n, d))


class VisionMLP(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(d, eps=eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(d, eps=eps)
        self.mlp = VisionMLP(d, cfg.intermediate_size)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList([VisionLayer(cfg) for _ in range(cfg.num_hidden_layers)])


class PoolingHead(nn.Module):
    """Attention-pooling head: loaded (its weights are in the checkpoint) but never computed (§5.4)."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_size
        self.probe = nn.Parameter(torch.zeros(1, 1, d))
        self.attention = nn.MultiheadAttention(d, cfg.num_attention_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(d, cfg.intermediate_size)


class VisionTower(nn.Module):
    """`model.vision_representation`."""

    def __init__(self, cfg):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = _Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.head = PoolingHead(cfg)

    def forward_embeddings(self, embeds):
        """embeddings (B,N,D) -> post-LN last hidden state (B,N,D)."""
        x = embeds
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)

    def forward(self, pixels):
        return self.forward_embeddings(self.embeddings(pixels))


def merge_2x2(x):
    """(B,N,D) on a GxG grid -> (B,N/4,4D); block k = 2dh+dw (TL,TR,BL,BR), feature fastest (§6 step 3)."""
    b, n, d = x.shape
    g = math.isqrt(n)
    x = x.reshape(b, g // 2, 2, g // 2, 2, d)                  # (B,i,dh,j,dw,D)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, (g // 2) ** 2, 4 * d)


def shuffle_2x2(x, g: int):
    """(B,(g/2)^2,4D) -> (B,g*g,D): the exact inverse of merge_2x2 (pixel shuffle of §9.3)."""
    b, m, d4 = x.shape
    d = d4 // 4
    x = x.reshape(b, g // 2, g // 2, 2, 2, d)                  # (B,i,j,pi,pj,D)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, g * g, d)


class UndProjector(nn.Module):
    """`model.und_projector`: LN(eps 1e-5) -> 2x2 merge -> Linear -> GELU(erf) -> Linear."""

    def __init__(self, vis_dim: int, text_dim: int, round_input_bf16: bool = False):
        super().__init__()
        self.layernorm = nn.LayerNorm(vis_dim, eps=1e-5)
        self.mlp = nn.Sequential(nn.Linear(4 * vis_dim, 4 * vis_dim), nn.GELU(), nn.Linear(4 * vis_dim, text_dim))
        # The official code rounds the ViT features to bf16 first (§17.19); off by default in float32.
        self.round_input_bf16 = round_input_bf16

    def forward(self, feats):
        if self.round_input_bf16:
            feats = feats.to(torch.bfloat16).to(feats.dtype)
        return self.mlp(merge_2x2(self.layernorm(feats)))
