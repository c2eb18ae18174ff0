"""Adversarial workdirs and checkpoints (docs/security.md, promises 1, 2, 5 for export, 6): each case copies the bundled
model's shipped graphs (`hub.bundled_workdir()`) or the bundled checkpoint into its own folder, corrupts one thing,
runs the real command line in-process (tests/adversarial.py: an audit hook records every file opened, written or
dlopen'ed) and checks exit code 2, exactly one `error:` line naming the file/field, no traceback, and nothing read or
written outside the case folder.

Layout of a case: tmp_path/case (the folder the command is given things from) and tmp_path/outside (where an attack
points: a read there is a failure of the harness check, not only of the message).

Families: 1. reads stay inside the folder, no native code from a workdir; 2. every file validated before it is
trusted; 5. export into a foreign folder / concurrent exports; 6. a mixed workdir is refused.
"""
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from adversarial import record, run_cli
from cheers_deploy import constants as C
from cheers_deploy.errors import CheckpointError, CheersError
from cheers_deploy.hub import bundled_checkpoint, bundled_workdir
from cheers_deploy.trt import plugin as trt_plugin

REAL_EXPORTS = trt_plugin._exports             # the real ctypes probe (the TensorRT fakes replace it)
BUNDLED_WD = bundled_workdir()
BUNDLED_CK = bundled_checkpoint()
CHAT = ["chat", "--prompt", "a red circle", "--max-new-tokens", "1"]

pytestmark = pytest.mark.skipif(BUNDLED_WD is None, reason="the package ships no bundled graphs")


# ================================================================================================== helpers
@pytest.fixture
def case(tmp_path) -> Path:
    d = tmp_path / "case"
    d.mkdir()
    return d


@pytest.fixture
def outside(tmp_path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    return d


def _wd(case: Path, name: str = "wd") -> Path:
    """A private copy of the shipped graphs inside the case folder."""
    return Path(shutil.copytree(BUNDLED_WD, case / name))


def _ck(case: Path, name: str = "ck") -> Path:
    """A private copy of the bundled checkpoint (without its graphs) inside the case folder."""
    return Path(shutil.copytree(BUNDLED_CK, case / name, ignore=shutil.ignore_patterns("graphs")))


def _edit(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _chat_wd(capsys, case, wd, *extra):
    return run_cli(capsys, case, CHAT + ["--workdir", str(wd), *extra])


def _torch():
    """torch, imported before a recorded run: its first import of torch._dynamo creates torch's cache folder
    (/tmp/torchinductor_<user>), a write of the library's own, not of the code under test."""
    torch = pytest.importorskip("torch")
    import torch._dynamo  # noqa: F401
    return torch


def _chat_ck(capsys, case, ck):
    _torch()
    return run_cli(capsys, case, CHAT + ["--checkpoint", str(ck)])


def _st_split(path: Path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _st_write(path: Path, header: dict, data: bytes, length=None) -> None:
    hb = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb) if length is None else length) + hb + data)


def _tensors(header: dict):
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


# ================================================================================================== 1. containment
@pytest.mark.parametrize("path_kind", ["dotdot", "absolute"])
def test_graph_path_outside_the_workdir_is_refused(capsys, case, outside, path_kind):
    wd = _wd(case)
    shutil.copy(wd / "vae_encoder.onnx", outside / "vae_encoder.onnx")
    target = "../../outside/vae_encoder.onnx" if path_kind == "dotdot" else str(outside / "vae_encoder.onnx")
    _edit(wd / "manifest.json", lambda d: d["graphs"]["vae_encoder"].__setitem__("file", target))
    res = _chat_wd(capsys, case, wd)
    res.assert_refused("manifest.json", "graphs.vae_encoder.file", "'..'" if path_kind == "dotdot" else "absolute")


def test_symlinked_graph_to_outside_is_refused(capsys, case, outside):
    wd = _wd(case)
    shutil.move(str(wd / "backbone.onnx"), outside / "backbone.onnx")
    os.symlink(outside / "backbone.onnx", wd / "backbone.onnx")
    res = _chat_wd(capsys, case, wd)
    res.assert_refused("graphs.backbone.file", "link", "outside")


