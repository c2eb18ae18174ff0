"""CheersModel's run-time options (attn_impl, rope_cache, fused_gate): every setting computes the default's maths
on the CPU, none of them touches the state_dict, and ONNX export traces the backbone with the "masked" attention
through the option (the exporter can see that it did)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cheers_deploy.config import CheersConfig  # noqa: E402
from cheers_deploy.runtime.masks import prefill_mask  # noqa: E402
from cheers_deploy.testing import fill_random_  # noqa: E402

IMPLS = ("sdpa", "sdpa_gqa", "masked")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def cfg():
    return CheersConfig.from_name("tiny")


@pytest.fixture(scope="module")
def model(cfg):
    from cheers_deploy.model import CheersModel

    m = fill_random_(CheersModel(cfg), seed=21).eval()
    yield m
    m.set_options(attn_impl="sdpa", rope_cache=True, fused_gate=False)


def _max_diff(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


def _lm_inputs(cfg, seed=0):
    """A prefill with a real mask (causal text + one bidirectional image run) and a batch-2 decode over a past."""
    g = torch.Generator().manual_seed(seed)
    d = cfg.text_config.hidden_size
    flags = np.zeros(13, bool)
    flags[3:9] = True
    s = len(flags)
    mask = torch.from_numpy(prefill_mask(flags))[None, None].expand(2, 1, s, s)
    pos = torch.arange(s)[None].expand(2, s)
    return torch.randn(2, s, d, generator=g), pos, mask


def _run_lm(model, cfg):
    """(prefill hidden, prefill K/V, decode hidden over the prefill's K/V with a mask hiding one past slot)."""
    x, pos, mask = _lm_inputs(cfg)
    h, kv = model.backbone(x, pos, mask)
    g = torch.Generator().manual_seed(5)
    s = pos.shape[1]
    x2 = torch.randn(2, 2, cfg.text_config.hidden_size, generator=g)
    pos2 = (s + torch.arange(2))[None].expand(2, 2)
    mask2 = torch.ones(2, 1, 2, s + 2, dtype=torch.bool)
    mask2[..., s + 1] = torch.tensor([False, True])                       # causal over the two new positions
    mask2[1, ..., 0] = False                                              # the second row hides a past slot
    h2, kv2 = model.backbone(x2, pos2, mask2, kv)
    return h, kv, h2, kv2


def _run_heads(model, cfg, seed=3):
    g = torch.Generator().manual_seed(seed)
    m, dt, dv = 4, cfg.text_config.hidden_size, cfg.vision_representation_config.hidden_size
    hidden = torch.randn(2, m, dt, generator=g)
    pe = torch.randn(2, 4 * m, dv, generator=g)
    t = torch.tensor([0.3, 0.8])
    return model.cfm_head(hidden, pe, t)


# ---------------------------------------------------------------------------------------------------- attention

def test_default_options(model):
    assert model.options() == {"attn_impl": "sdpa", "rope_cache": True, "fused_gate": False}
    n_attn = sum(1 for mod in model.modules() if hasattr(mod, "attn_impl"))
    cfg = model.config
    assert n_attn == cfg.text_config.num_hidden_layers + cfg.gen_head_depth + cfg.hi_head_depth


@pytest.mark.parametrize("impl", ["sdpa_gqa", "masked"])
def test_attention_impls_match_sdpa_lm(model, cfg, impl):
    model.set_options(attn_impl="sdpa")
    ref = _run_lm(model, cfg)
    model.set_options(attn_impl=impl)
    try:
        assert model.options()["attn_impl"] == impl
        got = _run_lm(model, cfg)
    finally:
        model.set_options(attn_impl="sdpa")
    h, kv, h2, kv2 = got
    assert _max_diff(h, ref[0]) < 1e-5 and _max_diff(h2, ref[2]) < 1e-5
    for (k, v), (rk, rv) in zip(kv + kv2, ref[1] + ref[3]):
        assert _max_diff(k, rk) < 1e-5 and _max_diff(v, rv) < 1e-5


@pytest.mark.parametrize("impl", ["sdpa_gqa", "masked"])
def test_attention_impls_match_sdpa_heads(model, cfg, impl):
    model.set_options(attn_impl="sdpa")
    ref = _run_heads(model, cfg)
    model.set_options(attn_impl=impl)
    try:
        got = _run_heads(model, cfg)
    finally:
        model.set_options(attn_impl="sdpa")
    assert _max_diff(got, ref) < 1e-5 * max(1.0, float(ref.abs().max()))


def test_sdpa_gqa_falls_back_without_enable_gqa(monkeypatch):
    """On a torch without SDPA's enable_gqa, "sdpa_gqa" is exactly "sdpa" (repeat_kv)."""
    from cheers_deploy.model import layers

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 16, generator=g), torch.randn(2, 2, 7, 16, generator=g), torch.randn(2, 2, 7, 16)
    mask = torch.rand(2, 1, 5, 7, generator=g) > 0.3
    mask[..., 0] = True
    monkeypatch.setattr(layers, "SDPA_HAS_GQA", False)
    assert torch.equal(layers.attention_gqa(q, k, v, mask), layers.attention(q, k, v, mask))


