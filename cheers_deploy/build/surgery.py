"""Graph surgery for TensorRT: replace the hi-gate tail of the exported ``cfm_head`` graph by one
``CheersGatedResidual`` plugin node (engines/plugins/gated_residual, docs/architecture.md §10).

The region is found by ``graphs.matcher.find_gated_residuals`` (the pattern, and how Q/DQ graphs are matched, is
described there); this module rewrites it::

    low, high, h ─ [hi gate: SiLU(h) @ w2 + b2, * high, + low, LayerNorm(ln_w, ln_b, eps)]
    ─►  CheersGatedResidual(low, high, h, w2 [C], b2 [1], ln_w [C], ln_b [C]; eps)

The fused node keeps the LayerNorm's output name, so nothing downstream changes. Its weights are new
initializers reshaped to [C] / [1] and cast to the activation dtype (the plugin wants one dtype for all inputs).
Internal Q->DQ pairs the matcher recorded (``internal_qdq="drop"``, the default) are removed with the region and
counted in the report. Calibrations meant for this plugin should exclude the hi-gate tail GEMM (a C->1 GEMV) from
activation quantization; then the fused graph equals the quantized one exactly.

Domain: TensorRT's ONNX parser imports any node it has no importer for through the plugin registry, looked up by
``op_type`` with the node attributes ``plugin_version`` (default "1") and ``plugin_namespace`` (default "");
the node domain is not used for the lookup. ONNX Runtime's TensorRT EP registers TensorRT plugins as custom ops
of the domain ``trt.plugins``, so that domain is used here: the same file parses in TensorRT, in ORT's TensorRT
EP, and (with ``attach_reference_function``) in plain ONNX Runtime.

TensorRT graphs must NOT carry the reference FunctionProto: the parser imports local functions before it falls
back to plugins (onnx/onnx-tensorrt#978), so the function would silently replace the plugin.

Only ``onnx`` and numpy are needed (no onnx-graphsurgeon, no torch).
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from ..constants import PLUGIN_DOMAIN, PLUGIN_NAME as PLUGIN_OP, PLUGIN_NAMESPACE, PLUGIN_VERSION
from ..errors import InputError
from ..graphs.matcher import FuseReport, _onnx, _View, find_gated_residuals
from ..graphs.onnx_io import load_model, save_model

PLUGIN_INPUTS = ("low", "high", "h", "w2", "b2", "ln_w", "ln_b")
DEFAULT_EPS = 1e-5


# ---------------------------------------------------------------------------------------------------------------------
# rewrite
# ---------------------------------------------------------------------------------------------------------------------
def _np_to_tensor(arr: np.ndarray, name: str, dtype_name: str):
    from onnx import TensorProto, helper, numpy_helper

    if dtype_name == "bfloat16":
        import ml_dtypes  # noqa: F401 - onnx >= 1.17 converts ml_dtypes.bfloat16 arrays

        arr = np.asarray(arr, dtype=np.float32).astype("bfloat16")
        t = helper.make_tensor(name, TensorProto.BFLOAT16, arr.shape,
                               arr.view(np.uint16).tobytes(), raw=True)
        return t
    return numpy_helper.from_array(np.ascontiguousarray(np.asarray(arr).astype(dtype_name)), name)


def _unique(existing: set, base: str) -> str:
    name, k = base, 1
    while name in existing:
        k += 1
        name = f"{base}_{k}"
    existing.add(name)
    return name


def fuse_model(model, internal_qdq: str = "drop", name_prefix: str = "hi_gate") -> FuseReport:
    """Rewrite a ModelProto in place: each matched hi gate becomes one CheersGatedResidual node; dead nodes and
    initializers are removed. Returns the report (``report.count`` = number of fused gates)."""
    onnx = _onnx()
    from onnx import helper

    report = find_gated_residuals(model, internal_qdq)
    if not report.fused:
        return report
    g = model.graph
    names = {n.name for n in g.node} | {t.name for t in g.initializer}
    names |= {o for n in g.node for o in n.output}
    replace: Dict[int, object] = {}      # id(LayerNorm root) -> fused node
    remove: set = set()
    view = _View(model)
    by_name = {view.node_name(n): n for n in g.node}
    new_inits = []
    for k, m in enumerate(report.fused):
        node_name = _unique(names, f"{name_prefix}/{PLUGIN_OP}" + (f"_{k}" if len(report.fused) > 1 else ""))
        w_names = []
        for label, arr, shape in (("w2", m.w2, (m.channels,)), ("b2", m.b2, (1,)), ("ln_w", m.ln_w, (m.channels,)),
                                  ("ln_b", m.ln_b, (m.channels,))):
            iname = _unique(names, f"{node_name}.{label}")
            new_inits.append(_np_to_tensor(np.asarray(arr).reshape(shape), iname, m.dtype))
            w_names.append(iname)
        node = helper.make_node(PLUGIN_OP, [m.low, m.high, m.h, *w_names], [m.output], name=node_name,
                                domain=PLUGIN_DOMAIN, eps=float(m.eps), plugin_version=PLUGIN_VERSION,
                                plugin_namespace=PLUGIN_NAMESPACE)
        root = by_name[m.layer_norm]
        replace[id(root)] = node
        for nm in m.nodes + m.dropped_qdq:
            n = by_name[nm]
            if n is not root:
                remove.add(id(n))
    kept = []
    for n in g.node:
        if id(n) in replace:
            kept.append(replace[id(n)])
        elif id(n) not in remove:
            kept.append(n)
    del g.node[:]
    g.node.extend(kept)
    g.initializer.extend(new_inits)
    _eliminate_dead(model)
    if not any(op.domain == PLUGIN_DOMAIN for op in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(PLUGIN_DOMAIN, 1))
    return report


def _eliminate_dead(model) -> None:
    """Drop nodes whose outputs nobody reads (and that are not graph outputs), then unused initializers."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for n in reversed(list(g.node)):
        if any(o in needed for o in n.output if o):
            keep.append(n)
            needed.update(i for i in n.input if i)
            for a in n.attribute:                 # subgraphs (If/Loop) read outer names
                for sub in list(a.g.node if a.HasField("g") else []) + [x for gg in a.graphs for x in gg.node]:
                    needed.update(i for i in sub.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)


