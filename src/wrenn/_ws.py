"""WebSocket connections to the Wrenn API (streamed commands, PTY sessions), sync and async.

Built on the ``websockets`` library. The URL is the client's base URL with ``ws``/``wss`` for
``http``/``https``; the API key goes in the ``X-API-Key`` header of the upgrade request, as for
every other call. Failures to connect become the SDK's own exceptions: a refused upgrade is the
``WrennAPIError`` its HTTP status and body describe, a network failure ``WrennConnectionError``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import websockets
from websockets.asyncio.client import ClientConnection as AsyncConnection
from websockets.asyncio.client import connect as aconnect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.sync.client import ClientConnection as SyncConnection
from websockets.sync.client import connect as sconnect

from wrenn._exceptions import WrennConnectionError, WrennTimeoutError, error_from_response

if TYPE_CHECKING:
    from wrenn._base_client import _BaseClient

__all__ = ["AsyncConnection", "ConnectionClosed", "SyncConnection", "aopen", "decode", "open_sync", "ws_url"]

OPEN_TIMEOUT = 30.0
# The server keeps every message far smaller (< 64 KiB); this only bounds a misbehaving one.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def ws_url(base_url: str, path: str, params: dict[str, str] | None = None) -> str:
    """``http://h/api`` + ``/v1/x`` -> ``ws://h/api/v1/x``."""
    parts = urlsplit(base_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    query = urlencode(params or {})
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/" + path.lstrip("/"), query, ""))


def _options(client: _BaseClient) -> dict[str, Any]:
    return {
        "additional_headers": {"X-API-Key": client._api_key},
        "user_agent_header": f"wrenn-python websockets/{websockets.__version__}",
        "open_timeout": OPEN_TIMEOUT,
        "max_size": MAX_MESSAGE_BYTES,
        "compression": None,  # terminal bytes and command output are small and often binary
    }


def _translate(exc: Exception, url: str) -> Exception:
    if isinstance(exc, InvalidStatus):
        response = exc.response
        return error_from_response(response.status_code, bytes(response.body or b""))
    if isinstance(exc, TimeoutError):
        return WrennTimeoutError("timeout", f"WebSocket {url} timed out while connecting")
    if isinstance(exc, (OSError, InvalidHandshake, InvalidURI)):
        return WrennConnectionError("connection_error", f"WebSocket {url} failed: {exc or type(exc).__name__}")
    return exc


def open_sync(client: _BaseClient, path: str, params: dict[str, str] | None = None) -> SyncConnection:
    url = ws_url(client.base_url, path, params)
    try:
        return sconnect(url, legacy=True, **_options(client))  # a connection, not a context manager
    except Exception as exc:
        raise _translate(exc, url) from exc


async def aopen(client: _BaseClient, path: str, params: dict[str, str] | None = None) -> AsyncConnection:
    url = ws_url(client.base_url, path, params)
    try:
        return await aconnect(url, **_options(client))
    except Exception as exc:
        raise _translate(exc, url) from exc


def decode(message: str | bytes) -> dict[str, Any] | bytes:
    """A text message as its JSON object (anything else as an ``{"type": "unknown"}``); bytes as is."""
    if isinstance(message, bytes):
        return message
    try:
        body = json.loads(message)
    except ValueError:
        return {"type": "unknown", "data": message}
    return body if isinstance(body, dict) else {"type": "unknown", "data": body}
