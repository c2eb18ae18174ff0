"""The TensorRT layer: engine paths, compatibility refusal, profiles from the manifest, `cheers-deploy build`
errors, and the build -> TrtBackend -> pipeline path.

* Tests marked `trt` need TensorRT (+ Polygraphy, cuda-python and a CUDA GPU): they skip with the reason when it
  is absent and run when it is present (`pytest.importorskip("tensorrt")`).
* Everything else runs here. The build orchestration and the backend's bookkeeping (a context per profile, the
  profile picked by the pipeline's mode, shared activation arena, device KV cache written by position and bound
  in place, stage outputs copied out for the caller, CUDA-graph capture/replay) also run end to end against
  `FakeTrt` + `FakePolygraphy` (tests/fakes/trt.py: engines that execute the exported graphs with ONNX Runtime,
  reading and writing the bound addresses) on `FakeCudart` host memory (tests/fakes/cuda.py), and must equal the
  ort backend.

One file (over 400 lines): the TensorRT layer end to end (paths, build, load, run) against one set of fakes
(tests/fakes/trt.py) and, where present, the real TensorRT.
"""
import copy
import functools
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from cheers_deploy import cli
from cheers_deploy.trt import layout as tl
from cheers_deploy import constants as C
from cheers_deploy.trt import plugin as trt_plugin
from cheers_deploy.build import engines as eb
from cheers_deploy.trt import compat
from cheers_deploy.errors import CheckpointError, CheersError, InputError, MissingDependencyError
from cheers_deploy.export.specs import graph_specs, past_name, present_name
from cheers_deploy.manifest import Manifest, PrecisionVariant

from fakes import trt as fake_trt  # noqa: E402  (tests/ is on sys.path)
from fakes.trt import FakeContext, FakePolygraphy, FakeTrt  # noqa: E402
from helpers import export_tiny  # noqa: E402

IDENT = fake_trt.identity()          # {"tensorrt": "10.3.0.30", "gpu": "Fake Orin", "compute_capability": "8.7"}


# =====================================================================================================================
# helpers: a minimal exported-looking workdir (no torch) and the real tiny export
# =====================================================================================================================
def _fake_workdir(tmp_path, tiny_config, files=True) -> Path:
    """manifest.json written from the GraphSpecs (what export_all writes, minus provenance) + empty graph files;
    the JSON must load as a typed Manifest."""
    wd = tmp_path / "wd"
    wd.mkdir()
    specs = graph_specs(tiny_config, 64, batch_max=2, max_context=128)
    spec = next(iter(specs.values()))
    t = tiny_config.text_config
    graphs = {n: dict(s.to_manifest(), file=f"{n}.onnx", external_data=None) for n, s in specs.items()}
    man = {"format": "cheers-deploy-manifest/1", "precision": "fp32", "graphs": graphs, "max_context": 128,
           "batch_max": 2, "config": tiny_config.to_dict(),
           "image": {"resolution": 64, "patch_size": tiny_config.vision_representation_config.patch_size,
                     "latent_grid": spec.grid, "latent_channels": tiny_config.latent_channels,
                     "tokens_per_image": spec.tokens_per_image},
           "cache": {"layout": C.CACHE_LAYOUT, "num_layers": t.num_hidden_layers,
                     "num_kv_heads": t.num_key_value_heads, "head_dim": t.head_dim,
                     "past_key": past_name("{i}", "key"), "past_value": past_name("{i}", "value"),
                     "present_key": present_name("{i}", "key"), "present_value": present_name("{i}", "value"),
                     "max_context": 128}}
    (wd / "manifest.json").write_text(json.dumps(man))
    assert Manifest.load(wd).image.tokens_per_image == 4
    if files:
        for n in graphs:
            (wd / f"{n}.onnx").write_bytes(b"")
    return wd


@pytest.fixture(scope="module")
def tiny_workdir(tiny_ckpt, tmp_path_factory):
    pytest.importorskip("torch")
    return export_tiny(tiny_ckpt, tmp_path_factory.getbasetemp())


