"""Framing, the agent's read loop on a virtio-like channel, identity side effects, and GuestClient
against a scripted peer (no agent process)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import wrenn_guest
from wrenn_guest import system
from wrenn_guest.protocol import MAGIC, MAX_PAYLOAD, PREFIX, FrameDecoder, encode_frame
from wrenn_guest.server import Server
from wrenn_host.api import GuestError, HostAgentError
from wrenn_host.guest import GuestClient

# framing


def test_frame_layout():
    frame = encode_frame({"id": 1, "type": "data"}, b"\x00\x01")
    head = b'{"id":1,"type":"data"}'
    assert frame == b"WRNF" + struct.pack(">II", len(head), 2) + head + b"\x00\x01"
    with pytest.raises(ValueError):
        encode_frame({"id": 1}, b"x" * (MAX_PAYLOAD + 1))


def test_decoder_byte_by_byte_and_resync():
    frames = [({"id": i, "op": "ping"}, bytes([i]) * i) for i in range(1, 4)]
    stream = b"junk WR" + encode_frame(*frames[0]) + b"WRNFxx" + encode_frame(*frames[1]) \
        + PREFIX.pack(MAGIC, 3, 0) + b"[1]" + encode_frame(*frames[2])  # a non-object header is skipped
    decoder, got = FrameDecoder(), []
    for i in range(len(stream)):
        got += decoder.feed(stream[i:i + 1])
    assert got == frames
    assert decoder.skipped > 0


def test_decoder_keeps_a_split_magic():
    frame = encode_frame({"id": 9}, b"p")
    decoder = FrameDecoder()
    assert decoder.feed(b"garbage" + frame[:3]) == []
    assert decoder.feed(frame[3:]) == [({"id": 9}, b"p")]


# the agent's read loop on a device that reads EOF while no host is connected


class Stop(Exception):
    pass


def test_server_retries_eof_and_drops_half_frames():
    half = encode_frame({"id": 1, "op": "ping"})
    reads = [half[:10], b"", b"", half[10:] + encode_frame({"id": 2, "op": "ping"})]
    written, sleeps = bytearray(), []
    answered = threading.Event()

    def read(n):
        if reads:
            return reads.pop(0)
        answered.wait(5)
        raise Stop

    def write(data):
        written.extend(data)
        answered.set()
        return len(data)

    server = Server({"ping": lambda req: {"pong": req.id}}, read, write, sleep=sleeps.append)
    with pytest.raises(Stop):
        server.serve(retry_on_eof=True)
    assert sleeps == [0.05, 0.05]  # waited at each EOF instead of exiting
    # the half frame from before the disconnect was dropped, not completed by later bytes
    assert FrameDecoder().feed(bytes(written)) == [({"id": 2, "type": "result", "pong": 2}, b"")]


def test_server_exits_at_eof_in_fd_mode():
    server = Server({}, lambda n: b"", lambda b: len(b), sleep=lambda s: pytest.fail("slept"))
    server.serve(retry_on_eof=False)


# identity side effects (never applied to the machine running the tests)


class FakeRequest:
    def __init__(self, **params):
        self.params = params


def identity_params(**over):
    return {"capsule_id": "cap-7", "hostname": "cap-7", "seed": base64.b64encode(b"s" * 32).decode(),
            "time_ns": 1_700_000_000_123_456_789, **over}


def test_identity_applies_each_step_best_effort(monkeypatch):
    monkeypatch.delenv("WRENN_GUEST_TEST", raising=False)
    calls = []

    def refuse(arg):
        calls.append(("hostname", arg))
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(system, "EFFECTS", {"clock": lambda a: calls.append(("clock", a)), "hostname": refuse,
                                            "rng": lambda a: calls.append(("rng", a))})
    assert system.identity(FakeRequest(**identity_params())) == {"version": wrenn_guest.__version__}
    assert calls == [("clock", 1_700_000_000_123_456_789), ("hostname", "cap-7"), ("rng", b"s" * 32)]
    assert system.capsule_id == "cap-7"


def test_identity_is_skipped_in_test_mode(monkeypatch):
    monkeypatch.setenv("WRENN_GUEST_TEST", "1")
    monkeypatch.setattr(system, "EFFECTS", {k: lambda a: pytest.fail("side effect") for k in ("clock", "hostname", "rng")})
    assert system.identity(FakeRequest(**identity_params())) == {"version": wrenn_guest.__version__}


@pytest.mark.parametrize("bad", [{"seed": base64.b64encode(b"x" * 31).decode()}, {"seed": "not base64!"},
                                 {"hostname": ""}, {"time_ns": "now"}, {"capsule_id": None}])
def test_identity_rejects_bad_params(bad):
    with pytest.raises(system.AgentError) as err:
        system.identity(FakeRequest(**identity_params(**bad)))
    assert err.value.code == "invalid"


def test_seed_rng_ioctls(monkeypatch):
    calls = []
    monkeypatch.setattr(fcntl, "ioctl", lambda f, req, arg=0: calls.append((req, arg)))
    seed = bytes(range(40))
    system.seed_rng(seed)
    assert calls == [(0x40085203, struct.pack("ii", 320, 40) + seed), (0x5207, 0)]


# GuestClient against a scripted peer


@contextlib.asynccontextmanager
async def client_and_peer():
    host_end, peer = socket.socketpair()
    peer.settimeout(5)
    reader, writer = await asyncio.open_connection(sock=host_end)
    client = GuestClient.from_streams(reader, writer)
    try:
        yield client, peer
    finally:
        await client.close()
        peer.close()


async def read_requests(peer: socket.socket, count: int) -> list[dict]:
    decoder, frames = FrameDecoder(), []
    while len(frames) < count:
        frames += decoder.feed(await asyncio.to_thread(peer.recv, 65536))
    return [h for h, _ in frames]


async def test_client_resyncs_and_ignores_stale_frames():
    async with client_and_peer() as (client, peer):
        call = asyncio.create_task(client.call("ping"))
        (req,) = await read_requests(peer, 1)
        assert req["op"] == "ping" and isinstance(req["id"], int)
        peer.sendall(b"\x00\xff leftovers of an earlier connection WR"
                     + PREFIX.pack(MAGIC, 4, 0) + b"{bad"
                     + encode_frame({"id": req["id"] - 1, "type": "result", "stale": True})
                     + encode_frame({"id": req["id"], "type": "data", "stream": "stdout"}, b"ab")
                     + encode_frame({"id": req["id"], "type": "result", "version": "x"}, b"c"))
        header, payload = await asyncio.wait_for(call, 5)
        assert header["version"] == "x" and "stale" not in header
        assert payload == b"abc"  # data frames are joined in front of the result's payload


async def test_client_request_ids_are_unique():
    async with client_and_peer() as (client, peer):
        tasks = [asyncio.create_task(client.call("ping")) for _ in range(20)]
        reqs = await read_requests(peer, 20)
        assert len({r["id"] for r in reqs}) == 20
        peer.sendall(b"".join(encode_frame({"id": r["id"], "type": "error", "code": "internal", "message": "m"})
                              for r in reqs))
        for task in tasks:
            with pytest.raises(GuestError) as err:
                await task
            assert err.value.code == "internal" and err.value.message == "m"


async def test_client_connection_loss_fails_calls_and_streams():
    async with client_and_peer() as (client, peer):
        call = asyncio.create_task(client.call("exec", cmd="sleep"))

        async def consume():
            return [f async for f in client.stream("attach", target=1)]

        stream = asyncio.create_task(consume())
        await read_requests(peer, 2)
        peer.close()
        for task in (call, stream):
            with pytest.raises(HostAgentError, match="^guest agent connection lost$"):
                await asyncio.wait_for(task, 5)
        with pytest.raises(HostAgentError, match="connection lost"):
            await client.call("ping")


async def test_stream_sends_cancel_when_consumer_stops():
    async with client_and_peer() as (client, peer):
        async def consume():
            async with contextlib.aclosing(client.stream("attach", target="t")) as frames:
                async for header, data in frames:
                    return data

        task = asyncio.create_task(consume())
        (req,) = await read_requests(peer, 1)
        peer.sendall(encode_frame({"id": req["id"], "type": "data", "stream": "stdout"}, b"tick"))
        assert await asyncio.wait_for(task, 5) == b"tick"
        (cancel,) = await read_requests(peer, 1)
        assert cancel == {"id": req["id"], "type": "cancel"}
        # late frames for the cancelled request are dropped; the client keeps working
        peer.sendall(encode_frame({"id": req["id"], "type": "result", "exit_code": None}))
        ping = asyncio.create_task(client.call("ping"))
        (req2,) = await read_requests(peer, 1)
        peer.sendall(encode_frame({"id": req2["id"], "type": "result", "version": "v"}))
        assert (await asyncio.wait_for(ping, 5))[0]["version"] == "v"
        assert client._pending == {}


async def test_upload_splits_into_frames_and_stops_on_early_error():
    async with client_and_peer() as (client, peer):
        upload = asyncio.create_task(client.upload("file_write", b"x" * (MAX_PAYLOAD * 2 + 5), path="/f"))
        decoder, frames = FrameDecoder(), []
        while len(frames) < 5:
            frames += decoder.feed(await asyncio.to_thread(peer.recv, 1 << 20))
        rid = frames[0][0]["id"]
        assert [h.get("type", h.get("op")) for h, _ in frames] == ["file_write", "data", "data", "data", "end"]
        assert [len(p) for _, p in frames[1:4]] == [MAX_PAYLOAD, MAX_PAYLOAD, 5]
        peer.sendall(encode_frame({"id": rid, "type": "result", "size": 5}))
        assert (await upload)["size"] == 5

        async def endless():
            while True:
                yield b"y" * 1000
                await asyncio.sleep(0.01)

        upload = asyncio.create_task(client.upload("file_write", endless(), path="/"))
        req = (await read_requests(peer, 1))[0]
        peer.sendall(encode_frame({"id": req["id"], "type": "error", "code": "is_directory", "message": "/"}))
        with pytest.raises(GuestError) as err:
            await asyncio.wait_for(upload, 5)
        assert err.value.code == "is_directory"


async def test_connect_unix_waits_for_the_socket(tmp_path):
    path = str(tmp_path / "agent.sock")

    async def serve_later():
        await asyncio.sleep(0.3)
        return await asyncio.start_unix_server(lambda r, w: None, path)

    server_task = asyncio.create_task(serve_later())
    started = time.monotonic()
    client = await GuestClient.connect_unix(path, timeout=5)
    assert time.monotonic() - started >= 0.25
    await client.close()
    (await server_task).close()
    with pytest.raises(HostAgentError):
        await GuestClient.connect_unix(str(tmp_path / "never.sock"), timeout=0.2)


async def test_wait_ready_times_out_on_a_silent_peer():
    async with client_and_peer() as (client, peer):
        started = time.monotonic()
        with pytest.raises(HostAgentError, match="did not answer"):
            await client.wait_ready(timeout=0.5)
        assert time.monotonic() - started < 2


def test_agent_needs_only_the_standard_library():
    src = str(Path(wrenn_guest.__file__).resolve().parent.parent)
    code = (f"import sys; sys.path.insert(0, {src!r}); import wrenn_guest.__main__; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('wrenn_host', 'wrenn', 'wrenn_control')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-S", "-c", code], check=True, timeout=30)  # -S: no site-packages
