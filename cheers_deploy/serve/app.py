"""The HTTP application (Starlette): OpenAI-compatible routes in front of the device worker.

    POST /v1/chat/completions     a message with an image -> Pipeline.answer, without -> Pipeline.chat; stream: SSE
    POST /v1/images/generations   Pipeline.generate (b64_json PNG); stream: SSE progress per Euler step
    POST /v1/images/edits         multipart image + prompt -> Pipeline.edit
    GET  /v1/models               the one served model
    GET  /health                  alive (never needs the API key)
    GET  /ready                   200 once loaded and warmed up, 503 before and while draining (no key needed)
    GET  /metrics                 Prometheus text

In front of every route, the gate (gate.py): API key (when set), 503 while loading or draining, the body size limit
and the request metrics. Every failure is an OpenAI error object (errors.py); an unexpected exception is logged with its
traceback and answered with a plain 500 object.
"""

from __future__ import annotations

import logging
import time
from typing import List, Optional, Sequence, Tuple

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..constants import VERSION
from ..tokenizer import IMAGE_PLACEHOLDER
from .errors import APIError, bad_request, internal_error
from .gate import Gate
from .images import decode_image_bytes, load_url, parse_size, png_b64
from .schemas import ChatRequest, EditRequest, ImageRequest, parse_fields, parse_json, sse
from .service import Service, SSEResponse, Waiter, error_response, timeout_error

log = logging.getLogger("cheers_deploy.serve")

KEEPALIVE_S = 15.0                            # an SSE comment this often while nothing else is sent
FINISH = {"end": "stop", "image_start": "stop", "image_done": "stop", "max_new_tokens": "length",
          "context": "length", "max_ids": "length"}


