"""KV-cache bookkeeping, batched CFG, the flow-matching schedule, the token/latent reorderings and the text
sampler, each against an independent computation (full recomputation, explicit loops, closed formulas)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cheers_deploy.runtime.masks import prefill_mask  # noqa: E402
from cheers_deploy.runtime.sampling import edit_steps, euler_dts, sample_token, schedule, time_shift  # noqa: E402


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def rel_err(got, ref):
    got = torch.as_tensor(np.asarray(got) if not torch.is_tensor(got) else got).double()
    ref = torch.as_tensor(np.asarray(ref) if not torch.is_tensor(ref) else ref).double()
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def backend():
    from cheers_deploy.runtime.torch_backend import TorchBackend
    from cheers_deploy.testing import random_model, tiny_config

    return TorchBackend(random_model(tiny_config(vocab_size=512), seed=21))


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------- KV cache

def test_kv_cached_decoding_equals_full_recomputation(backend):
    model, d = backend.model, backend.cfg.text_config.hidden_size
    b, s, p = 2, 13, 6
    x = randn(b, s, d, seed=0)
    causal = torch.tril(torch.ones(s, s, dtype=torch.bool))[None, None]
    full, full_kv = model.backbone(x, torch.arange(s)[None].expand(b, s), causal)

    cache = backend.new_cache(b, s + 3)
    outs = [backend.backbone(cache, x[:, :p], 0, prefill_mask(np.zeros(p, bool)), "prefill")[0]]
    for i in range(p, s):                                   # token by token, mask None (all cached keys)
        outs.append(backend.backbone(cache, x[:, i:i + 1], i, None, "decode")[0])
    cached = torch.cat(outs, dim=1)
    assert rel_err(cached, full) < 1e-5
    for layer, (k, v) in enumerate(full_kv):                # the cache holds the rotated keys and the values
        assert rel_err(cache.k[layer][:, :, :s], k) < 1e-5
        assert rel_err(cache.v[layer][:, :, :s], v) < 1e-5


def _image_step_mask(p, m, n_after):
    """Explicit (§12.1/§12.2) mask of [prefix (causal) | image block | text after]: the image tokens see the
    whole prefix and each other; tokens after the image see everything before them."""
    s = p + m + n_after
    mask = np.zeros((s, s), bool)
    for q in range(s):
        for k in range(s):
            if q < p:
                mask[q, k] = k <= q
            elif q < p + m:
                mask[q, k] = k < p + m
            else:
                mask[q, k] = k <= q
    return mask


def test_image_step_with_cache_rewrite_equals_recompute(backend):
    model, d = backend.model, backend.cfg.text_config.hidden_size
    p, m = 7, 4
    prefix, txt = randn(1, p, d, seed=1), randn(1, 2, d, seed=4)
    img_a, img_b = randn(1, m, d, seed=2), randn(1, m, d, seed=3)

    cache = backend.new_cache(1, p + m + 2)
    backend.backbone(cache, prefix, 0, prefill_mask(np.zeros(p, bool)), "prefill")
    h_a = backend.backbone(cache, img_a, p, None, "image_step")[0]           # denoising step 1
    h_b = backend.backbone(cache, img_b, p, None, "image_step")[0]           # step 2 rewrites the same image entries
    h_t = torch.cat([backend.backbone(cache, txt[:, i:i + 1], p + m + i, None, "decode")[0] for i in range(2)], dim=1)

    def recompute(img):
        seq = torch.cat([prefix, img, txt], dim=1)
        s = seq.shape[1]
        mask = torch.from_numpy(_image_step_mask(p, m, 2))[None, None]
        out, kv = model.backbone(seq, torch.arange(s)[None], mask)
        return out, kv

    ref_a, _ = recompute(img_a)
    ref_b, kv_b = recompute(img_b)
    assert rel_err(h_a, ref_a[:, p:p + m]) < 1e-5
    assert rel_err(h_b, ref_b[:, p:p + m]) < 1e-5
    assert rel_err(h_t, ref_b[:, p + m:]) < 1e-5            # later tokens see the *last* image's entries
    for layer, (k, v) in enumerate(kv_b):
        assert rel_err(cache.k[layer][:, :, :p + m + 2], k) < 1e-5
        assert rel_err(cache.v[layer][:, :, :p + m + 2], v) < 1e-5
    # and the image block really is bidirectional: a causal recompute differs
    seq = torch.cat([prefix, img_b], dim=1)
    tril = torch.tril(torch.ones(p + m, p + m, dtype=torch.bool))[None, None]
    causal, _ = model.backbone(seq, torch.arange(p + m)[None], tril)
    assert rel_err(h_b, causal[:, p:]) > 1e-3


def test_batched_cfg_equals_two_single_passes(backend):
    cfg = backend.cfg
    d, dv = cfg.text_config.hidden_size, cfg.vision_representation_config.hidden_size
    p, m = 9, 4
    pre_c, pre_u = randn(1, p, d, seed=5), randn(1, p, d, seed=6)
    tok, pe = randn(1, m, d, seed=7), randn(1, 4 * m, dv, seed=8)
    t = np.float32(0.37)

    cache2 = backend.new_cache(2, p + m)
    backend.backbone(cache2, torch.cat([pre_c, pre_u]), 0, prefill_mask(np.zeros(p, bool)), "prefill")
    hs2 = backend.backbone(cache2, backend.repeat_batch(tok, 2), p, None, "image_step")[0]
    v2 = backend.cfm_head(hs2, backend.repeat_batch(pe, 2), np.full((2,), t, np.float32))
    assert tuple(v2.shape) == (2, cfg.latent_channels, 4, 4)
    for row, pre in enumerate([pre_c, pre_u]):
        cache1 = backend.new_cache(1, p + m)
        backend.backbone(cache1, pre, 0, prefill_mask(np.zeros(p, bool)), "prefill")
        hs1 = backend.backbone(cache1, tok, p, None, "image_step")[0]
        v1 = backend.cfm_head(hs1, pe, np.full((1,), t, np.float32))
        assert rel_err(hs2[row:row + 1], hs1) < 1e-5
        assert rel_err(v2[row:row + 1], v1) < 1e-5
    assert rel_err(v2[0], v2[1]) > 1e-3                     # the two prompts do give different velocities


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_ckpt):
    from cheers_deploy.runtime.pipeline import Pipeline

    return Pipeline.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def one_step_latents(tiny_pipeline):
    """generate() with one Euler step (x = noise + v(noise, t=0)) for several cfg scales, same noise; None = the
    model's default guidance scale."""
    noise = np.random.default_rng(0).standard_normal((128, 4, 4)).astype(np.float32)
    out = {}
    for s in (None, 1.0, 2.0, 3.0, tiny_pipeline.generation.cfg_scale):
        out[s] = tiny_pipeline.generate("a blue square", steps=1, cfg_scale=s, alpha=0.5, noise=noise, seed=0,
                                        max_new_tokens=2)
    return out


