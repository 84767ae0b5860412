"""A host agent's side of the fleet: register once with the control plane, then heartbeat.

- ``POST {cp}/api/v1/hosts/register`` (Bearer one-time token) with address, name, capacity,
  accelerator and version -> ``{host_id, credential, control_token, heartbeat_interval_sec}``,
  kept in ``<data-dir>/registration.json`` (0600) so a restart needs no new token.
- ``POST {cp}/api/v1/hosts/{host_id}/heartbeat`` (Bearer credential) every interval with usage,
  capsules (id -> state) and template ids -> ``{"status": "online"|"draining"}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

from wrenn_host.api import HostLimits
from wrenn_host.durable import write_durable
from wrenn_host.service.book import Book
from wrenn_host.service.tls import fingerprint

log = logging.getLogger("wrenn.host.enroll")
REGISTRATION = "registration.json"


class EnrollError(Exception):
    """Registration failed: the message says why (bad token, control plane down)."""


@dataclasses.dataclass(frozen=True)
class Registration:
    control_plane: str
    host_id: str
    credential: str  # what this agent sends to the control plane
    control_token: str  # what the control plane sends to this agent
    heartbeat_interval_sec: float = 3.0
    address: str = ""
    tls_cert_sha256: str = ""  # the certificate the control plane pinned for this agent ("": none)

    @classmethod
    def load(cls, data_dir: Path) -> Registration | None:
        path = data_dir / REGISTRATION
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})

    def save(self, data_dir: Path) -> Path:
        """Written 0600 and renamed into place: it holds both secrets."""
        path = data_dir / REGISTRATION
        write_durable(path, json.dumps(dataclasses.asdict(self), indent=2).encode(), 0o600)
        return path


def version() -> str:
    try:
        return metadata.version("wrenn-platform")
    except metadata.PackageNotFoundError:
        return "0+unknown"


async def register(control_plane: str, token: str, *, address: str, name: str, capacity: dict[str, int],
                   accelerator: str, tls_cert: str | None = None,
                   transport: httpx.AsyncBaseTransport | None = None) -> Registration:
    body: dict[str, Any] = {"address": address, "name": name, "capacity": capacity, "accelerator": accelerator,
                            "version": version()}
    if tls_cert is not None:
        body["tls_cert"] = tls_cert
    async with httpx.AsyncClient(base_url=control_plane.rstrip("/"), transport=transport, timeout=30) as http:
        try:
            resp = await http.post("/api/v1/hosts/register", json=body, headers={"Authorization": f"Bearer {token}"})
        except httpx.TransportError as exc:
            raise EnrollError(f"control plane {control_plane} unreachable: {exc}") from exc
    if resp.status_code != 200:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text[:200]
        raise EnrollError(f"registration refused ({resp.status_code}): {message}")
    data = resp.json()
    return Registration(control_plane.rstrip("/"), data["host_id"], data["credential"], data["control_token"],
                        float(data.get("heartbeat_interval_sec") or 3.0), address,
                        fingerprint(tls_cert) if tls_cert is not None else "")


def capacity_of(limits: HostLimits, data_root: Path) -> dict[str, int]:
    """What this host offers: its vCPUs, memory it can give capsules, the data disk's size."""
    st = os.statvfs(data_root)
    return {"vcpus": limits.max_vcpus, "memory_mb": limits.max_memory_mb,
            "disk_mb": st.f_blocks * st.f_frsize // (1024 * 1024)}


def default_name() -> str:
    return platform.node() or "host"


class Heartbeat:
    """Reports to the control plane every interval; a failed beat is logged and retried next time
    (the control plane marks the host offline when beats stop arriving)."""

    def __init__(self, reg: Registration, book: Book, *, transport: httpx.AsyncBaseTransport | None = None):
        self.reg = reg
        self.book = book
        self.status = "unknown"  # what the control plane last said: online | draining
        self.beats = 0
        self._http = httpx.AsyncClient(base_url=reg.control_plane, transport=transport, timeout=10,
                                       headers={"Authorization": f"Bearer {reg.credential}"})

    async def body(self) -> dict[str, Any]:
        inv = await self.book.inventory()
        return {"usage": await self.book.usage(inv),
                "capsules": {cid: rt.state for cid, rt in inv.capsules.items()},
                "templates": inv.templates}

    async def beat(self) -> str:
        resp = await self._http.post(f"/api/v1/hosts/{self.reg.host_id}/heartbeat", json=await self.body())
        if resp.status_code == 401:
            raise EnrollError("heartbeat refused (401): the control plane no longer knows this host's credential "
                              "(host deleted?); register anew: remove registration.json, run with a new --token")
        if resp.status_code != 200:
            raise EnrollError(f"heartbeat refused ({resp.status_code}): {resp.text[:200]}")
        self.status = resp.json().get("status", "online")
        self.beats += 1
        return self.status

    async def run(self) -> None:
        while True:
            try:
                await self.beat()
            except (httpx.HTTPError, EnrollError, ValueError) as exc:
                log.warning("heartbeat to %s failed: %s", self.reg.control_plane, exc)
            except Exception:  # noqa: BLE001 - a bug in one beat must not stop the next ones
                log.exception("heartbeat failed")
            await asyncio.sleep(self.reg.heartbeat_interval_sec)

    async def close(self) -> None:
        await self._http.aclose()
