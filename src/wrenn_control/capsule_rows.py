"""The capsule row's reads and writes for `CapsuleOps` (operations.py), as database jobs: each
runs in a database worker thread (`await db.run(job, ...)`) as one transaction, so what it reads
and the write that depends on it stay together."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session

from wrenn_control.clock import utcnow
from wrenn_control.db.models import Capsule
from wrenn_control.lifecycle import Status, touch_active, transition
from wrenn_control.limits import Quotas, check_team_quota

S = Status


def get_row(s: Session, capsule_id: str, team_id: str | None = None) -> Capsule | None:
    # populate_existing: a row this session loaded before an UPDATE of this job is read again
    stmt = select(Capsule).where(Capsule.id == capsule_id).execution_options(populate_existing=True)
    if team_id is not None:
        stmt = stmt.where(Capsule.team_id == team_id)
    return s.scalar(stmt)


def get_status(s: Session, capsule_id: str) -> str | None:
    return s.scalar(select(Capsule.status).where(Capsule.id == capsule_id))


def set_status(s: Session, capsule_id: str, to: Status, from_: Iterable[Status] | None,
               where: Iterable[ColumnElement[bool]], values: dict[str, Any] | None,
               force: bool) -> tuple[str | None, Capsule | None]:
    """(status before, the row after) if the transition happened, else (.., None)."""
    before = get_status(s, capsule_id)  # for the event
    done = transition(s, capsule_id, to, from_=from_, where=where, values=values, force=force)
    row = get_row(s, capsule_id) if done else None
    s.commit()
    return before, row


def touch(s: Session, capsule_id: str) -> bool:
    done = touch_active(s, capsule_id)
    s.commit()
    return done


def set_running(s: Session, capsule_id: str, runtime_meta: dict[str, str],
                 from_: Iterable[Status]) -> tuple[str | None, Capsule | None]:
    """The row to `running` with the runtime's metadata merged into its labels, in one
    transaction (the labels read and written together)."""
    row = get_row(s, capsule_id)
    meta = dict(row.meta or {}) if row is not None else {}
    meta.update(runtime_meta)
    return set_status(s, capsule_id, S.RUNNING, from_, (), {"started_at": utcnow(), "meta": meta, "error": None},
                      False)


def set_network(s: Session, capsule_id: str, allow_internet_access: bool, egress: dict[str, Any]) -> Capsule:
    stored = get_row(s, capsule_id)
    assert stored is not None
    stored.allow_internet_access = allow_internet_access
    stored.egress = egress
    s.commit()
    s.refresh(stored)
    return stored


def resuming(s: Session, capsule_id: str, quotas: Quotas | None) -> tuple[str | None, Capsule | None]:
    """paused -> resuming, after the team's quota check (if `quotas`) in the same transaction."""
    if quotas is not None:
        row = get_row(s, capsule_id)
        if row is not None and row.status == S.PAUSED.value:  # (else the transition below fails: 409)
            check_team_quota(s, quotas, row.team_id, row.vcpus, row.memory_mb)
    return set_status(s, capsule_id, S.RESUMING, {S.PAUSED}, (), None, False)