def test_attention_option_is_per_module_and_validated(model):
    lm = model.model.language_model
    lm.set_attention("masked")
    try:
        impls = model.options()["attn_impl"]
        assert isinstance(impls, dict)
        assert {n: i for n, i in impls.items() if n.startswith("model.language_model.")} and \
            all(i == ("masked" if n.startswith("model.language_model.") else "sdpa") for n, i in impls.items())
    finally:
        model.set_attention("sdpa")
    assert model.options()["attn_impl"] == "sdpa"
    with pytest.raises(ValueError, match="unknown attention"):
        model.set_options(attn_impl="flash")
    with pytest.raises(ValueError):
        from cheers_deploy.model import CheersModel

        with torch.device("meta"):
            CheersModel(model.config, attn_impl="eager")


def test_constructor_keywords(cfg):
    from cheers_deploy.model import CheersModel

    with torch.device("meta"):
        m = CheersModel(cfg, attn_impl="masked", rope_cache=False, fused_gate=True)
    assert m.options() == {"attn_impl": "masked", "rope_cache": False, "fused_gate": True}


# ---------------------------------------------------------------------------------------------------- RoPE cache

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_cache_is_exact(model, cfg, dtype):
    from cheers_deploy.model.layers import rope_inv_freq

    lm = model.model.language_model
    model.set_options(rope_cache=False)
    x, pos, mask = _lm_inputs(cfg)
    try:
        assert lm._rope_tables is None
        off_lm = model.backbone(x, pos, mask)[0]
        off_cos = lm.rope(pos, dtype)
        off_heads = _run_heads(model, cfg)
        model.set_options(rope_cache=True)
        on_cos = lm.rope(pos, dtype)
        assert all(torch.equal(a, b) for a, b in zip(on_cos, off_cos))
        assert torch.equal(lm._rope_tables[(pos.device, dtype)],
                           rope_inv_freq(cfg.text_config.head_dim, cfg.text_config.rope_theta, dtype))
        assert torch.equal(_run_heads(model, cfg), off_heads)
        assert torch.equal(model.backbone(x, pos, mask)[0], off_lm)
        assert (pos.device, torch.float32) in model.model.hi_projector._rope_tables
    finally:
        model.set_options(rope_cache=True)


def test_rope_cache_stays_out_of_the_state_dict(model, cfg):
    keys = set(model.state_dict())
    _run_heads(model, cfg)
    model.backbone(*_lm_inputs(cfg))
    assert model.model.language_model._rope_tables
    assert set(model.state_dict()) == keys
    assert not any("rope" in name for name, _ in model.named_buffers())


# ---------------------------------------------------------------------------------------------------- hi gate

