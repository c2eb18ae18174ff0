"""`cheers-deploy serve` (registered by cheers_deploy/cli/main.py through `add_serve_args`): the pipeline as a
long-running, OpenAI-compatible HTTP service (docs/serving.md). The server itself is `cheers_deploy/serve`, imported
only when the command runs: it needs the `serve` extra (pip install cheers-deploy[serve]).

    cheers-deploy serve                                   # the bundled model on 127.0.0.1:8000
    cheers-deploy serve --workdir work/official --backend trt --precision fp16 --host 0.0.0.0 --api-key-file key

Also runnable as `python -m cheers_deploy.cli.serve [options]` (the same options).
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from pathlib import Path

from ..errors import CheersError, InputError, MissingDependencyError
from .common import (CliParser, add_model_args, check_threads, float_arg, int_arg, is_bundled, load_pipeline,
                     use_formatter, uses_bundled_graphs)

EXTRA_HINT = "pip install cheers-deploy[serve]"
EPILOG = """API: POST /v1/chat/completions, /v1/images/generations, /v1/images/edits; GET /v1/models, /health, /ready,
/metrics. One device thread runs requests one at a time; --max-queue more may wait, the next gets 429 at once.
SIGTERM drains (new requests 503) and exits 0. --seed is the seed of requests that send none. See docs/serving.md."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    g = p.add_argument_group("service")
    g.add_argument("--host", default="127.0.0.1", metavar="ADDR",
                   help="address to listen on; 0.0.0.0 or :: exposes the server to the network (use --api-key-file)")
    g.add_argument("--port", type=int_arg(0, 65535), default=8000, metavar="N",
                   help="TCP port (0: a free one, printed at start)")
    g.add_argument("--max-queue", type=int_arg(0, 1 << 20), default=16, metavar="N",
                   help="requests that may wait behind the running one; more get 429 with Retry-After at once")
    g.add_argument("--timeout", type=float_arg(0.0, 1e6, low_open=True), default=300.0, metavar="S",
                   help="seconds a request may take from arrival (queue wait included) before it is cancelled "
                        "with 504")
    g.add_argument("--api-key-file", metavar="FILE", default=None,
                   help="require `Authorization: Bearer KEY`, KEY one of the non-empty lines of FILE "
                        "(/health and /ready stay open)")
    g.add_argument("--allow-remote-images", action="store_true",
                   help="let image_url parts fetch http(s) URLs (off: data: URLs only)")
    g.add_argument("--max-body-mb", type=float_arg(0.0, 1 << 20, low_open=True), default=16.0, metavar="MB",
                   help="largest request body in MiB (413 above it)")
    g.add_argument("--max-image-pixels", type=int_arg(1, 1 << 40), default=4096 * 4096, metavar="N",
                   help="largest input image in pixels, checked before decoding (413 above it)")
    g.add_argument("--model-name", default=None, metavar="NAME",
                   help="the model id in /v1/models and responses (default: cheers-tiny-shapes for the bundled "
                        "model, else the folder or Hub id)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="server log level (stderr)")
    g.add_argument("--no-access-log", action="store_true", help="do not log every request")


def add_serve_args(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP service (chat, images, streaming, metrics)",
                       description="Serve the model over HTTP with an OpenAI-compatible API: chat completions "
                                   "(streamed or not), image generations and edits, health, readiness and "
                                   "Prometheus metrics. Without --checkpoint/--workdir the bundled tiny-shapes "
                                   "model is served.",
                       epilog=EPILOG)
    add_arguments(p)
    p.set_defaults(func=cmd_serve)


def read_api_keys(path) -> tuple:
    """The keys of an --api-key-file: its non-empty lines that are not comments (#), as bytes."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--api-key-file {p}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    keys = tuple(s.strip().encode("utf-8") for s in lines if s.strip() and not s.strip().startswith("#"))
    if not keys:
        raise InputError(f"--api-key-file {p}: no key in it (one key per line)")
    if any(len(k) < 8 or b" " in k for k in keys):
        raise InputError(f"--api-key-file {p}: every key must be at least 8 characters without spaces")
    try:
        if os.name == "posix" and p.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
            print(f"warning: {p} is readable by other users (chmod 600 {p})", file=sys.stderr)
    except OSError:
        pass
    return keys


def model_name(args) -> str:
    if args.model_name:
        return args.model_name
    if is_bundled(args):
        return "cheers-tiny-shapes"
    picked = args.checkpoint if args.checkpoint is not None else args.workdir
    p = Path(str(picked))
    return str(picked) if args.checkpoint is not None and not p.exists() else (p.resolve().name or str(picked))


def check_args(args) -> None:
    check_threads(args.threads)                 # the option types check these too; the API may skip them
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be in 0..65535, got {args.port}")
    if args.max_queue < 0:
        raise InputError(f"--max-queue must be 0 or more, got {args.max_queue}")
    if not args.timeout > 0:
        raise InputError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if not args.max_body_mb > 0:
        raise InputError(f"--max-body-mb must be positive, got {args.max_body_mb}")
    if args.max_image_pixels < 1:
        raise InputError(f"--max-image-pixels must be positive, got {args.max_image_pixels}")
    if not 0 <= args.seed <= 2 ** 32 - 1:
        raise InputError(f"--seed must be in 0..{2 ** 32 - 1}, got {args.seed}")
    if args.workdir is not None and not Path(args.workdir).is_dir():
        raise InputError(f"--workdir {args.workdir}: no such folder")


def cmd_serve(args) -> int:
    check_args(args)
    keys = read_api_keys(args.api_key_file) if args.api_key_file else ()
    try:
        from ..serve.service import ServeConfig
        from ..serve.server import ListenOptions, configure_logging, run_server
    except ImportError as exc:
        raise MissingDependencyError(f"`cheers-deploy serve` needs the serve extra: {EXTRA_HINT} "
                                     f"(missing: {exc.name or exc})") from None
    bundled_graphs = uses_bundled_graphs(args.checkpoint, args.workdir, args.backend, args.device, args.dtype)
    backend = args.backend or ("ort" if args.workdir is not None or bundled_graphs is not None else "torch")
    precision = args.precision or ("fp32" if backend != "torch" else args.dtype)
    config = ServeConfig(model_name=model_name(args), backend=backend, precision=precision,
                         max_queue=args.max_queue, timeout=args.timeout,
                         max_body_bytes=int(args.max_body_mb * (1 << 20)), max_image_pixels=args.max_image_pixels,
                         allow_remote_images=args.allow_remote_images, api_keys=keys, default_seed=args.seed)
    configure_logging(args.log_level)
    return run_server(lambda: load_pipeline(args), config,
                      ListenOptions(args.host, args.port, args.log_level, not args.no_access_log))


def build_parser() -> argparse.ArgumentParser:
    """`cheers-deploy` with only the serve command (python -m cheers_deploy.cli.serve, before cli/main.py lists it)."""
    p = CliParser(prog="cheers-deploy")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    add_serve_args(p.add_subparsers(dest="command", metavar="COMMAND"))
    use_formatter(p)
    return p


def main(argv=None) -> int:
    """`cheers-deploy serve ARGV`: through the main command line when it lists serve, else through build_parser with
    the same conventions (one-line errors, exit code 2)."""
    from .main import build_parser as main_parser, main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = (["--debug"] if debug else []) + ["serve"] + [a for a in argv if a != "--debug"]
    if any("serve" in (getattr(a, "choices", None) or ()) for a in main_parser()._actions):
        return cli_main(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:                   # CliParser printed the one-line error; -h exits 0
        if exc.code in (0, None):
            raise
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except CheersError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
