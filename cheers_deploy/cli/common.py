"""Helpers shared by the commands: the help formatter, model arguments, loading a pipeline, writing a PNG, progress,
timings, and what the user is told about a result (warnings, why there is no answer)."""

from __future__ import annotations

import argparse
import copy
import math
import os
import re
import sys
import textwrap
from pathlib import Path

from ..errors import InputError
from ..fileio import atomic_path


# --------------------------------------------------------------------------------------------------------- help
def shows_default(value) -> bool:
    """Whether an option's default is worth printing: not None/False/SUPPRESS, not an empty list or string."""
    if value is None or value is False or value is argparse.SUPPRESS:
        return False
    return not (isinstance(value, (list, tuple, dict, set, str)) and len(value) == 0)


class HelpFormatter(argparse.HelpFormatter):
    """Every option with a default says it ("(default: X)" unless its help already names X as the default).
    Descriptions and epilogs with explicit line breaks are printed as written; one-paragraph ones are wrapped."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or not (action.option_strings or action.nargs in (argparse.OPTIONAL,
                                                                                   argparse.ZERO_OR_MORE)):
            return text
        d = action.default
        if shows_default(d) and not ("default" in text.lower() and str(d) in text):
            text = (text + " " if text else "") + "(default: %(default)s)"
        return text

    def _format_action(self, action):
        if not action.help and action.option_strings and shows_default(action.default):
            action = copy.copy(action)                     # argparse prints nothing for an option without help
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _split_lines(self, text, width):
        # never split a command name such as cheers-deploy at its hyphen
        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)

    def _fill_text(self, text, width, indent):
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return textwrap.fill(self._whitespace_matcher.sub(" ", text).strip(), width, initial_indent=indent,
                             subsequent_indent=indent, break_on_hyphens=False)


class CliParser(argparse.ArgumentParser):
    """argparse with the CLI's error convention: a usage error is one line `error: ...` on stderr and exit code 2.
    A bad value of a typed option (see `int_arg`, `float_arg`, `setting_arg`, `seed_arg`) reads
    `error: --steps must be >= 1, got 0`."""

    def error(self, message):
        m = re.match(r"argument ([^:]+): (must be .*)$", message, flags=re.S)
        text = f"{m.group(1).split('/')[-1]} {m.group(2)}" if m else f"{message} ({self.prog} -h for help)"
        self.exit(2, f"error: {one_line(text)}\n")


def one_line(text) -> str:
    """A message on one line: line breaks become '; ', runs of blanks are kept as they are."""
    parts = [p.strip() for p in str(text).splitlines() if p.strip()]
    return "; ".join(parts)


def use_formatter(parser: argparse.ArgumentParser, formatter=HelpFormatter) -> None:
    """Give `parser` and all its sub-command parsers the same help formatter."""
    parser.formatter_class = formatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in action.choices.values():
                use_formatter(sp, formatter)


def threads_help() -> str:
    from ..runtime.threads import physical_cores

    return (f"CPU threads of torch / onnxruntime (default: the physical cores available to this process, "
            f"{physical_cores()} here)")


MAX_THREADS = 4096


def add_threads_arg(p) -> None:
    p.add_argument("--threads", type=int_arg(1, MAX_THREADS), default=None, metavar="N", help=threads_help())


def check_threads(threads) -> None:
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be a positive integer, got {threads}")


# --------------------------------------------------------------------------------------------------------- values
# Option types that check a value's range while the command line is parsed, before anything is loaded: a bad value
# is one line `error: --NAME must be ...` and exit code 2 (CliParser.error). The generation settings take their
# ranges from the pipeline's table (runtime.pipeline.SETTINGS, what Pipeline.check_inputs applies to every call).
def _parse_int(text: str) -> int:
    t = str(text).strip().replace("_", "")
    if re.fullmatch(r"[+-]?\d+", t):
        return int(t)
    if re.fullmatch(r"[+-]?\d+(\.0*)?|[+-]?\d+(\.\d*)?[eE][+]?\d+", t):
        v = float(t)                                   # 1e3, 7.0: integral values written as numbers
        if math.isfinite(v) and v.is_integer():
            return int(v)
    raise argparse.ArgumentTypeError(f"must be an integer, got {text}")


def int_arg(lo: int, hi: int):
    """argparse type: an integer in lo..hi."""
    def parse(text):
        v = _parse_int(text)
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {text}")
        if v > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi}, got {text}")
        return v
    parse.__name__ = "integer"
    return parse


def float_arg(lo: float, hi: float, low_open: bool = False, high_open: bool = False):
    """argparse type: a finite number in [lo, hi] (with an open end where asked)."""
    def parse(text):
        try:
            v = float(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text}") from None
        ok = math.isfinite(v) and (lo < v if low_open else lo <= v) and (v < hi if high_open else v <= hi)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be a finite number in {'(' if low_open else '['}{lo:g}, "
                                             f"{hi:g}{')' if high_open else ']'}, got {text}")
        return v
    parse.__name__ = "number"
    return parse


def setting_arg(name: str):
    """argparse type of a generation setting (steps, cfg_scale, alpha, temperature, top_p, max_new_tokens), with
    the range Pipeline.check_inputs applies (runtime.pipeline.SETTINGS)."""
    def parse(text):
        from ..runtime.pipeline import SETTINGS           # imported when a value is given, not to build the parser

        kind, lo, hi, low_open = SETTINGS[name]
        return (int_arg(lo, hi) if kind == "int" else float_arg(lo, hi, low_open))(text)
    parse.__name__ = name
    return parse


def seed_arg(text) -> int:
    """argparse type of a seed: an integer in 0..2^32-1 (runtime.pipeline.SEED_MAX), as typed ("7", "007")."""
    from ..runtime.pipeline import SEED_MAX

    try:
        v = _parse_int(text)
    except argparse.ArgumentTypeError:
        v = None
    if v is None or not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be an integer in 0..{SEED_MAX}, got {text}")
    return v


seed_arg.__name__ = "seed"


def add_seed_arg(p, default: int = 0, help: str = "seed of the noise, the dummy image and sampling") -> None:
    p.add_argument("--seed", type=seed_arg, default=default, metavar="N", help=f"{help} (0..2^32-1)")


# --------------------------------------------------------------------------------------------------------- model
def add_model_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("model and backend")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="PATH_OR_ID",
                     help="checkpoint folder (official layout) or Hugging Face Hub id such as ai9stars/Cheers, "
                          "fetched through the HF cache, HF_HUB_OFFLINE=1 honoured (default: the bundled "
                          "tiny-shapes model)")
    src.add_argument("--workdir", metavar="DIR", help="exported graphs (cheers-deploy export) instead of a checkpoint")
    g.add_argument("--revision", metavar="REV", default=None,
                   help="with a Hub id in --checkpoint: the branch, tag or commit to use; pin a commit hash for "
                        "reproducible runs (default: main)")
    g.add_argument("--backend", choices=["torch", "ort", "trt"], default=None,
                   help="torch for --checkpoint (default), ort for --workdir (default), trt for TensorRT engines")
    g.add_argument("--device", default="cpu", metavar="DEV", help="torch device (cpu, cuda)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="torch backend precision (float32 is the parity reference)")
    g.add_argument("--providers", default=None, metavar="LIST",
                   help="comma-separated onnxruntime providers, e.g. CUDAExecutionProvider,CPUExecutionProvider")
    g.add_argument("--precision", default=None, metavar="P",
                   help="with --workdir: which graphs/engines to run, fp32 (default), fp16, bf16, int8 or mixed "
                        "(made by cheers-deploy calibrate / build)")
    g.add_argument("--plugin-lib", default=None, metavar="PATH",
                   help="with --backend trt: the gated-residual plugin library to load (only this, $CHEERS_TRT_PLUGIN "
                        "or the package's own build is ever loaded, and only when its sha256 matches the one recorded "
                        "when the engines were built; docs/security.md)")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="torch on CUDA: capture the fixed-shape stages (vision tokenizer, image step, one-token "
                        "decode, CFM head) as CUDA graphs once and replay them (docs/performance.md)")
    g.add_argument("--compile", default=None, metavar="MODE", choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch: torch.compile the same stages with this mode (default, reduce-overhead or "
                        "max-autotune; the first run of each shape compiles, TORCHINDUCTOR_CACHE_DIR keeps the "
                        "kernels for the next process)")
    add_threads_arg(g)
    add_seed_arg(p)


def uses_bundled_graphs(checkpoint=None, workdir=None, backend=None, device: str = "cpu",
                        dtype: str = "float32", torch_fast: bool = False):
    """The bundled model's exported graphs folder when a run should use it (no --checkpoint / --workdir and
    nothing asks for torch), else None."""
    if checkpoint is not None or workdir is not None or backend == "torch" or torch_fast:
        return None
    if str(device) != "cpu" or dtype != "float32":          # torch-only options: the torch path
        return None
    from ..hub import bundled_workdir

    return bundled_workdir()


def open_pipeline(checkpoint=None, workdir=None, backend=None, device: str = "cpu", dtype: str = "float32",
                  precision=None, providers=None, threads=None, revision=None, plugin_lib=None,
                  cuda_graphs: bool = False, compile=None, timings: bool = True):
    """The pipeline a command line asks for. Without --checkpoint/--workdir: the bundled model, from its shipped
    graphs on onnxruntime when the package has them (torch-free), else from its checkpoint on torch.
    cuda_graphs / compile: the torch backend's fast path (they select torch); timings: synchronise around each
    stage to time it."""
    from ..runtime.pipeline import Pipeline

    check_threads(threads)
    if revision is not None and (workdir is not None or checkpoint is None):
        raise InputError("--revision pins a Hugging Face Hub model: use it with --checkpoint OWNER/NAME")
    fast = bool(cuda_graphs) or compile is not None
    if fast and (workdir is not None or backend not in (None, "torch")):
        raise InputError("--cuda-graphs and --compile are torch backend options (a checkpoint, not --workdir); "
                         "the trt backend replays CUDA graphs of its own")
    bundled = uses_bundled_graphs(checkpoint, workdir, backend, device, dtype, fast)
    if bundled is not None:
        workdir = bundled
    if workdir is not None:
        kw = {}
        if providers:
            kw["providers"] = providers.split(",") if isinstance(providers, str) else list(providers)
        if precision and precision != "fp32":
            kw["precision"] = precision
        if plugin_lib is not None:
            if backend != "trt":
                raise InputError("--plugin-lib is for the TensorRT backend: add --backend trt")
            kw["plugin_lib"] = plugin_lib
        return Pipeline.from_workdir(workdir, backend=backend or "ort", threads=threads, **kw)
    if precision:
        raise InputError("--precision selects exported graphs: use it with --workdir (for torch use --dtype)")
    if plugin_lib is not None:
        raise InputError("--plugin-lib is for TensorRT engines: use it with --workdir and --backend trt")
    if backend not in (None, "torch"):
        raise InputError(f"--backend {backend} needs --workdir (export the checkpoint first)")
    kw = dict(cuda_graphs=True) if cuda_graphs else {}
    if compile is not None:
        kw["compile"] = compile
    if not timings:
        kw["timings"] = False
    return Pipeline.from_pretrained(checkpoint, backend="torch", device=device, dtype=dtype, threads=threads,
                                    revision=revision, **kw)


def load_pipeline(args):
    cuda_graphs, compile = getattr(args, "cuda_graphs", False), getattr(args, "compile", None)
    fast = bool(cuda_graphs) or compile is not None
    # the fast path syncs the device only where --timings asks for stage times
    return open_pipeline(args.checkpoint, args.workdir, args.backend, args.device, args.dtype, args.precision,
                         args.providers, args.threads, args.revision, getattr(args, "plugin_lib", None),
                         cuda_graphs=cuda_graphs, compile=compile,
                         timings=not fast or bool(getattr(args, "timings", False)))


def is_bundled(args) -> bool:
    """Whether the run used the bundled tiny-shapes model."""
    if getattr(args, "checkpoint", None) is None and getattr(args, "workdir", None) is None:
        return True
    from ..hub import bundled_checkpoint, bundled_workdir

    picked = args.checkpoint if args.checkpoint is not None else args.workdir
    try:
        here = Path(picked).expanduser().resolve()
    except (OSError, RuntimeError):
        return False
    return here in {p.resolve() for p in (bundled_checkpoint(), bundled_workdir()) if p is not None}


# --------------------------------------------------------------------------------------------------------- output
# Every output path is checked before the work starts (a read-only folder, a directory where a file goes, an existing
# file without --overwrite), so a long run never ends in a write that cannot happen. The writes themselves go through
# cheers_deploy.fileio (temporary file in the same folder, fsync, rename; removed on an error or Ctrl-C).
def check_out(path: str, overwrite: bool) -> Path:
    """generate/edit --out: a .png file that may be written."""
    return check_out_file(path, overwrite, "--out", suffixes=(".png",))


def check_out_file(path, overwrite: bool, option: str = "--out", suffixes=None) -> Path:
    """An output file named by `option`: the right suffix, not a directory, not an existing file unless
    `overwrite`, in an existing folder this process may write into."""
    out = Path(path)
    if suffixes and out.suffix.lower() not in suffixes:
        raise InputError(f"{option} must be a {' or '.join(suffixes)} file, got {out}")
    if out.is_dir():
        raise InputError(f"{option} {out} is a directory, not a file")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise InputError(f"{out} exists; pass --overwrite to replace it")
        if not out.is_file():
            raise InputError(f"{option} {out} exists and is not a regular file")
    check_writable_folder(out.parent, option, "output folder does not exist")
    return out


def check_out_dir(path, option: str = "--out") -> Path:
    """An output folder named by `option` (created when missing): not a file, and it, or the nearest folder above it
    that exists, may be written into."""
    d = Path(path)
    if d.exists() and not d.is_dir():
        raise InputError(f"{option} {d} is a file, not a folder")
    existing = d
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():
            raise InputError(f"{option} {existing} is a broken symbolic link")
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{option} {d}: {existing} is a file, not a folder")
    check_writable_folder(existing, option)
    return d


def check_writable_folder(folder, option: str = "--out", missing: str = "folder does not exist") -> Path:
    folder = Path(folder) if str(folder) else Path(".")
    if not folder.exists():
        raise InputError(f"{missing}: {folder}")
    if not folder.is_dir():
        raise InputError(f"{option}: {folder} is not a folder")
    if not writable(folder):
        raise InputError(f"{option}: cannot write into {folder} (read-only folder)")
    return folder


def writable(folder) -> bool:
    """Whether files may be created in `folder`: access(2) (permissions, read-only file systems); for root, which
    access() always lets through, a folder whose mode has no write bit at all counts as read-only too."""
    folder = Path(folder)
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    geteuid = getattr(os, "geteuid", None)
    if geteuid is not None and geteuid() == 0:
        try:
            return bool(folder.stat().st_mode & 0o222)
        except OSError:
            return False
    return True


def write_png(image, out: Path):
    """Write atomically: a failed run leaves no partial file behind."""
    from PIL import Image

    with atomic_path(out) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def progress_bar(desc: str):
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


def print_timings(timings):
    if not timings:
        return
    print("stage timings:", file=sys.stderr)
    for k, v in timings.items():
        print(f"  {k:18s} {v['calls']:5d} calls  {v['mean_ms']:9.2f} ms/call  {v['total_s']:8.3f} s", file=sys.stderr)


def print_warnings(res) -> None:
    """The result's warnings (e.g. words the model never saw), one `warning: ...` line each, on stderr."""
    for w in getattr(res, "warnings", None) or []:
        print(f"warning: {w}", file=sys.stderr)


BUNDLED_USE = ("the bundled tiny-shapes model does not chat: it answers questions about an image "
               "(cheers-deploy ask --image IMG --question \"what color is the shape?\") and draws shapes "
               "(cheers-deploy generate --prompt \"a red circle on the left\" --out x.png)")
OTHER_USE = ("for a picture use cheers-deploy generate --prompt ... --out x.png; ask and chat only return text")


def explain_empty_answer(pipe, res, bundled: bool) -> None:
    """One `note: ...` line on stderr when an answer came back empty, saying why and what to do instead."""
    if (res.text or "").strip():
        return
    reason = pipe.describe_stop(res.stop_reason) if res.stop_reason else "unknown"
    if res.stop_reason == "image_start":
        print(f"note: no text: {reason}; {BUNDLED_USE if bundled else OTHER_USE}", file=sys.stderr)
    else:
        print(f"note: the answer is empty ({reason})", file=sys.stderr)
