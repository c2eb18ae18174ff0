"""Hi-gate fusion (cheers_deploy.build.surgery): the fused cfm_head graph, run by ONNX Runtime through the
reference FunctionProto, equals the exported graph; the plugin's numpy reference agrees; Q/DQ graphs fuse too."""
import copy

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from cheers_deploy.build import surgery as S  # noqa: E402
from cheers_deploy.build.plugin_build import numpy_reference  # noqa: E402

RTOL = 1e-5


# --------------------------------------------------------------------------------------------------- helpers
def _session(model):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _with_outputs(model, names):
    """Copy of the model that also returns the given intermediate tensors (float, any shape)."""
    m = copy.deepcopy(model)
    have = {o.name for o in m.graph.output}
    try:
        inferred = onnx.shape_inference.infer_shapes(m)
        types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    except Exception:  # noqa: BLE001 - graphs with custom ops: fall back to float
        types = {}
    for n in names:
        if n not in have:
            m.graph.output.append(helper.make_tensor_value_info(n, types.get(n) or TensorProto.FLOAT, None))
    return m


def _run(model, feed, names=None):
    if names:
        model = _with_outputs(model, names)
        outs = _session(model).run(names, feed)
        return dict(zip(names, outs))
    return _session(model).run(None, feed)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _feed(batch, seed=0, m=4, n=16, d=64):
    rng = np.random.default_rng(seed)
    return {"hidden": rng.standard_normal((batch, m, d), dtype=np.float32),
            "patch_embeds": rng.standard_normal((batch, n, d), dtype=np.float32),
            "t": rng.random(batch, dtype=np.float32)}


def _fused(model, **kw):
    f = copy.deepcopy(model)
    rep = S.fuse_model(f, **kw)
    return f, rep


def _reference_check(unfused, match, feed, fused=None):
    """numpy_reference on the boundary tensors of the unfused graph equals the LayerNorm output of the unfused
    graph (and of the fused graph, if given)."""
    vals = _run(unfused, feed, [match.low, match.high, match.h, match.output])
    ref = numpy_reference(vals[match.low], vals[match.high], vals[match.h], match.w2, match.b2, match.ln_w,
                          match.ln_b, match.eps)
    assert _rel(vals[match.output], ref) <= RTOL
    if fused is not None:
        got = _run(fused, feed, [match.output])[match.output]
        assert _rel(got, ref) <= RTOL
    return ref


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cfm_head(tiny_ckpt, tmp_path_factory):
    """The real exported cfm_head graph of a random tiny checkpoint."""
    pytest.importorskip("torch")
    from cheers_deploy.export.exporter import export_all

    out = tmp_path_factory.mktemp("surgery-export")
    man = export_all(tiny_ckpt, out, graphs=["cfm_head"], progress=False, max_context=64)
    return onnx.load(str(out / man.graph("cfm_head").file)), out / man.graph("cfm_head").file


