"""Write a Triton model repository for an exported workdir (`cheers-deploy triton`, docs/deploy-triton.md).

Two Python-backend models run the same Pipeline as every other entry point (`Pipeline.from_workdir`, one pipeline per
model instance): `cheers_generate` (prompt + settings -> image) and `cheers_chat` (messages or prompt, optional image
-> text, decoupled so that every text delta is its own response).

Every file is written through cheers_deploy.fileio (temporary file, fsync, rename). The models are first built in a
staging folder inside REPO and then renamed into place one by one, so a model folder is never half written; with
--overwrite only the folders of the models written here are replaced (other models in REPO are kept).
"""

from __future__ import annotations

import datetime
import os
import shutil
import stat
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..constants import MANIFEST_NAME, PRECISIONS, STATELESS_GRAPHS, VERSION
from ..errors import CheckpointError, InputError
from ..fileio import atomic_path, atomic_write_bytes, atomic_write_text, contained, sha256_file, write_json
from ..manifest import Manifest

GENERATE_MODEL = "cheers_generate"
CHAT_MODEL = "cheers_chat"
MODELS = (GENERATE_MODEL, CHAT_MODEL)
MODEL_VERSION = "1"
WORKDIR_FOLDER = "workdir"                # REPO/<model>/1/workdir: the copy of the workdir
REPOSITORY_FILE = "cheers_repository.json"
BACKENDS = ("ort", "trt")
KINDS = ("cpu", "gpu")
MAX_INSTANCES = 64
WARMUP_PROMPT = "a red circle on the left"
WARMUP_STEPS = 2                          # warm-up runs every graph once; two Euler steps are enough
WARMUP_TOKENS = 2
# not copied from a workdir: calibration activations (only `calibrate` reads them) and hidden files (locks, the
# temporary files of an interrupted write)
SKIP_TOP = ("calib",)
# stateless graphs that can also be written as native onnxruntime-backend models (--native-graphs; unverified here)
NATIVE_GRAPHS = STATELESS_GRAPHS
NATIVE_PREFIX = "cheers_"
DEFAULT_MAX_BATCH = 8


