"""Observability: a capsule's metrics, the team's capsule stats and daily usage.

`GET /v1/capsules/stats` and `/v1/capsules/usage` share their prefix with `/v1/capsules/{id}`:
this router is included before the capsules one, so they are matched first.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from wrenn_control import observability as obs
from wrenn_control.api.deps import CurrentTeam, DatabaseDep, TeamCapsule
from wrenn_control.clock import utcnow
from wrenn_control.schemas import CapsuleMetrics, CapsuleStats, ErrorBody, UsageResponse

router = APIRouter(tags=["observability"], responses={401: {"model": ErrorBody}, 400: {"model": ErrorBody}})

DATE_PATTERN = r"^\d{4}-\d{2}-\d{2}$"
_DATE = {"format": "date"}
MetricsRange = Literal["5m", "10m", "1h", "2h", "6h", "12h", "24h"]
StatsRange = Literal["5m", "1h", "6h", "24h", "30d"]
assert set(MetricsRange.__args__) == set(obs.METRICS_RANGES)  # type: ignore[attr-defined]
assert set(StatsRange.__args__) == set(obs.STATS_RANGES)  # type: ignore[attr-defined]


@router.get("/capsules/stats", response_model=CapsuleStats)
async def capsule_stats(team: CurrentTeam, db: DatabaseDep,
                        range: StatsRange = obs.DEFAULT_STATS_RANGE) -> CapsuleStats:  # noqa: A002
    """What the team runs now (`current`), its 30-day maxima (`peaks`) and a chart series over
    `range` (default 1h). Capsules count while `running`."""
    return CapsuleStats.model_validate(await db.run(obs.team_stats, team.id, range, utcnow()))


@router.get("/capsules/usage", response_model=UsageResponse)
async def capsule_usage(team: CurrentTeam, db: DatabaseDep,
                        from_: Annotated[str | None, Query(alias="from", pattern=DATE_PATTERN, json_schema_extra=_DATE,
                                                           description="YYYY-MM-DD (UTC); default 30 days before "
                                                           "`to`; not after `to`, at most 366 days before it.")] = None,
                        to: Annotated[str | None, Query(pattern=DATE_PATTERN, json_schema_extra=_DATE,
                                                        description="YYYY-MM-DD (UTC); default today.")] = None,
                        ) -> UsageResponse:
    """Per UTC day, both ends included: cpu_minutes (vCPUs x minutes running) and ram_mb_minutes
    (memory_mb x minutes running). Exact: computed from when each capsule started and stopped running."""
    now = utcnow()
    start, end = obs.usage_window(from_, to, now.date())
    points = await db.run(obs.daily_usage, team.id, start, end, now)
    return UsageResponse.model_validate({"from": start.isoformat(), "to": end.isoformat(), "points": points})


@router.get("/capsules/{capsule_id}/metrics", response_model=CapsuleMetrics, responses={404: {"model": ErrorBody}})
async def capsule_metrics(capsule: TeamCapsule, db: DatabaseDep,
                          range: MetricsRange = obs.DEFAULT_METRICS_RANGE) -> CapsuleMetrics:  # noqa: A002
    """The sampler's points for the capsule over `range` (default 10m), averaged per bucket (5 s for
    5m up to 5 minutes for 12h and 24h), oldest first. Kept after the capsule stops, until they age out."""
    points = await db.run(obs.capsule_metrics, capsule.id, range, utcnow())
    return CapsuleMetrics.model_validate({"sandbox_id": capsule.id, "range": range, "points": points})