def test_symlinked_external_data_to_outside_is_refused(capsys, case, outside):
    wd = _wd(case)
    (outside / "backbone.onnx.data").write_bytes(b"\0" * 4096)
    os.symlink(outside / "backbone.onnx.data", wd / "backbone.onnx.data")
    _edit(wd / "manifest.json", lambda d: d["graphs"]["backbone"].__setitem__("external_data", "backbone.onnx.data"))
    res = _chat_wd(capsys, case, wd)
    res.assert_refused("graphs.backbone.external_data", "link", "outside")


def test_symlinked_embedding_table_to_outside_is_refused(capsys, case, outside):
    wd = _wd(case)
    shutil.move(str(wd / C.EMBED_FILE), outside / C.EMBED_FILE)
    os.symlink(outside / C.EMBED_FILE, wd / C.EMBED_FILE)
    res = _chat_wd(capsys, case, wd)
    res.assert_refused("embed_tokens.file", "link", "outside")


def test_precision_variant_escaping_is_refused(capsys, case, outside):
    wd = _wd(case)
    shutil.copy(wd / "vae_decoder.onnx", outside / "vae_decoder.fp16.onnx")
    _edit(wd / "manifest.json", lambda d: d["graphs"]["vae_decoder"]["precisions"].__setitem__(
        "fp16", {"file": "../../outside/vae_decoder.fp16.onnx"}))
    res = _chat_wd(capsys, case, wd, "--precision", "fp16")
    res.assert_refused("graphs.vae_decoder.precisions.fp16.file", "'..'")


def test_symlinked_manifest_and_tokenizer_to_outside_are_refused(capsys, case, outside):
    wd = _wd(case)
    shutil.move(str(wd / "manifest.json"), outside / "manifest.json")
    os.symlink(outside / "manifest.json", wd / "manifest.json")
    _chat_wd(capsys, case, wd).assert_refused("manifest.json", "link", "outside")
    wd2 = _wd(case, "wd2")
    shutil.move(str(wd2 / "tokenizer.json"), outside / "tokenizer.json")
    os.symlink(outside / "tokenizer.json", wd2 / "tokenizer.json")
    _chat_wd(capsys, case, wd2).assert_refused("tokenizer.json", "link", "outside")


def test_symlinked_workdir_folder_and_links_inside_are_allowed(capsys, case):
    real = _wd(case, "real")
    os.replace(real / "vocabulary.json", real / "vocab-copy.json")
    os.symlink("vocab-copy.json", real / "vocabulary.json")          # a link that stays inside: fine
    link = case / "link"
    os.symlink(real, link)                                            # the folder typed through a link: fine
    res = _chat_wd(capsys, case, link)
    assert res.rc == 0, res.err
    assert "Traceback" not in res.err and not res.outside, res.outside


def test_fifo_in_place_of_a_file_is_refused_without_blocking(capsys, case):
    wd = _wd(case)
    (wd / "vocabulary.json").unlink()
    os.mkfifo(wd / "vocabulary.json")
    res = _chat_wd(capsys, case, wd)
    res.assert_refused("vocabulary.json", "not a regular file")


def test_shard_index_escaping_the_checkpoint_is_refused(capsys, case, outside):
    ck = _ck(case)
    shutil.move(str(ck / "model.safetensors"), outside / "model.safetensors")
    header, _ = _st_split(outside / "model.safetensors")
    (ck / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "../../outside/model.safetensors" for k in _tensors(header)}}))
    res = _chat_ck(capsys, case, ck)
    res.assert_refused("model.safetensors.index.json", "weight_map", "'..'")


def test_shard_symlinked_to_outside_is_refused(capsys, case, outside):
    ck = _ck(case)
    shutil.move(str(ck / "model.safetensors"), outside / "model-00001-of-00001.safetensors")
    os.symlink(outside / "model-00001-of-00001.safetensors", ck / "model-00001-of-00001.safetensors")
    header, _ = _st_split(outside / "model-00001-of-00001.safetensors")
    (ck / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in _tensors(header)}}))
    res = _chat_ck(capsys, case, ck)
    res.assert_refused("weight_map", "link", "outside")


def test_checkpoint_config_symlinked_to_outside_is_refused(capsys, case, outside):
    ck = _ck(case)
    shutil.move(str(ck / "config.json"), outside / "config.json")
    os.symlink(outside / "config.json", ck / "config.json")
    res = _chat_ck(capsys, case, ck)
    res.assert_refused("config.json", "link", "outside")


