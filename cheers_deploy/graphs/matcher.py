"""Find the gated-residual "hi gate" tail of the exported ``cfm_head`` graph (docs/architecture.md §10): the region
build/surgery.py replaces by one ``CheersGatedResidual`` plugin node, and precision/quantize.py keeps out of INT8.
Matching only: the ModelProto is never modified. One file because the graph view, the backward walk through the
pattern and the checks on a match are one algorithm with a single entry point, ``find_gated_residuals``.

Matched region (per token row of width C; the first GEMM ``h = Linear(low)`` stays outside the plugin)::

    h ─┬─ Sigmoid ─┐                                  (or one Silu/Swish node)
       └───────── Mul ─ MatMul(w2 [C,1]) ─ Add(b2 [1]) ─┐      (or Gemm(w2, b2))
                                                 high ─ Mul ─┐
                                                      low ─ Add ─ LayerNormalization(ln_w, ln_b, eps)
                                                               (or its ReduceMean/Sub/Pow/Sqrt/Div decomposition)

Each match (``GateMatch``) names the region's boundary tensors (low, high, h), the LayerNorm output, the nodes of
the region and its constant weights (w2, b2, ln_w, ln_b) folded to numpy.

Q/DQ graphs (explicit quantization): constant operands reached through ``DequantizeLinear`` (and Cast, Identity,
Reshape, Squeeze, Unsqueeze, Transpose, Constant) are folded exactly (DQ computed as ONNX Runtime does:
``float(x - zero_point) * scale``). Region boundary tensors (low, high, h) are taken exactly as the region
consumed them, so a DQ in front of them stays. A Q->DQ pair *inside* the region (e.g. on the SiLU output in
front of the w2 GEMM) cannot be reproduced by the plugin, which runs the region in floating point with FP32
accumulation: with ``internal_qdq="drop"`` (default) the pair is listed in ``GateMatch.dropped_qdq`` (the rewrite
removes it), with ``"skip"`` such a gate is left unmatched (reported in ``FuseReport.skipped``).

Only ``onnx`` and numpy are needed (no onnx-graphsurgeon, no torch).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..constants import PLUGIN_NAME as PLUGIN_OP
from ..errors import InputError, MissingDependencyError

_QDQ_INTERNAL = ("drop", "skip")


def _onnx():
    try:
        import onnx
        from onnx import numpy_helper  # noqa: F401
    except ImportError as exc:  # pragma: no cover - onnx is a base dependency
        raise MissingDependencyError("graph surgery needs the onnx package: pip install onnx") from exc
    return onnx


# ---------------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class GateMatch:
    """One matched hi gate (tensor names refer to the graph before fusion)."""

    layer_norm: str                      # name of the LayerNorm node (or of the final Add of its decomposition)
    output: str                          # tensor the fused node produces (the LayerNorm output)
    low: str
    high: str
    h: str
    eps: float
    channels: int
    dtype: str                           # numpy dtype name of the activations
    w2: np.ndarray
    b2: np.ndarray
    ln_w: np.ndarray
    ln_b: np.ndarray
    nodes: List[str] = field(default_factory=list)          # names of the nodes the plugin replaces
    dropped_qdq: List[str] = field(default_factory=list)    # internal Q/DQ nodes removed (numerical change)
    decomposed_ln: bool = False
    h_from_low: bool = False             # h is produced by a GEMM that reads low (the expected structure)


@dataclass
class FuseReport:
    fused: List[GateMatch] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)   # (LayerNorm node, why it was not fused)

    @property
    def count(self) -> int:
        return len(self.fused)

    @property
    def dropped_qdq(self) -> List[str]:
        return [n for m in self.fused for n in m.dropped_qdq]

    def summary(self) -> str:
        parts = [f"{self.count} hi gate(s) fused into {PLUGIN_OP}"]
        if self.dropped_qdq:
            parts.append(f"{len(self.dropped_qdq)} internal Q/DQ node(s) removed")
        for ln, why in self.skipped:
            parts.append(f"not fused at {ln}: {why}")
        return "; ".join(parts)


class _NoMatch(Exception):
    pass


# ---------------------------------------------------------------------------------------------------------------------
# graph view
# ---------------------------------------------------------------------------------------------------------------------
def _np_dtype(elem_type: int) -> np.dtype:
    onnx = _onnx()
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


class _View:
    """Producer/consumer maps, constant folding and type lookup over one GraphProto."""

    def __init__(self, model):
        onnx = _onnx()
        self.model = model
        g = model.graph
        self.producer = {}
        self.consumers: Dict[str, list] = defaultdict(list)
        for n in g.node:
            for o in n.output:
                if o:
                    self.producer[o] = n
            for i in n.input:
                if i:
                    self.consumers[i].append(n)
        self.inits = {t.name: t for t in g.initializer}
        self.graph_outputs = {o.name for o in g.output}
        self.graph_inputs = {i.name for i in g.input}
        self._const_memo: Dict[str, Optional[np.ndarray]] = {}
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:  # noqa: BLE001 - shape inference is a best-effort aid here
            inferred = model
        self.types = {}
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            tt = vi.type.tensor_type
            if not vi.type.HasField("tensor_type"):
                continue
            shape = None
            if tt.HasField("shape"):
                shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
            self.types[vi.name] = (tt.elem_type or None, shape)
        for name, t in self.inits.items():
            self.types[name] = (t.data_type, tuple(t.dims))

    # ---- names
    def node_name(self, n) -> str:
        return n.name or f"{n.op_type}({', '.join(n.output)})"

    def prod(self, tensor: str):
        return self.producer.get(tensor)

    # ---- constants
    def const(self, tensor: str) -> Optional[np.ndarray]:
        if tensor in self._const_memo:
            return self._const_memo[tensor]
        self._const_memo[tensor] = None            # cycle guard
        val = self._const_eval(tensor)
        self._const_memo[tensor] = val
        return val

    def _const_eval(self, tensor: str) -> Optional[np.ndarray]:
        from onnx import helper, numpy_helper

        if not tensor:
            return None
        if tensor in self.inits:
            return numpy_helper.to_array(self.inits[tensor])
        if tensor in self.graph_inputs:
            return None
        n = self.producer.get(tensor)
        if n is None:
            return None
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        op = n.op_type if n.domain in ("", "ai.onnx") else None
        if op == "Constant":
            if "value" in attrs:
                return numpy_helper.to_array(attrs["value"])
            for key, dt in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                            ("value_ints", np.int64)):
                if key in attrs:
                    return np.asarray(attrs[key], dtype=dt)
            return None
        ins = [self.const(i) if i else None for i in n.input]
        if op == "Identity":
            return ins[0]
        if op == "Cast" and ins[0] is not None:
            return ins[0].astype(_np_dtype(attrs["to"]))
        if op == "DequantizeLinear" and ins[0] is not None and ins[1] is not None:
            return _dequantize(ins[0], ins[1], ins[2] if len(ins) > 2 else None, attrs)
        if op == "Reshape" and ins[0] is not None and ins[1] is not None:
            shape = [int(s) for s in ins[1].reshape(-1)]
            if not attrs.get("allowzero", 0):
                shape = [ins[0].shape[k] if s == 0 else s for k, s in enumerate(shape)]
            return ins[0].reshape(shape)
        if op in ("Squeeze", "Unsqueeze") and ins[0] is not None:
            axes = attrs.get("axes")
            if axes is None and len(ins) > 1 and ins[1] is not None:
                axes = [int(a) for a in ins[1].reshape(-1)]
            if op == "Squeeze":
                return np.squeeze(ins[0], axis=tuple(axes) if axes else None)
            if axes is None:
                return None
            out = ins[0]
            rank = out.ndim + len(axes)
            for a in sorted(a % rank for a in axes):
                out = np.expand_dims(out, a)
            return out
        if op == "Transpose" and ins[0] is not None:
            return np.transpose(ins[0], attrs.get("perm"))
        return None

    # ---- types
    def elem_type(self, tensor: str) -> Optional[int]:
        return self.types.get(tensor, (None, None))[0]

    def shape(self, tensor: str):
        return self.types.get(tensor, (None, None))[1]

    def is_output(self, tensor: str) -> bool:
        return tensor in self.graph_outputs


def _dequantize(x: np.ndarray, scale: np.ndarray, zp: Optional[np.ndarray], attrs: dict) -> Optional[np.ndarray]:
    """DequantizeLinear as ONNX Runtime computes it: float32(int(x) - int(zp)) * float32(scale), cast to the
    scale's dtype. Per-tensor and per-axis; blocked quantization (block_size > 0) is not folded."""
    if attrs.get("block_size", 0) or x.dtype.kind not in "iu" or scale.dtype.kind != "f":
        return None
    xi = x.astype(np.int64)
    zpi = np.zeros((), np.int64) if zp is None else zp.astype(np.int64)
    s32 = scale.astype(np.float32)
    if scale.size == 1:
        s32, zpi = s32.reshape(()), zpi.reshape(())
    else:
        if x.ndim == 0:
            return None
        axis = int(attrs.get("axis", 1)) % x.ndim
        if x.shape[axis] != scale.size:
            return None
        shape = [1] * x.ndim
        shape[axis] = scale.size
        s32 = s32.reshape(shape)
        zpi = zpi.reshape(shape) if zpi.size == scale.size else zpi.reshape(())
    y = (xi - zpi).astype(np.float32) * s32
    return y.astype(scale.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# matcher
# ---------------------------------------------------------------------------------------------------------------------
_COMMUTATIVE = {"Add", "Mul"}


def _is(n, *ops) -> bool:
    return n is not None and n.op_type in ops and n.domain in ("", "ai.onnx")


def _attr(n, name, default=None):
    from onnx import helper

    for a in n.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class _Matcher:
    """Walks back from a LayerNorm through one hi gate. Collects region nodes and internal Q/DQ pairs."""

    def __init__(self, view: _View, internal_qdq: str):
        self.v = view
        self.internal_qdq = internal_qdq
        self.region: List = []
        self.qdq: List = []

    # ---- helpers
    def _add(self, *nodes):
        for n in nodes:
            if n is not None and all(n is not r for r in self.region):
                self.region.append(n)

    def _strip(self, tensor: str, record: bool = True) -> str:
        """Follow Q->DQ pairs backwards from a tensor; with ``record`` the pairs are internal to the region (to be
        removed), without it this is only a look-up (for comparisons and probes)."""
        v = self.v
        while True:
            dq = v.prod(tensor)
            if not _is(dq, "DequantizeLinear"):
                return tensor
            q = v.prod(dq.input[0])
            if not _is(q, "QuantizeLinear") or v.const(dq.input[0]) is not None:
                return tensor
            if record:
                if self.internal_qdq == "skip":
                    raise _NoMatch(f"Q/DQ pair {v.node_name(q)} -> {v.node_name(dq)} inside the region "
                                   f"(internal_qdq='skip')")
                for n in (q, dq):
                    if all(n is not r for r in self.qdq):
                        self.qdq.append(n)
            tensor = q.input[0]

    def _producer(self, tensor: str, *ops):
        n = self.v.prod(self._strip(tensor))
        if not _is(n, *ops):
            raise _NoMatch(f"expected {'/'.join(ops)} producing {tensor}, found "
                           f"{n.op_type if n is not None else 'a graph input or constant'}")
        return n

    def _split(self, n, pred):
        """For a binary commutative node: (operand satisfying pred, the other operand), trying both orders."""
        errors = []
        for a, b in ((n.input[0], n.input[1]), (n.input[1], n.input[0])):
            snapshot = (list(self.region), list(self.qdq))
            try:
                return pred(a), b
            except _NoMatch as exc:
                self.region, self.qdq = snapshot
                errors.append(str(exc))
        raise _NoMatch(errors[0] if errors else "no operand matched")

    # ---- LayerNorm
    def layer_norm(self, root):
        """root: LayerNormalization, or the final Add of a decomposed LayerNorm. Returns (x, ln_w, ln_b, eps,
        decomposed)."""
        v = self.v
        if _is(root, "LayerNormalization"):
            if len(root.output) > 1 and any(o and (v.consumers.get(o) or v.is_output(o)) for o in root.output[1:]):
                raise _NoMatch("LayerNormalization mean/inv-std outputs are used")
            x = root.input[0]
            xshape = v.shape(x)
            axis = int(_attr(root, "axis", -1))
            if axis != -1 and not (xshape is not None and axis == len(xshape) - 1):
                raise _NoMatch(f"LayerNormalization over axis {axis}, not the last one")
            w = v.const(root.input[1])
            b = v.const(root.input[2]) if len(root.input) > 2 and root.input[2] else None
            if w is None:
                raise _NoMatch("LayerNormalization scale is not a constant")
            if b is None:
                if len(root.input) > 2 and root.input[2]:
                    raise _NoMatch("LayerNormalization bias is not a constant")
                b = np.zeros_like(w)
            self._add(root)
            return x, w, b, float(_attr(root, "epsilon", 1e-5)), False
        return self._decomposed_ln(root)

    def _decomposed_ln(self, root):
        """Add(Mul(Div(D, Sqrt(Add(ReduceMean(Pow(D,2)|Mul(D,D)), eps))), ln_w), ln_b) with D = Sub(X, ReduceMean(X))
        (Div may be Mul(D, Reciprocal(...)); Mul/Add in either operand order)."""
        v = self.v
        if not _is(root, "Add"):
            raise _NoMatch("not a LayerNorm")

        mul, bias_t = self._split(root, lambda t: self._producer(t, "Mul"))
        b = v.const(bias_t)
        if b is None:
            raise _NoMatch("decomposed LayerNorm bias is not a constant")
        norm_t, w = None, None
        for a, c in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
            if v.const(c) is not None and v.const(a) is None:
                norm_t, w = a, v.const(c)
        if norm_t is None:
            raise _NoMatch("decomposed LayerNorm scale is not a constant")
        div = self._producer(norm_t, "Div", "Mul")
        if _is(div, "Div"):
            d_t, den_t = div.input[0], div.input[1]
            sqrt = self._producer(den_t, "Sqrt")
            recip = None
        else:
            recip_first = None
            for a, c in ((div.input[0], div.input[1]), (div.input[1], div.input[0])):
                pr = v.prod(self._strip(c, record=False))
                if _is(pr, "Reciprocal"):
                    self._strip(c)
                    recip_first = (a, pr)
                    break
            if recip_first is None:
                raise _NoMatch("decomposed LayerNorm: no division by the standard deviation")
            d_t, recip = recip_first
            sqrt = self._producer(recip.input[0], "Sqrt")
        add_eps = self._producer(sqrt.input[0], "Add")
        var_t, eps_t = None, None
        for a, c in ((add_eps.input[0], add_eps.input[1]), (add_eps.input[1], add_eps.input[0])):
            if v.const(c) is not None and v.const(a) is None:
                var_t, eps_t = a, c
        if var_t is None or v.const(eps_t).size != 1:
            raise _NoMatch("decomposed LayerNorm: no constant epsilon")
        eps = float(v.const(eps_t).reshape(-1)[0])
        rm_var = self._producer(var_t, "ReduceMean")
        sq = self._producer(rm_var.input[0], "Pow", "Mul")
        if _is(sq, "Pow"):
            e = v.const(sq.input[1])
            if e is None or e.size != 1 or float(e.reshape(-1)[0]) != 2.0:
                raise _NoMatch("decomposed LayerNorm: variance is not a square")
            d2 = sq.input[0]
        else:
            if self._strip(sq.input[0], record=False) != self._strip(sq.input[1], record=False):
                raise _NoMatch("decomposed LayerNorm: variance is not a square")
            d2 = sq.input[0]
        sub = self._producer(d_t, "Sub")
        if self._strip(d2, record=False) != self._strip(d_t, record=False):
            raise _NoMatch("decomposed LayerNorm: variance and normalisation use different centred values")
        x, mean_t = sub.input[0], sub.input[1]
        rm_mean = self._producer(mean_t, "ReduceMean")
        if self._strip(rm_mean.input[0], record=False) != self._strip(x, record=False):
            raise _NoMatch("decomposed LayerNorm: the mean is not taken over the normalised tensor")
        for rm in (rm_mean, rm_var):
            axes = _attr(rm, "axes")
            if axes is None and len(rm.input) > 1 and rm.input[1]:
                c = v.const(rm.input[1])
                axes = None if c is None else [int(a) for a in c.reshape(-1)]
            xshape = v.shape(x)
            last_ok = axes is not None and len(axes) == 1 and (
                axes[0] == -1 or (xshape is not None and axes[0] == len(xshape) - 1))
            if not last_ok or not int(_attr(rm, "keepdims", 1)):
                raise _NoMatch("decomposed LayerNorm: ReduceMean is not over the last axis with keepdims")
        self._add(root, mul, div, recip, sqrt, add_eps, rm_var, sq, sub, rm_mean)
        return x, w, b, eps, True

    # ---- gate
    def gate(self, root):
        x, ln_w, ln_b, eps, decomposed = self.layer_norm(root)
        add_res = self._producer(x, "Add")
        (mul_gate, lin_nodes, w2, b2, silu_nodes, h, high), low = self._split(add_res, self._gated_branch)
        self._add(add_res, mul_gate, *lin_nodes, *silu_nodes)
        return dict(x=x, low=low, high=high, h=h, w2=w2, b2=b2, ln_w=ln_w, ln_b=ln_b, eps=eps,
                    decomposed=decomposed)

    def _gated_branch(self, t):
        """t = g * high. Returns (Mul node, gate nodes, w2, b2, SiLU nodes, h, high)."""
        mul_gate = self._producer(t, "Mul")
        (w2, b2, lin_nodes, silu_nodes, h), high = self._split(mul_gate, self._gate_branch)
        return mul_gate, lin_nodes, w2, b2, silu_nodes, h, high

    def _gate_branch(self, t):
        """t = SiLU(h) @ w2 + b2."""
        w2, b2, s_t, lin_nodes = self._gate_linear(t)
        silu_nodes, h = self._silu(s_t)
        return w2, b2, lin_nodes, silu_nodes, h

    def _gate_linear(self, t):
        """g = s @ w2 + b2 with w2 holding C values and one output. Returns (w2 [C], b2 [1], s, nodes)."""
        v = self.v
        n = self._producer(t, "Add", "Gemm", "MatMul")
        if _is(n, "Gemm"):
            if float(_attr(n, "alpha", 1.0)) != 1.0 or float(_attr(n, "beta", 1.0)) != 1.0 or _attr(n, "transA", 0):
                raise _NoMatch("Gemm with alpha/beta != 1 or transA")
            w = v.const(n.input[1])
            if w is None or w.ndim != 2:
                raise _NoMatch("gate Gemm weight is not a constant matrix")
            w = w.T if _attr(n, "transB", 0) else w                   # -> [C, out]
            if w.shape[1] != 1:
                raise _NoMatch(f"gate Gemm has {w.shape[1]} outputs, the hi gate has 1")
            b = v.const(n.input[2]) if len(n.input) > 2 and n.input[2] else np.zeros((1,), w.dtype)
            if b is None or b.size != 1:
                raise _NoMatch("gate Gemm bias is not one constant")
            return w.reshape(-1), b.reshape(1), n.input[0], [n]
        if _is(n, "Add"):
            mm, b_t = None, None
            for a, c in ((n.input[0], n.input[1]), (n.input[1], n.input[0])):
                pr = v.prod(self._strip(a, record=False)) if v.const(c) is not None else None
                if _is(pr, "MatMul"):
                    self._strip(a)
                    mm, b_t = pr, c
                    break
            if mm is None:
                raise _NoMatch("gate Add is not MatMul + constant bias")
            b = v.const(b_t)
            if b.size != 1:
                raise _NoMatch(f"gate bias has {b.size} values, the hi gate has 1")
            add_nodes = [n]
        else:
            mm, b, add_nodes = n, None, []
        w = v.const(mm.input[1])
        if w is None or w.ndim != 2 or w.shape[1] != 1:
            raise _NoMatch("gate MatMul weight is not a constant [C, 1] matrix")
        if b is None:
            b = np.zeros((1,), w.dtype)
        return w.reshape(-1), b.reshape(1), mm.input[0], add_nodes + [mm]

    def _silu(self, s_t):
        """s = SiLU(h): Mul(h, Sigmoid(h)) or a Silu/Swish node. Returns (nodes, h as consumed)."""
        v = self.v
        n = v.prod(self._strip(s_t))
        if n is not None and n.op_type in ("Silu", "Swish") and len(n.input) == 1:
            if n.op_type == "Swish" and float(_attr(n, "alpha", 1.0)) != 1.0:
                raise _NoMatch("Swish with alpha != 1")
            return [n], n.input[0]
        if not _is(n, "Mul"):
            raise _NoMatch(f"expected SiLU (Sigmoid * x) producing {s_t}, found "
                           f"{n.op_type if n is not None else 'a graph input'}")
        for a, c in ((n.input[0], n.input[1]), (n.input[1], n.input[0])):
            sig = v.prod(self._strip(c, record=False))
            if _is(sig, "Sigmoid") and self._strip(sig.input[0], record=False) == self._strip(a, record=False):
                self._strip(c)                                       # pairs between Sigmoid and Mul: internal
                if sig.input[0] == a:
                    h = a                                            # both read the same tensor: exact
                else:                                                # one side went through its own Q/DQ pair
                    h = self._strip(a)
                    self._strip(sig.input[0])
                return [n, sig], h
        raise _NoMatch("gate activation is not SiLU(h) = h * Sigmoid(h)")


def _same_dims(a, b) -> Optional[bool]:
    if a is None or b is None:
        return None
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x is None or y is None:
            continue
        if x != y:
            return False
    return True


def _candidates(view: _View):
    for n in view.model.graph.node:
        if _is(n, "LayerNormalization"):
            yield n
        elif _is(n, "Add"):
            # the final Add of a decomposed LayerNorm: Add(Mul(..., const), const)
            consts = [view.const(i) is not None for i in n.input]
            if sum(consts) == 1:
                other = n.input[consts.index(False)]
                p = view.prod(other)
                if _is(p, "Mul") and any(view.const(i) is not None for i in p.input):
                    yield n


def find_gated_residuals(model, internal_qdq: str = "drop") -> FuseReport:
    """Match every hi gate of a ModelProto (no modification). ``report.fused`` lists the matches;
    ``report.skipped`` the LayerNorms that looked like a hi gate's end but failed a check (with the reason)."""
    if internal_qdq not in _QDQ_INTERNAL:
        raise InputError(f"internal_qdq must be one of {_QDQ_INTERNAL}, got {internal_qdq!r}")
    view = _View(model)
    report = FuseReport()
    claimed = set()
    for root in _candidates(view):
        m = _Matcher(view, internal_qdq)
        name = view.node_name(root)
        try:
            info = m.gate(root)
            match = _check(view, m, root, info)
        except _NoMatch as exc:
            # only report LayerNorms fed by a residual Add of a Mul: those are hi-gate look-alikes
            if _looks_like_gate(view, root):
                report.skipped.append((name, str(exc)))
            continue
        ids = {id(n) for n in m.region + m.qdq}
        if ids & claimed:
            report.skipped.append((name, "overlaps another match"))
            continue
        claimed |= ids
        report.fused.append(match)
    return report


def _looks_like_gate(view: _View, root) -> bool:
    x = root.input[0] if _is(root, "LayerNormalization") else None
    if x is None:
        return False
    add = view.prod(x)
    if not _is(add, "Add"):
        return False
    return any(_is(view.prod(i), "Mul") for i in add.input)


def _check(view: _View, m: _Matcher, root, info) -> GateMatch:
    """Consumers stay inside the region, shapes/dtypes fit the plugin, weights have C values."""
    region = m.region + m.qdq
    region_ids = {id(n) for n in region}
    out = root.output[0]
    for n in region:
        for o in n.output:
            if not o or o == out:
                continue
            if view.is_output(o):
                raise _NoMatch(f"internal tensor {o} is a graph output")
            outside = [c for c in view.consumers.get(o, []) if id(c) not in region_ids]
            if outside:
                raise _NoMatch(f"internal tensor {o} is also read by {view.node_name(outside[0])}")
    low, high, h = info["low"], info["high"], info["h"]
    c = int(info["w2"].size)
    for name in ("ln_w", "ln_b"):
        if info[name].size != c:
            raise _NoMatch(f"{name} has {info[name].size} values, w2 has {c}")
    shapes = {k: view.shape(t) for k, t in (("low", low), ("high", high), ("h", h))}
    if any(s is None for s in shapes.values()):
        missing = [k for k, s in shapes.items() if s is None]
        raise _NoMatch(f"unknown shape of {missing[0]} (run onnx shape inference on the graph first)")
    for k in ("high", "h"):
        if not _same_dims(shapes["low"], shapes[k]):
            raise _NoMatch(f"{k} has shape {shapes[k]}, low has {shapes['low']}: the plugin needs one shape")
    last = shapes["low"][-1] if shapes["low"] else None
    if last is not None and last != c:
        raise _NoMatch(f"low has {last} channels, the gate weights {c}")
    types = {k: view.elem_type(t) for k, t in (("low", low), ("high", high), ("h", h))}
    if len({t for t in types.values() if t}) > 1:
        raise _NoMatch(f"low/high/h have different dtypes {types}: the plugin needs one dtype")
    et = types["low"] or types["high"] or types["h"]
    dtype = _np_dtype(et) if et else np.dtype(info["w2"].dtype)
    if dtype.kind != "f" and dtype.name != "bfloat16":
        raise _NoMatch(f"activation dtype {dtype} is not a float type")
    # does h come from a GEMM that reads low? (expected, informative only)
    from_low = False
    ph = view.prod(m._strip(h, record=False)) if h else None
    for _ in range(3):
        if ph is None:
            break
        if ph.op_type in ("MatMul", "Gemm"):
            from_low = m._strip(ph.input[0], record=False) == m._strip(low, record=False)
            break
        nxt = None
        if ph.op_type == "Add":
            nxt = next((i for i in ph.input if view.const(i) is None), None)
        ph = view.prod(m._strip(nxt, record=False)) if nxt else None
    return GateMatch(layer_norm=view.node_name(root), output=out, low=low, high=high, h=h, eps=info["eps"],
                     channels=c, dtype=dtype.name, w2=info["w2"], b2=info["b2"], ln_w=info["ln_w"],
                     ln_b=info["ln_b"], nodes=[view.node_name(n) for n in m.region],
                     dropped_qdq=[view.node_name(n) for n in m.qdq], decomposed_ln=info["decomposed"],
                     h_from_low=from_low)
