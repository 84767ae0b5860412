"""Observability data: running intervals (usage), capsule metrics and team stats.

- Usage comes from `capsule_runs`: a row per stretch of time a capsule spent `running`, opened and
  closed by `record_status_change`, which `lifecycle.transition` calls in the same transaction as
  the status change. Usage is then exact per UTC day (vCPUs x minutes, memory_mb x minutes) and
  survives restarts (a VM keeps running while the control plane is down; its run stays open).
- Metrics and stats come from the sampler (`workers/sampler.py`): `capsule_metrics` (one guest
  sample per running capsule per pass) and `team_stats_samples` (per team with something running).
  Long ranges are downsampled in the query: rows are grouped into fixed buckets of unix time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

from sqlalchemy import Select, func, insert, literal, or_, select, update
from sqlalchemy.orm import Session

from wrenn_control.db.models import Capsule, CapsuleMetric, CapsuleRun, TeamStatsSample, UTCDateTime
from wrenn_control.errors import invalid, short

RUNNING = "running"

# metrics range -> (seconds covered, bucket seconds). The published SDK documents 2h as 30 s
# averages and 24h as 5-minute averages; the sampler's default interval is 10 s.
METRICS_RANGES: dict[str, tuple[int, int]] = {
    "5m": (300, 5), "10m": (600, 10), "1h": (3600, 30), "2h": (7200, 30),
    "6h": (21600, 120), "12h": (43200, 300), "24h": (86400, 300),
}
DEFAULT_METRICS_RANGE = "10m"

# stats range -> (seconds covered, bucket seconds): 30 to 120 chart points.
STATS_RANGES: dict[str, tuple[int, int]] = {
    "5m": (300, 10), "1h": (3600, 60), "6h": (21600, 300), "24h": (86400, 900), "30d": (30 * 86400, 21600),
}
DEFAULT_STATS_RANGE = "1h"
PEAKS_WINDOW = timedelta(days=30)

USAGE_DEFAULT_DAYS = 30  # `from` defaults to 30 days before `to`
USAGE_MAX_DAYS = 366
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def to_ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


# ---- running intervals -------------------------------------------------------------------


def record_status_change(session: Session, capsule_id: str, to: str, sources: Iterable[str], at: datetime) -> None:
    """Called after `capsule_id` moved to `to` (from one of `sources`), in the same transaction.
    A run is open exactly while the capsule is running."""
    sources = set(sources)
    if to != RUNNING and RUNNING not in sources:
        return  # running is neither left nor entered
    session.execute(
        update(CapsuleRun)
        .where(CapsuleRun.capsule_id == capsule_id, CapsuleRun.ended_at.is_(None))
        .values(ended_at=at)
        .execution_options(synchronize_session=False)
    )
    if to == RUNNING:
        session.execute(insert(CapsuleRun).from_select(
            ["capsule_id", "team_id", "vcpus", "memory_mb", "started_at"],
            select(Capsule.id, Capsule.team_id, Capsule.vcpus, Capsule.memory_mb, literal(at, UTCDateTime()))
            .where(Capsule.id == capsule_id),
        ))


# ---- usage -------------------------------------------------------------------------------


def _parse_date(name: str, value: str | None) -> date | None:
    if value is None:
        return None
    if not _DATE.fullmatch(value):
        raise invalid(f"{name} must be a date as YYYY-MM-DD; got {short(value)}")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise invalid(f"{name} is not a valid date: {short(value)}") from None


def usage_window(from_: str | None, to: str | None, today: date) -> tuple[date, date]:
    start, end = _parse_date("from", from_), _parse_date("to", to)
    end = end or today
    try:  # (date.min and date.max have no day before / after them)
        start = start or end - timedelta(days=USAGE_DEFAULT_DAYS)
        end + timedelta(days=1)
    except OverflowError:
        raise invalid("from and to must be between 0001-02-01 and 9999-12-30") from None
    if start > end:
        raise invalid(f"from ({start.isoformat()}) is after to ({end.isoformat()})")
    if (end - start).days + 1 > USAGE_MAX_DAYS:
        raise invalid(f"at most {USAGE_MAX_DAYS} days at once; got {(end - start).days + 1}")
    return start, end


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=timezone.utc)


def daily_usage(session: Session, team_id: str, start: date, end: date, now: datetime) -> list[dict[str, Any]]:
    """Per UTC day from `start` to `end` (inclusive, every day listed): cpu_minutes = vCPUs x minutes
    running, ram_mb_minutes = memory_mb x minutes running. A run still open counts up to `now`."""
    lo, hi = _midnight(start), _midnight(end + timedelta(days=1))
    runs = session.execute(
        select(CapsuleRun.vcpus, CapsuleRun.memory_mb, CapsuleRun.started_at, CapsuleRun.ended_at)
        .where(CapsuleRun.team_id == team_id, CapsuleRun.started_at < hi,
               or_(CapsuleRun.ended_at.is_(None), CapsuleRun.ended_at > lo))
    ).all()
    days = [start + timedelta(days=i) for i in range((end - start).days + 1)]
    totals = {d: [0.0, 0.0] for d in days}
    for vcpus, memory_mb, started_at, ended_at in runs:
        cur, stop = max(started_at, lo), min(ended_at or now, hi)
        while cur < stop:
            day_end = _midnight(cur.date() + timedelta(days=1))
            minutes = (min(stop, day_end) - cur).total_seconds() / 60
            totals[cur.date()][0] += vcpus * minutes
            totals[cur.date()][1] += memory_mb * minutes
            cur = day_end
    return [{"date": d.isoformat(), "cpu_minutes": round(totals[d][0], 6), "ram_mb_minutes": round(totals[d][1], 6)}
            for d in days]


# ---- capsule metrics ---------------------------------------------------------------------


def capsule_metrics(session: Session, capsule_id: str, range_: str, now: datetime) -> list[dict[str, Any]]:
    """The capsule's samples in the range, averaged per bucket (timestamp_unix: bucket start),
    oldest first. Buckets without samples are left out."""
    span, step = METRICS_RANGES[range_]
    step_ms = step * 1000
    since = to_ms(now) - span * 1000
    bucket = (CapsuleMetric.ts_ms // step_ms).label("bucket")
    rows = session.execute(
        select(bucket, func.avg(CapsuleMetric.cpu_pct), func.avg(CapsuleMetric.mem_bytes),
               func.avg(CapsuleMetric.disk_bytes))
        .where(CapsuleMetric.capsule_id == capsule_id, CapsuleMetric.ts_ms > since)
        .group_by(bucket).order_by(bucket)
    ).all()
    return [{"timestamp_unix": int(b) * step,
             "cpu_pct": round(float(cpu), 2) if cpu is not None else None,
             "mem_bytes": int(mem) if mem is not None else None,
             "disk_bytes": int(disk) if disk is not None else None} for b, cpu, mem, disk in rows]


# ---- team stats --------------------------------------------------------------------------


def _running_totals(team_id: str) -> Select[tuple[int, int | None, int | None]]:
    return select(func.count(), func.sum(Capsule.vcpus), func.sum(Capsule.memory_mb)).where(
        Capsule.team_id == team_id, Capsule.status == RUNNING)


def team_stats(session: Session, team_id: str, range_: str, now: datetime) -> dict[str, Any]:
    """`current` is read live from the capsules table; `peaks` (last 30 days) and `series` (one
    point per bucket, the bucket's maximum, 0 where nothing ran) from the sampler's rows."""
    count, vcpus, memory = session.execute(_running_totals(team_id)).one()
    current = {"running_count": int(count), "vcpus_reserved": int(vcpus or 0),
               "memory_mb_reserved": int(memory or 0), "sampled_at": now}

    peak_row = session.execute(
        select(func.max(TeamStatsSample.running_count), func.max(TeamStatsSample.vcpus),
               func.max(TeamStatsSample.memory_mb))
        .where(TeamStatsSample.team_id == team_id, TeamStatsSample.ts_ms > to_ms(now - PEAKS_WINDOW))
    ).one()
    peaks = {"running_count": max(int(peak_row[0] or 0), current["running_count"]),
             "vcpus": max(int(peak_row[1] or 0), current["vcpus_reserved"]),
             "memory_mb": max(int(peak_row[2] or 0), current["memory_mb_reserved"])}

    span, step = STATS_RANGES[range_]
    step_ms = step * 1000
    last = to_ms(now) // step_ms  # the bucket `now` is in (partial)
    first = last - span // step + 1
    bucket = (TeamStatsSample.ts_ms // step_ms).label("bucket")
    rows = session.execute(
        select(bucket, func.max(TeamStatsSample.running_count), func.max(TeamStatsSample.vcpus),
               func.max(TeamStatsSample.memory_mb))
        .where(TeamStatsSample.team_id == team_id, TeamStatsSample.ts_ms >= first * step_ms)
        .group_by(bucket)
    ).all()
    found = {int(b): (int(r), int(v), int(m)) for b, r, v, m in rows}
    # The bucket under way may have no sample yet: it holds at least what runs now.
    found[last] = tuple(max(a, b) for a, b in zip(found.get(last, (0, 0, 0)), (
        current["running_count"], current["vcpus_reserved"], current["memory_mb_reserved"])))  # type: ignore[assignment]
    buckets = range(first, last + 1)
    series: dict[str, list[Any]] = {
        "labels": [datetime.fromtimestamp(b * step, timezone.utc) for b in buckets],
        "running": [found.get(b, (0, 0, 0))[0] for b in buckets],
        "vcpus": [found.get(b, (0, 0, 0))[1] for b in buckets],
        "memory_mb": [found.get(b, (0, 0, 0))[2] for b in buckets],
    }
    return {"range": range_, "current": current, "peaks": peaks, "series": series}
