"""Port proxy: a request whose Host is `{port}-{capsule_id}.{any domain}` reaches the TCP service
listening on that port inside the capsule (on its loopback: the guest agent connects there, not
over the NIC).

An ASGI middleware in front of every route (`create_app` installs it): other Hosts go on to the
API unchanged. Each proxied request opens one connection in the guest (`HostAgent.tcp_connect`).

- HTTP: the request is sent on with `Connection: close` (method, path and query as received, the
  headers minus hop-by-hop ones and `X-API-Key`, plus `X-Forwarded-For/-Proto/-Host`), the body
  streamed both ways; HTTP/1.1 framing by h11 (chunked, keep-alive to the client stays uvicorn's).
- WebSocket: the proxy does the handshake with the service (websockets' sans-I/O client) and then
  relays messages both ways; the service's subprotocol choice is passed back, a refused upgrade
  (its HTTP answer) too when the server supports ASGI denial responses. ASGI has no raw upgrade,
  hence a relay of messages rather than of bytes; pings are answered on each side.

Errors (before anything was sent to the client) use the API's shape `{"error": {"code",
"message"}}`: unknown capsule 404 `not_found`; capsule not running 409 `invalid_state`; nothing
listening on the port, or no valid answer from the service, 502 `agent_error`; bad port 400.

Auth: like Wrenn's and E2B's proxies, none by default: the URL is the secret (a capsule id has
25 random base-36 characters, ~129 bits, from `secrets`), so `get_url()` links work in a browser.
Setting WRENN_PROXY_REQUIRE_API_KEY=1 requires the X-API-Key of the capsule's team instead. The
X-API-Key header is never passed into the capsule.

While a request or WebSocket is open the capsule counts as busy (no auto-pause) and traffic records
activity (at most once a second per capsule).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import h11
from websockets.client import ClientProtocol
from websockets.frames import Opcode
from websockets.http11 import Request as WSRequest
from websockets.http11 import Response as WSResponse
from websockets.uri import parse_uri

from wrenn_control.api.deps import team_for_api_key
from wrenn_control.errors import APIError, invalid, not_found
from wrenn_control.gateway import Guest, GuestGateway
from wrenn_host.api import HostAgentError, Tunnel

log = logging.getLogger(__name__)


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


# `{port}-{capsule id}.` then any domain (and maybe `:port`): 8000-cl-abc...xyz.localhost:8080
_TARGET = re.compile(r"(\d{1,5})-(cl-[0-9a-z]{1,64})\.[^\s/]+", re.ASCII)


def parse_target(host: str | None) -> tuple[int, str] | None:
    """(port, capsule id) from a Host header `{port}-{capsule_id}.{domain}[:port]`, else None.
    Host names are case-insensitive; capsule ids are lowercase."""
    if not host:
        return None
    m = _TARGET.fullmatch(host.strip().lower())
    if m is None:
        return None
    return int(m.group(1)), m.group(2)


@contextlib.asynccontextmanager
async def open_tunnel(scope: dict[str, Any], port: int, capsule_id: str) -> AsyncIterator[tuple[Guest, Tunnel]]:
    """Check the port, the capsule (and the key, if required) and connect; raises APIError before
    it yields. While it is open the capsule is busy; the tunnel is closed at the end."""
    state = scope["app"].state
    gateway: GuestGateway = state.gateway
    if not 1 <= port <= 65535:
        raise invalid(f"port must be between 1 and 65535, not {port}")
    row = gateway.capsule(capsule_id, None)
    if getattr(state.settings, "proxy_require_api_key", False):
        key = header(scope, b"x-api-key")
        team = await team_for_api_key(state.db, key.decode("latin-1") if key else None)
        if team.id != row.team_id:
            raise not_found("capsule")
    async with gateway.open(row, purpose="to reach its ports") as guest:
        tunnel = await guest.tcp_connect(port)
        try:
            guest.record_activity()
            yield guest, tunnel
        finally:
            await tunnel.close()



MAX_RESPONSE_HEAD = 64 * 1024


async def relay_http(scope: dict[str, Any], receive: Any, send: Any, port: int, capsule_id: str) -> None:
    async with contextlib.AsyncExitStack() as stack:
        try:
            guest, tunnel = await stack.enter_async_context(open_tunnel(scope, port, capsule_id))
        except APIError as exc:
            await send_error(send, exc)
            return
        await _exchange(scope, receive, send, guest, tunnel, port)


async def _exchange(scope: dict[str, Any], receive: Any, send: Any, guest: Guest, tunnel: Tunnel,
                    port: int) -> None:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
    head = conn.send(h11.Request(method=scope["method"], target=request_target(scope),
                                 headers=request_headers(scope)))

    async def request_body() -> None:
        """Send the request, then wait for the client to leave (returns when it has)."""
        try:
            await tunnel.write(head)
            more = True
            while more:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                more = msg.get("more_body", False)
                if msg.get("body"):
                    await tunnel.write(conn.send(h11.Data(data=msg["body"])))
            await tunnel.write(conn.send(h11.EndOfMessage()))
        except (HostAgentError, h11.LocalProtocolError) as exc:
            # The service stopped taking the request (it may answer anyway): the response
            # side sees whatever it does next.
            log.debug("proxy: request body to port %d not sent whole: %s", port, exc)
        while (await receive())["type"] != "http.disconnect":
            pass

    sender = asyncio.ensure_future(request_body())
    relay = asyncio.ensure_future(_relay_response(conn, guest, tunnel, send, port))
    try:
        done, _ = await asyncio.wait({sender, relay}, return_when=asyncio.FIRST_COMPLETED)
        if relay not in done:  # the client left first
            relay.cancel()
        await asyncio.wait({relay})
        if not relay.cancelled():
            relay.result()  # re-raise an upstream failure after the response started
    finally:
        for task in (sender, relay):
            task.cancel()
        for task in (sender, relay):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def _relay_response(conn: h11.Connection, guest: Guest, tunnel: Tunnel, send: Any, port: int) -> None:
    started = False
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await tunnel.read())  # b"": the service closed
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                await send({"type": "http.response.start", "status": event.status_code,
                            "headers": response_headers(event.headers)})
                started = True
            elif isinstance(event, h11.Data):
                await send({"type": "http.response.body", "body": bytes(event.data), "more_body": True})
                guest.record_activity()
            elif isinstance(event, h11.EndOfMessage):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            else:  # ConnectionClosed before a whole response
                raise h11.RemoteProtocolError("the connection closed before a whole response")
    except (h11.RemoteProtocolError, HostAgentError) as exc:
        if started:
            # Too late for an error status: end the connection so the client sees a
            # truncated response rather than a complete-looking one.
            raise RuntimeError(f"proxy: response from port {port} broke off: {exc}") from exc
        if isinstance(exc, h11.RemoteProtocolError):
            message = f"the service on port {port} sent no valid HTTP response ({exc})"
        else:
            message = f"connection to port {port} failed: {exc}"
        await send_error(send, APIError(502, "agent_error", message))


async def send_error(send: Any, exc: APIError) -> None:
    body = error_body(exc)
    await send({"type": "http.response.start", "status": exc.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})



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
                guest.record_activity()
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
                    guest.record_activity()
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


class PortProxy:
    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            host = header(scope, b"host")
            target = parse_target(host.decode("latin-1")) if host else None
            if target is not None:
                port, capsule_id = target
                if scope["type"] == "http":
                    await relay_http(scope, receive, send, port, capsule_id)
                else:
                    await bridge_websocket(scope, receive, send, port, capsule_id)
                return
        await self.app(scope, receive, send)
