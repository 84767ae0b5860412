"""The host agent as an HTTP service: every `HostAgent` method for a control plane on the network.

Routes (all under ``Authorization: Bearer <control_token>``, else 401):
- ``POST /host/v1/<method>``: JSON body of the method's arguments by name (wire.py), answer its
  result as JSON (``null`` for None); errors ``{"error": {"code", "message", "kind"}}``.
- ``POST /host/v1/attach`` and ``/pty_attach``: NDJSON, one StreamEvent per line, or an
  ``{"error": ...}`` line that ends the stream.
- ``POST /host/v1/read_file_stream``: the file's bytes, chunked (errors before the first byte are
  JSON errors; a failure later cuts the response short).
- ``POST /host/v1/write_file?capsule_id=&path=``: the file's bytes as the (streamed) request body.
- ``WS /host/v1/tcp_connect?capsule_id=&port=``: one WebSocket per tunnel (see `_tunnel`).
- ``GET /host/v1/health``, ``GET /metrics`` (Prometheus text format).

The agent is started and closed by whoever serves it (`wrenn host-agent`, or a test): this app
only forwards calls.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.websockets import WebSocketDisconnect

from wrenn_host import api
from wrenn_host.service import wire
from wrenn_host.service.book import Book
from wrenn_host.service.metrics import HostMetrics

log = logging.getLogger("wrenn.host.service")
NDJSON = "application/x-ndjson"


def _error(exc: BaseException) -> JSONResponse:
    if not isinstance(exc, api.HostAgentError):
        log.exception("host agent call failed", exc_info=exc)
    status = wire.error_status(exc) if isinstance(exc, api.HostAgentError) else 500
    return JSONResponse(wire.error_to_wire(exc), status_code=status)


class BearerAuth:
    """Refuses every request and WebSocket without the control plane's token (pure ASGI, so the
    streamed bodies pass untouched)."""

    def __init__(self, app: Any, token: str):
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                if scope["type"] == "websocket":
                    await receive()  # websocket.connect
                    await send({"type": "websocket.close", "code": 4401})
                    return
                body = {"error": {"code": "unauthorized", "message": "missing or wrong control token",
                                  "kind": "HostAgentError"}}
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(agent: api.HostAgent, control_token: str, *, book: Book | None = None,
               on_start: Callable[[dict[str, str]], Awaitable[api.ReconcileReport]] | None = None) -> Any:
    """`on_start`: what `start` does (default: the control plane's view decides, see `start`)."""
    book = book or Book(agent)
    metrics = HostMetrics(book)
    app = FastAPI(title="Wrenn host agent", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.agent, app.state.book, app.state.metrics = agent, book, metrics
    # Boots under way, by capsule: a destroy stops them first, as the in-process control plane
    # cancels its boot task before destroying (its cancelled request may not have reached us yet).
    booting: dict[str, set[asyncio.Task]] = {}

    async def call_until_gone(method: str, kwargs: dict[str, Any], request: Request) -> Any:
        """The call, cancelled if the client hangs up first (as an awaited call would be)."""
        cid = kwargs.get("capsule_id")
        if method == "destroy" and cid in booting:
            for task in list(booting[cid]):
                task.cancel()
            await asyncio.wait(booting[cid])
        task = asyncio.create_task(call(method, kwargs))
        if method in ("create", "resume") and cid:
            booting.setdefault(cid, set()).add(task)
        gone = asyncio.create_task(_disconnected(request))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                task.cancel()
            try:
                return await task
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():  # we are being stopped ourselves
                    raise
                raise api.HostAgentError(f"{method} of {cid} was stopped (the capsule is being destroyed, "
                                         "or the caller left)", code="cancelled") from None
        finally:
            gone.cancel()
            if cid in booting:
                booting[cid].discard(task)
                if not booting[cid]:
                    del booting[cid]

    async def call(method: str, kwargs: dict[str, Any]) -> Any:
        t0 = time.monotonic()
        outcome = "error"
        try:
            result = await getattr(agent, method)(**kwargs)
            outcome = "ok"
        finally:
            metrics.observe(method, time.monotonic() - t0, outcome)
        _note(method, kwargs, result)
        return result

    def _note(method: str, kwargs: dict[str, Any], result: Any) -> None:
        if method in ("create", "resume", "get", "snapshot"):
            book.saw_capsule(kwargs["capsule_id"])
        if method == "destroy":
            book.dropped_capsule(kwargs["capsule_id"])
        if method == "snapshot":
            book.template_ids.add(kwargs["template_id"])
        if method == "delete_template":
            book.template_ids.discard(kwargs["template_id"])
        if method == "write_archive":  # a template or paused capsule moved here from another host
            if kwargs["kind"] == "template":
                book.template_ids.add(kwargs["object_id"])
            else:
                book.saw_capsule(kwargs["object_id"])

    @app.get("/host/v1/health")
    async def health() -> Any:
        try:
            return await call("health", {})
        except Exception as exc:  # noqa: BLE001 - every failure goes back as an error body
            return _error(exc)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(await metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/host/v1/start")
    async def start(request: Request) -> Any:
        """The control plane's view, once it has one: capsules it does not know are removed (as
        `LocalHostAgent.start` does for its own process; this agent was started already)."""
        try:
            known = wire.decode_args("start", await _json(request))["known"]
            if on_start is not None:
                report = await on_start(known)
                book.capsule_ids = set(report.running) | set(report.paused)
                return wire.encode(report)
            lost = []
            for cid in sorted(book.capsule_ids - set(known)):
                await call("destroy", {"capsule_id": cid})
                lost.append(cid)
            inv = await book.inventory()
            by = {s: sorted(c for c, rt in inv.capsules.items() if rt.state == s) for s in ("running", "paused")}
            errors = {c: "the capsule's VM stopped without a pause to go back to"
                      for c, rt in inv.capsules.items() if rt.state == "error"}
            return wire.encode(api.ReconcileReport(by["running"], by["paused"], lost, errors))
        except Exception as exc:  # noqa: BLE001
            return _error(exc)

    @app.post("/host/v1/attach")
    async def attach(request: Request) -> Any:
        return await _events("attach", request)

    @app.post("/host/v1/pty_attach")
    async def pty_attach(request: Request) -> Any:
        return await _events("pty_attach", request)

    async def _events(method: str, request: Request) -> Any:
        try:
            kwargs = wire.decode_args(method, await _json(request))
        except Exception as exc:  # noqa: BLE001
            return _error(exc)

        async def lines() -> AsyncIterator[bytes]:
            async with contextlib.aclosing(getattr(agent, method)(**kwargs)) as events:
                try:
                    async for event in events:
                        yield json.dumps(wire.encode(event)).encode() + b"\n"
                except Exception as exc:  # noqa: BLE001 - ends the stream with the error
                    yield json.dumps(wire.error_to_wire(exc)).encode() + b"\n"

        return StreamingResponse(lines(), media_type=NDJSON)

    async def _bytes_out(method: str, request: Request) -> Any:
        """A method whose answer is bytes (read_file_stream, read_archive), chunked: an error
        before the first byte is a JSON error, a failure later cuts the response short."""
        chunks = None
        try:
            kwargs = wire.decode_args(method, await _json(request))
            chunks = getattr(agent, method)(**kwargs)
            try:  # the first chunk says whether there is anything to send
                first = await anext(chunks)
            except StopAsyncIteration:
                first = b""
        except Exception as exc:  # noqa: BLE001
            if chunks is not None:
                await chunks.aclose()
            return _error(exc)

        async def body() -> AsyncIterator[bytes]:
            async with contextlib.aclosing(chunks):
                if first:
                    yield first
                async for chunk in chunks:
                    yield chunk

        return StreamingResponse(body(), media_type="application/octet-stream")

    @app.post("/host/v1/read_file_stream")
    async def read_file_stream(request: Request) -> Any:
        return await _bytes_out("read_file_stream", request)

    @app.post("/host/v1/write_file")
    async def write_file(request: Request, capsule_id: str, path: str) -> Any:
        stream = request.stream()

        async def chunks() -> AsyncIterator[bytes]:
            async for chunk in stream:
                if chunk:
                    yield chunk

        try:
            size = await call("write_file", {"capsule_id": capsule_id, "path": path, "data": chunks()})
            return size
        except Exception as exc:  # noqa: BLE001
            # Read what the client still sends, so that it gets to read this answer.
            with contextlib.suppress(Exception):
                async for _ in stream:
                    pass
            return _error(exc)

    @app.post("/host/v1/read_archive")
    async def read_archive(request: Request) -> Any:
        """A template or paused capsule as one archive stream (wrenn_host/archive.py), for another
        host (a stream cut short is refused there: every file is checked against the manifest)."""
        return await _bytes_out("read_archive", request)

    @app.post("/host/v1/write_archive")
    async def write_archive(request: Request, kind: str, object_id: str) -> Any:
        """The archive another host's read_archive sent, as the streamed request body; its manifest
        in the `X-Wrenn-Manifest` header (JSON, base64url)."""
        stream = request.stream()

        async def chunks() -> AsyncIterator[bytes]:
            async for chunk in stream:
                if chunk:
                    yield chunk

        try:
            try:
                raw = base64.urlsafe_b64decode(request.headers.get("x-wrenn-manifest", ""))
                manifest = api.from_wire(api.ArchiveManifest, json.loads(raw))
            except ValueError as exc:
                raise wire.InvalidCall(f"write_archive: a manifest is needed (X-Wrenn-Manifest): {exc}") from exc
            await call("write_archive", {"kind": kind, "object_id": object_id, "data": chunks(),
                                         "manifest": manifest})
            return None
        except Exception as exc:  # noqa: BLE001
            with contextlib.suppress(Exception):  # read the rest, so the sender gets to read this answer
                async for _ in stream:
                    pass
            return _error(exc)

    @app.websocket("/host/v1/tcp_connect")
    async def tcp_connect(ws: WebSocket, capsule_id: str, port: int) -> None:
        await _tunnel(ws, agent, metrics, capsule_id, port)

    @app.post("/host/v1/{method}")
    async def rpc(method: str, request: Request) -> Any:
        try:
            if method not in RPC:
                raise wire.InvalidCall(f"no host agent method {method!r}")
            kwargs = wire.decode_args(method, await _json(request))
            return JSONResponse(wire.encode(await call_until_gone(method, kwargs, request)))
        except Exception as exc:  # noqa: BLE001
            return _error(exc)

    return BearerAuth(app, control_token)


RPC = set(wire.rpc_methods()) - {"start", "health"}


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is read already, so only that can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise wire.InvalidCall(f"request body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise wire.InvalidCall("request body must be a JSON object")
    return body


async def _tunnel(ws: WebSocket, agent: api.HostAgent, metrics: HostMetrics, capsule_id: str, port: int) -> None:
    """One TCP connection into a capsule. After the first text message (``{"ok": true}`` or an
    error, which closes), binary messages are the connection's bytes both ways; a text
    ``{"eof": true}`` is a half-close (either way); a text error from the host ends it."""
    await ws.accept()
    try:
        tunnel = await agent.tcp_connect(capsule_id, port)
    except Exception as exc:  # noqa: BLE001
        await ws.send_json(wire.error_to_wire(exc))
        await ws.close()
        return
    metrics.tunnels.inc()
    await ws.send_json({"ok": True})

    async def downstream() -> None:  # service -> client
        try:
            while data := await tunnel.read():
                await ws.send_bytes(data)
            await ws.send_json({"eof": True})
        except api.HostAgentError as exc:
            with contextlib.suppress(Exception):
                await ws.send_json(wire.error_to_wire(exc))
                await ws.close()

    down = asyncio.create_task(downstream())
    try:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                break
            if msg.get("bytes") is not None:
                await tunnel.write(msg["bytes"])
            elif msg.get("text") and json.loads(msg["text"]).get("eof"):
                await tunnel.write_eof()
    except api.HostAgentError as exc:
        with contextlib.suppress(Exception):
            await ws.send_json(wire.error_to_wire(exc))
            await ws.close()
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        down.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await down
        await tunnel.close()
        metrics.tunnels.dec()
