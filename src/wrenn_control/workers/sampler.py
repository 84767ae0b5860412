"""The sampler: every `interval_sec`, for each running capsule a guest metrics point
(`capsule_metrics`), and for each team with something running its running count, vCPUs and memory
(`team_stats_samples`). Old rows are dropped (`metrics_retention_sec`, `stats_retention_sec`).

A pass never holds the event loop for long: the host is asked for every capsule at once, each
answer bounded by `metrics_timeout_sec`; a capsule that does not answer in time (or fails) just
has no point this pass. Capsules in a transitional state (pausing, snapshotting, ...) or with a
lifecycle call under way are not asked, and a capsule that left `running` while its answer was
awaited gets no point. Passes are aligned to multiples of the interval in unix time, so each
chart bucket of the same size holds one pass.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from wrenn_control.clock import utcnow
from wrenn_control.db.models import Capsule, CapsuleMetric, TeamStatsSample
from wrenn_control.db.session import Database
from wrenn_control.hosts import liveness
from wrenn_control.lifecycle import Status
from wrenn_control.observability import to_ms
from wrenn_control.operations import CapsuleOps
from wrenn_control.workers import PeriodicWorker
from wrenn_control.workers.passes import claim_pass
from wrenn_host.api import CapsuleMetrics, HostAgentError

log = logging.getLogger(__name__)
PRUNE_EVERY_SEC = 60.0


@dataclasses.dataclass
class SamplePass:
    at: datetime
    sampled: list[str]  # capsules that got a metrics point
    skipped: list[str]  # running, but not asked, or no (timely) answer, or no longer running
    teams: dict[str, tuple[int, int, int]]  # team -> (running, vcpus, memory_mb)
    pruned: int = 0


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class Sampler(PeriodicWorker):
    name = "sampler"

    def __init__(self, db: Database, ops: CapsuleOps, interval_sec: float, *, metrics_timeout_sec: float = 2.0,
                 metrics_retention_sec: float = 2 * 86400, stats_retention_sec: float = 31 * 86400):
        self.db = db
        self.ops = ops
        self.interval_sec = interval_sec
        self.metrics_timeout_sec = metrics_timeout_sec
        self.metrics_retention_sec = metrics_retention_sec
        self.stats_retention_sec = stats_retention_sec
        self._last_prune: float | None = None

    async def tick(self) -> None:
        replica = self.ops.replica_id
        if replica is not None and not await self.db.run(
                claim_pass, self.name, round(time.time() / self.interval_sec), replica):
            return  # another replica samples this slot
        await self.run_once()

    def next_delay(self) -> float:
        # Ticks aligned to the clock, so points of different capsules share timestamps.
        return self.interval_sec - time.time() % self.interval_sec

    async def run_once(self, now: datetime | None = None) -> SamplePass:
        now = now or utcnow()
        ts = to_ms(now)
        rows = await self.db.run(lambda s: s.execute(
            select(Capsule.id, Capsule.team_id, Capsule.vcpus, Capsule.memory_mb, Capsule.host_id)
            .where(Capsule.status == Status.RUNNING.value)).all())
        teams: dict[str, tuple[int, int, int]] = {}
        for _, team_id, vcpus, memory_mb, _host in rows:
            count, v, m = teams.get(team_id, (0, 0, 0))
            teams[team_id] = (count + 1, v + vcpus, m + memory_mb)

        # (a capsule of a host this process reads as offline is not asked: it cannot answer)
        asked = [cid for cid, *_, host_id in rows
                 if not self.ops.in_lifecycle_call(cid) and not liveness.is_offline(host_id)]
        answers = await asyncio.gather(*(self._metrics(cid) for cid in asked))
        got = {cid: m for cid, m in zip(asked, answers) if m is not None}

        got, pruned = await self.db.run(self._record, got, teams, ts, now)
        return SamplePass(now, sorted(got), sorted({cid for cid, *_ in rows} - set(got)), teams, pruned)

    def _record(self, s: Session, got: dict[str, CapsuleMetrics], teams: dict[str, tuple[int, int, int]],
                ts: int, now: datetime) -> tuple[dict[str, CapsuleMetrics], int]:
        """Write the points (of the capsules still running) and the team samples; prune."""
        if got:  # only those still running: a pause may have begun while they answered
            still = set(s.scalars(select(Capsule.id).where(
                Capsule.id.in_(list(got)), Capsule.status == Status.RUNNING.value)))
            got = {cid: m for cid, m in got.items() if cid in still}
        if got:
            s.execute(self._insert_ignore(CapsuleMetric), [
                {"capsule_id": cid, "ts_ms": ts, "cpu_pct": _float(m.cpu_pct),
                 "mem_bytes": _int(m.mem_bytes), "disk_bytes": _int(m.disk_bytes)}
                for cid, m in got.items()])
        if teams:
            s.execute(self._insert_ignore(TeamStatsSample), [
                {"team_id": team_id, "ts_ms": ts, "running_count": c, "vcpus": v, "memory_mb": m}
                for team_id, (c, v, m) in teams.items()])
        pruned = self._prune(s, now)
        s.commit()
        return got, pruned

    async def _metrics(self, capsule_id: str) -> CapsuleMetrics | None:
        try:
            point = await asyncio.wait_for(self.ops.host.metrics(capsule_id), self.metrics_timeout_sec)
        except (HostAgentError, asyncio.TimeoutError):
            return None
        except Exception:  # a bug in one capsule's answer must not lose the others'
            log.exception("metrics of %s", capsule_id)
            return None
        self.ops.disk.note(capsule_id, point.disk_bytes, point.disk_size_bytes)  # a GET reuses them
        return point

    def _insert_ignore(self, model: type[CapsuleMetric] | type[TeamStatsSample]) -> Any:
        """INSERT that skips a row already there (a second pass in the same millisecond, a clock
        step back)."""
        if self.db.backend == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(model).on_conflict_do_nothing()
        if self.db.backend == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            return sqlite_insert(model).on_conflict_do_nothing()
        return insert(model)

    def _prune(self, s: Any, now: datetime, force: bool = False) -> int:
        mono = time.monotonic()
        if not force and self._last_prune is not None and mono - self._last_prune < PRUNE_EVERY_SEC:
            return 0
        self._last_prune = mono
        ts = to_ms(now)
        n = s.execute(delete(CapsuleMetric).where(
            CapsuleMetric.ts_ms < ts - int(self.metrics_retention_sec * 1000))).rowcount
        n += s.execute(delete(TeamStatsSample).where(
            TeamStatsSample.ts_ms < ts - int(self.stats_retention_sec * 1000))).rowcount
        return int(n)

    def prune(self, now: datetime | None = None) -> int:
        """Drop rows past their retention now (the passes do it at most once a minute)."""
        with self.db.session() as s:
            n = self._prune(s, now or utcnow(), force=True)
            s.commit()
        return n
