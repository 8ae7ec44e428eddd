"""spendgate's own errors, in the shape of the provider the client expects
(docs/reference.md §1, §6).

An SDK pointed at spendgate then raises its usual error with a readable message,
whether the error is a 402 pause, a dead upstream or a bad session id.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from aiohttp import web

_GEMINI_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    402: "BUDGET_EXCEEDED",
    404: "NOT_FOUND",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    502: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_ANTHROPIC_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    502: "api_error",
    504: "api_error",
}


def error_payload(
    style: str, status: int, message: str, kind: str, code: str | None = None
) -> dict[str, object]:
    if style == "anthropic":
        return {
            "type": "error",
            "error": {"type": _ANTHROPIC_TYPE.get(status, kind), "message": message},
        }
    if style == "gemini":
        return {
            "error": {
                "code": status,
                "message": message,
                "status": _GEMINI_STATUS.get(status, "UNKNOWN"),
            }
        }
    if style == "ollama":
        return {"error": message}
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_response(
    style: str,
    status: int,
    message: str,
    kind: str,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body = orjson.dumps(error_payload(style, status, message, kind, code))
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def stream_error_bytes(
    style: str, status: int, message: str, kind: str, code: str | None = None
) -> bytes:
    """A well-formed last event for a stream spendgate has to end early."""
    if style == "anthropic":
        payload = orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})
        return b"event: error\ndata: " + payload + b"\n\n"
    if style == "ollama":
        return orjson.dumps({"error": message}) + b"\n"
    payload = orjson.dumps(error_payload(style, status, message, kind, code))
    if style == "gemini":
        return b"data: " + payload + b"\r\n\r\n"
    return b"data: " + payload + b"\n\ndata: [DONE]\n\n"
