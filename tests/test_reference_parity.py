"""Parity with the OFFICIAL Cheers implementation on the official-tiny reference set
(tests/data/official-tiny: checkpoint rebuilt from its recipe, arrays in reference.npz).

End to end: greedy ids of i2t / t2t / t2i identical, the t2i latent and image within the README bounds, and
the internals the pipeline passes around (prefill masks and embeddings, step-0 logits, prompt KV cache, the
per-step x_t, t and velocities). Component level: every stage fed the *recorded* input of that stage.

Tolerances come from the README columns (reference.json `entries[*]`): `noise` = the official run against
itself with another thread count, `no_bf16` = the official run with its two bf16 roundings removed, i.e. what
a clean float32 implementation (ours) lands at. End-to-end entries: 2 x (noise + no_bf16) (the README's own
bounds where it gives one); components fed recorded inputs: the noise column, at least 2e-4.
"""
import json
from contextlib import contextmanager

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cheers_deploy.runtime.observer import PipelineObserver  # noqa: E402
from cheers_deploy.runtime.masks import prefill_mask  # noqa: E402
from cheers_deploy.runtime.sampling import euler_dts, schedule  # noqa: E402
from cheers_deploy.tokenizer import IMAGE_PLACEHOLDER  # noqa: E402

I2T_QUESTION = " Which shapes and colours do you see?"
T2T_PROMPT = "Describe a blue square in one sentence."
T2I_PROMPT = "A green triangle next to a blue square."
STEPS, CFG, ALPHA = 8, 3.0, 0.6
TOKENS_PER_IMAGE = 16                       # 128x128 image: 8x8 ViT patches merged 2x2


# ---------------------------------------------------------------------------------------------------- helpers

@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def columns(reference_dir):
    """entry -> (noise, no_bf16) max-abs columns of the README."""
    entries = json.loads((reference_dir / "reference.json").read_text())["entries"]
    return {k: (float(v.get("noise_floor_maxabs") or 0.0), float(v.get("fp32_without_bf16_casts_maxabs") or 0.0))
            for k, v in entries.items()}


def end_to_end_tol(columns, key, floor=1e-4):
    noise, no_bf16 = columns[key]
    return max(floor, 2.0 * (noise + no_bf16))


def component_tol(columns, key, floor=2e-4):
    return max(floor, columns[key][0])


def assert_close(got, ref, atol, what):
    got = np.asarray(got, np.float64).reshape(np.shape(ref))
    diff = np.abs(got - np.asarray(ref, np.float64))
    assert diff.max() <= atol, f"{what}: max abs diff {diff.max():.3g} > {atol:.3g} (mean {diff.mean():.3g})"


def T(reference, key):
    return torch.from_numpy(np.ascontiguousarray(reference[key]))


class _SampledLogits(PipelineObserver):
    """The logits row every sampled token was drawn from (batch element 0), through the pipeline's observer."""

    def __init__(self, rec):
        self.rec = rec

    def on_token(self, index, token_id, logits):
        self.rec["logits"].append(np.array(logits, np.float32))


@contextmanager
def recording(backend):
    """Record what the pipeline passes to the backend stages (instance attributes shadow the methods) and, through
    an observer, the logits each token was sampled from."""
    rec = {"backbone": [], "logits": [], "cfm_head": [], "vision_tokenize": [], "cache": []}
    rec["observer"] = _SampledLogits(rec)
    tn = backend.to_numpy

    def wrap(name, keep):
        orig = getattr(backend, name)

        def f(*args):
            out = orig(*args)
            rec[name].append(keep(args, out))
            return out
        setattr(backend, name, f)

    wrap("backbone", lambda a, o: {"start": a[2], "mask": None if a[3] is None else np.array(a[3]), "mode": a[4],
                                   "embeds": tn(a[1]), "hidden": tn(o[0]),
                                   "logits": None if o[1] is None else np.array(o[1], np.float32)})
    wrap("cfm_head", lambda a, o: {"t": np.array(a[2]), "v": tn(o)})
    wrap("vision_tokenize", lambda a, o: tn(a[0]))
    orig_new_cache = backend.new_cache

    def new_cache(*args):
        c = orig_new_cache(*args)
        rec["cache"].append(c)
        return c
    backend.new_cache = new_cache
    try:
        yield rec
    finally:
        for name in ("backbone", "cfm_head", "vision_tokenize", "new_cache"):
            backend.__dict__.pop(name, None)


