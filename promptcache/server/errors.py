"""`ApiError`: an HTTP error answered in OpenAI's envelope, `{"error": {message, type, param, code}}`.

Every failure a client can cause becomes one of these before it reaches the wire: a bad field
(400, `param` names it), a missing or wrong key (401), an unknown model or schema (404), a body that
took too long (408) or is over the limit (413), a full queue, a server still loading or shutting down
(503). The library's `PromptCacheError` (bad PML, unknown module, a prompt over the context window)
maps to 400 with its own message. Anything else is a bug: it is logged with its traceback on the
server and answered as a bare 500. The Anthropic and Bedrock routes answer the same errors in their
own envelopes (`anthropic.py`, `bedrock.py`).

NOTE: an `HTTPException`, so that FastAPI lets it through its body parsing untouched.
"""

from __future__ import annotations

from http import HTTPStatus

from starlette.exceptions import HTTPException

from ..errors import PromptCacheError

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    411: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "server_overloaded",
}


class ApiError(HTTPException):
    """An error answered to the client.

    Args:
        status: the HTTP status code.
        message: what went wrong and, for a bad field, what would be valid.
        param: the request field at fault, when there is one.
        code: a machine-readable code (OpenAI's where one exists, e.g. "model_not_found").
        type: the error type; default: derived from `status`.
        headers: extra response headers (e.g. Retry-After).
    """

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(status, message, headers)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def from_library(cls, error: PromptCacheError) -> ApiError:
        """A library error (a user's mistake by construction) as a 400 carrying its message."""
        message = str(error)
        code = "context_length_exceeded" if "context window" in message else None
        return cls(400, message, code=code)

    @classmethod
    def status_only(cls, status: int, message: str | None = None) -> ApiError:
        """An error with the status's standard phrase (for malformed HTTP, wrong methods, ...)."""
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "error"
        return cls(status, message or phrase)


def as_api_error(error: BaseException) -> ApiError:
    """The answer for any exception: itself, a library error's 400, else a bare 500 (the caller logs it)."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, PromptCacheError):
        return ApiError.from_library(error)
    if isinstance(error, HTTPException):  # raised by starlette/FastAPI themselves (404, 405, ...)
        return ApiError(error.status_code, str(error.detail), headers=error.headers)
    return ApiError(500, "internal server error")


def bad_field(param: str, message: str) -> ApiError:
    """A 400 naming the request field at fault."""
    return ApiError(400, f"{param}: {message}", param=param)
