"""The port proxy middleware over the fake host agent, whose tunnels are real TCP connections to
small servers in this process (HTTP: stdlib http.server; WebSocket: websockets' sync server)."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterator

import pytest
from websockets.sync.server import serve as ws_serve

from .fake_host_agent import FakeHostAgent, make_settings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

try:
    from starlette.testclient import WebSocketDenialResponse
except ImportError:  # pragma: no cover
    WebSocketDenialResponse = None  # type: ignore[assignment,misc]

BLOB = os.urandom(1024 * 1024 + 7)


class Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[dict] = []
    broken = 0  # endless streams whose reader went away

    def log_message(self, *args):
        pass

    def _record(self):
        Upstream.seen.append({"method": self.command, "path": self.path, "headers": self.headers,
                              "all_headers": self.headers.items()})

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes, ctype: str = "application/octet-stream", extra=()):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self):
        self._record()
        self._send(200, BLOB)

    def do_GET(self):
        self._record()
        if self.path.startswith("/blob"):
            self._send(200, BLOB, extra=[("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")])
        elif self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"hello ", b"chunked ", b"world"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/forever":  # an endless stream (like SSE)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            try:
                while True:
                    self.wfile.write(b"data: tick\n\n")
                    self.wfile.flush()
                    time.sleep(0.01)
            except OSError:
                Upstream.broken += 1
                self.close_connection = True
        elif self.path == "/hangup":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        elif self.path == "/garbage":
            self.wfile.write(b"this is not http\r\n\r\n")
            self.close_connection = True
        else:
            self._send(404, b"no such page here", "text/plain")

    def do_POST(self):
        self._record()
        body = self._body()
        self._send(201, body, extra=[("X-Got", str(len(body)))])

    do_PUT = do_POST


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()


@pytest.fixture(scope="module")
def ws_upstream() -> Iterator[int]:
    def handler(ws):
        for msg in ws:
            if msg == "close please":
                ws.close(4001, "asked to")
                return
            ws.send(msg)

    def select(conn, protocols):
        return "chat" if "chat" in protocols else None

    srv = ws_serve(handler, "127.0.0.1", 0, select_subprotocol=select, max_size=None)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.socket.getsockname()[1]
    srv.shutdown()


class App:
    def __init__(self, client: TestClient, fake: FakeHostAgent, key: str):
        self.client, self.fake, self.key = client, fake, key

    def capsule(self, key: str | None = None) -> str:
        resp = self.client.post("/api/v1/capsules", json={}, headers={"X-API-Key": key or self.key})
        assert resp.status_code == 201, resp.text
        cid = resp.json()["id"]
        deadline = time.monotonic() + 5
        while self.client.get(f"/api/v1/capsules/{cid}", headers={"X-API-Key": key or self.key}).json()["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return cid

    def proxied(self, cid: str, port: int, path: str = "/", method: str = "GET", **kw):
        headers = {"Host": f"{port}-{cid}.localhost:8080", **kw.pop("headers", {})}
        return self.client.request(method, path, headers=headers, **kw)

    def settle(self, timeout: float = 5.0) -> None:
        """Everything the proxy opened is closed again."""
        deadline = time.monotonic() + timeout
        while self.fake.tunnels_open or self.client.app.state.ops._busy:  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, (self.fake.tunnels_open, self.client.app.state.ops._busy)
            time.sleep(0.01)


def make_app(tmp_path, **settings) -> Iterator[App]:
    from wrenn_control.app import create_app

    s = make_settings(tmp_path, **settings)
    fake = FakeHostAgent()
    with TestClient(create_app(s, fake)) as client:
        yield App(client, fake, s.bootstrap_api_key)


@pytest.fixture
def app(tmp_path) -> Iterator[App]:
    yield from make_app(tmp_path)


@pytest.fixture
def cid(app, upstream, ws_upstream) -> str:
    cid = app.capsule()
    app.fake.forwards[(cid, 8000)] = upstream
    app.fake.forwards[(cid, 9000)] = ws_upstream
    Upstream.seen.clear()
    return cid


def error(resp, status: int, code: str) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    return body["error"]["message"]


# ---- HTTP -----------------------------------------------------------------------------------


def test_get_binary_exact(app, cid):
    resp = app.proxied(cid, 8000, "/blob/x%20y?a=1&b=%2F", headers={"X-API-Key": app.key, "Cookie": "s=1"})
    assert resp.status_code == 200
    assert hashlib.sha256(resp.content).digest() == hashlib.sha256(BLOB).digest()
    assert resp.headers["content-length"] == str(len(BLOB))
    assert resp.headers.get_list("set-cookie") == ["a=1", "b=2"]
    seen = Upstream.seen[-1]
    assert seen["path"] == "/blob/x%20y?a=1&b=%2F"
    assert seen["headers"]["Host"] == f"8000-{cid}.localhost:8080"
    assert seen["headers"]["X-Forwarded-Host"] == f"8000-{cid}.localhost:8080"
    assert seen["headers"]["X-Forwarded-Proto"] == "http"
    assert "X-Forwarded-For" in seen["headers"]
    assert seen["headers"]["Connection"] == "close"
    assert seen["headers"]["Cookie"] == "s=1"
    assert "X-API-Key" not in seen["headers"]  # the team's key never reaches the capsule
    app.settle()


def test_post_bodies(app, cid):
    body = os.urandom(3 * 1024 * 1024)
    resp = app.proxied(cid, 8000, "/echo", "POST", content=body)
    assert resp.status_code == 201 and resp.content == body and resp.headers["x-got"] == str(len(body))

    def parts():
        yield b"abc"
        yield b"def" * 10000

    resp = app.proxied(cid, 8000, "/echo", "PUT", content=parts())  # no length: chunked upstream
    assert resp.status_code == 201 and resp.content == b"abc" + b"def" * 10000
    assert Upstream.seen[-1]["headers"]["Transfer-Encoding"] == "chunked"
    # a form: not rewritten to JSON like API requests are
    resp = app.proxied(cid, 8000, "/echo", "POST", content=b"a=1&b=2",
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert resp.content == b"a=1&b=2"
    assert Upstream.seen[-1]["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
    app.settle()


def test_chunked_head_and_status_pass_through(app, cid):
    resp = app.proxied(cid, 8000, "/chunked")
    assert resp.status_code == 200 and resp.content == b"hello chunked world"
    resp = app.proxied(cid, 8000, "/blob", "HEAD")
    assert resp.status_code == 200 and resp.content == b"" and resp.headers["content-length"] == str(len(BLOB))
    resp = app.proxied(cid, 8000, "/nope")
    assert resp.status_code == 404 and resp.text == "no such page here"  # the service's, not ours
    # paths under /api go to the capsule too, for a proxy Host
    resp = app.proxied(cid, 8000, "/api/v1/capsules")
    assert resp.status_code == 404 and resp.text == "no such page here"
    app.settle()


def test_errors(app, cid):
    msg = error(app.proxied(cid, 8001), 502, "agent_error")
    assert "nothing is listening on port 8001" in msg
    error(app.proxied("cl-" + "0" * 25, 8000), 404, "not_found")
    error(app.proxied(cid, 0), 400, "invalid_request")
    msg = error(app.proxied(cid, 8000, "/hangup"), 502, "agent_error")
    assert "no valid HTTP response" in msg
    error(app.proxied(cid, 8000, "/garbage"), 502, "agent_error")
    # paused: 409
    assert app.client.post(f"/api/v1/capsules/{cid}/pause", headers={"X-API-Key": app.key}).status_code == 200
    msg = error(app.proxied(cid, 8000, "/blob"), 409, "invalid_state")
    assert "paused" in msg
    # destroyed
    app.client.delete(f"/api/v1/capsules/{cid}", headers={"X-API-Key": app.key})
    error(app.proxied(cid, 8000, "/blob"), 409, "invalid_state")
    app.settle()


def test_other_hosts_reach_the_api(app, cid):
    for host in ("testserver", "localhost:8080", f"{cid}.localhost", f"8000-{cid}"):
        resp = app.client.get(f"/api/v1/capsules/{cid}", headers={"Host": host, "X-API-Key": app.key})
        assert resp.status_code == 200 and resp.json()["id"] == cid
    assert app.fake.ops("tcp_connect") == []


def test_activity_recorded(app, cid):
    def last_active():
        from sqlalchemy import select

        from wrenn_control.db.models import Capsule

        with app.client.app.state.db.session() as s:  # type: ignore[attr-defined]
            return s.scalar(select(Capsule.last_active_at).where(Capsule.id == cid))

    before = last_active()
    time.sleep(1.1)
    assert app.proxied(cid, 8000, "/blob").status_code == 200
    assert last_active() != before


def test_require_api_key(tmp_path, upstream):
    for a in make_app(tmp_path, proxy_require_api_key=True):
        cid = a.capsule()
        a.fake.forwards[(cid, 8000)] = upstream
        error(a.proxied(cid, 8000, "/blob"), 401, "unauthorized")
        error(a.proxied(cid, 8000, "/blob", headers={"X-API-Key": "wrn_" + "0" * 32}), 401, "unauthorized")
        assert a.proxied(cid, 8000, "/blob", headers={"X-API-Key": a.key}).content == BLOB
        assert "X-API-Key" not in Upstream.seen[-1]["headers"]
        from wrenn_control.bootstrap import create_team

        _, other = create_team(a.client.app.state.db, "other")  # type: ignore[attr-defined]
        error(a.proxied(cid, 8000, "/blob", headers={"X-API-Key": other}), 404, "not_found")
        a.settle()


# ---- WebSocket ------------------------------------------------------------------------------


def ws_url(cid: str, port: int, path: str = "/ws") -> str:
    return f"ws://{port}-{cid}.localhost:8080{path}"


def test_websocket_relay(app, cid):
    with app.client.websocket_connect(ws_url(cid, 9000), subprotocols=["other", "chat"]) as ws:
        assert ws.accepted_subprotocol == "chat"
        ws.send_text("héllo")
        assert ws.receive_text() == "héllo"
        big = os.urandom(2 * 1024 * 1024)
        ws.send_bytes(big)
        assert ws.receive_bytes() == big
        ws.send_text("close please")
        with pytest.raises(WebSocketDisconnect) as e:
            ws.receive_text()
        assert e.value.code == 4001
    app.settle()


def test_websocket_client_leaves(app, cid):
    with app.client.websocket_connect(ws_url(cid, 9000)) as ws:
        ws.send_text("x")
        assert ws.receive_text() == "x"
    app.settle()


@pytest.mark.skipif(WebSocketDenialResponse is None, reason="Starlette without denial responses")
def test_websocket_errors(app, cid):
    with pytest.raises(WebSocketDenialResponse) as e:
        with app.client.websocket_connect(ws_url(cid, 8001)):
            pass
    assert e.value.status_code == 502 and "nothing is listening" in json.loads(e.value.content)["error"]["message"]
    with pytest.raises(WebSocketDenialResponse) as e:
        with app.client.websocket_connect(ws_url("cl-" + "0" * 25, 9000)):
            pass
    assert e.value.status_code == 404
    # an HTTP service that does not upgrade: its own answer
    with pytest.raises(WebSocketDenialResponse) as e:
        with app.client.websocket_connect(ws_url(cid, 8000, "/nope")):
            pass
    assert e.value.status_code == 404 and e.value.content == b"no such page here"
    app.settle()


# ---- under uvicorn (what `wrenn server` runs): keep-alive, disconnects, denial responses -------


@pytest.fixture
def live(tmp_path, upstream, ws_upstream):
    import asyncio

    import uvicorn

    from wrenn_control.app import create_app

    settings = make_settings(tmp_path)
    fake = FakeHostAgent()
    app = create_app(settings, fake)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    import httpx

    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        key = settings.bootstrap_api_key
        cid = client.post("/api/v1/capsules", json={}, headers={"X-API-Key": key}).json()["id"]
        while client.get(f"/api/v1/capsules/{cid}", headers={"X-API-Key": key}).json()["status"] != "running":
            time.sleep(0.01)
        fake.forwards[(cid, 8000)] = upstream
        fake.forwards[(cid, 9000)] = ws_upstream
        yield client, port, cid, fake, app
    server.should_exit = True
    thread.join(10)


def test_live_keepalive_and_stream_disconnect(live):
    import httpx

    client, port, cid, fake, app = live
    host = {"Host": f"8000-{cid}.localhost:{port}"}
    for _ in range(3):  # several requests on one kept-alive client connection
        resp = client.get("/blob", headers=host)
        assert resp.status_code == 200 and resp.content == BLOB
    assert client.post("/echo", headers=host, content=b"x" * 100000).content == b"x" * 100000
    broken = Upstream.broken
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as other:
        with other.stream("GET", "/forever", headers=host) as resp:
            assert resp.status_code == 200 and resp.headers["content-type"] == "text/event-stream"
            it = resp.iter_bytes()
            assert next(it).startswith(b"data: tick")
    # The client left mid-stream: the proxy closes the tunnel, the service sees it go.
    deadline = time.monotonic() + 10
    while fake.tunnels_open or app.state.ops._busy or Upstream.broken == broken:
        assert time.monotonic() < deadline, (fake.tunnels_open, app.state.ops._busy, Upstream.broken)
        time.sleep(0.05)


def test_live_websocket(live):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    client, port, cid, fake, app = live
    def sock():  # the proxy Host in the URL, the connection to this server
        return socket.create_connection(("127.0.0.1", port))

    with connect(f"ws://9000-{cid}.localhost:{port}/ws", sock=sock(), subprotocols=["chat"]) as ws:
        assert ws.subprotocol == "chat"
        ws.send(b"\x00\x01")
        assert ws.recv() == b"\x00\x01"
        ws.send("text")
        assert ws.recv() == "text"
    with pytest.raises(InvalidStatus) as e:
        connect(f"ws://9001-{cid}.localhost:{port}/ws", sock=sock())
    assert e.value.response.status_code == 502
    assert b"nothing is listening on port 9001" in e.value.response.body
    deadline = time.monotonic() + 10
    while fake.tunnels_open or app.state.ops._busy:
        assert time.monotonic() < deadline
        time.sleep(0.05)
