"""Export a Cheers checkpoint to five ONNX graphs + the files the runtime needs, idempotently.

    checkpoint ─► per graph: load only its submodules ─► torch.onnx.export (TorchScript) ─► checker + shape
    inference ─► onnxslim (kept only if ORT outputs are unchanged) ─► ORT-vs-torch check ─► <name>.onnx
    (+ <name>.onnx.data when > 2 GB) ─► manifest entry
    + embed_tokens.npy, tokenizer.json, tokenizer_config.json, preprocessor_config.json, manifest.json

A graph is skipped when its manifest entry's source hash (checkpoint + model/export code) and spec hash
(I/O, config, resolution, opset) are unchanged and its files exist, unless `force`. Every graph entry and the
embedding table record the checkpoint hash they came from: an export interrupted while re-exporting another
checkpoint leaves a workdir the runtime refuses as mixed (Manifest.check_provenance).

The output folder: refused when it holds files but no manifest.json (not a workdir) unless `overwrite`; while an
export runs it holds an exclusive lock on `<out>/.export.lock` (fcntl.flock), and a second export into the same
folder fails at once, naming the first one's pid (fileio.exclusive_lock).

One file (over 400 lines): tracing, the weight streaming, slimming and verification of one graph are one
memory-bounded procedure (each step holds at most one copy of the weights), followed by the manifest it feeds.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np

from ..checkpoint import checkpoint_hash, load_config, safetensors_errors, weight_files
from ..constants import (CACHE_LAYOUT, EXPORT_PRECISION as PRECISION, EXTERNAL_DATA_BYTES, GRAPH_NAMES, MANIFEST_NAME,
                         VERSION)
from ..hub import resolve_checkpoint
from ..errors import CheckpointError, InputError, require_torch
from ..fileio import atomic_path, contained, exclusive_lock, read_json, write_json
from ..manifest import (EMBED_FILE, FORMAT, CacheLayout, GenerationDefaults, GraphEntry, ImageInfo, Manifest)
from ..processor import Processor
from ..vocabulary import VOCABULARY_FILE, Vocabulary
from .specs import DEFAULT_MAX_CONTEXT, GraphSpec, graph_specs, past_name, present_name

VERIFY_RTOL = 1e-4                       # max abs error / output scale, ORT vs torch on the tracing sample
SLIM_MAX_BYTES = 1 << 30                 # larger graphs are not slimmed (memory; the gain is per-node overhead)
SLIM_RTOL = 1e-5                         # onnxslim may reassociate float ops (folded BN/scales), nothing more
EMBED_KEY = "model.language_model.embed_tokens.weight"
LOCK_FILE = ".export.lock"               # held (flock) by the export writing into a workdir


# ------------------------------------------------------------------------------------------------ provenance

def code_hash() -> str:
    """sha256 over the model and export sources: a code change re-exports."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for p in sorted(list((root / "model").glob("*.py")) + [root / "export" / n for n in
                                                            ("specs.py", "wrappers.py", "exporter.py")]):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def library_versions() -> Dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    out = {"cheers_deploy": VERSION, "python": platform.python_version(), "torch": torch.__version__,
           "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}
    try:
        import onnxslim

        out["onnxslim"] = onnxslim.__version__
    except ImportError:
        pass
    return out


# ------------------------------------------------------------------------------------------------ weights

def meta_model(cfg):
    """CheersModel with every tensor on the meta device (no memory); graphs materialise what they read."""
    torch = require_torch()
    from ..model import CheersModel

    with torch.device("meta"):
        model = CheersModel(cfg)
    return model.eval()


def load_submodules(model, ckpt: Path, prefixes: Sequence[str]) -> None:
    """Materialise the listed submodules on CPU and copy their tensors from the checkpoint (memory maps),
    so peak RAM is one graph's weights, not the whole model's."""
    torch = require_torch()
    from safetensors import safe_open

    files = weight_files(ckpt)
    wanted: Dict[Path, list] = {}
    for prefix in prefixes:
        sub = model.get_submodule(prefix)
        sub.to_empty(device="cpu")
        for key, target in sub.state_dict(keep_vars=True).items():
            full = f"{prefix}.{key}"
            if full not in files:
                if key.endswith("num_batches_tracked"):
                    target.data.zero_()
                    continue
                raise CheckpointError(f"checkpoint {ckpt} is missing tensor {full}")
            wanted.setdefault(files[full], []).append((full, target))
    with torch.no_grad(), safetensors_errors():
        for f, items in wanted.items():
            with safe_open(str(f), framework="pt") as sf:
                for full, target in items:
                    t = sf.get_tensor(full)
                    if tuple(t.shape) != tuple(target.shape):
                        raise CheckpointError(f"tensor {full}: expected shape {list(target.shape)}, "
                                              f"found {list(t.shape)}")
                    target.data.copy_(t.to(target.dtype))


def release_submodules(model, prefixes: Sequence[str]) -> None:
    for prefix in prefixes:
        model.get_submodule(prefix).to(device="meta")


# ------------------------------------------------------------------------------------------------ one graph

def _ort_session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _feed(spec: GraphSpec, args) -> dict:
    return {n: a.numpy() for n, a in zip(spec.input_names, args)}


def _verify_samples(spec: GraphSpec):
    """Inputs whose dynamic sizes differ from the tracing sample's (batch 2; catches an axis the trace
    specialised): batch 1, and for the backbone a decode-like and a prefill-like call."""
    if spec.name == "backbone":
        return [spec.sample_inputs(batch=1, seed=1, seq=1, past=9, start=5),
                spec.sample_inputs(batch=3, seed=2, seq=5, past=3)]
    return [spec.sample_inputs(batch=1, seed=1)]


def _max_rel_err(outs, refs) -> float:
    worst = 0.0
    for a, b in zip(outs, refs):
        b = np.asarray(b)
        scale = max(float(np.abs(b).max()), 1e-6) if b.size else 1.0
        worst = max(worst, float(np.abs(np.asarray(a, np.float64) - b).max()) / scale if b.size else 0.0)
    return worst


def _trace(spec: GraphSpec, model, path: Path, opset: int) -> None:
    torch = require_torch()
    from .wrappers import export_settings, traced_masked

    wrapper = spec.wrapper(model)
    args = spec.sample_inputs(batch=2)
    with torch.no_grad(), warnings.catch_warnings(), export_settings(model, opset) as calls:
        warnings.simplefilter("ignore")           # TracerWarnings on shape arithmetic, deprecation notices
        torch.onnx.export(wrapper, args, str(path), input_names=spec.input_names,
                          output_names=spec.output_names, dynamic_axes=spec.dynamic_axes(),
                          opset_version=opset, dynamo=False, do_constant_folding=True)
    if spec.name == "backbone" and not traced_masked(calls):
        raise RuntimeError(f"the backbone was traced without the export attention (attention calls by "
                           f"implementation: {dict(calls)}, expected only 'masked'): the mask would be exported "
                           f"as an additive -inf mask")


def _slim(plain: Path, spec: GraphSpec, tmp: Path, samples) -> tuple:
    """onnxslim on the graph at `plain`; returns (path to keep, info). The slimmed graph is kept only if its
    ORT outputs on the verification inputs match the plain graph's. Protos are dropped before the sessions
    are opened, so each step holds at most one copy of the weights besides onnxslim's own."""
    try:
        import onnxslim
    except ImportError:
        return plain, {"applied": False, "reason": "onnxslim not installed"}
    import onnx

    slim_path = tmp / "slim.onnx"
    try:
        proto = onnx.load(str(plain))
        nodes_before = len(proto.graph.node)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            slim = onnxslim.slim(proto)
        del proto
        nodes_after = len(slim.graph.node)
        onnx.save(slim, str(slim_path))
        del slim
    except Exception as exc:  # onnxslim raises anything from its passes; the plain graph is still valid
        return plain, {"applied": False, "reason": f"onnxslim failed: {exc!r}"[:300]}
    try:
        outs = {}
        for key, path in (("plain", plain), ("slim", slim_path)):
            sess = _ort_session(path)
            outs[key] = [sess.run(None, _feed(spec, x)) for x in samples]
            del sess
        err = max(_max_rel_err(a, b) for a, b in zip(outs["slim"], outs["plain"]))
    except Exception as exc:
        return plain, {"applied": False, "reason": f"slimmed graph does not run: {exc!r}"[:300]}
    info = {"nodes_before": nodes_before, "nodes_after": nodes_after, "max_rel_diff": err}
    if err > SLIM_RTOL:
        return plain, dict(info, applied=False, reason=f"changes outputs by {err:.2e} (> {SLIM_RTOL:g})")
    return slim_path, dict(info, applied=True)


def _torch_reference(spec: GraphSpec, model, samples):
    torch = require_torch()
    wrapper = spec.wrapper(model)
    refs = []
    with torch.no_grad():
        for x in samples:
            r = wrapper(*x)
            refs.append([t.numpy() for t in (r if isinstance(r, tuple) else (r,))])
    return refs


def _externalise(proto, src_dir: Path, data_path: Path) -> None:
    """Stream every initializer's bytes (the per-tensor files the TorchScript exporter writes above 2 GB, or
    inline data) into one page-aligned data file, one tensor in memory at a time; point the proto at it."""
    from onnx.external_data_helper import load_external_data_for_tensor, set_external_data, uses_external_data

    with open(data_path, "wb") as f:
        for t in proto.graph.initializer:
            if uses_external_data(t):
                load_external_data_for_tensor(t, str(src_dir))
                del t.external_data[:]
                t.data_location = t.DEFAULT
            if len(t.raw_data) < 1024:
                continue
            f.write(b"\0" * (-f.tell() % 4096))
            offset = f.tell()
            f.write(t.raw_data)
            set_external_data(t, data_path.name, offset=offset, length=len(t.raw_data))
            t.data_location = t.EXTERNAL
            t.ClearField("raw_data")


def export_graph(spec: GraphSpec, model, out_dir: Path, opset: int = 18, simplify: bool = True,
                 verify: bool = True, release: Optional[Callable[[], None]] = None) -> dict:
    """Export one graph of an in-memory (possibly partially materialised) model to out_dir/<name>.onnx
    (+ <name>.onnx.data when the weights exceed 2 GB). `release` is called once the torch weights are no
    longer needed (after tracing and the torch reference outputs), so they never coexist with the ONNX
    copies and the ORT sessions. Returns the manifest fields it measured (files, size, slim, verification)."""
    import onnx

    out_dir = Path(out_dir)
    tmp = out_dir / f".tmp-{spec.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    info: dict = {}
    try:
        t0 = time.perf_counter()
        raw = tmp / "raw.onnx"
        _trace(spec, model, raw, opset)
        info["trace_s"] = round(time.perf_counter() - t0, 2)
        samples = _verify_samples(spec)
        refs = _torch_reference(spec, model, samples) if verify else None
        if release is not None:
            release()
        # Work on a weightless proto: stream the weights into one data file first, so that checking, shape
        # inference and saving never copy them (a 1.7 GB graph peaked at 13.5 GB RSS the in-memory way).
        proto = onnx.load(str(raw), load_external_data=False)   # inline weights load; external ones stay on disk
        _stamp_io_shapes(proto, spec)
        weight_bytes = sum(int(np.prod(i.dims)) * _itemsize(i.data_type) for i in proto.graph.initializer)
        large = weight_bytes > EXTERNAL_DATA_BYTES
        data_name = f"{spec.name}.onnx.data"
        _externalise(proto, tmp, tmp / data_name)
        proto = onnx.shape_inference.infer_shapes(proto)
        plain = tmp / "plain.onnx"
        onnx.save(proto, str(plain))
        del proto
        onnx.checker.check_model(str(plain))                     # path form: checks the data file too
        final = tmp / f"{spec.name}.onnx"
        if not simplify:
            info["slim"] = {"applied": False, "reason": "disabled"}
        elif weight_bytes > SLIM_MAX_BYTES:
            info["slim"] = {"applied": False, "reason": f"weights > {SLIM_MAX_BYTES / 2**30:g} GiB: not simplified "
                                                       f"(onnxslim holds several copies in memory)"}
        if large:
            os.replace(plain, final)                             # stays <name>.onnx + <name>.onnx.data
        else:
            chosen = plain
            if simplify and weight_bytes <= SLIM_MAX_BYTES:
                chosen, info["slim"] = _slim(plain, spec, tmp, samples)
            proto = onnx.load(str(chosen))                       # one file below 2 GB: weights inline
            onnx.save(proto, str(final))
            del proto
            (tmp / data_name).unlink()
        if verify:
            sess = _ort_session(final)
            errs = []
            for x, ref in zip(samples, refs):
                outs = sess.run(None, _feed(spec, x))
                _check_output_shapes(spec, outs, x)
                errs.append(_max_rel_err(outs, ref))
            del sess
            info["verify_max_rel_err"] = max(errs)
            if max(errs) > VERIFY_RTOL:
                raise RuntimeError(f"exported graph '{spec.name}' disagrees with torch: max error "
                                   f"{max(errs):.2e} of the output scale (> {VERIFY_RTOL:g})")
        # move into place: data first, so a visible .onnx always has its data next to it
        if large:
            os.replace(tmp / data_name, out_dir / data_name)
        else:
            (out_dir / data_name).unlink(missing_ok=True)
        os.replace(final, out_dir / f"{spec.name}.onnx")
        info.update(file=f"{spec.name}.onnx", external_data=data_name if large else None,
                    weight_bytes=weight_bytes, export_s=round(time.perf_counter() - t0, 2))
        return info
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _stamp_io_shapes(proto, spec: GraphSpec) -> None:
    """Write the spec's shapes on the graph inputs/outputs: the TorchScript exporter leaves output dims it could
    not infer through shape arithmetic as generated names (e.g. `Reshapevelocity_dim_1`); the spec knows them,
    and the verification step checks the actual output shapes against them."""
    decl = {t.name: t for t in spec.inputs + spec.outputs}
    for vi in list(proto.graph.input) + list(proto.graph.output):
        t = decl.get(vi.name)
        if t is None:
            raise RuntimeError(f"graph '{spec.name}': exported tensor '{vi.name}' is not in the spec")
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != len(t.shape):
            raise RuntimeError(f"graph '{spec.name}': '{vi.name}' has rank {len(dims)}, the spec says {len(t.shape)}")
        for d, want in zip(dims, t.shape):
            if isinstance(want, str):
                d.dim_param = want
            else:
                d.dim_value = want


def _check_output_shapes(spec: GraphSpec, outs, sample) -> None:
    sizes = {}
    for t, a in zip(spec.inputs, sample):
        for d, n in zip(t.shape, a.shape):
            if isinstance(d, str):
                sizes[d] = int(n)
    for t, a in zip(spec.outputs, outs):
        want = spec.concrete_shape(t, sizes)
        if tuple(a.shape) != want:
            raise RuntimeError(f"graph '{spec.name}': output '{t.name}' has shape {tuple(a.shape)}, the spec "
                               f"says {want}")


def _itemsize(onnx_dtype: int) -> int:
    import onnx

    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(onnx_dtype)).itemsize


