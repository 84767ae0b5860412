"""Request and response shapes of the REST API (storage shapes are in db/models.py).

Inputs use strict types (an int is not a bool or a string) and refuse unknown fields (400 naming
the field: a typo must not be silently ignored); `None` for an optional field means "use the
default". Constraints are declared on the fields so that the OpenAPI states what is enforced.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictBool,
    StrictInt,
    StrictStr,
    WithJsonSchema,
    field_validator,
)

from wrenn_control.clock import iso_z
from wrenn_host.api import FileInfo
from wrenn_host.network.policy import ENTRY_MAX_LENGTH, ENTRY_PATTERN
from wrenn_control.db.models import Capsule as CapsuleRow
from wrenn_control.errors import short

Timestamp = Annotated[datetime, PlainSerializer(iso_z, return_type=str, when_used="json")]
INT32_MAX = 2**31 - 1

# Keys owned by the platform; users may not set them at create time.
RESERVED_METADATA_KEYS = frozenset({"kernel_version", "vmm_version", "agent_version", "envd_version", "error"})
METADATA_KEY_PATTERN = r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}$"
TEMPLATE_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
_METADATA_KEY = re.compile(METADATA_KEY_PATTERN)
NO_NUL_PATTERN = "^[^\\u0000]*$"
ENV_NAME_PATTERN = "^[^=\\u0000]+$"


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _env_name(value: str) -> str:
    if not value or "=" in value or "\x00" in value:
        raise ValueError("an environment variable name must be non-empty, without '=' or NUL")
    return value


# A string the guest passes to the kernel (exec arguments, paths): C strings end at a NUL.
NoNulStr = Annotated[StrictStr, AfterValidator(_no_nul), Field(json_schema_extra={"pattern": NO_NUL_PATTERN})]
EnvName = Annotated[StrictStr, AfterValidator(_env_name), Field(json_schema_extra={"pattern": ENV_NAME_PATTERN})]
MetadataKey = Annotated[StrictStr, Field(pattern=METADATA_KEY_PATTERN)]
MetadataValue = Annotated[StrictStr, Field(max_length=64)]


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- errors -------------------------------------------------------------------------------

class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


# ---- capsules ------------------------------------------------------------------------------

# Entries are checked by EgressPolicy.parse (its message names the bad entry); the schema states
# the same rule.
EgressEntries = Annotated[list[StrictStr], Field(max_length=256), WithJsonSchema({
    "type": "array", "maxItems": 256,
    "items": {"type": "string", "maxLength": ENTRY_MAX_LENGTH, "pattern": ENTRY_PATTERN}})]


class NetworkRules(_Input):
    allow_out: EgressEntries | None = Field(
        default=None, description="IPv4 addresses, CIDRs or domains (example.com, *.example.com) always allowed; "
                                  "an allow_out entry wins over a deny_out entry.")
    deny_out: EgressEntries | None = Field(default=None, description="IPv4 addresses, CIDRs or domains denied.")


class NetworkRulesOut(BaseModel):
    allow_out: list[str] = []
    deny_out: list[str] = []


class NetworkUpdate(_Input):
    """PATCH /v1/capsules/{id}/network: omitted fields keep their current value."""

    allow_internet_access: StrictBool | None = None
    network: NetworkRules | None = None


class CapsuleCreate(_Input):
    template: Annotated[StrictStr, Field(pattern=TEMPLATE_NAME_PATTERN)] | None = Field(
        default=None, description='Template name; default "minimal".')
    vcpus: Annotated[StrictInt, Field(ge=1)] | None = Field(default=None, description="Default 1.")
    memory_mb: Annotated[StrictInt, Field(ge=1)] | None = Field(default=None, description="Default 512.")
    timeout_sec: Annotated[StrictInt, Field(ge=0, le=INT32_MAX)] | None = Field(
        default=None, description="Inactivity TTL before auto-pause; 0 (default) disables it.")
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=20), WithJsonSchema({
        "type": "object", "maxProperties": 20, "propertyNames": {"pattern": METADATA_KEY_PATTERN},
        "additionalProperties": {"type": "string", "maxLength": 64}})] | None = Field(
        default=None, description="User labels: at most 20 keys, values at most 64 characters; "
        f"the keys {', '.join(sorted(RESERVED_METADATA_KEYS))} are the platform's.")
    allow_internet_access: StrictBool | None = Field(
        default=None, description="Default true; false denies 0.0.0.0/0 (allow_out entries still apply).")
    network: NetworkRules | None = Field(default=None, description="Egress rules.")

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > 20:
            raise ValueError("at most 20 metadata keys")
        for key, item in value.items():
            if not _METADATA_KEY.fullmatch(key):  # (already checked by the field's type)
                raise ValueError(f"invalid metadata key {short(key)}: use [a-zA-Z0-9][a-zA-Z0-9._-]{{0,63}}")
            if key in RESERVED_METADATA_KEYS:
                raise ValueError(f"metadata key {key!r} is reserved")
        return value


class CapsuleOut(BaseModel):
    id: str
    status: str
    template: str
    vcpus: int
    memory_mb: int
    timeout_sec: int
    created_at: Timestamp
    last_updated: Timestamp
    started_at: Timestamp | None
    last_active_at: Timestamp | None
    metadata: dict[str, str]
    allow_internet_access: bool = True
    network: NetworkRulesOut = NetworkRulesOut()

    @classmethod
    def of(cls, row: CapsuleRow, **extra: Any) -> "CapsuleOut":
        metadata = {str(k): str(v) for k, v in (row.meta or {}).items()}
        if row.status == "error" and row.error:
            metadata["error"] = row.error  # the reason, visible to SDKs that only know the seed fields
        return cls(
            id=row.id, status=row.status, template=row.template, vcpus=row.vcpus,
            memory_mb=row.memory_mb, timeout_sec=row.timeout_sec, created_at=row.created_at,
            last_updated=row.last_updated, started_at=row.started_at,
            last_active_at=row.last_active_at, metadata=metadata,
            allow_internet_access=row.allow_internet_access is not False,
            network=NetworkRulesOut(**{k: list(v) for k, v in (row.egress or {}).items()
                                       if k in ("allow_out", "deny_out")}), **extra,
        )


class CapsuleDetail(CapsuleOut):
    disk_size_mb: int | None = None
    disk_used_mb: int | None = None


# ---- exec and processes --------------------------------------------------------------------

class ExecRequest(_Input):
    cmd: Annotated[NoNulStr, Field(min_length=1)]
    args: list[NoNulStr] | None = None
    timeout_sec: Annotated[float, Field(gt=0, le=86400, strict=True)] | None = Field(
        default=None, description="Foreground timeout, default 30 s.")
    background: StrictBool | None = False
    tag: Annotated[NoNulStr, Field(min_length=1, max_length=128)] | None = None
    envs: Annotated[dict[EnvName, NoNulStr], WithJsonSchema({
        "type": "object", "propertyNames": {"pattern": ENV_NAME_PATTERN, "minLength": 1},
        "additionalProperties": {"type": "string", "pattern": NO_NUL_PATTERN}})] | None = None
    cwd: Annotated[NoNulStr, Field(min_length=1, max_length=4096)] | None = None


class ExecResponse(BaseModel):
    sandbox_id: str
    cmd: str
    stdout: str
    stderr: str
    exit_code: int
    duration_ms: int
    encoding: Literal["utf-8", "base64"]
    timed_out: bool = False
    # Output past the cap (Settings.exec_max_output_bytes per stream) was dropped.
    truncated: bool = False
    stdout_truncated: bool = False
    stderr_truncated: bool = False


class BackgroundExecResponse(BaseModel):
    sandbox_id: str
    cmd: str
    pid: int
    tag: str


class ProcessEntry(BaseModel):
    pid: int
    tag: str
    cmd: str
    args: list[str]
    running: bool
    exit_code: int | None


class ProcessList(BaseModel):
    processes: list[ProcessEntry]


# ---- files -------------------------------------------------------------------------------

class PathRequest(_Input):
    path: Annotated[NoNulStr, Field(min_length=1, max_length=4096)]


class ListDirRequest(PathRequest):
    depth: Annotated[StrictInt, Field(ge=0, le=32)] | None = Field(
        default=None, description="1 (default) = direct children; 0 is treated as 1.")


class FileEntry(BaseModel):
    name: str
    path: str
    type: Literal["file", "directory", "symlink"]
    size: int
    mode: int
    permissions: str
    owner: str | None = None
    group: str | None = None
    modified_at: int | None = Field(default=None, description="Unix time, seconds.")
    symlink_target: str | None = None

    @classmethod
    def of(cls, info: FileInfo) -> "FileEntry":
        """From the host's FileInfo: the published SDK wants modified_at as unix seconds and
        permissions ls-style with the type letter ("-rwxr-xr-x")."""
        perms = info.permissions
        if len(perms) == 9:
            perms = {"directory": "d", "symlink": "l"}.get(info.type, "-") + perms
        try:
            parsed = datetime.fromisoformat(info.modified_at.replace("Z", "+00:00"))
        except ValueError:
            modified = None
        else:
            modified = int((parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp())
        return cls(name=info.name, path=info.path, type=info.type, size=info.size, mode=info.mode,
                   permissions=perms, owner=info.owner, group=info.group, modified_at=modified,
                   symlink_target=info.symlink_target)


class ListDirResponse(BaseModel):
    entries: list[FileEntry]


class MkdirResponse(BaseModel):
    entry: FileEntry


# ---- snapshots (templates) ---------------------------------------------------------------

class SnapshotCreate(_Input):
    sandbox_id: Annotated[StrictStr, Field(min_length=1)]
    name: Annotated[StrictStr, Field(pattern=TEMPLATE_NAME_PATTERN)] | None = None


class TemplateOut(BaseModel):
    name: str
    type: Literal["base", "snapshot"]
    vcpus: int
    memory_mb: int
    size_bytes: int
    created_at: Timestamp | None


# ---- system ------------------------------------------------------------------------------

class Health(BaseModel):
    model_config = ConfigDict(extra="allow")  # whatever else the host agent reports

    status: str
    accelerator: str | None = None


# ---- observability -------------------------------------------------------------------------

class MetricPoint(BaseModel):
    timestamp_unix: int = Field(description="Start of the bucket the point averages, unix seconds.")
    cpu_pct: float | None = Field(description="Guest CPU use, 0-100 over all its vCPUs.")
    mem_bytes: int | None = Field(description="Guest memory in use (total - available).")
    disk_bytes: int | None = Field(description="Bytes used on the guest's root filesystem.")


class CapsuleMetrics(BaseModel):
    sandbox_id: str
    range: str
    points: list[MetricPoint]


class StatsCurrent(BaseModel):
    running_count: int
    vcpus_reserved: int
    memory_mb_reserved: int
    sampled_at: Timestamp


class StatsPeaks(BaseModel):
    """Maxima over the last 30 days."""

    running_count: int
    vcpus: int
    memory_mb: int


class StatsSeries(BaseModel):
    """Parallel arrays for a chart: one point per bucket (its start), the bucket's maximum."""

    labels: list[Timestamp]
    running: list[int]
    vcpus: list[int]
    memory_mb: list[int]


