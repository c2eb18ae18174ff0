"""Seeded fuzzing of the files an untrusted workdir or checkpoint hands the loaders (docs/security.md, promise 2):
`manifest.json` (types, values, deletions, nesting, path strings, raw bytes) and safetensors headers (the length
prefix, the JSON, dtypes, shapes, offsets, raw bytes), a few hundred mutations each, every one loaded through the real
loaders (Manifest.load + Pipeline.from_workdir; checkpoint.weight_files + load_state_into) under the audit recorder
of tests/adversarial.py.

Asserted for every mutation: the loader either succeeds or raises a CheersError subclass with a one-line message
(never a KeyError, TypeError, RecursionError, MemoryError... that would reach the user as a traceback), and nothing
outside the case folder is read (paths and links to a sibling `outside/` folder are in the mutation pool).

Seeded (FUZZ_SEED, default 0; `FUZZ_SEED=7 pytest tests/test_fuzz.py` explores other mutations), in all on
2 cores (about 6 s). A failure names the iteration and the mutation, so it replays with the same seed.
"""
import copy
import json
import os
import random
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from adversarial import Result, record
from cheers_deploy import constants as C
from cheers_deploy.errors import CheersError
from cheers_deploy.hub import bundled_workdir

SEED = int(os.environ.get("FUZZ_SEED", "0"))
MANIFEST_ROUNDS = 400
HEADER_ROUNDS = 500
BUNDLED_WD = bundled_workdir()


