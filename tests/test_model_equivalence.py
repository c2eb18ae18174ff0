"""Our Qwen2 decoder and SigLIP vision tower against the transformers implementations (transformers 4.51.3),
weights copied by name, float32, random inputs."""
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cheers_deploy.config import CheersConfig  # noqa: E402
from cheers_deploy.testing import fill_random_  # noqa: E402


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def rel_err(got, ref):
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def tiny(vocab=512, **text):
    cfg = CheersConfig.from_name("tiny")
    cfg.text_config.vocab_size = vocab
    for k, v in text.items():
        setattr(cfg.text_config, k, v)
    return cfg


# ---------------------------------------------------------------------------------------------------- Qwen2

def language_model(cfg, seed):
    """`model.language_model` of CheersModel(cfg) alone, filled by the checkpoint recipe."""
    from cheers_deploy.model.qwen2 import Qwen2Model

    return fill_random_(Qwen2Model(cfg.text_config), seed, prefix="model.language_model.").eval()


def hf_qwen2(text_cfg, state_dict, attn_impl):
    from transformers import Qwen2Config, Qwen2Model

    hf_cfg = Qwen2Config(
        vocab_size=text_cfg.vocab_size, hidden_size=text_cfg.hidden_size,
        intermediate_size=text_cfg.intermediate_size, num_hidden_layers=text_cfg.num_hidden_layers,
        num_attention_heads=text_cfg.num_attention_heads, num_key_value_heads=text_cfg.num_key_value_heads,
        hidden_act="silu", max_position_embeddings=4096, rope_theta=text_cfg.rope_theta,
        rms_norm_eps=text_cfg.rms_norm_eps, use_sliding_window=False, tie_word_embeddings=True,
        attention_dropout=0.0)
    hf_cfg._attn_implementation = attn_impl
    model = Qwen2Model(hf_cfg).eval()
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert not unexpected, unexpected
    assert not [k for k in missing if "rotary" not in k], missing
    return model


@pytest.mark.parametrize("attn_impl,rope_theta,eps", [("eager", 1e6, 1e-6), ("sdpa", 1e6, 1e-6),
                                                      ("eager", 1e4, 1e-5)])
def test_qwen2_matches_transformers(attn_impl, rope_theta, eps):
    cfg = tiny(rope_theta=rope_theta, rms_norm_eps=eps)
    lm = language_model(cfg, seed=11)
    hf = hf_qwen2(cfg.text_config, lm.state_dict(), attn_impl)

    gen = torch.Generator().manual_seed(0)
    b, s, d = 2, 23, cfg.text_config.hidden_size
    embeds = torch.randn(b, s, d, generator=gen)
    pos = torch.arange(s)[None].expand(b, s)
    causal = torch.tril(torch.ones(s, s, dtype=torch.bool))[None, None]
    ours, _ = lm(embeds, pos, causal)
    ref = hf(inputs_embeds=embeds, position_ids=pos, use_cache=False).last_hidden_state
    assert rel_err(ours, ref) < 1e-5

    # non-contiguous positions (a gap, then offset): RoPE relative distances change, outputs too
    pos2 = torch.cat([torch.arange(10), torch.arange(40, 40 + s - 10)])[None].expand(b, s)
    ours2, _ = lm(embeds, pos2, causal)
    ref2 = hf(inputs_embeds=embeds, position_ids=pos2, use_cache=False).last_hidden_state
    assert rel_err(ours2, ref2) < 1e-5
    assert (ours2 - ours)[:, 10:].abs().max() > 1e-3


@pytest.mark.parametrize("impl,rope_cache", [("sdpa", False), ("sdpa_gqa", True), ("masked", True)])
def test_qwen2_options_match_transformers(impl, rope_cache):
    """Every attention implementation / RoPE cache setting of our LM (CheersModel.set_options) against
    transformers' eager attention, with a prefill mask and then one step over the cached K/V."""
    from transformers import DynamicCache

    cfg = tiny()
    lm = language_model(cfg, seed=13)
    lm.set_attention(impl)
    lm.set_rope_cache(rope_cache)
    hf = hf_qwen2(cfg.text_config, lm.state_dict(), "eager")
    gen = torch.Generator().manual_seed(2)
    s, d = 11, cfg.text_config.hidden_size
    embeds = torch.randn(1, s + 1, d, generator=gen)
    pos = torch.arange(s + 1)[None]
    ours, new = lm(embeds[:, :s], pos[:, :s], torch.tril(torch.ones(s, s, dtype=torch.bool))[None, None])
    cache = DynamicCache()
    ref = hf(inputs_embeds=embeds[:, :s], position_ids=pos[:, :s], past_key_values=cache,
             use_cache=True).last_hidden_state
    assert rel_err(ours, ref) < 1e-5
    ours2, _ = lm(embeds[:, s:], pos[:, s:], torch.ones(1, 1, 1, s + 1, dtype=torch.bool), new)
    ref2 = hf(inputs_embeds=embeds[:, s:], position_ids=pos[:, s:], past_key_values=cache,
              use_cache=True).last_hidden_state
    assert rel_err(ours2, ref2) < 1e-5