# ---------------------------------------------------------------------------------------- TensorRT (fakes)
@pytest.fixture
def fakes(monkeypatch):
    from fakes import trt as fake_trt  # noqa: E402  (tests/ is on sys.path)

    inst = fake_trt.install(monkeypatch)
    monkeypatch.delenv(C.PLUGIN_ENV, raising=False)
    monkeypatch.setattr(trt_plugin, "default_plugin_library", lambda: (Path(os.environ[C.PLUGIN_ENV])
                                                                       if os.environ.get(C.PLUGIN_ENV) else None))
    yield inst
    inst.uninstall()


def _engines(wd: Path, plugin=None, plan_file=None) -> Path:
    """An fp32 engine folder for the fakes' machine: every graph has a (never deserialized) plan; cfm_head uses the
    plugin whose record is `plugin`."""
    from fakes import trt as fake_trt

    from cheers_deploy.trt import layout as tl

    ident = fake_trt.identity()
    d = tl.engine_dir(wd, "fp32", ident["tensorrt"], ident["compute_capability"])
    d.mkdir(parents=True)
    engines = {}
    for g in C.GRAPH_NAMES:
        (d / f"{g}.plan").write_bytes(b"")
        engines[g] = {"file": f"{g}.plan", "fused_gates": 1 if g == "cfm_head" and plugin else 0}
    if plan_file is not None:
        engines["backbone"]["file"] = plan_file
    em = {"format": C.ENGINE_FORMAT, "precision": "fp32", "tensorrt": ident["tensorrt"],
          "gpu": {"name": ident["gpu"], "compute_capability": ident["compute_capability"]},
          "plugin": plugin, "engines": engines}
    (d / C.ENGINE_MANIFEST).write_text(json.dumps(em))
    return d


def _plugin_record(path: Path, sha=None) -> dict:
    return {"path": str(path), "sha256": sha or hashlib.sha256(path.read_bytes()).hexdigest(),
            "name": C.PLUGIN_NAME, "version": C.PLUGIN_VERSION}


def _dlopens(res):
    return [p for kind, p in res.events if kind == "dlopen"]


def test_plugin_path_recorded_in_the_engine_manifest_is_never_loaded(capsys, case, fakes, monkeypatch):
    monkeypatch.setattr(trt_plugin, "_exports", REAL_EXPORTS)         # any load attempt would really dlopen
    wd = _wd(case)
    evil = case / "libcheers_plugins.so"
    evil.write_bytes(b"\x7fELF not really")
    _engines(wd, plugin=_plugin_record(evil))                        # the right hash, even: still never loaded
    res = _chat_wd(capsys, case, wd, "--backend", "trt", "--precision", "fp32")
    res.assert_refused("plugin", "never loaded", C.PLUGIN_ENV)
    assert not _dlopens(res) and fakes.loaded == []


def test_plugin_with_another_sha256_is_refused_naming_both(capsys, case, outside, fakes, monkeypatch):
    monkeypatch.setattr(trt_plugin, "_exports", REAL_EXPORTS)
    wd = _wd(case)
    built = outside / "built.so"
    built.write_bytes(b"the library the engines were built with")
    mine = case / "libcheers_plugins.so"
    mine.write_bytes(b"another library")
    _engines(wd, plugin=_plugin_record(built))
    monkeypatch.setenv(C.PLUGIN_ENV, str(mine))
    res = _chat_wd(capsys, case, wd, "--backend", "trt", "--precision", "fp32")
    want, have = hashlib.sha256(built.read_bytes()).hexdigest(), hashlib.sha256(mine.read_bytes()).hexdigest()
    res.assert_refused("sha256", want, have, "plugin.sha256")
    assert not _dlopens(res) and fakes.loaded == []
    # the library with the recorded hash is loaded (then the empty plan is refused, one line)
    monkeypatch.setattr(trt_plugin, "_exports", lambda path, symbol: symbol == "getCreators")
    shutil.copy(built, mine)
    res = _chat_wd(capsys, case, wd, "--backend", "trt", "--precision", "fp32")
    res.assert_refused("could not deserialize")
    assert fakes.loaded == [mine.resolve()]


