"""The ONNX Runtime backend: end-to-end parity with the torch pipeline, batched CFG and cache handling at the
backend level (against separate passes and against recomputation), running without torch, and clear errors
for broken workdirs."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from cheers_deploy.errors import CheckpointError, InputError  # noqa: E402
from cheers_deploy.runtime.masks import prefill_mask  # noqa: E402
from cheers_deploy.runtime.ort_backend import OrtBackend, tensorrt_profile_options  # noqa: E402
from cheers_deploy.runtime.pipeline import Pipeline  # noqa: E402

from helpers import export_tiny  # noqa: E402  (tests/ is on sys.path: pytest rootdir-less import)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_workdir(tiny_ckpt, tmp_path_factory) -> Path:
    return export_tiny(tiny_ckpt, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def torch_pipe(tiny_ckpt):
    return Pipeline.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="session")
def ort_pipe(tiny_workdir):
    return Pipeline.from_workdir(tiny_workdir)


@pytest.fixture(scope="session")
def backend(tiny_workdir):
    return OrtBackend(tiny_workdir)


def _image(seed=3, shape=(80, 64, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _close(a, b, tol=1e-4):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max()) <= tol * max(float(np.abs(b).max()), 1e-6)


# ---------------------------------------------------------------------------------------------------- end to end

def test_answer_and_chat_token_ids_match_torch(torch_pipe, ort_pipe):
    img = _image()
    a_t = torch_pipe.answer(img, "Which shapes do you see?", max_new_tokens=12)
    a_o = ort_pipe.answer(img, "Which shapes do you see?", max_new_tokens=12)
    assert a_o.token_ids == a_t.token_ids and len(a_t.token_ids) >= 12
    c_t = torch_pipe.chat("Describe a blue square.", max_new_tokens=12, seed=5)
    c_o = ort_pipe.chat("Describe a blue square.", max_new_tokens=12, seed=5)
    assert c_o.token_ids == c_t.token_ids and c_o.text == c_t.text


def test_generate_matches_torch(torch_pipe, ort_pipe):
    rng = np.random.default_rng(11)
    noise = rng.standard_normal((128, 4, 4), dtype=np.float32)
    dummy = _image(7, (256, 256, 3))
    kw = dict(steps=3, cfg_scale=3.0, alpha=0.6, noise=noise, dummy_image=dummy, max_new_tokens=3)
    g_t = torch_pipe.generate("A green triangle next to a blue square.", **kw)
    g_o = ort_pipe.generate("A green triangle next to a blue square.", **kw)
    assert g_o.token_ids == g_t.token_ids and g_o.token_ids[0] == 151668          # forced <im_end>
    assert np.abs(g_o.image.astype(int) - g_t.image.astype(int)).max() <= 2      # within 2/255
    assert _close(g_o.latent, g_t.latent, 1e-4)
    e_t = torch_pipe.edit(_image(9), "make it red", steps=3, cfg_scale=2.0, noise=noise, max_new_tokens=2)
    e_o = ort_pipe.edit(_image(9), "make it red", steps=3, cfg_scale=2.0, noise=noise, max_new_tokens=2)
    assert e_o.token_ids == e_t.token_ids
    assert np.abs(e_o.image.astype(int) - e_t.image.astype(int)).max() <= 2


def test_cache_sizing_modes_agree(tiny_workdir, ort_pipe):
    """A buffer of max_context (fixed shapes, for device EPs) and one sized to the request give the same run."""
    full = Pipeline.from_workdir(tiny_workdir, cache_len="max_context")
    assert full.backend.cache_len == "max_context" and ort_pipe.backend.cache_len == "request"
    a = full.generate("a red circle", steps=2, cfg_scale=2.0, max_new_tokens=2, seed=1)
    b = ort_pipe.generate("a red circle", steps=2, cfg_scale=2.0, max_new_tokens=2, seed=1)
    assert a.token_ids == b.token_ids and _close(a.latent, b.latent, 1e-5)


def test_io_binding_path_matches_plain_run(tiny_workdir, ort_pipe):
    bound = Pipeline.from_workdir(tiny_workdir, io_binding=True)
    assert all(r.io_binding for r in bound.backend.runners.values())
    a = bound.chat("hello", max_new_tokens=4)
    b = ort_pipe.chat("hello", max_new_tokens=4)
    assert a.token_ids == b.token_ids


def test_too_long_prompt_is_rejected(tiny_workdir):
    pipe = Pipeline.from_workdir(tiny_workdir)
    pipe.backend.max_context = 24                      # as if exported with --max-context 24
    with pytest.raises(InputError, match="context"):
        pipe.chat("a prompt that is clearly longer than twenty four positions " * 3, max_new_tokens=2)


# ---------------------------------------------------------------------------------------------------- backend level

def test_batched_cfg_equals_two_passes(backend):
    """Prefill + image step + velocity with B = 2 (cond, uncond) equals two B = 1 passes."""
    rng = np.random.default_rng(0)
    s, m = 9, 4
    embeds = rng.standard_normal((2, s, 64), dtype=np.float32)
    tokens = rng.standard_normal((1, m, 64), dtype=np.float32)
    pe = rng.standard_normal((1, 4 * m, 64), dtype=np.float32)
    t = np.float32(0.3)
    mask = prefill_mask(np.zeros(s, bool))
    cache2 = backend.new_cache(2, 32)
    backend.backbone(cache2, embeds, 0, mask, "prefill")
    hs2, _ = backend.backbone(cache2, backend.repeat_batch(tokens, 2), s, None, "image_step")
    v2 = backend.cfm_head(hs2, backend.repeat_batch(pe, 2), np.full(2, t))
    for b in range(2):
        c1 = backend.new_cache(1, 32)
        backend.backbone(c1, embeds[b:b + 1], 0, mask, "prefill")
        hs1, _ = backend.backbone(c1, tokens, s, None, "image_step")
        v1 = backend.cfm_head(hs1, pe, np.full(1, t))
        assert _close(hs2[b], hs1[0], 1e-5) and _close(v2[b], v1[0], 1e-5)
        for i in range(backend.num_layers):
            assert _close(cache2.k[i][b, :, :s + m], c1.k[i][0, :, :s + m], 1e-5)


def test_cache_equals_recomputation(backend):
    """Prefill, then an image block rewritten at the same slots (two Euler steps), then a decode step that
    sees the image: equals one backbone call over the whole sequence with the equivalent mask."""
    rng = np.random.default_rng(1)
    s, m = 7, 4
    prefix = rng.standard_normal((1, s, 64), dtype=np.float32)
    img_a = rng.standard_normal((1, m, 64), dtype=np.float32)        # step 1 (discarded by step 2)
    img_b = rng.standard_normal((1, m, 64), dtype=np.float32)
    last = rng.standard_normal((1, 1, 64), dtype=np.float32)
    cache = backend.new_cache(1, 64)
    backend.backbone(cache, prefix, 0, prefill_mask(np.zeros(s, bool)), "prefill")
    backend.backbone(cache, img_a, s, None, "image_step")
    h_img, none = backend.backbone(cache, img_b, s, None, "image_step")   # rewrites slots s..s+m-1
    assert none is None                                                # image steps return no logits
    h_last, logits = backend.backbone(cache, last, s + m, None, "decode")
    # recomputation: causal prefix, image block bidirectional over prefix + itself, last token sees all
    n = s + m + 1
    full_mask = np.tril(np.ones((n, n), bool))
    full_mask[s:s + m, s:s + m] = True
    fresh = backend.new_cache(1, 64)
    h_all, logits_all = backend.backbone(fresh, np.concatenate([prefix, img_b, last], 1), 0, full_mask, "prefill")
    assert _close(h_img, h_all[:, s:s + m], 1e-5)
    assert _close(h_last, h_all[:, -1:], 1e-5)
    assert logits.shape == (1, backend.embed_table.shape[0])
    assert _close(logits, logits_all, 1e-5)                            # the last position's logits agree too
    assert _close(logits, h_last[:, -1] @ np.asarray(backend.embed_table).T, 1e-4)   # = tied lm_head on the host
    for i in range(backend.num_layers):
        assert _close(cache.k[i][:, :, :n], fresh.k[i][:, :, :n], 1e-5)
        assert _close(cache.v[i][:, :, :n], fresh.v[i][:, :, :n], 1e-5)


def test_decode_steps_equal_one_prefill(backend, torch_pipe):
    """Token-by-token decoding through the static cache equals a causal prefill over the same tokens, and the
    torch reference backend agrees."""
    rng = np.random.default_rng(2)
    e = rng.standard_normal((1, 10, 64), dtype=np.float32)
    cache = backend.new_cache(1, 16)
    backend.backbone(cache, e[:, :6], 0, prefill_mask(np.zeros(6, bool)), "prefill")
    steps = [backend.backbone(cache, e[:, j:j + 1], j, None, "decode")[0] for j in range(6, 10)]
    whole, _ = backend.backbone(backend.new_cache(1, 16), e, 0, prefill_mask(np.zeros(10, bool)), "prefill")
    assert _close(np.concatenate(steps, 1), whole[:, 6:], 1e-5)
    tb = torch_pipe.backend
    tc = tb.new_cache(1, 16)
    ref = tb.to_numpy(tb.backbone(tc, tb.from_numpy(e), 0, prefill_mask(np.zeros(10, bool)), "prefill")[0])
    assert _close(whole, ref, 1e-4)


def test_new_cache_beyond_context_and_overflow(backend):
    with pytest.raises(InputError, match="context"):
        backend.new_cache(1, backend.max_context + 1)
    cache = backend.new_cache(1, 8)
    with pytest.raises(InputError, match="overflow"):
        backend.backbone(cache, np.zeros((1, 4, 64), np.float32), cache.max_len - 2, None, "image_step")


def test_tensorrt_profile_options(backend):
    opts = tensorrt_profile_options(backend.manifest.graph("backbone"))
    mins = opts["trt_profile_min_shapes"].split(",")
    n = backend.max_context
    assert f"past_key_values.0.key:1x2x{n}x16" in mins
    assert sum(x.startswith("inputs_embeds:") for x in mins) == 3        # prefill, decode, image step


# ---------------------------------------------------------------------------------------------------- no torch

def test_ort_backend_runs_without_torch(tiny_workdir, ort_pipe):
    code = f"""
        import sys; sys.modules['torch'] = None
        import numpy as np
        from cheers_deploy.runtime.pipeline import Pipeline
        import cheers_deploy.runtime.ort_backend, cheers_deploy.runtime.workdir, cheers_deploy.manifest
        p = Pipeline.from_workdir({str(tiny_workdir)!r})
        c = p.chat("hello there", max_new_tokens=4)
        g = p.generate("a red circle", steps=2, cfg_scale=2.0, max_new_tokens=1, seed=3)
        assert sys.modules['torch'] is None
        print("IDS", c.token_ids, g.token_ids, g.image.shape)
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    c = ort_pipe.chat("hello there", max_new_tokens=4)
    g = ort_pipe.generate("a red circle", steps=2, cfg_scale=2.0, max_new_tokens=1, seed=3)
    assert f"IDS {c.token_ids} {g.token_ids} (64, 64, 3)" in proc.stdout


