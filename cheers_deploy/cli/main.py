"""`cheers-deploy` command line. Every failure is one line on stderr (a traceback only with --debug):

    a usage error, a bad argument, file, path or model (CheersError)    error: <message>               exit 2
    an OS error (permission, a directory where a file goes, no space)  error: <path>: <reason>         exit 2
    running out of memory                                              error: out of memory ...        exit 2
    anything else (a bug)       error: internal error: <Type>: <message> (rerun with --debug ...)     exit 1
    Ctrl-C                                                             interrupted                     exit 130
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from ..constants import VERSION
from ..errors import CheersError, MissingDependencyError
from .common import (CliParser, add_model_args, check_out, check_threads, explain_empty_answer, is_bundled,
                     load_pipeline, one_line, print_timings, print_warnings, progress_bar, setting_arg,
                     use_formatter, write_png)

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130


# ----------------------------------------------------------------------------------------- commands
def _image_result(args, pipe, res, out):
    print_warnings(res)
    if res.image is None:
        raise CheersError(f"the model produced no image ({pipe.describe_stop(res.stop_reason)})")
    write_png(res.image, out)
    print(f"wrote {out} ({res.image.shape[1]}x{res.image.shape[0]})")
    if args.timings:
        print_timings(res.timings)


def _text_result(args, pipe, res):
    print_warnings(res)
    print(res.text)
    explain_empty_answer(pipe, res, is_bundled(args))
    if args.timings:
        print_timings(res.timings)


def cmd_generate(args):
    out = check_out(args.out, args.overwrite)
    pipe = load_pipeline(args)
    res = pipe.generate(args.prompt, steps=args.steps, cfg_scale=args.cfg_scale, alpha=args.alpha, seed=args.seed,
                        progress=progress_bar("euler"))
    _image_result(args, pipe, res, out)


def cmd_edit(args):
    out = check_out(args.out, args.overwrite)
    pipe = load_pipeline(args)
    res = pipe.edit(args.image, args.instruction, steps=args.steps, cfg_scale=args.cfg_scale, alpha=args.alpha,
                    seed=args.seed, progress=progress_bar("euler"))
    _image_result(args, pipe, res, out)


def cmd_ask(args):
    pipe = load_pipeline(args)
    res = pipe.answer(args.image, args.question, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    _text_result(args, pipe, res)


def cmd_chat(args):
    pipe = load_pipeline(args)
    res = pipe.chat(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, seed=args.seed)
    _text_result(args, pipe, res)


def cmd_doctor(args):
    from ..doctor import report

    print(report())


def _add_image_settings(p, edit: bool = False):
    which = "" if edit else "; official 80, bundled tiny-shapes 25"
    p.add_argument("--steps", type=setting_arg("steps"), default=None, metavar="N",
                   help=f"Euler steps (default: the model's own{which})")
    p.add_argument("--cfg-scale", type=setting_arg("cfg_scale"), default=None, metavar="X",
                   help="classifier-free guidance scale, 1 = off (default: the model's"
                        + ("" if edit else "; official 9.5, bundled 3") + ")")
    p.add_argument("--alpha", type=setting_arg("alpha"), default=None, metavar="X",
                   help="time shift alpha, <1 spends more steps near noise (default: the model's"
                        + ("" if edit else "; official 0.5, bundled 1") + ")")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--timings", action="store_true", help="print per-stage timings (stderr)")


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(
        prog="cheers-deploy",
        description="Run, export, quantize, build and benchmark the Cheers unified multimodal model. "
                    "Without --checkpoint/--workdir the bundled tiny-shapes model is used.",
        epilog="`cheers-deploy COMMAND -h` shows the options of a command.")
    p.add_argument("--version", action="version", version=f"cheers-deploy {VERSION}")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="text to image (PNG)", description="Generate an image from a prompt.")
    g.add_argument("--prompt", required=True, metavar="TEXT", help="what to draw, e.g. \"a red circle on the left\"")
    g.add_argument("--out", required=True, metavar="PNG", help="output .png path")
    _add_image_settings(g)
    add_model_args(g)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("edit", help="edit an image with an instruction (PNG)",
                       description="Edit an image following an instruction.")
    e.add_argument("--image", required=True, metavar="PATH", help="source image (PNG, JPEG, ...)")
    e.add_argument("--instruction", required=True, metavar="TEXT", help="what to change, e.g. \"make the circle blue\"")
    e.add_argument("--out", required=True, metavar="PNG", help="output .png path")
    _add_image_settings(e, edit=True)
    add_model_args(e)
    e.set_defaults(func=cmd_edit)

    for name, helptext in (("ask", "answer a question about an image"), ("chat", "text-only chat")):
        a = sub.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:] + ".")
        if name == "ask":
            a.add_argument("--image", required=True, metavar="PATH", help="image (PNG, JPEG, ...)")
            a.add_argument("--question", required=True, metavar="TEXT",
                           help="e.g. \"what color is the shape?\"")
        else:
            a.add_argument("--prompt", required=True, metavar="TEXT", help="the message")
        a.add_argument("--max-new-tokens", type=setting_arg("max_new_tokens"), default=None, metavar="N",
                       help="most tokens to generate (default: the model's, 64)")
        a.add_argument("--temperature", type=setting_arg("temperature"), default=0.0, metavar="T",
                       help="sampling temperature, 0 = greedy")
        a.add_argument("--top-p", type=setting_arg("top_p"), default=1.0, metavar="P",
                       help="nucleus sampling threshold, in (0, 1]")
        a.add_argument("--timings", action="store_true", help="print per-stage timings (stderr)")
        add_model_args(a)
        a.set_defaults(func=cmd_ask if name == "ask" else cmd_chat)

    d = sub.add_parser("doctor", help="report Python, torch, onnxruntime providers, CUDA, TensorRT, cuda-python",
                       description="What this machine can run: library versions, providers, GPUs.")
    d.set_defaults(func=cmd_doctor)

    _add_optional_commands(sub)
    use_formatter(p)
    return p


# Commands living in their own modules: (name, module, register function, one-line help, install hint)
OPTIONAL_COMMANDS = (
    ("export", "cheers_deploy.cli.export", "add_export_args", "export a checkpoint to ONNX graphs + manifest"),
    ("train", "cheers_deploy.cli.train", "add_train_args", "train a tiny Cheers on the synthetic shapes world"),
    ("eval", "cheers_deploy.cli.eval", "add_eval_args", "evaluate understanding and generation"),
    ("calibrate", "cheers_deploy.cli.calibrate", "add_calibrate_args", "FP16/BF16 conversion and INT8 calibration"),
    ("build", "cheers_deploy.cli.build", "add_build_args", "build TensorRT engines from an exported workdir"),
    ("bench", "cheers_deploy.cli.bench", "add_bench_args", "benchmark stages, latency, memory and energy"),
    ("serve", "cheers_deploy.cli.serve", "add_serve_args",
     "OpenAI-compatible HTTP service: chat, images, streaming, metrics"),
    ("triton", "cheers_deploy.cli.triton", "add_triton_args",
     "write a Triton Inference Server model repository (scale-out)"),
)
INSTALL_HINTS = {"torch": "pip install cheers-deploy[torch]", "onnxslim": "pip install cheers-deploy[torch]",
                 "onnxscript": "pip install cheers-deploy[torch]", "matplotlib": "pip install matplotlib",
                 "tensorrt": "install TensorRT, see docs/tensorrt.md", "cuda": "pip install cheers-deploy[trt]",
                 "polygraphy": "pip install cheers-deploy[trt]", "cv2": "pip install opencv-python-headless",
                 "onnx": "pip install onnx", "onnxruntime": "pip install onnxruntime",
                 "starlette": "pip install cheers-deploy[serve]", "uvicorn": "pip install cheers-deploy[serve]",
                 "pydantic": "pip install cheers-deploy[serve]", "prometheus_client": "pip install cheers-deploy[serve]",
                 "multipart": "pip install cheers-deploy[serve]"}


def install_hint(exc: ImportError) -> str:
    top = (getattr(exc, "name", None) or "").split(".")[0]
    if not top or top == "cheers_deploy":
        return "reinstall cheers-deploy"
    return INSTALL_HINTS.get(top, f"pip install {top}")


def _add_unavailable(sub, name: str, helptext: str, exc: ImportError):
    """A command whose module does not import: still listed, and running it (even with -h) says why."""
    msg = f"`cheers-deploy {name}` is unavailable: {exc} ({install_hint(exc)})"
    p = sub.add_parser(name, help=f"{helptext} (unavailable here: {exc})", add_help=False, prefix_chars="\0",
                       description=msg)
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    def unavailable(args):
        raise MissingDependencyError(msg)

    p.set_defaults(func=unavailable)


def _add_optional_commands(sub):
    import importlib

    for name, mod, fn, helptext in OPTIONAL_COMMANDS:
        try:
            m = importlib.import_module(mod)
        except ImportError as exc:
            _add_unavailable(sub, name, helptext, exc)
            continue
        getattr(m, fn)(sub)


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:          # usage errors (one line, printed by CliParser.error); -h/--version exit 0
        if exc.code in (0, None):
            raise
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    debug = bool(getattr(args, "debug", False))
    try:
        check_threads(getattr(args, "threads", None))
        rc = args.func(args)
        return rc if isinstance(rc, int) and not isinstance(rc, bool) else 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the one place that turns every failure into one line
        if debug:
            raise
        line, rc = describe_failure(exc)
        print(f"error: {line}", file=sys.stderr)
        return rc


def describe_failure(exc: BaseException):
    """(one-line message, exit code) of an exception that ends a command."""
    if isinstance(exc, CheersError):
        return one_line(exc) or type(exc).__name__, EXIT_BAD_INPUT
    if is_out_of_memory(exc):
        return (f"out of memory ({one_line(exc) or type(exc).__name__}): use fewer steps, a smaller "
                f"--max-new-tokens or a smaller model"), EXIT_BAD_INPUT
    if isinstance(exc, OSError):
        return os_error_line(exc), EXIT_BAD_INPUT
    text = one_line(exc)
    return (f"internal error: {type(exc).__name__}{': ' + text if text else ''} "
            f"(rerun with --debug for the traceback)"), EXIT_INTERNAL


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "failed to allocate" in text)


# atomic_path's temporary names: .<name>.<random>.tmp<suffix> (cheers_deploy.fileio)
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{6,}\.tmp(\.[^.]*)?$")


def _shown_path(name) -> str:
    text = os.fsdecode(name) if isinstance(name, (bytes, os.PathLike)) else str(name)
    head, _, base = text.rpartition(os.sep)
    m = _TEMP_NAME.match(base)
    if m:                                          # the file being written, not its temporary twin
        text = (head + os.sep if head else "") + m.group("name")
    return text


def os_error_line(exc: OSError) -> str:
    """'<path>: <reason>' (both paths for a rename), or the reason alone when the error names no file."""
    reason = exc.strerror or one_line(exc) or type(exc).__name__
    names = [_shown_path(n) for n in (exc.filename, exc.filename2) if n is not None]
    if isinstance(exc, IsADirectoryError):
        reason += " (a file was expected)"
    return f"{' -> '.join(names)}: {reason}" if names else reason


if __name__ == "__main__":
    sys.exit(main())
