"""One replica per background pass: a replica does the pass of time slot `slot` (unix time //
interval) of worker `name` only if its INSERT of (name, slot) wins (the primary key lets one
through; the others find the row and skip that pass). Old rows go as new ones come."""

from __future__ import annotations

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError

from wrenn_control.db.models import WorkerPass
from sqlalchemy.orm import Session

KEEP_SLOTS = 100  # rows kept per worker (for a look at who did what)


def claim_pass(s: Session, name: str, slot: int, replica_id: str) -> bool:
    """A database job (`await db.run(claim_pass, name, slot, replica_id)`)."""
    s.add(WorkerPass(name=name, slot=slot, claimed_by=replica_id))
    try:
        s.commit()
    except IntegrityError:
        s.rollback()
        return False
    if slot % KEEP_SLOTS == 0:
        s.execute(delete(WorkerPass).where(WorkerPass.name == name, WorkerPass.slot < slot - KEEP_SLOTS))
        s.commit()
    return True