def _quantize_weights_dq(model, per_axis_w2=True, act_qdq_first_gemm=True):
    """A hand-built Q/DQ graph: every constant 2-D MatMul weight becomes int8 + DequantizeLinear (per tensor; the
    hi gate's w2 [C,1] per axis 0), and the first hi-gate GEMM reads `low` through a Q->DQ pair. The gate tail has
    no activation Q/DQ (the calibration setting recommended for the plugin), so fusion must be exact."""
    m = copy.deepcopy(model)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    new_nodes, k = [], 0
    w2_name = None
    for n in g.node:
        if n.op_type == "MatMul" and "hi_gate/gate/gate.2" in n.name:
            w2_name = n.input[1]
    for n in list(g.node):
        if n.op_type != "MatMul" or n.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        if w.ndim != 2:
            continue
        k += 1
        if n.input[1] == w2_name and per_axis_w2:
            scale = (np.abs(w).max(axis=1) / 127.0 + 1e-12).astype(np.float32)          # [C] along axis 0
            q = np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8)
            axis = 0
        else:
            scale = np.asarray(np.abs(w).max() / 127.0 + 1e-12, np.float32)
            q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
            axis = 1
        qn, sn, dqo = f"wq{k}", f"ws{k}", f"wdq{k}"
        g.initializer.extend([numpy_helper.from_array(q, qn), numpy_helper.from_array(scale, sn)])
        new_nodes.append((n, helper.make_node("DequantizeLinear", [qn, sn], [dqo], name=f"DQ_w{k}", axis=axis)))
        n.input[1] = dqo
    for n, dq in new_nodes:
        idx = list(g.node).index(n)
        g.node.insert(idx, dq)
    if act_qdq_first_gemm:
        for n in list(g.node):
            if n.op_type == "MatMul" and "hi_gate/gate/gate.0" in n.name:
                x = n.input[0]
                g.initializer.extend([numpy_helper.from_array(np.asarray(0.05, np.float32), "aq_s"),
                                      numpy_helper.from_array(np.asarray(0, np.int8), "aq_z")])
                qn = helper.make_node("QuantizeLinear", [x, "aq_s", "aq_z"], ["aq_q"], name="Q_low")
                dqn = helper.make_node("DequantizeLinear", ["aq_q", "aq_s", "aq_z"], ["aq_dq"], name="DQ_low")
                idx = list(g.node).index(n)
                g.node.insert(idx, dqn)
                g.node.insert(idx, qn)
                n.input[0] = "aq_dq"
    onnx.checker.check_model(m)
    return m


# --------------------------------------------------------------------------------------------------- real graph
def test_fuses_exported_cfm_head_exactly(cfm_head):
    model, _ = cfm_head
    fused, rep = _fused(model)
    assert rep.count == 1 and S.count_plugin_nodes(fused) == 1
    m = rep.fused[0]
    assert m.channels == 64 and m.dtype == "float32" and m.h_from_low and not m.decomposed_ln and not m.dropped_qdq
    assert abs(m.eps - 1e-5) < 1e-9
    # the LayerNormalization and the gate tail are gone, the first GEMM (h = Linear(low)) stays
    ops = [n.op_type for n in fused.graph.node]
    assert "LayerNormalization" not in ops
    assert any(n.op_type == "MatMul" and "hi_gate/gate/gate.0" in n.name for n in fused.graph.node)
    assert not any("hi_gate/gate/gate.2" in n.name or "hi_gate/gate/gate.1" in n.name for n in fused.graph.node)
    plug = next(n for n in fused.graph.node if n.op_type == S.PLUGIN_OP)
    assert plug.domain == S.PLUGIN_DOMAIN and list(plug.output) == [m.output]
    attrs = {a.name: helper.get_attribute_value(a) for a in plug.attribute}
    assert attrs["plugin_version"] == b"1" and attrs["plugin_namespace"] == b"" and abs(attrs["eps"] - 1e-5) < 1e-9
    inits = {t.name: numpy_helper.to_array(t) for t in fused.graph.initializer}
    assert [inits[i].shape for i in plug.input[3:]] == [(64,), (1,), (64,), (64,)]
    assert all(inits[i].dtype == np.float32 for i in plug.input[3:])

    S.attach_reference_function(fused)
    onnx.checker.check_model(fused)
    for batch, seed in ((1, 0), (2, 1), (2, 7)):
        feed = _feed(batch, seed)
        want = _run(model, feed)[0]
        got = _run(fused, feed)[0]
        assert got.shape == want.shape
        assert _rel(got, want) <= RTOL
        _reference_check(model, m, feed, fused)


def test_fuse_file_roundtrip_has_no_function(cfm_head, tmp_path):
    _, path = cfm_head
    out = tmp_path / "cfm_head.fused.onnx"
    reports = []
    assert S.fuse_gated_residual(path, out, report=reports) == 1
    assert reports[0].count == 1
    model = onnx.load(str(out))
    assert len(model.functions) == 0                        # TensorRT must see the plugin, not a local function
    assert any(op.domain == S.PLUGIN_DOMAIN for op in model.opset_import)
    assert S.count_plugin_nodes(model) == 1
    # idempotent: a fused graph has nothing left to fuse
    assert S.fuse_gated_residual(out, tmp_path / "again.onnx") == 0
    # the reference function is attachable after the fact and ORT runs the file
    ref = tmp_path / "cfm_head.ref.onnx"
    assert S.fuse_gated_residual(path, ref, reference=True) == 1
    feed = _feed(2, 3)
    assert _rel(_run(onnx.load(str(ref)), feed)[0], _run(onnx.load(str(path)), feed)[0]) <= RTOL
    assert len(S.strip_reference_function(onnx.load(str(ref))).functions) == 0