# ================================================================================================== mutation
def _nodes(doc, path=()):
    """(container, key, path) of every value below the root."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        yield doc, k, path + (k,)
        if isinstance(v, (dict, list)):
            yield from _nodes(v, path + (k,))


def _nested(depth: int):
    v = 1
    for i in range(depth):
        v = [v] if i % 2 else {"x": v}
    return v


SCALARS = [None, True, False, 0, -1, 1, 3, 7, 2 ** 31, 2 ** 63, -2 ** 63, 10 ** 9, 10 ** 30, 0.5, -1e300, 1e300,
           "", "x", "float32", "bool", "int64", "{i}", "batch", "a" * 5000, "\u0000", "prefill", [], {}, [1, 2],
           [-1, "x"], {"a": None}]


def _path_pool(outside: Path):
    return ["../outside/x.onnx", "../../outside/x.onnx", str(outside / "x.onnx"), str(outside / "t.npy"),
            "link_out.onnx", "link_out.npy", "link_dir/x.onnx", "link_in.onnx", "/etc/passwd", "", ".", "..",
            "a/../../outside/x.onnx", "x\u0000y", "~/.bashrc", "C:\\x.onnx", "\\\\server\\share\\x", "sub/",
            C.EMBED_FILE, "backbone.onnx", "cfm_head.onnx", "nonexistent.onnx", "engines", "manifest.json",
            "calib/../backbone.onnx", "x" * 2000]


def _random_value(rng, pool):
    r = rng.random()
    if r < 0.35:
        return copy.deepcopy(rng.choice(SCALARS))
    if r < 0.7:
        return rng.choice(pool)
    if r < 0.8:
        return _nested(rng.choice([20, 70, 200]))          # deeper: the byte mutations insert 5000 "["
    return rng.randint(-2 ** 40, 2 ** 40)


FILE_KEYS = ("file", "external_data")


def mutate_doc(rng, doc, pool):
    """1-3 structural mutations; half of them aimed at the fields that name files, tensors or sizes."""
    doc = copy.deepcopy(doc)
    done = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        nodes = list(_nodes(doc))
        if not nodes:
            break
        files = [n for n in nodes if n[1] in FILE_KEYS]
        aimed = [n for n in nodes if n[1] in ("shape", "num_kv_heads", "head_dim", "num_layers", "dtype", "name",
                                              "precisions", "hidden_size", "vocab_size", "checkpoint_hash",
                                              "tokens_per_image", "max_context", "num_key_value_heads")]
        r = rng.random()
        op = rng.choice(["delete", "value", "value", "path", "swap", "add_variant", "grow"])
        if files and r < 0.3:                                           # a file a graph or the table is read from
            (parent, key, path), op = rng.choice(files), "path"
        else:
            parent, key, path = rng.choice(aimed if aimed and r < 0.65 else nodes)
        if op == "delete":
            del parent[key]
        elif op == "value":
            parent[key] = _random_value(rng, pool)
        elif op == "path":
            parent[key] = rng.choice(pool)
        elif op == "swap":
            other = rng.choice(nodes)                                   # (nothing was changed since `nodes`)
            parent[key] = copy.deepcopy(other[0][other[1]])
        elif op == "add_variant":
            graphs = doc.get("graphs") if isinstance(doc, dict) else None
            if isinstance(graphs, dict) and graphs:
                g = rng.choice(sorted(graphs))
                if isinstance(graphs[g], dict):
                    graphs[g]["precisions"] = {"fp32": {"file": rng.choice(pool),
                                                        "external_data": rng.choice([None] + pool)}}
        elif op == "grow" and isinstance(parent[key], list):
            parent[key] = parent[key] * rng.choice([2, 50])
        done.append(f"{op} {'.'.join(map(str, path))[:80]}")
    return doc, done


def mutate_bytes(rng, raw: bytes):
    """Byte-level damage: truncation, a flipped byte, inserted garbage, a NaN, an absurd integer."""
    op = rng.choice(["truncate", "flip", "insert", "nan", "bigint"])
    if op == "truncate":
        return raw[:rng.randrange(len(raw))], op
    if op == "flip":
        i = rng.randrange(len(raw))
        return raw[:i] + bytes([raw[i] ^ (1 << rng.randrange(8))]) + raw[i + 1:], op
    if op == "insert":
        i = rng.randrange(len(raw))
        junk = rng.choice([b"[", b"{", b"\xff", b'"', b",", b"\x00"]) * rng.choice([1, 10, 5000])
        return raw[:i] + junk + raw[i:], op
    if op == "nan":
        return raw.replace(b"2048", b"NaN", 1), op
    return raw.replace(b"2048", b"9" * rng.choice([20, 5000]), 1), op


def _entry(doc, graph: str):
    graphs = doc.get("graphs") if isinstance(doc, dict) else None
    return graphs.get(graph) if isinstance(graphs, dict) else None


def _check(res, events, case: Path, what: str):
    if isinstance(res, BaseException):
        assert isinstance(res, CheersError), f"{what}: {type(res).__name__}: {str(res)[:300]}"
        assert "\n" not in str(res).strip(), f"{what}: a multi-line message: {res}"
    bad = Result(0, "", "", events, case).outside
    assert not bad, f"{what}: read outside the case folder: {bad[:3]}"


# ================================================================================================== manifest
@pytest.fixture(scope="module")
def fuzz_case(tmp_path_factory):
    """case/wd = a copy of the shipped graphs with links in and out; outside/ holds files an attack points at."""
    if BUNDLED_WD is None:
        pytest.skip("the package ships no bundled graphs")
    base = tmp_path_factory.mktemp("fuzz")
    case, outside = base / "case", base / "outside"
    case.mkdir()
    outside.mkdir()
    wd = Path(shutil.copytree(BUNDLED_WD, case / "wd"))
    shutil.copy(wd / "vae_decoder.onnx", outside / "x.onnx")
    shutil.copy(wd / C.EMBED_FILE, outside / "t.npy")
    os.symlink(outside / "x.onnx", wd / "link_out.onnx")
    os.symlink(outside / "t.npy", wd / "link_out.npy")
    os.symlink(outside, wd / "link_dir")
    os.symlink("backbone.onnx", wd / "link_in.onnx")
    (wd / "sub").mkdir()
    return case, outside, wd


def test_fuzz_manifest(fuzz_case):
    from cheers_deploy.manifest import Manifest
    from cheers_deploy.runtime.pipeline import Pipeline

    case, outside, wd = fuzz_case
    rng = random.Random(SEED)
    pool = _path_pool(outside)
    original = (wd / "manifest.json").read_bytes()
    doc = json.loads(original)
    outcomes = {"ok": 0, "refused": 0}
    try:
        for i in range(MANIFEST_ROUNDS):
            graph = rng.choice(C.GRAPH_NAMES)
            if rng.random() < 0.2:
                raw, desc = mutate_bytes(rng, original)
                desc = [desc]
            else:
                mutated, desc = mutate_doc(rng, doc, pool)
                raw = json.dumps(mutated).encode()
                graph = next((g for g in C.GRAPH_NAMES if _entry(mutated, g) != _entry(doc, g)), graph)
            (wd / "manifest.json").write_bytes(raw)

            def load():
                Manifest.load(wd)
                return Pipeline.from_workdir(wd, graphs=(graph,))
            res, events = record(load)
            _check(res, events, case, f"seed {SEED} round {i} ({graph}): {desc}")
            outcomes["refused" if isinstance(res, BaseException) else "ok"] += 1
    finally:
        (wd / "manifest.json").write_bytes(original)
    assert outcomes["refused"] > MANIFEST_ROUNDS // 2 and outcomes["ok"] > 0, outcomes


# ================================================================================================== safetensors
TENSORS = {"a.weight": (4, 3), "a.bias": (4,), "b.weight": (2, 4), "b.bias": (2,)}
DTYPES = ["F32", "F16", "BF16", "I64", "BOOL", "U8", "F64", "F99", "", None, 3, "f32", "OBJECT"]


def _small_checkpoint(ck: Path):
    """A 4-tensor safetensors checkpoint (the shapes of two nn.Linear(3,4), nn.Linear(4,2)); header and data."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    ck.mkdir()
    save_file({k: rng.standard_normal(s).astype(np.float32) for k, s in TENSORS.items()}, str(ck / "model.safetensors"),
              metadata={"format": "pt"})
    raw = (ck / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def mutate_header(rng, header, data, pool):
    h = copy.deepcopy(header)
    names = [k for k in h if k != "__metadata__"]
    desc = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        name = rng.choice(names + ["__metadata__", "new"])
        entry = h.get(name)
        op = rng.choice(["dtype", "shape", "offsets", "offsets", "delete_key", "entry", "overlap", "metadata"])
        if op == "dtype" and isinstance(entry, dict):
            entry["dtype"] = rng.choice(DTYPES)
        elif op == "shape" and isinstance(entry, dict):
            entry["shape"] = rng.choice([[], [0], [-1], [2 ** 62], [4, 3, 1], [12], ["4", 3], None, [2 ** 31] * 8,
                                         [1] * 50, _nested(200), [True]])
        elif op == "offsets" and isinstance(entry, dict):
            offsets = entry.get("data_offsets")
            lo, hi = offsets if isinstance(offsets, list) and len(offsets) == 2 and \
                all(isinstance(o, int) for o in offsets) else (0, 0)
            entry["data_offsets"] = rng.choice([[hi, lo], [lo, hi + 4], [lo - 4, hi - 4], [lo + 2 ** 62, hi],
                                                [0, len(data) + 1], [0], [0, 1, 2], None, ["0", "4"], [-8, 0],
                                                [2 ** 64, 2 ** 64 + 4], [0.0, 4.0]])
        elif op == "delete_key" and isinstance(entry, dict) and entry:
            del entry[rng.choice(sorted(entry))]
        elif op == "entry":
            h[name] = _random_value(rng, pool)
        elif op == "overlap" and len(names) > 1:
            a, b = rng.sample(names, 2)
            if isinstance(h.get(a), dict) and isinstance(h.get(b), dict):
                h[b]["data_offsets"] = copy.deepcopy(h[a].get("data_offsets"))
        elif op == "metadata":
            h["__metadata__"] = rng.choice([None, [], {"format": 1}, {"a": {"b": "c"}}, "pt", _nested(100)])
        desc.append(f"{op} {name}")
    return h, desc


def _write_st(path: Path, header_bytes: bytes, data: bytes, length=None):
    path.write_bytes(struct.pack("<Q", len(header_bytes) if length is None else length) + header_bytes + data)


def test_fuzz_safetensors_header(tmp_path):
    torch = pytest.importorskip("torch")
    from cheers_deploy.checkpoint import load_state_into, read_safetensors_header, weight_files

    case, outside = tmp_path / "case", tmp_path / "outside"
    case.mkdir()
    outside.mkdir()
    ck = case / "ck"
    header, data = _small_checkpoint(ck)
    path = ck / "model.safetensors"
    good_header = json.dumps(header).encode()
    pool = _path_pool(outside)
    model = torch.nn.Module()
    model.a, model.b = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
    rng = random.Random(SEED + 1)
    outcomes = {"ok": 0, "refused": 0}
    for i in range(HEADER_ROUNDS):
        r = rng.random()
        if r < 0.15:                                                    # the 8-byte length prefix
            length = rng.choice([0, 1, 7, len(good_header) - 1, len(good_header) + 1, len(good_header) + len(data),
                                 2 ** 31, 2 ** 62, 2 ** 64 - 1, 100 * 2 ** 20 + 1])
            _write_st(path, good_header, data, length)
            desc = [f"length {length}"]
        elif r < 0.3:                                                   # raw bytes of the header / file
            raw, op = mutate_bytes(rng, good_header)
            _write_st(path, raw, data[:rng.choice([len(data), len(data) // 2, 0])])
            desc = [f"bytes {op}"]
        else:
            h, desc = mutate_header(rng, header, data, pool)
            _write_st(path, json.dumps(h).encode(), data)

        def load():
            read_safetensors_header(path)
            weight_files(ck)
            load_state_into(model, ck)
        res, events = record(load)
        _check(res, events, case, f"seed {SEED} round {i}: {desc}")
        outcomes["refused" if isinstance(res, BaseException) else "ok"] += 1
    assert outcomes["refused"] > HEADER_ROUNDS // 2, outcomes


def test_fuzz_shard_index(tmp_path):
    """The shard index (model.safetensors.index.json) fuzzed with the same path pool: never a read outside."""
    from cheers_deploy.checkpoint import weight_files

    case, outside = tmp_path / "case", tmp_path / "outside"
    case.mkdir()
    outside.mkdir()
    ck = case / "ck"
    _small_checkpoint(ck)
    shutil.copy(ck / "model.safetensors", outside / "x.onnx")          # a valid shard, outside
    os.symlink(outside / "x.onnx", ck / "link_out.onnx")
    os.replace(ck / "model.safetensors", ck / "model-00001-of-00001.safetensors")
    index = {"metadata": {"total_size": 0}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in TENSORS}}
    pool = _path_pool(outside)
    rng = random.Random(SEED + 2)
    for i in range(200):
        mutated, desc = mutate_doc(rng, index, pool)
        (ck / "model.safetensors.index.json").write_text(json.dumps(mutated))
        res, events = record(weight_files, ck)
        _check(res, events, case, f"seed {SEED} round {i}: {desc}")
