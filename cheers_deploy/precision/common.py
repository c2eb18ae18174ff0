"""Shared helpers of the precision workflow: graph file names per precision, manifest registration, the captured
calibration shards, per-graph error metrics.

Manifest contract (read by engines/build.py `graph_source` and the ORT backend's `precision=`)::

    manifest["graphs"][g]["precisions"][P] = {"file": "<g>.<P>.onnx", "external_data": None | "<file>.data",
                                              "sha256": "...", "method": ..., ...}

Graph inputs/outputs keep the fp32 dtypes of the export in every precision (casts live inside the graphs), so the
manifest's I/O entries stay valid for all of them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from ..errors import CheckpointError
from ..constants import GRAPH_NAMES as GRAPHS
from ..fileio import contained, read_json, sha256_file, write_json
from ..manifest import Manifest, PrecisionVariant, _Reader

CALIB_DIR = "calib"
CALIB_MANIFEST = "calib_manifest.json"
CALIB_FORMAT = "cheers-deploy-calib/1"
MAX_ITEMS = 1 << 16
_SHARD_NAME = re.compile(r"[^/\\]{1,255}\.npz")


def variant_file(graph: str, precision: str) -> str:
    return f"{graph}.{precision}.onnx"


def register_variant(man: Manifest, graph: str, precision: str, file: str, external_data: Optional[str] = None,
                     **info) -> dict:
    """Register `file` as `graph` in `precision` (the file must already exist in the workdir); returns its entry.
    The variant records the checkpoint and source hashes of the exported graph it was made from (provenance: a
    variant of another export is refused as a mixed workdir)."""
    entry = man.graph(graph)
    path = man.path(file, entry.field_name(precision, "file"))
    prov = {k: v for k, v in (("checkpoint_hash", entry.checkpoint_hash), ("from_source_hash", entry.source_hash))
            if v is not None}
    v = PrecisionVariant(file, external_data, sha256_file(path), dict(prov, **info))
    entry.precisions[precision] = v
    return v.to_dict()


def graph_file(man: Manifest, graph: str, precision: str) -> Path:
    """Path of `graph` in `precision` (fp32 = the exported file)."""
    src, _ = man.graph_files(graph, precision)              # contained in the workdir (or refused)
    if src is None:
        raise CheckpointError(f"workdir {man.workdir}: no {precision} file for graph '{graph}'")
    return src


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
    """`calib/calib_manifest.json`, read with fileio.read_json and validated field by field (like manifest.json):
    format, items {id: {file: a shard name inside calib/, bytes, graphs {graph: {mode: count}}, prompt, question}},
    total_bytes. An empty manifest when there is none."""
    workdir = Path(workdir)
    p = contained(workdir, f"{CALIB_DIR}/{CALIB_MANIFEST}", f"workdir {workdir}: {CALIB_DIR}/{CALIB_MANIFEST}")
    if not p.is_file():
        return {"format": CALIB_FORMAT, "items": {}, "total_bytes": 0}
    data = read_json(p)
    where = str(p)
    r = _Reader(data, where)
    if r.get("format", str, None, allow_none=True) != CALIB_FORMAT:
        raise CheckpointError(f"{where}: field 'format' is not {CALIB_FORMAT!r}: capture again (delete "
                              f"{calib_dir(workdir)})")
    items = r.items("items", dict)
    if len(items) > MAX_ITEMS:
        raise CheckpointError(f"{where}: field 'items' has {len(items)} entries (at most {MAX_ITEMS})")
    r.int_in("total_bytes", 0, 1 << 50)
    for k in ("steps", "euler_samples"):
        r.int_in(k, 0, 1 << 20, None, allow_none=True)
    for k in ("cfg_scale", "alpha"):
        r.get(k, float, None, allow_none=True)
    for item_id, item in items.items():
        path = f"items.{item_id:.80}"
        ir = _Reader(item, where, path)
        name = ir.get("file", str)
        if not _SHARD_NAME.fullmatch(name):
            raise CheckpointError(f"{where}: field '{path}.file' = {name!r:.80} must be a .npz file name inside "
                                  f"{CALIB_DIR}/")
        contained(calib_dir(workdir), name, f"{where}: field '{path}.file'")
        ir.int_in("bytes", 0, 1 << 50)
        ir.get("prompt", str, None, allow_none=True), ir.get("question", str, None, allow_none=True)
        graphs = ir.items("graphs", dict)
        for g, modes in graphs.items():
            gr = _Reader(modes, where, f"{path}.graphs.{g:.40}")
            for m in modes:
                gr.int_in(m, 0, 1 << 20)
    return data


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
        shard = contained(calib_dir(workdir), item["file"], f"{calib_dir(workdir) / CALIB_MANIFEST}: field "
                                                           f"'items.{item_id}.file'")
        calls: Dict[Tuple[str, int], Dict[str, np.ndarray]] = {}
        try:
            with np.load(shard, allow_pickle=False) as z:           # a pickled array is refused, never loaded
                for key in z.files:
                    parts = key.split("|", 3)
                    if len(parts) != 4 or not parts[2].isdigit():
                        raise ValueError(f"array {key!r:.80} is not named graph|mode|k|input")
                    g, mode, k, name = parts
                    if g != graph or (modes and mode not in modes):
                        continue
                    calls.setdefault((mode, int(k)), {})[name] = z[key]
        except FileNotFoundError:
            raise CheckpointError(f"workdir {workdir}: calibration shard {shard.name} is missing (capture again)") \
                from None
        except (OSError, ValueError, EOFError, KeyError) as exc:
            raise CheckpointError(f"{shard}: unreadable calibration shard ({type(exc).__name__}: "
                                  f"{' '.join(str(exc).split())[:160]})") from None
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
