"""`cheers-deploy calibrate convert --precision fp16|bf16`: reduced-precision graphs from the exported fp32 ones.

Converter: `onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True, op_block_list=...)`:
weights and activations become fp16, graph inputs/outputs stay fp32 (a Cast at each boundary), ops in the block
list stay fp32 with Casts around them. BF16 = the same graph relabelled: every fp16 tensor/cast becomes bf16 and
the weights are rounded (nearest-even) from the fp32 originals (onnxruntime ships no bf16 converter).

Block list (`--keep-fp32`, default `SENSITIVE_OPS`): normalisations, softmax, the reductions/pow/sqrt/div of the
decomposed RMSNorms, exp/erf/sigmoid of the timestep features and gates, and sin/cos of the RoPE angles and timestep
embedding. Chosen by measurement (docs/precision.md): `--no-keep-fp32` converts with only the converter's own
default list.

Validation: ORT's CPU provider loads and runs the fp16 graphs, but its InsertCastTransformer silently runs every
fp16 node without a CPU fp16 kernel in fp32, which understates the fp16 error. Per-graph fp16/bf16 error is therefore
measured with `onnx.reference.ReferenceEvaluator` (numpy in the graph's dtypes; `GraphRun(force_reference=True)`),
and ORT CPU is used for the end-to-end runs of fp16 (a smoke test, not a faithful fp16 number).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import InputError
from ..manifest import Manifest
from ..graphs.onnx_io import save_model
from .common import GRAPHS, register_variant, topo_sort, variant_file

SENSITIVE_OPS = ("LayerNormalization", "InstanceNormalization", "BatchNormalization", "GroupNormalization",
                 "RMSNormalization", "SimplifiedLayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt",
                 "Reciprocal", "Div", "Exp", "Erf", "Sin", "Cos", "Range")


def _default_block_list():
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    return list(DEFAULT_OP_BLOCK_LIST)


def to_fp16(model, keep_fp32: bool = True, extra_ops: Sequence[str] = ()):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    block = _default_block_list() + (list(SENSITIVE_OPS) if keep_fp32 else []) + list(extra_ops)
    return convert_float_to_float16(model, keep_io_types=True, op_block_list=sorted(set(block)),
                                    disable_shape_infer=False)


def fp32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even (NaN kept)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        r[nan] = 0x7FC0
    return r


def fp16_to_bf16(model16, model32):
    """Relabel a converted fp16 model as bf16. Weights are re-rounded from the fp32 originals (same names)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    F16, BF16 = TensorProto.FLOAT16, TensorProto.BFLOAT16
    originals = {i.name: i for i in model32.graph.initializer}

    def conv_tensor(t, src=None):
        if t.data_type != F16:
            return
        vals = numpy_helper.to_array(src).astype(np.float32) if src is not None and src.data_type == \
            TensorProto.FLOAT else numpy_helper.to_array(t).astype(np.float32)
        bits = fp32_to_bf16_bits(vals)
        dims = list(t.dims)
        t.data_type = BF16
        del t.int32_data[:]
        t.raw_data = bits.tobytes()
        del t.dims[:]
        t.dims.extend(dims)

    def walk(graph):
        for init in graph.initializer:
            conv_tensor(init, originals.get(init.name))
        for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
            tt = vi.type.tensor_type
            if tt.elem_type == F16:
                tt.elem_type = BF16
        for n in graph.node:
            for a in n.attribute:
                if n.op_type == "Cast" and a.name == "to" and a.i == F16:
                    a.i = BF16
                if a.type == onnx.AttributeProto.TENSOR:
                    conv_tensor(a.t)
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                for g in a.graphs:
                    walk(g)
    walk(model16.graph)
    return model16


def convert(workdir, precision: str = "fp16", graphs: Optional[Sequence[str]] = None, keep_fp32: bool = True,
            extra_ops: Sequence[str] = (), suffix: str = "", register: bool = True, log=print) -> dict:
    """Write `<graph>.<precision>.onnx` for each graph and register it in the manifest. Returns {graph: entry}."""
    import onnx

    if precision not in ("fp16", "bf16"):
        raise InputError(f"--precision must be fp16 or bf16 for convert (int8: calibrate quantize), got {precision!r}")
    bad = [g for g in (graphs or ()) if g not in GRAPHS]
    if bad:
        raise InputError(f"unknown graph(s) {bad}; choose from {', '.join(GRAPHS)}")
    workdir = Path(workdir)
    man = Manifest.load(workdir)
    out = {}
    for g in graphs or GRAPHS:
        t0 = time.perf_counter()
        m32 = onnx.load(str(man.graph_path(g)))
        m = to_fp16(onnx.load(str(man.graph_path(g))), keep_fp32, extra_ops)
        if precision == "bf16":
            m = fp16_to_bf16(m, m32)
        topo_sort(m.graph)
        name = variant_file(g, precision + suffix)
        ext = save_model(m, workdir / name)
        info = {"converter": "onnxruntime.transformers.float16" + (" + bf16 relabel" if precision == "bf16" else ""),
                "keep_io_types": True, "op_block_list": "default+sensitive" if keep_fp32 else "default",
                "seconds": round(time.perf_counter() - t0, 2)}
        if register:
            out[g] = register_variant(man, g, precision + suffix, name, ext, **info)
        else:
            out[g] = dict(info, file=name, external_data=ext)
        log(f"convert: {g}: {name} ({info['seconds']} s)")
    if register:
        man.save()
    return out


# ------------------------------------------------------------------------------------------- running a graph
class GraphRun:
    """Run one graph file: ORT CPU when it can load it, else the ONNX reference evaluator (pure numpy, slow but
    dtype-complete). `.engine` says which one."""

    def __init__(self, path: Path, allow_reference: bool = True, force_reference: bool = False):
        import onnxruntime as ort

        self.path = Path(path)
        try:
            if force_reference:
                raise RuntimeError("reference evaluator requested")
            so = ort.SessionOptions()
            so.log_severity_level = 3
            self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            self.engine = "ort-cpu"
            self.inputs = [i.name for i in self.sess.get_inputs()]
            self.outputs = [o.name for o in self.sess.get_outputs()]
        except Exception as exc:
            if not allow_reference:
                raise
            import onnx
            from onnx.reference import ReferenceEvaluator

            self.sess = None
            m = onnx.load(str(path))
            self.ref = ReferenceEvaluator(m)
            self.engine = f"onnx-reference ({str(exc).splitlines()[0][:80]})"
            self.inputs = [i.name for i in m.graph.input]
            self.outputs = [o.name for o in m.graph.output]

    def __call__(self, feed):
        feed = {k: feed[k] for k in self.inputs}
        if self.sess is not None:
            return self.sess.run(self.outputs, feed)
        return [np.asarray(o, np.float32) if np.asarray(o).dtype.kind == "f" or str(np.asarray(o).dtype) == "bfloat16"
                else np.asarray(o) for o in self.ref.run(self.outputs, feed)]
