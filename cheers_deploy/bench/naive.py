"""The official text-to-image loop, compactly (§13.1, §13.3 of docs/architecture.md): the baseline row of the GPU
benchmark (gpu_step.py). Everything the product's fast path removes is kept on purpose."""

from __future__ import annotations

import numpy as np


def naive_generate(model, proc, prompt: str, noise: np.ndarray, steps: int, cfg_scale: float, alpha: float, seed: int,
                   clock):
    """The official text-to-image loop (§13.1, §13.3), compactly: each CFG branch is prefilled and stepped on its
    own (the vision tower runs per branch), logits of every prefill position, the KV cache appended with torch.cat
    and cropped back to the prompt, host RoPE tables, SDPA with repeat_kv. `clock.on_step` is called after every
    Euler step (a PipelineObserver). Returns (latent, pixels)."""
    import torch
    from ..runtime.masks import prefill_mask
    from ..runtime.scheduler import FlowMatchEulerScheduler

    model.set_options(attn_impl="sdpa", rope_cache=False, fused_gate=False)
    dev, dtype = model.lm_head.weight.device, model.dtype
    ids = proc.t2i_ids(prompt)
    pix = torch.from_numpy(proc.dummy_pixel_values(seed)[None]).to(dev)
    pasts = []
    for branch in (ids, proc.uncond_ids(ids)):                      # cond, uncond
        tok, _ = model.vision_tokenize(model.vae_encode(pix))
        emb = torch.cat([tok, model.embed(torch.tensor([branch], device=dev))], dim=1)     # (1,S,D)
        s = emb.shape[1]
        mask = torch.from_numpy(prefill_mask(np.zeros(s, bool))).to(dev)[None, None]
        hidden, kv = model.backbone(emb, torch.arange(s, device=dev)[None], mask)
        model.logits(hidden)
        pasts.append(kv)
    sched = FlowMatchEulerScheduler(alpha).set_timesteps(steps)
    x = torch.from_numpy(np.asarray(noise, np.float32)[None]).to(dev, dtype)
    for i, t in enumerate(sched.timesteps):
        v = []
        for b in range(2):
            tok, pe = model.vision_tokenize(x)
            hidden, new = model.backbone(tok, torch.arange(s, s + tok.shape[1], device=dev)[None], None, pasts[b])
            pasts[b] = [(torch.cat([pk, k], 2)[:, :, :s], torch.cat([pv, vv], 2)[:, :, :s])    # append, crop
                        for (pk, pv), (k, vv) in zip(pasts[b], new)]
            v.append(model.cfm_head(hidden, pe, torch.full((1,), float(t), device=dev)))
        x = sched.step(v[1] + (v[0] - v[1]) * float(cfg_scale), i, x)
        clock.on_step(i + 1, steps, float(t), x)
    return x.float().cpu().numpy()[0], model.vae_decode(x).float().cpu().numpy()
