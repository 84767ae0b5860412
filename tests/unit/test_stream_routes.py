"""Control plane WebSocket routes (exec/stream, processes/{pid}/stream, pty) over the fake host agent."""

from __future__ import annotations

import base64
import time
import warnings
from collections.abc import Iterator

import pytest
from starlette.websockets import WebSocketDisconnect

from wrenn_control.api.streams import MAX_TEXT_CHARS
from wrenn_host.api import StreamEvent

from .fake_host_agent import FakeHostAgent, make_settings

with warnings.catch_warnings():  # Starlette's TestClient (in-process WebSockets) would rather have httpx2
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


class App:
    def __init__(self, client: TestClient, fake: FakeHostAgent, key: str):
        self.client = client
        self.fake = fake
        self.key = key

    def capsule(self) -> str:
        resp = self.client.post("/api/v1/capsules", json={}, headers=self.headers())
        assert resp.status_code == 201, resp.text
        cid = resp.json()["id"]
        deadline = time.monotonic() + 5
        while self.get(cid)["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return cid

    def get(self, cid: str) -> dict:
        return self.client.get(f"/api/v1/capsules/{cid}", headers=self.headers()).json()

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"X-API-Key": key or self.key}

    def ws(self, path: str, key: str | None = None):
        return self.client.websocket_connect(f"/api/v1{path}", headers=self.headers(key))


@pytest.fixture
def app(tmp_path) -> Iterator[App]:
    from wrenn_control.app import create_app

    settings = make_settings(tmp_path)
    fake = FakeHostAgent()
    with TestClient(create_app(settings, fake)) as client:
        yield App(client, fake, settings.bootstrap_api_key)


def closed_with(ws) -> int:
    with pytest.raises(WebSocketDisconnect) as e:
        ws.receive_text()
    return e.value.code


def output_until(ws, needle: bytes, limit: int = 50) -> bytes:
    out = b""
    for _ in range(limit):
        out += ws.receive_bytes()
        if needle in out:
            return out
    raise AssertionError(f"{needle!r} not in {out!r}")


# ---- auth and state --------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/capsules/{}/exec/stream", "/capsules/{}/processes/1/stream", "/capsules/{}/pty"])
def test_bad_or_missing_key_is_an_error_then_policy_violation(app, path):
    cid = app.capsule()
    for key, message in (("wrn_" + "0" * 32, "invalid API key"), (None, "missing X-API-Key header")):
        headers = {"X-API-Key": key} if key else {}
        with app.client.websocket_connect(f"/api/v1{path.format(cid)}", headers=headers) as ws:
            msg = ws.receive_json()
            assert msg["type"] == "error" and msg["data"] == message
            if path.endswith("/pty"):
                assert msg["fatal"] is True
            assert closed_with(ws) == 1008
    assert app.fake.ops("spawn") == [] and app.fake.ops("pty_start") == []


def test_unknown_capsule_and_not_running(app):
    with app.ws("/capsules/cl-doesnotexist/exec/stream") as ws:
        assert ws.receive_json() == {"type": "error", "data": "capsule not found"}
        assert closed_with(ws) == 1008
    cid = app.capsule()
    assert app.client.post(f"/api/v1/capsules/{cid}/pause", headers=app.headers()).status_code == 200
    for path in ("exec/stream", "pty", "processes/1/stream"):
        with app.ws(f"/capsules/{cid}/{path}") as ws:
            msg = ws.receive_json()
            assert msg["type"] == "error" and msg["data"] == "capsule is paused; it must be running"
            assert closed_with(ws) == 1008


# ---- exec/stream -----------------------------------------------------------------------------


def test_exec_stream_events_in_order_and_text_split(app):
    cid = app.capsule()
    pid = app.fake._next_pid + 1
    euro = "€".encode()  # 3 bytes, split across two chunks below
    app.fake.attach_events[pid] = [
        StreamEvent("stdout", b"one\n"), StreamEvent("sleep", exit_code=0),
        StreamEvent("stderr", b"warn " + euro[:1]), StreamEvent("stderr", euro[1:] + b"\n"),
        StreamEvent("stdout", b"x" * (MAX_TEXT_CHARS + 10)),
        StreamEvent("stdout", b"\xff"),
        StreamEvent("exit", exit_code=3),
    ]
    with app.ws(f"/capsules/{cid}/exec/stream") as ws:
        ws.send_json({"type": "start", "cmd": "/bin/sh", "args": ["-c", "whatever"], "envs": {"A": "1"}})
        assert ws.receive_json() == {"type": "start", "pid": pid}
        got = [ws.receive_json() for _ in range(6)]
        assert got == [
            {"type": "stdout", "data": "one\n"},
            {"type": "stderr", "data": "warn "},
            {"type": "stderr", "data": "€\n"},
            {"type": "stdout", "data": "x" * MAX_TEXT_CHARS},
            {"type": "stdout", "data": "x" * 10},
            {"type": "stdout", "data": "\ufffd"},
        ]
        assert ws.receive_json() == {"type": "exit", "exit_code": 3}
        assert closed_with(ws) == 1000
    # The finished process is dropped from the table; the stream counted as activity.
    assert app.fake.ops("kill") == [cid]
    assert app.get(cid)["last_active_at"] is not None