def test_fused_engine_without_recorded_plugin_hash_is_refused(capsys, case, fakes, monkeypatch):
    wd = _wd(case)
    lib = case / "libcheers_plugins.so"
    lib.write_bytes(b"lib")
    _engines(wd, plugin={"path": str(lib), "name": C.PLUGIN_NAME})
    monkeypatch.setenv(C.PLUGIN_ENV, str(lib))
    res = _chat_wd(capsys, case, wd, "--backend", "trt", "--precision", "fp32")
    res.assert_refused("plugin.sha256", "missing")
    assert fakes.loaded == []


def test_engine_plan_path_escaping_is_refused(capsys, case, outside, fakes):
    wd = _wd(case)
    (outside / "backbone.plan").write_bytes(b"{}")
    _engines(wd, plan_file="../../../../../../outside/backbone.plan")
    res = _chat_wd(capsys, case, wd, "--backend", "trt", "--precision", "fp32")
    res.assert_refused("engine_manifest.json", "engines.backbone.file", "'..'")


def test_engine_folder_symlinked_outside_is_refused(capsys, case, outside, fakes):
    wd = _wd(case)
    other = _wd(outside, "other")
    _engines(other)
    os.symlink(other / "engines", wd / "engines")
    res = _chat_wd(capsys, case, wd, "--backend", "trt", "--precision", "fp32")
    res.assert_refused("engine folder", "link", "outside")


def test_engine_manifest_bad_values_are_one_line(capsys, case, fakes):
    wd = _wd(case)
    d = _engines(wd)
    _edit(d / C.ENGINE_MANIFEST, lambda e: e["engines"]["backbone"].__setitem__("profiles", [{"name": "prefill",
                                                                                              "index": "x"}]))
    res = _chat_wd(capsys, case, wd, "--backend", "trt", "--precision", "fp32")
    res.assert_refused("engine_manifest.json", "engines.backbone.profiles[0].index")
    _edit(d / C.ENGINE_MANIFEST, lambda e: e["engines"]["backbone"].__setitem__("profiles", []) or
          e["engines"]["backbone"].__setitem__("inputs", [{"name": "x"}]))
    _chat_wd(capsys, case, wd, "--backend", "trt", "--precision", "fp32").assert_refused(
        "engines.backbone.inputs[0].dtype")


# ---------------------------------------------------------------------------------------- calibration data
def _calib(wd: Path, items: dict) -> Path:
    d = wd / "calib"
    d.mkdir(exist_ok=True)
    (d / "calib_manifest.json").write_text(json.dumps({"format": "cheers-deploy-calib/1", "items": items,
                                                       "total_bytes": 0}))
    return d


def test_calibration_manifest_escaping_is_refused(capsys, case, outside):
    wd = _wd(case)
    np.savez(outside / "x.npz", **{"vae_decoder|g-default|0|latent": np.zeros((1, 32, 4, 4), np.float32)})
    _calib(wd, {"x": {"file": "../../../outside/x.npz", "bytes": 0, "graphs": {"vae_decoder": {"g-default": 1}}}})
    res = run_cli(capsys, case, ["calibrate", "quantize", "--workdir", str(wd), "--graphs", "vae_decoder"])
    res.assert_refused("calib_manifest.json", "items.x.file")


def test_calibration_shard_symlinked_outside_is_refused(case, outside):
    from cheers_deploy.precision.common import iter_feeds

    wd = _wd(case)
    d = _calib(wd, {"x": {"file": "x.npz", "bytes": 0, "graphs": {"vae_decoder": {"g-default": 1}}}})
    np.savez(outside / "x.npz", **{"vae_decoder|g-default|0|latent": np.zeros((1, 32, 4, 4), np.float32)})
    os.symlink(outside / "x.npz", d / "x.npz")
    res, events = record(lambda: list(iter_feeds(wd, "vae_decoder")))
    assert isinstance(res, CheckpointError) and "items.x.file" in str(res) and "outside" in str(res), res
    assert not [p for k, p in events if k == "read" and str(outside) in p]


def test_calibration_shard_with_pickled_objects_is_refused(case):
    from cheers_deploy.precision.common import iter_feeds

    wd = _wd(case)
    d = _calib(wd, {"x": {"file": "x.npz", "bytes": 0, "graphs": {"vae_decoder": {"g-default": 1}}}})
    np.savez(d / "x.npz", **{"vae_decoder|g-default|0|latent": np.array([{"a": 1}], dtype=object)})
    res, _ = record(lambda: list(iter_feeds(wd, "vae_decoder")))
    assert isinstance(res, CheckpointError) and "x.npz" in str(res) and "\n" not in str(res), res


