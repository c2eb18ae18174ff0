"""The Cheers pipeline inside Triton's Python backend: `GenerateModel` (cheers_generate) and `ChatModel`
(cheers_chat, decoupled). REPO/<model>/1/model.py imports one of them as `TritonPythonModel`.

Each model instance is one Triton stub process holding one Pipeline (`Pipeline.from_workdir`, created in
initialize()), and Triton hands it one request at a time (the pipeline is not thread-safe; more throughput = more
instances, docs/deploy-triton.md). The instance's device comes from Triton: KIND_CPU runs onnxruntime on the CPU
with `threads` threads (default: the physical cores divided by the model's CPU instances); KIND_GPU runs the `ort`
backend on CUDAExecutionProvider(device_id) or the `trt` backend on that GPU.

A bad input is answered with an INVALID_ARG error holding the pipeline's one-line message; anything unexpected is
logged with its traceback and answered "internal error" (no traceback leaves the server).

`triton_python_backend_utils` exists only inside the stub: it is imported in initialize() (tests pass a fake).
"""

from __future__ import annotations

import json
import math
import traceback
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from ..constants import VERSION
from ..errors import CheersError, InputError
from ..fileio import parse_json

MAX_IMAGE_PIXELS = 4096 * 4096            # as `cheers-deploy serve`: larger inputs are refused before any work
MAX_MESSAGES_BYTES = 1 << 20


class NumpyInteropError(CheersError):
    """The Python backend's compiled stub converts tensors wrongly with the numpy installed."""


def check_numpy_interop(pb_utils) -> None:
    """Triton's Python backend stub (2.51 and the releases around it) is built with pybind11's numpy support for
    the numpy 1.x ABI: under numpy 2 it hands the model wrong values without an error (measured: every element read
    as the first one) and crashes on strings. Round-trip a small tensor through the stub's own memory (a DLPack
    copy, the path request tensors take) and refuse to start on a mismatch."""
    probe = np.array([1.5, -2.25, 3.0], np.float32)
    ids = np.array([2 ** 40, -7], np.int64)

    def through_stub(name, array):
        return pb_utils.Tensor.from_dlpack(name, pb_utils.Tensor(name, array)).as_numpy()

    try:
        back = through_stub("probe", probe)
        back_ids = through_stub("probe_ids", ids)
        ok = np.array_equal(np.asarray(back), probe) and np.array_equal(np.asarray(back_ids), ids)
    except Exception as exc:  # noqa: BLE001 - any failure here means the same thing
        ok, back = False, f"{type(exc).__name__}: {exc}"
    if not ok:
        raise NumpyInteropError(
            f"this Triton Python backend converts tensors wrongly with numpy {np.__version__} (sent {probe.tolist()},"
            f" read {np.asarray(back).tolist() if isinstance(back, np.ndarray) else back}): its stub was built for "
            f"numpy 1.x; install numpy<2 for the backend's Python (pip install 'numpy<2'), docs/deploy-triton.md")


def _one_line(exc) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def model_parameters(model_config: dict) -> Dict[str, str]:
    return {k: (v or {}).get("string_value", "") for k, v in (model_config.get("parameters") or {}).items()}


def cpu_instances(model_config: dict) -> int:
    return sum(int(g.get("count", 1) or 1) for g in (model_config.get("instance_group") or [])
               if g.get("kind", "KIND_CPU") == "KIND_CPU") or 1


def resolve_workdir(args: dict, workdir_param: str) -> Path:
    """The `workdir` parameter: absolute as written (a reference), else relative to the model's version folder
    (REPO/<model>/<version>/workdir, the copy)."""
    if not workdir_param:
        raise InputError("config.pbtxt: parameter 'workdir' is missing")
    p = Path(workdir_param)
    if p.is_absolute():
        return p
    return Path(args["model_repository"]) / str(args.get("model_version") or "1") / p


