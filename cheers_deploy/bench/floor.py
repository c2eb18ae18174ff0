"""Analytic floor of one text-to-image Euler step (and of one image) from a CheersConfig: the matrix FLOPs
and the bytes that must move, turned into seconds with a device's measured matmul throughput and copy
bandwidth. No torch: the numbers come from the layer shapes of docs/architecture.md §2-§11 / §19.

Counting rules (kept simple so that they can be checked by hand):
* FLOPs: a multiply-add is 2 FLOPs; only matrix work is counted (Linear/Conv GEMMs, QK^T and PV of every
  attention). Norms, activations, RoPE, residual adds are bandwidth work and live in the byte count.
* Bytes: every weight the step touches is read once (bf16 = 2 bytes), the LLM KV cache is read once and the new
  image entries written once, and the tensors that cross a stage boundary are written once and read once.
  Layer intermediates (e.g. the 512x512x128 feature maps of the decoder projector) are left out, so the byte
  count is a lower bound; `decoder_feature_map_bytes` reports their unfused traffic for reference.
* Batches: one Euler step runs the vision path (decoder projector, ViT, und projector) once on the latent
  (`vision_batch` = 1; the official loop runs it per CFG branch, i.e. 2) and the LLM and heads on both CFG
  branches (`cfg_batch` = 2).
* The floor of a workload is max(FLOPs / matmul throughput, bytes / copy bandwidth): a roofline with perfect
  overlap, so no implementation can beat it on that device.
"""

from __future__ import annotations

import time
from typing import Dict

from ..config import CheersConfig

# ------------------------------------------------------------------------------------------ primitives


def conv_flops(cin: int, cout: int, k: int, h_out: int, w_out: int) -> int:
    return 2 * cin * cout * k * k * h_out * w_out


def conv_params(cin: int, cout: int, k: int, bias: bool = True) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def linear_params(din: int, dout: int, bias: bool = True) -> int:
    return din * dout + (dout if bias else 0)


def attention_flops(n_q: int, n_k: int, heads: int, head_dim: int) -> int:
    """QK^T and PV: 2 * n_q * n_k * head_dim each, per head."""
    return 4 * n_q * n_k * heads * head_dim