# ---------------------------------------------------------------------------------------------------------------------
# reference function (CPU verification only)
# ---------------------------------------------------------------------------------------------------------------------
def reference_function(opset: int = 18):
    """FunctionProto ``trt.plugins.CheersGatedResidual`` built from standard ops, so ONNX Runtime can run a fused
    graph. Same op order as the exported graph: MatMul(SiLU(h), w2[C,1]) + b2 -> * high -> + low -> LayerNorm."""
    from onnx import TensorProto, helper

    if opset < 17:
        raise InputError(f"the reference function needs opset >= 17 (LayerNormalization), the graph has {opset}")
    nodes = [
        helper.make_node("Constant", [], ["_col"], value=helper.make_tensor("_col", TensorProto.INT64, [2], [-1, 1])),
        helper.make_node("Reshape", ["w2", "_col"], ["_w2c"]),
        helper.make_node("Sigmoid", ["h"], ["_sig"]),
        helper.make_node("Mul", ["h", "_sig"], ["_s"]),
        helper.make_node("MatMul", ["_s", "_w2c"], ["_mm"]),
        helper.make_node("Add", ["b2", "_mm"], ["_g"]),
        helper.make_node("Mul", ["_g", "high"], ["_gh"]),
        helper.make_node("Add", ["low", "_gh"], ["_x"]),
    ]
    ln = helper.make_node("LayerNormalization", ["_x", "ln_w", "ln_b"], ["out"], axis=-1)
    eps_ref = helper.AttributeProto()
    eps_ref.name = "epsilon"
    eps_ref.type = helper.AttributeProto.FLOAT
    eps_ref.ref_attr_name = "eps"
    ln.attribute.append(eps_ref)
    nodes.append(ln)
    fn = helper.make_function(PLUGIN_DOMAIN, PLUGIN_OP, list(PLUGIN_INPUTS), ["out"], nodes,
                              [helper.make_opsetid("", opset)],
                              attributes=["eps", "plugin_version", "plugin_namespace"])
    return fn


def attach_reference_function(model):
    """Add the reference FunctionProto to a fused ModelProto (in place, returned) so ONNX Runtime's CPU provider
    runs it. Never build a TensorRT engine from such a model: the parser would inline the function instead of
    using the plugin."""
    onnx = _onnx()
    opset = next((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise InputError("the model has no default-domain opset import")
    if any(f.domain == PLUGIN_DOMAIN and f.name == PLUGIN_OP for f in model.functions):
        return model
    model.functions.append(reference_function(opset))
    if not any(op.domain == PLUGIN_DOMAIN for op in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(PLUGIN_DOMAIN, 1))
    return model


def strip_reference_function(model):
    """Remove the reference FunctionProto (in place, returned): what a TensorRT build must see."""
    keep = [f for f in model.functions if not (f.domain == PLUGIN_DOMAIN and f.name == PLUGIN_OP)]
    del model.functions[:]
    model.functions.extend(keep)
    return model


def count_plugin_nodes(model) -> int:
    return sum(1 for n in model.graph.node if n.op_type == PLUGIN_OP)


def fuse_gated_residual(in_path, out_path, internal_qdq: str = "drop", reference: bool = False,
                        report: Optional[list] = None) -> int:
    """Read ``in_path``, fuse every hi gate, write ``out_path``; returns the number of fused gates.

    ``reference=True`` also attaches the reference FunctionProto (for ONNX Runtime checks; never for TensorRT).
    Pass a list as ``report`` to receive the FuseReport."""
    model = load_model(in_path)
    rep = fuse_model(model, internal_qdq=internal_qdq)
    if reference:
        attach_reference_function(model)
    save_model(model, out_path)
    if report is not None:
        report.append(rep)
    return rep.count
