"""`cheers-deploy bench` (registered by cheers_deploy/cli/main.py through `add_bench_args`): per-stage and end-to-end
latency, peak memory and energy of the torch / onnxruntime / TensorRT backends on one workdir, side by side.

    cheers-deploy bench --workdir work/tiny --backends torch,ort --steps 20 --runs 5 --out bench/results/cpu
"""

from __future__ import annotations

import argparse
import datetime as _dt
import shlex
import sys

from ..errors import InputError
from .common import add_seed_arg, add_threads_arg, check_out_dir, int_arg, setting_arg

EPILOG = """Outputs in --out: bench.json, bench.csv, bench.md, stages.png, backends.png.
Understanding runs decode exactly --max-new-tokens tokens (stop tokens masked). Energy is read from NVML,
Jetson INA3221 rails / tegrastats or RAPL, and reported as unavailable where none is readable."""


def _csv(text: str):
    return [t.strip() for t in text.split(",") if t.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", metavar="DIR", required=True,
                   help="exported graphs (cheers-deploy export); exported first when it has none")
    p.add_argument("--checkpoint", metavar="DIR", default=None,
                   help="checkpoint for the torch backend (and for exporting); default: the one recorded in the "
                        "workdir's manifest, else the bundled tiny-shapes model")
    p.add_argument("--backends", default="torch,ort", help="comma list of torch, ort, trt (default torch,ort)")
    p.add_argument("--task", default="t2i,vqa,chat", help="comma list of t2i, vqa, chat (default all)")
    p.add_argument("--steps", type=setting_arg("steps"), default=20, help="Euler steps per image (default 20)")
    p.add_argument("--runs", type=int_arg(1, 10_000), default=5, help="timed runs per task and backend (default 5)")
    p.add_argument("--warmup", type=int_arg(0, 1_000), default=1,
                   help="untimed warm-up runs per task and backend (default 1)")
    p.add_argument("--energy", action="store_true", help="measure energy (NVML, Jetson rails, RAPL)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="report folder (default bench/results/bench_<UTC date-time>)")
    p.add_argument("--max-new-tokens", type=int_arg(2, 1 << 20), default=32,
                   help="tokens decoded per vqa/chat answer (default 32)")
    p.add_argument("--cfg-scale", type=setting_arg("cfg_scale"), default=9.5,
                   help="classifier-free guidance (1 = off: batch 1)")
    p.add_argument("--device", default="cpu", help="torch backend device (cpu, cuda, cuda:1)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="torch backend precision")
    p.add_argument("--providers", default=None,
                   help="comma list of onnxruntime providers (default CPUExecutionProvider)")
    add_threads_arg(p)
    p.add_argument("--interleave", action="store_true",
                   help="load all backends and alternate their timed runs (fairer ratios on a shared machine; "
                        "per-backend peak RSS then covers the load only)")
    add_seed_arg(p, help="seed of the noise, the images and sampling")
    p.add_argument("--overwrite", action="store_true", help="replace the report in an --out folder that has one")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def add_bench_args(sub) -> None:
    p = sub.add_parser("bench", help="benchmark stages, end-to-end latency, memory and energy per backend",
                       description="Benchmark the Cheers pipeline on one or more backends from one workdir: "
                                   "per-stage and end-to-end latency (median, p90), peak memory, energy.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run_bench)


def settings_from_args(args):
    from ..bench.run import BenchSettings

    return BenchSettings(workdir=args.workdir, backends=_csv(args.backends), tasks=_csv(args.task),
                         checkpoint=args.checkpoint, steps=args.steps, runs=args.runs, warmup=args.warmup,
                         energy=args.energy, max_new_tokens=args.max_new_tokens, cfg_scale=args.cfg_scale,
                         device=args.device, dtype=args.dtype,
                         providers=_csv(args.providers) if args.providers else None, threads=args.threads,
                         interleave=args.interleave, seed=args.seed, quiet=args.quiet)


def command_line(args) -> str:
    """The invocation as typed when it came from a command line, else rebuilt from the arguments."""
    argv = sys.argv[1:]
    if argv and "bench" in argv:
        return "cheers-deploy " + " ".join(shlex.quote(a) for a in argv)
    parts = ["cheers-deploy", "bench"]
    for key in ("workdir", "checkpoint", "backends", "task", "steps", "runs", "warmup", "max_new_tokens",
                "cfg_scale", "device", "dtype", "providers", "threads", "seed", "out"):
        v = getattr(args, key, None)
        if v is not None:
            parts += ["--" + key.replace("_", "-"), shlex.quote(str(v))]
    for flag in ("energy", "interleave"):
        if getattr(args, flag, False):
            parts.append("--" + flag)
    return " ".join(parts)


def run_bench(args) -> dict:
    from ..bench.report import FILES, write_report
    from ..bench.run import run_benchmark

    s = settings_from_args(args)
    s.check()                                   # argument errors before anything is loaded or exported
    out = args.out or f"bench/results/bench_{_dt.datetime.now(_dt.timezone.utc):%Y%m%d-%H%M%S}"
    out_dir = check_out_dir(out, "--out")       # a folder that can be written, before the benchmark runs
    old = [name for name in FILES.values() if (out_dir / name).exists()]
    if old and not getattr(args, "overwrite", False):
        raise InputError(f"--out {out} already holds a report ({old[0]}); pass --overwrite to replace it")
    rep = run_benchmark(s, command=command_line(args))
    paths = write_report(rep, out)
    print(out_dir.joinpath(FILES["md"]).read_text())
    print("wrote " + ", ".join(paths.values()))
    return rep


def main(argv=None) -> int:
    """Standalone entry point: the same as `cheers-deploy bench ...` (one-line errors, --debug)."""
    import sys

    from .main import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
