"""Request guard: an ASGI middleware that refuses, before a byte of the body is read,
- a request with a body to an authenticated route (everything under /api/v1 but signup and
  login) without a valid X-API-Key or Bearer token: 401 (FastAPI reads and parses the whole body
  before it runs the auth dependencies, so a 400 MB body would be buffered just to be refused);
- a body over `Settings.max_body_bytes` on any route but the file uploads (which have their own
  cap or none): 413 `too_large`, from its Content-Length or, for a chunked body, as soon as the
  bytes counted pass the cap.

A body within the cap is read here and handed on unchanged (FastAPI would buffer it anyway).
The auth check here is only the cheap part (the key's hash exists, the token's signature holds);
the routes' dependencies still do the full one.
"""

from __future__ import annotations

import re
from typing import Any

from starlette.responses import Response

from wrenn_control.api import key_lookup
from wrenn_control.auth import InvalidToken, decode_jwt
from wrenn_control.api.openapi import allowed_methods
from wrenn_control.errors import error_response

PUBLIC = frozenset({"/api/v1/auth/signup", "/api/v1/auth/login"})
# A host agent's calls carry its own Bearer (a registration token or credential, checked by the
# route, routes/hosts.py), neither an API key nor a JWT.
_HOST_AGENT = re.compile(r"^/api/v1/hosts/(register|[^/]+/heartbeat)/?$")
# Uploads stream their body to the guest and cap it themselves (files/write) or not at all; a
# build's context tar has its own cap (routes/builds.py).
_UPLOAD = re.compile(r"^/api/v1/(capsules/[^/]+/files/(stream/)?write|builds)/?$")


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


class RequestGuard:
    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if scope["method"] == "OPTIONS":
            allowed = allowed_methods(scope["app"], path)
            if allowed:  # which methods the path takes (no CORS here)
                await Response(status_code=204, headers={"Allow": ", ".join(allowed)})(scope, receive, send)
                return
        length_text = _header(scope, b"content-length")
        chunked = _header(scope, b"transfer-encoding") is not None
        length = int(length_text) if length_text and length_text.strip().isdigit() else None
        has_body = chunked or bool(length)
        if not has_body:
            await self.app(scope, receive, send)
            return
        if path.startswith("/api/v1/") and path.rstrip("/") not in PUBLIC and not _HOST_AGENT.match(path):
            refusal = await self._auth_refusal(scope)
            if refusal is not None:
                await self._refuse(scope, send, 401, "unauthorized", refusal)
                return
        if _UPLOAD.match(path):
            await self.app(scope, receive, send)
            return
        cap = scope["app"].state.settings.max_body_bytes
        too_large = f"request body is larger than {cap} bytes"
        if length is not None and length > cap:
            await self._refuse(scope, send, 413, "too_large", too_large)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away before sending its body
            body += message.get("body", b"")
            if len(body) > cap:
                await self._refuse(scope, send, 413, "too_large", too_large)
                return
            if not message.get("more_body", False):
                break
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # then the client's disconnect, for streaming responses

        await self.app(scope, replay, send)

    @staticmethod
    async def _auth_refusal(scope: dict[str, Any]) -> str | None:
        """Why the request's credentials are not valid, None if they are (cheap checks only)."""
        state = scope["app"].state
        key = _header(scope, b"x-api-key")
        auth = _header(scope, b"authorization") or ""
        scheme, _, token = auth.partition(" ")
        if not key and scheme.lower() == "bearer" and token.strip():
            try:
                decode_jwt(state.jwt_secret, token.strip())
            except InvalidToken as exc:
                return f"invalid token: {exc}"
            return None
        if not key:
            return "missing X-API-Key header"
        found = await state.db.run(key_lookup.key_owner, key)
        if found is None:
            return "invalid API key"
        key_lookup.remember(scope, key, found)  # the route's dependency needs no second query
        return None

    @staticmethod
    async def _refuse(scope: dict[str, Any], send: Any, status: int, code: str, message: str) -> None:
        # `Connection: close`: the unread body is not worth reading to keep the connection.
        response = error_response(status, code, message, headers={"Connection": "close"})
        await response(scope, _never_receive, send)


async def _never_receive() -> dict[str, Any]:
    return {"type": "http.disconnect"}