# ---------------------------------------------------------------------------------------------------- broken workdirs

def _shadow(src: Path, dst: Path) -> Path:
    """A workdir whose small files are copies and whose graphs/tables are hard links (cheap to break; a symlink out
    of the workdir would be refused)."""
    dst.mkdir()
    for p in src.iterdir():
        if p.suffix in (".onnx", ".data", ".npy"):
            os.link(p, dst / p.name)
        elif p.is_file():
            shutil.copy(p, dst / p.name)
    return dst


def _edit_manifest(wd: Path, fn):
    data = json.loads((wd / "manifest.json").read_text())
    fn(data)
    (wd / "manifest.json").write_text(json.dumps(data))


def test_missing_graph_is_one_clear_error(tiny_workdir, tmp_path):
    wd = _shadow(tiny_workdir, tmp_path / "wd")
    (wd / "cfm_head.onnx").unlink()
    with pytest.raises(CheckpointError, match=r"graph 'cfm_head' is missing its file cfm_head\.onnx"):
        Pipeline.from_workdir(wd)
    with pytest.raises(CheckpointError, match="no manifest.json"):
        Pipeline.from_workdir(tmp_path)


def test_mismatched_names_and_dims_are_clear_errors(tiny_workdir, tmp_path):
    wd = _shadow(tiny_workdir, tmp_path / "wd")

    def rename(d):
        d["graphs"]["backbone"]["inputs"][1]["name"] = "positions"
    _edit_manifest(wd, rename)
    with pytest.raises(CheckpointError, match=r"graph 'backbone' lacks input tensor 'positions'.*'position_ids'"):
        Pipeline.from_workdir(wd)

    wd2 = _shadow(tiny_workdir, tmp_path / "wd2")
    _edit_manifest(wd2, lambda d: d["graphs"]["vision_tokenizer"]["outputs"][0]["shape"].__setitem__(1, 5))
    with pytest.raises(CheckpointError, match=r"graph 'vision_tokenizer' output 'semantic_tokens' has size 4"):
        Pipeline.from_workdir(wd2)

    wd3 = _shadow(tiny_workdir, tmp_path / "wd3")                 # a graph file swapped for another
    (wd3 / "vae_encoder.onnx").unlink()
    os.link(tiny_workdir / "vae_decoder.onnx", wd3 / "vae_encoder.onnx")
    with pytest.raises(CheckpointError, match=r"graph 'vae_encoder' lacks input tensor 'pixels'"):
        Pipeline.from_workdir(wd3)