def _linked_copy(src: Path, dst: Path) -> Path:
    """A private workdir that shares the (read-only) graph files: engines written into it stay private. Hard links,
    not symlinks: a workdir's files must lie inside it (a link out of the folder is refused, docs/security.md)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            if f.name == "manifest.json":
                shutil.copy2(f, dst / f.name)
            else:
                os.link(f, dst / f.name)
    return dst


# =====================================================================================================================
# engine path keying
# =====================================================================================================================
def test_engine_paths_are_keyed_by_precision_version_and_arch(tmp_path):
    d = tl.engine_dir(tmp_path, "fp16", "10.3.0.30", "8.7")
    assert d == tmp_path / "engines" / "fp16" / "trt10.3.0.30" / "sm87"
    assert tl.plan_path(tmp_path, "int8", "10.13.3.9", "11.0", "backbone") == \
        tmp_path / "engines" / "int8" / "trt10.13.3.9" / "sm110" / "backbone.plan"
    assert tl.version_key("10.13.0.35+cuda13") == "trt10.13.0.35_cuda13"
    assert C.sm_key("8.9") == "sm89" and C.sm_key("12.1") == "sm121"
    with pytest.raises(InputError):
        C.sm_key("87")
    with pytest.raises(InputError, match="--precision"):
        tl.engine_dir(tmp_path, "fp8", "10.3", "8.7")


def test_version_helpers():
    assert compat.version_tuple("10.3.0.30") == (10, 3, 0, 30)
    assert compat.version_tuple("11.0.0a1") == (11, 0, 0)
    assert compat.trt_major("10.13.3.9") == 10


# =====================================================================================================================
# compatibility refusal (fake identities)
# =====================================================================================================================
def _em(**kw) -> tl.EngineManifest:
    em = {"format": C.ENGINE_FORMAT, "precision": "fp16", "tensorrt": "10.3.0.30",
          "gpu": {"name": "Fake Orin", "compute_capability": "8.7"}, "engines": {}}
    em.update(kw)
    return tl.EngineManifest.from_dict(em, "test engine manifest")


def test_compat_same_machine_is_fine():
    assert tl.compat_differences(_em(), IDENT) == []
    tl.check_engine_compat(_em(), IDENT)


@pytest.mark.parametrize("runtime,needle", [
    (dict(IDENT, tensorrt="10.13.3.9"), "TensorRT 10.3.0.30 (this machine runs TensorRT 10.13.3.9"),
    (dict(IDENT, compute_capability="11.0", gpu="NVIDIA Thor"), "compute capability 8.7 (Fake Orin) (this GPU: 11.0"),
    (dict(IDENT, gpu="Other Orin"), "GPU 'Fake Orin' (this GPU: 'Other Orin'"),
])
def test_compat_refuses_naming_what_differs(runtime, needle):
    with pytest.raises(CheckpointError) as exc:
        tl.check_engine_compat(_em(), runtime, workdir="W", precision="fp16")
    msg = str(exc.value)
    assert needle in msg and "cheers-deploy build --workdir W --precision fp16" in msg and "\n" not in msg


def test_compat_lists_every_difference_and_allows_same_arch_other_model():
    diffs = tl.compat_differences(_em(), {"tensorrt": "11.0.0", "gpu": "B", "compute_capability": "9.0"})
    assert len(diffs) == 2
    assert tl.compat_differences(_em(), dict(IDENT, gpu="Other Orin"), allow_other_gpu=True) == []


def test_find_engine_dir(tmp_path):
    with pytest.raises(CheckpointError, match="has no fp16 TensorRT engines: build them"):
        tl.find_engine_dir(tmp_path, "fp16", IDENT)
    other = tl.engine_dir(tmp_path, "fp16", "10.13.3.9", "11.0")
    other.mkdir(parents=True)
    tl.write_engine_manifest(other, _em(tensorrt="10.13.3.9", gpu={"name": "Thor", "compute_capability": "11.0"}))
    with pytest.raises(CheckpointError) as exc:
        tl.find_engine_dir(tmp_path, "fp16", IDENT)
    assert "TensorRT 10.13.3.9" in str(exc.value) and "compute capability 11.0 (Thor)" in str(exc.value)
    mine = tl.engine_dir(tmp_path, "fp16", IDENT["tensorrt"], IDENT["compute_capability"])
    mine.mkdir(parents=True)
    tl.write_engine_manifest(mine, _em(gpu={"name": "Another Orin", "compute_capability": "8.7"}))
    with pytest.raises(CheckpointError, match="GPU 'Another Orin'"):
        tl.find_engine_dir(tmp_path, "fp16", IDENT)
    assert tl.find_engine_dir(tmp_path, "fp16", IDENT, allow_other_gpu=True) == mine
    (mine / C.ENGINE_MANIFEST).write_text("{}")
    with pytest.raises(CheckpointError, match="engine manifest format"):
        tl.find_engine_dir(tmp_path, "fp16", IDENT)


# =====================================================================================================================
# profiles and sources from the manifest
# =====================================================================================================================
def test_profiles_derived_from_the_manifest(tmp_path, tiny_config):
    wd = _fake_workdir(tmp_path, tiny_config)
    man = Manifest.load(wd)
    bb = eb.profiles_for(man.graph("backbone"), "backbone")
    assert [m for m, _ in bb] == ["prefill", "decode", "image_step"]
    n, m = 128, 4                                                   # max_context, tokens per image
    prefill, decode, image = (dict(p) for _, p in bb)
    assert prefill["inputs_embeds"] == ((1, 1, 64), (1, m + 64, 64), (2, n - 1, 64))
    assert decode["attention_mask"] == ((1, 1, 1, n + 1), (2, 1, 1, n + 1), (2, 1, 1, n + 1))
    assert image["position_ids"] == ((1, m), (2, m), (2, m))
    assert image["past_key_values.0.key"] == ((1, 2, n, 16), (2, 2, n, 16), (2, 2, n, 16))   # P pinned to n
    head = eb.profiles_for(man.graph("cfm_head"), "cfm_head")
    assert [m for m, _ in head] == ["default"] and head[0][1]["t"] == ((1,), (2,), (2,))

    broken = copy.deepcopy(man.graph("cfm_head"))
    del broken.profiles["default"]["t"]
    with pytest.raises(CheckpointError, match="no shapes for input 't'"):
        eb.profiles_for(broken, "cfm_head")
    broken = copy.deepcopy(man.graph("cfm_head"))
    broken.profiles["default"]["t"] = [[2], [1], [2]]
    with pytest.raises(CheckpointError, match="not ordered"):
        eb.profiles_for(broken, "cfm_head")
    broken = copy.deepcopy(man.graph("vae_decoder"))
    for k in range(3):
        broken.profiles["default"]["latent"][k][1] = 7                # a static dim (channels) changed
    with pytest.raises(CheckpointError, match="static"):
        eb.profiles_for(broken, "vae_decoder")


def test_graph_source_per_precision(tmp_path, tiny_config):
    wd = _fake_workdir(tmp_path, tiny_config)
    man = Manifest.load(wd)
    assert tl.graph_source(man, "backbone", "fp32") == (wd / "backbone.onnx", None)
    with pytest.raises(CheckpointError) as exc:
        tl.graph_source(man, "backbone", "fp16")
    assert "cheers-deploy calibrate convert" in str(exc.value) and "--precision fp16" in str(exc.value)
    assert "--precision fp32" in str(exc.value)                      # or build what exists
    with pytest.raises(CheckpointError) as exc:                         # int8 needs calibration data first
        tl.graph_source(man, "backbone", "int8")
    assert "cheers-deploy calibrate capture" in str(exc.value) and "calibrate quantize" in str(exc.value)
    man.graph("backbone").precisions = {"int8": PrecisionVariant("int8/backbone.onnx", None)}
    with pytest.raises(CheckpointError, match="missing backbone.onnx"):
        tl.graph_source(man, "backbone", "int8")
    (wd / "int8").mkdir()
    (wd / "int8" / "backbone.onnx").write_bytes(b"")
    assert tl.graph_source(man, "backbone", "int8") == (wd / "int8" / "backbone.onnx", None)


def test_parse_error_message_names_the_node():
    errs = [{"node": 12, "name": "/hi_gate/CheersGatedResidual", "op": "CheersGatedResidual",
             "desc": "Plugin not found, are the plugin name, version, and namespace correct?"},
            {"node": 13, "name": "x", "op": "Y", "desc": "z"}]
    msg = eb.describe_parse_errors(errs, Path("cfm_head.onnx"))
    assert "rejected node '/hi_gate/CheersGatedResidual' (op CheersGatedResidual) of cfm_head.onnx" in msg
    assert "--plugin-lib" in msg and "+1 more" in msg and "\n" not in msg
    assert "could not read" in eb.describe_parse_errors([], Path("a.onnx"))


# =====================================================================================================================
# `cheers-deploy build` errors (one line, exit code 2)
# =====================================================================================================================
def _build_cli(capsys, *argv):
    rc = cli.main(["build", *argv])
    err = capsys.readouterr().err.strip()
    return rc, err


def test_build_without_tensorrt_is_one_clear_line(tmp_path, tiny_config, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)             # `import tensorrt` raises ImportError
    wd = _fake_workdir(tmp_path, tiny_config)
    rc, err = _build_cli(capsys, "--workdir", str(wd), "--precision", "fp32")
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: TensorRT is not installed: ")
    with pytest.raises(MissingDependencyError, match="TensorRT is not installed"):
        compat.import_tensorrt()


def test_build_errors_before_tensorrt(tmp_path, tiny_config, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    wd = _fake_workdir(tmp_path, tiny_config)
    rc, err = _build_cli(capsys, "--workdir", str(wd), "--precision", "fp16")
    assert rc == 2 and len(err.splitlines()) == 1 and "cheers-deploy calibrate" in err
    rc, err = _build_cli(capsys, "--workdir", str(wd), "--precision", "fp32", "--plugin-lib", str(tmp_path / "no.so"))
    assert rc == 2 and "--plugin-lib" in err and "not found" in err
    rc, err = _build_cli(capsys, "--workdir", str(tmp_path / "missing"), "--precision", "fp32")
    assert rc == 2 and "workdir not found" in err
    rc, err = _build_cli(capsys, "--workdir", str(wd), "--precision", "fp32", "--graphs", "nope")
    assert rc == 2 and "nope" in err
    (wd / "vae_decoder.onnx").unlink()
    rc, err = _build_cli(capsys, "--workdir", str(wd), "--precision", "fp32")
    assert rc == 2 and "missing vae_decoder.onnx" in err


def test_build_script_is_the_same_command(tmp_path, tiny_config, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engines"))
    try:
        import build_engines
    finally:
        sys.path.pop(0)
    wd = _fake_workdir(tmp_path, tiny_config)
    assert build_engines.main(["--workdir", str(wd), "--precision", "fp32"]) == 2
    assert capsys.readouterr().err.startswith("error: TensorRT is not installed")


def test_trt_backend_without_tensorrt(tmp_path, tiny_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    from cheers_deploy.runtime.trt_backend import TrtBackend

    wd = _fake_workdir(tmp_path, tiny_config)
    t = tiny_config.text_config                     # the table must have the config's (vocab, hidden) shape
    np.lib.format.open_memmap(wd / C.EMBED_FILE, mode="w+", dtype=np.float32, shape=(t.vocab_size, t.hidden_size))
    for f in C.TOKENIZER_FILES:
        (wd / f).write_bytes(b"")
    with pytest.raises(MissingDependencyError, match="TensorRT is not installed"):
        TrtBackend(wd)


# =====================================================================================================================
# fake TensorRT / Polygraphy / cudart behind the package (tests/fakes/trt.py, tests/fakes/cuda.py)
# =====================================================================================================================
@pytest.fixture
def fakes(monkeypatch):
    """FakeTrt + FakePolygraphy + FakeCudart behind cheers_deploy.trt (what build/engines.py and trt_backend.py
    import): compat.runtime_identity() / gpu_info() then describe the fake machine (IDENT)."""
    inst = fake_trt.install(monkeypatch)
    yield inst
    inst.uninstall()


def _pipe_pair(wd, trt_backend):
    from cheers_deploy.processor import Processor
    from cheers_deploy.runtime.ort_backend import OrtBackend
    from cheers_deploy.runtime.pipeline import Pipeline
    from cheers_deploy.runtime.workdir import open_workdir

    ort_pipe = open_workdir(Pipeline, wd, backend="ort", cache_len="max_context")
    proc = ort_pipe.processor
    trt_pipe = Pipeline(trt_backend, proc.tokenizer, proc, ort_pipe.config, generation=ort_pipe.generation)
    assert isinstance(ort_pipe.backend, OrtBackend) and isinstance(proc, Processor)
    return ort_pipe, trt_pipe


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _check_stage_outputs_belong_to_the_caller(be, ob, tol):
    """A stage output is the caller's: later calls of the same stage (run, captured, replayed) leave it alone,
    and each call's output equals ORT's for its own input."""
    img = be.manifest.image
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((1, img.latent_channels, img.latent_grid, img.latent_grid)).astype(np.float32)
          for _ in range(4)]
    tok1, pe1 = be.vision_tokenize(xs[0])
    keep_tok, keep_pe = be.to_numpy(tok1).copy(), be.to_numpy(pe1).copy()
    later = [be.vision_tokenize(x) for x in xs[1:]]                  # same bindings: run, captured, replayed
    assert np.array_equal(be.to_numpy(tok1), keep_tok) and np.array_equal(be.to_numpy(pe1), keep_pe)
    for x, (tok, pe) in zip(xs[1:], later):
        ref_tok, ref_pe = ob.vision_tokenize(x)
        assert _rel_err(be.to_numpy(tok), ref_tok) <= tol and _rel_err(be.to_numpy(pe), ref_pe) <= tol
    assert not np.allclose(be.to_numpy(later[-1][0]), keep_tok)      # the later calls did produce other values
    # the backbone's hidden states too (image steps at the same position, the Euler loop's pattern)
    cache = be.new_cache(1, be.max_context)
    h1, l1 = be.backbone(cache, tok1, 0, None, "image_step")
    assert l1 is None
    keep_h = be.to_numpy(h1).copy()
    for tok, _ in later:
        h, _ = be.backbone(cache, tok, 0, None, "image_step")
    assert np.array_equal(be.to_numpy(h1), keep_h)
    assert not np.allclose(be.to_numpy(h), keep_h)
    return tok1, later


# =====================================================================================================================
# fake end to end: build -> load -> pipeline == ort
# =====================================================================================================================
def test_fake_build_then_pipeline_equals_ort(tiny_workdir, tmp_path, fakes):
    from cheers_deploy.runtime.trt_backend import TrtBackend

    wd = _linked_copy(tiny_workdir, tmp_path / "wd")
    logs = []
    em = eb.build_engines(wd, "fp32", fuse=False, log=logs.append)
    d = tl.engine_dir(wd, "fp32", IDENT["tensorrt"], "8.7")
    assert (d / C.ENGINE_MANIFEST).is_file() and (d / eb.TIMING_CACHE).is_file()
    assert isinstance(em, tl.EngineManifest) and em.tensorrt == IDENT["tensorrt"] and em.precision == "fp32"
    assert em.gpu["name"] == IDENT["gpu"] and em.gpu["compute_capability"] == "8.7"
    assert sorted(em.engines) == sorted(C.GRAPH_NAMES) and em.plugin is None
    bb = em.engines["backbone"]
    assert [p["name"] for p in bb.profiles] == ["prefill", "decode", "image_step"]
    assert [bb.profile_index(m) for m in C.MODES] == [0, 1, 2]
    assert bb.extra["num_profiles"] == 3 and em.engines["cfm_head"].extra["num_profiles"] == 1
    assert bb.file == "backbone.plan" and bb.size_bytes > 0 and bb.fused_gates == 0 and bb.fingerprint
    assert bb.extra["source"] == "backbone.onnx" and bb.extra["built_from"] == "backbone.onnx"
    names = {t["name"] for t in bb.inputs}
    assert {"inputs_embeds", "position_ids", "attention_mask", "past_key_values.0.key"} <= names
    assert len(eb.summary_lines(em)) == 1 + len(C.GRAPH_NAMES)
    # the file format: the same JSON keys as before the typed manifest, and a lossless round trip
    raw = json.loads((d / C.ENGINE_MANIFEST).read_text())
    assert {"format", "precision", "tensorrt", "gpu", "plugin", "engines"} <= set(raw)
    assert raw["format"] == C.ENGINE_FORMAT and raw["plugin"] is None
    assert {"file", "source", "built_from", "fingerprint", "source_id", "size_bytes", "build_s", "profiles",
            "inputs", "outputs", "num_profiles", "device_memory_bytes"} <= set(raw["engines"]["backbone"])
    assert raw["engines"]["backbone"]["num_profiles"] == 3 and raw["engines"]["backbone"].get("fused_gates", 0) == 0
    assert tl.read_engine_manifest(d).to_dict() == raw
    # Polygraphy got the manifest's profiles, a timing cache and tf32 off for the fp32 parity engines
    bb_cfg = next(kw for f, kw in FakePolygraphy.builds if f == "backbone.onnx")
    assert len(bb_cfg["profiles"]) == 3 and bb_cfg["tf32"] is False
    assert bb_cfg["profiles"][1]["inputs_embeds"][0] == (1, 1, 64)

    # idempotent: nothing rebuilt; a changed source or --force rebuilds
    FakePolygraphy.builds = []
    eb.build_engines(wd, "fp32", fuse=False, log=logs.append)
    assert FakePolygraphy.builds == [] and sum("up to date" in x for x in logs) == 5
    eb.build_engines(wd, "fp32", fuse=False, force=True, graphs=["vae_encoder"], log=logs.append)
    assert [f for f, _ in FakePolygraphy.builds] == ["vae_encoder.onnx"]

    be = TrtBackend(wd, precision="fp32", trt_module=FakeTrt, identity=IDENT)
    assert set(be.engines["backbone"].contexts) == {"prefill", "decode", "image_step"}
    assert be.arena.nbytes == max(e.engine.device_memory_size_v2 for e in be.engines.values())
    ctxs = [c for e in be.engines.values() for c in e.contexts.values()]
    assert {c.memory[0] for c in ctxs} == {be.arena.ptr}              # one shared activation arena
    assert {c.strategy for c in ctxs} == {FakeTrt.ExecutionContextAllocationStrategy.USER_MANAGED}

    ort_pipe, trt_pipe = _pipe_pair(wd, be)
    rng = np.random.default_rng(11)
    noise = rng.standard_normal((128, 4, 4), dtype=np.float32)
    kw = dict(steps=4, cfg_scale=3.0, alpha=0.6, noise=noise, max_new_tokens=3, seed=2)
    g_o = ort_pipe.generate("A green triangle next to a blue square.", **kw)
    g_t = trt_pipe.generate("A green triangle next to a blue square.", **kw)
    assert g_t.token_ids == g_o.token_ids
    assert np.abs(g_t.latent - g_o.latent).max() <= 1e-5 * np.abs(g_o.latent).max()
    assert np.abs(g_t.image.astype(int) - g_o.image.astype(int)).max() <= 1
    # CUDA graphs: the Euler loop's stages are captured and replayed although every output is copied out and every
    # device input copied into the engine's own buffer (those copies stay outside the graphs)
    stats = be.cuda_graph_stats()
    assert stats["backbone/image_step"]["captured"] and stats["cfm_head/default"]["captured"]
    assert stats["vision_tokenizer/default"]["captured"]
    assert not any(s["disabled"] for s in stats.values())
    assert fakes.cudart.calls["graph_launch"] >= 3 * (4 - 2)       # steps 3.. replay three stage graphs
    assert fakes.cudart.calls["unsafe_in_capture"] == 0

    a_o = ort_pipe.answer(np.full((64, 64, 3), 200, np.uint8), "What is this?", max_new_tokens=6)
    a_t = trt_pipe.answer(np.full((64, 64, 3), 200, np.uint8), "What is this?", max_new_tokens=6)
    assert a_t.token_ids == a_o.token_ids

    e_o = ort_pipe.edit(np.full((64, 64, 3), 90, np.uint8), "make it red", steps=3, cfg_scale=2.0, noise=noise,
                        max_new_tokens=2)
    e_t = trt_pipe.edit(np.full((64, 64, 3), 90, np.uint8), "make it red", steps=3, cfg_scale=2.0, noise=noise,
                        max_new_tokens=2)
    assert np.abs(e_t.latent - e_o.latent).max() <= 1e-5 * np.abs(e_o.latent).max()


def test_fake_cuda_graph_replay_equals_uncaptured(tiny_workdir, tmp_path, fakes):
    """The Euler loop with CUDA graphs (captured on the 2nd identical call, replayed after) gives exactly what the
    same engines give without graphs: replays read the inputs copied in for this step, not stale ones."""
    from cheers_deploy.runtime.trt_backend import TrtBackend

    wd = _linked_copy(tiny_workdir, tmp_path / "wd")
    eb.build_engines(wd, "fp32", fuse=False, log=lambda s: None)
    noise = np.random.default_rng(3).standard_normal((128, 4, 4), dtype=np.float32)
    kw = dict(steps=5, cfg_scale=3.0, alpha=0.6, noise=noise, max_new_tokens=2, seed=4)
    out = {}
    for graphs in (True, False):
        be = TrtBackend(wd, "fp32", cuda_graphs=graphs, trt_module=FakeTrt, identity=IDENT)
        launches = fakes.cudart.calls["graph_launch"]
        _, pipe = _pipe_pair(wd, be)
        out[graphs] = pipe.generate("A red circle.", **kw)
        n = fakes.cudart.calls["graph_launch"] - launches
        assert (n >= 3 * (5 - 2)) if graphs else (n == 0)
        assert all(s["captured"] == graphs for k, s in be.cuda_graph_stats().items()
                   if k in ("backbone/image_step", "cfm_head/default", "vision_tokenizer/default"))
        be.close()
    assert out[True].token_ids == out[False].token_ids
    assert np.array_equal(out[True].latent, out[False].latent)


def test_fake_backend_cache_and_logits(tiny_workdir, tmp_path, fakes):
    """Backend level: KV entries land at their positions; prefill/decode logits are the engine's, equal to ORT's;
    image steps return no logits."""
    from cheers_deploy.runtime.ort_backend import OrtBackend
    from cheers_deploy.runtime.trt_backend import TrtBackend

    wd = _linked_copy(tiny_workdir, tmp_path / "wd")
    eb.build_engines(wd, "fp32", fuse=False, log=lambda s: None)
    be = TrtBackend(wd, trt_module=FakeTrt, identity=IDENT)             # precision picked: the only one built
    assert be.precision == "fp32"
    ob = OrtBackend(wd, cache_len="max_context")
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((2, 5, 64)).astype(np.float32)
    c_t, c_o = be.new_cache(2, 32), ob.new_cache(2, 32)
    mask = np.tril(np.ones((5, 5), bool))
    h_t, l_t = be.backbone(c_t, emb, 0, mask, "prefill")
    h_o, l_o = ob.backbone(c_o, emb, 0, mask, "prefill")
    assert np.allclose(be.to_numpy(h_t), h_o, atol=1e-6)
    vocab = be.embed_table.shape[0]
    assert isinstance(l_t, np.ndarray) and l_t.dtype == np.float32 and l_t.shape == l_o.shape == (2, vocab)
    assert np.allclose(l_t, l_o, atol=1e-5)
    for step in range(3):                                              # decode at positions 5, 6, 7
        e1 = rng.standard_normal((2, 1, 64)).astype(np.float32)
        h_t, l_t = be.backbone(c_t, e1, 5 + step, None, "decode")
        h_o, l_o = ob.backbone(c_o, e1, 5 + step, None, "decode")
        assert np.allclose(be.to_numpy(h_t), h_o, atol=1e-6)
        assert isinstance(l_t, np.ndarray) and l_t.dtype == np.float32 and l_t.shape == (2, vocab)
        assert np.allclose(l_t, l_o, atol=1e-5)
    for i in range(be.num_layers):
        assert np.array_equal(c_t.k[i].to_numpy()[:, :, :8], c_o.k[i][:, :, :8])
        assert not c_t.v[i].to_numpy()[:, :, 8:].any()
    # an image step (the tokens of one image at positions 8..8+M-1): hidden states, no logits
    m = be.tokens_per_image
    tok = rng.standard_normal((2, m, 64)).astype(np.float32)
    h_t, l_t = be.backbone(c_t, tok, 8, None, "image_step")
    h_o, l_o = ob.backbone(c_o, tok, 8, None, "image_step")
    assert l_t is None and l_o is None
    assert np.allclose(be.to_numpy(h_t), h_o, atol=1e-6)
    assert np.array_equal(c_t.k[0].to_numpy()[:, :, :8 + m], c_o.k[0][:, :, :8 + m])
    with pytest.raises(InputError, match="mode"):
        be.backbone(c_t, e1, 9, None, "generate")
    with pytest.raises(InputError, match="overflow"):
        be.backbone(c_t, emb, be.max_context - 2, mask, "prefill")
    with pytest.raises(InputError, match="context"):
        be.new_cache(1, be.max_context + 1)
    with pytest.raises(InputError, match="largest batch"):
        be.new_cache(3, 8)


def test_fake_backbone_profile_is_the_mode(tiny_workdir, tmp_path, fakes):
    """The context (profile) that runs is the one of the mode passed, whatever the shapes look like: a prefill of
    M tokens looks like an image step, a one-token prefill like a decode."""
    from cheers_deploy.runtime.ort_backend import OrtBackend
    from cheers_deploy.runtime.trt_backend import TrtBackend

    wd = _linked_copy(tiny_workdir, tmp_path / "wd")
    em = eb.build_engines(wd, "fp32", fuse=False, graphs=["backbone"], log=lambda s: None)
    be = TrtBackend(wd, "fp32", graphs=["backbone"], trt_module=FakeTrt, identity=IDENT)
    ob = OrtBackend(wd, graphs=["backbone"], cache_len="max_context")
    ctxs = be.engines["backbone"].contexts
    for mode, ctx in ctxs.items():
        assert ctx.profile == em.engines["backbone"].profile_index(mode)
    m, d = be.tokens_per_image, be.embed_table.shape[1]
    rng = np.random.default_rng(8)
    emb = lambda s: rng.standard_normal((2, s, d)).astype(np.float32)  # noqa: E731
    calls = [("prefill", emb(m), 0, np.tril(np.ones((m, m), bool))),    # the shapes of an image step
             ("image_step", emb(m), m, None),
             ("decode", emb(1), 2 * m, None),
             ("image_step", emb(m), 2 * m + 1, None),
             ("prefill", emb(1), 0, np.ones((1, 1), bool))]             # the shapes of a decode step
    c_t, c_o = be.new_cache(2, be.max_context), ob.new_cache(2, be.max_context)
    for mode, e, start, mask in calls:
        before = {k: c.ran for k, c in ctxs.items()}
        n_ran = len(FakeTrt.ran)
        h_t, l_t = be.backbone(c_t, e, start, mask, mode)
        h_o, l_o = ob.backbone(c_o, e, start, mask, mode)
        ran = {k for k, c in ctxs.items() if c.ran != before[k]}
        assert ran == {mode}, (mode, ran)
        assert FakeTrt.ran[n_ran:] == [("backbone", em.engines["backbone"].profile_index(mode))]
        assert np.allclose(be.to_numpy(h_t), h_o, atol=1e-6)
        assert (l_t is None) == (mode == "image_step") and (l_o is None) == (mode == "image_step")
        if l_t is not None:
            assert np.allclose(l_t, l_o, atol=1e-5)
    # no fallback to another profile: M tokens in decode mode are outside the decode profile
    with pytest.raises(InputError, match=r"decode profile\): input 'inputs_embeds'"):
        be.backbone(c_t, emb(m), 2 * m + 1, None, "decode")


def test_fake_stage_outputs_belong_to_the_caller(tiny_workdir, tmp_path, fakes):
    """Outputs are copied out of the engines' persistent output buffers; device inputs are copied into the engines'
    own input buffers (stable bound addresses), except the KV cache, which is bound in place."""
    from cheers_deploy.runtime.ort_backend import OrtBackend
    from cheers_deploy.runtime.trt_backend import TrtBackend

    wd = _linked_copy(tiny_workdir, tmp_path / "wd")
    graphs = ["vision_tokenizer", "backbone"]
    eb.build_engines(wd, "fp32", fuse=False, graphs=graphs, log=lambda s: None)
    be = TrtBackend(wd, "fp32", graphs=graphs, trt_module=FakeTrt, identity=IDENT)
    ob = OrtBackend(wd, graphs=graphs)
    tok1, later = _check_stage_outputs_belong_to_the_caller(be, ob, tol=1e-6)
    vt = be.engines["vision_tokenizer"]
    out_ptrs = {b.ptr for e in be.engines.values() for b in e.out_bufs.values()}
    assert tok1.ptr not in out_ptrs and all(t.ptr not in out_ptrs and p.ptr not in out_ptrs for t, p in later)
    assert be.cuda_graph_stats()["vision_tokenizer/default"]["captured"]
    assert vt.contexts["default"].ran == 4 and vt.contexts["default"].enqueued < 4      # the last call replayed

    # the image-step context reads the embeddings from its own input buffer, the past K/V from the cache itself
    bbe = be.engines["backbone"]
    ctx = bbe.contexts["image_step"]
    cache = be.new_cache(1, be.max_context)
    hs = []
    for tok, _ in [(tok1, None)] + later:
        hs.append(be.backbone(cache, tok, 0, None, "image_step")[0])
        assert ctx.addr["inputs_embeds"] == bbe.in_bufs["inputs_embeds"].ptr != tok.ptr
        for i in range(be.num_layers):
            assert ctx.addr[f"past_key_values.{i}.key"] == cache.past(i, "key", 1).ptr
            assert ctx.addr[f"past_key_values.{i}.value"] == cache.past(i, "value", 1).ptr
    assert len({h.ptr for h in hs}) == len(hs)                             # a fresh array per call
    assert be.cuda_graph_stats()["backbone/image_step"]["captured"]


def test_fake_profile_selection_error_is_a_cheers_error(tiny_workdir, tmp_path, fakes, monkeypatch):
    """set_optimization_profile_async raises RuntimeError in the real bindings (older ones return False): either
    way the backend raises one CheersError naming the engine, the profile and its mode."""
    from cheers_deploy.runtime.trt_backend import TrtBackend

    wd = _linked_copy(tiny_workdir, tmp_path / "wd")
    eb.build_engines(wd, "fp32", fuse=False, graphs=["backbone"], log=lambda s: None)
    kw = dict(graphs=["backbone"], trt_module=FakeTrt, identity=IDENT)
    d = tl.engine_dir(wd, "fp32", IDENT["tensorrt"], IDENT["compute_capability"])
    raw = json.loads((d / C.ENGINE_MANIFEST).read_text())
    raw["engines"]["backbone"]["profiles"][2]["index"] = 7               # the engine has 3 profiles
    (d / C.ENGINE_MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(CheersError) as exc:
        TrtBackend(wd, "fp32", **kw)
    assert not isinstance(exc.value, RuntimeError)
    msg = str(exc.value)
    assert "engine 'backbone'" in msg and "profile 7 (image_step)" in msg and "Error in set optimization" in msg

    raw["engines"]["backbone"]["profiles"][2]["index"] = 2
    (d / C.ENGINE_MANIFEST).write_text(json.dumps(raw))
    TrtBackend(wd, "fp32", **kw).close()
    monkeypatch.setattr(FakeContext, "set_optimization_profile_async", lambda self, index, stream: False)
    with pytest.raises(CheersError, match=r"engine 'backbone': cannot select optimization profile 0 \(prefill\)"):
        TrtBackend(wd, "fp32", **kw)


def test_fake_plugin_build_fuses_cfm_head(tiny_workdir, tmp_path, fakes, monkeypatch):
    from cheers_deploy.runtime.ort_backend import OrtBackend
    from cheers_deploy.runtime.trt_backend import TrtBackend

    wd = _linked_copy(tiny_workdir, tmp_path / "wd")
    lib = tmp_path / "libcheers_plugins.so"
    lib.write_bytes(b"\x7fELF fake")
    logs = []
    em = eb.build_engines(wd, "fp32", plugin_lib=lib, graphs=["cfm_head", "backbone"], log=logs.append)
    assert fakes.loaded == [lib.resolve()] and trt_plugin.plugin_registered()
    assert em.plugin["path"] == str(lib.resolve()) and em.plugin["sha256"]
    assert em.plugin["name"] == C.PLUGIN_NAME and em.plugin["version"] == C.PLUGIN_VERSION
    assert em.engines["cfm_head"].fused_gates == 1 and em.engines["backbone"].fused_gates == 0
    assert em.engines["cfm_head"].extra["built_from"].endswith("fused/cfm_head.onnx")
    assert any("1 hi gate(s) fused" in x for x in logs)

    fakes.new_process(monkeypatch)                                     # loading happens in another process
    assert not trt_plugin.plugin_registered()
    be = TrtBackend(wd, "fp32", graphs=["cfm_head"], trt_module=FakeTrt, identity=IDENT, plugin_lib=lib)
    assert fakes.loaded == [lib.resolve()] and trt_plugin.plugin_registered()
    ob = OrtBackend(wd, graphs=["cfm_head"])
    rng = np.random.default_rng(4)
    hid = rng.standard_normal((2, 4, 64)).astype(np.float32)
    pe = rng.standard_normal((2, 16, 64)).astype(np.float32)
    t = np.asarray([0.3, 0.3], np.float32)
    v_t, v_o = be.cfm_head(hid, pe, t), ob.cfm_head(hid, pe, t)
    assert np.abs(v_t - v_o).max() <= 1e-5 * np.abs(v_o).max()
    # without plugin_lib=: $CHEERS_TRT_PLUGIN (never the path the engine manifest records)
    fakes.new_process(monkeypatch)
    monkeypatch.setenv(C.PLUGIN_ENV, str(lib))
    TrtBackend(wd, "fp32", graphs=["cfm_head"], trt_module=FakeTrt, identity=IDENT)
    assert fakes.loaded == [lib.resolve()]
    monkeypatch.delenv(C.PLUGIN_ENV)

    # the fused engine needs the plugin at load time: a clear error without a library, even though the library
    # the engine manifest records is still there
    fakes.new_process(monkeypatch)
    monkeypatch.setattr(trt_plugin, "default_plugin_library", lambda: None)
    with pytest.raises(CheckpointError, match="uses the CheersGatedResidual plugin"):
        TrtBackend(wd, "fp32", graphs=["cfm_head"], trt_module=FakeTrt, identity=IDENT)
    assert fakes.loaded == []


def test_fake_build_parser_error_names_node(tiny_workdir, tmp_path, fakes):
    import onnx
    from onnx import helper

    wd = _linked_copy(tiny_workdir, tmp_path / "wd")
    # without the plugin loaded, a fused graph is rejected by the parser, naming the plugin node
    from cheers_deploy.build import surgery

    os.unlink(wd / "cfm_head.onnx")
    assert surgery.fuse_gated_residual(tiny_workdir / "cfm_head.onnx", wd / "cfm_head.onnx") == 1
    with pytest.raises(eb.ParseError) as exc:
        eb.build_engines(wd, "fp32", fuse=False, graphs=["cfm_head"], log=lambda s: None)
    assert "CheersGatedResidual" in str(exc.value) and "--plugin-lib" in str(exc.value)
    # an op TensorRT does not know: the node is named
    model = onnx.load(str(tiny_workdir / "vae_decoder.onnx"))
    model.graph.node.insert(0, helper.make_node("NoSuchOp", [model.graph.input[0].name], ["unused"], name="odd_node",
                                                domain="custom"))
    os.unlink(wd / "vae_decoder.onnx")
    onnx.save(model, str(wd / "vae_decoder.onnx"))
    with pytest.raises(eb.ParseError, match="rejected node 'odd_node' \\(op NoSuchOp\\)"):
        eb.build_engines(wd, "fp32", fuse=False, graphs=["vae_decoder"], log=lambda s: None)


def test_fake_backend_refuses_other_machine_and_stale_engines(tiny_workdir, tmp_path, fakes):
    from cheers_deploy.runtime.trt_backend import TrtBackend

    wd = _linked_copy(tiny_workdir, tmp_path / "wd")
    eb.build_engines(wd, "fp32", fuse=False, graphs=["vae_encoder", "vae_decoder"], log=lambda s: None)
    kw = dict(graphs=["vae_encoder", "vae_decoder"], trt_module=FakeTrt)
    with pytest.raises(CheckpointError) as exc:
        TrtBackend(wd, "fp32", identity=dict(IDENT, tensorrt="10.13.3.9"), **kw)
    assert "TensorRT 10.3.0.30 (this machine runs TensorRT 10.13.3.9" in str(exc.value)
    with pytest.raises(CheckpointError, match="compute capability 8.7"):
        TrtBackend(wd, "fp32", identity=dict(IDENT, compute_capability="8.9", gpu="RTX 4090"), **kw)
    with pytest.raises(CheckpointError, match="GPU 'Fake Orin'"):
        TrtBackend(wd, "fp32", identity=dict(IDENT, gpu="Jetson AGX Orin"), **kw)
    TrtBackend(wd, "fp32", identity=dict(IDENT, gpu="Jetson AGX Orin"), allow_other_gpu=True, **kw)
    with pytest.raises(CheckpointError, match="no engine for backbone"):
        TrtBackend(wd, "fp32", identity=IDENT, trt_module=FakeTrt, graphs=["backbone"])
    with pytest.raises(CheckpointError, match="no fp16 TensorRT engines"):
        TrtBackend(wd, "fp16", identity=IDENT, **kw)
    # copying the workdir keeps the engines valid (no mtime check) ...
    src = wd / "vae_encoder.onnx"
    data = src.read_bytes()
    src.unlink()
    src.write_bytes(data)
    TrtBackend(wd, "fp32", identity=IDENT, **kw)
    # ... a plan TensorRT cannot deserialize is named, with the way out
    plan = tl.plan_path(wd, "fp32", IDENT["tensorrt"], IDENT["compute_capability"], "vae_decoder")
    good = plan.read_bytes()
    plan.write_bytes(b"\x00not a plan")
    with pytest.raises(CheckpointError, match=r"could not deserialize .*vae_decoder.plan.*--force"):
        TrtBackend(wd, "fp32", identity=IDENT, **kw)
    plan.write_bytes(good)
    # ... a re-exported graph (new hash in the manifest) makes its engine stale
    man = json.loads((wd / "manifest.json").read_text())
    man["graphs"]["vae_encoder"]["source_hash"] = "0" * 64
    (wd / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match=r"'vae_encoder' \(vae_encoder.onnx\) changed after its engine was"):
        TrtBackend(wd, "fp32", identity=IDENT, **kw)
    # a deployment that deleted the ONNX files is not checked (fake engines still read them, so only the id here)
    (wd / "vae_encoder.onnx").unlink()
    assert tl.source_id(Manifest.load(wd), "vae_encoder", "fp32") is None


def test_open_workdir_dispatches_to_trt(tiny_workdir, tmp_path, fakes, monkeypatch):
    """from_workdir(backend="trt") builds a TrtBackend with the machine's identity (here the fakes'), passes backend
    options on and refuses the ones TrtBackend does not take (threads, unknown names)."""
    from cheers_deploy.runtime import trt_backend
    from cheers_deploy.runtime.pipeline import Pipeline

    wd = _linked_copy(tiny_workdir, tmp_path / "wd")
    eb.build_engines(wd, "fp32", fuse=False, log=lambda s: None)
    assert compat.runtime_identity() == IDENT                          # no trt_module/identity needed below
    pipe = Pipeline.from_workdir(wd, backend="trt", precision="fp32")
    assert isinstance(pipe.backend, trt_backend.TrtBackend)
    assert pipe.backend.name == "trt" and pipe.backend.precision == "fp32" and pipe.backend.cuda_graphs
    out = pipe.chat("Hello there", max_new_tokens=3)
    assert len(out.token_ids) >= 1
    pipe = Pipeline.from_workdir(wd, backend="trt", cuda_graphs=False, graphs=["vae_encoder", "vision_tokenizer",
                                                                               "backbone"])
    assert pipe.backend.cuda_graphs is False and set(pipe.backend.engines) == {"vae_encoder", "vision_tokenizer",
                                                                                 "backbone"}
    with pytest.raises(InputError, match="threads= does not apply"):
        Pipeline.from_workdir(wd, backend="trt", threads=2)
    with pytest.raises(InputError, match="takes no option.* io_binding"):
        Pipeline.from_workdir(wd, backend="trt", io_binding=True)
    # a wrapped __init__ keeps its signature for the option check
    orig = trt_backend.TrtBackend.__init__

    @functools.wraps(orig)
    def init(self, workdir, **kw):
        kw.setdefault("trt_module", FakeTrt)
        orig(self, workdir, **kw)

    monkeypatch.setattr(trt_backend.TrtBackend, "__init__", init)
    assert Pipeline.from_workdir(wd, backend="trt", precision="fp32").backend.precision == "fp32"


# =====================================================================================================================
# install extras, default precision, memory, failed captures, the plugin's CUDA runtime (review findings)
# =====================================================================================================================
def test_setup_extras_pin_cuda_python_per_cuda_major():
    """cuda-python 13 needs an R580+ driver: an unbounded `cuda-python>=12` breaks JetPack 6 (CUDA 12.6) with
    cudaErrorInsufficientDriver. Every extra pins one CUDA major; `trt` is the cu12 one."""
    import ast
    import re

    tree = ast.parse((Path(__file__).resolve().parents[1] / "setup.py").read_text())
    extras = next(ast.literal_eval(kw.value) for node in ast.walk(tree) if isinstance(node, ast.Call)
                  for kw in node.keywords if kw.arg == "extras_require")
    assert "cuda-python>=12.6,<13" in extras["trt-cu12"] and "cuda-python>=13,<14" in extras["trt-cu13"]
    assert extras["trt"] == extras["trt-cu12"]
    for name, reqs in extras.items():
        for r in reqs:
            if r.replace("_", "-").startswith("cuda-python"):
                assert re.search(r"<\s*1[0-9]\b", r), f"extra [{name}]: {r} has no upper bound on the CUDA major"


def test_build_default_precision_is_what_the_workdir_has(tmp_path, tiny_config, capsys, monkeypatch):
    """`cheers-deploy build` without --precision builds fp16 when the workdir has fp16 graphs, else the exported
    fp32 ones with a note naming the command that makes fp16 (recommended on Jetson)."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    wd = _fake_workdir(tmp_path, tiny_config)
    rc = cli.main(["build", "--workdir", str(wd)])
    out, err = capsys.readouterr()
    assert rc == 2 and err.strip().startswith("error: TensorRT is not installed")      # got past the precision
    assert "building the exported fp32 graphs" in out and "Jetson" in out
    assert f"cheers-deploy calibrate convert --workdir {wd} --precision fp16" in out
    man = Manifest.load(wd)
    names = list(man.graphs)
    for g in names[:-1]:
        man.graph(g).precisions = {"fp16": PrecisionVariant(f"fp16/{g}.onnx", None)}
    prec, note = eb.default_precision(man, names)
    assert prec == "fp32" and "calibrate convert" in note                 # one graph without fp16: not fp16
    man.graph(names[-1]).precisions = {"fp16": PrecisionVariant(f"fp16/{names[-1]}.onnx", None)}
    assert eb.default_precision(man, names) == ("fp16", None)
    assert eb.default_precision(man, names[:1]) == ("fp16", None)