def test_qwen2_rotated_keys_match_transformers_cache():
    """The KV entries our layers return are the RoPE-rotated keys and the values, like transformers' cache."""
    from transformers import DynamicCache

    cfg = tiny()
    lm = language_model(cfg, seed=12)
    hf = hf_qwen2(cfg.text_config, lm.state_dict(), "eager")
    gen = torch.Generator().manual_seed(1)
    s = 9
    embeds = torch.randn(1, s, cfg.text_config.hidden_size, generator=gen)
    pos = torch.arange(s)[None]
    _, new = lm(embeds, pos, torch.tril(torch.ones(s, s, dtype=torch.bool))[None, None])
    cache = DynamicCache()
    hf(inputs_embeds=embeds, position_ids=pos, past_key_values=cache, use_cache=True)
    for layer, (k, v) in enumerate(new):
        assert rel_err(k, cache.key_cache[layer]) < 1e-5
        assert rel_err(v, cache.value_cache[layer]) < 1e-5


# ---------------------------------------------------------------------------------------------------- SigLIP

def hf_siglip(vcfg, state_dict):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    hf_cfg = SiglipVisionConfig(
        hidden_size=vcfg.hidden_size, intermediate_size=vcfg.intermediate_size,
        num_hidden_layers=vcfg.num_hidden_layers, num_attention_heads=vcfg.num_attention_heads,
        num_channels=vcfg.num_channels, image_size=vcfg.image_size, patch_size=vcfg.patch_size,
        hidden_act=vcfg.hidden_act, layer_norm_eps=vcfg.layer_norm_eps, attention_dropout=0.0)
    hf_cfg.vision_use_head = True
    hf_cfg._attn_implementation = "eager"
    model = SiglipVisionModel(hf_cfg).eval()
    sd = {"vision_model." + k: v for k, v in state_dict.items()}
    model.load_state_dict(sd, strict=True)            # our tower carries the (unused) pooling head too
    return model


@pytest.fixture(scope="module")
def vision_pair():
    from cheers_deploy.model.vision import VisionTower

    cfg = CheersConfig.from_name("tiny")
    tower = VisionTower(cfg.vision_representation_config)
    fill_random_(tower, seed=13, prefix="model.vision_representation.").eval()
    return cfg, tower, hf_siglip(cfg.vision_representation_config, tower.state_dict())


def test_siglip_matches_transformers(vision_pair):
    cfg, tower, hf = vision_pair
    r = cfg.vision_representation_config.image_size
    gen = torch.Generator().manual_seed(2)
    pixels = torch.rand(2, 3, r, r, generator=gen) * 2 - 0.5      # decoder-projector images are not clamped
    ours = tower(pixels)
    ref = hf(pixel_values=pixels).last_hidden_state
    assert ours.shape == ref.shape == (2, (r // 16) ** 2, cfg.vision_representation_config.hidden_size)
    assert rel_err(ours, ref) < 1e-5
    # the patch-embedding layer alone (the hi gate's "high" input)
    assert rel_err(tower.embeddings(pixels), hf.vision_model.embeddings(pixels)) < 1e-6


def test_siglip_position_interpolation_matches_transformers(vision_pair):
    """A grid other than the learned table: bicubic (a = -0.75), align_corners False, as transformers'
    interpolate_pos_encoding (§5.1, §19.4)."""
    cfg, tower, hf = vision_pair
    r = 2 * cfg.vision_representation_config.image_size
    gen = torch.Generator().manual_seed(3)
    pixels = torch.rand(1, 3, r, r, generator=gen)
    ours = tower(pixels)
    ref = hf(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) < 1e-5


def test_random_fill_covers_every_tensor():
    """The helper behind every random checkpoint: nothing keeps its constructor value, the zero-initialised
    official layers are non-zero, BN statistics are realistic, values are seeded."""
    from cheers_deploy.model import CheersModel

    model = CheersModel(tiny())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    filled = {k: v.clone() for k, v in fill_random_(model, seed=5).state_dict().items()}
    for name, t in filled.items():
        if name.endswith("num_batches_tracked"):
            assert int(t) == 0
            continue
        assert not torch.equal(t, before[name]), f"{name} was not filled"
        assert torch.isfinite(t).all()
    for name in ("model.gen_projector.diffusion_head_a.0.adaLN_modulation.1.weight",
                 "model.hi_projector.diffusion_head_a.0.adaLN_modulation.1.bias",
                 "model.hi_gate.gate.2.weight", "model.hi_gate.gate.2.bias"):
        assert filled[name].abs().max() > 1e-3, f"{name} is (near) zero"
    var = filled["model.vae_model.bn.running_var"]
    assert 0.5 <= float(var.min()) and float(var.max()) < 2.0
    sd = model.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["model.language_model.embed_tokens.weight"].data_ptr()
    # gains of the recipe: text q/k x3, velocity head x0.05
    q = filled["model.language_model.layers.0.self_attn.q_proj.weight"]
    assert 2.0 < float(q.std()) * 64 ** 0.5 < 4.0
    head = filled["model.hi_projector.diffusion_head_b.linear.weight"]
    assert float(head.std()) * 64 ** 0.5 < 0.1
    # seeded: refilling with the same seed reproduces every tensor; another seed does not
    again = fill_random_(model, seed=5).state_dict()
    assert all(torch.equal(again[k], v) for k, v in filled.items())