@dataclass
class RepositoryOptions:
    """What `cheers-deploy triton` writes. kind None: gpu for the trt backend, else cpu. instances: Triton's
    instance_group count (per listed GPU with kind gpu). gpus: GPU ids for KIND_GPU (None: every GPU Triton sees).
    threads: CPU threads per instance (None: decided in each instance, the physical cores divided by the CPU
    instances of the model). max_queue: requests that may wait per model (0: unbounded); queue_timeout_s: seconds a
    request may wait in the queue (0: no limit; a client may set its own). reference: write the workdir's absolute
    path instead of copying it."""
    backend: str = "ort"
    kind: Optional[str] = None
    instances: int = 1
    gpus: Optional[Sequence[int]] = None
    precision: Optional[str] = None
    threads: Optional[int] = None
    max_queue: int = 16
    queue_timeout_s: float = 0.0
    reference: bool = False
    warmup: bool = True
    models: Sequence[str] = field(default_factory=lambda: list(MODELS))
    native_graphs: bool = False
    max_batch: Optional[int] = None

    def checked(self) -> "RepositoryOptions":
        if self.backend not in BACKENDS:
            raise InputError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        kind = self.kind or ("gpu" if self.backend == "trt" else "cpu")
        if kind not in KINDS:
            raise InputError(f"--kind must be cpu or gpu, got {kind!r}")
        if self.backend == "trt" and kind != "gpu":
            raise InputError("--backend trt runs TensorRT engines on a GPU: use --kind gpu")
        if isinstance(self.instances, bool) or not isinstance(self.instances, int) \
                or not 1 <= self.instances <= MAX_INSTANCES:
            raise InputError(f"--instances must be an integer in 1..{MAX_INSTANCES}, got {self.instances!r}")
        gpus = None
        if self.gpus is not None:
            if kind != "gpu":
                raise InputError("--gpus applies to --kind gpu")
            gpus = [int(g) for g in self.gpus]
            if not gpus or any(g < 0 or g > 1023 for g in gpus) or len(set(gpus)) != len(gpus):
                raise InputError(f"--gpus must list distinct GPU ids (0, 1, ...), got {list(self.gpus)}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or not 1 <= self.threads <= 4096):
            raise InputError(f"--threads must be an integer in 1..4096, got {self.threads!r}")
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int) \
                or not 0 <= self.max_queue <= 1 << 20:
            raise InputError(f"--max-queue must be an integer in 0..{1 << 20}, got {self.max_queue!r}")
        if not 0 <= float(self.queue_timeout_s) <= 86400:
            raise InputError(f"--queue-timeout must be in 0..86400 seconds, got {self.queue_timeout_s!r}")
        models = list(self.models)
        if not models or any(m not in MODELS for m in models) or len(set(models)) != len(models):
            raise InputError(f"models must be distinct names among {', '.join(MODELS)}, got {models}")
        max_batch = self.max_batch
        if max_batch is not None and not self.native_graphs:
            raise InputError("--max-batch applies to --native-graphs (the Python models take one request per "
                             "pipeline run: max_batch_size 0)")
        if self.native_graphs:
            if self.backend != "ort":
                raise InputError("--native-graphs writes onnxruntime-backend models: use --backend ort")
            max_batch = DEFAULT_MAX_BATCH if max_batch is None else max_batch
            if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= 4096:
                raise InputError(f"--max-batch must be an integer in 1..4096, got {max_batch!r}")
        return RepositoryOptions(self.backend, kind, self.instances, gpus, self.precision, self.threads,
                                 self.max_queue, float(self.queue_timeout_s), bool(self.reference), bool(self.warmup),
                                 models, bool(self.native_graphs), max_batch)


# ------------------------------------------------------------------------------------------------ config.pbtxt text
def _q(text: str) -> str:
    """A protobuf text-format string literal."""
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _tensor(name: str, dtype: str, dims: Sequence[int], optional: bool = False) -> str:
    opt = " optional: true" if optional else ""
    return f"  {{ name: {_q(name)} data_type: {dtype} dims: [ {', '.join(str(int(d)) for d in dims)} ]{opt} }}"


def _tensors(key: str, items: Sequence[str]) -> str:
    return f"{key} [\n" + ",\n".join(items) + "\n]\n"


# inputs: (name, Triton type, dims, optional, what). Settings left out take the model's generation defaults, exactly
# as a Pipeline call that leaves them out. Floats are FP64 so that a value reaches the pipeline as the same Python
# float a direct call gets (0.1 in FP32 is another number).
GENERATE_INPUTS = (
    ("prompt", "TYPE_STRING", [1], False, "what to draw (UTF-8)"),
    ("seed", "TYPE_INT64", [1], True, "0..2^32-1, default 0 (as Pipeline.generate)"),
    ("steps", "TYPE_INT32", [1], True, "Euler steps"),
    ("cfg_scale", "TYPE_FP64", [1], True, "classifier-free guidance, 1 = off"),
    ("alpha", "TYPE_FP64", [1], True, "time shift"),
)
GENERATE_OUTPUTS = (
    ("image", "TYPE_UINT8", [-1, -1, 3], "RGB pixels, exactly Pipeline.generate(...).image"),
    ("text", "TYPE_STRING", [1], "text decoded after the image (usually empty)"),
    ("stop_reason", "TYPE_STRING", [1], "Pipeline.STOP_REASONS key"),
)
CHAT_INPUTS = (
    ("prompt", "TYPE_STRING", [1], True, "the user's text (give prompt or messages)"),
    ("messages", "TYPE_STRING", [1], True, "OpenAI-style JSON list; the last message is the user's and is used"),
    ("image", "TYPE_UINT8", [-1, -1, 3], True, "RGB pixels: answer a question about this image"),
    ("seed", "TYPE_INT64", [1], True, "0..2^32-1, default 0"),
    ("max_new_tokens", "TYPE_INT32", [1], True, "token budget"),
    ("temperature", "TYPE_FP64", [1], True, "0 = greedy"),
    ("top_p", "TYPE_FP64", [1], True, "nucleus sampling threshold"),
)
CHAT_OUTPUTS = (
    ("text", "TYPE_STRING", [1], "a text delta; all deltas concatenate to Pipeline.answer/chat(...).text"),
    ("stop_reason", "TYPE_STRING", [1], "final response only"),
    ("completion_tokens", "TYPE_INT32", [1], "final response only: tokens sampled"),
)