def test_fake_build_and_load_hold_no_second_copy_of_a_plan(tiny_workdir, tmp_path, fakes, monkeypatch):
    """The build writes the plan from TensorRT's buffer and inspects it by deserializing the written file from a
    memory map; loading deserializes from a memory map too: no `bytes` copy of a plan next to its engine."""
    from cheers_deploy.runtime.trt_backend import TrtBackend

    wd = _linked_copy(tiny_workdir, tmp_path / "wd")
    logs = []
    graphs = ["vae_encoder", "vae_decoder"]
    em = eb.build_engines(wd, graphs=graphs, fuse=False, log=logs.append)        # no precision: what exists
    assert em.precision == "fp32" and any("calibrate convert" in x and "Jetson" in x for x in logs)
    assert FakeTrt.deserialized == ["memoryview"] * 2                 # inspected from the file, not from bytes
    d = tl.engine_dir(wd, "fp32", IDENT["tensorrt"], IDENT["compute_capability"])
    assert all(em.engines[g].size_bytes == (d / f"{g}.plan").stat().st_size for g in graphs)

    real_read_bytes = Path.read_bytes

    def no_plan_reads(self):
        assert self.suffix != ".plan", f"{self} read into host memory"
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", no_plan_reads)
    FakeTrt.deserialized = []
    be = TrtBackend(wd, "fp32", graphs=graphs, trt_module=FakeTrt, identity=IDENT)
    assert FakeTrt.deserialized == ["memoryview"] * 2
    img = be.manifest.image
    x = np.zeros((1, img.latent_channels, img.latent_grid, img.latent_grid), np.float32)
    assert np.all(np.isfinite(be.vae_decode(x)))
    be.close()
    (d / "vae_decoder.plan").write_bytes(b"")                       # an empty file cannot be mapped: refused
    with pytest.raises(CheckpointError, match=r"could not deserialize .*vae_decoder.plan"):
        TrtBackend(wd, "fp32", graphs=graphs, trt_module=FakeTrt, identity=IDENT)


