"""Pydantic models for what the Wrenn API returns, shared by the sync and async clients.

Field names follow the wire. Unknown extra fields are ignored so a newer server does not
break an older SDK; an unknown ``status`` or template ``type`` value is kept as a plain ``str``.
"""

from __future__ import annotations

import base64
import enum
from datetime import date as date_, datetime
from typing import Annotated, Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

__all__ = [
    "Actor",
    "BackgroundProcess",
    "CapsuleInfo",
    "CapsuleMetrics",
    "CapsuleStats",
    "EventType",
    "ExecResult",
    "FileEntry",
    "MetricPoint",
    "ProcessInfo",
    "Resource",
    "SSEEvent",
    "StatsCurrent",
    "StatsPeaks",
    "StatsSeries",
    "Status",
    "Template",
    "TemplateType",
    "UsagePoint",
    "UsageResponse",
]


class Status(enum.StrEnum):
    """Capsule lifecycle status. Compares equal to (and prints as) its string value."""

    pending = "pending"
    starting = "starting"
    running = "running"
    pausing = "pausing"
    paused = "paused"
    resuming = "resuming"
    snapshotting = "snapshotting"
    stopping = "stopping"
    hibernated = "hibernated"
    stopped = "stopped"
    missing = "missing"
    error = "error"


class TemplateType(enum.StrEnum):
    """Kind of template: a built-in ``base`` image or a user ``snapshot``."""

    base = "base"
    snapshot = "snapshot"


