"""The torch backend's GPU fast path (TorchBackend static_cache / cuda_graphs / compile / split_batch) computes the
reference maths: on the CPU, every option combination that runs there gives the official greedy ids and the eager
float32 latents within 1e-5 (the parity bars of tests/test_reference_parity.py still hold); the static-cache
attention is the concatenating one bit for bit where it attends the same slots; the options are refused with a
clear message where they cannot run. The CUDA parts (graph capture and replay, no device sync in the Euler loop,
compile inside the graphs) are `-m gpu` (bench/run_gpu_checks.sh runs them)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cheers_deploy.errors import InputError  # noqa: E402
from cheers_deploy.runtime.masks import prefill_mask  # noqa: E402
from cheers_deploy.runtime.observer import PipelineObserver  # noqa: E402
from cheers_deploy.runtime.pipeline import Pipeline  # noqa: E402
from cheers_deploy.runtime.torch_backend import TorchBackend, check_fast_path  # noqa: E402

I2T_QUESTION = " Which shapes and colours do you see?"          # the official runs of test_reference_parity.py
T2T_PROMPT = "Describe a blue square in one sentence."
T2I_PROMPT = "A green triangle next to a blue square."
STEPS, CFG, ALPHA = 8, 3.0, 0.6
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def pipeline_with(pipe, **options) -> Pipeline:
    """The same model, tokenizer and processor behind a backend with other options."""
    be = TorchBackend(pipe.backend.model, device=str(pipe.backend.device), **options)
    return Pipeline(be, pipe.tokenizer, pipe.processor, pipe.config, generation=pipe.generation, timings=False)


def official_runs(pipe, reference, modes=("i2t", "t2t", "t2i")):
    """The official runs (i2t, t2t, t2i) -> {mode: (token ids, logits rows sampled from, latent, image)}."""
    R, out = reference, {}

    class Logits(PipelineObserver):
        def __init__(self):
            self.rows = []

        def on_token(self, index, token_id, logits):
            self.rows.append(np.array(logits, np.float32))

    for mode in modes:
        obs = Logits()
        if mode == "i2t":
            res = pipe.answer(R["inputs/test_image_uint8"], I2T_QUESTION, max_new_tokens=16, observer=obs)
        elif mode == "t2t":
            res = pipe.chat(T2T_PROMPT, max_new_tokens=16, dummy_image=R["inputs/dummy_image_uint8"], observer=obs)
        else:
            res = pipe.generate(T2I_PROMPT, steps=STEPS, cfg_scale=CFG, alpha=ALPHA, noise=R["t2i/initial_noise"][0],
                                dummy_image=R["inputs/dummy_image_uint8"], max_new_tokens=4, observer=obs)
        out[mode] = (res.token_ids, np.stack(obs.rows), getattr(res, "latent", None), getattr(res, "image", None))
    return out


@pytest.fixture(scope="module")
def eager(ref_pipeline, reference):
    return official_runs(ref_pipeline, reference)


# every combination that runs on a CPU: static cache x RoPE tables on the device x compile (dynamo, eager backend:
# the inductor one is the slow test below), and the CFG rows one at a time
COMBOS = [dict(static_cache=True), dict(rope_cache=False, split_batch=True), dict(static_cache=True, rope_cache=False),
          dict(compile="default", _compile_backend="eager"),
          dict(compile="default", _compile_backend="eager", rope_cache=False, split_batch=True)]


@pytest.mark.parametrize("options", COMBOS, ids=lambda o: "+".join(f"{k}={v}" for k, v in o.items() if k[0] != "_"))
def test_option_combinations_keep_the_ids_and_the_eager_latents(ref_pipeline, reference, eager, options):
    options = dict(options)
    rope = options.pop("rope_cache", True)
    model = ref_pipeline.backend.model
    try:
        model.set_options(rope_cache=rope)
        got = official_runs(pipeline_with(ref_pipeline, **options), reference, ("i2t", "t2i"))   # t2t: i2t's path
    finally:
        model.set_options(rope_cache=True)
    for mode, (ids, logits, latent, image) in got.items():
        assert ids == reference[f"{mode}/generated_ids"][0].tolist() == eager[mode][0], mode   # the parity bar
        assert logits.shape == eager[mode][1].shape and rel(logits, eager[mode][1]) <= 1e-5, mode
    latent, image = got["t2i"][2], got["t2i"][3]
    assert rel(latent, eager["t2i"][2]) <= 1e-5
    assert np.abs(latent - reference["t2i/final_latent"][0]).max() <= 1e-2      # test_t2i_final_latent's bar
    assert np.abs(image.astype(int) - eager["t2i"][3].astype(int)).max() <= 1   # uint8 rounding at most


@pytest.fixture(scope="module")
def lm():
    from cheers_deploy.testing import random_model, tiny_config

    return random_model(tiny_config(vocab_size=512), seed=21).eval()


def _static(lm, b, t):
    from cheers_deploy.model.qwen2 import StaticKV

    c = lm.config.text_config
    shape = (b, c.num_key_value_heads, t, c.head_dim)
    ks = [torch.zeros(shape) for _ in range(c.num_hidden_layers)]
    vs = [torch.zeros(shape) for _ in range(c.num_hidden_layers)]
    return ks, vs, StaticKV


def test_static_cache_attention_is_the_concatenating_one(lm):
    """Prefill and an image step over the first start+S slots: bit for bit the torch.cat path; a decode step over the
    whole buffer with the unused slots masked: within 1e-6 (longer rows, another summation order)."""
    g = torch.Generator().manual_seed(0)
    b, p, m, t, d = 2, 7, 4, 32, lm.config.text_config.hidden_size
    ks, vs, StaticKV = _static(lm, b, t)
    pre, img, tok = (torch.randn(b, n, d, generator=g) for n in (p, m, 1))
    mask = torch.from_numpy(prefill_mask(np.zeros(p, bool)))[None, None]
    h_ref, past = lm.backbone(pre, torch.arange(p)[None].expand(b, p), mask)
    h = lm.backbone(pre, torch.arange(p)[None].expand(b, p), mask, static=StaticKV(ks, vs, torch.arange(p), p))[0]
    assert torch.equal(h, h_ref)
    for layer, (k, v) in enumerate(past):
        assert torch.equal(ks[layer][:, :, :p], k) and torch.equal(vs[layer][:, :, :p], v)
        assert not ks[layer][:, :, p:].any()
    pos = torch.arange(p, p + m)
    h_ref, new = lm.backbone(img, pos[None].expand(b, m), None, past)
    h = lm.backbone(img, pos[None].expand(b, m), None, static=StaticKV(ks, vs, pos, p + m))[0]
    assert torch.equal(h, h_ref)
    past = [(torch.cat([pk, k], 2), torch.cat([pv, v], 2)) for (pk, pv), (k, v) in zip(past, new)]
    slot = torch.tensor([p + m])
    h_ref = lm.backbone(tok, slot[None].expand(b, 1), None, past)[0]
    full_mask = (torch.arange(t) <= slot[-1]).view(1, 1, 1, t)
    ptrs = [k.data_ptr() for k in ks]
    h = lm.backbone(tok, slot[None].expand(b, 1), full_mask, static=StaticKV(ks, vs, slot, None))[0]
    assert rel(h, h_ref) <= 1e-6
    assert [k.data_ptr() for k in ks] == ptrs                 # written in place, never reallocated
    with pytest.raises(ValueError, match="either past"):
        lm.backbone(tok, slot[None].expand(b, 1), None, past, static=StaticKV(ks, vs, slot, None))


def test_decode_steps_attend_over_a_fixed_shape(lm, monkeypatch):
    """With the static cache every one-token decode sees keys of the cache's full length (what CUDA graphs and
    compile need); the concatenating path's keys grow by one per token."""
    from cheers_deploy.model import layers

    seen = []
    impl = layers.ATTENTION_IMPLS["sdpa"]
    monkeypatch.setitem(layers.ATTENTION_IMPLS, "sdpa", lambda q, k, v, mask=None: (seen.append(k.shape[2]),
                                                                                    impl(q, k, v, mask))[1])
    lens = {}
    for static in (False, True):
        be = TorchBackend(lm, static_cache=static)
        cache = be.new_cache(1, 20)
        x = torch.randn(1, 9, lm.config.text_config.hidden_size, generator=torch.Generator().manual_seed(1))
        be.backbone(cache, x[:, :5], 0, prefill_mask(np.zeros(5, bool)), "prefill")
        seen.clear()
        for i in range(5, 9):
            be.backbone(cache, x[:, i:i + 1], i, None, "decode")
        lens[static] = sorted(set(seen))
    assert lens[True] == [20] and lens[False] == [6, 7, 8, 9]


