"""Errors as OpenAI-style objects: {"error": {"message", "type", "param", "code"}}. Nothing else ever leaves the server
for a failed request: no traceback, no exception text of an unexpected error (that goes to the server log)."""

from __future__ import annotations

from typing import Dict, Optional

# HTTP status -> OpenAI error type
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "service_unavailable", 504: "timeout_error"}


class APIError(Exception):
    """A request that fails with `status` and an OpenAI error object."""

    def __init__(self, status: int, message: str, code: Optional[str] = None, param: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None, type: Optional[str] = None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.code = code
        self.param = param
        self.headers = dict(headers or {})
        self.type = type or ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else
                                            "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: Optional[str] = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, code=code, param=param)


def internal_error() -> APIError:
    return APIError(500, "internal error: the server could not complete the request (see the server log)",
                    code="internal_error")