def pipeline_arguments(args: dict, model_config: dict, log=None) -> Tuple[Path, str, Optional[str], dict]:
    """(workdir, backend, precision, keyword arguments) of this instance's Pipeline.from_workdir, on the device
    Triton gave it: KIND_GPU asks onnxruntime for CUDAExecutionProvider(device_id) or runs TensorRT on that GPU."""
    from ..runtime.threads import physical_cores

    params = model_parameters(model_config)
    workdir = resolve_workdir(args, params.get("workdir", ""))
    backend = params.get("backend") or "ort"
    precision = params.get("precision") or None
    kind = str(args.get("model_instance_kind", "CPU")).upper()
    device = int(args.get("model_instance_device_id", 0) or 0)
    kw = {}
    if backend == "trt":
        if kind != "GPU":
            raise InputError("the trt backend needs instance_group kind KIND_GPU")
        kw["device"] = device
    elif kind == "GPU":
        kw["providers"] = [("CUDAExecutionProvider", {"device_id": device}), "CPUExecutionProvider"]
    if backend == "ort":
        threads = params.get("threads") or ""
        kw["threads"] = int(threads) if threads else max(1, physical_cores() // cpu_instances(model_config))
    wanted = params.get("cheers_deploy_version")
    if wanted and wanted != VERSION and log is not None:
        log(f"this repository was written by cheers-deploy {wanted}; the installed package is {VERSION}")
    return workdir, backend, precision, kw


def load_pipeline(args: dict, model_config: dict, log=None):
    """One Pipeline for this instance, on the device Triton gave it."""
    from ..runtime.pipeline import Pipeline

    workdir, backend, precision, kw = pipeline_arguments(args, model_config, log)
    return Pipeline.from_workdir(workdir, backend=backend, precision=precision, timings=False, **kw)


# ------------------------------------------------------------------------------------------------ reading inputs
class Inputs:
    """The named input tensors of one request, checked one by one (InputError with the input's name)."""

    def __init__(self, pb_utils, request):
        self.pb, self.request = pb_utils, request

    def array(self, name: str) -> Optional[np.ndarray]:
        t = self.pb.get_input_tensor_by_name(self.request, name)
        return None if t is None else np.asarray(t.as_numpy())

    def scalar(self, name: str):
        a = self.array(name)
        if a is None:
            return None
        if a.size != 1:
            raise InputError(f"input '{name}' must hold one value, got shape {list(a.shape)}")
        return a.reshape(-1)[0]

    def text(self, name: str, required: bool = False) -> Optional[str]:
        v = self.scalar(name)
        if v is None:
            if required:
                raise InputError(f"input '{name}' is required")
            return None
        if isinstance(v, (bytes, np.bytes_)):
            try:
                return bytes(v).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"input '{name}' is not valid UTF-8 (byte {exc.start})") from None
        if isinstance(v, str):
            return v
        raise InputError(f"input '{name}' must be a string (BYTES)")

    def integer(self, name: str) -> Optional[int]:
        v = self.scalar(name)
        if v is None:
            return None
        if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)):
            raise InputError(f"input '{name}' must be an integer")
        return int(v)

    def number(self, name: str) -> Optional[float]:
        v = self.scalar(name)
        if v is None:
            return None
        if not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, (bool, np.bool_)):
            raise InputError(f"input '{name}' must be a number")
        v = float(v)
        if not math.isfinite(v):
            raise InputError(f"input '{name}' must be finite, got {v}")
        return v

    def image(self, name: str) -> Optional[np.ndarray]:
        a = self.array(name)
        if a is None:
            return None
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 or min(a.shape[:2]) < 1:
            raise InputError(f"input '{name}' must be uint8 RGB pixels of shape [H, W, 3], got {a.dtype} "
                             f"{list(a.shape)}")
        if a.shape[0] * a.shape[1] > MAX_IMAGE_PIXELS:
            raise InputError(f"input '{name}' has {a.shape[0]}x{a.shape[1]} pixels, more than {MAX_IMAGE_PIXELS}")
        return np.ascontiguousarray(a)


def settings(inputs: Inputs, names) -> dict:
    """The optional settings a request sent (left out: the pipeline's defaults, as a direct call)."""
    kinds = {"seed": "integer", "steps": "integer", "max_new_tokens": "integer", "cfg_scale": "number",
             "alpha": "number", "temperature": "number", "top_p": "number"}
    kw = {n: getattr(inputs, kinds[n])(n) for n in names}
    return {k: v for k, v in kw.items() if v is not None}


