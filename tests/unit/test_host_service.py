"""The host agent service and its client, beyond the shared contract (tests/contract): auth both
ways, an unreachable host, metrics, reconcile by the control plane, registration and heartbeats
against a stand-in control plane (a real HTTP server made here)."""

from __future__ import annotations

import asyncio
import os
import stat
import secrets
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tests.hostservice import free_port, serving, serving_app
from tests.unit.fake_host_agent import FakeHostAgent
from wrenn_control.hosts.remote import HostUnreachable, RemoteHostAgent
from wrenn_host.api import HostAgentError
from wrenn_host.service import tls
from wrenn_host.service.book import Book
from wrenn_host.service.enroll import EnrollError, Registration
from wrenn_host.service.run import HostService, ServiceConfig, advertised_address, parse_listen, registration


async def wait_for(predicate, what: str, bound: float = 20.0) -> None:
    async with asyncio.timeout(bound):
        while not predicate():
            await asyncio.sleep(0.02)


async def test_every_call_needs_the_control_token() -> None:
    fake = FakeHostAgent()
    async with serving(fake) as (url, token, _):
        async with httpx.AsyncClient(base_url=url) as http:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
                for method, path in (("POST", "/host/v1/get"), ("GET", "/host/v1/health"), ("GET", "/metrics"),
                                     ("POST", "/host/v1/write_file?capsule_id=x&path=/y")):
                    resp = await http.request(method, path, headers=headers, json={"capsule_id": "x"})
                    assert resp.status_code == 401, (method, path, headers)
                    assert resp.json()["error"]["code"] == "unauthorized"
            ok = await http.get("/host/v1/health", headers={"Authorization": f"Bearer {token}"})
            assert ok.status_code == 200 and ok.json()["accelerator"] == "tcg"
        wrong = RemoteHostAgent(url, "not-the-token")
        await fake.create("cl-a", "minimal", None, None)
        fake.forwards[("cl-a", 80)] = 1
        with pytest.raises(HostAgentError) as e:
            await wrong.get("cl-a")
        assert e.value.code == "unauthorized"
        with pytest.raises(HostAgentError) as e:
            await wrong.tcp_connect("cl-a", 80)
        assert e.value.code == "unauthorized"
        with pytest.raises(HostAgentError) as e:
            await wrong.attach("cl-a", 1).__anext__()
        assert e.value.code == "unauthorized"
        await wrong.close()
    assert fake.calls == [("create", "cl-a")]  # nothing reached the agent without the token


async def test_unreachable_host_is_host_unavailable() -> None:
    remote = RemoteHostAgent(f"http://127.0.0.1:{free_port()}", "t")
    calls = [remote.get("cl-a"), remote.health(), remote.read_file("cl-a", "/x"),
             remote.write_file("cl-a", "/x", b"data"), remote.tcp_connect("cl-a", 80),
             remote.attach("cl-a", 1).__anext__()]
    for call in calls:
        with pytest.raises(HostUnreachable) as e:
            await call
        assert e.value.code == "host_unavailable" and "unavailable" in e.value.message
    await remote.close()


async def test_bad_calls_are_400() -> None:
    async with serving(FakeHostAgent()) as (url, token, _):
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}) as http:
            for path, body in (("/host/v1/no_such_method", b"{}"), ("/host/v1/get", b"{}"),
                               ("/host/v1/get", b'{"capsule_id": "a", "extra": 1}'), ("/host/v1/get", b"not json"),
                               ("/host/v1/get", b"[1]"), ("/host/v1/_call", b"{}")):
                resp = await http.post(path, content=body)
                assert resp.status_code == 400, (path, body, resp.text)
                err = resp.json()["error"]
                assert (err["code"], err["kind"]) == ("invalid", "InvalidCall") and err["message"]
            resp = await http.post("/host/v1/get", json={"capsule_id": "cl-none"})
            assert resp.status_code == 404
            assert resp.json() == {"error": {"code": "not_found", "message": "no capsule cl-none",
                                             "kind": "CapsuleNotFound"}}