def test_calibration_manifest_bad_types_are_refused(case):
    from cheers_deploy.precision.common import load_calib_manifest

    wd = _wd(case)
    _calib(wd, {"x": {"file": "x.npz", "bytes": "many", "graphs": {}}})
    res, _ = record(load_calib_manifest, wd)
    assert isinstance(res, CheckpointError) and "items.x.bytes" in str(res), res


# ================================================================================================== 2. validation
@pytest.mark.parametrize("field,value,words", [
    ("hidden_size", 10 ** 9, ("text_config.hidden_size", "out of range")),
    ("vocab_size", 2 ** 40, ("text_config.vocab_size", "out of range")),
    ("num_hidden_layers", 0, ("text_config.num_hidden_layers", "out of range")),
    ("num_attention_heads", 3, ("divisible",)),
    ("hidden_size", "128", ("text_config.hidden_size", "integer")),
])
def test_absurd_checkpoint_config_is_refused_before_loading(capsys, case, field, value, words):
    ck = _ck(case)
    _edit(ck / "config.json", lambda d: d["text_config"].__setitem__(field, value))
    res = _chat_ck(capsys, case, ck)
    res.assert_refused("config.json", *words)
    assert not [p for k, p in res.events if k == "read" and p.endswith(".safetensors")], "weights were read"


def test_absurd_manifest_config_is_refused(capsys, case):
    wd = _wd(case)
    _edit(wd / "manifest.json", lambda d: d["config"]["vision_representation_config"].__setitem__("hidden_size",
                                                                                                 10 ** 9))
    _chat_wd(capsys, case, wd).assert_refused("manifest.json", "config", "vision_representation_config.hidden_size")


def test_generation_config_bad_value_is_refused(capsys, case):
    ck = _ck(case)
    _edit(ck / "generation_config.json", lambda d: d.__setitem__("num_inference_steps", "many"))
    _chat_ck(capsys, case, ck).assert_refused("generation_config.json", "num_inference_steps")


@pytest.mark.parametrize("make,words", [
    (lambda: np.zeros((448, 64), np.float32), ("embed_tokens.npy", "shape [448, 64]", "[448, 128]")),
    (lambda: np.zeros((448, 128), np.float64), ("embed_tokens.npy", "dtype")),
    (lambda: np.zeros((448 * 128,), np.float32), ("embed_tokens.npy", "dimension")),
])
def test_wrong_embedding_table_is_refused(capsys, case, make, words):
    wd = _wd(case)
    np.save(wd / C.EMBED_FILE, make())
    _chat_wd(capsys, case, wd).assert_refused(*words)


def test_embedding_table_of_python_objects_is_never_unpickled(capsys, case, monkeypatch):
    wd = _wd(case)
    np.save(wd / C.EMBED_FILE, np.array([[{"x": 1}] * 128] * 448, dtype=object), allow_pickle=True)
    import pickle

    calls = []
    monkeypatch.setattr(pickle, "load", lambda *a, **k: calls.append(a))
    res = _chat_wd(capsys, case, wd)
    res.assert_refused("embed_tokens.npy", "python objects")
    assert not calls


