"""The heartbeat watcher: a host whose last heartbeat is older than `offline_sec` goes offline
(its capsules then show `missing`, hosts/liveness.py), and this process re-reads the hosts table
(hosts registered, drained or removed through another replica).

Every replica runs it; the UPDATE is conditional (still online or draining, still stale), so a
host goes offline once and one replica logs it.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import select, update

from wrenn_control.clock import utcnow
from wrenn_control.db.models import Host
from wrenn_control.db.session import Database
from wrenn_control.hosts.registry import FleetDirectory
from wrenn_control.workers import PeriodicWorker

log = logging.getLogger(__name__)
LIVE = ("online", "draining")


class HeartbeatWatcher(PeriodicWorker):
    name = "heartbeats"

    def __init__(self, db: Database, directory: FleetDirectory | None, offline_sec: float, interval_sec: float):
        self.db = db
        self.directory = directory
        self.offline_sec = offline_sec
        self.interval_sec = interval_sec

    async def tick(self) -> None:
        await self.db.run(lambda _s: self.run_once())  # (its own session, in a database worker thread)

    def run_once(self, now: datetime | None = None) -> list[str]:
        """Mark stale hosts offline; returns those this call marked."""
        cutoff = (now or utcnow()) - timedelta(seconds=self.offline_sec)
        stale_where = (Host.status.in_(LIVE), Host.last_heartbeat_at < cutoff)
        went = []
        with self.db.session() as s:
            for host_id in s.scalars(select(Host.id).where(*stale_where)).all():
                done = s.execute(update(Host).where(Host.id == host_id, *stale_where).values(status="offline")
                                 .execution_options(synchronize_session=False)).rowcount == 1
                if done:
                    went.append(host_id)
            s.commit()
        for host_id in went:
            log.warning("host %s is offline: no heartbeat for %gs", host_id, self.offline_sec)
        if self.directory is not None:
            self.directory.refresh()
        return went