async def test_metrics_count_capsules_and_time_calls() -> None:
    fake = FakeHostAgent()
    async with serving(fake) as (url, token, _):
        remote = RemoteHostAgent(url, token)
        await remote.create("cl-a", "minimal", 2, 1024)
        await remote.create("cl-b", "minimal", None, None)
        await remote.pause("cl-b")
        text = await remote.metrics_text()
        assert 'wrenn_host_capsules{state="running"} 1.0' in text
        assert 'wrenn_host_capsules{state="paused"} 1.0' in text
        assert 'wrenn_host_operation_seconds_count{operation="create",outcome="ok"} 2.0' in text
        assert 'wrenn_host_operation_seconds_count{operation="pause",outcome="ok"} 1.0' in text
        assert 'wrenn_host_reserved{resource="vcpus"} 2.0' in text
        assert 'wrenn_host_reserved{resource="memory_mb"} 1024.0' in text
        assert 'wrenn_host_capacity{resource="vcpus"} 8.0' in text
        assert 'wrenn_host_free{resource="memory_mb"} 16384.0' in text
        await remote.close()


async def test_start_removes_what_the_control_plane_does_not_know() -> None:
    fake = FakeHostAgent()
    for cid in ("cl-a", "cl-b", "cl-c"):
        await fake.create(cid, "minimal", None, None)
    await fake.pause("cl-c")
    book = Book(fake, {"cl-a", "cl-b", "cl-c"})
    async with serving(fake, book=book) as (url, token, _):
        remote = RemoteHostAgent(url, token)
        report = await remote.start({"cl-a": "running", "cl-c": "paused", "cl-gone": "running"})
        assert (report.running, report.paused, report.lost) == (["cl-a"], ["cl-c"], ["cl-b"])
        assert set(fake.capsules) == {"cl-a", "cl-c"}
        await remote.close()


async def test_a_call_the_client_gives_up_on_is_cancelled_on_the_host() -> None:
    fake = FakeHostAgent()
    fake.delays["create"] = 0.5
    async with serving(fake) as (url, token, _):
        remote = RemoteHostAgent(url, token)
        task = asyncio.create_task(remote.create("cl-a", "minimal", None, None))
        await wait_for(lambda: fake.ops("create") == ["cl-a"], "the create on the host")
        task.cancel()
        await asyncio.sleep(1.0)  # past the moment the create would have finished
        assert "cl-a" not in fake.capsules

        # a destroy while a create is under way stops that create first (whatever came first)
        creating = asyncio.create_task(remote.create("cl-b", "minimal", None, None))
        await wait_for(lambda: "cl-b" in fake.ops("create"), "the second create on the host")
        await remote.destroy("cl-b")
        with pytest.raises(HostAgentError) as e:
            await creating
        assert e.value.code == "cancelled"
        await asyncio.sleep(1.0)
        assert "cl-b" not in fake.capsules
        await remote.close()


# ---- registration and heartbeats, against a stand-in control plane --------------------------


class StandInControlPlane:
    """Just enough of the control plane's host endpoints (COMMON2.md's wire protocol)."""

    def __init__(self) -> None:
        self.token = "reg-" + secrets.token_hex(8)
        self.credential = "cred-" + secrets.token_hex(8)
        self.control_token = "ctl-" + secrets.token_hex(8)
        self.registrations: list[dict] = []
        self.beats: list[dict] = []
        self.status = "online"
        app = FastAPI()

        @app.post("/api/v1/hosts/register")
        async def register(request: Request):
            if request.headers.get("authorization") != f"Bearer {self.token}":
                return JSONResponse({"error": {"code": "unauthorized", "message": "bad token"}}, 401)
            self.token = None  # spent
            self.registrations.append(await request.json())
            return {"host_id": "host-1", "credential": self.credential, "control_token": self.control_token,
                    "heartbeat_interval_sec": 0.05}

        @app.post("/api/v1/hosts/{host_id}/heartbeat")
        async def heartbeat(host_id: str, request: Request):
            if host_id != "host-1" or request.headers.get("authorization") != f"Bearer {self.credential}":
                return JSONResponse({"error": {"code": "unauthorized", "message": "bad credential"}}, 401)
            self.beats.append(await request.json())
            return {"status": self.status}

        self.app = app


