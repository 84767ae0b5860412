"""Host side of the guest agent channel (wire protocol: src/wrenn_guest/PROTOCOL.md).

One `GuestClient` per connection to a capsule's virtio-serial port. Requests are multiplexed by id:
a background task reads frames and hands each to the queue of the request it belongs to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from typing import Any

from wrenn_guest.protocol import MAX_PAYLOAD, FrameDecoder, encode_frame

from .api import GuestError, HostAgentError, Tunnel

log = logging.getLogger(__name__)

READ_SIZE = 1 << 20
STREAM_LIMIT = 4 << 20  # asyncio StreamReader buffer; the default 64 KiB makes big reads slow
QUEUE_FRAMES = 64  # frames buffered per request before the reader waits for its consumer
PING_ATTEMPT_SEC = 1.0
LOST = "guest agent connection lost"
_LOST = object()  # queue marker: the connection is gone
_CLOSED = object()  # queue marker: the tunnel was closed by its owner

Chunks = bytes | bytearray | memoryview | AsyncIterable[bytes] | Iterable[bytes]


class GuestClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        """Use `connect_unix` or `from_streams` (inside a running event loop)."""
        self._reader = reader
        self._writer = writer
        self._decoder = FrameDecoder()  # skips to the first magic: whatever an earlier host left half-read
        self._pending: dict[int, asyncio.Queue] = {}
        # Requests that see some frames as soon as they arrive, before their queue (tunnels: `ack`s
        # are handled here and never queued; the end of the request is seen too). None: lost.
        self._watchers: dict[int, Callable[[dict[str, Any] | None], None]] = {}
        # Random first id: frames still queued in the port for an earlier connection cannot
        # be mistaken for answers to this one.
        self._next_id = random.randrange(1, 1 << 31)
        self._lost: str | None = None  # set once the connection is gone (why)
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    def from_streams(cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> GuestClient:
        return cls(reader, writer)

    @classmethod
    async def connect_unix(cls, path: str, timeout: float = 10.0) -> GuestClient:
        """Connect to the unix socket QEMU exposes for the port, retrying until it exists."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(str(path), limit=STREAM_LIMIT),
                    max(deadline - loop.time(), 0.01))
                return cls.from_streams(reader, writer)
            except (FileNotFoundError, ConnectionRefusedError, asyncio.TimeoutError) as exc:
                if loop.time() >= deadline:
                    raise HostAgentError(f"cannot connect to guest agent at {path}: {exc!r}") from exc
                await asyncio.sleep(0.05)

    @property
    def closed(self) -> bool:
        return self._lost is not None

    async def __aenter__(self) -> GuestClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def close(self) -> None:
        if self._lost is None:
            self._lost = "guest agent connection closed"
        self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader_task
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    async def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        """Ping until the agent answers; returns the ping result. Pings sent before the agent
        opened its port are answered late or not at all, hence the short attempts."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise HostAgentError(f"guest agent did not answer within {timeout}s")
            try:
                header, _ = await asyncio.wait_for(self.call("ping"), min(PING_ATTEMPT_SEC, remaining))
                return header
            except asyncio.TimeoutError:
                continue

    async def call(self, op: str, payload: bytes = b"", **params: Any) -> tuple[dict[str, Any], bytes]:
        """Run one request; returns (result header, payload). `data` frames the guest sent before
        the result (exec output too big for one frame, file_read chunks) are joined in front of
        the result's payload, so the payload is always the request's whole output."""
        rid, queue = self._open()
        finished = False
        try:
            await self._send({"id": rid, "op": op, **params}, payload)
            chunks = []
            while True:
                header, data = await self._next(queue)
                kind = header.get("type")
                if kind == "data":
                    chunks.append(data)
                    continue
                finished = kind in ("result", "error")
                if kind == "error":
                    raise _guest_error(header)
                if kind == "result":
                    chunks.append(data)
                    return header, b"".join(chunks)
        finally:
            self._discard(rid, cancel=not finished)  # e.g. our caller timed out: tell the guest

    async def stream(self, op: str, **params: Any) -> AsyncIterator[tuple[dict[str, Any], bytes]]:
        """Yield every frame of a request, the final `result` included; raise GuestError on
        `error`. Leaving the loop early sends `cancel` (use contextlib.aclosing to do it at once)."""
        rid, queue = self._open()
        finished = False
        try:
            await self._send({"id": rid, "op": op, **params})
            while True:
                header, data = await self._next(queue)
                kind = header.get("type")
                if kind == "error":
                    finished = True
                    raise _guest_error(header)
                if kind == "result":
                    finished = True
                    yield header, data
                    return
                yield header, data
        finally:
            self._discard(rid, cancel=not finished)

    async def upload(self, op: str, chunks: Chunks, **params: Any) -> dict[str, Any]:
        """Start `op`, send `chunks` as `data` frames (≤ 1 MiB each) then `end`; return the result."""
        rid, queue = self._open()
        finished = False
        try:
            await self._send({"id": rid, "op": op, **params})
            answered = queue.qsize  # the guest answered already (an error): stop sending
            async for piece in _pieces(chunks, stop=answered):
                if answered():
                    break
                await self._send({"id": rid, "type": "data"}, piece)
            if not answered():
                await self._send({"id": rid, "type": "end"})
            while True:
                header, _ = await self._next(queue)
                kind = header.get("type")
                if kind == "error":
                    finished = True
                    raise _guest_error(header)
                if kind == "result":
                    finished = True
                    return header
        finally:
            self._discard(rid, cancel=not finished)

    async def open_tunnel(self, op: str = "tcp_connect", **params: Any) -> GuestTunnel:
        """Start a byte-stream request (`tcp_connect`) and wait until the guest has connected.
        Raises GuestError (code "refused": nothing listens there)."""
        rid, queue = self._open()
        tunnel = GuestTunnel(self, rid, queue)
        self._watchers[rid] = tunnel._watch
        try:
            await self._send({"id": rid, "op": op, **params})
            header, _ = await self._next(queue)
            kind = header.get("type")
            if kind == "error":
                tunnel._finished = True
                raise _guest_error(header)
            if kind != "connected":
                raise HostAgentError(f"guest agent answered {op} with an unexpected {kind!r} frame")
        except BaseException:
            await tunnel.close()
            raise
        return tunnel

    # internals

    def _open(self) -> tuple[int, asyncio.Queue]:
        if self._lost is not None:
            raise HostAgentError(self._lost)
        rid = self._next_id
        self._next_id += 1
        queue: asyncio.Queue = asyncio.Queue(QUEUE_FRAMES)
        self._pending[rid] = queue
        return rid, queue

    def _discard(self, rid: int, *, cancel: bool) -> None:
        self._watchers.pop(rid, None)
        queue = self._pending.pop(rid, None)
        if queue is not None:
            while not queue.empty():  # the reader may be waiting to put into it
                queue.get_nowait()
        if cancel and self._lost is None and not self._writer.is_closing():
            self._writer.write(encode_frame({"id": rid, "type": "cancel"}))

    def _send_nowait(self, header: dict[str, Any]) -> None:
        """A small frame that need not wait for the channel (an `ack`)."""
        if self._lost is None and not self._writer.is_closing():
            self._writer.write(encode_frame(header))

    async def _send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        if self._lost is not None:
            raise HostAgentError(self._lost)
        try:
            self._writer.write(encode_frame(header, payload))
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            raise HostAgentError(LOST) from exc

    async def _next(self, queue: asyncio.Queue) -> tuple[dict[str, Any], bytes]:
        if queue.empty() and self._lost is not None:
            raise HostAgentError(self._lost)
        item = await queue.get()
        if item is _LOST:
            raise HostAgentError(self._lost or LOST)
        return item

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._reader.read(READ_SIZE)
                if not data:
                    break
                skipped = self._decoder.skipped
                for header, payload in self._decoder.feed(data):
                    watcher = self._watchers.get(header.get("id"))
                    if watcher is not None:
                        watcher(header)
                        if header.get("type") == "ack":
                            continue
                    queue = self._pending.get(header.get("id"))
                    if queue is not None:  # else: a request we gave up on, or a stale frame
                        await queue.put((header, payload))
                if self._decoder.skipped != skipped:
                    log.debug("guest channel: skipped %d bytes to resync", self._decoder.skipped - skipped)
        except (ConnectionError, OSError) as exc:
            log.debug("guest channel read failed: %r", exc)
        finally:
            if self._lost is None:
                self._lost = LOST
            for watcher in list(self._watchers.values()):
                watcher(None)
            for queue in self._pending.values():
                if not queue.full():  # a full queue's consumer sees _lost once it has drained it
                    queue.put_nowait(_LOST)


# Host -> guest data frames of one tunnel in flight (not yet acknowledged): below the guest's
# per-request inbox (8 frames), so that neither the `end` nor the data ever make the guest's read
# loop wait for a service that does not read.
TUNNEL_WINDOW_FRAMES = 6
TUNNEL_ACK_EVERY = 4  # guest -> host data frames consumed per `ack` (the guest's window is 8)


class GuestTunnel(Tunnel):
    """The host end of a `tcp_connect` request (see PROTOCOL.md for the flow control)."""

    def __init__(self, client: GuestClient, rid: int, queue: asyncio.Queue):
        self._client = client
        self._rid = rid
        self._queue = queue
        self._in_flight = 0  # our data frames the guest has not acknowledged
        self._credit = asyncio.Event()
        self._credit.set()
        self._to_ack = 0  # guest data frames consumed, not acknowledged yet
        self._eof = False  # the service closed its side (or the request ended)
        self._finished = False  # the guest answered result/error: the request is over
        self._over = False  # for writers: finished, closed or lost
        self._closed = False

    def _watch(self, header: dict[str, Any] | None) -> None:
        """From the read loop: an ack, the request's last frame, or None (connection lost)."""
        kind = None if header is None else header.get("type")
        if kind == "ack":
            frames = header.get("frames", 1) if header else 1
            self._in_flight = max(0, self._in_flight - (frames if isinstance(frames, int) else 1))
        elif kind in ("result", "error"):
            self._over = self._finished = True
        elif kind is None:
            self._over = True
        else:
            return
        self._credit.set()

    async def read(self) -> bytes:
        while not self._eof:
            if self._queue.empty() and self._client._lost is not None:
                raise HostAgentError(self._client._lost)
            item = await self._queue.get()
            if item is _CLOSED:
                break
            if item is _LOST:
                raise HostAgentError(self._client._lost or LOST)
            header, data = item
            kind = header.get("type")
            if kind == "data":
                self._to_ack += 1
                if self._to_ack >= TUNNEL_ACK_EVERY:
                    self._client._send_nowait({"id": self._rid, "type": "ack", "frames": self._to_ack})
                    self._to_ack = 0
                if data:
                    return data
            elif kind == "end":
                self._eof = True
            elif kind == "result":
                self._eof = self._finished = True
            elif kind == "error":
                self._eof = self._finished = True
                raise _guest_error(header)
        return b""

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            while self._in_flight >= TUNNEL_WINDOW_FRAMES and not (self._over or self._closed):
                self._credit.clear()
                await self._credit.wait()
            if self._over or self._closed:
                raise HostAgentError("the connection is closed")
            self._in_flight += 1
            await self._client._send({"id": self._rid, "type": "data"}, bytes(view[:MAX_PAYLOAD]))
            view = view[MAX_PAYLOAD:]

    async def write_eof(self) -> None:
        if not (self._over or self._closed):
            await self._client._send({"id": self._rid, "type": "end"})

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._eof = True
            self._credit.set()
            self._client._discard(self._rid, cancel=not self._finished)
            self._queue.put_nowait(_CLOSED)  # wakes a read() waiting in another task

    @property
    def open(self) -> bool:
        return not self._closed