def _grid(cfg: CheersConfig, resolution: int):
    """resolution -> (latent grid g (= ViT patch grid), N = g*g ViT tokens, M = N/4 LLM tokens, VAE z grid)."""
    v = cfg.vision_representation_config
    if resolution % v.patch_size or (resolution // v.patch_size) % 2:
        raise ValueError(f"resolution {resolution} must be a multiple of 2*patch_size ({2 * v.patch_size})")
    g = resolution // v.patch_size
    return g, g * g, (g // 2) ** 2, resolution // cfg.vae_downsample


# ------------------------------------------------------------------------------------------ VAE (§2, §19.2)


def _resblock(cin: int, cout: int, s: int):
    """ResnetBlock at spatial s x s -> (flops, params, output-map elements of its convs)."""
    f = conv_flops(cin, cout, 3, s, s) + conv_flops(cout, cout, 3, s, s)
    p = 2 * cin + conv_params(cin, cout, 3) + 2 * cout + conv_params(cout, cout, 3)   # GN affine + convs
    maps = 2 * cout * s * s
    if cin != cout:
        f += conv_flops(cin, cout, 1, s, s)
        p += conv_params(cin, cout, 1)
        maps += cout * s * s
    return f, p, maps


def _mid(c: int, s: int):
    f1, p1, m1 = _resblock(c, c, s)
    n = s * s
    fa = 4 * conv_flops(c, c, 1, s, s) + attention_flops(n, n, 1, c)               # q,k,v,proj_out + one head
    pa = 2 * c + 4 * conv_params(c, c, 1)
    return 2 * f1 + fa, 2 * p1 + pa, 2 * m1 + 4 * c * n


def decoder_cost(dec, z_hw: int) -> Dict[str, int]:
    """VAE decoder (also the decoder projector) on a z_channels x z_hw x z_hw latent -> flops, params, maps."""
    ch, mult, nres, z = dec.ch, list(dec.ch_mult), dec.num_res_blocks, dec.z_channels
    c = ch * mult[-1]
    s = z_hw
    flops = conv_flops(z, z, 1, s, s) + conv_flops(z, c, 3, s, s)
    params = conv_params(z, z, 1) + conv_params(z, c, 3)
    maps = z * s * s + c * s * s
    f, p, m = _mid(c, s)
    flops, params, maps = flops + f, params + p, maps + m
    for i in reversed(range(len(mult))):
        cout = ch * mult[i]
        for j in range(nres + 1):
            f, p, m = _resblock(c if j == 0 else cout, cout, s)
            flops, params, maps = flops + f, params + p, maps + m
        c = cout
        if i != 0:
            s *= 2
            flops += conv_flops(c, c, 3, s, s)
            params += conv_params(c, c, 3)
            maps += c * s * s
    flops += conv_flops(c, dec.out_ch, 3, s, s)
    params += 2 * c + conv_params(c, dec.out_ch, 3)
    maps += dec.out_ch * s * s
    return {"flops": flops, "params": params, "feature_map_elems": maps, "out_hw": s}


def encoder_cost(enc, resolution: int) -> Dict[str, int]:
    """VAE encoder on a 3 x R x R image (the dummy image of the prefill, §13.1)."""
    ch, mult, nres, z = enc.ch, list(enc.ch_mult), enc.num_res_blocks, enc.z_channels
    s = resolution
    flops = conv_flops(enc.in_channels, ch, 3, s, s)
    params = conv_params(enc.in_channels, ch, 3)
    in_mult = [1] + mult
    c = ch
    for i in range(len(mult)):
        cin, cout = ch * in_mult[i], ch * mult[i]
        for j in range(nres):
            f, p, _ = _resblock(cin if j == 0 else cout, cout, s)
            flops, params = flops + f, params + p
        c = cout
        if i != len(mult) - 1:
            s //= 2
            flops += conv_flops(c, c, 3, s, s)
            params += conv_params(c, c, 3)
    f, p, _ = _mid(c, s)
    flops += f + conv_flops(c, 2 * z, 3, s, s) + conv_flops(2 * z, 2 * z, 1, s, s)
    params += p + 2 * c + conv_params(c, 2 * z, 3) + conv_params(2 * z, 2 * z, 1)
    return {"flops": flops, "params": params}


# ------------------------------------------------------------------------------------------ transformers


def vit_cost(v, n_tokens: int) -> Dict[str, int]:
    """SigLIP tower on N tokens: patch embedding + L layers (QKV/O, MLP, attention) + post-LN (§5).
    The attention-pooling head is never computed (§5.4) and is excluded."""
    d, i, p = v.hidden_size, v.intermediate_size, v.patch_size
    embed = conv_flops(v.num_channels, d, p, 1, n_tokens)         # one p x p patch per output position
    per_layer = 2 * n_tokens * (4 * d * d + 2 * d * i) + attention_flops(n_tokens, n_tokens, v.num_attention_heads,
                                                                          v.head_dim)
    layer_params = 4 * linear_params(d, d) + 4 * d + linear_params(d, i) + linear_params(i, d)
    embed_params = conv_params(v.num_channels, d, p) + v.num_positions * d
    return {"embed_flops": embed, "layers_flops": v.num_hidden_layers * per_layer,
            "flops": embed + v.num_hidden_layers * per_layer, "layer_flops": per_layer,
            "params": embed_params + v.num_hidden_layers * layer_params + 2 * d,
            "layer_params": layer_params, "embed_params": embed_params}


def und_cost(cfg: CheersConfig, m_tokens: int) -> Dict[str, int]:
    dv, dt = cfg.vision_representation_config.hidden_size, cfg.text_config.hidden_size
    return {"flops": 2 * m_tokens * (4 * dv * 4 * dv + 4 * dv * dt),
            "params": 2 * dv + linear_params(4 * dv, 4 * dv) + linear_params(4 * dv, dt)}


def llm_cost(t, n_new: int, n_keys: int, causal: bool = False) -> Dict[str, int]:
    """Qwen2 layers over n_new tokens attending to n_keys keys (prefix + new). `causal` halves the attention
    products of a prefill (n_new == n_keys)."""
    d, kvd = t.hidden_size, t.num_key_value_heads * t.head_dim
    gemm = 2 * n_new * (2 * d * d + 2 * d * kvd + 3 * d * t.intermediate_size)
    attn = attention_flops(n_new, n_keys, t.num_attention_heads, t.head_dim)
    if causal:
        attn //= 2
    layer_params = (linear_params(d, d) + 2 * linear_params(d, kvd) + linear_params(d, d, bias=False)
                    + 2 * d + 3 * d * t.intermediate_size)
    return {"flops": t.num_hidden_layers * (gemm + attn), "attn_flops": t.num_hidden_layers * attn,
            "params": t.num_hidden_layers * layer_params + d, "layer_params": layer_params,
            "embed_params": t.vocab_size * d}


def dit_cost(d: int, heads: int, kv_heads: int, depth: int, out: int, n_tokens: int) -> Dict[str, int]:
    """AdaLN-Zero DiT stack (§9, §11) on n_tokens, per batch element; AdaLN GEMMs are per sample (1 row)."""
    hd = d // heads
    kvd = kv_heads * hd
    block = (2 * n_tokens * (2 * d * d + 2 * d * kvd + 3 * d * 4 * d) + attention_flops(n_tokens, n_tokens, heads, hd)
             + 2 * d * 6 * d)
    final = 2 * d * 2 * d + 2 * n_tokens * d * out
    block_params = 2 * d * d + 2 * d * kvd + 12 * d * d + 2 * d + linear_params(d, 6 * d)
    final_params = d + linear_params(d, 2 * d) + linear_params(d, out)
    return {"flops": depth * block + final, "params": depth * block_params + final_params,
            "block_params": block_params, "final_params": final_params}


def time_embed_cost(cfg: CheersConfig, freq_dim: int = 256) -> Dict[str, int]:
    d1, d2 = cfg.text_config.hidden_size, cfg.vision_representation_config.hidden_size
    return {"flops": 2 * (freq_dim * d1 + d1 * d1 + freq_dim * d2 + d2 * d2),
            "params": linear_params(freq_dim, d1) + linear_params(d1, d1) + linear_params(freq_dim, d2)
            + linear_params(d2, d2)}


def hi_gate_cost(dv: int, n_tokens: int) -> Dict[str, int]:
    return {"flops": 2 * n_tokens * (dv * dv + dv), "params": linear_params(dv, dv) + linear_params(dv, 1) + 2 * dv}


def _heads(cfg: CheersConfig, m: int, n: int):
    t, v = cfg.text_config, cfg.vision_representation_config
    s1 = dit_cost(t.hidden_size, t.num_attention_heads, t.num_key_value_heads, cfg.gen_head_depth,
                  4 * v.hidden_size, m)
    s2 = dit_cost(v.hidden_size, v.num_attention_heads, t.num_key_value_heads, cfg.hi_head_depth,
                  cfg.vae_decoder_config.ch, n)
    return s1, hi_gate_cost(v.hidden_size, n), s2


# ------------------------------------------------------------------------------------------ per step


def component_params(cfg: CheersConfig) -> Dict[str, int]:
    """Analytic parameter counts per module (docs/architecture.md §16.6 layout)."""
    v, t = cfg.vision_representation_config, cfg.text_config
    g = v.image_size // v.patch_size
    s1, gate, s2 = _heads(cfg, (g // 2) ** 2, g * g)
    vit = vit_cost(v, g * g)
    pool = 1 * v.hidden_size + 3 * v.hidden_size * v.hidden_size + 3 * v.hidden_size \
        + linear_params(v.hidden_size, v.hidden_size) + 2 * v.hidden_size \
        + linear_params(v.hidden_size, v.intermediate_size) + linear_params(v.intermediate_size, v.hidden_size)
    dec = decoder_cost(cfg.vae_decoder_config, 1)["params"]
    llm = llm_cost(t, 1, 1)
    return {
        "vae_encoder": encoder_cost(cfg.vae_encoder_config, 2 ** len(cfg.vae_encoder_config.ch_mult))["params"],
        "vae_decoder": dec,
        "decoder_projector": dec,
        "vision_tower": vit["params"],
        "vision_pooling_head": pool,
        "und_projector": und_cost(cfg, 1)["params"],
        "language_model": llm["embed_params"] + llm["params"],
        "time_embed": time_embed_cost(cfg)["params"],
        "gen_projector": s1["params"],
        "hi_gate": gate["params"],
        "hi_projector": s2["params"],
    }


def step_flops(cfg: CheersConfig, resolution: int, prefix_len: int, cfg_batch: int = 2,
               vision_batch: int = 1) -> Dict[str, int]:
    """Matrix FLOPs of one Euler step: vision path x vision_batch, LLM image step and heads x cfg_batch."""
    g, n, m, z_hw = _grid(cfg, resolution)
    v, t = cfg.vision_representation_config, cfg.text_config
    s1, gate, s2 = _heads(cfg, m, n)
    out = {
        "decoder_projector": vision_batch * decoder_cost(cfg.vae_decoder_config, z_hw)["flops"],
        "vit": vision_batch * vit_cost(v, n)["flops"],
        "und_projector": vision_batch * und_cost(cfg, m)["flops"],
        "llm": cfg_batch * llm_cost(t, m, prefix_len + m)["flops"],
        "time_embed": cfg_batch * time_embed_cost(cfg)["flops"],
        "gen_projector": cfg_batch * s1["flops"],
        "hi_gate": cfg_batch * gate["flops"],
        "hi_projector": cfg_batch * s2["flops"],
    }
    out["total"] = sum(out.values())
    return out


def step_weight_params(cfg: CheersConfig) -> Dict[str, int]:
    """Parameters read by one Euler step (no VAE encoder/final decoder, no embeddings, no pooling head)."""
    v, t = cfg.vision_representation_config, cfg.text_config
    g = v.image_size // v.patch_size
    s1, gate, s2 = _heads(cfg, (g // 2) ** 2, g * g)
    return {
        "decoder_projector": decoder_cost(cfg.vae_decoder_config, 1)["params"] + 2 * cfg.latent_channels,
        "vit": vit_cost(v, g * g)["params"],
        "und_projector": und_cost(cfg, 1)["params"],
        "llm": llm_cost(t, 1, 1)["params"],
        "time_embed": time_embed_cost(cfg)["params"],
        "gen_projector": s1["params"],
        "hi_gate": gate["params"],
        "hi_projector": s2["params"],
    }


def step_bytes(cfg: CheersConfig, resolution: int, prefix_len: int, cfg_batch: int = 2, vision_batch: int = 1,
               weight_bytes: int = 2, act_bytes: int = 2) -> Dict[str, int]:
    """Bytes one Euler step must move (lower bound): weights once, KV cache, stage-boundary activations."""
    g, n, m, z_hw = _grid(cfg, resolution)
    v, t = cfg.vision_representation_config, cfg.text_config
    c = cfg.latent_channels
    weights = sum(step_weight_params(cfg).values()) * weight_bytes
    kv_row = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * act_bytes   # K and V, all layers
    kv = cfg_batch * kv_row * ((prefix_len + m) + m)          # read prefix + new, write new
    dv, dt = v.hidden_size, t.hidden_size
    # (elements, batch) of each stage-boundary tensor; each is written once and read once
    boundary = [
        (c * g * g, vision_batch),                 # latent x -> decoder projector
        (3 * resolution * resolution, vision_batch),   # decoded image -> ViT patch embedding
        (n * dv, vision_batch),                    # patch embeddings -> ViT layers (and the hi gate)
        (n * dv, vision_batch),                    # ViT post-LN features -> und projector
        (m * dt, vision_batch),                    # semantic tokens -> LLM
        (m * dt, cfg_batch),                       # LLM hidden -> stage 1
        (m * 4 * dv, cfg_batch),                   # stage-1 output -> pixel shuffle / gate
        (n * dv, cfg_batch),                       # gate output -> stage 2
        (c * g * g, cfg_batch),                    # velocity -> CFG combine / Euler update
    ]
    acts = sum(2 * e * b for e, b in boundary) * act_bytes
    fmap = decoder_cost(cfg.vae_decoder_config, z_hw)["feature_map_elems"]
    return {"weights": weights, "kv_cache": kv, "activations": acts, "total": weights + kv + acts,
            "decoder_feature_map_bytes": 2 * fmap * act_bytes * vision_batch}


def image_flops(cfg: CheersConfig, resolution: int, prefix_len: int, steps: int, cfg_batch: int = 2,
                vision_batch: int = 1) -> Dict[str, int]:
    """One image: the prefill (dummy image: VAE encode + vision path; LLM over the prefix, causal, cfg_batch
    rows), `steps` Euler steps, and the final VAE decode of the latent (the second decoder, §3.2)."""
    g, n, m, z_hw = _grid(cfg, resolution)
    v, t = cfg.vision_representation_config, cfg.text_config
    prefill = (vision_batch * (encoder_cost(cfg.vae_encoder_config, resolution)["flops"]
                               + decoder_cost(cfg.vae_decoder_config, z_hw)["flops"] + vit_cost(v, n)["flops"]
                               + und_cost(cfg, m)["flops"])
               + cfg_batch * llm_cost(t, prefix_len, prefix_len, causal=True)["flops"])
    step = step_flops(cfg, resolution, prefix_len, cfg_batch, vision_batch)["total"]
    final = decoder_cost(cfg.vae_decoder_config, z_hw)["flops"]
    return {"prefill": prefill, "steps": steps * step, "final_vae_decode": final,
            "total": prefill + steps * step + final}


def image_bytes(cfg: CheersConfig, resolution: int, prefix_len: int, steps: int, cfg_batch: int = 2,
                vision_batch: int = 1, weight_bytes: int = 2, act_bytes: int = 2) -> Dict[str, int]:
    """Bytes of one image (lower bound): per-step bytes x steps, the prefill weights (VAE encoder, decoder
    projector, ViT, und projector, LLM) and KV written once, the final decoder weights once."""
    t = cfg.text_config
    p = component_params(cfg)
    step = step_bytes(cfg, resolution, prefix_len, cfg_batch, vision_batch, weight_bytes, act_bytes)["total"]
    kv_row = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * act_bytes
    prefill = ((p["vae_encoder"] + p["decoder_projector"] + p["vision_tower"] + p["und_projector"]
                + llm_cost(t, 1, 1)["params"]) * weight_bytes + cfg_batch * kv_row * prefix_len)
    final = p["vae_decoder"] * weight_bytes
    return {"prefill": prefill, "steps": steps * step, "final_vae_decode": final,
            "total": prefill + steps * step + final}


# ------------------------------------------------------------------------------------------ seconds


def roofline(flops: float, bytes_: float, matmul_tflops: float, copy_gbps: float) -> Dict[str, float]:
    """compute_s = flops / throughput, memory_s = bytes / bandwidth, floor_s = the larger of the two."""
    compute = flops / (matmul_tflops * 1e12)
    memory = bytes_ / (copy_gbps * 1e9)
    return {"compute_s": compute, "memory_s": memory, "floor_s": max(compute, memory),
            "bound": "compute" if compute >= memory else "memory"}


def floor_seconds(flops: float, bytes_: float, matmul_tflops: float, copy_gbps: float) -> float:
    """The roofline floor in seconds: max(flops / matmul throughput, bytes / copy bandwidth)."""
    return roofline(flops, bytes_, matmul_tflops, copy_gbps)["floor_s"]


def step_floor(cfg: CheersConfig, resolution: int, prefix_len: int, steps: int, matmul_tflops: float,
               copy_gbps: float, cfg_batch: int = 2) -> Dict[str, object]:
    """Everything the benchmark reports about the floor, for one step and for one image."""
    sf = step_flops(cfg, resolution, prefix_len, cfg_batch)
    sb = step_bytes(cfg, resolution, prefix_len, cfg_batch)
    imf = image_flops(cfg, resolution, prefix_len, steps, cfg_batch)
    imb = image_bytes(cfg, resolution, prefix_len, steps, cfg_batch)
    step = roofline(sf["total"], sb["total"], matmul_tflops, copy_gbps)
    parts = {k: roofline(imf[k], imb[k], matmul_tflops, copy_gbps)["floor_s"]
             for k in ("prefill", "final_vae_decode")}
    # the image floor adds per-phase floors (the phases are sequential)
    image_s = parts["prefill"] + steps * step["floor_s"] + parts["final_vae_decode"]
    return {"step_flops": sf, "step_bytes": sb, "step": step, "image_flops": imf, "image_bytes": imb,
            "image_parts_s": parts, "image_floor_s": image_s,
            "naive_algorithm_step_flops": step_flops(cfg, resolution, prefix_len, cfg_batch, vision_batch=cfg_batch)}


def measure_device(torch, device, dtype) -> Dict[str, float]:
    """Best-of-5 square GEMM throughput in the run's dtype and device-to-device copy bandwidth (read + write)."""
    cuda = device.type == "cuda"
    n, nbytes = (8192, 1 << 30) if cuda else (1024, 64 << 20)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def best(fn):
        ts = []
        for _ in range(6):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return min(ts[1:])
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    tflops = 2.0 * n ** 3 / best(lambda: torch.matmul(a, b)) / 1e12
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    gbps = 2 * nbytes / best(lambda: dst.copy_(src)) / 1e9
    return {"matmul_n": n, "matmul_tflops": tflops, "copy_bytes": nbytes, "copy_gbps": gbps,
            "note": "host-timed after a sync, best of 5; copy bandwidth counts bytes read plus bytes written"}
