"""`cheers-deploy build` (registered by cheers_deploy/cli/main.py) and the `engines/build_engines.py` script."""

from __future__ import annotations

import argparse

from ..constants import PRECISIONS


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", metavar="DIR", required=True, help="exported workdir (cheers-deploy export --out DIR)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="which graphs to build (strongly typed: the graph's dtypes are the engine's). fp32 = the "
                        "exported graphs; fp16/bf16/int8/mixed need `cheers-deploy calibrate` first (fp16: "
                        "`cheers-deploy calibrate convert --workdir W --precision fp16`). Default: fp16 if the workdir "
                        "has fp16 graphs, else fp32 with a note (fp16 is recommended, on Jetson above all)")
    p.add_argument("--plugin-lib", metavar="PATH", default=None,
                   help="gated-residual plugin library (libcheers_plugins.so); default: $CHEERS_TRT_PLUGIN or the "
                        "CMake build folder; without one the hi gate is built from plain TensorRT layers. Its sha256 "
                        "is recorded in the engine manifest: at run time the TensorRT backend loads a library only "
                        "from plugin_lib= / $CHEERS_TRT_PLUGIN / the build folder, and only with that sha256")
    p.add_argument("--no-fuse", action="store_true", help="do not replace the hi gate by the plugin")
    p.add_argument("--force", action="store_true", help="rebuild engines that are up to date")
    p.add_argument("--timing-cache", metavar="PATH", default=None,
                   help="tactic timing cache to load and update (default: next to the engines)")
    p.add_argument("--graphs", default=None, help="comma-separated subset of the graphs")
    p.add_argument("--builder-opt-level", type=int, default=None, choices=range(0, 6), metavar="0-5",
                   help="TensorRT builder optimization level (default: TensorRT's, 3)")
    p.add_argument("--workspace-mib", type=int, default=None, help="cap TensorRT's builder workspace (MiB)")


def run(args) -> None:
    from ..build.engines import build_engines, summary_lines

    graphs = [g.strip() for g in args.graphs.split(",") if g.strip()] if args.graphs else None
    em = build_engines(args.workdir, precision=args.precision, plugin_lib=args.plugin_lib, force=args.force,
                       timing_cache=args.timing_cache, graphs=graphs, fuse=not args.no_fuse,
                       builder_optimization_level=args.builder_opt_level, workspace_mib=args.workspace_mib)
    for line in summary_lines(em):
        print(line)


def add_build_args(sub) -> None:
    p = sub.add_parser("build", help="build TensorRT engines from an exported workdir (needs TensorRT)",
                       description="Build one TensorRT engine per exported graph (strongly typed, profiles from the "
                                   "manifest, timing cache, gated-residual plugin). Idempotent: up-to-date engines "
                                   "are kept unless --force.")
    _add_arguments(p)
    p.set_defaults(func=run)


def main(argv=None) -> int:
    """Standalone entry point: the same as `cheers-deploy build ...` (one-line errors, --debug)."""
    import sys

    from .main import main as cli_main

    return cli_main(["build", *(sys.argv[1:] if argv is None else argv)])
