"""`cheers-deploy train`: the staged recipe on the shapes world (the main CLI calls add_train_args/run_train).

    cheers-deploy train --preset tiny-shapes --device cuda --out runs/tiny-shapes           # ~8 min on an H100
    cheers-deploy train --preset tiny-shapes --device cpu --steps 200 --out /tmp/ts        # CPU smoke run
    cheers-deploy train ... --resume                                                        # continue DIR
"""

from __future__ import annotations

import argparse
import json
import math

from ..errors import InputError
from ..fileio import write_json
from .common import add_seed_arg, add_threads_arg, check_out_dir, float_arg, int_arg

MAX_STEPS = 10_000_000
CHECKPOINT_FILES = ("model.safetensors", "model.safetensors.index.json", "config.json")

# Per device: (steps, batch size, pool size, time budget of the training loop in seconds). On cuda the step
# count is calibrated at start-up to fit the budget (420 s of loop + start-up, rendering, saving ~ 8 min).
DEVICE_DEFAULTS = {"cuda": (None, 256, 20000, 420.0), "cpu": (200, 8, 2000, 0.0)}


def add_train_args(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train a tiny Cheers on the synthetic shapes world",
                              description="Staged recipe (vae -> align -> joint) on the shapes world; "
                                          "writes a loadable checkpoint to --out (see docs/training.md).")
    p.add_argument("--preset", default="tiny-shapes", help="model preset (cheers_deploy.config.PRESETS)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--out", required=True, help="output / checkpoint directory")
    p.add_argument("--steps", type=int_arg(1, MAX_STEPS), default=None,
                   help="total steps over all stages (default: calibrated to --time-budget on cuda, 200 on cpu)")
    p.add_argument("--time-budget", type=float_arg(0.0, 30 * 86400.0, low_open=True), default=None, metavar="SECONDS",
                   help="without --steps: time a few steps and pick the step count that fits (default 420 on cuda)")
    p.add_argument("--batch-size", type=int_arg(2, 1 << 16), default=None, help="default: 256 on cuda, 8 on cpu")
    p.add_argument("--pool-size", type=int_arg(1, MAX_STEPS), default=None,
                   help="pre-rendered training scenes (20000 cuda / 2000 cpu)")
    p.add_argument("--lr", type=float_arg(0.0, 1.0, low_open=True), default=None,
                   help="peak learning rate of the joint stage")
    p.add_argument("--stage-fractions", default=None,
                   help="vae,align,joint shares of --steps (default 0.2,0.05,0.75)")
    p.add_argument("--ema", type=float_arg(0.0, 1.0, high_open=True), default=None,
                   help="EMA decay of the weights in the joint stage (default 0.999; 0 = off)")
    add_seed_arg(p, help="seed of the data and the initialisation")
    p.add_argument("--save-every", type=int_arg(0, MAX_STEPS), default=1000,
                   help="checkpoint interval in steps (0 = only at the end)")
    p.add_argument("--log-every", type=int_arg(1, MAX_STEPS), default=10, help="log interval in steps")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out "
                                                          "(its saved recipe is used)")
    p.add_argument("--overwrite", action="store_true",
                   help="train from scratch into an --out that already holds a checkpoint, replacing its weights")
    p.add_argument("--eval", type=int_arg(0, 100_000), default=0, metavar="N",
                   help="after training, evaluate on N held-out scenes and write eval.json")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    add_threads_arg(p)
    p.set_defaults(func=run_train)
    return p


def build_config(args, device_type: str):
    from ..train.loop import TrainConfig

    steps, bsz, pool, budget = DEVICE_DEFAULTS["cuda" if device_type == "cuda" else "cpu"]
    if args.time_budget is not None:
        budget = args.time_budget
    if args.steps is not None:
        steps, budget = args.steps, 0.0
    if not budget and steps is None:
        raise InputError("give --steps or --time-budget")
    tc = TrainConfig(preset=args.preset, steps=steps or 0, time_budget=budget or 0.0,
                     batch_size=args.batch_size or bsz, seed=args.seed, save_every=args.save_every,
                     log_every=args.log_every)
    tc.data.pool_size = args.pool_size or pool
    tc.data.seed = args.seed
    if args.lr is not None:
        tc.lr["joint"] = args.lr
    if args.ema is not None:
        tc.ema = args.ema
    if args.stage_fractions:
        try:
            parts = [float(x) for x in args.stage_fractions.split(",")]
            assert len(parts) == 3 and all(math.isfinite(x) and x >= 0 for x in parts) and sum(parts) > 0
        except (ValueError, AssertionError):
            raise InputError("--stage-fractions takes three non-negative numbers, not all 0: vae,align,joint") from None
        tc.stage_fractions = dict(zip(("vae", "align", "joint"), parts))
    if (tc.steps < 1 and tc.time_budget <= 0) or tc.batch_size < 2:
        raise InputError("--steps must be >= 1 and --batch-size >= 2")
    return tc


def run_train(args) -> int:
    from ..errors import require_torch
    from ..runtime.threads import set_torch_threads

    torch = require_torch()
    set_torch_threads(args.threads)
    from ..train.checkpointing import STATE_FILE
    from ..train.loop import train

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"--device must be cpu or cuda[:N], got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda but torch sees no CUDA device (this torch build may be CPU-only)")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"--device must be cpu or cuda, got {device!r}")
    tc = build_config(args, dev.type)
    out = check_out_dir(args.out, "--out")           # a folder that can be written, before any work
    has_run = (out / STATE_FILE).is_file()
    weights = [n for n in CHECKPOINT_FILES if (out / n).exists()]
    if args.resume and not has_run:
        if weights and not args.overwrite:
            raise InputError(f"{out} holds a checkpoint ({weights[0]}) but no training run to resume; pass "
                             f"--overwrite to train from scratch and replace it, or choose another --out")
        print(f"[train] nothing to resume in {out}; starting fresh")
    elif not args.resume and has_run and not args.overwrite:
        raise InputError(f"{out} already holds a training run; pass --resume to continue it, --overwrite to replace "
                         f"it, or choose another --out")
    elif not args.resume and weights and not args.overwrite:
        raise InputError(f"{out} already holds a checkpoint ({weights[0]}); pass --overwrite to replace its weights "
                         f"or choose another --out")
    summary = train(tc, out, device=device, resume=args.resume, progress=not args.no_progress)
    print(f"[train] done: {json.dumps(summary)}")
    print(f"[train] checkpoint: {out} (loss curves: {out / 'loss.csv'}, {out / 'loss.png'})")
    if args.eval:
        from ..eval.evaluate import evaluate, format_table
        from ..runtime.pipeline import Pipeline

        pipe = Pipeline.from_pretrained(out, device=device)
        res = evaluate(pipe, n=args.eval, seed=0)
        write_json(out / "eval.json", res)
        print(format_table(res))
    return 0


def main(argv=None) -> int:
    """Standalone entry point: the same as `cheers-deploy train ...` (one-line errors, --debug)."""
    import sys

    from .main import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
