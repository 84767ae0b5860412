"""Tables. Shapes for input and output live in `schemas.py`; these are storage only."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Stored as naive UTC (SQLite keeps no zone), always handed back timezone-aware."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.replace(tzinfo=timezone.utc) if value is not None else None


class _NoNul:
    """Text without NUL characters, which PostgreSQL cannot store nor even compare against (a
    lookup by a user-given id or name containing one would fail with an error instead of finding
    nothing). A NUL becomes U+FFFD, on every backend so that both behave the same: no id or name
    can contain either, so such a lookup finds nothing, and stored free text keeps its length."""

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        if value is not None and "\x00" in value:
            value = value.replace("\x00", "\ufffd")
        return value


class Str(_NoNul, TypeDecorator[str]):
    impl = String
    cache_ok = True  # read from the class itself, not inherited


class LongText(_NoNul, TypeDecorator[str]):
    impl = Text
    cache_ok = True


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime}


class Team(Base):
    __tablename__ = "teams"

    id: Mapped[str] = mapped_column(Str(40), primary_key=True)
    name: Mapped[str] = mapped_column(Str(200))
    created_at: Mapped[datetime]
    # Quotas of this team (migration 0005); None: the server's default (Settings.team_max_*).
    max_capsules: Mapped[int | None] = mapped_column(Integer)
    max_vcpus: Mapped[int | None] = mapped_column(Integer)
    max_memory_mb: Mapped[int | None] = mapped_column(Integer)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(Str(40), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(Str(200))
    # Only the sha256 of the key is kept; the key itself is shown once at creation.
    key_hash: Mapped[str] = mapped_column(Str(64), unique=True)
    prefix: Mapped[str] = mapped_column(Str(16))
    created_at: Mapped[datetime]


class Capsule(Base):
    __tablename__ = "capsules"
    __table_args__ = (
        Index("ix_capsules_team_order", "team_id", "created_at", "seq"),
        # Strictly increasing seq (never reused), so newest-first is stable within one second.
        {"sqlite_autoincrement": True},
    )

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(Str(32), unique=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(Str(16), index=True)
    template: Mapped[str] = mapped_column(Str(64))  # the name the user asked for
    template_id: Mapped[str] = mapped_column(Str(64))  # what the host agent knows it by
    vcpus: Mapped[int]
    memory_mb: Mapped[int]
    timeout_sec: Mapped[int]
    # user labels given at create + system keys (kernel_version, ...) once running
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    error: Mapped[str | None] = mapped_column(LongText)  # why the capsule is in `error`
    # egress policy (wrenn_host.network.policy): allow_internet_access + {allow_out, deny_out}
    allow_internet_access: Mapped[bool] = mapped_column(Boolean, default=True)
    egress: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime]
    last_updated: Mapped[datetime]
    started_at: Mapped[datetime | None]
    last_active_at: Mapped[datetime | None]
    # The host it lives on (migration 0008); None: the in-process host of `wrenn server`.
    host_id: Mapped[str | None] = mapped_column(Str(40), index=True)
    # A lifecycle call's lease across control-plane replicas (operations.py `hold`).
    claimed_by: Mapped[str | None] = mapped_column(Str(64))
    claimed_until: Mapped[datetime | None]


class Template(Base):
    """A team's snapshot template. Built-in templates belong to the host agent, not this table."""

    __tablename__ = "templates"
    __table_args__ = (UniqueConstraint("team_id", "name", name="uq_templates_team_name"),)

    id: Mapped[str] = mapped_column(Str(64), primary_key=True)  # host template id (tpl-...)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(Str(64))
    vcpus: Mapped[int]
    memory_mb: Mapped[int]
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    source_capsule_id: Mapped[str | None] = mapped_column(Str(32))
    created_at: Mapped[datetime]


# ---- observability (migration 0002) ---------------------------------------------------------


class CapsuleRun(Base):
    """One stretch of time a capsule spent `running` (ended_at None: it still is). Written by
    `lifecycle.transition` in the same transaction as the status change, so usage (vCPU-minutes,
    MB-minutes) is exact and survives restarts."""

    __tablename__ = "capsule_runs"
    __table_args__ = (Index("ix_capsule_runs_team_started", "team_id", "started_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    capsule_id: Mapped[str] = mapped_column(ForeignKey("capsules.id", ondelete="CASCADE"), index=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    vcpus: Mapped[int]
    memory_mb: Mapped[int]
    started_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]


class CapsuleMetric(Base):
    """One sample of a running capsule's guest metrics, taken by the sampler (kept for a while:
    `Settings.metrics_retention_sec`)."""

    __tablename__ = "capsule_metrics"
    __table_args__ = (Index("ix_capsule_metrics_ts", "ts_ms"),)

    capsule_id: Mapped[str] = mapped_column(ForeignKey("capsules.id", ondelete="CASCADE"), primary_key=True)
    ts_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # unix time in milliseconds
    cpu_pct: Mapped[float | None] = mapped_column(Float)
    mem_bytes: Mapped[int | None] = mapped_column(BigInteger)
    disk_bytes: Mapped[int | None] = mapped_column(BigInteger)


class TeamStatsSample(Base):
    """What a team had running at one sampler pass. Only teams with something running get a row:
    no row at a time means nothing was running (or the sampler was not)."""

    __tablename__ = "team_stats_samples"
    __table_args__ = (Index("ix_team_stats_samples_ts", "ts_ms"),)

    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), primary_key=True)
    ts_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # unix time in milliseconds
    running_count: Mapped[int]
    vcpus: Mapped[int]
    memory_mb: Mapped[int]