# ------------------------------------------------------------------------------------------------------ chat
def _refuse_chat_options(req: ChatRequest) -> None:
    if req.n not in (None, 1):
        raise bad_request("n must be 1: one completion per request", "n", code="unsupported_value")
    if req.stop not in (None, [], ""):
        raise bad_request("stop sequences are not supported", "stop", code="unsupported_parameter")
    if req.logprobs or req.top_logprobs:
        raise bad_request("logprobs are not supported", "logprobs", code="unsupported_parameter")
    if req.tools or req.functions:
        raise bad_request("tools and functions are not supported", "tools", code="unsupported_parameter")
    if req.logit_bias:
        raise bad_request("logit_bias is not supported", "logit_bias", code="unsupported_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise bad_request(f"{name} is not supported", name, code="unsupported_parameter")
    rf = req.response_format
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise bad_request("response_format: only {\"type\": \"text\"}", "response_format",
                          code="unsupported_parameter")


def last_user_turn(req: ChatRequest) -> Tuple[str, Optional[str]]:
    """(text, image url) of the last message, which must be the user's. Earlier turns and system messages are not
    sent to the model: a Cheers pipeline takes one user turn (answer / chat) under the default system prompt."""
    i = len(req.messages) - 1
    msg = req.messages[i]
    if msg.role != "user":
        raise bad_request(f"the last message must be the user's, got role '{msg.role}'", f"messages.{i}.role")
    if isinstance(msg.content, str):
        return msg.content, None
    if msg.content is None:
        raise bad_request("the last user message has no content", f"messages.{i}.content")
    texts: List[str] = []
    urls: List[Tuple[str, str]] = []
    for j, part in enumerate(msg.content):
        where = f"messages.{i}.content.{j}"
        if part.type == "text":
            if part.text is None:
                raise APIError(422, f"{where}.text: Field required", code="missing_required_parameter",
                               param=f"{where}.text")
            texts.append(part.text)
        elif part.type == "image_url":
            iu = part.image_url
            url = iu if isinstance(iu, str) else (iu.url if iu is not None else None)
            if not url:
                raise APIError(422, f"{where}.image_url: Field required", code="missing_required_parameter",
                               param=f"{where}.image_url")
            urls.append((url, f"{where}.image_url"))
        else:
            raise bad_request(f"content part type '{part.type}' is not supported (text, image_url)", f"{where}.type",
                              code="unsupported_content")
    if len(urls) > 1:
        raise bad_request(f"one image per request, got {len(urls)}", urls[1][1], code="too_many_images")
    return "\n".join(texts), (urls[0] if urls else None)


def prompt_tokens(pipe, ids: Sequence[int], images: int) -> int:
    """Prompt positions: text ids, each image placeholder replaced by the image's tokens (a chat carries the
    dummy image block)."""
    n_ph = sum(1 for i in ids if i == IMAGE_PLACEHOLDER)
    return len(ids) - n_ph + images * pipe.processor.tokens_per_image


async def chat_completions(request: Request):
    svc: Service = request.app.state.service
    cfg = svc.config
    req = parse_json(ChatRequest, await request.body())
    _refuse_chat_options(req)
    text, image_url = last_user_turn(req)
    kw = {"max_new_tokens": req.max_completion_tokens or req.max_tokens, "temperature": req.temperature,
          "top_p": req.top_p}
    kw = {k: v for k, v in kw.items() if v is not None}
    kw["seed"] = req.seed if req.seed is not None else cfg.default_seed
    svc.check_capacity()                         # refuse before decoding an image when the queue is full
    image = None
    if image_url is not None:
        image = await run_in_threadpool(load_url, image_url[0], cfg.max_image_pixels, cfg.max_body_bytes,
                                        cfg.allow_remote_images, image_url[1], cfg.remote_timeout)
    elif not text.strip():
        raise bad_request("the last user message has no text (and no image)", f"messages.{len(req.messages) - 1}"
                                                                              f".content")

    if image is not None:
        def func(pipe, obs):
            out = pipe.answer(image, text, observer=obs, **kw)
            return out, prompt_tokens(pipe, pipe.processor.understanding_ids(text), 1)
    else:
        def func(pipe, obs):
            out = pipe.chat(text, observer=obs, **kw)
            return out, prompt_tokens(pipe, pipe.processor.chat_ids(text), 1)

    job = svc.submit(request, "answer" if image is not None else "chat", func, stream_text=bool(req.stream))
    waiter = Waiter(svc, job, request)
    rid, created, model = f"chatcmpl-{job.id}", int(time.time()), cfg.model_name
    if not req.stream:
        try:
            out, n_prompt = await waiter.result()
        finally:
            waiter.close()
        svc.metrics.prompt_tokens.inc(n_prompt)
        body = {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "system_fingerprint": f"cheers-deploy-{VERSION}",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                             "finish_reason": FINISH.get(out.stop_reason, "stop"), "stop_reason": out.stop_reason,
                             "logprobs": None}],
                "usage": _usage(n_prompt, out)}
        if out.warnings:
            body["warnings"] = list(out.warnings)
        return JSONResponse(body, headers={"X-Request-Id": rid})

    try:
        first = await waiter.first()
    except BaseException:
        waiter.close()
        raise
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(delta, finish=None, stop_reason=None):
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        if stop_reason is not None:
            choice["stop_reason"] = stop_reason
        return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "system_fingerprint": f"cheers-deploy-{VERSION}", "choices": [choice]})

    async def events():
        yield chunk({"role": "assistant", "content": ""})
        kind, value = first
        while True:
            if kind == "delta":
                yield chunk({"content": value})
            elif kind == "done":
                out, n_prompt = value
                svc.metrics.prompt_tokens.inc(n_prompt)
                yield chunk({}, FINISH.get(out.stop_reason, "stop"), out.stop_reason)
                if include_usage:
                    yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                               "choices": [], "usage": _usage(n_prompt, out)})
                yield sse("[DONE]")
                return
            elif kind == "keepalive":
                yield b": keep-alive\n\n"
            elif kind in ("error", "timeout", "cancelled"):
                if kind == "cancelled" and value != "timeout":
                    return                        # the client went away: nobody to tell
                err = value if kind == "error" else timeout_error(cfg.timeout)
                yield sse(err.body())
                return
            kind, value = await waiter.next(keepalive=KEEPALIVE_S)

    return SSEResponse(events(), waiter.close, headers={"X-Request-Id": rid})


