"""`make demo`: run the bundled tiny model from the ONNX graphs the package ships (no export step, no torch needed),
generate an image, answer a question about an image, and print per-stage timings of the onnxruntime backend.
Images go to work/demo.

--workdir DIR: export the model into DIR/graphs first (needs torch) and write the images to DIR."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from .cli.common import check_out_dir, setting_arg
from .hub import bundled_checkpoint, bundled_workdir

DEFAULT_OUT = Path("work/demo")
REGENERATE = "python tools/make_bundled_graphs.py"


def _checkpoint(workdir: Path) -> tuple[Path, bool]:
    """The bundled trained model, or (until it is installed) a tiny random checkpoint written on the fly."""
    ckpt = bundled_checkpoint()
    if (ckpt / "config.json").is_file():
        return ckpt, True
    rnd = workdir / "random-checkpoint"
    if not (rnd / "config.json").is_file():
        from .config import CheersConfig
        from .testing import write_random_checkpoint

        cfg = CheersConfig.from_name("tiny")
        cfg.text_config.vocab_size = 151936
        write_random_checkpoint(rnd, cfg, seed=0)
    return rnd, False


def _shipped_graphs(ckpt: Path) -> Optional[Path]:
    """The package's exported graphs of the bundled model, when it ships them and they were exported from the bundled
    weights (else None: the demo exports them itself)."""
    shipped = bundled_workdir()
    if shipped is None:
        return None
    from .checkpoint import checkpoint_hash
    from .errors import CheckpointError
    from .manifest import Manifest

    try:
        recorded = Manifest.load(shipped).checkpoint.get("hash")
        if recorded == checkpoint_hash(ckpt):
            return shipped
    except CheckpointError as exc:
        print(f"NOTE: the shipped graphs in {shipped} are unusable ({exc}); exporting instead.")
        return None
    print(f"NOTE: the shipped graphs in {shipped} were not exported from the bundled weights (regenerate them with "
          f"`{REGENERATE}`); exporting instead.")
    return None


def main(argv=None) -> int:
    """The demo; a failure is one line on stderr (exit 2, 1 for an unexpected error), as in cheers-deploy."""
    from .cli.main import describe_failure

    try:
        return _demo(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, like the CLI
        line, rc = describe_failure(exc)
        print(f"error: {line}", file=sys.stderr)
        return rc


def _demo(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default=None,
                    help=f"export the model into WORKDIR/graphs (needs torch) and write the images there (default: "
                         f"run the graphs the package ships, images to {DEFAULT_OUT})")
    ap.add_argument("--prompt", default="a red circle on the left")
    ap.add_argument("--steps", type=setting_arg("steps"), default=None, help="Euler steps (default: the model's own)")
    args = ap.parse_args(argv)
    workdir = Path(args.workdir) if args.workdir is not None else DEFAULT_OUT
    check_out_dir(workdir, "--workdir")            # a folder that can be written, before any export or run
    workdir.mkdir(parents=True, exist_ok=True)

    ckpt, trained = _checkpoint(workdir)
    if not trained:
        print("NOTE: the bundled trained model is not installed; running on a tiny RANDOM checkpoint "
              f"written at {ckpt} (outputs are meaningless noise, the plumbing is real).")
    else:
        print(f"model: bundled tiny-shapes checkpoint ({ckpt})")

    from .runtime.pipeline import Pipeline

    graphs = _shipped_graphs(ckpt) if trained and args.workdir is None else None
    if graphs is not None:
        print(f"graphs: shipped with the package ({graphs}), no export step")
    else:
        from .export.exporter import export_all

        graphs = workdir / "graphs"
        print(f"graphs: exporting {ckpt} into {graphs}")
        export_all(ckpt, graphs)
    pipe = Pipeline.from_workdir(graphs, backend="ort")

    from .cli.common import write_png

    g = pipe.generation
    steps = args.steps if args.steps is not None else g.steps
    res = pipe.generate(args.prompt, steps=steps, seed=0)
    out = workdir / "demo_generate.png"
    write_png(res.image, out)
    print(f"[generate] prompt={args.prompt!r} ({steps} steps, cfg {g.cfg_scale:g}, time shift {g.alpha:g}: the "
          f"model's defaults) -> {out} ({res.image.shape[1]}x{res.image.shape[0]} PNG)")
    if trained:
        from .eval.detector import score_generation

        try:
            score = score_generation(res.image, args.prompt)
        except ValueError:                     # a prompt outside the shapes world: nothing to score
            score = None
        if score is not None:
            found = ", ".join(f"{d.color} {d.shape} {d.position}" for d in score["matched"] if d is not None)
            print(f"[generate] detector: {'correct' if score['overall'] else 'WRONG'} (found: {found or 'nothing'})")
    gen_t = res.timings

    if trained:
        from .data.shapes import make_split

        sample = make_split("heldout", 1, seed=123)[0]
        image = sample.image
        qtype, question, truth = sample.qa[0]
        ask_path = workdir / "demo_ask_input.png"
        write_png(image, ask_path)
    else:
        image, question, truth, ask_path = res.image, "what is this?", None, out
    ans = pipe.answer(image, question, max_new_tokens=8)
    print(f"[ask] image={ask_path} question={question!r} -> answer={ans.text.strip()!r}"
          + (f" (truth: {truth!r})" if truth is not None else ""))

    print("\nper-stage timings, ort backend (CPU):")
    print(f"  {'stage':18s} {'calls':>6s} {'ms/call':>10s}")
    merged = dict(gen_t)
    for k, v in ans.timings.items():
        if k in ("prefill", "decode"):
            merged[f"{k} (ask)"] = v
    for k, v in merged.items():
        print(f"  {k:18s} {v['calls']:6d} {v['mean_ms']:10.2f}")
    if trained:
        ev = ckpt / "eval.json"
        if ev.is_file():
            e = json.loads(ev.read_text())
            g = e.get("generation", {})
            print(f"\neval (documented, held-out, torch fp32): understanding {e['understanding']['exact_match']:.1%}, "
                  f"generation color {g.get('color', float('nan')):.1%} shape {g.get('shape', float('nan')):.1%} "
                  f"position {g.get('position', float('nan')):.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