def test_truncated_embedding_table_is_refused(capsys, case):
    wd = _wd(case)
    raw = (wd / C.EMBED_FILE).read_bytes()
    (wd / C.EMBED_FILE).write_bytes(raw[:len(raw) // 2])
    _chat_wd(capsys, case, wd).assert_refused("embed_tokens.npy", "truncated")


@pytest.mark.parametrize("edit,words", [
    (lambda d: d["cache"].__setitem__("num_kv_heads", 4), ("cache.num_kv_heads",)),
    (lambda d: d["cache"].__setitem__("head_dim", 16), ("cache.head_dim",)),
    (lambda d: d["cache"].__setitem__("num_layers", 3), ("cache.num_layers",)),
    (lambda d: [t["shape"].__setitem__(1, 4) for t in d["graphs"]["backbone"]["inputs"][3:]],
     ("graphs.backbone.inputs", "past_key_values.0.key")),
    (lambda d: d["graphs"]["backbone"]["outputs"].pop(), ("graphs.backbone.outputs", "present.3.value")),
])
def test_cache_layout_that_does_not_match_the_graphs_is_refused(capsys, case, edit, words):
    wd = _wd(case)
    _edit(wd / "manifest.json", edit)
    _chat_wd(capsys, case, wd).assert_refused("manifest.json", *words)


@pytest.mark.parametrize("content,words", [
    (b"[" * 200000 + b"]" * 200000, ("manifest.json", "nested")),
    (b'{"format": ' + b"[" * 100 + b"]" * 100 + b"}", ("manifest.json", "nested deeper than")),
    (b"\x00\xffnot json", ("manifest.json", "not valid JSON")),
    (b'{"format": NaN}', ("manifest.json", "not valid JSON")),
    (b'{"format": 1e999}', ("manifest.json", "out of range")),
    (b'{"format": "a", "format": "b"}', ("manifest.json", "duplicate key")),
    (b"[1, 2, 3]", ("manifest.json", "JSON object")),
    (b'{"format": "cheers-deploy-manifest/1", "max_context": ' + b"9" * 5000 + b"}", ("manifest.json", "JSON")),
])
def test_malformed_manifest_json_is_one_line(capsys, case, content, words):
    wd = _wd(case)
    (wd / "manifest.json").write_bytes(content)
    _chat_wd(capsys, case, wd).assert_refused(*words)


def test_huge_json_is_refused_unread(capsys, case):
    wd = _wd(case)
    with open(wd / "manifest.json", "r+b") as f:                      # sparse: 65 MiB on paper, nothing written
        f.truncate(65 * 2 ** 20)
    res = _chat_wd(capsys, case, wd)
    res.assert_refused("manifest.json", "bytes")
    ck = _ck(case)
    with open(ck / "config.json", "r+b") as f:
        f.truncate(65 * 2 ** 20)
    _chat_ck(capsys, case, ck).assert_refused("config.json", "bytes")


def test_non_json_checkpoint_files_are_one_line(capsys, case):
    ck = _ck(case)
    (ck / "config.json").write_text("[]")
    _chat_ck(capsys, case, ck).assert_refused("config.json", "JSON object")
    ck2 = _ck(case, "ck2")
    (ck2 / "vocabulary.json").write_text('{"words": ' * 500 + "1" + "}" * 500)
    _chat_ck(capsys, case, ck2).assert_refused("vocabulary.json", "nested")


@pytest.mark.parametrize("attack,words", [
    ("huge_length", ("model.safetensors", "header length")),
    ("beyond_file", ("model.safetensors", "data_offsets", "outside")),
    ("bad_dtype", ("model.safetensors", "dtype", "F99")),
    ("overlap", ("model.safetensors", "overlap")),
    ("size_mismatch", ("model.safetensors", "data_offsets", "needs")),
    ("negative_shape", ("model.safetensors", "shape")),
    ("not_json", ("model.safetensors", "not valid JSON")),
    ("metadata", ("model.safetensors", "__metadata__")),
])
def test_safetensors_header_attacks_are_refused(capsys, case, attack, words):
    ck = _ck(case)
    path = ck / "model.safetensors"
    header, data = _st_split(path)
    names = _tensors(header)
    if attack == "huge_length":
        _st_write(path, header, data, length=2 ** 62)
    else:
        if attack == "beyond_file":
            last = header[names[-1]]
            lo, hi = last["data_offsets"]
            last["data_offsets"] = [lo + 2 ** 40, hi + 2 ** 40]
        elif attack == "bad_dtype":
            header[names[0]]["dtype"] = "F99"
        elif attack == "overlap":
            sizes = {}
            for n in names:
                lo, hi = header[n]["data_offsets"]
                if (hi - lo) in sizes:
                    header[n]["data_offsets"] = header[sizes[hi - lo]]["data_offsets"]
                    break
                sizes[hi - lo] = n
        elif attack == "size_mismatch":
            header[names[0]]["shape"] = [d * 2 for d in header[names[0]]["shape"]] or [2]
        elif attack == "negative_shape":
            header[names[0]]["shape"] = [-1]
        elif attack == "metadata":
            header["__metadata__"] = {"format": ["pt"]}
        if attack == "not_json":
            hb = b"{" * 10 + b"   "
            path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)
        else:
            _st_write(path, header, data)
    res = _chat_ck(capsys, case, ck)
    res.assert_refused(*words)


# ================================================================================================== 6. mixed workdir
def test_mixed_workdir_is_refused_naming_the_graphs(capsys, case):
    wd = _wd(case)
    _edit(wd / "manifest.json", lambda d: d["graphs"]["cfm_head"].__setitem__("checkpoint_hash", "f" * 64))
    _chat_wd(capsys, case, wd).assert_refused("mixed workdir", "cfm_head", "another checkpoint")
    _edit(wd / "manifest.json", lambda d: d["graphs"]["cfm_head"].__setitem__(
        "checkpoint_hash", d["checkpoint"]["hash"]) or d["embed_tokens"].__setitem__("checkpoint_hash", "e" * 64))
    _chat_wd(capsys, case, wd).assert_refused("mixed workdir", C.EMBED_FILE)
    # every graph agrees with each other, but not with the manifest (its checkpoint was re-exported first)
    _edit(wd / "manifest.json", lambda d: d["checkpoint"].__setitem__("hash", "a" * 64))
    _chat_wd(capsys, case, wd).assert_refused("mixed workdir", "backbone")


def test_mixed_workdir_without_recorded_checkpoint_hashes_is_refused(capsys, case):
    """A manifest of a version that recorded only source hashes: they must all agree."""
    wd = _wd(case)

    def legacy(d):
        for e in d["graphs"].values():
            e.pop("checkpoint_hash", None)
        d["embed_tokens"].pop("checkpoint_hash", None)
        d["graphs"]["vae_decoder"]["source_hash"] = "0" * 64
    _edit(wd / "manifest.json", legacy)
    _chat_wd(capsys, case, wd).assert_refused("mixed workdir", "vae_decoder")
    _edit(wd / "manifest.json", lambda d: d["graphs"]["backbone"].__setitem__("checkpoint_hash", "1" * 64))
    _chat_wd(capsys, case, wd).assert_refused("do not record the checkpoint")


def test_graphs_record_their_checkpoint_hash(case):
    from cheers_deploy.manifest import Manifest

    man = Manifest.load(BUNDLED_WD)
    want = man.checkpoint["hash"]
    assert want and all(e.checkpoint_hash == want for e in man.graphs.values())
    assert man.embed_tokens.get("checkpoint_hash") == want


# ================================================================================================== 5. export
def test_export_into_a_non_empty_folder_that_is_not_a_workdir_is_refused(capsys, case):
    _torch()
    out = case / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"jpeg")
    res = run_cli(capsys, case, ["export", "--out", str(out), "--quiet"])
    res.assert_refused("not empty", "not a workdir", "--overwrite", "holiday.jpg")
    assert sorted(p.name for p in out.iterdir()) == ["holiday.jpg"]          # nothing written into it