# ---- accounts (migration 0003) --------------------------------------------------------------


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(Str(40), primary_key=True)
    # Stored lowercased (and trimmed), so uniqueness is case-insensitive on every backend.
    email: Mapped[str] = mapped_column(Str(320), unique=True)
    # scrypt$n$r$p$salt$hash (see auth.py)
    password_hash: Mapped[str] = mapped_column(Str(256))
    created_at: Mapped[datetime]


class TeamMember(Base):
    """A user's membership of a team, with a role: owner, admin or member."""

    __tablename__ = "team_members"

    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True)
    role: Mapped[str] = mapped_column(Str(16))
    created_at: Mapped[datetime]


# ---- builds (migration 0007) ----------------------------------------------------------------


class Build(Base):
    """A template build: its steps, progress and log. The template it makes is a `templates` row."""

    __tablename__ = "builds"
    __table_args__ = (Index("ix_builds_team_created", "team_id", "created_at"),)

    id: Mapped[str] = mapped_column(Str(40), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(Str(64))  # the template it makes
    base_template: Mapped[str] = mapped_column(Str(64))
    status: Mapped[str] = mapped_column(Str(16), index=True)  # pending|running|success|failed|cancelled
    current_step: Mapped[int]
    total_steps: Mapped[int]
    spec: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # steps as written, healthcheck, ports
    vcpus: Mapped[int]
    memory_mb: Mapped[int]
    logs: Mapped[str] = mapped_column(LongText, default="")
    error: Mapped[str | None] = mapped_column(LongText)
    template_id: Mapped[str | None] = mapped_column(Str(64))
    cached_steps: Mapped[int] = mapped_column(Integer, default=0)  # steps taken from the step cache
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    # With replicas: the one running it, renewed while it does; a lapsed lease means it died.
    claimed_by: Mapped[str | None] = mapped_column(Str(128))
    claimed_until: Mapped[datetime | None]


class BuildLayer(Base):
    """A step cache entry: the state of a build capsule after some steps, kept as a hidden host
    template. `key` hashes the base template, the shape, the steps so far and their context files."""

    __tablename__ = "build_layers"

    key: Mapped[str] = mapped_column(Str(64), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    template_id: Mapped[str] = mapped_column(Str(64))
    step: Mapped[int]  # how many steps it holds
    created_at: Mapped[datetime]
    last_used_at: Mapped[datetime]


# ---- fleet (migration 0008) -----------------------------------------------------------------


class Host(Base):
    """A registered host agent. Made by POST /v1/hosts (a one-time registration token, only its
    hash kept), filled in by the agent's register call, kept fresh by its heartbeats."""

    __tablename__ = "hosts"

    id: Mapped[str] = mapped_column(Str(40), primary_key=True)
    name: Mapped[str] = mapped_column(Str(200))
    address: Mapped[str | None] = mapped_column(Str(300))  # http://IP:PORT of its service
    status: Mapped[str] = mapped_column(Str(16), index=True)  # pending|online|offline|draining
    # Asked to drain: it takes no new capsules, also after it was offline for a while.
    draining: Mapped[bool] = mapped_column(Boolean, default=False)
    vcpus: Mapped[int | None] = mapped_column(Integer)
    memory_mb: Mapped[int | None] = mapped_column(Integer)
    disk_mb: Mapped[int | None] = mapped_column(Integer)
    usage: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the last heartbeat's
    templates: Mapped[list[str] | None] = mapped_column(JSON)  # template ids it holds
    accelerator: Mapped[str | None] = mapped_column(Str(16))
    version: Mapped[str | None] = mapped_column(Str(64))
    token_hash: Mapped[str | None] = mapped_column(Str(64), unique=True)  # None once spent
    credential_hash: Mapped[str | None] = mapped_column(Str(64), unique=True)
    control_token: Mapped[str | None] = mapped_column(Str(128))  # sent to the agent on every call
    # The agent's TLS certificate (PEM) from its registration: the only one trusted for it.
    tls_cert: Mapped[str | None] = mapped_column(LongText)
    last_heartbeat_at: Mapped[datetime | None]
    created_at: Mapped[datetime]


class WorkerPass(Base):
    """One pass of a background worker (sampler, reaper's dead-VM check) in one time slot, claimed
    by the replica that does it: with several replicas, each pass is done once."""

    __tablename__ = "worker_passes"

    name: Mapped[str] = mapped_column(Str(32), primary_key=True)
    slot: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # unix time // interval
    claimed_by: Mapped[str] = mapped_column(Str(64))