# Try the enum first, fall back to the raw string for values this SDK does not know yet.
_StatusField = Annotated[Status | str, Field(union_mode="left_to_right")]
_TemplateTypeField = Annotated[TemplateType | str, Field(union_mode="left_to_right")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class NetworkRules(_Model):
    """A capsule's egress rules: IPv4 addresses, CIDRs or domains (``*.example.com``).
    An ``allow_out`` entry wins over a ``deny_out`` entry."""

    allow_out: list[str] = []
    deny_out: list[str] = []


class CapsuleInfo(_Model):
    """A capsule as the API describes it (``GET /v1/capsules/{id}``).

    ``disk_size_mb`` / ``disk_used_mb`` are only filled in by a GET of one capsule.
    ``metadata`` holds user labels given at create time plus system keys such as
    ``kernel_version`` once the capsule runs.
    """

    id: str
    status: _StatusField | None = None
    template: str | None = None
    vcpus: int | None = None
    memory_mb: int | None = None
    timeout_sec: int | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    last_active_at: datetime | None = None
    last_updated: datetime | None = None
    metadata: dict[str, str] | None = None
    disk_size_mb: int | None = None
    disk_used_mb: int | None = None
    allow_internet_access: bool | None = None
    network: NetworkRules | None = None



class Template(_Model):
    """A template capsules boot from: built-in (``base``) or a user ``snapshot``."""

    name: str
    type: _TemplateTypeField | None = None
    vcpus: int | None = None
    memory_mb: int | None = None
    size_bytes: int | None = None
    created_at: datetime | None = None
    platform: bool | None = None
    protected: bool | None = None
    metadata: dict[str, str] | None = None


class ExecResult(_Model):
    """Result of a foreground command.

    ``stdout`` / ``stderr`` are text; when the output was not valid UTF-8 the server sent it
    base64-encoded and the text holds it decoded with replacement characters, while
    ``stdout_bytes`` / ``stderr_bytes`` always hold the exact bytes.
    """

    stdout: str = ""
    stderr: str = ""
    exit_code: int = -1
    duration_ms: int | None = None
    timed_out: bool = False  # killed by the command timeout (the exit code is then -9)
    stdout_bytes: bytes = Field(default=b"", repr=False)
    stderr_bytes: bytes = Field(default=b"", repr=False)
    capsule_id: str | None = Field(
        default=None, validation_alias=AliasChoices("capsule_id", "sandbox_id"), repr=False
    )
    cmd: str | None = Field(default=None, repr=False)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> ExecResult:
        """Build from the exec response body, decoding base64 output."""
        raw: dict[str, bytes] = {}
        for name in ("stdout", "stderr"):
            value = data.get(name) or ""
            if data.get("encoding") == "base64":
                raw[name] = base64.b64decode(value)
            else:
                raw[name] = value.encode("utf-8")
        exit_code = data.get("exit_code")
        return cls(
            stdout=raw["stdout"].decode("utf-8", errors="replace"),
            stderr=raw["stderr"].decode("utf-8", errors="replace"),
            exit_code=-1 if exit_code is None else exit_code,
            duration_ms=data.get("duration_ms"),
            timed_out=bool(data.get("timed_out", False)),
            stdout_bytes=raw["stdout"],
            stderr_bytes=raw["stderr"],
            capsule_id=data.get("sandbox_id"),
            cmd=data.get("cmd"),
        )


class BackgroundProcess(_Model):
    """Handle of a command started with ``background=True``."""

    pid: int
    tag: str = ""
    capsule_id: str = Field(default="", validation_alias=AliasChoices("capsule_id", "sandbox_id"))
    cmd: str | None = None


class ProcessInfo(_Model):
    """A background process started in a capsule (a finished one has ``running=False``)."""

    pid: int
    tag: str | None = None
    cmd: str | None = None
    args: list[str] | None = None
    running: bool | None = None
    exit_code: int | None = None


class FileEntry(_Model):
    """An entry of a directory listing. ``modified_at`` is a Unix timestamp in seconds."""

    name: str | None = None
    path: str | None = None
    type: str | None = None  # "file", "directory" or "symlink"
    size: int | None = None
    mode: int | None = None
    permissions: str | None = None  # e.g. "-rwxr-xr-x"
    owner: str | None = None
    group: str | None = None
    modified_at: int | None = None
    symlink_target: str | None = None

    @property
    def is_dir(self) -> bool:
        """True for a directory."""
        return self.type == "directory"


# --- observability ---------------------------------------------------------------------------


class MetricPoint(_Model):
    """One point of a capsule's metrics: the average of the samples in a bucket."""

    timestamp_unix: int | None = None  # start of the bucket, unix seconds
    cpu_pct: float | None = None  # 0-100 over all the capsule's vCPUs
    mem_bytes: int | None = None
    disk_bytes: int | None = None


class CapsuleMetrics(_Model):
    """``GET /v1/capsules/{id}/metrics``: the points over ``range``, oldest first."""

    sandbox_id: str | None = None
    range: str | None = None
    points: list[MetricPoint] | None = None

    @property
    def capsule_id(self) -> str | None:
        """The capsule (``sandbox_id`` on the wire)."""
        return self.sandbox_id


class StatsCurrent(_Model):
    running_count: int | None = None
    vcpus_reserved: int | None = None
    memory_mb_reserved: int | None = None
    sampled_at: datetime | None = None


class StatsPeaks(_Model):
    """Maxima over the last 30 days."""

    running_count: int | None = None
    vcpus: int | None = None
    memory_mb: int | None = None


class StatsSeries(_Model):
    """Parallel arrays for a chart: ``labels[i]`` is the start of bucket ``i``."""

    labels: list[datetime] | None = None
    running: list[int] | None = None
    vcpus: list[int] | None = None
    memory_mb: list[int] | None = None


class CapsuleStats(_Model):
    """``GET /v1/capsules/stats``: what the team runs now, its peaks, a series over ``range``."""

    range: str | None = None
    current: StatsCurrent | None = None
    peaks: StatsPeaks | None = None
    series: StatsSeries | None = None


class UsagePoint(_Model):
    """One UTC day of usage: vCPU-minutes and MiB-minutes of running capsules."""

    date: date_ | None = None
    cpu_minutes: float | None = None
    ram_mb_minutes: float | None = None


class UsageResponse(_Model):
    """``GET /v1/capsules/usage``: one point per day from ``from_`` to ``to``, both included."""

    from_: date_ | None = Field(default=None, alias="from")
    to: date_ | None = None
    points: list[UsagePoint] | None = None


class EventType(enum.StrEnum):
    """Kinds of :class:`SSEEvent`."""

    connected = "connected"
    capsule_create = "capsule.create"
    capsule_pause = "capsule.pause"
    capsule_resume = "capsule.resume"
    capsule_destroy = "capsule.destroy"
    capsule_state_changed = "capsule.state.changed"
    template_snapshot_create = "template.snapshot.create"
    template_snapshot_delete = "template.snapshot.delete"
    host_up = "host.up"
    host_down = "host.down"


class Resource(_Model):
    """What an event is about: ``type`` ``capsule`` (``id`` its ID) or ``template`` (its name)."""

    id: str | None = None
    type: str | None = None


class Actor(_Model):
    """Who caused an event: ``type`` ``api_key`` (with its ``id`` and ``name``) or ``system``."""

    type: str | None = None
    id: str | None = None
    name: str | None = None


class SSEEvent(_Model):
    """One event of ``client.events.stream()``.

    ``capsule.state.changed`` has ``metadata`` ``{"from", "to"}``; the actions (``capsule.create``,
    ``capsule.pause``, ...) have ``outcome`` ``success`` or ``error`` (then ``error`` says why);
    capsule events carry the capsule as ``sandbox``. An unknown kind is kept as a plain ``str``.
    """

    event: Annotated[EventType | str, Field(union_mode="left_to_right")] | None = None
    outcome: str | None = None
    resource: Resource | None = None
    actor: Actor | None = None
    metadata: dict[str, str] | None = None
    error: str | None = None
    sandbox: CapsuleInfo | None = None
    timestamp: datetime | None = None