def _usage(n_prompt: int, out) -> dict:
    n_out = len(out.token_ids)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}


# ------------------------------------------------------------------------------------------------------ images
def _check_image_request(req, svc: Service) -> None:
    if req.n not in (None, 1):
        raise bad_request("n must be 1: one image per request", "n", code="unsupported_value")
    parse_size(req.size, svc.pipe.processor.resolution)
    if req.response_format not in (None, "b64_json"):
        raise bad_request(f"response_format {req.response_format!r} is not available: this server returns images "
                          f"inline only (b64_json)", "response_format", code="unsupported_value")
    if req.output_format not in (None, "png"):
        raise bad_request(f"output_format {req.output_format!r} is not available (png)", "output_format",
                          code="unsupported_value")


def _image_kw(req, svc: Service) -> dict:
    kw = {"steps": req.steps, "cfg_scale": req.cfg_scale, "alpha": req.alpha}
    kw = {k: v for k, v in kw.items() if v is not None}
    kw["seed"] = req.seed if req.seed is not None else svc.config.default_seed
    return kw


async def _image_response(request: Request, svc: Service, kind: str, func, stream: bool):
    job = svc.submit(request, kind, func, progress=stream)
    waiter = Waiter(svc, job, request)
    created = int(time.time())
    size = f"{svc.pipe.processor.resolution}x{svc.pipe.processor.resolution}"

    async def encoded(out) -> str:
        if out.image is None:
            raise APIError(500, f"the model produced no image ({svc.pipe.describe_stop(out.stop_reason)})",
                           code="no_image")
        svc.metrics.images.inc()
        return await run_in_threadpool(png_b64, out.image)

    if not stream:
        try:
            out = await waiter.result()
        finally:
            waiter.close()
        body = {"created": created, "data": [{"b64_json": await encoded(out), "revised_prompt": None}],
                "output_format": "png", "size": size}
        if out.warnings:
            body["warnings"] = list(out.warnings)
        return JSONResponse(body)

    try:
        first = await waiter.first()
    except BaseException:
        waiter.close()
        raise
    event = f"image_{'edit' if kind == 'edit' else 'generation'}"

    async def events():
        kind_, value = first
        while True:
            if kind_ == "step":
                yield sse({"type": f"{event}.progress", "step": value[0], "steps": value[1]})
            elif kind_ == "done":
                try:
                    b64 = await encoded(value)
                except APIError as err:
                    yield sse(err.body())
                    return
                yield sse({"type": f"{event}.completed", "b64_json": b64, "created_at": created, "size": size,
                           "output_format": "png", "quality": "auto", "background": "opaque"})
                yield sse("[DONE]")
                return
            elif kind_ == "keepalive":
                yield b": keep-alive\n\n"
            elif kind_ in ("error", "timeout", "cancelled"):
                if kind_ == "cancelled" and value != "timeout":
                    return
                err = value if kind_ == "error" else timeout_error(svc.config.timeout)
                yield sse(err.body())
                return
            kind_, value = await waiter.next(keepalive=KEEPALIVE_S)

    return SSEResponse(events(), waiter.close)


async def images_generations(request: Request):
    svc: Service = request.app.state.service
    req = parse_json(ImageRequest, await request.body())
    _check_image_request(req, svc)
    kw = _image_kw(req, svc)
    prompt = req.prompt

    def func(pipe, obs):
        return pipe.generate(prompt, observer=obs, **kw)

    return await _image_response(request, svc, "generate", func, bool(req.stream))


