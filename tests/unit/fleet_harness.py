"""A fleet in one process for unit tests: control-plane apps in fleet mode (no in-process host)
on one database, whose registered hosts are FakeHostAgents found by address."""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
from collections.abc import AsyncIterator
from typing import Any

import httpx

from .fake_host_agent import FakeHostAgent, Harness, make_settings


@dataclasses.dataclass
class FakeFleet:
    """address -> the fake agent behind it; what `agent_factory` hands the control plane."""

    agents: dict[str, FakeHostAgent] = dataclasses.field(default_factory=dict)
    tokens: dict[str, str] = dataclasses.field(default_factory=dict)  # address -> control token seen
    certs: dict[str, str | None] = dataclasses.field(default_factory=dict)  # address -> TLS certificate pinned

    def factory(self, address: str, control_token: str, tls_cert: str | None = None) -> FakeHostAgent:
        self.tokens[address] = control_token
        self.certs[address] = tls_cert
        return self.agents.setdefault(address, FakeHostAgent())


@dataclasses.dataclass
class FleetHost:
    id: str
    address: str
    credential: str
    agent: FakeHostAgent


@contextlib.asynccontextmanager
async def fleet_app(settings: Any, fleet: FakeFleet | None) -> AsyncIterator[Harness]:
    """fleet None: the real network client (hosts/remote.py) reaches the hosts."""
    from wrenn_control.app import create_app

    app = create_app(settings, None, agent_factory=fleet.factory if fleet is not None else None)
    async with app.router.lifespan_context(app):
        key = settings.bootstrap_api_key
        harness = Harness(app, None, settings, key, None)  # type: ignore[arg-type]
        async with harness.client_for(key) as client:
            harness.client = client
            yield harness


def agent_client(h: Harness, bearer: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=h.app), base_url="http://test/api",
                             headers=headers, timeout=30)


async def add_host(h: Harness, fleet: FakeFleet, n: int, *, vcpus: int = 8, memory_mb: int = 16384,
                   templates: list[str] | None = None) -> FleetHost:
    """POST /v1/hosts, then register as the agent at 10.0.0.n would, then one heartbeat."""
    made = await h.client.post("/v1/hosts", json={"name": f"h{n}"})
    assert made.status_code == 201, made.text
    address = f"http://10.0.0.{n}:8081"
    agent = fleet.agents.setdefault(address, FakeHostAgent())
    async with agent_client(h, made.json()["token"]) as c:
        reg = await c.post("/v1/hosts/register", json={
            "address": address, "name": f"h{n}", "capacity": {"vcpus": vcpus, "memory_mb": memory_mb,
                                                              "disk_mb": 100_000},
            "accelerator": "tcg", "version": "test"})
    assert reg.status_code == 200, reg.text
    host = FleetHost(made.json()["id"], address, reg.json()["credential"], agent)
    await beat(h, host, templates=templates)
    return host


async def beat(h: Harness, host: FleetHost, *, capsules: dict[str, str] | None = None,
               templates: list[str] | None = None) -> httpx.Response:
    if capsules is None:
        capsules = {cid: cap.state for cid, cap in host.agent.capsules.items()}
    async with agent_client(h, host.credential) as c:
        resp = await c.post(f"/v1/hosts/{host.id}/heartbeat", json={
            "usage": {"capsules_running": sum(1 for s in capsules.values() if s == "running"),
                      "free_memory_mb": 10_000, "free_disk_mb": 50_000},
            "capsules": capsules,
            "templates": templates if templates is not None else ["minimal", "base-python", *host.agent.templates]})
    return resp


@contextlib.asynccontextmanager
async def two_replicas(tmp_path: Any, postgres_url: str, **overrides: Any) -> AsyncIterator[tuple[Harness, Harness, list[Any]]]:
    """Two fleet control planes (`wrenn control-plane`) on one PostgreSQL database, one host
    (`a.fleet_host`; the FakeFleet behind both: `a.fake_fleet`)."""
    key = "wrn_" + secrets.token_hex(16)
    fleet = FakeFleet()
    settings = [make_settings(tmp_path / name, database_url=postgres_url, bootstrap_api_key=key, **overrides)
                for name in ("a", "b")]
    async with fleet_app(settings[0], fleet) as a, fleet_app(settings[1], fleet) as b:
        host = await add_host(a, fleet, 1)
        host.agent.delays.update(create=0.01)
        a.fleet_host = b.fleet_host = host  # type: ignore[attr-defined]
        a.fake_fleet = b.fake_fleet = fleet  # type: ignore[attr-defined]
        yield a, b, settings
