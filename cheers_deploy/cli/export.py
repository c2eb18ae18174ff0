"""`cheers-deploy export` (registered by cheers_deploy/cli/main.py) and the `export/export.py` script."""

from __future__ import annotations

import argparse

from ..constants import GRAPH_NAMES
from ..export.specs import DEFAULT_MAX_CONTEXT


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="PATH_OR_ID", default=None,
                   help="checkpoint folder (official layout) or Hugging Face Hub id such as ai9stars/Cheers "
                        "(default: the bundled tiny-shapes model)")
    p.add_argument("--revision", metavar="REV", default=None,
                   help="with a Hub id in --checkpoint: the branch, tag or commit (default: main)")
    p.add_argument("--out", metavar="DIR", required=True, help="workdir for the graphs and manifest.json")
    p.add_argument("--image-size", type=int, default=None,
                   help="working resolution (default: the checkpoint's preprocessor scale_resolution)")
    p.add_argument("--batch-max", type=int, default=2, help="largest batch in the build profiles (CFG = 2)")
    p.add_argument("--max-context", type=int, default=DEFAULT_MAX_CONTEXT,
                   help=f"KV cache positions (default {DEFAULT_MAX_CONTEXT})")
    p.add_argument("--graphs", default=None, help=f"comma-separated subset of {','.join(GRAPH_NAMES)}")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset")
    p.add_argument("--force", action="store_true", help="re-export graphs that are up to date")
    p.add_argument("--overwrite", action="store_true",
                   help="export into --out even though it holds files and is not a workdir (no manifest.json); "
                        "without it such a folder is refused")
    p.add_argument("--no-simplify", action="store_true", help="skip onnxslim")
    p.add_argument("--no-verify", action="store_true", help="skip the ORT-vs-torch check of each graph")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> None:
    from ..errors import InputError
    from ..export.exporter import export_all
    from ..hub import resolve_checkpoint

    if args.revision is not None and args.checkpoint is None:
        raise InputError("--revision pins a Hugging Face Hub model: use it with --checkpoint OWNER/NAME")
    ckpt = resolve_checkpoint(args.checkpoint, revision=args.revision) if args.checkpoint is not None else None
    graphs = [g.strip() for g in args.graphs.split(",") if g.strip()] if args.graphs else None
    man = export_all(ckpt, args.out, image_size=args.image_size, batch_max=args.batch_max,
                     max_context=args.max_context, force=args.force, opset=args.opset, progress=not args.quiet,
                     graphs=graphs, simplify=not args.no_simplify, verify=not args.no_verify,
                     overwrite=args.overwrite)
    for name, g in man.graphs.items():
        slim = "slimmed" if g.extra.get("slim", {}).get("applied") else "not slimmed"
        print(f"{name:17s} {g.file:24s} {g.extra.get('weight_bytes', 0) / 2**20:9.1f} MiB  {slim}"
              + (f"  + {g.external_data}" if g.external_data else ""))
    print(f"manifest: {man.workdir / 'manifest.json'}")


def add_export_args(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX graphs + manifest (needs torch)",
                       description="Export the five Cheers stages to ONNX (idempotent: up-to-date graphs are "
                                   "skipped unless --force). --out must be new, empty or a workdir (else "
                                   "--overwrite); one export at a time per workdir (a second one fails at once).")
    _add_arguments(p)
    p.set_defaults(func=run)


def main(argv=None) -> int:
    """Standalone entry point: the same as `cheers-deploy export ...` (one-line errors, --debug)."""
    import sys

    from .main import main as cli_main

    return cli_main(["export", *(sys.argv[1:] if argv is None else argv)])