class CapsuleStats(BaseModel):
    range: str
    current: StatsCurrent
    peaks: StatsPeaks
    series: StatsSeries


class UsagePoint(BaseModel):
    date: str = Field(description="A UTC day, YYYY-MM-DD.")
    cpu_minutes: float = Field(description="vCPUs x minutes running.")
    ram_mb_minutes: float = Field(description="memory_mb x minutes running.")


class UsageResponse(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    from_: str = Field(alias="from")
    to: str
    points: list[UsagePoint]


# ---- accounts -------------------------------------------------------------------------------

Role = Literal["owner", "admin", "member"]


EMAIL_PATTERN = r"^\s*[^@\s]+@[^@\s]+\.[^@\s]+\s*$"


class SignupRequest(_Input):
    email: StrictStr = Field(max_length=320, pattern=EMAIL_PATTERN)
    password: StrictStr = Field(min_length=8, max_length=1024)
    team_name: StrictStr | None = Field(default=None, min_length=1, max_length=200,
                                        description="name of the personal team (default: the email)")


class LoginRequest(_Input):
    email: StrictStr = Field(max_length=320)
    password: StrictStr = Field(max_length=1024)
    team_id: StrictStr | None = Field(default=None, description="the team the token acts for (default: the oldest)")


class TokenOut(BaseModel):
    token: str


class UserOut(BaseModel):
    id: str
    email: str
    created_at: Timestamp


class TeamOut(BaseModel):
    id: str
    name: str
    role: Role  # the caller's role in it
    created_at: Timestamp


class SignupOut(BaseModel):
    token: str
    user: UserOut
    team: TeamOut


class MeOut(BaseModel):
    user: UserOut
    team: TeamOut | None  # the token's current team


class TeamCreate(_Input):
    name: StrictStr = Field(min_length=1, max_length=200)


class MemberAdd(_Input):
    email: StrictStr = Field(max_length=320)
    role: Role = "member"


class MemberOut(BaseModel):
    user_id: str
    email: str
    role: Role
    created_at: Timestamp


class ApiKeyCreate(_Input):
    name: StrictStr | None = Field(default=None, min_length=1, max_length=200)


class ApiKeyOut(BaseModel):
    id: str
    name: str
    prefix: str
    created_at: Timestamp


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="the full key: shown only once, only its hash is stored")