def test_fake_failed_capture_clears_the_stale_error_before_the_retry(tiny_workdir, tmp_path, fakes, monkeypatch,
                                                                     caplog):
    """cfm_head (with the plugin) fails its CUDA-graph capture: the capture-unsafe call leaves a 'last error' in the
    process's libcudart (and cuda-python's own). The backend clears both, as trtexec does, and the uncaptured retry
    succeeds; without the clearing, a plugin launcher that returns cudaGetLastError() fails the retry."""
    import logging

    from cheers_deploy.runtime.ort_backend import OrtBackend
    from cheers_deploy.runtime.trt_backend import TrtBackend
    from cheers_deploy.trt import device_memory as dm

    wd = _linked_copy(tiny_workdir, tmp_path / "wd")
    lib = tmp_path / "libcheers_plugins.so"
    lib.write_bytes(b"\x7fELF fake")
    eb.build_engines(wd, "fp32", plugin_lib=lib, graphs=["cfm_head"], log=lambda s: None)
    FakeTrt.capture_unsafe = {"cfm_head"}
    rng = np.random.default_rng(9)
    hid = rng.standard_normal((2, 4, 64)).astype(np.float32)
    pe = rng.standard_normal((2, 16, 64)).astype(np.float32)
    t = np.asarray([0.3, 0.3], np.float32)
    want = OrtBackend(wd, graphs=["cfm_head"]).cfm_head(hid, pe, t)
    kw = dict(graphs=["cfm_head"], trt_module=FakeTrt, identity=IDENT, plugin_lib=lib)

    be = TrtBackend(wd, "fp32", **kw)
    with caplog.at_level(logging.WARNING, logger="cheers_deploy.runtime.trt_backend"):
        outs = [be.cfm_head(hid, pe, t) for _ in range(3)]          # run, capture fails -> retry, uncaptured
    for v in outs:
        assert np.abs(v - want).max() <= 1e-5 * np.abs(want).max()
    st = be.cuda_graph_stats()["cfm_head/default"]
    assert st["disabled"] and not st["captured"] and fakes.cudart.calls["unsafe_in_capture"] == 1
    assert fakes.cudart.libcudart.last_error == 0 and fakes.cudart.last_error == 0
    assert "running it uncaptured (cleared stale CUDA errors" in caplog.text and "libcudart.so.12" in caplog.text
    be.close()

    # the same without clearing: the retry fails on the stale error
    monkeypatch.setattr(dm, "clear_last_errors", lambda: {})
    be = TrtBackend(wd, "fp32", **kw)
    be.cfm_head(hid, pe, t)
    with pytest.raises(CheersError, match="TensorRT execution of 'cfm_head'"):
        be.cfm_head(hid, pe, t)


