"""Request bodies of the OpenAI-compatible routes (pydantic), and turning a body into one of them or into an error.

Unknown fields are ignored (OpenAI clients send fields such as `user` or `store`); fields whose meaning the model
cannot honour (n > 1, stop sequences, logprobs, tools, a mask) are refused by the routes with a message, never
silently dropped. Field ranges are the pipeline's own (`Pipeline.check_inputs`): a value the pipeline would refuse
is refused here first, with the field named in `param`.
"""

from __future__ import annotations

import json
from typing import Any, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..runtime.pipeline import MAX_STEPS, SEED_MAX
from .errors import APIError

MAX_TOKENS = 1 << 20               # the pipeline's own bound on max_new_tokens


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class ImageURL(_Body):
    url: str
    detail: Optional[str] = None


class ContentPart(_Body):
    type: str
    text: Optional[str] = None
    image_url: Optional[Union[ImageURL, str]] = None


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Optional[Union[str, List[ContentPart]]] = None
    name: Optional[str] = None


class StreamOptions(_Body):
    include_usage: bool = False


class ChatRequest(_Body):
    model: Optional[str] = None
    messages: List[Message] = Field(min_length=1, max_length=256)
    max_tokens: Optional[int] = Field(default=None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=100.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    seed: Optional[int] = Field(default=None, ge=0, le=SEED_MAX)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = None
    stop: Optional[Union[str, List[str]]] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[List[Any]] = None
    functions: Optional[List[Any]] = None
    response_format: Optional[Any] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[Any] = None


class _ImageSettings(_Body):
    model: Optional[str] = None
    prompt: str = Field(min_length=1, max_length=32000)
    n: Optional[int] = None
    size: Optional[str] = None
    response_format: Optional[str] = None
    output_format: Optional[str] = None
    stream: Optional[bool] = False
    # the model's own settings (extra_body in the openai client); left out: the model's generation defaults
    steps: Optional[int] = Field(default=None, ge=1, le=MAX_STEPS)
    cfg_scale: Optional[float] = Field(default=None, ge=0.0, le=100.0)
    alpha: Optional[float] = Field(default=None, gt=0.0, le=100.0)
    seed: Optional[int] = Field(default=None, ge=0, le=SEED_MAX)


class ImageRequest(_ImageSettings):
    pass


class EditRequest(_ImageSettings):
    """The form fields of /v1/images/edits (all strings on the wire: validated in lax mode)."""
    model_config = ConfigDict(extra="ignore", strict=False)


def _loc(err) -> str:
    return ".".join(str(p) for p in err.get("loc", ()) if not (isinstance(p, str) and p[:1].isupper()))


def _raise_validation(exc: ValidationError):
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    for e in errors:
        if e.get("type") == "json_invalid":
            raise APIError(400, "the body is not valid JSON", code="invalid_json") from None
        if e.get("type") in ("model_type", "model_attributes_type") and not e.get("loc"):
            raise APIError(400, "the body must be a JSON object", code="invalid_json") from None
    first = errors[0] if errors else {}
    where = _loc(first)
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    kind = first.get("type", "invalid")
    msg = first.get("msg", "invalid value")
    code = "missing_required_parameter" if kind == "missing" else "invalid_type" if kind.endswith("_type") \
        else "invalid_value"
    raise APIError(422, f"{where}: {msg}{more}" if where else f"{msg}{more}", code=code, param=where or None) from None


def parse_json(model: type, body: bytes):
    """The body as `model`, or APIError 400 (not JSON, not an object) / 422 (a field missing, of the wrong type or
    out of range; `param` names it)."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        _raise_validation(exc)
    except (ValueError, RecursionError):
        raise APIError(400, "the body is not valid JSON", code="invalid_json") from None


def parse_fields(model: type, fields: dict):
    """Form fields (strings) as `model`; errors as parse_json's."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        _raise_validation(exc)


def sse(data) -> bytes:
    """One server-sent event: `data: <json>` (or the literal [DONE])."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"data: {text}\n\n".encode("utf-8")