def _parameters(params: Dict[str, str]) -> str:
    items = [f"  {{ key: {_q(k)} value: {{ string_value: {_q(v)} }} }}" for k, v in params.items()]
    return "parameters [\n" + ",\n".join(items) + "\n]\n"


def _instance_group(opts: RepositoryOptions) -> str:
    if opts.kind == "gpu":
        gpus = f" gpus: [ {', '.join(str(g) for g in opts.gpus)} ]" if opts.gpus else ""
        return f"instance_group [ {{ count: {opts.instances} kind: KIND_GPU{gpus} }} ]\n"
    return f"instance_group [ {{ count: {opts.instances} kind: KIND_CPU }} ]\n"


BATCHING_NOTE = """\
# No batching across requests (max_batch_size 0). One request is one whole pipeline call: its own KV cache,
# Python control flow per token and per Euler step, a prompt length and a stop of its own; the graphs' batch axis
# already carries the two classifier-free-guidance branches. Stacking independent requests would need a batched
# scheduler the pipeline does not have, so throughput comes from more instances (instance_group), not batches.
# The dynamic batcher below only queues: FIFO, bounded (max_queue_size: more get "Exceeds maximum queue size" at
# once), no waiting for a batch to fill (max_queue_delay_microseconds: 0).
"""


def _queue(opts: RepositoryOptions) -> str:
    policy = [f"max_queue_size: {opts.max_queue}"] if opts.max_queue else []
    policy.append(f"default_timeout_microseconds: {round(opts.queue_timeout_s * 1e6)}")
    policy += ["timeout_action: REJECT", "allow_timeout_override: true"]
    return ("dynamic_batching {\n  max_queue_delay_microseconds: 0\n"
            f"  default_queue_policy {{ {' '.join(policy)} }}\n}}\n")


def _warmup(name: str, inputs: Sequence[Tuple[str, str, Sequence[int], str]]) -> str:
    """inputs: (input, Triton type, dims, 'file:NAME' or 'zero')."""
    lines = []
    for key, dtype, dims, data in inputs:
        src = f"input_data_file: {_q(data[5:])}" if data.startswith("file:") else "zero_data: true"
        lines.append(f"    inputs {{ key: {_q(key)} value: {{ data_type: {dtype} dims: [ "
                     f"{', '.join(str(int(d)) for d in dims)} ] {src} }} }}")
    return (f"model_warmup [ {{\n  name: {_q(name)} batch_size: 1 count: 1\n" + "\n".join(lines) + "\n} ]\n")


def _header(model: str, what: str) -> str:
    return (f"# Generated by cheers-deploy {VERSION} (`cheers-deploy triton`, docs/deploy-triton.md).\n"
            f"# {model}: {what}\n"
            f"# The code is cheers_deploy.triton.python_model, run by Triton's Python backend "
            f"({MODEL_VERSION}/model.py);\n# one Pipeline per model instance, created in initialize().\n")


def _io_comments(rows) -> str:
    return "".join(f"#   {r[0]}: {r[-1]}\n" for r in rows)


