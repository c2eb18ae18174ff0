"""The Cheers training loss (docs/architecture.md §14.2-§14.3) on a batch from data.py, and the VAE pretraining loss.

    x_t = t*x1 + (1-t)*x0 ─ decoder projector ─ ViT ─ und projector ─┐  (+ dummy blocks)
    ids ─ embed ─────────────────────────────────────────────────────┴─ splice (gather) ─ LLM (§12.1 mask)
        ├ logits ─ CE over supervised positions                                    = L_text
        └ hidden at the image positions ─ cfm_head(·, ViT patch embeds of x_t, t) ─ MSE vs (x1-x0)[t<1] = L_image
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from ..model.vae import patchify
from ..tokenizer import IGNORE_INDEX


def batch_to_device(batch, device) -> Dict[str, torch.Tensor]:
    """numpy Batch -> dict of tensors on `device` (pinned, non-blocking copies on CUDA)."""
    out = {}
    cuda = torch.device(device).type == "cuda"
    for name, a in vars(batch).items():
        t = torch.from_numpy(a)
        if cuda:
            t = t.pin_memory().to(device, non_blocking=True)
        out[name] = t
    return out


def cheers_loss(model, b: Dict[str, torch.Tensor], latents: torch.Tensor, dummy_latents: torch.Tensor,
                image_weight: float = 1.0) -> Dict[str, torch.Tensor]:
    """Total = L_text + image_weight * L_image. `latents` (N,C,h,w): normalised training latents (x1 by
    pool index); `dummy_latents` (K,C,h,w): latents of the random dummy images (t = 1, context only)."""
    B, S = b["gather"].shape
    M = b["image_pos"].shape[1]
    x1 = latents[b["latent_idx"]]                                           # (B,C,h,w)
    x0 = b["noise"].to(x1.dtype)
    t = b["t"].to(x1.dtype)
    tt = t[:, None, None, None]
    xt = tt * x1 + (1 - tt) * x0
    target = (x1 - x0) * (tt < 1).to(x1.dtype)                               # zero target at t = 1 (§14.2)
    lat = torch.cat([xt, dummy_latents[b["dummy_idx"]]]) if b["dummy_idx"].numel() else xt
    tokens, patch_embeds = model.vision_tokenize(lat)                       # (B+Bd,M,Dt), (B+Bd,4M,Dv)
    emb = model.embed(b["text_ids"])                                        # (B,L,Dt)
    d = emb.shape[-1]
    tokens = tokens.to(emb.dtype)
    table = torch.cat([emb.reshape(-1, d), tokens.reshape(-1, d), emb.new_zeros(1, d)])
    x = table[b["gather"]]                                                  # (B,S,Dt) spliced + padded
    pos = torch.arange(S, device=x.device)[None].expand(B, S)
    hidden, _ = model.backbone(x, pos, b["mask"])                           # (B,S,Dt) final-normed
    logits = model.logits(hidden)                                           # (B,S,V)
    text = F.cross_entropy(logits.float().reshape(B * S, -1), b["targets"].reshape(-1), ignore_index=IGNORE_INDEX)
    h_img = torch.gather(hidden, 1, b["image_pos"][..., None].expand(B, M, hidden.shape[-1]))  # (B,M,Dt)
    v = model.cfm_head(h_img, patch_embeds[:B], t)                          # (B,C,h,w)
    image = F.mse_loss(v.float(), target.float())
    loss = text + image_weight * image
    with torch.no_grad():
        gen = b["is_gen"]
        per = (v.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
        image_gen = per[gen].mean() if gen.any() else per.new_zeros(())
    return {"loss": loss, "text": text.detach(), "image": image.detach(), "image_gen": image_gen}


def vae_moments_mean(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Encoder mean (B,z,H/f,W/f) -- the deterministic latent (§2.2: no sampling)."""
    return vae.encoder(pixels)[:, : vae.z_channels]


def vae_loss(vae, pixels: torch.Tensor, fg_weight: float = 10.0, latent_l2: float = 1e-4) -> Dict[str, torch.Tensor]:
    """Reconstruction pretraining of `model.vae_model` (encoder + decoder, no BN): L1 + L2 on pixels in [0,1],
    with pixels that differ from the image's background (its per-channel median) weighted up to 1 + fg_weight.
    Objects cover ~3 % of a shapes-world image; unweighted, the autoencoder first settles on "background plus a
    blob of the average colour" and only slowly learns colours and shapes. A tiny latent L2 bounds the scale
    (the BN normaliser removes it anyway)."""
    m = vae_moments_mean(vae, pixels)
    rec = vae.decoder(m).float()
    bg = pixels.flatten(2).median(dim=2).values[..., None, None]                   # (B,3,1,1)
    w = 1 + fg_weight * ((pixels - bg).abs().sum(1, keepdim=True) / 0.3).clamp(0, 1)  # (B,1,H,W)
    err = rec - pixels
    wn = w / w.mean()
    loss = (wn * err.abs()).mean() + (wn * err.pow(2)).mean() + latent_l2 * m.float().pow(2).mean()
    return {"loss": loss, "l1": err.abs().mean().detach(), "l2": err.pow(2).mean().detach()}


@torch.no_grad()
def raw_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Patchified, un-normalised latents (B,4z,h,w) (§3.1 steps 2-3)."""
    return patchify(vae_moments_mean(vae, pixels).float())