# ------------------------------------------------------------------------------------------------ side files

def write_embed_table(ckpt: Path, out_dir: Path) -> dict:
    """The token embedding matrix (V,D) as float32 .npy, memory-mapped by the runtime for embedding lookup."""
    torch = require_torch()
    from safetensors import safe_open

    files = weight_files(ckpt)
    if EMBED_KEY not in files:
        raise CheckpointError(f"checkpoint {ckpt} has no {EMBED_KEY}")
    with safetensors_errors(), safe_open(str(files[EMBED_KEY]), framework="pt") as sf:
        table = sf.get_tensor(EMBED_KEY).to(torch.float32).numpy()
    with atomic_path(out_dir / EMBED_FILE) as tmp:
        np.save(tmp, table)
    return {"file": EMBED_FILE, "shape": list(table.shape), "dtype": "float32"}


def write_processor_files(ckpt: Path, out_dir: Path, proc: Processor) -> None:
    """tokenizer.json + tokenizer_config.json, preprocessor_config.json, and the vocabulary file when the checkpoint
    has one (unknown-word warnings work on the workdir too)."""
    proc.tokenizer.save(out_dir)
    cfg = {}
    src = contained(ckpt, "preprocessor_config.json", f"checkpoint {ckpt}: preprocessor_config.json")
    if src.is_file():
        cfg = read_json(src)
    cfg.update(scale_resolution=proc.resolution, patch_size=proc.patch_size)
    write_json(out_dir / "preprocessor_config.json", cfg)
    vocab = Vocabulary.load(ckpt)
    if vocab is not None:
        write_json(out_dir / VOCABULARY_FILE, vocab.to_dict())
    else:
        (out_dir / VOCABULARY_FILE).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ all