async def images_edits(request: Request):
    svc: Service = request.app.state.service
    cfg = svc.config
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise bad_request("send the edit as multipart/form-data (image file + prompt), as OpenAI's images.edit",
                          code="invalid_content_type")
    try:
        form = await request.form(max_files=4, max_fields=64, max_part_size=cfg.max_body_bytes)
    except Exception:  # noqa: BLE001 - malformed multipart bodies raise several types
        raise bad_request("the body is not valid multipart/form-data", code="invalid_multipart") from None
    try:
        files = [(k, v) for k, v in form.multi_items() if not isinstance(v, str)]
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        if any(k == "mask" for k, _ in files) or "mask" in fields:
            raise bad_request("masks are not supported: the instruction says what to change", "mask",
                              code="unsupported_parameter")
        images = [v for k, v in files if k in ("image", "image[]")]
        if not images:
            raise APIError(422, "image: Field required (a PNG or JPEG file part)", code="missing_required_parameter",
                           param="image")
        if len(images) > 1:
            raise bad_request(f"one image per request, got {len(images)}", "image", code="too_many_images")
        data = await images[0].read()
    finally:
        await form.close()
    req = parse_fields(EditRequest, fields)
    _check_image_request(req, svc)
    kw = _image_kw(req, svc)
    svc.check_capacity()
    image = await run_in_threadpool(decode_image_bytes, data, cfg.max_image_pixels, "image")
    prompt = req.prompt

    def func(pipe, obs):
        return pipe.edit(image, prompt, observer=obs, **kw)

    return await _image_response(request, svc, "edit", func, bool(req.stream))


# ------------------------------------------------------------------------------------------------------ status
async def models(request: Request):
    svc: Service = request.app.state.service
    return JSONResponse({"object": "list", "data": [_model_card(svc)]})


async def model(request: Request):
    svc: Service = request.app.state.service
    if request.path_params["name"] != svc.config.model_name:
        raise APIError(404, f"model '{request.path_params['name']}' is not served here "
                            f"(this server serves '{svc.config.model_name}')", code="model_not_found", param="model")
    return JSONResponse(_model_card(svc))


def _model_card(svc: Service) -> dict:
    return {"id": svc.config.model_name, "object": "model", "created": svc.created, "owned_by": "cheers-deploy"}


async def health(request: Request):
    svc: Service = request.app.state.service
    return JSONResponse({"status": "draining" if svc.draining else svc.worker.state})


async def ready(request: Request):
    svc: Service = request.app.state.service
    err = svc.unavailable()
    if err is not None:
        return error_response(err)
    pipe = svc.pipe
    return JSONResponse({"status": "ready", "model": svc.config.model_name, "backend": svc.config.backend,
                         "precision": svc.config.precision, "resolution": pipe.processor.resolution,
                         "load_seconds": round(svc.worker.load_seconds, 3),
                         "warmup_seconds": round(svc.worker.warmup_seconds, 3)})


async def metrics(request: Request):
    svc: Service = request.app.state.service
    return Response(svc.metrics.render(), media_type=svc.metrics.content_type)


# ------------------------------------------------------------------------------------------------------ the app
async def _api_error(request, exc: APIError):
    return error_response(exc)


async def _http_error(request, exc: HTTPException):
    codes = {404: ("no such route", "not_found"), 405: ("method not allowed on this route", "method_not_allowed")}
    message, code = codes.get(exc.status_code, (str(exc.detail), "http_error"))
    if exc.status_code == 404:
        message = f"no such route: {request.method} {request.url.path}"
    return error_response(APIError(exc.status_code, message, code=code, headers=exc.headers))


async def _unexpected(request, exc: Exception):
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(internal_error())


def create_app(service: Service):
    """The ASGI application of `service` (its worker is started by the caller)."""
    routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/images/generations", images_generations, methods=["POST"]),
              Route("/v1/images/edits", images_edits, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/v1/models/{name:path}", model, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/ready", ready, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"])]
    app = Starlette(routes=routes, exception_handlers={APIError: _api_error, HTTPException: _http_error,
                                                       Exception: _unexpected})
    app.state.service = service
    return Gate(app, service)
