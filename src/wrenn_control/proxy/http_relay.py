"""The port proxy's HTTP relay: one request to the service in the capsule, over one tunnel,
with `Connection: close`; its response streamed back. HTTP/1.1 framing by h11 (chunked, and
keep-alive to the client, stay uvicorn's)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import h11

from wrenn_control.errors import APIError
from wrenn_control.gateway import Guest
from wrenn_control.proxy.headers import error_body, request_headers, request_target, response_headers
from wrenn_control.proxy.routing import open_tunnel
from wrenn_host.api import HostAgentError, Tunnel

log = logging.getLogger(__name__)

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
                await guest.record_activity()
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
