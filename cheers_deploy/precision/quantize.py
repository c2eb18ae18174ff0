"""`cheers-deploy calibrate quantize`: INT8 Q/DQ graphs from the captured calibration data.

Per graph: `onnxruntime.quantization.quantize_static` (QDQ format) over the captured feeds, MatMul/Gemm/Conv only,
symmetric per-tensor activations (zero point 0), symmetric per-channel weights (axis set on the weight
DequantizeLinear). Output `<graph>.int8.onnx` next to the fp32 graph, registered as
`manifest.graphs[g].precisions.int8`. TensorRT builds it strongly typed: INT8 exactly where the Q/DQ nodes are.

Excluded nodes (left in fp32):
* the hi gate of `cfm_head` (the region graphs/matcher.py finds and build/surgery.py fuses into the
  CheersGatedResidual plugin, in particular its C->1 tail GEMM): the plugin runs that region in floating point, so
  quantizing it would make the fused TensorRT engine differ from the ONNX graph (surgery would have to drop internal
  Q/DQ pairs);
* nodes matching `--exclude` patterns (fnmatch on node names, e.g. '*lm_head*', '/layers.0/*').
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib
import io
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..errors import InputError, MissingDependencyError
from ..manifest import Manifest
from ..constants import EXTERNAL_DATA_BYTES
from ..graphs.onnx_io import save_model
from .common import GRAPHS, iter_feeds, register_variant, variant_file

METHODS = ("entropy", "minmax", "percentile")
DEFAULT_METHOD = "percentile"                  # measured best per graph on the trained model (docs/precision.md)
OP_TYPES = ("MatMul", "Gemm", "Conv")
DEFAULT_EXCLUDE: Dict[str, List[str]] = {}    # measured defaults: see docs/precision.md ("INT8 exclusions")
MAX_CALLS = 64                                 # captured calls per graph fed to the calibrator
ENTROPY_BINS = 2048                            # histogram bins of the entropy/percentile calibrators


def hi_gate_nodes(model) -> List[str]:
    """Node names of the hi-gate region(s) the TensorRT plugin replaces (empty when no gate matches)."""
    from ..graphs.matcher import find_gated_residuals

    try:
        rep = find_gated_residuals(model)
    except Exception:   # pragma: no cover - a graph surgery cannot read is simply not excluded
        return []
    return [n for m in rep.fused for n in m.nodes]


def excluded_nodes(model, graph: str, patterns: Sequence[str] = (), exclude_hi_gate: bool = True,
                   exclude_activation_matmul: bool = False) -> List[str]:
    """Names of the quantizable nodes to keep in fp32."""
    inits = {i.name for i in model.graph.initializer}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    out = set()
    if exclude_hi_gate:
        out.update(hi_gate_nodes(model))
    pats = list(patterns) + DEFAULT_EXCLUDE.get(graph, [])
    for n in model.graph.node:
        if n.op_type not in OP_TYPES:
            continue
        if any(fnmatch.fnmatchcase(n.name, p) for p in pats):
            out.add(n.name)
        # MatMul of two activations (attention scores / weighted values): no weight to quantize per channel
        if exclude_activation_matmul and n.op_type == "MatMul" and not any(i in inits or i in consts
                                                                          for i in n.input[:2]):
            out.add(n.name)
    return sorted(out)


_LAYER = re.compile(r"^(.*?/(?:layers|blocks|block|encoder_layers|resnets|attentions)[._]\d+)(?:/|$)")


def layer_groups(model) -> Dict[str, List[str]]:
    """Quantizable nodes (OP_TYPES) grouped by transformer/conv layer for the per-layer sensitivity sweep.

    The group of a node is the path of its name up to the first numbered layer segment
    (`/language_model/layers.3/mlp/up_proj/MatMul` -> `/language_model/layers.3`). Nodes outside numbered layers
    are grouped by their first path component (the patch embedding, projectors, the LM head, ...), and nodes
    without a path form the group `(top)`. The order follows the graph."""
    groups: Dict[str, List[str]] = {}
    for n in model.graph.node:
        if n.op_type not in OP_TYPES:
            continue
        m = _LAYER.match(n.name)
        if m:
            key = m.group(1)
        else:
            parts = [p for p in n.name.split("/") if p]
            key = "/" + parts[0] if len(parts) > 1 else "(top)"
        groups.setdefault(key, []).append(n.name)
    return groups


class ShardReader:
    """onnxruntime CalibrationDataReader over the captured feeds of one graph."""

    def __init__(self, workdir, graph: str, input_names: Sequence[str], limit: int = MAX_CALLS):
        self.feeds = [{k: f[k] for k in input_names} for f in iter_feeds(workdir, graph, limit=limit)]
        if not self.feeds:
            raise InputError(f"no captured inputs for graph '{graph}' (run cheers-deploy calibrate capture)")
        self._it = iter(self.feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self.feeds)

    def __len__(self):
        return len(self.feeds)


@contextlib.contextmanager
def _ragged_histograms(q):
    """onnxruntime's HistogramCollector (entropy/percentile) stacks every call's copy of a tensor with
    np.asarray, which fails when calls have different shapes (the backbone's prefill/decode/image-step feeds, a
    growing KV cache). Histograms only need the values: flatten and concatenate them first."""
    from onnxruntime.quantization import calibrate as c

    orig = c.HistogramCollector.collect

    def collect(self, name_to_arr):
        flat = {k: (np.concatenate([np.asarray(a).ravel() for a in v]) if isinstance(v, list) and v else v)
                for k, v in name_to_arr.items()}
        return orig(self, flat)

    c.HistogramCollector.collect = collect
    qq = importlib.import_module("onnxruntime.quantization.quantize")
    orig_create = qq.create_calibrator

    def create_calibrator(*args, **kwargs):
        # quantize_static does not pass num_bins through; ORT's default of 128 bins with 128 quantized bins
        # leaves the entropy search a single candidate (the max), i.e. "entropy" silently equals minmax.
        # Use TensorRT's classic entropy setting instead: 2048 histogram bins, 128 quantized bins.
        opts = dict(kwargs.get("extra_options") or {})
        opts.setdefault("num_bins", ENTROPY_BINS)
        opts.setdefault("num_quantized_bins", 128)
        kwargs["extra_options"] = opts
        return orig_create(*args, **kwargs)

    qq.create_calibrator = create_calibrator
    try:
        yield
    finally:
        c.HistogramCollector.collect = orig
        qq.create_calibrator = orig_create


# onnxruntime.quantization.quantize_static logs this through the root logger once per call ("Please consider to run
# pre-processing before quantization. Refer to example: ..."): the shape-inference/optimisation pre-pass it suggests
# is what the export already did (onnxslim + symbolic shapes), so for our graphs it is noise, ten lines per run.
PREPROCESS_WARNING = re.compile(r"^Please consider (to run )?pre-processing before quantization")


class _DropPreprocessWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not PREPROCESS_WARNING.match(record.getMessage())
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is not ours to drop
            return True


@contextlib.contextmanager
def quiet_preprocess_warning():
    """Drop onnxruntime's pre-processing suggestion (and only it) while quantizing. onnxruntime logs it with
    `logging.warning`, i.e. on the root logger; its own loggers get the filter too in case a version moves it."""
    filt = _DropPreprocessWarning()
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization"),
               logging.getLogger("onnxruntime.quantization.quantize")]
    for lg in loggers:
        lg.addFilter(filt)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(filt)


@contextlib.contextmanager
def private_tempdir(workdir: Path):
    """A temporary folder inside the workdir for everything the quantizer writes before the result: our raw
    quantized model, and what onnxruntime.quantization writes on its own (its `model_input.onnx` and
    `augmented_model.onnx` copies go to tempfile.TemporaryDirectory: tempfile's default folder points here for the
    call). Removed in a finally, so an error or Ctrl-C leaves no `*.tmp.onnx` or augmented model behind, and nothing is
    written outside the workdir."""
    d = Path(tempfile.mkdtemp(prefix=".quantize-", dir=str(workdir)))
    saved = tempfile.tempdir
    tempfile.tempdir = str(d)
    try:
        yield d
    finally:
        tempfile.tempdir = saved
        _remove_tree(d)


def _remove_tree(folder: Path) -> None:
    """Remove a folder we made, file by file by absolute path (links are removed, never followed)."""
    for root, dirs, names in os.walk(folder, topdown=False):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(root, name))
        for name in dirs:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(root, name))
    with contextlib.suppress(OSError):
        os.rmdir(folder)
    if os.path.exists(folder):                     # something we could not remove file by file
        shutil.rmtree(folder, ignore_errors=True)


def _ort_quant():
    try:
        from onnxruntime import quantization as q
    except ImportError as exc:  # pragma: no cover
        raise MissingDependencyError("INT8 quantization needs onnxruntime.quantization (pip install onnxruntime)") \
            from exc
    return q


def quantize_graph(workdir, graph: str, method: str = DEFAULT_METHOD, exclude: Sequence[str] = (),
                   out_name: Optional[str] = None, exclude_hi_gate: bool = True,
                   exclude_activation_matmul: bool = False, limit: int = MAX_CALLS, man: Optional[Manifest] = None,
                   register_as: Optional[str] = "int8", quantize_outputs: bool = False) -> dict:
    """Quantize one graph; returns the manifest variant entry (file, excluded nodes, counts)."""
    import onnx

    q = _ort_quant()
    if method not in METHODS:
        raise InputError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    workdir = Path(workdir)
    man = man or Manifest.load(workdir)
    src = man.graph_path(graph)
    model = onnx.load(str(src), load_external_data=False)
    excl = excluded_nodes(model, graph, exclude, exclude_hi_gate, exclude_activation_matmul)
    reader = ShardReader(workdir, graph, man.graph(graph).input_names, limit)
    out_name = out_name or variant_file(graph, "int8")
    out = workdir / out_name
    cal = {"entropy": q.CalibrationMethod.Entropy, "minmax": q.CalibrationMethod.MinMax,
           "percentile": q.CalibrationMethod.Percentile}[method]
    big = src.stat().st_size > EXTERNAL_DATA_BYTES or bool(man.graph(graph).external_data)
    t0 = time.perf_counter()
    with private_tempdir(workdir) as tmp_dir:
        tmp = tmp_dir / (out_name + ".tmp.onnx")
        with _ragged_histograms(q), quiet_preprocess_warning(), contextlib.redirect_stdout(io.StringIO()):
            q.quantize_static(str(src), str(tmp), reader, quant_format=q.QuantFormat.QDQ,
                              op_types_to_quantize=list(OP_TYPES),
                              per_channel=True, activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
                              calibrate_method=cal, nodes_to_exclude=excl, use_external_data_format=big,
                              extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                             # Q/DQ on the inputs of MatMul/Gemm/Conv only (TensorRT's and
                                             # ModelOpt's placement): residual adds, gates and softmax read
                                             # unrounded outputs
                                             "OpTypesToExcludeOutputQuantization":
                                                 [] if quantize_outputs else list(OP_TYPES)})
        qm = onnx.load(str(tmp))
        ext = save_model(qm, out)                       # atomic (fileio.atomic_path) into the workdir
    counts = {op: sum(1 for n in qm.graph.node if n.op_type == op) for op in ("QuantizeLinear", "DequantizeLinear")}
    info = {"method": method, "calibration_calls": len(reader), "excluded_nodes": excl,
            "qdq_nodes": counts, "seconds": round(time.perf_counter() - t0, 1),
            "tool": f"onnxruntime.quantization {_ort_version()}", "activations": "int8 symmetric per-tensor",
            "outputs_quantized": bool(quantize_outputs), "histogram_bins": ENTROPY_BINS if method != "minmax" else None,
            "weights": "int8 symmetric per-channel"}
    if register_as:
        return register_variant(man, graph, register_as, out_name, ext, **info)
    return dict(info, file=out_name, external_data=ext)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def quantize(workdir, graphs: Optional[Sequence[str]] = None, method: str = DEFAULT_METHOD, exclude: Sequence[str] = (),
             exclude_hi_gate: bool = True, exclude_activation_matmul: bool = False, quantize_outputs: bool = False,
             log=print) -> dict:
    """Quantize the graphs (default all five) and save the manifest. Returns {graph: variant entry}."""
    workdir = Path(workdir)
    man = Manifest.load(workdir)
    graphs = list(graphs or GRAPHS)
    bad = [g for g in graphs if g not in GRAPHS]
    if bad:
        raise InputError(f"unknown graph(s) {bad}; choose from {', '.join(GRAPHS)}")
    out = {}
    for g in graphs:
        v = quantize_graph(workdir, g, method, exclude, exclude_hi_gate=exclude_hi_gate,
                           exclude_activation_matmul=exclude_activation_matmul, man=man,
                           quantize_outputs=quantize_outputs)
        log(f"quantize: {g}: {v['file']} ({v['qdq_nodes']['QuantizeLinear']} Q / {v['qdq_nodes']['DequantizeLinear']}"
            f" DQ, {len(v['excluded_nodes'])} excluded, {v['calibration_calls']} calls, {v['seconds']} s)")
        out[g] = v
        # the sweep's plan and per-layer graphs were measured against the previous int8 graph: drop them
        stale = [p for p in ("mixed", "int8_layers") if man.graph(g).precisions.pop(p, None)]
        if stale:
            man.calibration.pop("mixed", None)
            log(f"quantize: {g}: dropped {', '.join(stale)} (made from the previous int8 graph; run sweep again)")
        man.save()
    return out