def test_compiled_stages_reuse_the_cache_buffers_and_count_warmup(tiny_pipeline_module):
    pipe = pipeline_with(tiny_pipeline_module, compile="default", _compile_backend="eager")
    be, sigs = pipe.backend, []
    new_cache = be.new_cache
    be.new_cache = lambda b, n: (lambda c: (sigs.append((c.max_len, c.signature)), c)[1])(new_cache(b, n))
    out = pipe.generate("a red circle on the left", steps=2, seed=0)
    w = be.warmup_s
    assert w > 0 and be.static_cache
    again = pipe.generate("a red circle on the left", steps=2, seed=0)
    assert be.warmup_s == w                                    # compiled once per shape, not per request
    assert np.array_equal(out.latent, again.latent) and out.token_ids == again.token_ids
    assert sigs[0] == sigs[1] and sigs[0][0] % 64 == 0         # the same buffers, a bucketed length


@pytest.fixture(scope="module")
def tiny_pipeline_module():
    return Pipeline.from_pretrained(None, threads=2, timings=False)


# ---------------------------------------------------------------------------------------------------- refusals

def test_options_are_refused_where_they_cannot_run(tiny_pipeline_module):
    model = tiny_pipeline_module.backend.model
    with pytest.raises(InputError, match="CUDA device"):
        TorchBackend(model, device="cpu", cuda_graphs=True)
    with pytest.raises(InputError, match="compile must be"):
        TorchBackend(model, compile="fast")
    with pytest.raises(InputError, match="static_cache=True"):
        TorchBackend(model, compile="default", static_cache=False)
    with pytest.raises(InputError, match="records CUDA graphs itself"):
        check_fast_path("cuda", None, True, "reduce-overhead")
    assert check_fast_path("cuda", None, True, "default") is True and check_fast_path("cpu", None, False, None) is False
    with pytest.raises(InputError, match="CUDA device"):                   # before any weight is read
        Pipeline.from_pretrained("/nonexistent/checkpoint", cuda_graphs=True)