@pytest.fixture(scope="module")
def runs(ref_pipeline, reference):
    """The three official runs through the public API, once, with the stage inputs/outputs recorded."""
    R, be, out = reference, ref_pipeline.backend, {}
    def keep(rec):
        return {k: list(v) for k, v in rec.items() if k != "observer"}

    with recording(be) as rec:
        res = ref_pipeline.answer(R["inputs/test_image_uint8"], I2T_QUESTION, max_new_tokens=16,
                                  observer=rec["observer"])
        out["i2t"] = (res, keep(rec))
    with recording(be) as rec:
        res = ref_pipeline.chat(T2T_PROMPT, max_new_tokens=16, dummy_image=R["inputs/dummy_image_uint8"],
                                observer=rec["observer"])
        out["t2t"] = (res, keep(rec))
    with recording(be) as rec:
        res = ref_pipeline.generate(T2I_PROMPT, steps=STEPS, cfg_scale=CFG, alpha=ALPHA,
                                    noise=R["t2i/initial_noise"][0], dummy_image=R["inputs/dummy_image_uint8"],
                                    max_new_tokens=4, observer=rec["observer"])
        out["t2i"] = (res, keep(rec))
    return out


# ---------------------------------------------------------------------------------------------------- end to end

@pytest.mark.parametrize("mode", ["i2t", "t2t", "t2i"])
def test_greedy_ids_identical(runs, reference, mode):
    res, _ = runs[mode]
    assert res.token_ids == reference[f"{mode}/generated_ids"][0].tolist()


def test_t2i_final_latent(runs, reference):
    res, _ = runs["t2i"]
    assert res.latent.shape == reference["t2i/final_latent"].shape[1:]
    assert_close(res.latent, reference["t2i/final_latent"][0], 1e-2, "final latent")


def test_t2i_image(runs, reference, ref_pipeline):
    res, _ = runs["t2i"]
    ref = reference["t2i/image_clamped"][0]                      # (3,128,128) in [0,1]
    assert res.image.dtype == np.uint8 and res.image.shape == (128, 128, 3)
    img = res.image.astype(np.float64).transpose(2, 0, 1) / 255.0
    diff = np.abs(img - ref)
    assert diff.max() <= 1e-2 + 1 / 255, f"uint8 image max diff {diff.max():.4g}"
    assert diff.mean() <= 1e-3 + 0.5 / 255, f"uint8 image mean diff {diff.mean():.4g}"
    # the same in float: decode our latent without quantisation and compare with the unclamped image
    raw = ref_pipeline.backend.vae_decode(ref_pipeline.backend.from_numpy(res.latent[None]))[0]
    d = np.abs(raw - reference["t2i/image_raw"][0])
    assert d.max() <= 1e-2 and d.mean() <= 1e-3, (d.max(), d.mean())


@pytest.mark.parametrize("mode", ["i2t", "t2t", "t2i"])
def test_step0_logits(runs, reference, mode):
    _, rec = runs[mode]
    first = rec["logits"][0]
    assert first.shape == (151936,)
    assert_close(first, reference[f"{mode}/step0_logits"], 0.1, f"{mode} step-0 logits")
    calls = [c for c in rec["backbone"] if c["logits"] is not None]
    assert [c["mode"] for c in rec["backbone"] if c["logits"] is None] == ["image_step"] * \
        (STEPS if mode == "t2i" else 0)                          # image steps return no logits
    if mode != "t2i":   # i2t/t2t: the same row as the prefill's last position
        assert calls[0]["mode"] == "prefill" and calls[0]["logits"].shape == (1, 151936)
        assert_close(first, reference[f"{mode}/prefill_logits_last_forward"], 0.1, f"{mode} prefill logits")
        np.testing.assert_array_equal(first, calls[0]["logits"][0])
    else:               # t2i: sampled first after the image, at <im_end>, from the CFG batch (2 rows)
        after = next(c for c in calls if c["mode"] == "decode")
        assert after["logits"].shape == (2, 151936)
        np.testing.assert_array_equal(first, after["logits"][0])