def model_parameters(opts: RepositoryOptions, workdir_param: str) -> Dict[str, str]:
    """The `parameters` the model reads in initialize() (strings, as Triton has them)."""
    return {"workdir": workdir_param, "backend": opts.backend, "precision": opts.precision or "",
            "threads": str(opts.threads) if opts.threads else "", "cheers_deploy_version": VERSION}


def generate_config(opts: RepositoryOptions, workdir_param: str, resolution: int) -> str:
    del resolution                                  # the warm-up draws an image of the model's own size
    text = _header(GENERATE_MODEL, "text to image.")
    text += "# inputs (optional ones take the model's generation defaults):\n" + _io_comments(GENERATE_INPUTS)
    text += "# outputs:\n" + _io_comments(GENERATE_OUTPUTS)
    text += f'name: "{GENERATE_MODEL}"\nbackend: "python"\n'
    text += BATCHING_NOTE + "max_batch_size: 0\n"
    text += _tensors("input", [_tensor(n, t, d, o) for n, t, d, o, _ in GENERATE_INPUTS])
    text += _tensors("output", [_tensor(n, t, d) for n, t, d, _ in GENERATE_OUTPUTS])
    text += _instance_group(opts) + _queue(opts)
    text += ("# No response cache: every request runs the model (a cached image would only serve a repeat of the same\n"
             "# prompt, settings and seed, and costs the image's size in memory).\nresponse_cache { enable: false }\n")
    text += _parameters(model_parameters(opts, workdir_param))
    if opts.warmup:
        text += "# Each instance runs one short generation before it reports ready (every graph runs once).\n"
        text += _warmup("generate", [("prompt", "TYPE_STRING", [1], "file:prompt"),
                                     ("steps", "TYPE_INT32", [1], "file:steps")])
    return text


def chat_config(opts: RepositoryOptions, workdir_param: str, resolution: int) -> str:
    text = _header(CHAT_MODEL, "chat and image understanding, streamed.")
    text += "# inputs (prompt or messages; optional settings take the model's generation defaults):\n"
    text += _io_comments(CHAT_INPUTS)
    text += "# outputs (one response per text delta; the last one carries the FINAL flag):\n"
    text += _io_comments(CHAT_OUTPUTS)
    text += f'name: "{CHAT_MODEL}"\nbackend: "python"\n'
    text += "# Decoupled: a request gets any number of responses (gRPC stream, or HTTP POST .../generate_stream).\n"
    text += "model_transaction_policy { decoupled: true }\n"
    text += BATCHING_NOTE + "max_batch_size: 0\n"
    text += _tensors("input", [_tensor(n, t, d, o) for n, t, d, o, _ in CHAT_INPUTS])
    text += _tensors("output", [_tensor(n, t, d) for n, t, d, _ in CHAT_OUTPUTS])
    text += _instance_group(opts) + _queue(opts)
    text += "# Streamed answers are not cached.\nresponse_cache { enable: false }\n"
    text += _parameters(model_parameters(opts, workdir_param))
    if opts.warmup:
        text += "# Each instance answers one short question about a black image before it reports ready.\n"
        text += _warmup("answer", [("prompt", "TYPE_STRING", [1], "file:prompt"),
                                   ("image", "TYPE_UINT8", [resolution, resolution, 3], "zero"),
                                   ("max_new_tokens", "TYPE_INT32", [1], "file:max_new_tokens")])
    return text


# ONNX TensorProto element types -> Triton data types
ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16", 11: "TYPE_FP64", 7: "TYPE_INT64",
                  6: "TYPE_INT32", 9: "TYPE_BOOL", 2: "TYPE_UINT8", 3: "TYPE_INT8"}


