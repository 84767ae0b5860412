"""Auto-pause: running capsules idle for `timeout_sec` are paused through the same flow as
POST /pause (`CapsuleOps.pause`). Each pass also notices running capsules whose VM died (crash,
OOM kill) and marks them `error`, so GET tells the truth without waiting for the next exec.

Idle means now - max(last_active_at, started_at) >= timeout_sec. The check is repeated inside the
conditional UPDATE that starts the pause, so an exec or ping that lands between the scan and the
pause wins, and a capsule with a request in flight (a long exec) is skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta

from sqlalchemy import or_, select

from wrenn_control.clock import utcnow
from wrenn_control.db.models import Capsule
from wrenn_control.db.session import Database
from wrenn_control.errors import APIError
from wrenn_control.hosts import liveness
from wrenn_control.lifecycle import Status
from wrenn_control.operations import CapsuleOps
from wrenn_control.workers import PeriodicWorker
from wrenn_control.workers.passes import claim_pass
from wrenn_host.api import CapsuleNotFound, HostAgentError

log = logging.getLogger(__name__)


class Reaper(PeriodicWorker):
    name = "reaper"

    def __init__(self, db: Database, ops: CapsuleOps, interval_sec: float):
        self.db = db
        self.ops = ops
        self.interval_sec = interval_sec

    async def tick(self) -> None:
        replica = self.ops.replica_id
        # The dead-VM check asks the hosts about every running capsule: one replica a slot does
        # it. (The auto-pause scan is a query; its pauses are conditional, so each happens once.)
        if replica is None or await self.db.run(
                claim_pass, "reaper", int(time.time() / self.interval_sec), replica):
            await self.mark_dead()
        await self.run_once()

    async def run_once(self, now: datetime | None = None) -> list[str]:
        """One auto-pause pass; returns the ids it paused."""
        now = now or utcnow()
        rows = await self.db.run(lambda s: s.execute(
            select(Capsule.id, Capsule.timeout_sec, Capsule.started_at, Capsule.last_active_at, Capsule.host_id)
            .where(Capsule.status == Status.RUNNING.value, Capsule.timeout_sec > 0)).all())
        due: list[tuple[str, datetime]] = []
        for capsule_id, timeout_sec, started_at, last_active_at, host_id in rows:
            marks = [t for t in (started_at, last_active_at) if t is not None]
            if not marks or self.ops.is_busy(capsule_id) or liveness.is_offline(host_id):
                continue  # (a capsule of an offline host is paused once the host is back)
            cutoff = now - timedelta(seconds=timeout_sec)
            if max(marks) <= cutoff:
                due.append((capsule_id, cutoff))
        results = await asyncio.gather(*(self._pause(cid, cutoff) for cid, cutoff in due))
        return [cid for (cid, _), paused in zip(due, results) if paused]

    async def mark_dead(self) -> list[str]:
        """Running capsules whose VM is gone become `error`; returns their ids."""
        running = await self.db.run(
            lambda s: s.scalars(select(Capsule.id).where(Capsule.status == Status.RUNNING.value)).all())
        dead = []
        for capsule_id in running:
            try:
                state = (await self.ops.host.get(capsule_id)).state
            except CapsuleNotFound:
                state = "error"
            except HostAgentError:
                continue  # unknown: leave it to the next pass
            if state == "error":
                # Only from running: a pause or destroy that started meanwhile owns the status.
                await self.ops.mark_lost(capsule_id, "the VM stopped unexpectedly")
                dead.append(capsule_id)
        return dead

    async def _pause(self, capsule_id: str, cutoff: datetime) -> bool:
        still_idle = [
            Capsule.timeout_sec > 0,
            or_(Capsule.started_at.is_(None), Capsule.started_at <= cutoff),
            or_(Capsule.last_active_at.is_(None), Capsule.last_active_at <= cutoff),
        ]
        try:
            paused = await self.ops.pause(capsule_id, where=still_idle, reason="ttl_expired")
        except APIError as exc:  # the flow already recorded the capsule's true status
            log.warning("auto-pause of %s failed: %s", capsule_id, exc.message)
            return False
        if paused:
            log.info("auto-paused idle capsule %s", capsule_id)
        return paused