def test_cli_flags(capsys, tmp_path):
    from cheers_deploy import cli

    assert cli.main(["generate", "--prompt", "a red circle", "--out", str(tmp_path / "x.png"), "--cuda-graphs"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "CUDA" in err
    assert cli.main(["chat", "--workdir", str(tmp_path), "--prompt", "hi", "--compile", "default"]) == 2
    assert "torch backend options" in capsys.readouterr().err
    assert cli.main(["chat", "--prompt", "hi", "--compile", "fast"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_cli_compile_runs_on_the_torch_backend(monkeypatch):
    """--compile selects torch (not the bundled ONNX graphs) and turns the per-stage syncs off unless --timings."""
    from cheers_deploy.cli import build_parser
    from cheers_deploy.cli.common import load_pipeline

    calls = []
    monkeypatch.setattr(Pipeline, "from_pretrained", staticmethod(lambda *a, **kw: calls.append(kw)))
    for extra, timings in (([], False), (["--timings"], True)):
        args = build_parser().parse_args(["chat", "--prompt", "hi", "--compile", "default"] + extra)
        load_pipeline(args)
        assert calls[-1]["compile"] == "default" and calls[-1].get("timings", True) is timings


# ---------------------------------------------------------------------------------------------------- slow: inductor

@pytest.mark.slow
def test_inductor_compile_on_cpu_and_its_disk_cache(tmp_path):
    """The real inductor backend (~100 s on 2 cores): same ids, latents within 1e-5; a second process with the same
    TORCHINDUCTOR_CACHE_DIR warms up several times faster."""
    code = ("import json, numpy as np, torch; from cheers_deploy.runtime.pipeline import Pipeline;"
            "from cheers_deploy.runtime.torch_backend import TorchBackend;"
            "p = Pipeline.from_pretrained(None, threads=2, timings=False);"
            "ref = p.generate('a red circle on the left', steps=3, seed=0);"
            "q = Pipeline(TorchBackend(p.backend.model, compile='default'), p.tokenizer, p.processor, p.config,"
            " generation=p.generation, timings=False);"
            "out = q.generate('a red circle on the left', steps=3, seed=0);"
            "print(json.dumps({'warmup_s': q.backend.warmup_s, 'ids': out.token_ids == ref.token_ids,"
            " 'rel': float(np.abs(out.latent - ref.latent).max() / np.abs(ref.latent).max())}))")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    res = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]
        res.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert all(r["ids"] and r["rel"] <= 1e-5 for r in res), res
    assert res[1]["warmup_s"] < res[0]["warmup_s"] / 3, res


# ---------------------------------------------------------------------------------------------------- GPU

def _gpu_pipeline(**options):
    pipe = Pipeline.from_pretrained(None, device="cuda", timings=False)
    return pipe if not options else pipeline_with(pipe, **options)


class _NoSyncBetweenSteps(PipelineObserver):
    """Turns torch's sync debug mode to 'error' from the end of Euler step 1 to the end of the last step: any device
    synchronisation inside steps 2..N (a host copy, .item(), a pageable upload) raises."""

    def on_step(self, step, num_steps, t, latent):
        torch.cuda.set_sync_debug_mode("error" if step < num_steps else "default")


@pytest.mark.gpu
@needs_cuda
def test_cuda_graphs_replay_the_eager_results_without_syncs():
    eager = _gpu_pipeline()
    ref = eager.generate("a red circle on the left", steps=6, seed=0)
    ans = eager.answer(ref.image, "what color is the circle?", max_new_tokens=4)
    for options in (dict(static_cache=True), dict(cuda_graphs=True)):
        pipe = pipeline_with(eager, **options)
        try:
            out = pipe.generate("a red circle on the left", steps=6, seed=0, observer=_NoSyncBetweenSteps())
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert out.token_ids == ref.token_ids and rel(out.latent, ref.latent) <= 1e-4, options
        assert pipe.answer(ref.image, "what color is the circle?", max_new_tokens=4).token_ids == ans.token_ids
        be = pipe.backend
        if be.cuda_graphs:
            assert be.captures >= 4 and be.replays > be.captures
            n = be.captures
            again = pipe.generate("a red circle on the left", steps=6, seed=0)
            assert be.captures == n, "a second request must replay the graphs (same cache buffers)"
            assert np.array_equal(again.latent, out.latent)
            eager.backend.model.set_options(fused_gate=True)        # an option change recaptures
            try:
                fused = pipe.generate("a red circle on the left", steps=6, seed=0)
                assert be.captures > n and rel(fused.latent, ref.latent) <= 1e-4      # the Triton gate, fp32
            finally:
                eager.backend.model.set_options(fused_gate=False)


@pytest.mark.gpu
@needs_cuda
def test_compile_inside_cuda_graphs_matches_eager():
    eager = _gpu_pipeline()
    ref = eager.generate("a red circle on the left", steps=4, seed=0)
    pipe = pipeline_with(eager, cuda_graphs=True, compile="default")
    out = pipe.generate("a red circle on the left", steps=4, seed=0)
    assert out.token_ids == ref.token_ids and rel(out.latent, ref.latent) <= 1e-3
    assert pipe.backend.warmup_s > 0 and pipe.backend.captures > 0
