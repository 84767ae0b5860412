"""Control plane settings: one validated object, built by the CLI or by tests."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field, model_validator


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def _flag(name: str, default: bool) -> bool:
    value = (_env(name) or "").strip().lower()
    if not value:
        return default
    return value not in ("0", "false", "no", "off")


def _num(name: str, default: float) -> float:
    value = _env(name)
    return float(value) if value is not None else default


def _default_data_dir() -> Path:
    return Path(os.environ.get("WRENN_DATA_DIR") or "~/.local/share/wrenn").expanduser()


class Settings(BaseModel):
    data_dir: Path = Field(default_factory=_default_data_dir)
    # None means the embedded default: a SQLite file in data_dir. Else a SQLAlchemy URL, e.g.
    # postgresql://user:password@host/dbname (psycopg 3; postgres:// works too).
    database_url: str | None = Field(default_factory=lambda: _env("WRENN_DATABASE_URL"))
    # PostgreSQL: how many worker threads (and pooled connections) run database jobs at once.
    # SQLite always uses one (a single writer; see db/session.py).
    db_threads: int = Field(default_factory=lambda: int(_num("WRENN_DB_THREADS", 8)), ge=1, le=256)
    # An operator-chosen key registered at first start (and never printed); else a fresh key is made.
    bootstrap_api_key: str | None = Field(default_factory=lambda: _env("WRENN_BOOTSTRAP_API_KEY"))
    # Signs the accounts' JWTs; else a secret is made once and kept in data_dir/jwt.secret.
    jwt_secret: str | None = Field(default_factory=lambda: _env("WRENN_JWT_SECRET"))
    reaper_interval_sec: float = Field(default=1.0, gt=0)
    # files/write is buffered, so it has a cap; files/stream/write has none.
    max_upload_bytes: int = Field(default=100 * 1024 * 1024, gt=0)
    # POST /v1/capsules answers once the capsule is running, or after this many seconds with
    # `starting` while the boot goes on (the first create of a new shape cold-boots, ~6 s on TCG).
    create_wait_sec: float = Field(
        default_factory=lambda: float(_env("WRENN_CREATE_WAIT_SEC") or 5.0), ge=0)
    # On shutdown, how long in-flight boots may finish before they are cancelled.
    shutdown_grace_sec: float = Field(default=10.0, ge=0)
    # The port proxy ({port}-{capsule_id}.{domain}) is public-by-URL like Wrenn's; set to require
    # the X-API-Key of the capsule's team instead (see wrenn_control/proxy/).
    proxy_require_api_key: bool = Field(
        default_factory=lambda: (_env("WRENN_PROXY_REQUIRE_API_KEY") or "").lower() in ("1", "true", "yes"))
    # Observability: how often the sampler records capsule metrics and team stats, how long it
    # waits for one capsule's metrics, and how long the samples are kept (the longest metrics
    # range is 24h; stats peaks and the 30d range look back 30 days).
    sampler_interval_sec: float = Field(
        default_factory=lambda: float(_env("WRENN_SAMPLER_INTERVAL_SEC") or 10.0), gt=0)
    sampler_metrics_timeout_sec: float = Field(default=2.0, gt=0)
    metrics_retention_sec: float = Field(default=2 * 86400.0, gt=0)
    stats_retention_sec: float = Field(default=31 * 86400.0, gt=0)

    # ---- limits on what a caller controls (see wrenn_control/limits.py) ----
    # JSON request bodies larger than this are refused with 413 before being read whole (the
    # file upload routes have their own cap, max_upload_bytes, or none).
    max_body_bytes: int = Field(default_factory=lambda: int(_num("WRENN_MAX_BODY_BYTES", 1024 * 1024)), gt=0)
    # A foreground exec keeps at most this many bytes of each of stdout and stderr (the rest is
    # drained and dropped, and the answer says `stdout_truncated` / `stderr_truncated`).
    exec_max_output_bytes: int = Field(
        default_factory=lambda: int(_num("WRENN_EXEC_MAX_OUTPUT_BYTES", 16 * 1024 * 1024)), gt=0)
    # POST /v1/auth/signup is open unless this is off (then 403).
    allow_signup: bool = Field(default_factory=lambda: _flag("WRENN_ALLOW_SIGNUP", True))
    # Per team, what may be active at once (not paused, stopped or error); a team row can
    # override each (teams.max_capsules, ...). 0 means no limit.
    team_max_capsules: int = Field(default_factory=lambda: int(_num("WRENN_TEAM_MAX_CAPSULES", 50)), ge=0)
    team_max_vcpus: int = Field(default_factory=lambda: int(_num("WRENN_TEAM_MAX_VCPUS", 100)), ge=0)
    team_max_memory_mb: int = Field(default_factory=lambda: int(_num("WRENN_TEAM_MAX_MEMORY_MB", 102400)), ge=0)
    # A create or resume is refused (503 host_unavailable) when the host would have less than
    # this much memory / disk left after giving the capsule its memory_mb.
    host_reserve_memory_mb: int = Field(
        default_factory=lambda: int(_num("WRENN_HOST_RESERVE_MEMORY_MB", 256)), ge=0)
    host_reserve_disk_mb: int = Field(default_factory=lambda: int(_num("WRENN_HOST_RESERVE_DISK_MB", 1024)), ge=0)
    # Stopped capsules are purged from the database this long after they stopped (0: never).
    stopped_retention_sec: float = Field(
        default_factory=lambda: _num("WRENN_STOPPED_RETENTION_SEC", 30 * 86400.0), ge=0)
    retention_interval_sec: float = Field(default=600.0, gt=0)
    # How long a pause waits for the capsule's in-flight guest calls (exec, files) to end.
    pause_drain_sec: float = Field(default_factory=lambda: _num("WRENN_PAUSE_DRAIN_SEC", 10.0), ge=0)


    # ---- a fleet (`wrenn control-plane`, hosts/) ----
    # Placement lets a host promise this many times its vCPUs / memory to capsules.
    overcommit_vcpu: float = Field(default_factory=lambda: _num("WRENN_OVERCOMMIT_VCPU", 4.0), gt=0)
    overcommit_memory: float = Field(default_factory=lambda: _num("WRENN_OVERCOMMIT_MEMORY", 1.0), gt=0)
    # A host that has not sent a heartbeat for this long is offline (its capsules show `missing`).
    host_offline_sec: float = Field(default_factory=lambda: _num("WRENN_HOST_OFFLINE_SEC", 15.0), gt=0)
    # What host agents are told to use between heartbeats, and how often offline hosts are looked for.
    heartbeat_interval_sec: float = Field(default_factory=lambda: _num("WRENN_HEARTBEAT_INTERVAL_SEC", 3.0), gt=0)
    host_watch_interval_sec: float = Field(default=1.0, gt=0)
    # How often each replica looks for paused capsules to move off draining hosts.
    drain_interval_sec: float = Field(default_factory=lambda: _num("WRENN_DRAIN_INTERVAL_SEC", 5.0), gt=0)
    # The URL host agents reach this control plane at (the `wrenn host-agent` line of POST
    # /v1/hosts); else the URL the request came in on.
    public_url: str | None = Field(default_factory=lambda: _env("WRENN_PUBLIC_URL"))
    # GET /metrics (Prometheus) wants `Authorization: Bearer <this>` when set.
    metrics_token: str | None = Field(default_factory=lambda: _env("WRENN_METRICS_TOKEN"))

    @model_validator(mode="after")
    def _default_database_url(self) -> "Settings":
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.data_dir / 'wrenn.db'}"
        return self

    @property
    def db_url(self) -> str:
        assert self.database_url is not None
        return self.database_url