def test_fake_plugin_with_another_cuda_runtime_is_refused(tmp_path, fakes, monkeypatch, caplog):
    """A plugin linking libcudart.so.13 next to a TensorRT built for CUDA 12 would put two CUDA runtimes in one
    process: refused before it is loaded (after the sha256 check), as is one whose libcudart cannot be found."""
    import logging

    lib = tmp_path / "libcheers_plugins.so"
    lib.write_bytes(b"\x7fELF fake")
    fakes.plugin_elf.needed = ["libcudart.so.13", "libc.so.6"]
    with pytest.raises(CheckpointError, match="sha256"):               # the trust check comes first
        trt_plugin.load_plugin_library(lib, expected_sha256="0" * 64)
    with pytest.raises(CheersError) as exc:
        trt_plugin.load_plugin_library(lib)
    msg = str(exc.value)
    assert "links the CUDA 13 runtime (libcudart.so.13)" in msg and "built for CUDA 12" in msg
    assert "two CUDA runtimes" in msg and fakes.loaded == []
    fakes.plugin_elf.needed = ["libcudart.so.12"]
    fakes.findable = set()
    with pytest.raises(CheersError, match=r"needs libcudart.so.12, which the dynamic loader cannot find.*"
                                          r"LD_LIBRARY_PATH"):
        trt_plugin.load_plugin_library(lib)
    assert fakes.loaded == []
    fakes.findable = {"libcudart.so.12"}
    assert trt_plugin.load_plugin_library(lib) == lib.resolve() and fakes.loaded == [lib.resolve()]
    # TensorRT's CUDA major unknown: loaded, with a warning naming why
    fakes.new_process(monkeypatch)
    monkeypatch.setattr(compat, "tensorrt_cuda_major", lambda trt=None: (None, "unknown (test)"))
    with caplog.at_level(logging.WARNING, logger="cheers_deploy.trt.plugin"):
        trt_plugin.load_plugin_library(lib)
    assert "loaded unchecked" in caplog.text and fakes.loaded == [lib.resolve()]