@pytest.mark.parametrize("mode", ["i2t", "t2t", "t2i"])
def test_top5_logits_every_step(runs, reference, columns, mode):
    _, rec = runs[mode]
    want_vals, want_ids = reference[f"{mode}/step_top5_values"], reference[f"{mode}/step_top5_ids"]
    rows = np.stack(rec["logits"])
    assert rows.shape[0] == want_vals.shape[0]
    top_ids = np.argsort(-rows, axis=1, kind="stable")[:, :5]
    assert (top_ids[:, 0] == want_ids[:, 0]).all()
    vals = np.take_along_axis(rows, top_ids, axis=1)
    assert_close(vals, want_vals, end_to_end_tol(columns, f"{mode}/step_top5_values"), f"{mode} top-5 logits")


@pytest.mark.parametrize("mode", ["i2t", "t2t"])
def test_prefill_mask_and_embeddings_in_pipeline(runs, reference, columns, mode):
    _, rec = runs[mode]
    first = rec["backbone"][0]
    assert first["start"] == 0
    np.testing.assert_array_equal(first["mask"], reference[f"{mode}/prefill_attention_mask"].astype(bool))
    assert_close(first["embeds"][0], reference[f"{mode}/prefill_inputs_embeds"],
                 end_to_end_tol(columns, f"{mode}/prefill_inputs_embeds"), f"{mode} prefill inputs_embeds")
    for step in rec["backbone"][1:]:          # decode steps: all-allowed mask (§12.2)
        assert step["mask"] is None


@pytest.mark.parametrize("mode", ["i2t", "t2t"])
def test_prefill_mask_from_input_ids(reference, mode):
    """§12.1 mask built from the processor ids: <image> (-200) expands to an I=1 run; no placeholder means
    the dummy block is prepended with I=0 (§17.25)."""
    ids = reference[f"{mode}/input_ids"][0]
    flags = []
    if (ids == IMAGE_PLACEHOLDER).any():
        for i in ids:
            flags += [True] * TOKENS_PER_IMAGE if i == IMAGE_PLACEHOLDER else [False]
    else:
        flags = [False] * (TOKENS_PER_IMAGE + len(ids))
    want = reference[f"{mode}/prefill_attention_mask"].astype(bool)
    np.testing.assert_array_equal(prefill_mask(np.array(flags)), want)


def test_t2i_prefill_branches(runs, reference, reference_ckpt):
    """CFG prefill as B=2: row 0 = cond ids, row 1 = the <no_mean> prompt, same dummy block, causal mask."""
    from safetensors import safe_open

    _, rec = runs["t2i"]
    first = rec["backbone"][0]
    ids, uncond = reference["t2i/input_ids"][0], reference["t2i/uncond_input_ids"][0]
    s = TOKENS_PER_IMAGE + len(ids)
    assert first["embeds"].shape == (2, s, 64)
    np.testing.assert_array_equal(first["mask"], np.tril(np.ones((s, s), bool)))
    with safe_open(str(reference_ckpt / "model.safetensors"), framework="numpy") as f:
        table = f.get_tensor("model.language_model.embed_tokens.weight")
    np.testing.assert_array_equal(first["embeds"][0, TOKENS_PER_IMAGE:], table[ids])
    np.testing.assert_array_equal(first["embeds"][1, TOKENS_PER_IMAGE:], table[uncond])
    np.testing.assert_array_equal(first["embeds"][0, :TOKENS_PER_IMAGE], first["embeds"][1, :TOKENS_PER_IMAGE])


def test_t2i_prompt_cache_and_hidden(runs, reference, columns):
    _, rec = runs["t2i"]
    prefix = int(reference["drift/prefix_len"])
    hidden = rec["backbone"][0]["hidden"]
    assert hidden.shape[1] == prefix
    assert_close(hidden[0, -1], reference["drift/prefill_hidden_last"],
                 end_to_end_tol(columns, "drift/prefill_hidden_last"), "prefill hidden (last)")
    cache = rec["cache"][0]
    for layer in range(2):
        for kv, store in (("k", cache.k), ("v", cache.v)):
            key = f"drift/cache_{kv}_layer{layer}"
            got = store[layer][:1, :, :prefix].float().numpy()
            assert_close(got, reference[key], end_to_end_tol(columns, key), key)


