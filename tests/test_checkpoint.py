"""Checkpoint loading/saving in the official layout: sharded vs single file, save/load round trip, clear
errors for every way a checkpoint can be broken, config.json round trip and defaults, and the official
preset's parameter count against docs/architecture.md §16.6."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from cheers_deploy.config import PRESETS, CheersConfig
from cheers_deploy.errors import CheckpointError

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _state(pipeline):
    return {k: v.detach().clone() for k, v in pipeline.backend.model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------- shards

def test_sharded_equals_single_file(tiny_ckpt, tiny_ckpt_sharded):
    from cheers_deploy.runtime.pipeline import Pipeline

    shards = sorted(p.name for p in tiny_ckpt_sharded.glob("*.safetensors"))
    assert len(shards) >= 2 and not (tiny_ckpt_sharded / "model.safetensors").exists()
    index = json.loads((tiny_ckpt_sharded / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert (tiny_ckpt / "model.safetensors").is_file() and not (tiny_ckpt / "model.safetensors.index.json").exists()

    a, b = Pipeline.from_pretrained(tiny_ckpt), Pipeline.from_pretrained(tiny_ckpt_sharded)
    assert a.processor.resolution == b.processor.resolution == 64        # preprocessor_config.json
    sa, sb = _state(a), _state(b)
    sa.pop("lm_head.weight"), sb.pop("lm_head.weight")       # tied: the embedding is what the head uses
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    kw = dict(steps=2, cfg_scale=2.0, alpha=0.5, seed=5, max_new_tokens=2)
    ga, gb = a.generate("a green triangle", **kw), b.generate("a green triangle", **kw)
    np.testing.assert_array_equal(ga.latent, gb.latent)
    np.testing.assert_array_equal(ga.image, gb.image)
    assert ga.token_ids == gb.token_ids


def test_loaded_weights_equal_the_files(tiny_ckpt_sharded):
    """Every tensor in the model equals the tensor stored under its name (read back with safetensors)."""
    from safetensors.numpy import load_file

    from cheers_deploy.runtime.pipeline import Pipeline

    state = _state(Pipeline.from_pretrained(tiny_ckpt_sharded))
    stored = {}
    for f in tiny_ckpt_sharded.glob("*.safetensors"):
        stored.update(load_file(str(f)))
    assert set(stored) == set(state)
    for k, v in stored.items():
        if k == "lm_head.weight":
            continue
        np.testing.assert_array_equal(state[k].numpy(), v, err_msg=k)


def test_loaded_model_keeps_lm_head_tied(tiny_ckpt):
    """from_pretrained builds on the meta device; to_empty() unties parameters, so it must re-tie."""
    from cheers_deploy.runtime.pipeline import Pipeline

    model = Pipeline.from_pretrained(tiny_ckpt).backend.model
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight


@pytest.mark.parametrize("max_shard_bytes", [None, 3_000_000])
def test_save_state_load_round_trip(tmp_path, max_shard_bytes):
    from cheers_deploy.checkpoint import load_state_into, save_state
    from cheers_deploy.model import CheersModel
    from cheers_deploy.testing import random_model, tiny_config

    cfg = tiny_config(vocab_size=512)
    src = random_model(cfg, seed=31)
    save_state(src, tmp_path, max_shard_bytes=max_shard_bytes)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    if max_shard_bytes is None:
        assert files == ["model.safetensors"]
    else:
        assert len(files) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    with torch.device("meta"):
        dst = CheersModel(cfg)
    dst = dst.to_empty(device="cpu")
    dst.lm_head.weight = dst.model.language_model.embed_tokens.weight
    load_state_into(dst, tmp_path)
    a, b = src.state_dict(), dst.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert dst.lm_head.weight is dst.model.language_model.embed_tokens.weight
    # saving again over the other layout switches cleanly (no stale single file / index left behind)
    save_state(src, tmp_path, max_shard_bytes=None if max_shard_bytes else 3_000_000)
    has_index = (tmp_path / "model.safetensors.index.json").exists()
    assert has_index != (tmp_path / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------------- errors

@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory, reference_dir):
    """A complete random checkpoint with a small vocabulary and a tokenizer that fits it (the bundled model's, 446
    ids: a tokenizer with ids beyond the vocabulary is refused on load)."""
    import shutil

    from cheers_deploy.hub import bundled_checkpoint
    from cheers_deploy.testing import tiny_config, write_random_checkpoint

    ckpt = write_random_checkpoint(tmp_path_factory.mktemp("small") / "ckpt", tiny_config(vocab_size=512), seed=3,
                                   tokenizer_from=reference_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):      # tokenizer.json is preferred to vocab + merges
        shutil.copyfile(bundled_checkpoint() / name, ckpt / name)
    return ckpt


def _clone(src: Path, dst: Path, skip=()) -> Path:
    """Hard-link every file of a checkpoint except `skip` (which the test then writes itself); a symlink out of the
    checkpoint folder would be refused."""
    dst.mkdir()
    for p in src.iterdir():
        if p.name not in skip:
            os.link(p, dst / p.name)
    return dst


def _load(path):
    from cheers_deploy.runtime.pipeline import Pipeline

    return Pipeline.from_pretrained(path)


def _rewrite(src: Path, dst: Path, edit):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})


def test_small_checkpoint_loads(small_ckpt):
    assert _load(small_ckpt).backend.model.config.text_config.vocab_size == 512


def test_missing_config(small_ckpt, tmp_path):
    d = _clone(small_ckpt, tmp_path / "c", skip=("config.json",))
    with pytest.raises(CheckpointError, match="config"):
        _load(d)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        _load(tmp_path / "nowhere")


def test_missing_weights(small_ckpt, tmp_path):
    d = _clone(small_ckpt, tmp_path / "c", skip=("model.safetensors",))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        _load(d)


def test_missing_shard(tiny_ckpt_sharded, tmp_path):
    index = json.loads((tiny_ckpt_sharded / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[-1]
    d = _clone(tiny_ckpt_sharded, tmp_path / "c", skip=(gone,))
    with pytest.raises(CheckpointError, match=gone.replace(".", r"\.")):
        _load(d)


@pytest.mark.parametrize("damage", ["short", "garbage_header", "huge_header_length", "truncated_data", "empty"])
def test_corrupt_safetensors(small_ckpt, tmp_path, damage):
    d = _clone(small_ckpt, tmp_path / "c", skip=("model.safetensors",))
    raw = (small_ckpt / "model.safetensors").read_bytes()
    if damage == "short":
        data = raw[:5]
    elif damage == "garbage_header":
        data = raw[:8] + b"\x00\xff not json at all" + raw[8 + 18:]
    elif damage == "huge_header_length":
        data = (2 ** 62).to_bytes(8, "little") + raw[8:]
    elif damage == "truncated_data":
        data = raw[: len(raw) // 2]
    else:
        data = b""
    (d / "model.safetensors").write_bytes(data)
    with pytest.raises(CheckpointError) as exc:
        _load(d)
    msg = str(exc.value)
    assert "model.safetensors" in msg and ("corrupt" in msg or "beyond" in msg), msg


def test_missing_tensor_is_named(small_ckpt, tmp_path):
    name = "model.hi_gate.gate.2.bias"
    d = _clone(small_ckpt, tmp_path / "c", skip=("model.safetensors",))
    _rewrite(small_ckpt, d, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match="missing") as exc:
        _load(d)
    assert name in str(exc.value)


def test_missing_lm_head_is_fine(small_ckpt, tmp_path):
    """lm_head.weight is tied to the embedding (§17.23): a file without it loads."""
    d = _clone(small_ckpt, tmp_path / "c", skip=("model.safetensors",))
    _rewrite(small_ckpt, d, lambda t: t.pop("lm_head.weight"))
    model = _load(d).backend.model
    ref = _load(small_ckpt).backend.model
    emb = "model.language_model.embed_tokens.weight"
    assert torch.equal(model.state_dict()[emb], ref.state_dict()[emb])


def test_unexpected_tensor_is_named(small_ckpt, tmp_path):
    name = "model.hi_gate.extra_projection.weight"
    d = _clone(small_ckpt, tmp_path / "c", skip=("model.safetensors",))
    _rewrite(small_ckpt, d, lambda t: t.__setitem__(name, np.zeros((4, 4), np.float32)))
    with pytest.raises(CheckpointError, match="unexpected") as exc:
        _load(d)
    assert name in str(exc.value)


def test_wrong_shape_names_tensor_expected_and_found(small_ckpt, tmp_path):
    name = "model.hi_gate.gate.0.weight"                       # (64, 64) in the tiny config
    d = _clone(small_ckpt, tmp_path / "c", skip=("model.safetensors",))
    _rewrite(small_ckpt, d, lambda t: t.__setitem__(name, np.zeros((64, 32), np.float32)))
    with pytest.raises(CheckpointError) as exc:
        _load(d)
    msg = str(exc.value)
    assert name in msg and "[64, 64]" in msg and "[64, 32]" in msg, msg


def test_config_that_breaks_the_couplings(small_ckpt, tmp_path):
    d = _clone(small_ckpt, tmp_path / "c", skip=("config.json",))
    cfg = json.loads((small_ckpt / "config.json").read_text())
    cfg["vae_decoder_config"]["ch"] = 64                       # velocity width must be 4 * z_channels
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="ch"):
        _load(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        _load(d)


# ---------------------------------------------------------------------------------------------------- config.json

@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_config_round_trip(preset, tmp_path):
    cfg = CheersConfig.from_name(preset)
    again = CheersConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.to_dict() == cfg.to_dict()
    cfg.save(tmp_path / "config.json")
    assert CheersConfig.from_file(tmp_path / "config.json") == cfg


def test_config_keeps_unknown_keys(reference_dir, tmp_path):
    original = json.loads((reference_dir / "config.json").read_text())
    cfg = CheersConfig.from_dict(original)
    out = cfg.to_dict()

    def contains(big, small, path=""):
        for k, v in small.items():
            assert k in big, f"{path}{k} dropped"
            if isinstance(v, dict):
                contains(big[k], v, f"{path}{k}.")
            else:
                assert big[k] == v, f"{path}{k}: {big[k]!r} != {v!r}"

    contains(out, original)                                    # auto_map, sliding_window, num_patches... kept
    extra = dict(original, my_future_field={"a": [1, 2]})
    extra["text_config"] = dict(original["text_config"], rope_scaling_note="x")
    again = CheersConfig.from_dict(extra).to_dict()
    assert again["my_future_field"] == {"a": [1, 2]} and again["text_config"]["rope_scaling_note"] == "x"
    CheersConfig.from_dict(extra).save(tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["my_future_field"] == {"a": [1, 2]}


def test_config_absent_fields_take_official_class_defaults(reference_dir):
    """§1: the released file omits num_hidden_layers, rope_theta, rms_norm_eps of the text model."""
    official = CheersConfig.from_name("cheers-official")
    t = official.text_config
    assert t.num_hidden_layers == 28 and t.rope_theta == 1e6 and t.rms_norm_eps == 1e-6
    assert t.hidden_act == "silu" and t.vocab_size == 151936 and t.tie_word_embeddings is True
    assert official.vae_encoder_config.ch == 128 and official.vae_encoder_config.ch_mult == [1, 2, 4, 4]
    assert official.vae_decoder_config.num_res_blocks == 2 and official.vae_decoder_config.z_channels == 32
    empty = CheersConfig.from_dict({})
    assert empty.vision_representation_config.hidden_size == 768
    assert empty.vision_representation_config.num_hidden_layers == 12
    assert empty.vision_representation_config.image_size == 256
    assert empty.text_config.vocab_size == 152064 and empty.text_config.hidden_size == 3584
    assert empty.text_config.num_hidden_layers == 28
    assert empty.gen_head_depth == 7 and empty.hi_head_depth == 3
    ref = CheersConfig.from_file(reference_dir / "config.json")
    assert ref.text_config.num_hidden_layers == 2 and ref.text_config.rope_theta == 1e6
    assert ref.vision_representation_config.image_size == 128 and ref.gen_head_depth == 7


# ---------------------------------------------------------------------------------------------------- counts

# docs/architecture.md §16.6
OFFICIAL_COUNTS = {
    "model.vae_model.encoder": 34_425_856,
    "model.vae_model.decoder": 49_620_259,
    "model.vae_decoder_projector.decoder": 49_620_259,
    "model.vision_representation": 413_534_448 + 15_238_352,     # tower + (unused) pooling head
    "model.vision_representation.head": 15_238_352,
    "model.und_projector": 28_320_000,
    "model.language_model": 1_543_714_304,
    "model.time_embed": 4_379_904,
    "model.gen_projector": 347_698_176,
    "model.hi_gate": 1_331_713,
    "model.hi_projector": 83_454_464,
}


@pytest.fixture(scope="module")
def official_meta():
    from cheers_deploy.model import CheersModel

    with torch.device("meta"):
        return CheersModel(CheersConfig.from_name("cheers-official"))


def test_official_parameter_count(official_meta):
    m = official_meta
    assert sum(p.numel() for p in m.parameters()) == 2_571_337_735      # unique (tied lm_head once), no buffers
    sd = m.state_dict()
    assert len(sd) == 1321
    stored = sum(v.numel() for k, v in sd.items() if not k.endswith("num_batches_tracked"))
    assert stored == 2_804_711_943                                          # lm_head copy + BN statistics
    assert sum(1 for k in sd if k.endswith("num_batches_tracked")) == 2
    for prefix, want in OFFICIAL_COUNTS.items():
        got = sum(p.numel() for n, p in m.named_parameters() if n.startswith(prefix + "."))
        assert got == want, f"{prefix}: {got} != {want}"


def test_official_shapes_spot_checks(official_meta):
    """§16 shapes that depend on the couplings: stage 2 uses the *text* KV heads; stage 1 outputs 4 x 1152."""
    sd = official_meta.state_dict()
    want = {
        "model.hi_projector.diffusion_head_a.0.attn.k_proj.weight": (144, 1152),
        "model.gen_projector.diffusion_head_a.6.attn.k_proj.weight": (256, 1536),
        "model.gen_projector.diffusion_head_b.linear.weight": (4608, 1536),
        "model.hi_projector.diffusion_head_b.linear.weight": (128, 1152),
        "model.hi_projector.diffusion_head_a.2.adaLN_modulation.1.weight": (6912, 1152),
        "model.und_projector.mlp.0.weight": (4608, 4608),
        "model.vision_representation.head.attention.in_proj_weight": (3456, 1152),
        "model.vae_model.decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "model.vae_model.encoder.down.2.block.0.nin_shortcut.weight": (512, 256, 1, 1),
        "model.vae_model.bn.running_var": (128,),
        "lm_head.weight": (151936, 1536),
    }
    for k, shape in want.items():
        assert tuple(sd[k].shape) == shape, k