def test_cfg_scale_left_out_is_the_models_default(one_step_latents, tiny_pipeline):
    a, b = one_step_latents[None], one_step_latents[tiny_pipeline.generation.cfg_scale]
    np.testing.assert_array_equal(a.latent, b.latent)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.token_ids == b.token_ids
    assert np.abs(one_step_latents[3.0].latent - one_step_latents[1.0].latent).max() > 1e-3   # guidance does something


def test_cfg_combination_is_uncond_plus_scale_times_difference(one_step_latents):
    """x(s) = noise + v_u + s (v_c - v_u) is affine in s; s = 1 (no uncond branch at all: one batch row) must lie on
    the line through s = 2 and s = 3, i.e. the conditional branch is the one scaled up."""
    lat = {s: r.latent.astype(np.float64) for s, r in one_step_latents.items()}
    diff = lat[3.0] - lat[2.0]                              # v_c - v_u
    base = lat[2.0] - 2.0 * diff                            # noise + v_u
    assert rel_err(lat[1.0], base + 1.0 * diff) < 1e-4
    assert np.abs(diff).max() > 1e-3


# ---------------------------------------------------------------------------------------------------- schedule

@pytest.mark.parametrize("steps", [2, 8, 11, 50, 80])
@pytest.mark.parametrize("alpha", [0.5, 0.6, 1.0, 2.0])
def test_schedule_is_the_shift_formula(steps, alpha):
    s = np.linspace(0.0, 1.0, steps)                        # float64, computed independently
    want = alpha * s / (1.0 + (alpha - 1.0) * s)
    ts = schedule(steps, alpha)
    assert ts.dtype == np.float32 and ts.shape == (steps,)
    np.testing.assert_allclose(ts, want, rtol=0, atol=3e-7)
    assert ts[0] == 0.0 and ts[-1] == 1.0
    assert (np.diff(ts) > 0).all()
    dts = euler_dts(ts)
    np.testing.assert_allclose(dts[:-1], np.diff(want), rtol=0, atol=5e-7)
    assert dts[-1] == np.float32(1.0 / steps)               # the last step advances by 1/N at t = 1 (§17.7)
    np.testing.assert_allclose(time_shift(s, alpha), want, rtol=0, atol=3e-7)