def test_export_out_dir_rules():
    from cheers_deploy.errors import InputError
    from cheers_deploy.export.exporter import LOCK_FILE, check_out_dir

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        check_out_dir(d / "new")                                   # a new folder
        check_out_dir(d)                                           # an empty one
        (d / LOCK_FILE).write_text("1\n")
        check_out_dir(d)                                           # only a lock file left by an earlier export
        (d / "notes.txt").write_text("x")
        with pytest.raises(InputError, match="--overwrite"):
            check_out_dir(d)
        check_out_dir(d, overwrite=True)
        (d / C.MANIFEST_NAME).write_text("{}")
        check_out_dir(d)                                           # a workdir: re-export into it
        with pytest.raises(InputError, match="not a folder"):
            check_out_dir(d / "notes.txt")


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0); os.pwrite(fd, (str(os.getpid()) + "\\n").encode(), 0)
print("locked", flush=True)
time.sleep(60)
"""


def test_concurrent_export_fails_at_once_naming_the_holder(capsys, case):
    pytest.importorskip("fcntl")
    _torch()
    from cheers_deploy.export.exporter import LOCK_FILE

    wd = _wd(case)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(wd / LOCK_FILE)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = (wd / "manifest.json").read_bytes()
        t0 = time.monotonic()
        res = run_cli(capsys, case, ["export", "--out", str(wd), "--quiet"])
        res.assert_refused("another process", f"pid {holder.pid}", LOCK_FILE)
        assert time.monotonic() - t0 < 30                          # failed at once, did not wait or export
        assert (wd / "manifest.json").read_bytes() == before
    finally:
        holder.kill()
        holder.wait()


def test_lock_is_exclusive_between_processes(tmp_path):
    """fileio.exclusive_lock: the holder's pid is in the file; a second process fails at once; released after."""
    pytest.importorskip("fcntl")
    from cheers_deploy.fileio import exclusive_lock

    lock = tmp_path / ".export.lock"
    probe = ("import sys\nfrom cheers_deploy.fileio import exclusive_lock\nfrom cheers_deploy.errors import "
             "CheersError\ntry:\n    with exclusive_lock(sys.argv[1], 'export'):\n        print('got it')\n"
             "except CheersError as e:\n    print(e)\n")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    with exclusive_lock(lock, "export"):
        assert lock.read_text().strip() == str(os.getpid())
        out = subprocess.run([sys.executable, "-c", probe, str(lock)], capture_output=True, text=True, env=env,
                             timeout=60).stdout
        assert f"pid {os.getpid()}" in out and "got it" not in out, out
    out = subprocess.run([sys.executable, "-c", probe, str(lock)], capture_output=True, text=True, env=env,
                         timeout=60).stdout
    assert "got it" in out, out