def test_t2i_euler_loop_internals(runs, reference, columns):
    """Per step: t given to the velocity function, x_t at the start, cond/uncond velocities (B=2 rows)."""
    _, rec = runs["t2i"]
    steps = rec["cfm_head"]
    assert len(steps) == STEPS
    ts = np.stack([s["t"] for s in steps])                      # (N, 2)
    np.testing.assert_allclose(ts[:, 0], reference["t2i/steps_t"], rtol=0, atol=2.5e-7)
    np.testing.assert_array_equal(ts[:, 0], ts[:, 1])
    xs = np.stack(rec["vision_tokenize"][1:])                   # [0] is the prefill's dummy-image latent
    assert xs.shape == (STEPS, 1, 128, 8, 8)
    np.testing.assert_array_equal(xs[0, 0], reference["t2i/initial_noise"][0])
    assert_close(xs[:, 0], reference["t2i/steps_x_t"], end_to_end_tol(columns, "t2i/steps_x_t"), "x_t per step")
    v = np.stack([s["v"] for s in steps])                       # (N, 2, C, h, w)
    assert_close(v[:, 0], reference["t2i/steps_cond_drift"], end_to_end_tol(columns, "t2i/steps_cond_drift"),
                 "cond velocity")
    assert_close(v[:, 1], reference["t2i/steps_uncond_drift"], end_to_end_tol(columns, "t2i/steps_uncond_drift"),
                 "uncond velocity")


def test_schedule_and_euler_dts(reference):
    ts = schedule(STEPS, ALPHA)
    assert ts.dtype == np.float32 and ts[0] == 0.0 and ts[-1] == 1.0
    # torch.linspace's float32 arithmetic (vector width dependent) vs numpy's: within 1 ulp
    np.testing.assert_allclose(ts, reference["t2i/schedule"], rtol=0, atol=1.2e-7)
    dts = euler_dts(ts)
    assert len(dts) == STEPS
    np.testing.assert_allclose(dts[:-1], reference["t2i/euler_dt"], rtol=0, atol=2.5e-7)
    assert dts[-1] == np.float32(1.0 / STEPS)


# ---------------------------------------------------------------------------------------------------- components

@pytest.fixture(scope="module")
def model(ref_pipeline):
    return ref_pipeline.backend.model


def test_vae_encoder_and_latent(model, reference, columns):
    px = T(reference, "i2t/pixel_values")
    assert_close(model.model.vae_model.encoder(px), reference["vae/encoder_moments"],
                 component_tol(columns, "vae/encoder_moments"), "encoder moments")
    assert_close(model.vae_encode(px), reference["vae/latent"], component_tol(columns, "vae/latent"), "latent")


def test_vae_decoders(model, reference, columns):
    z = T(reference, "vae/latent")
    assert_close(model.model.vae_decoder_projector(z), reference["vae/decoder_projector_pixels"],
                 component_tol(columns, "vae/decoder_projector_pixels"), "decoder projector")
    assert_close(model.vae_decode(z), reference["vae/decoded_pixels"],
                 component_tol(columns, "vae/decoded_pixels"), "vae decode")
    # the two decoders have separate weights: their outputs must differ (§17.20)
    assert np.abs(reference["vae/decoded_pixels"] - reference["vae/decoder_projector_pixels"]).max() > 0.1


def test_understanding_path(model, reference, columns):
    """Prefill image path with the official bf16 roundings applied to the recorded inputs."""
    M = model.model
    assert_close(M.vae_decoder_projector(T(reference, "und/latent_bf16")), reference["und/image_pixel_hat"],
                 component_tol(columns, "und/image_pixel_hat"), "und pixel_hat")
    pix = T(reference, "und/image_pixel_hat")
    assert_close(M.vision_representation.embeddings(pix), reference["und/vit_embeddings"],
                 component_tol(columns, "und/vit_embeddings"), "vit embeddings")
    assert_close(M.vision_representation(pix), reference["und/vit_last_hidden"],
                 component_tol(columns, "und/vit_last_hidden"), "vit last hidden")
    assert_close(M.und_projector(T(reference, "und/vit_last_hidden_bf16")), reference["und/projected"],
                 component_tol(columns, "und/projected"), "und projector")


def test_drift_time_embeds(model, reference, columns):
    t = T(reference, "drift/t").reshape(1)
    c1, c2 = model.model.time_embed(t)
    assert_close(c1, reference["drift/time_embeds_1"], component_tol(columns, "drift/time_embeds_1"), "c1")
    assert_close(c2, reference["drift/time_embeds_2"], component_tol(columns, "drift/time_embeds_2"), "c2")


