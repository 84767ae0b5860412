"""Start-up reconcile: tell the host agent what the DB believes, then record what it found.

Nothing is silently lost: a capsule the DB thought alive but the host cannot produce becomes
`error` with the reason. The host's word wins (it has the VMs).
"""

from __future__ import annotations

import logging

from sqlalchemy import select

from wrenn_control.clock import utcnow
from wrenn_control.db.models import Capsule
from wrenn_control.lifecycle import Status
from wrenn_control.operations import CapsuleOps
from wrenn_host.api import ReconcileReport

log = logging.getLogger(__name__)
S = Status


async def reconcile(ops: CapsuleOps) -> ReconcileReport:
    rows = await ops.db.run(lambda s: s.execute(
        select(Capsule.id, Capsule.status).where(Capsule.status != S.STOPPED.value)).all())
    # A capsule that was being destroyed is left out of `known`, so the host cleans it up.
    known = {cid: status for cid, status in rows if status != S.STOPPING.value}
    report = await ops.host.start(known)
    if report.errors:
        log.warning("host kept %d capsule(s) aside at start-up: %s", len(report.errors), report.errors)
    running, paused, lost = set(report.running), set(report.paused), set(report.lost)

    for cid, status in rows:
        was = S(status)
        if was is S.STOPPING:
            await ops.transition(cid, S.STOPPED, from_={was})
        elif cid in running:
            if was is not S.RUNNING:  # it (re)reached running just now
                await ops.transition(cid, S.RUNNING, from_={was}, values={"error": None, "started_at": utcnow()},
                                     force=True)
        elif cid in paused:
            if was is not S.PAUSED:
                await ops.transition(cid, S.PAUSED, from_={was}, values={"error": None}, force=True)
        elif was is S.ERROR:
            continue  # already recorded as failed
        else:
            if cid in report.errors:  # the host kept its files aside and says why
                reason = f"not recoverable after a restart (was {status}): {report.errors[cid]}"
            elif cid in lost:
                reason = f"state could not be recovered after a restart (was {status})"
            else:
                reason = f"not found on the host after a restart (was {status})"
            log.warning("capsule %s: %s", cid, reason)
            await ops.transition(cid, S.ERROR, from_={was}, values={"error": reason}, force=True)
    return report
