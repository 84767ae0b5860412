"""The SDK's streaming calls (commands.stream/connect, pty, pty_connect), sync and async, against
a real uvicorn server running the control plane over the fake host agent."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from wrenn import (
    AsyncCapsule,
    Capsule,
    PtyEventType,
    StreamErrorEvent,
    StreamExitEvent,
    StreamStartEvent,
    StreamStderrEvent,
    StreamStdoutEvent,
    WrennAuthenticationError,
    WrennClient,
    WrennError,
)
from wrenn._ws import ws_url
from wrenn.pty import pty_event
from wrenn_host.api import StreamEvent

from .fake_host_agent import FakeHostAgent, make_settings


class Server:
    def __init__(self, base_url: str, key: str, fake: FakeHostAgent):
        self.base_url, self.key, self.fake = base_url, key, fake

    def capsule(self) -> Capsule:
        return Capsule(api_key=self.key, base_url=self.base_url, wait=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    from wrenn_control.app import create_app

    settings = make_settings(tmp_path_factory.mktemp("sdk-stream"))
    fake = FakeHostAgent()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(create_app(settings, fake), host="127.0.0.1", port=port,
                                       log_level="warning", lifespan="on"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    yield Server(f"http://127.0.0.1:{port}/api", settings.bootstrap_api_key, fake)
    uv.should_exit = True
    thread.join(10)


def test_ws_url():
    assert ws_url("http://h:8000/api", "/v1/x") == "ws://h:8000/api/v1/x"
    assert ws_url("https://app.wrenn.dev/api/", "v1/x", {"a": "b c"}) == "wss://app.wrenn.dev/api/v1/x?a=b+c"


def test_pty_event_parsing():
    assert pty_event(b"\x1b[1m").data == b"\x1b[1m"
    assert pty_event({"type": "output", "data": "aGk="}).data == b"hi"
    started = pty_event({"type": "started", "tag": "t", "pid": 7})
    assert (started.type, started.tag, started.pid) == (PtyEventType.started, "t", 7)
    assert pty_event({"type": "error", "data": "x"}).fatal is False
    assert pty_event({"type": "exit"}).exit_code == -1
    assert pty_event({"type": "shiny"}).type == "shiny"


def test_stream_events_sync(server):
    with server.capsule() as cap:
        pid = server.fake._next_pid + 1
        server.fake.attach_events[pid] = [StreamEvent("stdout", b"1\n"), StreamEvent("stderr", b"e\n"),
                                          StreamEvent("exit", exit_code=4)]
        events = list(cap.commands.stream("echo 1; echo e >&2; exit 4"))
        assert events == [StreamStartEvent(pid), StreamStdoutEvent("1\n"), StreamStderrEvent("e\n"),
                          StreamExitEvent(4)]
        assert repr(events[0]) == f"StreamStartEvent(type='start', pid={pid})"
        # Leaving early closes the socket, which kills the command.
        pid = server.fake._next_pid + 1
        server.fake.attach_events[pid] = [StreamEvent("stdout", b"tick\n"), StreamEvent("hang")]
        for event in cap.commands.stream("sleep", ["100"]):
            if event.type == "stdout":
                break
        deadline = time.monotonic() + 5
        while not (ev := server.fake.kill_events.get((cap.id, pid))) or not ev.is_set():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # connect() to an unknown process: an error event ends the stream.
        assert list(cap.commands.connect("nope")) == [StreamErrorEvent("no process 'nope'")]


def test_stream_bad_key_is_an_error_event(server):
    with server.capsule() as cap:
        bad = Capsule(_capsule_id=cap.id, _client=WrennClient(api_key="wrn_" + "0" * 32, base_url=server.base_url))
        assert list(bad.commands.stream("true")) == [StreamErrorEvent("invalid API key")]
        with pytest.raises(WrennError, match="invalid API key"):
            bad.pty()
        with pytest.raises(WrennAuthenticationError):
            bad.get_info()
        bad.close()


def test_pty_sync_session_detach_and_reconnect(server):
    with server.capsule() as cap:
        with cap.pty(cols=90, rows=20, tag="work") as term:
            assert (term.tag, term.pid) == ("work", server.fake.ptys[(cap.id, "work")].info.pid)
            assert next(term).type == PtyEventType.started
            assert next(term).data == b"started /bin/bash 90x20\r\n"
            term.write("héllo")
            assert next(term).data == "echo:héllo".encode()
            term.resize(100, 30)
            assert next(term).data == b"resized 100x30\r\n"
            with pytest.raises(ValueError):
                term.resize(0, 10)
            term.detach()
        assert server.fake.ptys[(cap.id, "work")].info.running  # detached: not killed
        with cap.pty_connect("work") as again:
            assert again.pid == term.pid
            seen = b""
            for event in again:
                if event.type == PtyEventType.output:
                    seen += event.data
                if b"resized" in seen:
                    break
            assert seen.startswith(b"started /bin/bash 90x20") and "echo:héllo".encode() in seen
        # Leaving the block without detaching kills it.
        deadline = time.monotonic() + 5
        while server.fake.ptys[(cap.id, "work")].info.running:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(WrennError, match="no PTY session"):
            cap.pty_connect("missing")


async def test_async_stream_and_pty(server):
    async with AsyncCapsule(api_key=server.key, base_url=server.base_url, wait=True) as cap:
        pid = server.fake._next_pid + 1
        server.fake.attach_events[pid] = [StreamEvent("stdout", b"a"), StreamEvent("exit", exit_code=0)]
        events = [e async for e in cap.commands.stream("printf a")]
        assert events == [StreamStartEvent(pid), StreamStdoutEvent("a"), StreamExitEvent(0)]
        async with cap.pty("/bin/sh") as term:
            assert term.tag.startswith("pty-")
            await term.write(b"x")
            out = b""
            async for event in term:
                if event.type == "output":
                    out += event.data
                if b"echo:x" in out:
                    break
            await term.kill()
            last = None
            async for event in term:
                last = event
            assert last is not None and last.type == "exit" and last.exit_code == -9
        with pytest.raises(TimeoutError):
            term2 = await cap.pty()
            try:
                await term2.receive()  # started
                await term2.receive()  # banner
                await term2.receive(timeout=0.2)  # nothing more
            finally:
                await term2.__aexit__(None, None, None)
        await asyncio.sleep(0)
