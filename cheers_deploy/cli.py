"""`cheers-deploy` command line. Library errors become one line on stderr and exit code 2
(a traceback only with --debug)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from .errors import CheersError, InputError

EXIT_BAD_INPUT = 2


# ----------------------------------------------------------------------------------------- helpers
def _add_model_args(p: argparse.ArgumentParser):
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="DIR",
                     help="checkpoint in the official layout (default: the bundled tiny-shapes model)")
    src.add_argument("--workdir", metavar="DIR", help="exported graphs (cheers-deploy export) instead of a checkpoint")
    p.add_argument("--backend", choices=["torch", "ort", "trt"], default=None,
                   help="torch for --checkpoint (default), ort for --workdir (default), trt for TensorRT engines")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="torch backend precision (float32 is the parity reference)")
    p.add_argument("--providers", default=None,
                   help="comma-separated onnxruntime providers, e.g. CUDAExecutionProvider,CPUExecutionProvider")
    p.add_argument("--precision", default=None, metavar="P",
                   help="with --workdir: which graphs/engines to run, fp32 (default), fp16, bf16, int8 or mixed "
                        "(made by cheers-deploy calibrate / build)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise, the dummy image and sampling")


def _load_pipeline(args):
    from .runtime.pipeline import Pipeline

    if args.workdir:
        kw = {}
        if args.providers:
            kw["providers"] = args.providers.split(",")
        if args.precision and args.precision != "fp32":
            kw["precision"] = args.precision
        return Pipeline.from_workdir(args.workdir, backend=args.backend or "ort", **kw)
    if args.precision:
        raise InputError("--precision selects exported graphs: use it with --workdir (for torch use --dtype)")
    if args.backend not in (None, "torch"):
        raise InputError(f"--backend {args.backend} needs --workdir (export the checkpoint first)")
    return Pipeline.from_pretrained(args.checkpoint, backend="torch", device=args.device, dtype=args.dtype)


def _check_out(path: str, overwrite: bool) -> Path:
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise InputError(f"--out must be a .png file, got {out}")
    if out.exists() and not overwrite:
        raise InputError(f"{out} exists; pass --overwrite to replace it")
    if out.parent and not out.parent.exists():
        raise InputError(f"output folder does not exist: {out.parent}")
    return out


def write_png(image, out: Path):
    """Write atomically: a failed run leaves no partial file behind."""
    from PIL import Image

    fd, tmp = tempfile.mkstemp(suffix=".png", dir=str(out.parent or "."))
    os.close(fd)
    try:
        Image.fromarray(image).save(tmp, format="PNG")
        os.chmod(tmp, 0o644)      # mkstemp makes 0600 files; an output image is meant to be shared
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _progress(desc: str):
    from tqdm import tqdm

    bar = {"b": None}

    def cb(i, n):
        if bar["b"] is None:
            bar["b"] = tqdm(total=n, desc=desc, unit="step", file=sys.stderr, leave=False)
        bar["b"].update(1)
        if i == n:
            bar["b"].close()
            bar["b"] = None
    return cb


def _print_timings(timings):
    if not timings:
        return
    print("stage timings:", file=sys.stderr)
    for k, v in timings.items():
        print(f"  {k:18s} {v['calls']:5d} calls  {v['mean_ms']:9.2f} ms/call  {v['total_s']:8.3f} s", file=sys.stderr)


# ----------------------------------------------------------------------------------------- commands
def cmd_generate(args):
    out = _check_out(args.out, args.overwrite)
    if args.steps < 1:
        raise InputError("--steps must be >= 1")
    pipe = _load_pipeline(args)
    res = pipe.generate(args.prompt, steps=args.steps, cfg_scale=None if args.cfg_scale == 1.0 else args.cfg_scale,
                        alpha=args.alpha, seed=args.seed, progress=_progress("euler"))
    if res.image is None:
        raise CheersError("the model produced no image")
    write_png(res.image, out)
    print(f"wrote {out} ({res.image.shape[1]}x{res.image.shape[0]})")
    if args.timings:
        _print_timings(res.timings)


def cmd_edit(args):
    out = _check_out(args.out, args.overwrite)
    pipe = _load_pipeline(args)
    res = pipe.edit(args.image, args.instruction, steps=args.steps,
                    cfg_scale=None if args.cfg_scale == 1.0 else args.cfg_scale, alpha=args.alpha, seed=args.seed,
                    progress=_progress("euler"))
    if res.image is None:
        raise CheersError("the model produced no image")
    write_png(res.image, out)
    print(f"wrote {out}")


def cmd_ask(args):
    pipe = _load_pipeline(args)
    res = pipe.answer(args.image, args.question, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    print(res.text)
    if args.timings:
        _print_timings(res.timings)


def cmd_chat(args):
    pipe = _load_pipeline(args)
    res = pipe.chat(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, seed=args.seed)
    print(res.text)


def cmd_doctor(args):
    from .doctor import report

    print(report())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cheers-deploy",
        description="Run, export, quantize, build and benchmark the Cheers unified multimodal model. "
                    "Without --checkpoint/--workdir the bundled tiny-shapes model is used.")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="text to image (PNG)", description="Generate an image from a prompt.")
    _add_model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--out", required=True, help="output .png path")
    g.add_argument("--steps", type=int, default=80, help="Euler steps (default 80)")
    g.add_argument("--cfg-scale", type=float, default=9.5, help="classifier-free guidance scale (1 = off)")
    g.add_argument("--alpha", type=float, default=0.5, help="time shift alpha (<1: more steps near noise)")
    g.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    g.add_argument("--timings", action="store_true", help="print per-stage timings")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("edit", help="edit an image with an instruction (PNG)")
    _add_model_args(e)
    e.add_argument("--image", required=True)
    e.add_argument("--instruction", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--steps", type=int, default=80)
    e.add_argument("--cfg-scale", type=float, default=9.5)
    e.add_argument("--alpha", type=float, default=0.5)
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=cmd_edit)

    for name, helptext in (("ask", "answer a question about an image"), ("chat", "text-only chat")):
        a = sub.add_parser(name, help=helptext)
        _add_model_args(a)
        if name == "ask":
            a.add_argument("--image", required=True, help="image path (PNG, JPEG, ...)")
            a.add_argument("--question", required=True)
        else:
            a.add_argument("--prompt", required=True)
        a.add_argument("--max-new-tokens", type=int, default=64)
        a.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        a.add_argument("--top-p", type=float, default=1.0)
        a.add_argument("--timings", action="store_true")
        a.set_defaults(func=cmd_ask if name == "ask" else cmd_chat)

    d = sub.add_parser("doctor", help="report Python, torch, onnxruntime providers, CUDA, TensorRT, cuda-python")
    d.set_defaults(func=cmd_doctor)

    _add_optional_commands(sub)
    return p


def _add_optional_commands(sub):
    """Commands living in their own modules; each registers itself if its module is present."""
    import importlib

    for mod, fn in (("cheers_deploy.export.cli", "add_export_args"), ("cheers_deploy.train.cli", "add_train_args"),
                    ("cheers_deploy.eval.evaluate", "add_eval_args"), ("cheers_deploy.calibration.cli", "add_calibrate_args"),
                    ("cheers_deploy.engines.cli", "add_build_args"), ("cheers_deploy.bench.cli", "add_bench_args")):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        if hasattr(m, fn):
            getattr(m, fn)(sub)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        args.func(args)
        return 0
    except CheersError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