def _onnx_io(path: Path):
    """[(kind, name, Triton type, dims without the batch axis)] of an ONNX graph (weights not loaded). Raises
    InputError when a tensor has no symbolic leading batch axis."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    init = {i.name for i in model.graph.initializer}
    rows = []
    for kind, values in (("input", [v for v in model.graph.input if v.name not in init]),
                         ("output", list(model.graph.output))):
        for v in values:
            tt = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
            lead = tt.shape.dim[0] if tt.shape.dim else None
            if lead is None or lead.HasField("dim_value"):
                raise InputError(f"{path.name}: {kind} '{v.name}' has no dynamic batch axis; it cannot be a "
                                 f"batching Triton model")
            if tt.elem_type not in ONNX_TO_TRITON:
                raise InputError(f"{path.name}: {kind} '{v.name}' has ONNX element type {tt.elem_type}, which this "
                                 f"command does not map to a Triton type")
            rows.append((kind, v.name, ONNX_TO_TRITON[tt.elem_type], dims[1:]))
    return rows


def native_config(graph: str, onnx_path: Path, opts: RepositoryOptions) -> str:
    """An onnxruntime-backend model for one stateless graph: batching, a short queue delay. Unverified here."""
    name = NATIVE_PREFIX + graph
    rows = _onnx_io(onnx_path)

    def tensor(n, dtype, dims):
        if not dims:                      # a per-sample scalar ([batch] in the graph): Triton needs dims [1]
            return f"  {{ name: {_q(n)} data_type: {dtype} dims: [ 1 ] reshape: {{ shape: [ ] }} }}"
        return _tensor(n, dtype, dims)

    text = (f"# Generated by cheers-deploy {VERSION} (`cheers-deploy triton --native-graphs`): the exported graph "
            f"'{graph}' as an\n# onnxruntime-backend model. UNVERIFIED: the tritonserver of the tests has only the "
            f"Python backend;\n# this config is checked for form only (docs/deploy-triton.md).\n")
    text += f'name: "{name}"\nplatform: "onnxruntime_onnx"\n'
    text += ("# A stateless graph: independent requests can be stacked along its batch axis, so the dynamic batcher "
             "may wait\n# briefly for more.\n")
    text += f"max_batch_size: {opts.max_batch}\n"
    text += _tensors("input", [tensor(n, d, s) for k, n, d, s in rows if k == "input"])
    text += _tensors("output", [tensor(n, d, s) for k, n, d, s in rows if k == "output"])
    text += _instance_group(opts)
    policy = f" default_queue_policy {{ max_queue_size: {opts.max_queue} }}" if opts.max_queue else ""
    text += f"dynamic_batching {{ max_queue_delay_microseconds: 500{policy} }}\n"
    text += "response_cache { enable: false }\n"
    return text


def model_py(model: str, cls: str) -> str:
    return (f'"""Triton Python backend model `{model}`, written by `cheers-deploy triton` '
            f"(cheers-deploy {VERSION}).\n\n"
            f"The code is cheers_deploy.triton.python_model.{cls}: the cheers-deploy package must be importable by\n"
            f"the Python backend's interpreter (pip install cheers-deploy in the Triton image, docs/deploy-triton.md)."
            f'\nIts settings are the `parameters` of ../config.pbtxt."""\n\n'
            f"from cheers_deploy.triton.python_model import {cls} as TritonPythonModel  # noqa: F401\n")