def test_exec_stream_stop_kills(app):
    cid = app.capsule()
    pid = app.fake._next_pid + 1
    app.fake.attach_events[pid] = [StreamEvent("stdout", b"working\n"), StreamEvent("hang")]
    with app.ws(f"/capsules/{cid}/exec/stream") as ws:
        ws.send_json({"type": "start", "cmd": "sleep", "args": ["100"]})
        assert ws.receive_json() == {"type": "start", "pid": pid}
        assert ws.receive_json() == {"type": "stdout", "data": "working\n"}
        ws.send_json({"type": "stop"})
        assert ws.receive_json() == {"type": "exit", "exit_code": -9}
        assert closed_with(ws) == 1000


def test_exec_stream_timeout_kills(app):
    cid = app.capsule()
    pid = app.fake._next_pid + 1
    app.fake.attach_events[pid] = [StreamEvent("hang")]
    with app.ws(f"/capsules/{cid}/exec/stream") as ws:
        ws.send_json({"type": "start", "cmd": "sleep", "args": ["100"], "timeout_sec": 0.2})
        assert ws.receive_json()["type"] == "start"
        assert ws.receive_json() == {"type": "exit", "exit_code": -9}


def test_exec_stream_client_leaving_kills(app):
    cid = app.capsule()
    pid = app.fake._next_pid + 1
    app.fake.attach_events[pid] = [StreamEvent("hang")]
    with app.ws(f"/capsules/{cid}/exec/stream") as ws:
        ws.send_json({"type": "start", "cmd": "sleep", "args": ["100"]})
        assert ws.receive_json()["type"] == "start"
    deadline = time.monotonic() + 5
    while not app.fake.kill_events.get((cid, pid), None) or not app.fake.kill_events[(cid, pid)].is_set():
        assert time.monotonic() < deadline, "the command was not killed"
        time.sleep(0.01)


@pytest.mark.parametrize("first, message", [
    ({"type": "start"}, "cmd must be a non-empty string"),
    ({"type": "begin", "cmd": "ls"}, 'the first message must be {"type": "start", "cmd": ...}'),
    ({"type": "start", "cmd": "ls", "args": "-l"}, "args must be a list of strings"),
    ({"type": "start", "cmd": "ls", "timeout_sec": -1}, "timeout_sec must be a positive number"),
])
def test_exec_stream_bad_start(app, first, message):
    cid = app.capsule()
    with app.ws(f"/capsules/{cid}/exec/stream") as ws:
        ws.send_json(first)
        assert ws.receive_json() == {"type": "error", "data": message}
        assert closed_with(ws) == 1008
    assert app.fake.ops("spawn") == []


def test_exec_stream_not_json(app):
    cid = app.capsule()
    with app.ws(f"/capsules/{cid}/exec/stream") as ws:
        ws.send_text("ls -l")
        assert ws.receive_json() == {"type": "error", "data": "messages must be JSON objects"}
        assert closed_with(ws) == 1008


# ---- processes/{pid}/stream -----------------------------------------------------------------


def test_process_stream_attaches_by_pid_or_tag_and_leaves_it_running(app):
    cid = app.capsule()
    resp = app.client.post(f"/api/v1/capsules/{cid}/exec", headers=app.headers(),
                           json={"cmd": "server", "background": True, "tag": "web"})
    pid = resp.json()["pid"]
    app.fake.attach_events[pid] = [StreamEvent("stdout", b"listening\n"), StreamEvent("exit", exit_code=0)]
    for target in (pid, "web"):
        with app.ws(f"/capsules/{cid}/processes/{target}/stream") as ws:
            assert ws.receive_json() == {"type": "start", "pid": pid}
            assert ws.receive_json() == {"type": "stdout", "data": "listening\n"}
            assert ws.receive_json() == {"type": "exit", "exit_code": 0}
            assert closed_with(ws) == 1000
    assert app.fake.ops("kill") == []  # attaching never kills
    with app.ws(f"/capsules/{cid}/processes/nope/stream") as ws:
        assert ws.receive_json() == {"type": "error", "data": "no process 'nope'"}
        assert closed_with(ws) == 1008


