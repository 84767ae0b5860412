"""Request and response shapes of the builds API (Wrenn's build API fields)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from wrenn_control.db.models import Build
from wrenn_control.schemas import Timestamp

LIST_LOG_LINES = 20  # a listing shows only the end of each log


class BuildCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: StrictStr = Field(description="Name of the template the build makes (rules as for snapshots).")
    base_template: StrictStr | None = Field(
        default=None, description='Template to start from; default "minimal" (a Dockerfile\'s FROM wins).')
    recipe: list[StrictStr] | None = Field(
        default=None, description="Wrenn recipe steps: RUN [--timeout=5m] cmd, START cmd, ENV K=V, WORKDIR dir, "
                                  "USER name, COPY src... dst.")
    dockerfile: StrictStr | None = Field(default=None, description="A Dockerfile instead of a recipe.")
    healthcheck: StrictStr | None = Field(
        default=None, description="--interval=5s --timeout=5s --start-period=60s --retries=5 <cmd>")
    vcpus: Annotated[StrictInt, Field(ge=1)] | None = None
    memory_mb: Annotated[StrictInt, Field(ge=1)] | None = None


class BuildOut(BaseModel):
    id: str
    name: str
    base_template: str
    status: Literal["pending", "running", "success", "failed", "cancelled"]
    current_step: int
    total_steps: int
    cached_steps: int = Field(description="Steps taken from the step cache (an earlier build's state).")
    steps: list[str]
    logs: list[str]
    error: str | None
    vcpus: int
    memory_mb: int
    created_at: Timestamp
    started_at: Timestamp | None
    completed_at: Timestamp | None

    @classmethod
    def of(cls, row: Build, logs: str, *, tail: int | None = None) -> BuildOut:
        lines = logs.splitlines()
        if tail is not None:
            lines = lines[-tail:]
        return cls(id=row.id, name=row.name, base_template=row.base_template, status=row.status,  # type: ignore[arg-type]
                   current_step=row.current_step, total_steps=row.total_steps, cached_steps=row.cached_steps,
                   steps=list((row.spec or {}).get("steps", [])), logs=lines, error=row.error, vcpus=row.vcpus,
                   memory_mb=row.memory_mb, created_at=row.created_at, started_at=row.started_at,
                   completed_at=row.completed_at)
