"""Precision workflow on the tiny random checkpoint: capture -> quantize (INT8 Q/DQ) -> fp16 convert -> report."""
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import export_tiny  # noqa: E402  (tests/ is on sys.path)

from cheers_deploy.precision import capture as cap  # noqa: E402
from cheers_deploy.precision import convert as conv  # noqa: E402
from cheers_deploy.precision import quantize as quant  # noqa: E402
from cheers_deploy.precision import report as rep  # noqa: E402
from cheers_deploy.precision.common import GRAPHS  # noqa: E402
from cheers_deploy.manifest import Manifest  # noqa: E402
from cheers_deploy.runtime.pipeline import Pipeline  # noqa: E402


@pytest.fixture(scope="module")
def wd(tiny_ckpt, tmp_path_factory) -> Path:
    """A private view of the session's tiny export: graph files linked, manifest copied (we add variants)."""
    src = export_tiny(tiny_ckpt, tmp_path_factory.getbasetemp())
    out = tmp_path_factory.mktemp("calib") / "wd"
    out.mkdir()
    for f in src.iterdir():
        if f.is_file():
            (shutil.copy if f.name == "manifest.json" else os.link)(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def captured(wd):
    cm = cap.capture(wd, n=2, steps=3, euler_samples=2, progress=False, log=lambda *a: None)
    return cm


def test_capture_records_every_graph_and_mode_and_resumes(wd, captured):
    item = next(iter(captured["items"].values()))
    assert set(item["graphs"]) == set(GRAPHS)
    assert {"u-prefill", "u-decode", "g-prefill", "g-image_step"} <= set(item["graphs"]["backbone"])
    assert item["graphs"]["cfm_head"]["g-default"] == 2           # Euler steps sampled across t
    again = cap.capture(wd, n=2, steps=3, progress=False, log=lambda *a: None)
    assert again["total_bytes"] == captured["total_bytes"]       # nothing re-captured


@pytest.fixture(scope="module")
def quantized(wd, captured):
    return quant.quantize(wd, method="minmax", log=lambda *a: None)


def test_int8_graphs_are_symmetric_qdq_per_channel(wd, quantized):
    man = Manifest.load(wd)
    for g in GRAPHS:
        v = man.graph(g).precisions["int8"].to_dict()
        assert v["file"] == f"{g}.int8.onnx" and (wd / v["file"]).is_file() and v["sha256"]
        m = onnx.load(str(wd / v["file"]))
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
        q = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
        dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
        assert q and dq, g
        for n in q:                                              # activations: int8, zero point 0
            zp = inits[n.input[2]]
            assert zp.dtype == np.int8 and not zp.any(), (g, n.name)
        weight_dq = [n for n in dq if n.input[0] in inits and inits[n.input[1]].size > 1]
        assert weight_dq, g                                      # per-channel weights: vector scales + axis
        for n in weight_dq:
            assert any(a.name == "axis" for a in n.attribute), (g, n.name)
            assert not inits[n.input[2]].any()
    # the hi gate stays fp32 (exact TensorRT plugin fusion)
    excl = man.graph("cfm_head").precisions["int8"].extra["excluded_nodes"]
    assert any("hi_gate" in n for n in excl)


def test_int8_runs_end_to_end_in_ort_cpu(wd, quantized):
    p32 = Pipeline.from_workdir(wd)
    p8 = Pipeline.from_workdir(wd, precision="int8")
    assert p8.backend.precision == "int8"
    a = p32.generate("a red circle on the left", steps=3, cfg_scale=3.0, seed=3, max_new_tokens=1)
    b = p8.generate("a red circle on the left", steps=3, cfg_scale=3.0, seed=3, max_new_tokens=1)
    assert b.image.shape == a.image.shape and b.image.dtype == np.uint8
    assert rep.psnr(a.image, b.image) > 15.0


def test_fp16_keeps_io_fp32_and_small_error(wd, captured):
    conv.convert(wd, "fp16", log=lambda *a: None)
    man = Manifest.load(wd)
    for g in GRAPHS:
        m = onnx.load(str(wd / man.graph(g).precisions["fp16"].file), load_external_data=False)
        types = {vi.name: vi.type.tensor_type.elem_type for vi in list(m.graph.input) + list(m.graph.output)}
        want = {t.name: t.dtype for t in man.graph(g).inputs + man.graph(g).outputs}
        for name, dt in want.items():
            if dt == "float32":
                assert types[name] == onnx.TensorProto.FLOAT, (g, name)
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in m.graph.initializer), g
    err = rep.graph_errors(wd, "fp16", limit=1)
    for g, e in err.items():
        assert e["engine"] == "ort-cpu"
        assert e["cosine"] > 0.999, (g, e)