def last_user_text(raw: str) -> str:
    """`messages` (OpenAI-style JSON): the last message must be the user's; its text parts joined with newlines
    (what `cheers-deploy serve` sends to the model). Earlier turns are checked for form and not used: a Cheers
    pipeline takes one user turn. Images go in the `image` input."""
    if len(raw.encode("utf-8")) > MAX_MESSAGES_BYTES:
        raise InputError(f"input 'messages' is larger than {MAX_MESSAGES_BYTES} bytes")
    try:
        msgs = parse_json(raw.encode("utf-8"), "input 'messages'", kind=list)
    except CheersError as exc:
        raise InputError(str(exc)) from None
    if not msgs:
        raise InputError("input 'messages' is an empty list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InputError(f"messages.{i}: must be an object with a 'role'")
    last = msgs[-1]
    if last["role"] != "user":
        raise InputError(f"messages.{len(msgs) - 1}.role: the last message must be the user's, got '{last['role']}'")
    content = last.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InputError(f"messages.{len(msgs) - 1}.content: must be a string or a list of parts")
    texts = []
    for j, part in enumerate(content):
        where = f"messages.{len(msgs) - 1}.content.{j}"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            raise InputError(f"{where}: send the image as the 'image' input (uint8 [H, W, 3])")
        else:
            raise InputError(f"{where}: only text parts are read here")
    return "\n".join(texts)


def _strings(*values: str) -> np.ndarray:
    return np.array([v.encode("utf-8") for v in values], dtype=np.object_)


# ------------------------------------------------------------------------------------------------ the models
class _PipelineModel:
    """initialize(): the numpy check, then one Pipeline for this instance. finalize(): close its backend."""

    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.setup(pb_utils, args)

    def setup(self, pb_utils, args) -> None:
        self.pb = pb_utils
        self.name = args.get("model_name", "?")
        self.instance = args.get("model_instance_name", "?")
        check_numpy_interop(pb_utils)
        self.model_config = json.loads(args["model_config"])
        self.pipe = load_pipeline(args, self.model_config, log=self._warn)

    def _logger(self):
        return getattr(self.pb, "Logger", None)

    def _warn(self, msg: str) -> None:
        lg = self._logger()
        if lg is not None:
            lg.log_warn(f"{self.instance}: {msg}")

    def _error(self, exc: BaseException):
        """The TritonError a failed request gets: the one-line message of a CheersError (INVALID_ARG), else
        'internal error' (the traceback goes to the server log)."""
        err = self.pb.TritonError
        if isinstance(exc, CheersError):
            code = getattr(err, "INVALID_ARG", None)
            return err(_one_line(exc), code) if code is not None else err(_one_line(exc))
        lg = self._logger()
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        if lg is not None:
            lg.log_error(f"{self.instance}: {text}")
        code = getattr(err, "INTERNAL", None)
        msg = f"internal error: {type(exc).__name__} (see the server log)"
        return err(msg, code) if code is not None else err(msg)

    def finalize(self):
        pipe = getattr(self, "pipe", None)
        if pipe is not None:
            close = getattr(pipe.backend, "close", None)
            if close is not None:
                close()
            self.pipe = None


class _Cancelled(Exception):
    pass


class GenerateModel(_PipelineModel):
    """cheers_generate: prompt (+ seed, steps, cfg_scale, alpha) -> image, text, stop_reason."""

    def execute(self, requests):
        pb = self.pb
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except _Cancelled:
                responses.append(pb.InferenceResponse(error=pb.TritonError("cancelled")))
            except Exception as exc:  # noqa: BLE001 - every failure becomes this request's error response
                responses.append(pb.InferenceResponse(error=self._error(exc)))
        return responses

    def _one(self, request):
        pb = self.pb
        inputs = Inputs(pb, request)
        prompt = inputs.text("prompt", required=True)
        kw = settings(inputs, ("seed", "steps", "cfg_scale", "alpha"))
        is_cancelled = getattr(request, "is_cancelled", None)

        def progress(step, steps):                  # stop at the next Euler step when the client went away
            if is_cancelled is not None and is_cancelled():
                raise _Cancelled()

        out = self.pipe.generate(prompt, progress=progress, **kw)
        if out.image is None:
            raise InputError(f"the model produced no image ({self.pipe.describe_stop(out.stop_reason)})")
        return pb.InferenceResponse(output_tensors=[
            pb.Tensor("image", np.ascontiguousarray(out.image, dtype=np.uint8)),
            pb.Tensor("text", _strings(out.text)),
            pb.Tensor("stop_reason", _strings(out.stop_reason))])


class ChatModel(_PipelineModel):
    """cheers_chat (decoupled): prompt or messages, optional image (+ seed, max_new_tokens, temperature, top_p) ->
    one response per text delta (`text`), then a final one with `stop_reason` and `completion_tokens`. The deltas
    are Pipeline.stream_answer / stream_chat's: they concatenate to the answer's text."""

    def execute(self, requests):
        pb = self.pb
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._stream(request, sender, final)
            except Exception as exc:  # noqa: BLE001 - every failure becomes this request's error response
                sender.send(pb.InferenceResponse(error=self._error(exc)), flags=final)
        # decoupled: every response went through the request's sender, so execute returns None

    def _stream(self, request, sender, final):
        pb = self.pb
        inputs = Inputs(pb, request)
        prompt, messages = inputs.text("prompt"), inputs.text("messages")
        if (prompt is None) == (messages is None):
            raise InputError("send exactly one of the inputs 'prompt' and 'messages'")
        text = prompt if prompt is not None else last_user_text(messages)
        image = inputs.image("image")
        kw = settings(inputs, ("seed", "max_new_tokens", "temperature", "top_p"))
        if image is None and not text.strip():
            raise InputError("the prompt is empty (and there is no image)")
        gen = self.pipe.stream_answer(image, text, **kw) if image is not None else self.pipe.stream_chat(text, **kw)
        cancelled = getattr(sender, "is_cancelled", lambda: False)
        out = None
        try:
            while True:
                try:
                    delta = next(gen)
                except StopIteration as stop:
                    out = stop.value
                    break
                if cancelled():
                    break
                sender.send(pb.InferenceResponse(output_tensors=[pb.Tensor("text", _strings(delta))]))
        finally:
            gen.close()                             # cancels the run at the next token if it is still going
        if out is None:                             # the client cancelled: end the stream with no more output
            sender.send(flags=final)
            return
        sender.send(pb.InferenceResponse(output_tensors=[
            pb.Tensor("text", _strings("")),
            pb.Tensor("stop_reason", _strings(out.stop_reason)),
            pb.Tensor("completion_tokens", np.array([len(out.token_ids)], np.int32))]), flags=final)
