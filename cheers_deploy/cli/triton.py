"""`cheers-deploy triton` (registered by cheers_deploy/cli/main.py through `add_triton_args`): write a Triton Inference
Server model repository for an exported workdir (docs/deploy-triton.md). Triton does the scale-out; this command only
writes files (no Triton, GPU or network needed to run it).

    cheers-deploy triton --out repo                                   # the bundled model, 1 CPU instance per model
    cheers-deploy triton --workdir work/official --backend trt --kind gpu --gpus 0,1 --instances 2 --out /models
"""

from __future__ import annotations

import argparse
import re

from ..errors import CheckpointError
from .common import check_out_dir, int_arg


def _gpu_list(text: str):
    t = str(text).strip()
    if not re.fullmatch(r"\d{1,4}(\s*,\s*\d{1,4})*", t):
        raise argparse.ArgumentTypeError(f"must be a comma-separated list of GPU ids such as 0,1, got {text}")
    return [int(x) for x in t.split(",")]


_gpu_list.__name__ = "GPU list"


def _seconds(text: str) -> float:
    try:
        v = float(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text}") from None
    if not 0 <= v <= 86400:
        raise argparse.ArgumentTypeError(f"must be in 0..86400 seconds, got {text}")
    return v


_seconds.__name__ = "seconds"

EPILOG = """Layout: REPO/cheers_generate and REPO/cheers_chat, each with config.pbtxt, warmup/, 1/model.py and
1/workdir (a copy of the workdir; the second model's files are hard links to the first's where the file system
allows). Run it: tritonserver --model-repository=REPO (the cheers-deploy package installed in Triton's Python, with
numpy<2 for Triton <= 24.xx). See docs/deploy-triton.md."""


def add_triton_args(sub) -> None:
    p = sub.add_parser("triton", help="write a Triton Inference Server model repository (Python backend models)",
                       description="Write a Triton Inference Server model repository for an exported workdir: "
                                   "cheers_generate (prompt -> image) and cheers_chat (messages or prompt, optional "
                                   "image -> streamed text), both running the cheers-deploy pipeline in Triton's "
                                   "Python backend, one pipeline per model instance. Without --workdir the bundled "
                                   "model's shipped graphs are used.",
                       epilog=EPILOG)
    p.add_argument("--workdir", metavar="DIR", default=None,
                   help="exported workdir (cheers-deploy export / build) (default: the bundled model's graphs)")
    p.add_argument("--out", required=True, metavar="REPO", help="the model repository folder to write")
    p.add_argument("--backend", choices=["ort", "trt"], default="ort",
                   help="what each instance runs: onnxruntime graphs or TensorRT engines")
    p.add_argument("--kind", choices=["cpu", "gpu"], default=None,
                   help="instance_group kind: KIND_CPU or KIND_GPU (default: gpu for --backend trt, else cpu)")
    p.add_argument("--instances", type=int_arg(1, 64), default=1, metavar="N",
                   help="model instances (pipelines) per model; with --kind gpu, per GPU")
    p.add_argument("--gpus", type=_gpu_list, default=None, metavar="LIST",
                   help="with --kind gpu: GPU ids for the instances, e.g. 0,1 (default: every GPU Triton sees)")
    p.add_argument("--precision", default=None, metavar="P",
                   help="which graphs/engines the instances run: fp32, fp16, bf16, int8, mixed (default: the "
                        "backend's own choice)")
    p.add_argument("--threads", type=int_arg(1, 4096), default=None, metavar="N",
                   help="CPU threads per instance (default: decided by each instance: the physical cores divided by "
                        "the model's CPU instances)")
    p.add_argument("--max-queue", type=int_arg(0, 1 << 20), default=16, metavar="N",
                   help="requests that may wait per model; more are refused at once (0: unbounded)")
    p.add_argument("--queue-timeout", type=_seconds, default=0.0, metavar="S",
                   help="seconds a request may wait in the queue before it is refused (0: no limit; clients may "
                        "send their own timeout)")
    p.add_argument("--reference", action="store_true",
                   help="write the workdir's absolute path into the configs instead of copying it (the repository "
                        "is then not self-contained)")
    p.add_argument("--no-warmup", action="store_true", help="leave model_warmup out of the configs")
    p.add_argument("--native-graphs", action="store_true",
                   help="also write the stateless graphs (vae_encoder, vision_tokenizer, cfm_head, vae_decoder) as "
                        "onnxruntime-backend models with dynamic batching (UNVERIFIED: checked for form only)")
    p.add_argument("--max-batch", type=int_arg(1, 4096), default=None, metavar="B",
                   help="with --native-graphs: their max_batch_size (default 8). The pipeline models take no "
                        "batches (max_batch_size 0: a request is a whole pipeline run with its own KV cache)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out, replacing the cheers models in it (other models are kept)")
    p.set_defaults(func=cmd_triton)


def cmd_triton(args) -> int:
    from ..hub import bundled_workdir
    from ..triton.repository import RepositoryOptions, write_repository

    workdir = args.workdir
    if workdir is None:
        workdir = bundled_workdir()
        if workdir is None:
            raise CheckpointError("no --workdir given and the bundled model's graphs are not installed")
    out = check_out_dir(args.out)
    opts = RepositoryOptions(backend=args.backend, kind=args.kind, instances=args.instances, gpus=args.gpus,
                             precision=args.precision, threads=args.threads, max_queue=args.max_queue,
                             queue_timeout_s=args.queue_timeout, reference=args.reference, warmup=not args.no_warmup,
                             native_graphs=args.native_graphs, max_batch=args.max_batch)
    write_repository(workdir, out, opts, overwrite=args.overwrite, log=print)
    print(f"run it: tritonserver --model-repository={out}   (docs/deploy-triton.md)")
    return 0
