"""ONNX export: specs, the manifest, per-graph parity of the exported graphs with the torch reference model,
the fp16-safe mask, external data, and idempotent re-export.

The tiny random checkpoint (conftest `tiny_ckpt`) is exported once per session into the pytest base temp
dir; `tiny_workdir` is the same call in every module that needs it (the second call is an idempotent skip).
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from cheers_deploy.checkpoint import checkpoint_hash  # noqa: E402
from cheers_deploy.export import exporter  # noqa: E402
from cheers_deploy.constants import GRAPH_NAMES  # noqa: E402
from cheers_deploy.export.specs import graph_specs  # noqa: E402
from cheers_deploy.manifest import GraphEntry, Manifest, check_io  # noqa: E402
from cheers_deploy.errors import CheckpointError  # noqa: E402

from helpers import export_tiny  # noqa: E402  (tests/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_workdir(tiny_ckpt, tmp_path_factory) -> Path:
    return export_tiny(tiny_ckpt, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def torch_model(tiny_ckpt):
    from cheers_deploy.runtime.pipeline import Pipeline

    return Pipeline.from_pretrained(tiny_ckpt).backend.model


def _rel_err(a, b) -> float:
    b = np.asarray(b, np.float64)
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(np.abs(b).max(), 1e-6))


# ---------------------------------------------------------------------------------------------------- specs

def test_backbone_spec_names_axes_and_profiles(tiny_config):
    spec = graph_specs(tiny_config, 64, batch_max=2, max_context=256)["backbone"]
    t = tiny_config.text_config
    assert spec.input_names[:3] == ["inputs_embeds", "position_ids", "attention_mask"]
    assert spec.output_names[:2] == ["hidden_states", "logits"]
    assert spec.input_names[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert spec.output_names[-1] == f"present.{t.num_hidden_layers - 1}.value"
    dtypes = {x.name: x.dtype for x in spec.inputs}
    assert dtypes["attention_mask"] == "bool" and dtypes["position_ids"] == "int64"
    axes = spec.dynamic_axes()
    assert axes["attention_mask"] == {0: "batch", 2: "seq", 3: "total"}
    assert axes["past_key_values.0.key"] == {0: "batch", 2: "past"}
    assert axes["logits"] == {0: "batch"}
    profiles = spec.profiles()
    assert set(profiles) == {"prefill", "decode", "image_step"}
    for mode, prof in profiles.items():
        for k in range(3):                                  # min, opt, max
            s = prof["inputs_embeds"][k][1]
            assert prof["past_key_values.0.key"][k][2] == 256          # static buffer in every mode
            assert prof["attention_mask"][k][3] == 256 + s             # keys = buffer + new positions
            assert prof["position_ids"][k] == prof["inputs_embeds"][k][:2]
    assert {p[1] for p in profiles["decode"]["inputs_embeds"]} == {1}
    assert {p[1] for p in profiles["image_step"]["inputs_embeds"]} == {spec.tokens_per_image}


def test_specs_reject_bad_sizes(tiny_config):
    with pytest.raises(ValueError):
        graph_specs(tiny_config, 48)                        # not a multiple of 2 x patch
    with pytest.raises(ValueError):
        graph_specs(tiny_config, 64, max_context=4)         # cannot hold an image


# ---------------------------------------------------------------------------------------------------- manifest

def test_manifest_contents(tiny_workdir, tiny_ckpt, tiny_config):
    man = Manifest.load(tiny_workdir)
    d = json.loads((tiny_workdir / "manifest.json").read_text())      # the file stays plain JSON
    assert d["precision"] == "fp32" and d["opset"] == 18 and man.opset == 18
    assert man.checkpoint["hash"] == checkpoint_hash(tiny_ckpt)
    assert man.config["text_config"]["vocab_size"] == tiny_config.text_config.vocab_size
    assert d["image"] == {"resolution": 64, "patch_size": 16, "latent_grid": 4, "latent_channels": 128,
                          "tokens_per_image": 4}
    assert man.image.tokens_per_image == 4 and man.image.latent_grid == 4
    assert man.special_tokens["img_start"] == 151667 and man.special_tokens["chat_end"] == 151645
    assert man.cache.layout == "static-buffer/new-entries"
    assert man.cache.names("past_key")[1] == "past_key_values.1.key"
    assert {"torch", "onnx", "onnxruntime", "cheers_deploy"} <= set(man.exporter)
    # generation defaults: the random tiny checkpoint has no generation_config.json -> the official ones
    assert (man.generation.steps, man.generation.cfg_scale, man.generation.alpha) == (80, 9.5, 0.5)
    assert set(man.graphs) == set(GRAPH_NAMES)
    for name, g in man.graphs.items():
        assert (tiny_workdir / g.file).is_file(), name
        assert g.extra["verify_max_rel_err"] < 1e-4, name
        assert g.external_data is None                     # tiny graphs stay single files
    assert Manifest.from_dict(man.to_dict()).to_dict() == man.to_dict()      # round trip keeps everything
    table = np.load(tiny_workdir / man.embed_file)
    assert table.shape == (tiny_config.text_config.vocab_size, tiny_config.text_config.hidden_size)
    for f in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        assert (tiny_workdir / f).is_file()
    assert json.loads((tiny_workdir / "preprocessor_config.json").read_text())["scale_resolution"] == 64


def test_check_io_names_the_graph_and_tensor():
    entry = GraphEntry.from_dict("vae_decoder", {
        "file": "vae_decoder.onnx",
        "inputs": [{"name": "latent", "dtype": "float32", "shape": ["batch", 128, 4, 4]}],
        "outputs": [{"name": "pixels", "dtype": "float32", "shape": ["batch", 3, 64, 64]}]}, "test")
    ok_in, ok_out = [("latent", "float32", ["b", 128, 4, 4])], [("pixels", "float32", ["b", 3, 64, 64])]
    check_io("vae_decoder", entry, ok_in, ok_out)
    cases = [([("z", "float32", ["b", 128, 4, 4])], ok_out, "latent"),
             (ok_in, [("pixels", "float16", ["b", 3, 64, 64])], "float16"),
             (ok_in, [("pixels", "float32", ["b", 3, 32, 64])], "axis 2"),
             ([("latent", "float32", [1, 128, 4, 4])], ok_out, "dynamic")]
    for ins, outs, needle in cases:
        with pytest.raises(CheckpointError, match="vae_decoder") as err:
            check_io("vae_decoder", entry, ins, outs)
        assert needle in str(err.value)


# ---------------------------------------------------------------------------------------------------- graphs

def _session(path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _graph_inputs(spec, seed):
    """Fresh random inputs (other seeds and sizes than export used)."""
    if spec.name == "backbone":
        return [spec.sample_inputs(batch=2, seed=seed, seq=6, past=20, start=13),
                spec.sample_inputs(batch=1, seed=seed + 1, seq=1, past=32, start=31)]
    if spec.name in ("vae_decoder", "vision_tokenizer"):   # the 64x64 decoders dominate CPU time: batch 1
        return [spec.sample_inputs(batch=1, seed=seed)]
    return [spec.sample_inputs(batch=2, seed=seed), spec.sample_inputs(batch=1, seed=seed + 1)]


@pytest.mark.parametrize("name", GRAPH_NAMES)
def test_graph_matches_torch(name, tiny_workdir, torch_model, tiny_config):
    """Every output of every graph equals the reference module's within 1e-4 of the output's scale."""
    man = Manifest.load(tiny_workdir)
    spec = graph_specs(tiny_config, 64, 2, man.max_context)[name]
    sess = _session(tiny_workdir / man.graph(name).file)
    assert [i.name for i in sess.get_inputs()] == spec.input_names
    assert [o.name for o in sess.get_outputs()] == spec.output_names
    m = torch_model
    for args in _graph_inputs(spec, seed=100):
        with torch.no_grad():
            if name == "vae_encoder":
                ref = (m.vae_encode(args[0]),)
            elif name == "vision_tokenizer":
                ref = m.vision_tokenize(args[0])
            elif name == "cfm_head":
                ref = (m.cfm_head(*args),)
            elif name == "vae_decoder":
                ref = (m.vae_decode(args[0]),)
            else:                                           # the reference LM with SDPA and a concatenated cache
                n = len(args[3:]) // 2
                past = [(args[3 + 2 * i], args[4 + 2 * i]) for i in range(n)]
                hidden, new = m.backbone(args[0], args[1], args[2], past)
                ref = (hidden, m.logits(hidden[:, -1])) + tuple(t for kv in new for t in kv)
        outs = sess.run(None, {k: v.numpy() for k, v in zip(spec.input_names, args)})
        assert len(outs) == len(ref)
        for o, r, oname in zip(outs, ref, spec.output_names):
            assert o.shape == tuple(r.shape), oname
            assert _rel_err(o, r.numpy()) <= 1e-4, (name, oname, _rel_err(o, r.numpy()))


def test_backbone_mask_is_boolean_where_without_infinities(tiny_workdir):
    """The mask reaches the scores only through Where (no additive -inf/finfo.min mask: fp16-safe)."""
    model = onnx.load(str(tiny_workdir / "backbone.onnx"))
    consumers = [n for n in model.graph.node if "attention_mask" in n.input]
    assert consumers and all(n.op_type == "Where" for n in consumers)
    for t in list(model.graph.initializer) + [a.t for n in model.graph.node for a in n.attribute if a.t.dims or
                                              a.t.raw_data or a.t.float_data]:
        if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) < 64:
            assert np.isfinite(onnx.numpy_helper.to_array(t)).all()
    assert not any(n.op_type == "Add" and any(i in {c.output[0] for c in consumers} for i in n.input)
                   for n in model.graph.node)


def test_external_data_path(tiny_ckpt, tmp_path, monkeypatch):
    """Graphs above the size limit are written as <name>.onnx + one <name>.onnx.data and still verify."""
    monkeypatch.setattr(exporter, "EXTERNAL_DATA_BYTES", 100_000)
    man = exporter.export_all(tiny_ckpt, tmp_path, graphs=["cfm_head"], progress=False)
    g = man.graph("cfm_head")
    assert g.external_data == "cfm_head.onnx.data" and (tmp_path / g.external_data).is_file()
    assert (tmp_path / "cfm_head.onnx").stat().st_size < 1_000_000 < (tmp_path / g.external_data).stat().st_size
    assert g.extra["verify_max_rel_err"] < 1e-4
    assert sorted(p.name for p in tmp_path.iterdir() if "cfm" in p.name) == ["cfm_head.onnx", "cfm_head.onnx.data"]


# ---------------------------------------------------------------------------------------------------- idempotence

def _mtimes(d: Path):
    return {p.name: p.stat().st_mtime_ns for p in d.glob("*.onnx")}


def test_export_is_idempotent(tiny_workdir, tiny_ckpt, tmp_path):
    wd = tmp_path / "wd"
    shutil.copytree(tiny_workdir, wd)
    before = _mtimes(wd)
    man = exporter.export_all(tiny_ckpt, wd, progress=False)               # everything up to date
    assert _mtimes(wd) == before
    # the context length only changes build profiles and the manifest: no re-export
    man = exporter.export_all(tiny_ckpt, wd, progress=False, max_context=512)
    assert _mtimes(wd) == before and man.max_context == 512
    assert man.graph("backbone").profiles["decode"]["past_key_values.0.key"][2][2] == 512
    # --force re-exports what it is asked to
    exporter.export_all(tiny_ckpt, wd, progress=False, graphs=["cfm_head"], force=True)
    after = _mtimes(wd)
    assert after["cfm_head.onnx"] != before["cfm_head.onnx"]
    assert {k: v for k, v in after.items() if k != "cfm_head.onnx"} == \
           {k: v for k, v in before.items() if k != "cfm_head.onnx"}
    # a changed source (checkpoint or code) re-exports that graph
    data = json.loads((wd / "manifest.json").read_text())
    data["graphs"]["cfm_head"]["source_hash"] = "stale"
    (wd / "manifest.json").write_text(json.dumps(data))
    forced = _mtimes(wd)["cfm_head.onnx"]
    exporter.export_all(tiny_ckpt, wd, progress=False, graphs=["cfm_head"])
    assert _mtimes(wd)["cfm_head.onnx"] != forced
    assert Manifest.load(wd).graph("cfm_head").source_hash != "stale"


def test_retrained_checkpoint_is_not_up_to_date(tiny_workdir, tiny_ckpt, tmp_path, capsys):
    """Same architecture, same header and file size, other weights (a retrained model copied over the old
    one): the hash changes, the graph is re-exported, and calibration data of the old weights is dropped."""
    from safetensors.numpy import load_file, save_file

    ck = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ck)
    (wf,) = sorted(ck.glob("*.safetensors"))
    header = wf.read_bytes()[: 8 + int.from_bytes(wf.read_bytes()[:8], "little")]
    assert checkpoint_hash(ck) == checkpoint_hash(tiny_ckpt)
    tensors = load_file(str(wf))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + np.asarray(1e-3, tensors[name].dtype)
    save_file(tensors, str(wf), metadata=json.loads(header[8:]).get("__metadata__"))
    assert wf.read_bytes()[: len(header)] == header and wf.stat().st_size == (tiny_ckpt / wf.name).stat().st_size
    assert checkpoint_hash(ck) != checkpoint_hash(tiny_ckpt)

    wd = tmp_path / "wd"
    shutil.copytree(tiny_workdir, wd)
    data = json.loads((wd / "manifest.json").read_text())
    data["calibration"] = {"captures": "old"}
    (wd / "manifest.json").write_text(json.dumps(data))
    before = _mtimes(wd)
    capsys.readouterr()
    exporter.export_all(ck, wd, progress=False, graphs=["cfm_head"])
    assert "another checkpoint" in capsys.readouterr().err
    man = Manifest.load(wd)
    assert _mtimes(wd)["cfm_head.onnx"] != before["cfm_head.onnx"]
    assert not man.calibration and set(man.graphs) == {"cfm_head"}
    assert man.checkpoint["hash"] == checkpoint_hash(ck)


def test_export_script(tiny_workdir, tiny_ckpt, tmp_path):
    """export/export.py (the thin script) on an up-to-date copy: exits 0 and lists the graphs."""
    wd = tmp_path / "wd"
    shutil.copytree(tiny_workdir, wd)
    proc = subprocess.run([sys.executable, str(REPO / "export" / "export.py"), "--checkpoint", str(tiny_ckpt),
                           "--out", str(wd), "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "backbone" in proc.stdout and "manifest.json" in proc.stdout
    bad = subprocess.run([sys.executable, str(REPO / "export" / "export.py"), "--checkpoint",
                          str(tmp_path / "nope"), "--out", str(wd)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "checkpoint directory not found" in bad.stderr


# ---------------------------------------------------------------------------------------------------- full size

@pytest.mark.slow
def test_official_size_export(tmp_path):
    """cfm_head and backbone of cheers-official with random weights (about 8 GB of fp32 weights; needs
    ~16 GB RAM, ~30 GB disk and several minutes; docs/export.md lists the measured figures)."""
    proc = subprocess.run([sys.executable, "-m", "cheers_deploy.export.compare", "official", "--out", str(tmp_path),
                           "--graphs", "cfm_head,backbone", "--json", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=3 * 3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["graphs"]["backbone"]["files"]["backbone.onnx.data"] > 5e9
    assert r["graphs"]["backbone"]["verify_max_rel_err"] < 1e-4