def test_fused_gate_on_cpu_is_the_plain_gate(model, cfg):
    hg = model.model.hi_gate
    g = torch.Generator().manual_seed(9)
    dv = cfg.vision_representation_config.hidden_size
    low = torch.randn(2, 16, dv, generator=g)
    high = torch.randn(1, 16, dv, generator=g).expand(2, 16, dv)
    ref = hg(low, high)
    ref_head = _run_heads(model, cfg)
    model.set_options(fused_gate=True)
    try:
        assert hg.fused
        assert torch.equal(hg(low, high), ref) and torch.equal(hg.plain(low, high), ref)
        assert torch.equal(_run_heads(model, cfg), ref_head)
    finally:
        model.set_options(fused_gate=False)


def test_fused_gate_module_imports_without_triton():
    """fused_gate imports triton lazily: the model package loads (and reports availability) without it."""
    from cheers_deploy.model import fused_gate

    avail = fused_gate.triton_available()
    assert isinstance(avail, bool)
    if not avail:
        with pytest.raises(ImportError):
            fused_gate.gate_kernel()


# ---------------------------------------------------------------------------------------------------- export

def test_export_settings_use_the_masked_option_and_restore(model, cfg):
    from cheers_deploy.export.wrappers import export_settings, traced_masked

    with export_settings(model, 18) as calls:
        assert model.options()["attn_impl"] != "sdpa"
        assert all(m.attn_impl == "masked" for m in model.model.language_model.modules() if hasattr(m, "attn_impl"))
        model.backbone(*_lm_inputs(cfg))
        assert traced_masked(calls) and calls["masked"] == cfg.text_config.num_hidden_layers
        _run_heads(model, cfg)                                      # the DiT stacks keep "sdpa"
        assert calls["sdpa"] == cfg.gen_head_depth + cfg.hi_head_depth and not traced_masked(calls)
    assert model.options()["attn_impl"] == "sdpa"
    from collections import Counter

    assert not traced_masked(Counter())
    assert not traced_masked(Counter(sdpa=2))


@pytest.mark.parametrize("prefill_cache", [False, True])
def test_exporter_traces_the_masked_backbone(model, cfg, tmp_path, prefill_cache):
    """The exporter's own trace (`_trace`): the mask reaches the scores only through Where, the counter saw the
    masked path, ORT equals the torch model (a RoPE table cached before the trace becomes a constant)."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from cheers_deploy.export import exporter
    from cheers_deploy.export.specs import graph_specs

    lm = model.model.language_model
    lm.set_rope_cache(True)
    if prefill_cache:
        model.backbone(*_lm_inputs(cfg))
        assert lm._rope_tables
    spec = graph_specs(cfg, 64, 2, 64)["backbone"]
    path = tmp_path / "backbone.onnx"
    exporter._trace(spec, model, path, 18)
    assert model.options()["attn_impl"] == "sdpa"
    proto = onnx.load(str(path))
    consumers = [n for n in proto.graph.node if "attention_mask" in n.input]
    assert consumers and all(n.op_type == "Where" for n in consumers)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    args = spec.sample_inputs(batch=1, seed=4, seq=3, past=5)
    outs = sess.run(None, {n: a.numpy() for n, a in zip(spec.input_names, args)})
    ref = spec.wrapper(model)(*args)
    for o, r in zip(outs, ref):
        assert np.abs(o - r.numpy()).max() <= 1e-4 * max(1.0, float(r.abs().max()))


def test_exporter_traces_the_cfm_head_with_a_cached_rope(model, cfg, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from cheers_deploy.export import exporter
    from cheers_deploy.export.specs import graph_specs

    model.set_options(rope_cache=True)
    _run_heads(model, cfg)
    assert model.model.gen_projector._rope_tables and model.model.hi_projector._rope_tables
    spec = graph_specs(cfg, 64, 2, 64)["cfm_head"]
    path = tmp_path / "cfm_head.onnx"
    exporter._trace(spec, model, path, 18)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    args = spec.sample_inputs(batch=1, seed=6)
    (out,) = sess.run(None, {n: a.numpy() for n, a in zip(spec.input_names, args)})
    ref = model.cfm_head(*args).numpy()
    assert np.abs(out - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))