def check_out_dir(out_dir: Path, overwrite: bool = False) -> None:
    """Refuse to export into a folder that holds files but is not a workdir (no manifest.json), unless `overwrite`:
    a mistyped --out must not scatter graphs among (or replace) someone's files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir} is a file, not a folder")
    if overwrite or not out_dir.is_dir() or (out_dir / MANIFEST_NAME).is_file():
        return
    others = sorted(p.name for p in out_dir.iterdir() if p.name != LOCK_FILE)
    if others:
        shown = ", ".join(others[:3]) + (f" (+{len(others) - 3} more)" if len(others) > 3 else "")
        raise InputError(f"--out {out_dir} is not empty and is not a workdir (no {MANIFEST_NAME}; it holds {shown}): "
                         f"pick an empty or new folder, or pass --overwrite to export into it anyway")


def export_all(checkpoint_dir=None, out_dir="work/tiny", image_size: Optional[int] = None, batch_max: int = 2,
               max_context: int = DEFAULT_MAX_CONTEXT, force: bool = False, opset: int = 18, progress: bool = True,
               graphs: Optional[Sequence[str]] = None, simplify: bool = True, verify: bool = True,
               overwrite: bool = False) -> Manifest:
    """Export every graph of a checkpoint (None = the bundled default) into `out_dir` and write the manifest.
    `image_size` defaults to the checkpoint's preprocessor resolution. Returns the manifest.

    `out_dir` must be new, empty or a workdir unless `overwrite`; the export holds `<out_dir>/.export.lock` while it
    runs (a concurrent export into the same folder fails at once with the holder's pid)."""
    require_torch()
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out {out_dir}: cannot create the folder ({exc.strerror or exc})") from None
    with exclusive_lock(out_dir / LOCK_FILE, f"export into {out_dir}"):
        return _export_locked(checkpoint_dir, out_dir, image_size, batch_max, max_context, force, opset, progress,
                              graphs, simplify, verify)


def _export_locked(checkpoint_dir, out_dir: Path, image_size, batch_max, max_context, force, opset, progress, graphs,
                   simplify, verify) -> Manifest:
    from tqdm.auto import tqdm

    ckpt = resolve_checkpoint(checkpoint_dir)
    cfg = load_config(ckpt)
    proc = Processor.from_dir(ckpt, default_resolution=cfg.vision_representation_config.image_size,
                              resolution=image_size)
    names = list(graphs) if graphs else list(GRAPH_NAMES)
    specs = graph_specs(cfg, proc.resolution, batch_max, max_context, names)
    ckpt_hash = checkpoint_hash(ckpt)
    source_hash = hashlib.sha256((ckpt_hash + code_hash()).encode()).hexdigest()

    man = Manifest.load_or_empty(out_dir)
    old_hash = man.checkpoint.get("hash")
    if old_hash and old_hash != ckpt_hash:
        # The workdir was exported from another checkpoint (or the same directory retrained): every graph is
        # re-exported, and nothing derived from the old weights may stay registered.
        stale = ["calibration"] if man.calibration else []
        dropped = [g for g in man.graphs if g not in names]
        for g in dropped:
            del man.graphs[g]
        man.calibration = {}
        print(f"export: {out_dir} held graphs of another checkpoint "
              f"({man.checkpoint.get('path', '?')}, hash {old_hash[:12]}); re-exporting for "
              f"{ckpt} (hash {ckpt_hash[:12]}). Precision graphs and calibration data of the old weights are "
              f"unregistered{' (' + ', '.join(stale + dropped) + ')' if stale or dropped else ''}: "
              f"run `cheers-deploy calibrate` again.", file=sys.stderr)
    t = cfg.text_config
    any_spec = next(iter(specs.values()))
    man.format, man.precision, man.opset = FORMAT, PRECISION, opset
    man.config = cfg.to_dict()
    man.checkpoint = {"path": str(ckpt), "hash": ckpt_hash}
    man.exporter = dict(library_versions(), exporter="torch.onnx TorchScript (dynamo=False)")
    man.special_tokens = {k: int(v) for k, v in vars(proc.special).items()}
    man.image = ImageInfo(proc.resolution, proc.patch_size, any_spec.grid, cfg.latent_channels,
                          any_spec.tokens_per_image)
    man.max_context, man.batch_max = int(max_context), int(batch_max)
    man.cache = CacheLayout(
        CACHE_LAYOUT, t.num_hidden_layers, t.num_key_value_heads, t.head_dim,
        past_key=past_name("{i}", "key"), past_value=past_name("{i}", "value"),
        present_key=present_name("{i}", "key"), present_value=present_name("{i}", "value"), dtype="float32",
        max_context=int(max_context),
        note="feed the whole (B,Hkv,max_context,Dh) buffer as past; attention_mask (B,1,S,P+S) bool hides slots >= "
             "start; present holds only the S new entries, to be written at start..start+S-1")
    man.generation = GenerationDefaults.from_generation_config(ckpt / "generation_config.json")
    model = None
    bar = tqdm(total=len(specs) + 1, disable=not progress, desc="export", unit="graph")
    try:
        for name, spec in specs.items():
            bar.set_description(f"export {name}")
            entry = man.graphs.get(name)
            spec_hash = spec.spec_hash(opset, PRECISION)
            up_to_date = (entry is not None and entry.spec_hash == spec_hash and entry.source_hash == source_hash
                          and entry.checkpoint_hash in (None, ckpt_hash)
                          and (out_dir / entry.file).is_file()
                          and (not entry.external_data or (out_dir / entry.external_data).is_file()))
            if up_to_date and not force:
                entry.profiles = spec.to_manifest()["profiles"]  # may change (max_context) without a re-export
                entry.checkpoint_hash = ckpt_hash                # (the source hash already proves it)
                bar.set_postfix_str(f"{name}: up to date, skipped")
                bar.update(1)
                continue
            if model is None:
                model = meta_model(cfg)
            load_submodules(model, ckpt, spec.modules)
            try:
                info = export_graph(spec, model, out_dir, opset=opset, simplify=simplify, verify=verify,
                                    release=lambda: release_submodules(model, spec.modules))
            finally:
                release_submodules(model, spec.modules)
            man.graphs[name] = GraphEntry.from_dict(name, dict(spec.to_manifest(), spec_hash=spec_hash,
                                                               source_hash=source_hash, checkpoint_hash=ckpt_hash,
                                                               **info), str(out_dir))
            man.save(out_dir)                           # persist progress graph by graph
            bar.set_postfix_str(f"{name}: {info['export_s']:.1f}s")
            bar.update(1)
        bar.set_description("export embed/tokenizer")
        if force or man.embed_tokens.get("source_hash") != source_hash or not (out_dir / EMBED_FILE).is_file():
            man.embed_tokens = dict(write_embed_table(ckpt, out_dir), source_hash=source_hash)
        man.embed_tokens["checkpoint_hash"] = ckpt_hash          # written from it, or its source hash proves it
        write_processor_files(ckpt, out_dir, proc)
        bar.update(1)
    finally:
        bar.close()
    man.save(out_dir)
    return man
