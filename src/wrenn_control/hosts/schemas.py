"""Wire shapes of /v1/hosts (operators) and of the host agents' register and heartbeat calls."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from wrenn_control.db.models import Host
from wrenn_control.schemas import Timestamp

Name = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00]*$")]


class HostCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Name | None = None


class HostCreated(BaseModel):
    id: str
    token: str  # one-time registration token, shown once
    command: str  # the `wrenn host-agent ...` line to run on the host


class Capacity(BaseModel):
    vcpus: Annotated[int, Field(ge=1, le=100_000)]
    memory_mb: Annotated[int, Field(ge=1, le=1 << 40)]
    disk_mb: Annotated[int, Field(ge=0, le=1 << 50)] = 0


class HostRegister(BaseModel):
    # Agents of a newer version may send more: ignored, not refused.
    model_config = ConfigDict(extra="ignore")
    address: Annotated[str, Field(min_length=8, max_length=300, pattern=r"^https?://[^\s/]+(:\d+)?/?$")]
    name: Name | None = None
    capacity: Capacity
    accelerator: Annotated[str, Field(max_length=16)] | None = None
    version: Annotated[str, Field(max_length=64)] | None = None
    # PEM, with an https address: the control plane trusts this certificate alone for the host.
    tls_cert: Annotated[str, Field(max_length=16384)] | None = None


class HostRegistered(BaseModel):
    host_id: str
    credential: str  # the agent's Bearer to the control plane from now on
    control_token: str  # the control plane's Bearer to the agent
    heartbeat_interval_sec: float


class Usage(BaseModel):
    model_config = ConfigDict(extra="allow")
    capsules_running: int | None = None
    reserved_vcpus: int | None = None
    reserved_memory_mb: int | None = None
    free_memory_mb: int | None = None
    free_disk_mb: int | None = None


class Heartbeat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    usage: Usage = Usage()
    capsules: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=32)]] = {}
    templates: list[Annotated[str, Field(max_length=128)]] = []


class HeartbeatAck(BaseModel):
    status: str  # online | draining


class HostOut(BaseModel):
    id: str
    name: str
    address: str | None
    status: str  # pending (not heard from yet: its first heartbeat comes once it serves) | online | offline | draining
    draining: bool
    capacity: dict[str, int | None]
    usage: dict[str, Any]
    templates: list[str]
    accelerator: str | None
    version: str | None
    capsule_count: int  # capsules that live on it (not stopped)
    last_heartbeat_at: Timestamp | None
    created_at: Timestamp

    @classmethod
    def of(cls, row: Host, capsule_count: int) -> "HostOut":
        return cls(id=row.id, name=row.name, address=row.address, status=row.status, draining=bool(row.draining),
                   capacity={"vcpus": row.vcpus, "memory_mb": row.memory_mb, "disk_mb": row.disk_mb},
                   usage=dict(row.usage or {}), templates=list(row.templates or []), accelerator=row.accelerator,
                   version=row.version, capsule_count=capsule_count, last_heartbeat_at=row.last_heartbeat_at,
                   created_at=row.created_at)