def test_schedule_worked_example():
    """§13.3: N = 80, alpha = 0.5."""
    ts = schedule(80, 0.5)
    np.testing.assert_allclose(ts[1:4], [0.006369, 0.012821, 0.019355], atol=1e-6)   # doc: 6 decimals
    assert abs(ts[78] - 0.975) < 5e-4 and ts[79] == 1.0
    # the embedder sees bf16(t) in the official bf16 run
    bf16 = torch.tensor(ts[1:4]).to(torch.bfloat16).float().numpy()
    np.testing.assert_allclose(bf16, [0.0063782, 0.0128174, 0.0194092], atol=1e-6)


@pytest.mark.parametrize("n,want", [(80, 72), (50, 45), (11, 9), (10, 9), (2, 1), (1, 0)])
def test_edit_step_count(n, want):
    assert edit_steps(n) == want


def test_edit_schedule_starts_at_shifted_tenth():
    n = edit_steps(80)
    ts = schedule(n, 0.5, t_start=0.1)
    s = np.linspace(0.1, 1.0, n)
    np.testing.assert_allclose(ts, 0.5 * s / (1 - 0.5 * s), rtol=0, atol=3e-7)
    assert abs(ts[0] - 0.0526316) < 1e-6 and ts[-1] == 1.0
    assert euler_dts(ts)[-1] == np.float32(1.0 / n)


# ---------------------------------------------------------------------------------------------------- reorderings