# ---- pty -------------------------------------------------------------------------------------


def test_pty_session_round_trip(app):
    cid = app.capsule()
    with app.ws(f"/capsules/{cid}/pty") as ws:
        ws.send_json({"type": "start", "cmd": "/bin/bash", "cols": 100, "rows": 30, "tag": "t1"})
        started = ws.receive_json()
        assert started["type"] == "started" and started["tag"] == "t1" and started["pid"] > 0
        output_until(ws, b"started /bin/bash 100x30")
        ws.send_bytes(b"ls\r")  # raw input, as the published SDK sends it
        output_until(ws, b"echo:ls\r")
        ws.send_json({"type": "input", "data": base64.b64encode(b"\x03").decode()})
        output_until(ws, b"echo:\x03")
        ws.send_json({"type": "resize", "cols": 120, "rows": 40})
        output_until(ws, b"resized 120x40")
        ws.send_json({"type": "pong"})  # ignored
        ws.send_json({"type": "resize", "cols": 0, "rows": 40})
        assert ws.receive_json() == {"type": "error", "data": "cols must be an integer between 1 and 10000",
                                     "fatal": False}
        ws.send_json({"type": "kill"})
        assert ws.receive_json() == {"type": "exit", "exit_code": -9}
        assert closed_with(ws) == 1000
    assert app.fake.ptys[(cid, "t1")].inputs == [b"ls\r", b"\x03"]


def test_pty_survives_the_socket_and_connect_replays(app):
    cid = app.capsule()
    with app.ws(f"/capsules/{cid}/pty") as ws:
        ws.send_json({"type": "start"})
        started = ws.receive_json()
        assert started["tag"].startswith("pty-")
        ws.send_bytes(b"first")
        output_until(ws, b"echo:first")
    # The socket is gone; the session is not.
    assert app.fake.ptys[(cid, started["tag"])].info.running
    with app.ws(f"/capsules/{cid}/pty") as ws:
        ws.send_json({"type": "connect", "tag": started["tag"]})
        assert ws.receive_json() == {"type": "started", "tag": started["tag"], "pid": started["pid"]}
        replay = output_until(ws, b"echo:first")
        assert replay.startswith(b"started /bin/bash 80x24")
        ws.send_bytes(b"second")
        output_until(ws, b"echo:second")
    with app.ws(f"/capsules/{cid}/pty") as ws:
        ws.send_json({"type": "connect", "tag": "no-such-tag"})
        assert ws.receive_json() == {"type": "error", "data": "no PTY session with tag 'no-such-tag'", "fatal": True}
        assert closed_with(ws) == 1008


def test_pty_base64_output_on_request(app):
    cid = app.capsule()
    with app.ws(f"/capsules/{cid}/pty?encoding=base64") as ws:
        ws.send_json({"type": "start", "cmd": "/bin/sh"})
        assert ws.receive_json()["type"] == "started"
        msg = ws.receive_json()
        assert msg["type"] == "output"
        assert base64.b64decode(msg["data"]).startswith(b"started /bin/sh")


def test_pty_start_failures(app):
    cid = app.capsule()
    with app.ws(f"/capsules/{cid}/pty") as ws:
        ws.send_json({"type": "start", "cmd": "/no/such/program"})
        msg = ws.receive_json()
        assert msg == {"type": "error", "data": "/no/such/program: command not found", "fatal": True}
        assert closed_with(ws) == 1008
    with app.ws(f"/capsules/{cid}/pty") as ws:
        ws.send_json({"type": "start", "rows": 0})
        assert ws.receive_json()["fatal"] is True
        assert closed_with(ws) == 1008
    with app.ws(f"/capsules/{cid}/pty") as ws:
        ws.send_bytes(b"raw before start")
        assert ws.receive_json()["data"] == "the first message must be a JSON object"
        assert closed_with(ws) == 1008


def test_pty_input_records_activity(app):
    cid = app.capsule()
    with app.ws(f"/capsules/{cid}/pty") as ws:
        ws.send_json({"type": "start"})
        ws.receive_json()
        before = app.get(cid)["last_active_at"]
        time.sleep(1.1)  # timestamps have second precision
        ws.send_bytes(b"x")
        output_until(ws, b"echo:x")
        assert app.get(cid)["last_active_at"] > before