def test_qdq_weights_fold_exactly(cfm_head):
    """Hand-built explicit-quantization graph: DQ on every GEMM weight (w2 per axis), Q/DQ on the first GEMM's
    activation. The w2 DQ is folded exactly, so the fused graph equals the quantized unfused graph."""
    model, _ = cfm_head
    q = _quantize_weights_dq(model)
    fused, rep = _fused(q)
    assert rep.count == 1 and not rep.dropped_qdq
    m = rep.fused[0]
    # the folded w2 is the dequantized int8 weight, not the original float one
    w2_float = next(numpy_helper.to_array(t) for t in model.graph.initializer
                    if t.name == next(n.input[1] for n in model.graph.node if "hi_gate/gate/gate.2" in n.name))
    assert not np.array_equal(m.w2, w2_float.reshape(-1)) and np.allclose(m.w2, w2_float.reshape(-1), atol=0.05)
    assert "DQ_low" in [n.name for n in fused.graph.node]            # the first GEMM's Q/DQ stays
    S.attach_reference_function(fused)
    for batch in (1, 2):
        feed = _feed(batch, 11 + batch)
        assert _rel(_run(fused, feed)[0], _run(q, feed)[0]) <= RTOL
        _reference_check(q, m, feed, fused)


def _quantize_static(model, tmp_path, op_types):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    src, dst = tmp_path / "plain.onnx", tmp_path / "qdq.onnx"
    onnx.save(model, str(src))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([_feed(2, s) for s in range(4)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=False)
    return onnx.load(str(dst))


def test_qdq_quantize_static_gemm_only(cfm_head, tmp_path):
    """TensorRT-style explicit quantization (onnxruntime quantize_static, QDQ format, MatMul/Gemm only): the gate
    tail's w2 comes through a DQ (folded), its activation input and output through Q/DQ pairs, which the plugin
    cannot reproduce: 'drop' fuses and removes those pairs (reported), 'skip' leaves the gate unfused."""
    model, _ = cfm_head
    q = _quantize_static(model, tmp_path, ["MatMul", "Gemm"])
    fused, rep = _fused(q)
    assert rep.count == 1
    m = rep.fused[0]
    # the pairs on the SiLU output (GEMM input) and on the GEMM output; nothing outside the region
    assert len(m.dropped_qdq) == 4
    assert all(("gate.1/Mul_output" in d or "gate.2/MatMul_output" in d) and "uantizeLinear" in d
               for d in m.dropped_qdq)
    S.attach_reference_function(fused)
    feed = _feed(2, 5)
    # the plugin computes exactly the float op on the tensors the region received (numpy reference) ...
    _reference_check(copy.deepcopy(fused), m, feed, fused)
    vals = _run(q, feed, [m.low, m.high, m.h])
    ref = numpy_reference(vals[m.low], vals[m.high], vals[m.h], m.w2, m.b2, m.ln_w, m.ln_b, m.eps)
    assert _rel(_run(fused, feed, [m.output])[m.output], ref) <= RTOL
    # ... and differs from the fake-quantized tail only by that one activation quantization (loose sanity bound)
    assert _rel(_run(fused, feed)[0], _run(q, feed)[0]) < 0.1

    skipped, rep2 = _fused(q, internal_qdq="skip")
    assert rep2.count == 0 and S.count_plugin_nodes(skipped) == 0
    assert rep2.skipped and "internal_qdq='skip'" in rep2.skipped[0][1]


def test_qdq_quantize_static_full_int8_still_fuses(cfm_head, tmp_path):
    """onnxruntime's default (CPU-style) QDQ quantizes every activation and even the LayerNorm/bias constants:
    constants are folded through their DQ, the internal pairs are dropped, and the plugin equals its reference."""
    model, _ = cfm_head
    q = _quantize_static(model, tmp_path, None)
    fused, rep = _fused(q)
    assert rep.count == 1 and S.count_plugin_nodes(fused) == 1
    m = rep.fused[0]
    assert len(m.dropped_qdq) >= 8
    S.attach_reference_function(fused)
    onnx.checker.check_model(fused)
    feed = _feed(1, 9)
    vals = _run(q, feed, [m.low, m.high, m.h])
    ref = numpy_reference(vals[m.low], vals[m.high], vals[m.h], m.w2, m.b2, m.ln_w, m.ln_b, m.eps)
    assert _rel(_run(fused, feed, [m.output])[m.output], ref) <= RTOL


# --------------------------------------------------------------------------------------------------- variants
def _gate_graph(c=8, n=5, variant="matmul", ln="op", dtype=np.float32, extra_output=None, seed=0):
    """A standalone hi gate: inputs low, high [2, n, c] (3-D) or [n, c] (gemm variant); h = low @ W1 + b1."""
    rng = np.random.default_rng(seed)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    w1, b1, w2, b2 = f32(c, c) * 0.3, f32(c) * 0.1, f32(c, 1) * 0.3, f32(1)
    lnw, lnb = 1 + 0.1 * f32(c), 0.1 * f32(c)
    shape = [n, c] if variant == "gemm" else [2, n, c]
    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [numpy_helper.from_array(a.astype(dtype), k) for k, a in
             (("w1", w1), ("b1", b1), ("lnw", lnw), ("lnb", lnb), ("b2", b2))]
    nodes = [helper.make_node("MatMul", ["low", "w1"], ["mm1"]), helper.make_node("Add", ["mm1", "b1"], ["h"])]
    if dtype != np.float32:      # w2 stored as float32 and cast: constant folding goes through the Cast
        inits.append(numpy_helper.from_array(w2, "w2_f32"))
        nodes.append(helper.make_node("Cast", ["w2_f32"], ["w2"], to=et))
    elif variant == "gemm":
        inits.append(numpy_helper.from_array(w2.T.copy(), "w2"))                  # [1, C], transB=1
    else:
        inits.append(numpy_helper.from_array(w2, "w2"))
    if variant == "silu_op":
        nodes.append(helper.make_node("Swish", ["h"], ["s"], alpha=1.0))
    else:
        nodes += [helper.make_node("Sigmoid", ["h"], ["sig"]), helper.make_node("Mul", ["sig", "h"], ["s"])]
    if variant == "gemm":
        nodes.append(helper.make_node("Gemm", ["s", "w2", "b2"], ["g"], transB=1))
    else:
        nodes += [helper.make_node("MatMul", ["s", "w2"], ["mm2"]), helper.make_node("Add", ["b2", "mm2"], ["g"])]
    nodes += [helper.make_node("Mul", ["high", "g"], ["gh"]), helper.make_node("Add", ["gh", "low"], ["x"])]
    if ln == "op":
        nodes.append(helper.make_node("LayerNormalization", ["x", "lnw", "lnb"], ["y"], axis=-1, epsilon=1e-5))
    else:                        # the opset<17 export of torch LayerNorm
        inits += [numpy_helper.from_array(np.asarray([-1], np.int64), "axes"),
                  numpy_helper.from_array(np.asarray(2.0, dtype), "two"),
                  numpy_helper.from_array(np.asarray(1e-5, dtype), "eps")]
        nodes += [helper.make_node("ReduceMean", ["x", "axes"], ["mean"], keepdims=1),
                  helper.make_node("Sub", ["x", "mean"], ["d"]),
                  helper.make_node("Pow", ["d", "two"], ["d2"]),
                  helper.make_node("ReduceMean", ["d2", "axes"], ["var"], keepdims=1),
                  helper.make_node("Add", ["var", "eps"], ["ve"]),
                  helper.make_node("Sqrt", ["ve"], ["std"]),
                  helper.make_node("Div", ["d", "std"], ["nrm"]),
                  helper.make_node("Mul", ["nrm", "lnw"], ["sc"]),
                  helper.make_node("Add", ["sc", "lnb"], ["y"])]
    nodes.append(helper.make_node("Relu", ["y"], ["out"]))           # something downstream of the gate
    outputs = [helper.make_tensor_value_info("out", et, shape)]
    if extra_output:
        outputs.append(helper.make_tensor_value_info(extra_output, et, shape[:-1] + [1]))
    graph = helper.make_graph(nodes, "gate", [helper.make_tensor_value_info("low", et, shape),
                                              helper.make_tensor_value_info("high", et, shape)], outputs, inits)
    opset = 24 if variant == "silu_op" else 18          # Swish is an opset-24 op
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset >= 24 else 9
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("variant,ln", [("matmul", "op"), ("matmul", "decomposed"), ("gemm", "op"),
                                        ("silu_op", "op")])
def test_variants_fuse_and_match(variant, ln):
    model = _gate_graph(variant=variant, ln=ln)
    fused, rep = _fused(model)
    assert rep.count == 1, rep.summary()
    m = rep.fused[0]
    assert m.decomposed_ln == (ln == "decomposed") and m.low == "low" and m.high == "high" and m.h == "h"
    assert m.h_from_low
    assert [n.op_type for n in fused.graph.node] == ["MatMul", "Add", S.PLUGIN_OP, "Relu"]
    rng = np.random.default_rng(3)
    shape = (5, 8) if variant == "gemm" else (2, 5, 8)
    feed = {"low": rng.standard_normal(shape, dtype=np.float32), "high": rng.standard_normal(shape, dtype=np.float32)}
    if variant != "silu_op":                                  # Swish is opset 24 (not in ORT's opset-18 CPU set)
        S.attach_reference_function(fused)
        assert _rel(_run(fused, feed)[0], _run(model, feed)[0]) <= RTOL
        _reference_check(model, m, feed, fused)


def test_weights_cast_to_activation_dtype():
    model = _gate_graph(dtype=np.float16)
    fused, rep = _fused(model)
    assert rep.count == 1 and rep.fused[0].dtype == "float16"
    plug = next(n for n in fused.graph.node if n.op_type == S.PLUGIN_OP)
    inits = {t.name: numpy_helper.to_array(t) for t in fused.graph.initializer}
    for name, size in zip(plug.input[3:], (8, 1, 8, 8)):
        assert inits[name].dtype == np.float16 and inits[name].shape == (size,)
    w2 = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "w2_f32")
    assert np.array_equal(inits[plug.input[3]], w2.reshape(-1).astype(np.float16))
    assert "w2_f32" not in inits                              # the dead Cast and its input are removed


def test_no_fusion_when_an_internal_tensor_escapes():
    model = _gate_graph(extra_output="g")                    # the gate value is also a graph output
    fused, rep = _fused(model)
    assert rep.count == 0 and S.count_plugin_nodes(fused) == 0
    assert rep.skipped and "graph output" in rep.skipped[0][1]


def test_no_fusion_without_a_gate():
    """A plain residual LayerNorm (no SiLU gate) is left alone."""
    c = 4
    inits = [numpy_helper.from_array(np.ones(c, np.float32), "w"),
             numpy_helper.from_array(np.zeros(c, np.float32), "b")]
    nodes = [helper.make_node("Mul", ["a", "b_in"], ["m"]), helper.make_node("Add", ["a", "m"], ["x"]),
             helper.make_node("LayerNormalization", ["x", "w", "b"], ["y"], axis=-1)]
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, c])  # noqa: E731
    model = helper.make_model(helper.make_graph(nodes, "g", [vi("a"), vi("b_in")], [vi("y")], inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    fused, rep = _fused(model)
    assert rep.count == 0 and len(fused.graph.node) == 3


def test_reference_function_needs_opset_17():
    with pytest.raises(Exception, match="opset >= 17"):
        S.reference_function(16)
