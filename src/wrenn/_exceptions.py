"""Exceptions raised by the Wrenn SDK.

Every exception the SDK raises on purpose derives from :class:`WrennError`, which carries
``code`` (machine-readable), ``message`` (human-readable) and ``status_code`` (the HTTP
status, or ``None`` when the server never answered)::

    WrennError
    ├── WrennConnectionError ········· no response: connect/read/protocol failure
    │   └── WrennTimeoutError ········ no response in time (also a TimeoutError)
    ├── WrennAPIError ················ the server answered with an error status
    │   ├── WrennValidationError ····· 400 invalid_request
    │   ├── WrennAuthenticationError · 401 unauthorized
    │   ├── WrennForbiddenError ······ 403 forbidden
    │   ├── WrennNotFoundError ······· 404 not_found
    │   ├── WrennConflictError ······· 409 invalid_state, conflict, template_name_taken, ...
    │   │   └── WrennHostHasCapsulesError  409 host_has_capsules
    │   ├── WrennTooLargeError ······· 413 too_large
    │   ├── WrennInternalError ······· 500 internal_error
    │   ├── WrennAgentError ·········· 502 agent_error
    │   └── WrennHostUnavailableError  503 host_unavailable
    └── WrennCapsuleStateError ······· a wait saw the capsule fail (also a RuntimeError)
        └── WrennWaitTimeoutError ···· a wait ran out of time (also a TimeoutError)

The ``RuntimeError`` / ``TimeoutError`` bases keep code written for the published SDK, which
raised those builtins from its waits, working unchanged.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import httpx

__all__ = [
    "WrennAPIError",
    "WrennAgentError",
    "WrennAuthenticationError",
    "WrennCapsuleStateError",
    "WrennConflictError",
    "WrennConnectionError",
    "WrennError",
    "WrennForbiddenError",
    "WrennHostHasCapsulesError",
    "WrennHostUnavailableError",
    "WrennInternalError",
    "WrennNotFoundError",
    "WrennTimeoutError",
    "WrennTooLargeError",
    "WrennValidationError",
    "WrennWaitTimeoutError",
]


class WrennError(Exception):
    """Base class of every Wrenn SDK error.

    Attributes:
        code: Machine-readable error code, e.g. ``"not_found"``.
        message: Human-readable description.
        status_code: HTTP status of the response, ``None`` if there was no response.
    """

    def __init__(self, code: str, message: str, status_code: int | None = None) -> None:
        self.code = code
        self.message = message
        self.status_code = status_code
        super().__init__(message)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, "
            f"status_code={self.status_code!r})"
        )


# --- no response ---------------------------------------------------------------------------


class WrennConnectionError(WrennError):
    """The request got no response: the connection failed or broke."""


class WrennTimeoutError(WrennConnectionError, TimeoutError):
    """The request got no response within the timeout."""


# --- bad response --------------------------------------------------------------------------


class WrennAPIError(WrennError):
    """The server answered with an error status (4xx/5xx)."""


class WrennValidationError(WrennAPIError):
    """400 ``invalid_request``: the request parameters are invalid."""


class WrennAuthenticationError(WrennAPIError):
    """401 ``unauthorized``: the API key is missing or invalid."""


class WrennForbiddenError(WrennAPIError):
    """403 ``forbidden``: authenticated, but not allowed to do this."""


class WrennNotFoundError(WrennAPIError):
    """404 ``not_found``: no such capsule, template, process or path."""


class WrennConflictError(WrennAPIError):
    """409: the resource is in the wrong state (``invalid_state``) or the name is taken."""


class WrennHostHasCapsulesError(WrennConflictError):
    """409 ``host_has_capsules``: the host still has capsules.

    Attributes:
        capsule_ids: IDs of the capsules still on the host.
    """

    def __init__(
        self,
        code: str,
        message: str,
        status_code: int | None = None,
        capsule_ids: list[str] | None = None,
    ) -> None:
        self.capsule_ids = list(capsule_ids or [])
        super().__init__(code, message, status_code)


class WrennTooLargeError(WrennAPIError):
    """413 ``too_large``: the upload is over the size limit."""


class WrennInternalError(WrennAPIError):
    """500 ``internal_error``: unexpected server error."""


class WrennAgentError(WrennAPIError):
    """502 ``agent_error``: the host agent failed; retrying after a short delay may help."""


class WrennHostUnavailableError(WrennAPIError):
    """503 ``host_unavailable``: no host can take the capsule right now."""


# --- waits ---------------------------------------------------------------------------------


class WrennCapsuleStateError(WrennError, RuntimeError):
    """While waiting, the capsule reached a state it cannot leave (``error``, ``stopped``).

    Attributes:
        capsule_id: The capsule waited on.
        status: The status it reached.
    """

    def __init__(self, code: str, message: str, capsule_id: str = "", status: str = "") -> None:
        self.capsule_id = capsule_id
        self.status = status
        super().__init__(code, message, None)


class WrennWaitTimeoutError(WrennCapsuleStateError, TimeoutError):
    """The capsule did not reach the wanted status within the wait timeout."""


# Error codes from the server's {"error": {"code", "message"}} body.
_BY_CODE: dict[str, type[WrennAPIError]] = {
    "invalid_request": WrennValidationError,
    "unauthorized": WrennAuthenticationError,
    "forbidden": WrennForbiddenError,
    "not_found": WrennNotFoundError,
    "invalid_state": WrennConflictError,
    "conflict": WrennConflictError,
    "template_name_taken": WrennConflictError,
    "name_reserved": WrennConflictError,
    "already_exists": WrennConflictError,
    "host_has_capsules": WrennHostHasCapsulesError,
    "host_has_sandboxes": WrennHostHasCapsulesError,
    "too_large": WrennTooLargeError,
    "internal_error": WrennInternalError,
    "agent_error": WrennAgentError,
    "host_unavailable": WrennHostUnavailableError,
}

# Fallback when the body carries no known code (e.g. an HTML page from a proxy).
_BY_STATUS: dict[int, tuple[type[WrennAPIError], str]] = {
    400: (WrennValidationError, "invalid_request"),
    401: (WrennAuthenticationError, "unauthorized"),
    403: (WrennForbiddenError, "forbidden"),
    404: (WrennNotFoundError, "not_found"),
    409: (WrennConflictError, "conflict"),
    413: (WrennTooLargeError, "too_large"),
    422: (WrennValidationError, "invalid_request"),
    500: (WrennInternalError, "internal_error"),
    502: (WrennAgentError, "agent_error"),
    503: (WrennHostUnavailableError, "host_unavailable"),
}


def error_from_response(status_code: int, body: bytes) -> WrennAPIError:
    """Build the exception for an error response from its status and raw body."""
    default_cls, default_code = _BY_STATUS.get(status_code, (WrennAPIError, "http_error"))
    payload: Any = None
    with contextlib.suppress(ValueError):  # not JSON: handled below like any foreign body
        payload = json.loads(body) if body else None
    err = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(err, dict) and isinstance(err.get("code"), str):
        code = err["code"]
        message = str(err.get("message") or code)
        cls = _BY_CODE.get(code, default_cls)
    else:
        # Not our error shape: FastAPI's {"detail": ...}, plain text or HTML.
        code = default_code
        detail = payload.get("detail") if isinstance(payload, dict) else None
        text = body.decode("utf-8", errors="replace").strip()
        message = str(detail) if detail else (text[:500] or f"HTTP {status_code}")
        cls = default_cls
    if cls is WrennHostHasCapsulesError:
        ids = payload.get("capsule_ids") or payload.get("sandbox_ids") or []
        return WrennHostHasCapsulesError(code, message, status_code, ids)
    return cls(code, message, status_code)


def error_from_transport(exc: httpx.TransportError, request: httpx.Request) -> WrennConnectionError:
    """Translate an httpx transport failure into the SDK's own exception."""
    where = f"{request.method} {request.url}"
    if isinstance(exc, httpx.TimeoutException):
        return WrennTimeoutError("timeout", f"{where} timed out ({type(exc).__name__})")
    detail = str(exc) or type(exc).__name__
    return WrennConnectionError("connection_error", f"{where} failed: {detail}")
