"""Shared helpers of the precision workflow: graph file names per precision, manifest registration, the captured
calibration shards, per-graph error metrics.

Manifest contract (read by engines/build.py `graph_source` and the ORT backend's `precision=`)::

    manifest["graphs"][g]["precisions"][P] = {"file": "<g>.<P>.onnx", "external_data": None | "<file>.data",
                                              "sha256": "...", "method": ..., ...}

Graph inputs/outputs keep the fp32 dtypes of the export in every precision (casts live inside the graphs), so the
manifest's I/O entries stay valid for all of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from ..errors import CheckpointError
from ..constants import GRAPH_NAMES as GRAPHS
from ..fileio import sha256_file, write_json
from ..manifest import Manifest, PrecisionVariant

CALIB_DIR = "calib"
CALIB_MANIFEST = "calib_manifest.json"


def variant_file(graph: str, precision: str) -> str:
    return f"{graph}.{precision}.onnx"


def register_variant(man: Manifest, graph: str, precision: str, file: str, external_data: Optional[str] = None,
                     **info) -> dict:
    """Register `file` as `graph` in `precision` (the file must already exist in the workdir); returns its entry."""
    v = PrecisionVariant(file, external_data, sha256_file(man.workdir / file), dict(info))
    man.graph(graph).precisions[precision] = v
    return v.to_dict()


def graph_file(man: Manifest, graph: str, precision: str) -> Path:
    """Path of `graph` in `precision` (fp32 = the exported file)."""
    v = man.graph(graph).variant(precision)
    if v is None:
        raise CheckpointError(f"workdir {man.workdir}: no {precision} file for graph '{graph}'")
    return man.workdir / v.file


def available_precisions(man: Manifest) -> List[str]:
    """Precisions every graph has a file for, in a stable order."""
    order = ["fp32", "fp16", "bf16", "int8", "mixed"]
    have = set(order)
    for g in GRAPHS:
        if g in man.graphs:
            have &= {"fp32", *man.graph(g).precisions}
    return [p for p in order if p in have]


# ------------------------------------------------------------------------------------------- calibration shards
def calib_dir(workdir) -> Path:
    return Path(workdir) / CALIB_DIR


def load_calib_manifest(workdir) -> dict:
    p = calib_dir(workdir) / CALIB_MANIFEST
    if p.is_file():
        return json.loads(p.read_text())
    return {"format": "cheers-deploy-calib/1", "items": {}, "total_bytes": 0}


def save_calib_manifest(workdir, data: dict) -> None:
    d = calib_dir(workdir)
    d.mkdir(parents=True, exist_ok=True)
    write_json(d / CALIB_MANIFEST, data)


def shard_key(graph: str, mode: str, k: int, name: str) -> str:
    return f"{graph}|{mode}|{k}|{name}"


def iter_feeds(workdir, graph: str, modes: Optional[Tuple[str, ...]] = None,
               limit: Optional[int] = None) -> Iterator[Dict[str, np.ndarray]]:
    """The captured input feeds of `graph` (one dict per recorded call), shard by shard, item order."""
    cm = load_calib_manifest(workdir)
    if not cm["items"]:
        raise CheckpointError(f"workdir {workdir}: no calibration data (run cheers-deploy calibrate capture "
                              f"--workdir {workdir})")
    n = 0
    for item_id in sorted(cm["items"]):
        item = cm["items"][item_id]
        if graph not in item.get("graphs", {}):
            continue
        with np.load(calib_dir(workdir) / item["file"]) as z:
            calls: Dict[Tuple[str, int], Dict[str, np.ndarray]] = {}
            for key in z.files:
                g, mode, k, name = key.split("|", 3)
                if g != graph or (modes and mode not in modes):
                    continue
                calls.setdefault((mode, int(k)), {})[name] = z[key]
        for _, feed in sorted(calls.items()):
            yield feed
            n += 1
            if limit is not None and n >= limit:
                return


# ------------------------------------------------------------------------------------------- metrics
def cosine(a, b) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(a @ b / (na * nb))


def psnr(a, b, peak: float = 255.0) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(peak * peak / mse))


def compare_outputs(outs: List[np.ndarray], refs: List[np.ndarray]) -> dict:
    """Cosine (min over outputs, float ones only) and max abs error vs the reference outputs."""
    cos, mx, rel = [], 0.0, 0.0
    for o, r in zip(outs, refs):
        r = np.asarray(r)
        if not np.issubdtype(r.dtype, np.floating) or r.size == 0:
            continue
        o = np.asarray(o, np.float32)
        cos.append(cosine(o, r))
        d = float(np.max(np.abs(o.astype(np.float64) - r)))
        mx = max(mx, d)
        rel = max(rel, d / (float(np.max(np.abs(r))) + 1e-12))
    return {"cosine": min(cos) if cos else 1.0, "max_abs": mx, "max_rel": rel}


def topo_sort(graph) -> None:
    """Sort a GraphProto's nodes topologically in place (converters append their Casts at the end; ONNX Runtime
    tolerates that, the ONNX reference evaluator and some parsers do not)."""
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    nodes = list(graph.node)
    ordered, pending = [], nodes
    while pending:
        rest = []
        for n in pending:
            if all(i in known for i in n.input):
                ordered.append(n)
                known.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):          # outer-scope names of subgraphs etc.: keep the remaining order
            ordered.extend(rest)
            break
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
