"""Purge of old stopped capsules: a stopped capsule stays listed (as `stopped`) for
`Settings.stopped_retention_sec` after it stopped (its `last_updated`), then its row goes, with its
metrics and running intervals (cascade): so its usage leaves the usage report too. 0 keeps all.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from wrenn_control.clock import utcnow
from wrenn_control.db.models import Capsule
from wrenn_control.db.session import Database
from wrenn_control.lifecycle import Status
from wrenn_control.workers import PeriodicWorker

log = logging.getLogger(__name__)
BATCH = 500  # rows per DELETE, so that one pass never holds the database for long


class Retention(PeriodicWorker):
    name = "retention"

    def __init__(self, db: Database, retention_sec: float, interval_sec: float):
        self.db = db
        self.retention_sec = retention_sec
        self.interval_sec = interval_sec

    async def tick(self) -> None:
        """A pass off the event loop, one database job a batch (other jobs run in between)."""
        if not self.retention_sec:
            return
        cutoff = utcnow() - timedelta(seconds=self.retention_sec)
        total = 0
        while n := await self.db.run(_purge_batch, cutoff):
            total += n
        self._log(total)

    def run_once(self, now: datetime | None = None) -> int:
        """A pass in the calling thread (tests, tools); returns how many capsules went."""
        if not self.retention_sec:
            return 0
        cutoff = (now or utcnow()) - timedelta(seconds=self.retention_sec)
        total = 0
        while True:
            with self.db.session() as s:
                n = _purge_batch(s, cutoff)
            if not n:
                break
            total += n
        self._log(total)
        return total

    def _log(self, total: int) -> None:
        if total:
            log.info("purged %d stopped capsules older than %gs", total, self.retention_sec)


def _purge_batch(s: Session, cutoff: datetime) -> int:
    """Up to BATCH stopped capsules last updated before `cutoff` go; how many did."""
    ids = s.scalars(select(Capsule.id).where(Capsule.status == Status.STOPPED.value,
                                             Capsule.last_updated < cutoff).limit(BATCH)).all()
    if not ids:
        return 0
    s.execute(delete(Capsule).where(Capsule.id.in_(ids), Capsule.status == Status.STOPPED.value)
              .execution_options(synchronize_session=False))
    s.commit()
    return len(ids)
