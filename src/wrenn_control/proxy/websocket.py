"""The port proxy's WebSocket bridge: the proxy does the handshake with the service in the
capsule (websockets' sans-I/O client), then relays messages both ways. ASGI has no raw upgrade,
hence a relay of messages rather than of bytes; pings are answered on each side. The service's
subprotocol choice is passed back, and a refused upgrade (its HTTP answer) too when the server
supports ASGI denial responses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from websockets.client import ClientProtocol
from websockets.frames import Opcode
from websockets.http11 import Request as WSRequest
from websockets.http11 import Response as WSResponse
from websockets.uri import parse_uri

from wrenn_control.errors import APIError
from wrenn_control.gateway import Guest
from wrenn_control.proxy.headers import (
    REQUEST_DROP,
    connection_tokens,
    error_body,
    forwarded,
    header,
    request_target,
    response_headers,
)
from wrenn_control.proxy.routing import open_tunnel
from wrenn_host.api import HostAgentError, Tunnel

log = logging.getLogger(__name__)

_WS_HANDSHAKE = frozenset({
    b"host", b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions",
    b"sec-websocket-protocol", b"sec-websocket-accept", b"content-length",
})
MAX_WS_MESSAGE = 16 * 1024 * 1024  # as uvicorn's default for the client side
_JSON = [(b"content-type", b"application/json")]


async def bridge_websocket(scope: dict[str, Any], receive: Any, send: Any, port: int, capsule_id: str) -> None:
    if (await receive())["type"] != "websocket.connect":
        return
    async with contextlib.AsyncExitStack() as stack:
        try:
            guest, tunnel = await stack.enter_async_context(open_tunnel(scope, port, capsule_id))
        except APIError as exc:
            await _deny(scope, send, exc.status, _JSON, error_body(exc))
            return
        await _bridge(scope, receive, send, guest, tunnel, port)


async def _bridge(scope: dict[str, Any], receive: Any, send: Any, guest: Guest, tunnel: Tunnel,
                  port: int) -> None:
    proto = ClientProtocol(parse_uri("ws://localhost/"), subprotocols=scope.get("subprotocols") or None,
                           max_size=MAX_WS_MESSAGE)
    base = proto.connect()
    raw = [(k.lower(), v) for k, v in scope["headers"]]
    drop = REQUEST_DROP | _WS_HANDSHAKE | connection_tokens(raw)
    extra = forwarded(scope, [(k, v) for k, v in raw if k not in drop])
    del base.headers["Host"]
    base.headers["Host"] = (header(scope, b"host") or b"localhost").decode("latin-1")
    for k, v in extra:
        base.headers[k.decode("latin-1")] = v.decode("latin-1")
    proto.send_request(WSRequest(request_target(scope).decode("latin-1"), base.headers))
    events: list[Any] = []

    async def flush() -> None:
        for data in proto.data_to_send():
            if data:
                await tunnel.write(data)

    # Handshake with the service.
    response: WSResponse | None = None
    try:
        await flush()
        while response is None and proto.handshake_exc is None:
            data = await tunnel.read()
            if data:
                proto.receive_data(data)
            else:
                proto.receive_eof()
            for event in proto.events_received():
                if response is None and isinstance(event, WSResponse):
                    response = event
                else:
                    events.append(event)
            if not data:
                break
    except HostAgentError as exc:
        await _deny(scope, send, 502, _JSON,
                    error_body(APIError(502, "agent_error", f"connection to port {port} failed: {exc}")))
        return
    if proto.handshake_exc is not None or response is None:
        if response is not None and response.status_code != 101:
            await _deny(scope, send, response.status_code, response_headers(
                [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.raw_items()]),
                response.body or b"")
        else:
            why = proto.handshake_exc or "the connection closed"
            await _deny(scope, send, 502, _JSON, error_body(
                APIError(502, "agent_error", f"the service on port {port} did not accept a WebSocket: {why}")))
        return
    await send({"type": "websocket.accept", "subprotocol": response.headers.get("Sec-WebSocket-Protocol")})

    closed = False

    async def close_client(code: int, reason: str = "") -> None:
        nonlocal closed
        if not closed:
            closed = True
            if code in (1005, 1006, 1015) or not (1000 <= code <= 4999):
                code = 1000 if code == 1005 else 1011
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": code, "reason": reason[:120]})

    async def from_client() -> None:
        while True:
            msg = await receive()
            if msg["type"] == "websocket.receive":
                if msg.get("bytes") is not None:
                    proto.send_binary(msg["bytes"])
                else:
                    proto.send_text((msg.get("text") or "").encode())
                await flush()
                await guest.record_activity()
            elif msg["type"] == "websocket.disconnect":
                nonlocal closed
                closed = True
                code = msg.get("code") or 1000
                with contextlib.suppress(Exception):
                    proto.send_close(code if 1000 <= code <= 4999 and code not in (1005, 1006, 1015) else 1000,
                                     msg.get("reason") or "")
                    await flush()
                return

    async def from_service() -> None:
        message: list[bytes] = []
        opcode: Opcode | None = None
        pending = events
        while True:
            for frame in pending:
                if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
                    opcode, message = frame.opcode, [frame.data]
                elif frame.opcode is Opcode.CONT:
                    message.append(frame.data)
                elif frame.opcode is Opcode.CLOSE:
                    rcvd = proto.close_rcvd
                    await close_client(rcvd.code if rcvd else 1000, rcvd.reason if rcvd else "")
                    return
                else:
                    continue  # ping (answered by the protocol) or pong
                if frame.fin and opcode is not None:
                    data = b"".join(message)
                    message, kind = [], opcode
                    opcode = None
                    try:
                        if kind is Opcode.TEXT:
                            await send({"type": "websocket.send", "text": data.decode("utf-8", "replace")})
                        else:
                            await send({"type": "websocket.send", "bytes": data})
                    except Exception:  # the client is gone
                        return
                    await guest.record_activity()
            data = await tunnel.read()
            if data:
                proto.receive_data(data)
            else:
                proto.receive_eof()
            pending = proto.events_received()
            await flush()  # pongs, the echo of a close
            if not data and not pending:
                await close_client(1011, "the service closed the connection")
                return
            if proto.parser_exc is not None and not pending:
                await close_client(1011, f"the service broke the WebSocket protocol: {proto.parser_exc}")
                return

    tasks = [asyncio.ensure_future(from_client()), asyncio.ensure_future(from_service())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                exc = task.exception()
                if isinstance(exc, HostAgentError):
                    await close_client(1011, f"connection to port {port} failed")
                else:
                    log.warning("proxy: WebSocket relay to port %d failed: %r", port, exc)
                    await close_client(1011, "proxy error")
        await close_client(1000)


async def _deny(scope: dict[str, Any], send: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    """Refuse a WebSocket with an HTTP answer if the server can send one (ASGI denial response
    extension), else with a close (the server answers 403)."""
    if "websocket.http.response" in (scope.get("extensions") or {}):
        headers = [(k, v) for k, v in headers if k != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})