def _guest_error(header: dict[str, Any]) -> GuestError:
    code = header.get("code") or "internal"
    return GuestError(header.get("message") or code, code=code)


async def _pieces(chunks: Chunks, stop: Callable[[], Any] = lambda: False) -> AsyncIterator[bytes]:
    """Any accepted `chunks` as pieces of MAX_PAYLOAD bytes (the last one shorter; no empty one).
    Small chunks (an HTTP body arrives in pieces of a few KiB) are gathered first: every frame
    costs the guest a hand-off and a write, so 1 MiB frames move data far faster than 64 KiB ones.
    Ends early, dropping what it holds, once `stop()` is true."""
    if isinstance(chunks, (bytes, bytearray, memoryview)):
        source: Any = _one(chunks)
    elif isinstance(chunks, AsyncIterable):
        source = chunks
    else:
        source = _async(chunks)
    pending = bytearray()
    async for chunk in source:
        if stop():  # checked per chunk, so gathering never delays noticing it
            return
        view = memoryview(chunk)
        if pending:
            take = min(MAX_PAYLOAD - len(pending), len(view))
            pending += view[:take]
            view = view[take:]
            if len(pending) < MAX_PAYLOAD:
                continue
            yield bytes(pending)
            pending.clear()
        while len(view) >= MAX_PAYLOAD:
            yield bytes(view[:MAX_PAYLOAD])
            view = view[MAX_PAYLOAD:]
        pending += view
    if pending:
        yield bytes(pending)


async def _one(data) -> AsyncIterator[bytes]:
    yield data


async def _async(items: Iterable[bytes]) -> AsyncIterator[bytes]:
    for item in items:
        yield item