async def test_register_serve_heartbeat_and_restart(tmp_path) -> None:
    cp = StandInControlPlane()
    fake = FakeHostAgent()
    async with serving_app(cp.app) as cp_url:
        host, port = parse_listen(f"127.0.0.1:{free_port()}")
        cfg = ServiceConfig(tmp_path, cp_url, host, port, token="wrong")
        with pytest.raises(EnrollError, match="401"):
            await registration(cfg, fake, tmp_path)
        assert not (tmp_path / "registration.json").exists()

        cfg.token = cp.token
        reg = await registration(cfg, fake, tmp_path)
        assert (reg.host_id, reg.credential, reg.control_token) == ("host-1", cp.credential, cp.control_token)
        saved = tmp_path / "registration.json"
        assert stat.S_IMODE(os.stat(saved).st_mode) == 0o600
        assert Registration.load(tmp_path) == reg
        (body,) = cp.registrations
        # TLS by default: a self-signed certificate made in the data directory, sent to be pinned.
        assert body["address"] == f"https://127.0.0.1:{port}" and body["accelerator"] == "tcg"
        assert body["tls_cert"] == (tmp_path / "tls" / "agent.crt").read_text()
        assert stat.S_IMODE(os.stat(tmp_path / "tls" / "agent.key").st_mode) == 0o600
        assert reg.tls_cert_sha256 == tls.fingerprint(body["tls_cert"])
        assert body["capacity"]["vcpus"] == 8 and body["capacity"]["memory_mb"] == 8192
        assert body["capacity"]["disk_mb"] > 0 and body["name"] and body["version"]

        service = HostService(cfg, fake, Book(fake), reg)
        await service.start()
        try:
            # Without the pin the agent's certificate is not trusted: nothing is sent.
            unpinned = RemoteHostAgent(body["address"], reg.control_token)
            with pytest.raises(HostUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
                await unpinned.health()
            await unpinned.close()
            remote = RemoteHostAgent(body["address"], reg.control_token, tls_cert=body["tls_cert"])
            await remote.create("cl-a", "minimal", 1, 512)
            await wait_for(lambda: cp.beats and cp.beats[-1]["capsules"] == {"cl-a": "running"}, "a beat with cl-a")
            beat = cp.beats[-1]
            assert beat["usage"] == {"capsules_running": 1, "reserved_vcpus": 1, "reserved_memory_mb": 512,
                                     "free_memory_mb": 16384, "free_disk_mb": 100_000}
            assert {"minimal", "base-python"} <= set(beat["templates"])
            await remote.snapshot("cl-a", "tpl-1")
            await wait_for(lambda: "tpl-1" in cp.beats[-1]["templates"]
                           and cp.beats[-1]["capsules"] == {"cl-a": "paused"}, "a beat with tpl-1")
            cp.status = "draining"
            await wait_for(lambda: service.heartbeat.status == "draining", "draining")
            await remote.close()
        finally:
            await service.stop()

        # A restart: no token needed, the saved registration is used; no second registration.
        cfg2 = ServiceConfig(tmp_path, cp_url, host, port, token=None)
        reg2 = await registration(cfg2, fake, tmp_path)
        assert reg2 == reg and len(cp.registrations) == 1
        n = len(cp.beats)
        service = HostService(cfg2, fake, Book(fake, {"cl-a"}), reg2)
        await service.start()
        try:
            await wait_for(lambda: len(cp.beats) > n, "a beat after the restart")
            assert cp.beats[-1]["capsules"] == {"cl-a": "paused"}
        finally:
            await service.stop()

        # Served otherwise than it registered, every call would fail: refused at start, saying why.
        with pytest.raises(EnrollError, match="registered with TLS"):
            await registration(ServiceConfig(tmp_path, cp_url, host, port, tls=False), fake, tmp_path)
        other = tmp_path / "other"
        cert, key = tls.self_signed(other, ["127.0.0.1"])
        with pytest.raises(EnrollError, match="certificate changed"):
            await registration(ServiceConfig(tmp_path, cp_url, host, port, tls_cert=cert, tls_key=key), fake, tmp_path)
        with pytest.raises(EnrollError, match="go together"):
            await registration(ServiceConfig(tmp_path, cp_url, host, port, tls_cert=cert), fake, tmp_path)

    (tmp_path / "registration.json").unlink()
    with pytest.raises(EnrollError, match="token"):
        await registration(ServiceConfig(tmp_path, cp_url, host, port), fake, tmp_path)


async def test_tls_with_a_pinned_certificate_covers_calls_streams_and_tunnels(tmp_path) -> None:
    """Every way the control plane reaches an agent (JSON calls, byte streams, the WebSocket
    tunnel) goes over TLS to the one certificate pinned; another certificate is refused."""
    cert, key = tls.self_signed(tmp_path / "a", ["127.0.0.1"])
    other, _ = tls.self_signed(tmp_path / "b", ["127.0.0.1"])
    fake = FakeHostAgent()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read(100))
        await writer.drain()
        writer.close()
    echo_server = await asyncio.start_server(echo, "127.0.0.1", 0)
    fake.forwards[("cl-t", 8000)] = echo_server.sockets[0].getsockname()[1]
    async with echo_server, serving(fake, tls_files=(cert, key)) as (url, token, _app):
        assert url.startswith("https://")
        remote = RemoteHostAgent(url, token, tls_cert=cert.read_text())
        try:
            await remote.create("cl-t", "minimal", 1, 512)
            await remote.write_file("cl-t", "/tmp/x", b"over tls\n" * 1000)
            assert await remote.read_file("cl-t", "/tmp/x") == b"over tls\n" * 1000
            tunnel = await remote.tcp_connect("cl-t", 8000)  # the fake echoes
            await tunnel.write(b"ping")
            assert await tunnel.read() == b"ping"
            await tunnel.close()
        finally:
            await remote.close()
        wrong = RemoteHostAgent(url, token, tls_cert=other.read_text())
        with pytest.raises(HostUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
            await wrong.health()
        with pytest.raises(HostUnreachable):
            await wrong.tcp_connect("cl-t", 8000)
        await wrong.close()
    # the same certificate again (kept, not remade): what the control plane pinned stays valid
    assert tls.self_signed(tmp_path / "a", ["127.0.0.1"]) == (cert, key)


def test_advertised_address() -> None:
    cfg = ServiceConfig(Path("/nonexistent"), "http://127.0.0.1:8080", "0.0.0.0", 9090)
    assert advertised_address(cfg) == "https://127.0.0.1:9090"  # the route towards the control plane
    cfg.listen_host = "127.0.0.1"
    cfg.tls = False
    assert advertised_address(cfg) == "http://127.0.0.1:9090"
    cfg.advertise = "https://host-a.example:443/"
    assert advertised_address(cfg) == "https://host-a.example:443"


def test_parse_listen() -> None:
    assert parse_listen("0.0.0.0:9090") == ("0.0.0.0", 9090)
    assert parse_listen("[::1]:80") == ("::1", 80)
    assert parse_listen(":80") == ("0.0.0.0", 80)
    for bad in ("9090", "host:", "host:x", "host:70000"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_json_log_lines() -> None:
    import json
    import logging

    from wrenn_host.service.logs import JsonLines

    record = logging.LogRecord("wrenn.host", logging.WARNING, __file__, 1, "beat %s failed", ("x",), None)
    line = json.loads(JsonLines().format(record))
    assert (line["level"], line["logger"], line["message"]) == ("warning", "wrenn.host", "beat x failed")
    assert line["ts"].endswith("Z")


async def test_an_unreachable_host_is_503_host_unavailable_in_the_api(tmp_path) -> None:
    from tests.unit.fake_host_agent import assert_error, make_settings, running_app

    async with running_app(make_settings(tmp_path)) as h:
        cap = await h.running_capsule()
        h.fake.fail("exec", HostUnreachable("host agent at http://10.0.0.9:9090 is unavailable"), times=None)
        h.fake.fail("get", HostUnreachable("host agent at http://10.0.0.9:9090 is unavailable"), times=None)
        err = assert_error(await h.client.post(f"/v1/capsules/{cap['id']}/exec", json={"cmd": "true"}),
                           503, "host_unavailable")
        assert "unavailable" in err["message"]
        assert (await h.client.get(f"/v1/capsules/{cap['id']}")).json()["status"] == "running"