def _cc():
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("needs a C compiler (cc)")
    return cc


def test_elf_reader_and_cuda_runtime_check_on_real_libraries(tmp_path, monkeypatch):
    """The ELF reader on libraries built here: DT_NEEDED, RUNPATH, exported (not hidden) symbols - the same as
    `nm -D --defined-only` - and the plugin check against a TensorRT of the same / another CUDA major."""
    import subprocess

    cc = _cc()
    rt = tmp_path / "rt"
    rt.mkdir()
    (tmp_path / "cudart.c").write_text("int cudaGetLastError(void) { return 0; }\n")
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(rt / "libcudart.so.97"), str(tmp_path / "cudart.c"),
                    "-Wl,-soname,libcudart.so.97"], check=True)
    (tmp_path / "plug.c").write_text(
        "int cudaGetLastError(void);\n"
        "__attribute__((visibility(\"hidden\"))) int hidden_helper(void) { return 1; }\n"
        "static int local_helper(void) { return 2; }\n"
        "const void* getCreators(int* n) { *n = hidden_helper() + local_helper() + cudaGetLastError(); return 0; }\n"
        "void setLoggerFinder(void* f) { (void)f; }\n")
    plug = tmp_path / "libplug.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(plug), str(tmp_path / "plug.c"), f"-L{rt}", "-l:libcudart.so.97",
                    "-Wl,-rpath,$ORIGIN/rt", "-Wl,--enable-new-dtags"], check=True)
    info = compat.read_elf_dynamic(plug)
    assert "libcudart.so.97" in info.needed and info.rpath == ["$ORIGIN/rt"]
    assert info.search_dirs(plug) == [rt]
    assert {"getCreators", "setLoggerFinder"} <= info.exports
    assert not {"hidden_helper", "local_helper", "cudaGetLastError"} & info.exports
    assert compat.cudart_major(info.needed) == 97 and compat.read_elf_dynamic(rt / "libcudart.so.97").soname == \
        "libcudart.so.97"
    if shutil.which("nm"):
        nm = subprocess.run(["nm", "-D", "--defined-only", str(plug)], capture_output=True, text=True, check=True)
        assert {ln.split()[-1].split("@")[0] for ln in nm.stdout.splitlines() if ln.strip()} == set(info.exports)
    for bad, why in ((b"not an ELF at all", "not an ELF"), (b"\x7fELF\x02\x01\x01" + b"\0" * 9, "truncated"),
                     (b"", "cannot read")):
        (tmp_path / "bad.so").write_bytes(bad)
        with pytest.raises(CheersError, match=why):
            compat.read_elf_dynamic(tmp_path / "bad.so")

    class Trt:
        __version__ = "10.3.0.30"

    # TensorRT's CUDA major from its libnvinfer's DT_NEEDED (a library named like it, 'mapped' in the process)
    nvinfer = tmp_path / "libnvinfer.so.10"
    shutil.copy(plug, nvinfer)
    monkeypatch.setattr(compat, "_mapped_libraries", lambda pattern: [str(nvinfer)] if "nvinfer" in pattern else [])
    assert compat.tensorrt_cuda_major(Trt)[0] == 97
    assert trt_plugin.check_plugin_cuda_runtime(plug, Trt) == 97          # found through the library's RUNPATH
    monkeypatch.setattr(compat, "tensorrt_cuda_major", lambda trt=None: (12, "test"))
    with pytest.raises(CheersError, match="links the CUDA 97 runtime"):
        trt_plugin.check_plugin_cuda_runtime(plug, Trt)
    monkeypatch.setattr(compat, "tensorrt_cuda_major", lambda trt=None: (97, "test"))
    shutil.rmtree(rt)
    with pytest.raises(CheersError, match="needs libcudart.so.97, which the dynamic loader cannot find"):
        trt_plugin.check_plugin_cuda_runtime(plug, Trt)