def test_report_json_has_documented_keys(wd, quantized, tmp_path):
    path = tmp_path / "report.json"
    res = rep.report(wd, eval_n=1, steps=2, limit=1, json_path=path, out_dir=tmp_path,
                     precisions=["fp32", "int8"], n_text=2, log=lambda *a: None)
    data = json.loads(path.read_text())
    for p in ("fp32", "int8"):
        e = data["precisions"][p]
        assert isinstance(e["understanding"]["exact_match"], float)
        for k in ("color", "shape", "position"):
            assert isinstance(e["generation"][k], float)
        assert "image_psnr_db" in e
    assert data["precisions"]["int8"]["graphs"]["backbone"]["cosine"] > 0.9
    assert Path(res["plot"]).is_file() and Path(res["markdown"]).is_file()


def test_layer_groups_follow_numbered_layers(wd):
    m = onnx.load(str(wd / "backbone.onnx"), load_external_data=False)
    groups = quant.layer_groups(m)
    n_layers = Manifest.load(wd).config["text_config"]["num_hidden_layers"]
    assert [k for k in groups if "/layers." in k] == [f"/language_model/layers.{i}" for i in range(n_layers)]
    quantizable = [n.name for n in m.graph.node if n.op_type in quant.OP_TYPES]
    assert sorted(sum(groups.values(), [])) == sorted(quantizable)       # every node in exactly one group


def test_sweep_per_graph_and_per_layer(wd, quantized, tmp_path):
    """Thresholds every probe passes (0) make the plan deterministic on a random model; a per-layer sweep of
    cfm_head then writes and registers cfm_head.int8_layers.onnx, which the "mixed" pipeline runs."""
    work = tmp_path / "wd"
    shutil.copytree(wd, work, symlinks=True)
    res = rep.sweep(work, psnr_min=0.0, agree_min=0.0, per_layer=["cfm_head"], steps=2, n_text=2,
                    log=lambda *a: None)
    assert res["plan"] == {**{g: "int8" for g in GRAPHS}, "cfm_head": "int8_layers"}
    from cheers_deploy.data import shapes as W
    assert res["per_graph"]["backbone"]["answers"] == sum(len(s.qa) for s in W.make_split("heldout", 2, seed=7))
    layer = res["per_layer"]["cfm_head"]
    assert layer["ok"] and len(layer["groups"]) >= 2 and all(v["keep_int8"] for v in layer["groups"].values())
    man = Manifest.load(work)
    v = man.graph("cfm_head").precisions["int8_layers"].to_dict()
    assert (work / v["file"]).is_file() and not list(work.glob("*int8_probe*"))
    model = onnx.load(str(work / "cfm_head.onnx"), load_external_data=False)
    assert set(quant.hi_gate_nodes(model)) <= set(v["excluded_nodes"])     # plugin region stays float
    assert man.graph("cfm_head").precisions["mixed"].extra["from"] == "int8_layers"
    out = Pipeline.from_workdir(work, precision="mixed").generate("a red circle", steps=2, seed=1, max_new_tokens=1)
    assert out.image.dtype == np.uint8


def test_sweep_falls_back_when_nothing_passes(wd, quantized, tmp_path):
    work = tmp_path / "wd"
    shutil.copytree(wd, work, symlinks=True)
    res = rep.sweep(work, psnr_min=0.0, agree_min=1.01, fallback="fp32", steps=2, n_text=1, log=lambda *a: None)
    assert set(res["plan"].values()) == {"fp32"} and res["per_layer"] == {}
    assert Manifest.load(work).calibration["mixed"]["plan"] == res["plan"]


def test_cli_runs_a_precision_variant(wd, quantized, tmp_path, capsys):
    from cheers_deploy import cli

    out = tmp_path / "x.png"
    assert cli.main(["generate", "--workdir", str(wd), "--precision", "int8", "--prompt", "a red circle",
                     "--steps", "2", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["ask", "--workdir", str(wd), "--precision", "no-such", "--image", str(out),
                     "--question", "what?"]) == 2
    assert "no no-such file" in capsys.readouterr().err
    assert cli.main(["ask", "--precision", "int8", "--image", str(out), "--question", "what?"]) == 2


def test_requantizing_drops_the_stale_sweep(wd, quantized, tmp_path):
    work = tmp_path / "wd"
    shutil.copytree(wd, work, symlinks=True)
    rep.sweep(work, psnr_min=0.0, agree_min=0.0, steps=1, n_text=1, log=lambda *a: None)
    assert "mixed" in rep.available_precisions(Manifest.load(work))
    said = []
    quant.quantize(work, ["vae_decoder"], "minmax", log=said.append)
    man = Manifest.load(work)
    assert "mixed" not in rep.available_precisions(man) and "mixed" not in man.calibration
    assert any("dropped mixed" in line for line in said)
