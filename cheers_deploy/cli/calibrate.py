"""`cheers-deploy calibrate {capture,quantize,convert,sweep,report}` (docs/precision.md)."""

from __future__ import annotations

import argparse
import json
import sys

from .common import (add_seed_arg, add_threads_arg, check_out_dir, check_out_file, check_writable_folder, float_arg,
                     int_arg, setting_arg)

MAX_ITEMS = 100_000


def _writable_workdir(workdir) -> str:
    """Every calibrate step writes into the workdir: never into the package's own bundled graphs, and only into a
    folder this process may write (checked before any work)."""
    from pathlib import Path

    from ..errors import InputError
    from ..hub import BUNDLED_GRAPHS

    if Path(workdir).resolve() == BUNDLED_GRAPHS.resolve():
        raise InputError(f"{workdir} holds the bundled model's shipped graphs (part of the installed package): copy "
                         f"it first (cp -r {workdir} work/tiny) and calibrate the copy")
    if Path(workdir).exists():
        check_writable_folder(workdir, "--workdir")
    return workdir


def add_calibrate_args(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("calibrate", help="FP16/BF16 conversion and INT8 calibration of exported graphs",
                              description="Precision workflow for TensorRT's strongly typed builds: capture "
                                          "calibration data, quantize (INT8 Q/DQ), convert (fp16/bf16), sweep "
                                          "(mixed plan), report. See docs/precision.md.")
    sub = p.add_subparsers(dest="calibrate_command", metavar="{capture,quantize,convert,sweep,report}")

    def no_subcommand(a) -> int:
        p.print_help(sys.stderr)
        return 2

    p.set_defaults(func=no_subcommand)

    c = sub.add_parser("capture", help="record every graph's real inputs while the fp32 ORT pipeline runs")
    c.add_argument("--workdir", required=True)
    c.add_argument("--n", type=int_arg(1, MAX_ITEMS), default=16,
                   help="calibration items (each: one answer + one generation)")
    c.add_argument("--max-mb", type=float_arg(0.0, 1e6, low_open=True), default=512.0,
                   help="size cap of the captured shards")
    c.add_argument("--data", default=None, help="JSONL of {image, question, prompt} (default: shapes world train)")
    c.add_argument("--steps", type=setting_arg("steps"), default=25, help="Euler steps of the calibration generations")
    add_threads_arg(c)
    add_seed_arg(c, default=1000, help="seed of the calibration items")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(func=_capture)

    q = sub.add_parser("quantize", help="INT8 Q/DQ graphs (<graph>.int8.onnx) from the captured data")
    q.add_argument("--workdir", required=True)
    q.add_argument("--method", choices=["entropy", "minmax", "percentile"], default="percentile",
                   help="activation range calibration (default percentile 99.999; measured in docs/precision.md)")
    q.add_argument("--exclude", nargs="*", default=[], metavar="PATTERN", help="node-name patterns kept in fp32")
    q.add_argument("--graphs", nargs="*", default=None)
    q.add_argument("--quantize-hi-gate", action="store_true",
                   help="also quantize the hi gate (breaks exact TensorRT plugin fusion)")
    q.add_argument("--exclude-activation-matmul", action="store_true",
                   help="keep MatMuls of two activations (attention) in fp32")
    q.add_argument("--quantize-outputs", action="store_true",
                   help="also put Q/DQ on the outputs of MatMul/Gemm/Conv (onnxruntime's default; measured worse)")
    q.set_defaults(func=_quantize)

    v = sub.add_parser("convert", help="fp16 / bf16 graphs (I/O stays fp32)")
    v.add_argument("--workdir", required=True)
    v.add_argument("--precision", choices=["fp16", "bf16"], required=True)
    v.add_argument("--graphs", nargs="*", default=None)
    v.add_argument("--no-keep-fp32", action="store_true", help="convert without the sensitive-op fp32 block list")
    v.set_defaults(func=_convert)

    s = sub.add_parser("sweep", help="per-graph (and per-layer) INT8 sensitivity -> the 'mixed' precision",
                       description="Quantize one graph at a time (others fp32) and compare end to end with fp32: "
                                   "3 images (PSNR) and ~450 greedy answers (fraction identical). Graphs that "
                                   "fail fall back to fp16 (else fp32); with --per-layer, a failing graph is "
                                   "swept layer group by layer group and keeps INT8 where a group passes alone.")
    s.add_argument("--workdir", required=True)
    s.add_argument("--steps", type=setting_arg("steps"), default=10, help="Euler steps of the fingerprint images")
    s.add_argument("--psnr-min", type=float_arg(0.0, 1000.0), default=30.0,
                   help="image PSNR vs fp32 to keep INT8 (dB)")
    s.add_argument("--agree-min", type=float_arg(0.0, 1.0), default=0.99,
                   help="fraction of answers identical to fp32 to keep INT8")
    s.add_argument("--per-layer", nargs="*", default=None, metavar="GRAPH",
                   help="per-layer sweep of the graphs that fail (no names) or of the named graphs")
    s.add_argument("--method", choices=["entropy", "minmax", "percentile"], default=None,
                   help="calibration method of the per-layer graphs (default: the one of the graph's int8 file)")
    add_threads_arg(s)
    s.set_defaults(func=_sweep)

    r = sub.add_parser("report", help="per-graph error and end-to-end scores per precision (markdown + PNG)")
    r.add_argument("--workdir", required=True)
    r.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    r.add_argument("--overwrite", action="store_true", help="replace --json if it exists")
    r.add_argument("--eval-n", type=int_arg(1, MAX_ITEMS), default=20,
                   help="held-out scenes / prompts of each end-to-end evaluation")
    r.add_argument("--steps", type=setting_arg("steps"), default=25, help="Euler steps per image")
    r.add_argument("--precisions", nargs="*", default=None, metavar="P",
                   help="precisions to report (default: all the workdir has)")
    r.add_argument("--out", default=None,
                   help="folder of the markdown/PNG, regenerated on every run (default <workdir>/calib)")
    add_threads_arg(r)
    r.add_argument("--quiet", action="store_true", help="no progress bars (stderr)")
    r.set_defaults(func=_report)
    return p


def _capture(a) -> int:
    _writable_workdir(a.workdir)
    from ..precision.capture import capture, summary

    cm = capture(a.workdir, n=a.n, max_mb=a.max_mb, data=a.data, seed=a.seed, steps=a.steps,
                 progress=not a.no_progress, threads=a.threads)
    print(summary(cm))
    return 0


def _quantize(a) -> int:
    _writable_workdir(a.workdir)
    from ..precision.quantize import quantize

    quantize(a.workdir, a.graphs, a.method, a.exclude, exclude_hi_gate=not a.quantize_hi_gate,
             exclude_activation_matmul=a.exclude_activation_matmul, quantize_outputs=a.quantize_outputs)
    return 0


def _convert(a) -> int:
    _writable_workdir(a.workdir)
    from ..precision.convert import convert

    convert(a.workdir, a.precision, a.graphs, keep_fp32=not a.no_keep_fp32)
    return 0


def _sweep(a) -> int:
    _writable_workdir(a.workdir)
    from ..precision.report import sweep

    res = sweep(a.workdir, steps=a.steps, psnr_min=a.psnr_min, agree_min=a.agree_min, per_layer=a.per_layer,
                method=a.method, threads=a.threads)
    print(json.dumps(res["plan"]))
    return 0


def _report(a) -> int:
    from pathlib import Path

    _writable_workdir(a.workdir)
    if a.json:
        check_out_file(a.json, a.overwrite, "--json")
    check_out_dir(a.out if a.out else Path(a.workdir) / "calib", "--out")
    from ..precision.report import report

    res = report(a.workdir, eval_n=a.eval_n, steps=a.steps, json_path=a.json, out_dir=a.out, precisions=a.precisions,
                 threads=a.threads, progress=not a.quiet)
    print(Path(res["markdown"]).read_text(encoding="utf-8"))
    return 0