def test_tensorrt_cuda_major_sources(tmp_path, monkeypatch):
    class Trt:
        __version__ = "10.13.0.35+cuda13"

    assert compat.tensorrt_cuda_major(Trt) == (13, "TensorRT version 10.13.0.35+cuda13")
    Trt.__version__ = "10.3.0.30"
    monkeypatch.setattr(compat, "_mapped_libraries", lambda pattern: [])
    monkeypatch.setattr(compat, "_pip_tensorrt_cuda_majors", lambda: {12})
    assert compat.tensorrt_cuda_major(Trt) == (12, "pip package tensorrt-cu12")
    monkeypatch.setattr(compat, "_pip_tensorrt_cuda_majors", lambda: {12, 13})          # ambiguous: next source
    status = tmp_path / "status"
    status.write_text("Package: libnvinfer-dev\nStatus: install ok installed\nVersion: 10.3.0.30-1+cuda11.8\n\n"
                      "Package: libnvinfer10\nStatus: install ok installed\nVersion: 10.3.0.30-1+cuda12.5\n\n")
    monkeypatch.setattr(compat, "_DPKG_STATUS", status)
    assert compat.tensorrt_cuda_major(Trt) == (12, "package libnvinfer10 (+cuda12)")
    status.write_text("")
    major, why = compat.tensorrt_cuda_major(Trt)
    assert major is None and "several CUDA majors" in why


