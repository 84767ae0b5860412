"""One error shape for every failure: {"error": {"code", "message"}}.

Codes (wire-compatible with Wrenn): invalid_request 400, unauthorized 401, forbidden 403,
not_found 404, invalid_state / conflict / template_name_taken / name_reserved 409, too_large 413,
internal_error 500, agent_error 502, host_unavailable 503.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from wrenn_host.api import CapsuleNotFound, GuestError, HostAgentError

log = logging.getLogger(__name__)


SHORT = 64  # characters of a caller's value quoted in an error message
MAX_MESSAGE = 300  # and the longest message passed on from the guest


def short(value: object, limit: int = SHORT) -> str:
    """repr() of a caller's value, cut to a short prefix: an error never echoes a huge input."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value)} characters)" if isinstance(value, (str, bytes)) else ""
    return f"{text[:limit]}...{size}"


def _clip(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE] + "..."


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def not_found(what: str = "capsule") -> APIError:
    return APIError(404, "not_found", f"{what} not found")


def invalid(message: str) -> APIError:
    return APIError(400, "invalid_request", message)


def invalid_state(message: str) -> APIError:
    return APIError(409, "invalid_state", message)


def agent_error(exc: HostAgentError | str) -> APIError:
    if not isinstance(exc, str) and exc.code == "host_unavailable":  # a remote host did not answer
        return APIError(503, "host_unavailable", exc.message)
    return APIError(502, "agent_error", exc if isinstance(exc, str) else exc.message)


# Guest agent error codes (see wrenn_guest/PROTOCOL.md) -> HTTP.
_GUEST_CODES: dict[str, tuple[int, str]] = {
    "not_found": (404, "not_found"),
    "no_such_process": (404, "not_found"),
    "permission_denied": (403, "forbidden"),
    "is_directory": (400, "invalid_request"),
    "not_directory": (400, "invalid_request"),
    "invalid": (400, "invalid_request"),
    "exists": (400, "invalid_request"),
}


def from_guest_error(exc: GuestError, overrides: dict[str, tuple[int, str]] | None = None) -> APIError:
    """A guest's answer is the user's problem (4xx); anything else it says is an agent failure."""
    status, code = (overrides or {}).get(exc.code) or _GUEST_CODES.get(exc.code, (502, "agent_error"))
    return APIError(status, code, _clip(exc.message))


_STATUS_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "invalid_request",
    422: "invalid_request",
    500: "internal_error",
    502: "agent_error",
    503: "host_unavailable",
}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def validation_message(errors: list[dict[str, Any]]) -> str:
    parts: list[str] = []
    for err in errors[:5]:
        loc = [str(x) if len(str(x)) <= SHORT else str(x)[:SHORT] + "..." for x in err.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path", "header", "cookie"):
            loc = loc[1:]
        kind = err.get("type")
        if kind == "extra_forbidden":
            parts.append(f"unknown field {'.'.join(loc)!r}")
            continue
        if kind == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            return f"request body is not valid JSON: {detail}".rstrip(": ")
        if kind == "model_attributes_type" and isinstance(err.get("input"), (bytes, bytearray)):
            return "request body must be a JSON object sent with Content-Type: application/json"
        if kind == "missing" and not loc:
            return "request body is required"
        field = ".".join(loc)
        msg = _clip(err.get("msg", "invalid value"))
        parts.append(f"{field}: {msg}" if field else msg)
    return "; ".join(parts) or "invalid request"


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return error_response(exc.status, exc.code, exc.message, exc.headers)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(400, "invalid_request", validation_message(list(exc.errors())))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _STATUS_CODES.get(exc.status_code, "internal_error" if exc.status_code >= 500 else "invalid_request")
    if exc.status_code == 404 and exc.detail == "Not Found":
        message = f"no route for {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} not allowed on {request.url.path}"
        from wrenn_control.api.openapi import allowed_methods  # (the API's module; errors.py is below it)

        allowed = allowed_methods(request.app, request.url.path)
        if allowed:
            return error_response(405, code, message, {"Allow": ", ".join(allowed)})
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, code, message, getattr(exc, "headers", None))


async def _host_error(_: Request, exc: Exception) -> JSONResponse:
    # Safety net: routes translate host errors themselves (and fix capsule status); this only
    # guarantees that an untranslated one still has the right shape.
    assert isinstance(exc, HostAgentError)
    if isinstance(exc, GuestError) and not isinstance(exc, CapsuleNotFound):
        api = from_guest_error(exc)
        return error_response(api.status, api.code, api.message)
    api = agent_error(exc)
    return error_response(api.status, api.code, api.message)


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal_error", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(HostAgentError, _host_error)
    app.add_exception_handler(Exception, _unexpected)
