"""The guest agent's `tcp_connect` op (run as a subprocess over a socketpair) through GuestTunnel:
bytes both ways, half-close, refused ports, and flow control that never stalls the channel."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import threading

import pytest

from wrenn_host.api import GuestError, HostAgentError

from .test_guest_agent import agent, c, raw  # noqa: F401  (fixtures)
from .test_guest_agent import recv_frames
from wrenn_guest.protocol import encode_frame


class Server:
    """A TCP server on 127.0.0.1 whose connections run `handler(conn)` on threads."""

    def __init__(self, handler):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.handler = handler
        self.conns: list[socket.socket] = []
        self.done = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn):
        try:
            self.handler(conn)
        except OSError:
            pass
        finally:
            conn.close()
            self.done.set()

    def close(self):
        self.sock.close()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.close()


@pytest.fixture
def servers():
    made: list[Server] = []

    def make(handler) -> Server:
        made.append(Server(handler))
        return made[-1]

    yield make
    for s in made:
        s.close()


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


async def read_n(tunnel, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = await tunnel.read()
        assert data, f"EOF after {len(out)} of {n} bytes"
        out += data
    return bytes(out)


async def read_all(tunnel) -> bytes:
    return b"".join([chunk async for chunk in tunnel])


async def test_echo_both_ways_large(c, servers):
    srv = servers(echo)
    payload = os.urandom(6 * 1024 * 1024 + 123)
    async with await c.open_tunnel(port=srv.port) as t:
        await t.write(b"hello")
        assert await read_n(t, 5) == b"hello"
        # Writing and reading at once: many windows' worth each way.
        writer = asyncio.create_task(t.write(payload))
        got = await asyncio.wait_for(read_n(t, len(payload)), 60)
        await writer
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        await t.write_eof()  # echo sees EOF, closes: we read EOF, the request ends with a result
        assert await asyncio.wait_for(t.read(), 10) == b""
    assert not c._pending and not c._watchers


async def test_half_close_then_answer(c, servers):
    def count(conn):
        n = 0
        while data := conn.recv(65536):
            n += len(data)
        conn.sendall(f"got {n}".encode())

    srv = servers(count)
    t = await c.open_tunnel(port=srv.port)
    await t.write(b"x" * 3000)
    await t.write_eof()
    assert await asyncio.wait_for(read_all(t), 10) == b"got 3000"
    # the guest answered `result` (both sides closed): nothing to cancel
    for _ in range(100):
        if t._finished:
            break
        await asyncio.sleep(0.02)
    assert t._finished
    await t.close()
    assert not c._pending


async def test_service_closes_first(c, servers):
    srv = servers(lambda conn: conn.sendall(b"bye"))
    async with await c.open_tunnel(port=srv.port) as t:
        assert await asyncio.wait_for(read_all(t), 10) == b"bye"
    assert not c._pending
    assert (await c.call("ping"))[0]["type"] == "result"


async def test_refused_and_invalid(c):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(GuestError) as e:
            await c.open_tunnel(port=free)
    assert e.value.code == "refused"
    assert f"port {free}" in e.value.message
    for bad in (0, 70000, "80", None):
        with pytest.raises(GuestError) as e:
            await c.open_tunnel(port=bad)
        assert e.value.code == "invalid"
    assert not c._pending


async def test_service_not_reading_does_not_stall_channel(c, servers):
    stop = threading.Event()
    srv = servers(lambda conn: stop.wait(30))
    t = await c.open_tunnel(port=srv.port)
    writer = asyncio.create_task(t.write(b"z" * (64 * 1024 * 1024)))
    await asyncio.sleep(1.0)
    assert not writer.done()  # waits for acknowledgements: the agent does not buffer 64 MiB
    # other requests on the channel go on meanwhile
    header, _ = await asyncio.wait_for(c.call("ping"), 5)
    assert header["type"] == "result"
    await t.close()
    with pytest.raises(HostAgentError):
        await asyncio.wait_for(writer, 5)
    stop.set()
    assert (await asyncio.wait_for(c.call("ping"), 5))[0]["type"] == "result"


async def test_host_not_reading_does_not_stall_channel(c, servers):
    total = 48 * 1024 * 1024
    sent = []

    def flood(conn):
        chunk = b"y" * (1 << 20)
        for _ in range(total // len(chunk)):
            conn.sendall(chunk)
            sent.append(len(chunk))

    srv = servers(flood)
    t = await c.open_tunnel(port=srv.port)
    await asyncio.sleep(1.5)
    # The guest stopped reading the socket after its window; the socket buffers hold the rest.
    assert sum(sent) < total
    header, _ = await asyncio.wait_for(c.call("ping"), 5)
    assert header["type"] == "result"
    got = 0
    while data := await asyncio.wait_for(t.read(), 30):
        got += len(data)
    assert got == total
    await t.close()


async def test_cancel_closes_the_guest_socket(c, servers):
    closed = threading.Event()

    def wait_eof(conn):
        while conn.recv(65536):
            pass
        closed.set()

    srv = servers(wait_eof)
    t = await c.open_tunnel(port=srv.port)
    await t.write(b"abc")
    await t.close()
    assert await asyncio.to_thread(closed.wait, 10)
    assert not c._pending


async def test_read_wakes_on_close(c, servers):
    stop = threading.Event()
    srv = servers(lambda conn: stop.wait(30))
    t = await c.open_tunnel(port=srv.port)
    reader = asyncio.create_task(t.read())
    await asyncio.sleep(0.1)
    await t.close()
    assert await asyncio.wait_for(reader, 5) == b""
    stop.set()


def test_raw_frames(raw, servers):
    """The wire shapes: connected, data/tcp, ack, end, result."""
    srv = servers(echo)
    raw.sendall(encode_frame({"id": 7, "op": "tcp_connect", "port": srv.port}))
    (h, _), = recv_frames(raw, 1)
    assert h == {"id": 7, "type": "connected"}
    raw.sendall(encode_frame({"id": 7, "type": "data"}, b"ping"))
    frames = recv_frames(raw, 2)
    kinds = {f[0]["type"]: f for f in frames}
    assert kinds["ack"][0] == {"id": 7, "type": "ack", "frames": 1}
    assert kinds["data"][0] == {"id": 7, "type": "data", "stream": "tcp"} and kinds["data"][1] == b"ping"
    raw.sendall(encode_frame({"id": 7, "type": "ack", "frames": 1}))
    raw.sendall(encode_frame({"id": 7, "type": "end"}))
    frames = recv_frames(raw, 2)
    assert [f[0] for f in frames] == [{"id": 7, "type": "end"}, {"id": 7, "type": "result"}]