# =====================================================================================================================
# real TensorRT (skipped without it; run on a machine with TensorRT, Polygraphy, cuda-python and a GPU)
# =====================================================================================================================
@pytest.fixture(scope="module")
def real_trt():
    trt = pytest.importorskip("tensorrt", reason="needs TensorRT")
    pytest.importorskip("polygraphy", reason="needs Polygraphy (pip install polygraphy)")
    if not compat.cuda_available():
        pytest.skip("needs a CUDA GPU and cuda-python")
    return trt


def _plugin_or_skip():
    lib = trt_plugin.default_plugin_library()
    if lib is None or not lib.is_file():
        pytest.skip("needs the gated-residual plugin library (build engines/plugins/gated_residual, or set "
                    "CHEERS_TRT_PLUGIN)")
    return lib


@pytest.mark.trt
def test_real_build_and_generate_fp32(real_trt, tiny_workdir, tmp_path):
    from cheers_deploy.runtime.trt_backend import TrtBackend

    wd = _linked_copy(tiny_workdir, tmp_path / "wd")
    logs = []
    em = eb.build_engines(wd, "fp32", fuse=False, log=logs.append)
    assert em.tensorrt == real_trt.__version__ and em.engines["backbone"].extra["num_profiles"] == 3
    eb.build_engines(wd, "fp32", fuse=False, log=logs.append)
    assert sum("up to date" in x for x in logs) == 5
    be = TrtBackend(wd, "fp32")
    ort_pipe, trt_pipe = _pipe_pair(wd, be)
    noise = np.random.default_rng(11).standard_normal((128, 4, 4), dtype=np.float32)
    kw = dict(steps=4, cfg_scale=3.0, alpha=0.6, noise=noise, max_new_tokens=3, seed=2)
    g_o = ort_pipe.generate("A green triangle next to a blue square.", **kw)
    g_t = trt_pipe.generate("A green triangle next to a blue square.", **kw)
    assert g_t.token_ids == g_o.token_ids
    assert np.abs(g_t.latent - g_o.latent).max() <= 2e-3 * np.abs(g_o.latent).max()
    assert be.cuda_graph_stats()["backbone/image_step"]["captured"]


@pytest.mark.trt
def test_real_stage_outputs_belong_to_the_caller(real_trt, tiny_workdir, tmp_path):
    from cheers_deploy.runtime.ort_backend import OrtBackend
    from cheers_deploy.runtime.trt_backend import TrtBackend

    wd = _linked_copy(tiny_workdir, tmp_path / "wd")
    graphs = ["vision_tokenizer", "backbone"]
    eb.build_engines(wd, "fp32", fuse=False, graphs=graphs, log=lambda s: None)
    be = TrtBackend(wd, "fp32", graphs=graphs)
    _check_stage_outputs_belong_to_the_caller(be, OrtBackend(wd, graphs=graphs), tol=2e-3)
    assert be.cuda_graph_stats()["vision_tokenizer/default"]["captured"]


@pytest.mark.trt
def test_real_plugin_engine_matches_ort(real_trt, tiny_workdir, tmp_path):
    from cheers_deploy.runtime.ort_backend import OrtBackend
    from cheers_deploy.runtime.trt_backend import TrtBackend

    lib = _plugin_or_skip()
    wd = _linked_copy(tiny_workdir, tmp_path / "wd")
    em = eb.build_engines(wd, "fp32", plugin_lib=lib, graphs=["cfm_head"], log=lambda s: None)
    assert em.engines["cfm_head"].fused_gates == 1
    be = TrtBackend(wd, "fp32", graphs=["cfm_head"], plugin_lib=lib)
    ob = OrtBackend(wd, graphs=["cfm_head"])
    rng = np.random.default_rng(4)
    hid = rng.standard_normal((2, 4, 64)).astype(np.float32)
    pe = rng.standard_normal((2, 16, 64)).astype(np.float32)
    t = np.asarray([0.3, 0.7], np.float32)
    v_t, v_o = be.cfm_head(hid, pe, t), ob.cfm_head(hid, pe, t)
    assert np.abs(v_t - v_o).max() <= 1e-3 * np.abs(v_o).max()


@pytest.mark.trt
def test_real_parser_error_names_node(real_trt, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    pg = compat.import_polygraphy_trt()
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [2])  # noqa: E731
    model = helper.make_model(helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"], name="odd_node")], "g",
                                                [vi("x")], [vi("y")]), opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    with pytest.raises(eb.ParseError, match="odd_node"):
        eb._network_loader(real_trt, pg, path)()


@pytest.mark.trt
def test_real_refuses_engines_of_another_version(real_trt, tiny_workdir, tmp_path):
    from cheers_deploy.runtime.trt_backend import TrtBackend

    wd = _linked_copy(tiny_workdir, tmp_path / "wd")
    eb.build_engines(wd, "fp32", fuse=False, graphs=["vae_encoder"], log=lambda s: None)
    d = next((wd / "engines" / "fp32").glob("*/*"))
    em = tl.read_engine_manifest(d)
    em.tensorrt = "9.9.9"
    tl.write_engine_manifest(d, em)
    with pytest.raises(CheckpointError, match="TensorRT 9.9.9"):
        TrtBackend(wd, "fp32", graphs=["vae_encoder"])