def serialize_strings(items: Sequence[bytes]) -> bytes:
    """Triton's BYTES tensor layout (warm-up data files): a little-endian uint32 length before each element."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _warmup_files(model: str) -> Dict[str, bytes]:
    if model == GENERATE_MODEL:
        return {"prompt": serialize_strings([WARMUP_PROMPT.encode()]), "steps": struct.pack("<i", WARMUP_STEPS)}
    return {"prompt": serialize_strings([b"what color is the circle?"]),
            "max_new_tokens": struct.pack("<i", WARMUP_TOKENS)}


# ------------------------------------------------------------------------------------------------ copying a workdir
def _skip(rel: Path) -> bool:
    return any(p.startswith(".") for p in rel.parts) or (len(rel.parts) >= 1 and rel.parts[0] in SKIP_TOP)


def workdir_files(workdir: Path) -> List[Tuple[str, Path]]:
    """(relative name, real source file) of every file of the workdir that a copy takes, links followed only while
    they stay inside the workdir (fileio.contained: the same rule as every read of a workdir). Hidden files
    (locks, temporary files) and calib/ are left out. Raises CheckpointError for a link out or a non-regular file."""
    root = Path(workdir)
    out: List[Tuple[str, Path]] = []
    seen = set()
    stack = [Path(".")]
    while stack:
        rel_dir = stack.pop()
        try:
            names = sorted(os.listdir(root / rel_dir))
        except OSError as exc:
            raise CheckpointError(f"workdir {root}: cannot list {rel_dir} ({exc.strerror or exc})") from None
        for name in names:
            rel = rel_dir / name if str(rel_dir) != "." else Path(name)
            if _skip(rel):
                continue
            path = contained(root, rel.as_posix(), f"workdir {root}: {rel.as_posix()}", kind="any")
            real = Path(os.path.realpath(path))
            st = os.stat(real)
            if stat.S_ISDIR(st.st_mode):
                if real in seen:                    # a link back to a folder already copied
                    continue
                seen.add(real)
                stack.append(rel)
            elif stat.S_ISREG(st.st_mode):
                out.append((rel.as_posix(), real))
            else:
                raise CheckpointError(f"workdir {root}: {rel.as_posix()} is not a regular file")
    return sorted(out)


def _copy_file(src: Path, dst: Path, link_from: Optional[Path]) -> str:
    """Copy src to dst atomically; hard-link link_from instead when given and possible. Returns 'link' or 'copy'."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        if link_from is not None:
            try:
                tmp.unlink()
                os.link(link_from, tmp)
                return "link"
            except OSError:
                pass
        shutil.copyfile(src, tmp)
    return "copy"


# ------------------------------------------------------------------------------------------------ the repository
def _is_inside(child: Path, parent: Path) -> bool:
    c, p = os.path.realpath(child), os.path.realpath(parent)
    return c == p or c.startswith(p.rstrip(os.sep) + os.sep)


