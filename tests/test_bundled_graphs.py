"""The bundled model's shipped fp32 graphs (cheers_deploy/assets/tiny-shapes/graphs, `hub.bundled_workdir()`): they
are what a torch-free install runs by default, so they must be the shipped weights exported by the shipped code.

- portable: the manifest loads, every file is there, fp32 only (no INT8: calibration is per deployment), no
  machine-specific absolute path;
- cheap identity checks (no torch): checkpoint hash, config, generation defaults, special tokens and every graph's
  spec hash / I/O equal what the bundled checkpoint and this code give; the side files equal what export writes;
- the graphs' outputs equal the torch model's on fixed random inputs within the exporter's tolerance (VERIFY_RTOL):
  catches a retrained model or a model-code change that was not re-exported;
- a fresh export of the bundled checkpoint (about 20 s on 2 cores) gives the same manifest, side files and outputs;
- they generate "a red circle on the left" (the detector scores it correct) and answer a colour question.

Every failure names the command that regenerates the graphs.
"""
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

from cheers_deploy.constants import GRAPH_NAMES
from cheers_deploy.hub import BUNDLED_GRAPHS, bundled_checkpoint, bundled_workdir

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "make_bundled_graphs.py"
REGEN = f"regenerate them with `.venv/bin/python tools/make_bundled_graphs.py` (graphs: {BUNDLED_GRAPHS})"
PROMPT = "a red circle on the left"


