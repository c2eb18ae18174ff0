"""`make demo`: export the bundled tiny model once, generate an image, answer a question about an image,
and print per-stage timings of the onnxruntime backend."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .hub import bundled_checkpoint


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default="work/tiny", help="where graphs, images and reports go")
    ap.add_argument("--prompt", default="a red circle on the left")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    ckpt, trained = _checkpoint(workdir)
    if not trained:
        print("NOTE: the bundled trained model is not installed; running on a tiny RANDOM checkpoint "
              f"written at {ckpt} (outputs are meaningless noise, the plumbing is real).")
    else:
        print(f"model: bundled tiny-shapes checkpoint ({ckpt})")

    from .export.exporter import export_all
    from .runtime.pipeline import Pipeline

    graphs = workdir / "graphs"
    export_all(ckpt, graphs)
    pipe = Pipeline.from_workdir(graphs, backend="ort")

    from .cli.common import write_png

    res = pipe.generate(args.prompt, steps=args.steps, cfg_scale=3.0, alpha=1.0, seed=0)
    out = workdir / "demo_generate.png"
    write_png(res.image, out)
    print(f"[generate] prompt={args.prompt!r} -> {out} ({res.image.shape[1]}x{res.image.shape[0]} PNG)")
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