def test_drift_vision_side(model, reference, columns):
    M = model.model
    assert_close(M.vae_decoder_projector(T(reference, "drift/x_t")), reference["drift/decoder_projector_pixels"],
                 component_tol(columns, "drift/decoder_projector_pixels"), "decoder projector(x_t)")
    pix = T(reference, "drift/decoder_projector_pixels")
    assert_close(M.vision_representation.embeddings(pix), reference["drift/patch_embedding_res"],
                 component_tol(columns, "drift/patch_embedding_res"), "patch embeddings (hi-gate high input)")
    assert_close(M.vision_representation(pix), reference["drift/vit_last_hidden"],
                 component_tol(columns, "drift/vit_last_hidden"), "vit last hidden")
    # the official und projector rounds its input to bf16 first (§17.19): apply it to the recorded input
    feats = T(reference, "drift/vit_last_hidden").to(torch.bfloat16).float()
    assert_close(M.und_projector(feats), reference["drift/und_projected"],
                 component_tol(columns, "drift/und_projected"), "und projector")


def test_drift_lm_hidden_from_recorded_cache(model, reference, columns):
    """Image tokens on top of the recorded prompt cache: positions prefix..prefix+15, all-allowed mask."""
    prefix = int(reference["drift/prefix_len"])
    past = [(T(reference, f"drift/cache_k_layer{i}"), T(reference, f"drift/cache_v_layer{i}")) for i in range(2)]
    pos = torch.arange(prefix, prefix + TOKENS_PER_IMAGE)[None]
    hidden, new = model.backbone(T(reference, "drift/und_projected"), pos, None, past)
    assert_close(hidden, reference["drift/lm_hidden_image"], component_tol(columns, "drift/lm_hidden_image"),
                 "LM hidden at the image positions")
    assert new[0][0].shape == (1, 2, TOKENS_PER_IMAGE, 16)


def test_drift_heads(model, reference, columns):
    from cheers_deploy.model.vision import shuffle_2x2

    M = model.model
    o = M.gen_projector(T(reference, "drift/lm_hidden_image"), T(reference, "drift/time_embeds_1"),
                        torch.arange(TOKENS_PER_IMAGE))
    assert_close(o, reference["drift/gen_projector_out"], component_tol(columns, "drift/gen_projector_out"),
                 "stage 1")
    assert_close(shuffle_2x2(T(reference, "drift/gen_projector_out"), 8), reference["drift/gen_projector_unpatchified"],
                 1e-6, "pixel shuffle")
    low, high = T(reference, "drift/gen_projector_unpatchified"), T(reference, "drift/patch_embedding_res")
    assert_close(M.hi_gate(low, high), reference["drift/hi_gate_out"], component_tol(columns, "drift/hi_gate_out"),
                 "hi gate")
    assert_close(M.hi_gate.gate(low)[0, :, 0].reshape(8, 8), reference["drift/hi_gate_heat_map"],
                 component_tol(columns, "drift/hi_gate_heat_map"), "hi gate heat map")
    pos2 = torch.arange(64) % 32                                   # §17.4 repeating positions
    assert_close(M.hi_projector(T(reference, "drift/hi_gate_out"), T(reference, "drift/time_embeds_2"), pos2),
                 reference["drift/hi_projector_out"], component_tol(columns, "drift/hi_projector_out"), "stage 2")


def test_drift_velocity_from_recorded_lm_hidden(model, reference, columns):
    """The whole velocity head (stage 1, shuffle, gate, stage 2, reshape) through the backend entry point."""
    v = model.cfm_head(T(reference, "drift/lm_hidden_image"), T(reference, "drift/patch_embedding_res"),
                       T(reference, "drift/t").reshape(1))
    assert tuple(v.shape) == (1, 128, 8, 8)
    assert_close(v, reference["drift/velocity"], component_tol(columns, "drift/velocity"), "velocity")


def test_final_latent_redecodes_to_reference_image(model, reference, columns):
    assert_close(model.vae_decode(T(reference, "t2i/final_latent")), reference["t2i/image_raw"],
                 component_tol(columns, "vae/decoded_pixels"), "vae decode of the recorded final latent")
