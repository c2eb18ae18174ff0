"""`cheers-deploy eval`: held-out understanding and generation scores of a checkpoint or workdir."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data import shapes as W
from ..eval.evaluate import DEFAULTS, MAX_ITEMS, evaluate, format_table, save_grid
from ..fileio import write_json
from .common import (add_seed_arg, add_threads_arg, check_out_file, int_arg, open_pipeline, setting_arg)


def add_eval_args(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="evaluate understanding and generation on the held-out shapes world",
                              description="Understanding exact match per question type and GenEval-style "
                                          "generation scores (OpenCV detector) on held-out scenes.")
    g = p.add_argument_group("model and backend")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", default=None, metavar="PATH_OR_ID",
                     help="checkpoint folder or Hugging Face Hub id (default: the bundled tiny-shapes)")
    src.add_argument("--workdir", default=None, metavar="DIR", help="exported workdir (cheers-deploy export)")
    g.add_argument("--revision", default=None, metavar="REV",
                   help="with a Hub id in --checkpoint: the branch, tag or commit (default: main)")
    g.add_argument("--backend", default=None, choices=["torch", "ort", "trt"],
                   help="torch for --checkpoint (default), ort for --workdir (default), trt for TensorRT engines")
    g.add_argument("--device", default="cpu", metavar="DEV", help="torch device for --checkpoint (cpu, cuda)")
    g.add_argument("--precision", default=None, metavar="P",
                   help="with --workdir: fp32 (default), fp16, bf16, int8 or mixed graphs/engines")
    add_threads_arg(g)
    p.add_argument("--n", type=int_arg(0, MAX_ITEMS), default=DEFAULTS["n"], help="held-out scenes for understanding")
    p.add_argument("--n-gen", type=int_arg(0, MAX_ITEMS), default=None, metavar="N",
                   help="single-object generation prompts (default --n)")
    p.add_argument("--n-two", type=int_arg(0, MAX_ITEMS), default=None, metavar="N",
                   help="two-object prompts (default n-gen/2)")
    add_seed_arg(p, help="seed of the scene draw and of the generations")
    p.add_argument("--steps", type=setting_arg("steps"), default=DEFAULTS["steps"], metavar="N",
                   help="Euler steps per image")
    p.add_argument("--cfg-scale", type=setting_arg("cfg_scale"), default=DEFAULTS["cfg_scale"], metavar="X",
                   help="guidance scale, 1 = off")
    p.add_argument("--alpha", type=setting_arg("alpha"), default=DEFAULTS["alpha"], metavar="X", help="time shift")
    p.add_argument("--split", default="heldout", choices=list(W.SPLITS), help="which split of the shapes world")
    p.add_argument("--skip-understanding", action="store_true", help="only the generation scores")
    p.add_argument("--skip-generation", action="store_true", help="only the understanding scores")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    p.add_argument("--samples", default=None, metavar="PNG",
                   help="write a grid of the first generated images (and their prompts beside it, .txt)")
    p.add_argument("--overwrite", action="store_true", help="replace --json / --samples if they exist")
    p.add_argument("--quiet", action="store_true", help="no progress bars (stderr)")
    p.set_defaults(func=run_eval)
    return p


def load_pipeline(checkpoint=None, workdir=None, backend=None, device: str = "cpu", precision=None, threads=None,
                  revision=None):
    return open_pipeline(checkpoint, workdir, backend, device, precision=precision, threads=threads,
                         revision=revision)


def check_outputs(args) -> None:
    """--json and --samples (+ its .txt) may be written: checked before anything is loaded or evaluated."""
    if args.json:
        check_out_file(args.json, args.overwrite, "--json")
    if args.samples:
        check_out_file(args.samples, args.overwrite, "--samples", suffixes=(".png",))
        check_out_file(Path(args.samples).with_suffix(".txt"), args.overwrite, "--samples")


def run_eval(args) -> int:
    check_outputs(args)
    pipe = load_pipeline(args.checkpoint, args.workdir, args.backend, args.device, args.precision,
                         getattr(args, "threads", None), getattr(args, "revision", None))
    keep = 32 if args.samples else 0
    res = evaluate(pipe, n=args.n, seed=args.seed, steps=args.steps, cfg_scale=args.cfg_scale, alpha=args.alpha,
                   n_gen=args.n_gen, n_two=args.n_two, split=args.split,
                   understanding=not args.skip_understanding, generation=not args.skip_generation, keep_images=keep,
                   progress=not getattr(args, "quiet", False))
    images = res.get("generation", {}).pop("_images", None)
    if args.samples and images:
        save_grid(images, args.samples)
    print(format_table(res))
    if args.json:
        write_json(args.json, res)
    return 0