def check_out(out: Path, workdir: Path, opts: RepositoryOptions, overwrite: bool) -> None:
    """REPO must be a folder (created when missing) that is empty, or --overwrite; it must not lie inside the
    workdir, and the workdir must not lie inside a model folder that --overwrite would replace."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder")
    if _is_inside(out, workdir):
        raise InputError(f"--out {out} lies inside the workdir {workdir}: write the repository elsewhere")
    replaced = list(opts.models) + ([NATIVE_PREFIX + g for g in NATIVE_GRAPHS] if opts.native_graphs else [])
    for m in replaced:
        if _is_inside(workdir, out / m):
            raise InputError(f"the workdir {workdir} lies inside {out / m}, which this command would replace")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"--out {out} is not empty; pass --overwrite to replace the {' and '.join(opts.models)} "
                         f"models in it (other models there are kept)")


def write_repository(workdir, out, options: Optional[RepositoryOptions] = None, overwrite: bool = False,
                     log=None) -> Path:
    """Write the model repository for `workdir` into `out` (see the module docstring); returns `out`. `log(str)`
    gets a line per step. Raises InputError / CheckpointError with one-line messages before writing anything."""
    opts = (options or RepositoryOptions()).checked()
    workdir = Path(workdir).expanduser()
    out = Path(out).expanduser()
    if not workdir.is_dir():
        raise InputError(f"--workdir {workdir}: no such folder")
    man = Manifest.load(workdir)                       # typed and validated; names missing files
    image = man.require("image")
    files = [] if opts.reference else workdir_files(workdir)
    check_out(out, workdir, opts, overwrite)
    say = log or (lambda s: None)
    out.mkdir(parents=True, exist_ok=True)
    # staged inside REPO: the same file system, so every model folder moves into place with one rename
    staging = Path(tempfile.mkdtemp(prefix=".cheers-staging-", dir=str(out)))
    summary = {"format": "cheers-deploy-triton/1", "cheers_deploy_version": VERSION,
               "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
               "workdir": str(workdir.resolve()), "manifest_sha256": sha256_file(workdir / MANIFEST_NAME),
               "workdir_mode": "reference" if opts.reference else "copy",
               "options": {"backend": opts.backend, "kind": opts.kind, "instances": opts.instances,
                           "gpus": opts.gpus, "precision": opts.precision, "threads": opts.threads,
                           "max_queue": opts.max_queue, "queue_timeout_s": opts.queue_timeout_s,
                           "warmup": opts.warmup, "native_graphs": opts.native_graphs,
                           "max_batch": opts.max_batch},
               "models": {}}
    try:
        first_copy: Optional[Path] = None
        for model in opts.models:
            mdir = staging / model
            vdir = mdir / MODEL_VERSION
            vdir.mkdir(parents=True)
            if opts.reference:
                wparam = str(workdir.resolve())
            else:
                wparam = WORKDIR_FOLDER
                links = copies = 0
                nbytes = 0
                for rel, src in files:
                    how = _copy_file(src, vdir / WORKDIR_FOLDER / rel,
                                     first_copy / rel if first_copy is not None else None)
                    links += how == "link"
                    copies += how == "copy"
                    nbytes += src.stat().st_size
                say(f"{model}: workdir {'linked' if links and not copies else 'copied'} "
                    f"({len(files)} files, {nbytes / 2 ** 20:.1f} MiB)")
                first_copy = first_copy or vdir / WORKDIR_FOLDER
            make = generate_config if model == GENERATE_MODEL else chat_config
            atomic_write_text(mdir / "config.pbtxt", make(opts, wparam, image.resolution))
            cls = "GenerateModel" if model == GENERATE_MODEL else "ChatModel"
            atomic_write_text(vdir / "model.py", model_py(model, cls))
            if opts.warmup:
                (mdir / "warmup").mkdir()
                for name, data in _warmup_files(model).items():
                    atomic_write_bytes(mdir / "warmup" / name, data)
            summary["models"][model] = {"config": f"{model}/config.pbtxt", "model": f"{model}/{MODEL_VERSION}/model.py",
                                        "workdir": wparam if opts.reference else
                                        f"{model}/{MODEL_VERSION}/{WORKDIR_FOLDER}"}
        if not opts.reference:
            summary["files"] = len(files)
        written = list(opts.models)
        if opts.native_graphs:
            for graph in NATIVE_GRAPHS:
                src, data = man.graph_files(graph, opts.precision or "fp32")
                if src is None or not src.is_file():
                    raise CheckpointError(f"workdir {workdir}: no {opts.precision or 'fp32'} file for graph '{graph}'")
                name = NATIVE_PREFIX + graph
                vdir = staging / name / MODEL_VERSION
                vdir.mkdir(parents=True)
                for f, target in ((src, "model.onnx"), (data, data.name if data is not None else None)):
                    if f is None:
                        continue
                    rel = os.path.relpath(os.path.realpath(f), os.path.realpath(workdir))
                    link = first_copy / rel if first_copy is not None else None
                    _copy_file(Path(os.path.realpath(f)), vdir / target, link)
                atomic_write_text(staging / name / "config.pbtxt", native_config(graph, src, opts))
                summary["models"][name] = {"config": f"{name}/config.pbtxt", "model": f"{name}/1/model.onnx",
                                           "verified": False}
                written.append(name)
        for model in written:
            target = out / model
            if target.exists() or target.is_symlink():
                os.replace(target, staging / f".old-{model}")
            os.replace(staging / model, target)
            say(f"wrote {target}")
        write_json(out / REPOSITORY_FILE, summary)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