# ================================================================================================== library level
def test_contained_helper_rules(tmp_path):
    from cheers_deploy.fileio import contained

    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.onnx").write_bytes(b"x")
    (tmp_path / "secret").write_bytes(b"s")
    assert contained(root, "sub/a.onnx", "f") == root / "sub" / "a.onnx"
    assert contained(root, "not-yet.onnx", "f") == root / "not-yet.onnx"          # existence is the caller's
    os.symlink("sub/a.onnx", root / "inside-link")
    assert contained(root, "inside-link", "f") == root / "inside-link"
    os.symlink(tmp_path / "secret", root / "out-link")
    os.symlink(tmp_path, root / "dir-link")
    for bad, word in (("../secret", "'..'"), (str(tmp_path / "secret"), "absolute"), ("out-link", "outside"),
                      ("dir-link/secret", "outside"), ("", "relative file name"), ("a\0b", "usable"),
                      ("sub/../../secret", "'..'"), ("~/x", "absolute")):
        with pytest.raises(CheckpointError, match=word):
            contained(root, bad, "manifest.json: field 'graphs.x.file'")
    link_root = tmp_path / "typed-link"
    os.symlink(root, link_root)
    assert contained(link_root, "sub/a.onnx", "f") == link_root / "sub" / "a.onnx"   # the folder via a link


def test_hub_snapshot_links_into_blobs_are_allowed(tmp_path):
    """Hugging Face cache snapshots are links into the repository's blobs/ folder: allowed there, nowhere else."""
    from cheers_deploy.fileio import contained

    storage = tmp_path / "hub" / "models--ai9stars--Cheers"
    snap = storage / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (storage / "blobs").mkdir()
    (storage / "blobs" / "abc").write_text("{}")
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text("0" * 40)
    os.symlink("../../blobs/abc", snap / "config.json")
    os.symlink("../../refs/main", snap / "escape.json")
    assert contained(snap, "config.json", "f") == snap / "config.json"
    with pytest.raises(CheckpointError, match="outside"):
        contained(snap, "escape.json", "f")


def test_library_loaders_refuse_with_checkpoint_errors(case, outside):
    """The same refusals through the library entry points (Manifest.load, Pipeline.from_workdir, weight_files)."""
    from cheers_deploy.checkpoint import weight_files
    from cheers_deploy.manifest import Manifest
    from cheers_deploy.runtime.pipeline import Pipeline

    wd = _wd(case)
    _edit(wd / "manifest.json", lambda d: d["graphs"]["backbone"].__setitem__("file", "/etc/passwd"))
    res, events = record(Manifest.load, wd)
    assert isinstance(res, CheckpointError) and "graphs.backbone.file" in str(res)
    res, events = record(Pipeline.from_workdir, wd)
    assert isinstance(res, CheckpointError) and not [p for k, p in events if p == "/etc/passwd"]
    ck = _ck(case)
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": str(outside / "m")}}))
    res, _ = record(weight_files, ck)
    assert isinstance(res, CheckpointError) and "weight_map.x" in str(res)
    assert isinstance(res, CheersError)