def test_unknown_backend_and_provider(tiny_workdir):
    from cheers_deploy.errors import MissingDependencyError

    with pytest.raises(InputError, match="unknown backend"):
        Pipeline.from_workdir(tiny_workdir, backend="tvm")
    with pytest.raises(MissingDependencyError, match="NoSuchExecutionProvider"):
        Pipeline.from_workdir(tiny_workdir, providers=["NoSuchExecutionProvider"])


# ---------------------------------------------------------------------------------------------------- benchmark

def test_torch_vs_ort_benchmark_smoke(tiny_ckpt, tiny_workdir):
    from cheers_deploy.export.compare import torch_vs_ort

    r = torch_vs_ort(tiny_ckpt, tiny_workdir, steps=2, runs=1, warmup=0, quiet=True)
    for k in ("torch", "ort"):
        assert r[k]["per_image_s"] > 0 and r[k]["per_step_s"] > 0
    assert r["speedup_per_image"] > 0


def test_threads_do_not_spin_by_default(tiny_workdir):
    """Idle intra-op threads sleep unless asked to spin (docs/performance.md, threads on a busy machine)."""
    from cheers_deploy.runtime.ort_backend import OrtBackend

    key = "session.intra_op.allow_spinning"
    quiet = OrtBackend(tiny_workdir, threads=1, graphs=("vae_decoder",))
    spin = OrtBackend(tiny_workdir, threads=1, graphs=("vae_decoder",), spin=True)
    assert quiet.runners["vae_decoder"].session.get_session_options().get_session_config_entry(key) == "0"
    assert spin.runners["vae_decoder"].session.get_session_options().get_session_config_entry(key) == "1"
    assert quiet.threads == 1 and quiet.runners["vae_decoder"].session.get_session_options().intra_op_num_threads == 1
