"""HTTP errors in the shape each protocol's clients parse.

OpenAI: ``{"error": {"message", "type", "param", "code"}}``; Anthropic: ``{"type": "error", "error": {"type",
"message"}}``. Handlers raise ``APIError``; the app renders it for the protocol of the route.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                    503: "overloaded_error"}
_OPENAI_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                 413: "invalid_request_error", 429: "rate_limit_exceeded", 500: "server_error",
                 503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


def openai_body(e: APIError) -> dict:
    return {"error": {"message": e.message, "type": _OPENAI_TYPES.get(e.status, "invalid_request_error"),
                      "param": e.param, "code": e.code}}


def anthropic_body(e: APIError) -> dict:
    msg = e.message if e.param is None else f"{e.param}: {e.message}"
    return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(e.status, "api_error"), "message": msg}}


def render(e: APIError, path: str) -> JSONResponse:
    body = anthropic_body(e) if path.startswith("/v1/messages") else openai_body(e)
    return JSONResponse(body, status_code=e.status, headers=e.headers)


def field_name(loc) -> str:
    """'messages[0].content' from a pydantic error location ('body', 'messages', 0, 'content')."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "body"
