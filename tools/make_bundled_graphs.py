#!/usr/bin/env python3
"""Export the bundled tiny-shapes model's fp32 ONNX graphs into the package, so that a torch-free install
(`pip install cheers-deploy`, e.g. on a Jetson) runs the bundled model with no export step:

    .venv/bin/python tools/make_bundled_graphs.py        # needs torch (the [torch] extra); ~20 s on 2 CPU cores

It writes `cheers_deploy/assets/tiny-shapes/graphs/` (what `cheers_deploy.hub.bundled_workdir()` returns): the
five graphs, manifest.json, embed_tokens.npy, the tokenizer files, preprocessor_config.json and vocabulary.json.
Run it again after retraining the bundled model or after a model/export code change that changes the graphs:
tests/test_bundled_graphs.py fails until the shipped graphs match the shipped weights and code again.

How: a fresh `export_all(None, ...)` of the bundled checkpoint (every graph, verified against torch by the
exporter) into a temporary folder next to the target; the manifest's `checkpoint.path` (the absolute path of the
machine that exported) is replaced by "bundled:tiny-shapes" (the hash is kept: it is what identifies the weights);
the folder is checked (manifest loads, every file present, no absolute path of this machine left in it) and then
swapped in place of the old one, which is deleted. An interrupted run leaves the old graphs in place.

Not shipped: INT8 / FP16 graphs and calibration data. Calibration is a per-deployment step (it captures
activations of the prompts/images the deployment cares about and must never write into the installed package):
copy the workdir first and calibrate the copy, e.g.

    cp -r "$(python -c 'from cheers_deploy.hub import bundled_workdir; print(bundled_workdir())')" work/tiny
    cheers-deploy calibrate capture --workdir work/tiny && cheers-deploy calibrate quantize --workdir work/tiny
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:                       # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

BUNDLED_CHECKPOINT_REF = "bundled:tiny-shapes"      # manifest checkpoint.path of the shipped graphs
COMMAND = "python tools/make_bundled_graphs.py"     # what regenerates them (quoted in test failures)


def _machine_paths(text: str, *dirs: Path) -> list:
    """The given folders (and this machine's home) as they would appear inside the manifest's JSON."""
    cands = {str(Path(d).resolve()) for d in dirs} | {str(Path(d)) for d in dirs} | {str(Path.home())}
    return sorted(c for c in cands if c not in ("/", "") and json.dumps(c)[1:-1] in text)


def export_bundled(out_dir: Path, progress: bool = True):
    """Export the bundled checkpoint into `out_dir` (a fresh folder) as it is shipped: fp32 graphs, manifest
    without machine-specific paths. Returns the manifest."""
    from cheers_deploy.export.exporter import export_all
    from cheers_deploy.hub import bundled_checkpoint
    from cheers_deploy.manifest import Manifest

    out_dir = Path(out_dir)
    man = export_all(None, out_dir, force=True, progress=progress)
    man.checkpoint = dict(man.checkpoint, path=BUNDLED_CHECKPOINT_REF)
    man.save(out_dir)
    man = Manifest.load(out_dir)
    man.check_files(man.graphs)
    if man.precision != "fp32" or man.calibration or any(g.precisions for g in man.graphs.values()):
        raise RuntimeError("the bundled workdir must hold fp32 graphs only (no precision variants, no calibration)")
    left = _machine_paths((out_dir / "manifest.json").read_text(), bundled_checkpoint(), out_dir, ROOT)
    if left:
        raise RuntimeError(f"{out_dir / 'manifest.json'} still names machine-specific paths: {left}")
    return man


def swap_in(tmp: Path, target: Path) -> None:
    """Replace `target` by `tmp` (same parent folder): rename the old one aside, rename the new one in, delete
    the old one; the old one is put back if the second rename fails."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    had_old = target.exists()
    if had_old:
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if had_old:
            os.replace(old, target)
        raise
    if had_old:
        shutil.rmtree(old, ignore_errors=True)


def make_bundled_graphs(target: Optional[Path] = None, progress: bool = True):
    """Export into a temporary folder next to `target` (default: the package's graphs folder) and swap it in."""
    from cheers_deploy.hub import BUNDLED_GRAPHS

    target = Path(target or BUNDLED_GRAPHS)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    from cheers_deploy.manifest import Manifest

    try:
        export_bundled(tmp, progress=progress)
        swap_in(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Manifest.load(target)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None,
                    help="where to write (default: cheers_deploy/assets/tiny-shapes/graphs in this checkout)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    man = make_bundled_graphs(args.out, progress=not args.quiet)
    out = Path(man.workdir)
    print(f"bundled graphs written to {out} in {time.perf_counter() - t0:.1f} s "
          f"(checkpoint hash {man.checkpoint['hash'][:12]}, fp32, opset {man.opset}):")
    total = 0
    for p in sorted(out.iterdir()):
        size = p.stat().st_size
        total += size
        print(f"  {p.name:28s} {size / 1e6:9.3f} MB")
    print(f"  {'total':28s} {total / 1e6:9.3f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
