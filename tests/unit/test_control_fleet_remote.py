"""The fleet over real HTTP: a control plane in fleet mode reaching host agent services on
loopback ports through `RemoteHostAgent` (each service fronting a fake host agent), the agents
registering and heartbeating with the control plane's own wire protocol (wrenn_host.service.enroll).

Needs the host agent service and its client (branch fleet-remote); skipped without them."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
import uvicorn

from wrenn_control.clock import utcnow

from .fake_host_agent import FakeHostAgent, make_settings
from .fleet_harness import fleet_app

remote = pytest.importorskip("wrenn_control.hosts.remote")
service_app = pytest.importorskip("wrenn_host.service.app")
enroll = pytest.importorskip("wrenn_host.service.enroll")
book = pytest.importorskip("wrenn_host.service.book")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Later:
    """An ASGI app set once known (the service needs the control token registration hands out)."""

    app: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


@contextlib.asynccontextmanager
async def host_service(cp: Any, fake: FakeHostAgent) -> AsyncIterator[tuple[str, Any]]:
    """A host agent service on a loopback port, registered with the control plane `cp`:
    (its host id, its Heartbeat)."""
    port = _free_port()
    later = _Later()
    server = uvicorn.Server(uvicorn.Config(later, host="127.0.0.1", port=port, lifespan="off", log_level="warning"))
    to_cp = httpx.ASGITransport(app=cp.app)
    token = (await cp.client.post("/v1/hosts", json={})).json()["token"]
    reg = await enroll.register("http://test", token, address=f"http://127.0.0.1:{port}", name=f"h{port}",
                                capacity={"vcpus": 8, "memory_mb": 16384, "disk_mb": 100_000}, accelerator="tcg",
                                transport=to_cp)
    later.app = service_app.create_app(fake, reg.control_token)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    beat = enroll.Heartbeat(reg, book.Book(fake), transport=to_cp)
    try:
        yield reg.host_id, beat
    finally:
        server.should_exit = True
        await task
        await beat.close()


async def test_capsules_on_remote_hosts(tmp_path):
    fakes = [FakeHostAgent(), FakeHostAgent()]
    async with fleet_app(make_settings(tmp_path), None) as cp, \
            host_service(cp, fakes[0]) as (a, beat_a), host_service(cp, fakes[1]) as (b, beat_b):
        assert await beat_a.beat() == "online" and await beat_b.beat() == "online"
        made = [await cp.running_capsule() for _ in range(4)]
        assert sorted(c["host_id"] for c in made) == sorted([a, b, a, b])
        for c, fake in ((c, fakes[0] if c["host_id"] == a else fakes[1]) for c in made):
            assert c["id"] in fake.capsules  # the VM is where the row says
            ran = await cp.client.post(f"/v1/capsules/{c['id']}/exec", json={"cmd": "echo", "args": ["hi"]})
            assert ran.status_code == 200, ran.text
            wrote = await cp.client.post(f"/v1/capsules/{c['id']}/files/write", files={"file": ("x", b"data")},
                                         data={"path": "/tmp/x"})
            assert wrote.status_code in (200, 204), wrote.text
            read = await cp.client.post(f"/v1/capsules/{c['id']}/files/stream/read", json={"path": "/tmp/x"})
            assert read.content == b"data"
        on_a = [c["id"] for c in made if c["host_id"] == a]
        assert (await cp.client.post(f"/v1/capsules/{on_a[0]}/pause")).status_code == 200
        assert (await cp.client.post(f"/v1/capsules/{on_a[0]}/resume")).status_code == 200

        # a stops answering and beating: offline, its capsules missing, b's carry on
        await beat_b.beat()
        await asyncio.to_thread(cp.app.state.heartbeats.run_once, utcnow() + timedelta(seconds=16))
        await beat_b.beat()
        assert {(await cp.client.get(f"/v1/capsules/{cid}")).json()["status"] for cid in on_a} == {"missing"}
        on_b = [c["id"] for c in made if c["host_id"] == b]
        assert (await cp.client.post(f"/v1/capsules/{on_b[0]}/exec", json={"cmd": "true"})).status_code == 200
        refused = await cp.client.post(f"/v1/capsules/{on_a[0]}/exec", json={"cmd": "true"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "host_unavailable"
        await beat_a.beat()  # back
        assert {(await cp.client.get(f"/v1/capsules/{cid}")).json()["status"] for cid in on_a} == {"running"}
        for c in made:
            assert (await cp.client.delete(f"/v1/capsules/{c['id']}")).status_code == 204
        assert not fakes[0].capsules and not fakes[1].capsules
