"""What the port proxy passes on of a request's and a response's head, for both relays."""

from __future__ import annotations

import json
from typing import Any

from wrenn_control.errors import APIError

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
    b"te", b"trailer", b"transfer-encoding", b"upgrade",
})
# Not passed into the capsule: the team's key (code in a capsule may be untrusted), and what the
# proxy sets itself. `expect`: uvicorn already answered 100-continue; the body is sent anyway.
REQUEST_DROP = HOP_BY_HOP | {b"x-api-key", b"expect", b"x-forwarded-proto", b"x-forwarded-host"}
_RESPONSE_DROP = HOP_BY_HOP | {b"date"}  # uvicorn adds its own Date


def header(scope: dict[str, Any], name: bytes) -> bytes | None:
    for k, v in scope["headers"]:
        if k == name:
            return v
    return None


def connection_tokens(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    """Headers named by `Connection:` are hop-by-hop too."""
    return {t.strip().lower() for k, v in headers if k.lower() == b"connection" for t in v.split(b",") if t.strip()}


def forwarded(scope: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """`headers` plus X-Forwarded-For (the chain so far and the client), -Proto and -Host."""
    client = (scope.get("client") or ("", 0))[0] or "unknown"
    prior = [v for k, v in headers if k == b"x-forwarded-for"]
    chain = b", ".join([*prior, client.encode()])
    scheme = scope.get("scheme", "http")
    scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
    out = [(k, v) for k, v in headers if k != b"x-forwarded-for"]
    out += [(b"x-forwarded-for", chain), (b"x-forwarded-proto", scheme.encode())]
    host = header(scope, b"host")
    if host:
        out.append((b"x-forwarded-host", host))
    return out


def request_headers(scope: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    """The headers sent to the service for an HTTP request."""
    raw = [(k.lower(), v) for k, v in scope["headers"]]
    drop = REQUEST_DROP | connection_tokens(raw)
    headers = [(k, v) for k, v in raw if k not in drop]
    if header(scope, b"content-length") is None and header(scope, b"transfer-encoding") is not None:
        headers.append((b"transfer-encoding", b"chunked"))  # a body of unknown length
    headers = forwarded(scope, headers)
    headers.append((b"connection", b"close"))
    return headers


def response_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    raw = [(bytes(k).lower(), bytes(v)) for k, v in headers]
    drop = _RESPONSE_DROP | connection_tokens(raw)
    return [(k, v) for k, v in raw if k not in drop]


def request_target(scope: dict[str, Any]) -> bytes:
    path = scope.get("raw_path") or scope["path"].encode()
    query = scope.get("query_string") or b""
    return path + (b"?" + query if query else b"")


def error_body(exc: APIError) -> bytes:
    return json.dumps({"error": {"code": exc.code, "message": exc.message}}).encode()