def _tool():
    spec = importlib.util.spec_from_file_location("make_bundled_graphs", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def workdir() -> Path:
    wd = bundled_workdir()
    assert wd is not None, f"the package ships no bundled graphs ({BUNDLED_GRAPHS / 'manifest.json'} missing): {REGEN}"
    return wd


@pytest.fixture(scope="module")
def manifest(workdir):
    from cheers_deploy.manifest import Manifest

    return Manifest.load(workdir)


def _specs(man):
    from cheers_deploy.checkpoint import load_config
    from cheers_deploy.export.specs import graph_specs
    from cheers_deploy.processor import Processor

    ckpt = bundled_checkpoint()
    cfg = load_config(ckpt)
    proc = Processor.from_dir(ckpt, default_resolution=cfg.vision_representation_config.image_size)
    return graph_specs(cfg, proc.resolution, man.batch_max, man.max_context, GRAPH_NAMES)


def _strings(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


# ------------------------------------------------------------------------------------------------ portable, fp32

def test_shipped_graphs_are_complete_fp32_and_portable(workdir, manifest):
    manifest.check_files(GRAPH_NAMES)
    assert sorted(manifest.graphs) == sorted(GRAPH_NAMES), REGEN
    assert manifest.precision == "fp32" and not manifest.calibration, "ship fp32 graphs only (no calibration data)"
    for name, g in manifest.graphs.items():
        assert not g.precisions, f"graph {name} ships precision variants {sorted(g.precisions)}: fp32 only"
        assert g.external_data is None, f"graph {name} uses external data"
    expected = {f"{n}.onnx" for n in GRAPH_NAMES} | {"manifest.json", manifest.embed_file, "tokenizer.json",
                                                    "tokenizer_config.json", "preprocessor_config.json",
                                                    "vocabulary.json"}
    present = {p.name for p in workdir.iterdir()}
    assert present == expected, f"unexpected files {sorted(present - expected)}, missing {sorted(expected - present)}"
    assert manifest.checkpoint.get("path") == _tool().BUNDLED_CHECKPOINT_REF, REGEN
    data = json.loads((workdir / "manifest.json").read_text())
    absolute = [s for s in _strings(data) if s.startswith(("/", "~")) or re.match(r"^[A-Za-z]:[\\/]", s)]
    assert not absolute, f"the shipped manifest names machine-specific paths {absolute[:3]}: {REGEN}"
    total = sum(p.stat().st_size for p in workdir.iterdir())
    assert total <= 25 * 2 ** 20, f"shipped graphs take {total / 2 ** 20:.1f} MiB"


# ------------------------------------------------------------------------------------------------ cheap identity (no torch)

def test_manifest_matches_bundled_checkpoint_and_code(manifest):
    """The recorded checkpoint hash, config, defaults and every graph's spec hash equal what the bundled checkpoint
    and this code give now (a retrained model, a config or I/O change that was not re-exported fails here)."""
    from cheers_deploy.checkpoint import checkpoint_hash, load_config
    from cheers_deploy.constants import EXPORT_PRECISION
    from cheers_deploy.manifest import GenerationDefaults
    from cheers_deploy.processor import Processor

    ckpt = bundled_checkpoint()
    assert manifest.checkpoint["hash"] == checkpoint_hash(ckpt), \
        f"the shipped graphs were exported from other weights than {ckpt}: {REGEN}"
    cfg = load_config(ckpt)
    assert manifest.config == cfg.to_dict(), f"config.json changed since the graphs were exported: {REGEN}"
    gen = GenerationDefaults.from_generation_config(ckpt / "generation_config.json")
    assert manifest.generation.to_dict() == gen.to_dict(), f"generation_config.json changed: {REGEN}"
    proc = Processor.from_dir(ckpt, default_resolution=cfg.vision_representation_config.image_size)
    assert manifest.special_tokens == {k: int(v) for k, v in vars(proc.special).items()}, REGEN
    assert manifest.image.resolution == proc.resolution, REGEN
    for name, spec in _specs(manifest).items():
        entry = manifest.graph(name)
        assert entry.spec_hash == spec.spec_hash(manifest.opset, EXPORT_PRECISION), \
            f"graph {name}: its spec (I/O, config, resolution, opset) changed since it was exported: {REGEN}"
        assert [t.to_dict() for t in entry.inputs] == [t.to_dict() for t in spec.inputs], (name, REGEN)
        assert [t.to_dict() for t in entry.outputs] == [t.to_dict() for t in spec.outputs], (name, REGEN)


def test_side_files_match_bundled_checkpoint(workdir, manifest, tmp_path):
    """embed_tokens.npy is the checkpoint's embedding table; tokenizer, preprocessor and vocabulary files are what
    the exporter writes from the bundled checkpoint."""
    from safetensors import safe_open

    from cheers_deploy.checkpoint import load_config, weight_files
    from cheers_deploy.export.exporter import EMBED_KEY, write_processor_files
    from cheers_deploy.processor import Processor

    ckpt = bundled_checkpoint()
    with safe_open(str(weight_files(ckpt)[EMBED_KEY]), framework="numpy") as sf:
        table = sf.get_tensor(EMBED_KEY).astype(np.float32)
    shipped = np.load(workdir / manifest.embed_file)
    assert shipped.dtype == np.float32 and np.array_equal(shipped, table), f"embed_tokens.npy is stale: {REGEN}"
    cfg = load_config(ckpt)
    proc = Processor.from_dir(ckpt, default_resolution=cfg.vision_representation_config.image_size)
    write_processor_files(ckpt, tmp_path, proc)
    for f in sorted(p.name for p in tmp_path.iterdir()):
        assert (workdir / f).read_bytes() == (tmp_path / f).read_bytes(), f"{f} is stale: {REGEN}"


# ------------------------------------------------------------------------------------------------ outputs vs torch

def _numpy_feed(spec, args) -> dict:
    return {n: a.numpy() for n, a in zip(spec.input_names, args)}


def _samples(spec):
    from cheers_deploy.export.exporter import _verify_samples

    return [spec.sample_inputs(batch=2)] + _verify_samples(spec)      # the tracing sample and the exporter's


def test_graph_outputs_match_torch_model(workdir, manifest):
    """Each shipped graph on fixed random inputs (the exporter's tracing and verification samples) against the
    torch model built from the bundled weights and this code, within the exporter's tolerance."""
    torch = pytest.importorskip("torch")
    from cheers_deploy.checkpoint import load_config
    from cheers_deploy.export.exporter import (VERIFY_RTOL, _max_rel_err, _ort_session, _torch_reference,
                                               load_submodules, meta_model, release_submodules)

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    ckpt = bundled_checkpoint()
    model = meta_model(load_config(ckpt))
    for name, spec in _specs(manifest).items():
        samples = _samples(spec)
        load_submodules(model, ckpt, spec.modules)
        try:
            refs = _torch_reference(spec, model, samples)
        finally:
            release_submodules(model, spec.modules)
        sess = _ort_session(manifest.graph_path(name))
        err = max(_max_rel_err(sess.run(None, _numpy_feed(spec, x)), ref) for x, ref in zip(samples, refs))
        del sess
        assert err <= VERIFY_RTOL, (f"shipped graph {name} disagrees with the torch model of the bundled weights: "
                                    f"max error {err:.2e} of the output scale (> {VERIFY_RTOL:g}): {REGEN}")


def test_fresh_export_matches_shipped(workdir, manifest, tmp_path):
    """Export the bundled checkpoint as the tool does (into tmp): same manifest (less timings/versions), same side
    files, same graph outputs within VERIFY_RTOL (bytes may differ across torch/onnx versions)."""
    pytest.importorskip("torch")
    from cheers_deploy.export.exporter import VERIFY_RTOL, _max_rel_err, _ort_session

    fresh = _tool().export_bundled(tmp_path / "graphs", progress=False)
    keep = ("format", "precision", "opset", "config", "checkpoint", "special_tokens", "image", "max_context",
            "batch_max", "cache", "generation")
    a, b = fresh.to_dict(), manifest.to_dict()
    for k in keep:
        assert a.get(k) == b.get(k), f"manifest field '{k}' differs from a fresh export: {REGEN}"
    for name in GRAPH_NAMES:
        ga, gb = a["graphs"][name], b["graphs"][name]
        for k in ("file", "external_data", "inputs", "outputs", "profiles", "spec_hash"):
            assert ga.get(k) == gb.get(k), f"graph {name}: '{k}' differs from a fresh export: {REGEN}"
    assert sorted(p.name for p in fresh.workdir.iterdir()) == sorted(p.name for p in workdir.iterdir()), REGEN
    for p in sorted(fresh.workdir.iterdir()):
        if p.suffix != ".onnx" and p.name != "manifest.json":
            assert p.read_bytes() == (workdir / p.name).read_bytes(), f"{p.name} differs from a fresh export: {REGEN}"
    for name, spec in _specs(manifest).items():
        new, old = _ort_session(fresh.graph_path(name)), _ort_session(manifest.graph_path(name))
        for x in _samples(spec):
            feed = _numpy_feed(spec, x)
            err = _max_rel_err(old.run(None, feed), new.run(None, feed))
            assert err <= VERIFY_RTOL, f"graph {name}: shipped and fresh export differ by {err:.2e}: {REGEN}"


# ------------------------------------------------------------------------------------------------ it works

def test_shipped_graphs_generate_and_answer(workdir):
    """The model's own defaults (generation_config.json via the manifest), onnxruntime, no torch needed."""
    from cheers_deploy.eval.detector import score_generation
    from cheers_deploy.runtime.pipeline import Pipeline

    pipe = Pipeline.from_workdir(workdir, backend="ort", threads=2)
    res = pipe.generate(PROMPT)
    assert res.image.shape == (64, 64, 3) and res.image.dtype == np.uint8
    score = score_generation(res.image, PROMPT)
    assert score["overall"], (f"{PROMPT!r} from the shipped graphs scored {score} "
                              f"(detections: {score['matched']}); if the model changed: {REGEN}")
    ans = pipe.answer(res.image, "what color is the circle?")
    assert ans.text.strip().lower() == "red", f"answer {ans.text!r}, expected 'red'"
