"""The port proxy against a real capsule: `{port}-{capsule_id}.{domain}` reaches services started
in the guest (python3 -m http.server, a small stdlib echo server with a WebSocket endpoint)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.test_api_capsules import Api, assert_error
from tests.e2e.test_published_sdk import published_sdk_python  # noqa: F401  (fixture)

pytestmark = pytest.mark.vm

MIB = 1024 * 1024
BLOB = os.urandom(MIB + 13)
BIG = 10 * MIB

# A stdlib echo service for the guest: POST echoes the body, GET answers what it was sent as JSON,
# and a GET with `Upgrade: websocket` becomes a WebSocket echo (enough of RFC 6455 for the test).
ECHO_SERVER = r'''
import base64, hashlib, http.server, json, struct

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _reply(self, status, body, ctype="application/octet-stream"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                n = int(self.rfile.readline().strip(), 16)
                if n == 0:
                    self.rfile.readline()
                    break
                body += self.rfile.read(n)
                self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._reply(200, body)

    def do_GET(self):
        if self.headers.get("Upgrade", "").lower() == "websocket":
            return self.websocket()
        seen = {"method": self.command, "path": self.path, "headers": dict(self.headers.items())}
        self._reply(200, json.dumps(seen).encode(), "application/json")

    def _frame(self, op, data):
        n = len(data)
        head = bytes([0x80 | op])
        if n < 126:
            head += bytes([n])
        elif n < 65536:
            head += bytes([126]) + struct.pack(">H", n)
        else:
            head += bytes([127]) + struct.pack(">Q", n)
        self.wfile.write(head + data)
        self.wfile.flush()

    def websocket(self):
        accept = base64.b64encode(hashlib.sha1((self.headers["Sec-WebSocket-Key"] + GUID).encode()).digest())
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept.decode())
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        message, opcode = b"", 0
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            fin, op, n = head[0] & 0x80, head[0] & 0x0F, head[1] & 0x7F
            if n == 126:
                n = struct.unpack(">H", self.rfile.read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self.rfile.read(8))[0]
            mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            raw = self.rfile.read(n)
            key = (mask * (n // 4 + 1))[:n]
            data = (int.from_bytes(raw, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big") if n else b""
            if op == 8:
                self._frame(8, data[:2] or struct.pack(">H", 1000))
                return
            if op == 9:
                self._frame(10, data)
                continue
            if op in (1, 2):
                message, opcode = data, op
            elif op == 0:
                message += data
            if fin and op in (0, 1, 2):
                self._frame(opcode, message)


http.server.ThreadingHTTPServer(("127.0.0.1", 8001), Echo).serve_forever()
'''


@pytest.fixture(scope="module")
def api(wrenn_server) -> Iterator[Api]:
    a = Api(wrenn_server)
    yield a
    a.cleanup()


def upload(api: Api, cid: str, path: str, data: bytes) -> None:
    resp = api.post(f"/v1/capsules/{cid}/files/stream/write", params={"path": path}, content=data,
                    headers={"Content-Type": "application/octet-stream"})
    assert resp.status_code == 204, resp.text


def background(api: Api, cid: str, *args: str) -> None:
    resp = api.post(f"/v1/capsules/{cid}/exec", json={"cmd": args[0], "args": list(args[1:]), "background": True})
    assert resp.status_code == 202, resp.text


class Proxy:
    """Requests to the control plane's address with a `{port}-{capsule_id}.localhost` Host."""

    def __init__(self, server, cid: str):
        self.server = server
        self.cid = cid
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=120)

    def host(self, port: int, cid: str | None = None) -> str:
        return f"{port}-{cid or self.cid}.localhost:{self.server.port}"

    def request(self, method: str, port: int, path: str = "/", cid: str | None = None, **kw) -> httpx.Response:
        headers = {"Host": self.host(port, cid), **kw.pop("headers", {})}
        return self.http.request(method, path, headers=headers, **kw)

    def get(self, port: int, path: str = "/", **kw) -> httpx.Response:
        return self.request("GET", port, path, **kw)

    def wait_listening(self, port: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            resp = self.get(port)
            if resp.status_code == 200:
                return
            assert resp.status_code == 502, resp.text  # nothing listening yet
            assert time.monotonic() < deadline, f"port {port} never answered: {resp.text}"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def cid(api: Api) -> str:
    cid = api.running()["id"]
    api.sh(cid, "mkdir -p /srv/www/sub && echo hello > /srv/www/sub/hello.txt")
    upload(api, cid, "/srv/www/blob.bin", BLOB)
    upload(api, cid, "/root/echo.py", ECHO_SERVER.encode())
    background(api, cid, "python3", "-m", "http.server", "8000", "--bind", "127.0.0.1", "--directory", "/srv/www")
    background(api, cid, "python3", "/root/echo.py")
    return cid


@pytest.fixture(scope="module")
def proxy(wrenn_server, cid) -> Iterator[Proxy]:
    p = Proxy(wrenn_server, cid)
    p.wait_listening(8000)
    p.wait_listening(8001)
    yield p
    p.http.close()


def established(api: Api, cid: str) -> list[str]:
    """TCP connections to the guest's services that are still open (tunnels not closed)."""
    out = api.sh(cid, "ss -Htn state established '( sport = :8000 or sport = :8001 )'")["stdout"]
    return [line for line in out.splitlines() if line.strip()]


def wait_no_connections(api: Api, cid: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while (left := established(api, cid)):
        assert time.monotonic() < deadline, f"connections left open in the guest: {left}"
        time.sleep(0.5)


# ---- HTTP -----------------------------------------------------------------------------------


def test_directory_listing_and_files(proxy: Proxy) -> None:
    resp = proxy.get(8000, "/")
    assert resp.status_code == 200 and "text/html" in resp.headers["content-type"]
    assert "blob.bin" in resp.text and "sub/" in resp.text
    resp = proxy.get(8000, "/sub/hello.txt")
    assert resp.status_code == 200 and resp.text == "hello\n"
    resp = proxy.get(8000, "/blob.bin")
    assert resp.status_code == 200 and resp.headers["content-length"] == str(len(BLOB))
    assert hashlib.sha256(resp.content).hexdigest() == hashlib.sha256(BLOB).hexdigest()
    resp = proxy.get(8000, "/missing")
    assert resp.status_code == 404 and "File not found" in resp.text  # http.server's own page
    resp = proxy.request("HEAD", 8000, "/blob.bin")
    assert resp.status_code == 200 and resp.content == b"" and resp.headers["content-length"] == str(len(BLOB))


def test_request_shape_seen_by_the_service(proxy: Proxy) -> None:
    resp = proxy.get(8001, "/a%20b/c?x=1&y=%2F", headers={"X-API-Key": proxy.server.api_key, "X-Custom": "yes"})
    seen = resp.json()
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert seen["path"] == "/a%20b/c?x=1&y=%2F"
    assert headers["host"] == proxy.host(8001)
    assert headers["x-forwarded-host"] == proxy.host(8001)
    assert headers["x-forwarded-proto"] == "http" and headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-custom"] == "yes" and headers["connection"] == "close"
    assert "x-api-key" not in headers


def test_post_bodies_echoed(proxy: Proxy) -> None:
    body = os.urandom(2 * MIB + 5)
    resp = proxy.request("POST", 8001, "/echo", content=body)
    assert resp.status_code == 200 and resp.content == body

    def parts():  # no length: sent on chunked
        for i in range(20):
            yield bytes([i]) * 10000

    resp = proxy.request("POST", 8001, "/echo", content=parts())
    assert resp.content == b"".join(bytes([i]) * 10000 for i in range(20))


def test_concurrent_downloads(proxy: Proxy) -> None:
    results: list[bytes] = []

    def fetch():
        with httpx.Client(base_url=str(proxy.http.base_url), timeout=120) as c:
            results.append(c.get("/blob.bin", headers={"Host": proxy.host(8000)}).content)

    threads = [threading.Thread(target=fetch) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(results) == 6 and all(r == BLOB for r in results)


def test_browser_style_url_with_curl(proxy: Proxy, cid: str) -> None:
    """curl (like browsers) resolves *.localhost to the loopback: the URL works as is."""
    if shutil.which("curl") is None:
        pytest.skip("no curl")
    url = f"http://8000-{cid}.localhost:{proxy.server.port}/sub/hello.txt"
    out = subprocess.run(["curl", "-sS", "--max-time", "60", url], capture_output=True, timeout=90)
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"hello\n"


def test_sdk_url(proxy: Proxy, cid: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from wrenn import Capsule

    monkeypatch.setenv("WRENN_PROXY_DOMAIN", f"localhost:{proxy.server.port}")
    capsule = Capsule.connect(cid, api_key=proxy.server.api_key, base_url=proxy.server.base_url)
    try:
        assert capsule.get_url(8000) == f"http://8000-{cid}.localhost:{proxy.server.port}"
        host = capsule.get_host(8000)
        resp = proxy.http.get("/sub/hello.txt", headers={"Host": host})
        assert resp.text == "hello\n"
    finally:
        capsule.close()


def test_published_sdk_get_url(proxy: Proxy, cid: str, published_sdk_python) -> None:  # noqa: F811
    """wrenn==0.3.0's get_url: with WRENN_PROXY_DOMAIN=localhost:<port> a URL that works as is; by
    default `{port}-{id}.127.0.0.1:<port>`, which no resolver knows but the proxy accepts as Host."""
    script = ("import sys; from wrenn import Capsule; "
              "c = Capsule.connect(sys.argv[1]); print(c.get_url(8000))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WRENN_", "PYTHON"))}
    env.update(WRENN_API_KEY=proxy.server.api_key, WRENN_BASE_URL=proxy.server.base_url)
    urls = {}
    for domain in (None, f"localhost:{proxy.server.port}"):
        run_env = dict(env, **({"WRENN_PROXY_DOMAIN": domain} if domain else {}))
        out = subprocess.run([str(published_sdk_python), "-c", script, cid], env=run_env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        urls[domain] = out.stdout.strip()
    assert urls[None] == f"http://8000-{cid}.127.0.0.1:{proxy.server.port}"
    netloc = urls[None].split("://", 1)[1]
    assert proxy.http.get("/sub/hello.txt", headers={"Host": netloc}).text == "hello\n"
    local = urls[f"localhost:{proxy.server.port}"]
    assert local == f"http://8000-{cid}.localhost:{proxy.server.port}"
    if shutil.which("curl"):
        out = subprocess.run(["curl", "-sS", "--max-time", "60", local + "/sub/hello.txt"], capture_output=True,
                             timeout=90)
        assert out.stdout == b"hello\n", out.stderr


# ---- WebSocket ------------------------------------------------------------------------------


def test_websocket_echo(proxy: Proxy) -> None:
    import socket

    from websockets.sync.client import connect

    sock = socket.create_connection(("127.0.0.1", proxy.server.port))
    with connect(f"ws://{proxy.host(8001)}/ws", sock=sock, max_size=None, open_timeout=60) as ws:
        ws.send("héllo")
        assert ws.recv(timeout=60) == "héllo"
        blob = os.urandom(300 * 1024)
        ws.send(blob)
        assert ws.recv(timeout=60) == blob
        for i in range(20):
            ws.send(f"m{i}")
        assert [ws.recv(timeout=60) for _ in range(20)] == [f"m{i}" for i in range(20)]
        ws.ping().wait(30)


# ---- errors ---------------------------------------------------------------------------------


def test_closed_port_and_unknown_capsule(proxy: Proxy) -> None:
    body = assert_error(proxy.get(8123), 502, "agent_error")
    assert "nothing is listening on port 8123" in body["message"]
    assert_error(proxy.get(8000, cid="cl-" + "0" * 25), 404, "not_found")
    assert_error(proxy.get(0), 400, "invalid_request")
    # The API itself is still where it was.
    assert proxy.http.get("/api/v1/capsules", headers={"X-API-Key": proxy.server.api_key}).status_code == 200


# ---- throughput and leaks -------------------------------------------------------------------


def test_download_10mb_throughput(api: Api, proxy: Proxy, cid: str) -> None:
    api.sh(cid, f"head -c {BIG} /dev/urandom > /srv/www/big.bin")
    digest = api.sh(cid, "sha256sum /srv/www/big.bin")["stdout"].split()[0]
    rates = []
    for _ in range(2):
        h = hashlib.sha256()
        started = time.monotonic()
        with proxy.http.stream("GET", "/big.bin", headers={"Host": proxy.host(8000)}) as resp:
            assert resp.status_code == 200
            n = 0
            for chunk in resp.iter_bytes():
                h.update(chunk)
                n += len(chunk)
        elapsed = time.monotonic() - started
        assert n == BIG and h.hexdigest() == digest
        rates.append(BIG / MIB / elapsed)
    # For comparison: the same file through the files API (one guest request, file_read).
    started = time.monotonic()
    resp = api.post(f"/v1/capsules/{cid}/files/read", json={"path": "/srv/www/big.bin"})
    assert resp.status_code == 200 and len(resp.content) == BIG
    files_rate = BIG / MIB / (time.monotonic() - started)
    print(f"\n10 MiB through the proxy: {', '.join(f'{r:.1f}' for r in rates)} MiB/s "
          f"(files API: {files_rate:.1f} MiB/s)")
    (proxy.server.data_dir / "proxy-throughput.json").write_text(
        json.dumps({"proxy_mib_per_s": rates, "files_api_mib_per_s": files_rate}))


def test_client_leaving_mid_download_closes_the_tunnel(api: Api, proxy: Proxy, cid: str) -> None:
    api.sh(cid, f"test -f /srv/www/big.bin || head -c {BIG} /dev/urandom > /srv/www/big.bin")
    with httpx.Client(base_url=str(proxy.http.base_url), timeout=120) as c:
        with c.stream("GET", "/big.bin", headers={"Host": proxy.host(8000)}) as resp:
            assert resp.status_code == 200
            next(resp.iter_bytes())
    wait_no_connections(api, cid)
    assert proxy.get(8000, "/sub/hello.txt").text == "hello\n"


def test_nothing_left_open(api: Api, proxy: Proxy, cid: str) -> None:
    wait_no_connections(api, cid)
    # The agent still serves everything else (no request of the channel is stuck).
    assert api.sh(cid, "echo ok")["stdout"] == "ok\n"


# ---- lifecycle ------------------------------------------------------------------------------


def test_paused_capsule_then_resumed(api: Api, proxy: Proxy, cid: str) -> None:
    resp = api.post(f"/v1/capsules/{cid}/pause")
    assert resp.status_code == 200, resp.text
    api.wait(cid, "paused")
    body = assert_error(proxy.get(8000, "/sub/hello.txt"), 409, "invalid_state")
    assert "paused" in body["message"]
    resp = api.post(f"/v1/capsules/{cid}/resume")
    assert resp.status_code == 200, resp.text
    api.wait(cid, "running")
    # The services kept running through the pause: reachable again at once.
    resp = proxy.get(8000, "/sub/hello.txt")
    assert resp.status_code == 200 and resp.text == "hello\n"


# ---- the host agent's tunnels (in process: their bookkeeping is visible) -------------------


async def test_host_agent_tunnels(host_agent) -> None:
    from wrenn_host.api import GuestError, HostAgentError

    cid = "cl-" + "t" * 25
    await host_agent.create(cid, "minimal", 1, 512)
    try:
        assert host_agent.open_requests(cid) == 0
        with pytest.raises(GuestError) as e:
            await host_agent.tcp_connect(cid, 8000)
        assert e.value.code == "refused" and "port 8000" in e.value.message
        await host_agent.write_file(cid, "/srv/t/hello.txt", cid.encode() + b"\n")
        await host_agent.spawn(cid, "python3", ["-m", "http.server", "8000", "--bind", "127.0.0.1",
                                                "--directory", "/srv/t"])
        deadline = time.monotonic() + 120
        while True:
            try:
                tunnel = await host_agent.tcp_connect(cid, 8000)
                break
            except GuestError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.5)
        async with tunnel:
            assert host_agent.open_requests(cid) == 1
            await tunnel.write(b"GET /hello.txt HTTP/1.0\r\nHost: x\r\n\r\n")
            answer = b"".join([chunk async for chunk in tunnel])  # HTTP/1.0: the server closes
        assert answer.startswith(b"HTTP/1.0 200") and answer.endswith(cid.encode() + b"\n")
        assert host_agent.open_requests(cid) == 0
        # A tunnel left open: closing it ends the request on both sides.
        tunnels = [await host_agent.tcp_connect(cid, 8000) for _ in range(5)]
        assert host_agent.open_requests(cid) == 5
        for t in tunnels:
            await t.close()
        assert host_agent.open_requests(cid) == 0
        ss = await host_agent.exec(cid, "/bin/sh", ["-c", "ss -Htn state established '( sport = :8000 )'"])
        deadline = time.monotonic() + 20
        while ss.stdout.strip():
            assert time.monotonic() < deadline, ss.stdout
            await asyncio.sleep(0.5)
            ss = await host_agent.exec(cid, "/bin/sh", ["-c", "ss -Htn state established '( sport = :8000 )'"])
        # A pause drops the guest connection: an open tunnel fails instead of hanging.
        tunnel = await host_agent.tcp_connect(cid, 8000)
        await host_agent.pause(cid)
        with pytest.raises(HostAgentError):
            await asyncio.wait_for(tunnel.read(), 30)
        with pytest.raises(HostAgentError):
            await tunnel.write(b"x")
        await tunnel.close()
        await host_agent.resume(cid)
        async with await host_agent.tcp_connect(cid, 8000) as t:  # the server lived through the pause
            await t.write(b"HEAD / HTTP/1.0\r\n\r\n")
            assert (await t.read()).startswith(b"HTTP/1.0 200")
    finally:
        await host_agent.destroy(cid)