def test_merge_2x2_index_formula():
    """§6 step 3: U[b, i*(G/2)+j, (2dh+dw)*D + d] = F[b, (2i+dh)*G + (2j+dw), d]."""
    from cheers_deploy.model.vision import merge_2x2

    b, g, d = 2, 6, 5
    f = randn(b, g * g, d, seed=9)
    u = merge_2x2(f)
    want = torch.empty(b, (g // 2) ** 2, 4 * d)
    for bb in range(b):
        for i in range(g // 2):
            for j in range(g // 2):
                for dh in range(2):
                    for dw in range(2):
                        for dd in range(d):
                            src = f[bb, (2 * i + dh) * g + (2 * j + dw), dd]
                            want[bb, i * (g // 2) + j, (2 * dh + dw) * d + dd] = src
    assert torch.equal(u, want)


def test_pixel_shuffle_index_formula_and_round_trip():
    """§9.3: L[b, (2i+pi)*G + (2j+pj), d] = O[b, i*(G/2)+j, (2pi+pj)*D + d]; the inverse of the merge."""
    from cheers_deploy.model.vision import merge_2x2, shuffle_2x2

    b, g, d = 2, 8, 3
    o = randn(b, (g // 2) ** 2, 4 * d, seed=10)
    low = shuffle_2x2(o, g)
    want = torch.empty(b, g * g, d)
    for bb in range(b):
        for i in range(g // 2):
            for j in range(g // 2):
                for pi in range(2):
                    for pj in range(2):
                        for dd in range(d):
                            src = o[bb, i * (g // 2) + j, (2 * pi + pj) * d + dd]
                            want[bb, (2 * i + pi) * g + (2 * j + pj), dd] = src
    assert torch.equal(low, want)
    assert torch.equal(merge_2x2(low), o)
    x = randn(b, g * g, d, seed=11)
    assert torch.equal(shuffle_2x2(merge_2x2(x), g), x)


def test_latent_patchify_index_formula_and_round_trip():
    """§3.1: z[b, 4c + 2pi + pj, i, j] = m[b, c, 2i+pi, 2j+pj] (channel-major, the opposite nesting)."""
    from cheers_deploy.model.vae import patchify, unpatchify

    b, c, h, w = 2, 3, 6, 4
    m = randn(b, c, 2 * h, 2 * w, seed=12)
    z = patchify(m)
    want = torch.empty(b, 4 * c, h, w)
    for bb in range(b):
        for cc in range(c):
            for pi in range(2):
                for pj in range(2):
                    for i in range(h):
                        for j in range(w):
                            want[bb, 4 * cc + 2 * pi + pj, i, j] = m[bb, cc, 2 * i + pi, 2 * j + pj]
    assert torch.equal(z, want)
    assert torch.equal(unpatchify(z), m)


def test_velocity_head_wiring():
    """cfm_velocity with stub stages: stage-1 positions 0..M-1, the shuffle feeds the gate's low input, the ViT
    patch embeddings its high input, stage-2 positions n mod (N/2) (§17.4), V[b,k,i,j] = out[b, i*G+j, k] (§11)."""
    from cheers_deploy.model.heads import cfm_velocity
    from cheers_deploy.model.vision import shuffle_2x2

    b, m, dt, dv, c = 2, 9, 8, 5, 7
    g = 6
    seen = {}
    hidden, pe = randn(b, m, dt, seed=13), randn(b, g * g, dv, seed=14)
    o = randn(b, m, 4 * dv, seed=15)

    def time_embed(t):
        seen["t"] = t
        return torch.full((b, 1, dt), 1.0), torch.full((b, 1, dv), 2.0)

    def gen_projector(x, c1, pos):
        seen["gen"] = (x, c1, pos)
        return o

    def hi_gate(low, high):
        seen["gate"] = (low, high)
        return low + 1

    out = torch.arange(b * g * g * c, dtype=torch.float32).reshape(b, g * g, c)

    def hi_projector(u, c2, pos):
        seen["hi"] = (u, c2, pos)
        return out

    t = torch.tensor([0.25, 0.75])
    v = cfm_velocity(time_embed, gen_projector, hi_gate, hi_projector, hidden, pe, t)
    assert torch.equal(seen["t"], t)
    assert torch.equal(seen["gen"][0], hidden) and torch.equal(seen["gen"][2], torch.arange(m))
    assert float(seen["gen"][1].mean()) == 1.0 and float(seen["hi"][1].mean()) == 2.0
    assert torch.equal(seen["gate"][0], shuffle_2x2(o, g)) and torch.equal(seen["gate"][1], pe)
    assert torch.equal(seen["hi"][0], shuffle_2x2(o, g) + 1)
    assert seen["hi"][2].tolist() == [n % (g * g // 2) for n in range(g * g)]
    assert tuple(v.shape) == (b, c, g, g)
    for bb in range(b):
        for k in range(c):
            for i in range(g):
                for j in range(g):
                    assert v[bb, k, i, j] == out[bb, i * g + j, k]


# ---------------------------------------------------------------------------------------------------- sampler

def test_greedy_first_max_on_ties():
    logits = np.array([0.5, 3.0, -1.0, 3.0, 3.0], np.float32)
    rng = np.random.default_rng(0)
    assert sample_token(logits, 0.0, 1.0, rng) == 1
    assert sample_token(logits, 1e-7, 0.5, rng) == 1              # T <= 1e-6 is greedy whatever top_p
    assert sample_token(np.array([-2.0, -1.0, -1.0], np.float32), 0.0, 1.0, rng) == 1


def test_top_p_keeps_the_documented_set():
    """keep sorted token i iff i = 0 or cum_{i-1} <= p (§13.2). probs 0.5/0.3/0.15/0.05 stored out of order."""
    probs = {7: 0.5, 2: 0.3, 5: 0.15, 0: 0.05}
    logits = np.full(9, -np.inf, np.float32)
    for i, pr in probs.items():
        logits[i] = np.log(pr)
    rng = np.random.default_rng(1)
    n = 4000

    def draw(top_p):
        return np.array([sample_token(logits, 1.0, top_p, rng) for _ in range(n)])

    d = draw(0.7)                                             # cum = 0.5, 0.8, ...: keeps {7, 2}
    assert set(d.tolist()) == {7, 2}
    assert abs((d == 7).mean() - 0.5 / 0.8) < 0.03           # renormalised over the kept set
    d = draw(0.85)                                            # keeps {7, 2, 5}
    assert set(d.tolist()) == {7, 2, 5}
    assert abs((d == 5).mean() - 0.15 / 0.95) < 0.03
    assert set(draw(0.3).tolist()) == {7}                     # the top token is always kept
    assert set(draw(0.999).tolist()) == {7, 2, 5, 0}


def test_temperature_sampling_frequencies_match_softmax():
    logits = np.array([0.0, 1.0, 2.0, -1.0], np.float32)
    for temp in (0.5, 2.0):
        rng = np.random.default_rng(42)
        n = 20000
        counts = np.bincount([sample_token(logits, temp, 1.0, rng) for _ in range(n)], minlength=4) / n
        p = np.exp(logits / temp) / np.exp(logits / temp).sum()
        assert np.abs(counts - p).max() < 0.015, (temp, counts, p)
    rng1, rng2 = np.random.default_rng(7), np.random.default_rng(7)
    assert [sample_token(logits, 1.0, 0.9, rng1) for _ in range(50)] == \
           [sample_token(logits, 1.0, 0.9, rng2) for _ in range(50)]        # seeded
