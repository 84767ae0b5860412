"""The capsule state machine, enforced where the data lives.

Every status change goes through `transition()`: one conditional UPDATE ... WHERE status IN
(allowed sources), so two concurrent requests (or a request and the reaper) cannot both win.
The caller learns from the return value whether its change happened. The same transaction opens
or closes the capsule's running interval (`capsule_runs`, what usage is computed from).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any

from sqlalchemy import ColumnElement, update
from sqlalchemy.orm import Session

from wrenn_control.clock import utcnow
from wrenn_control.db.models import Capsule
from wrenn_control.observability import record_status_change


class Status(str, enum.Enum):
    PENDING = "pending"  # row written, boot not begun yet
    STARTING = "starting"  # host agent is creating the VM
    RUNNING = "running"  # VM up, guest agent answering: exec/files allowed
    PAUSING = "pausing"  # host agent is writing the VM state to disk
    PAUSED = "paused"  # only files on disk; no VM process
    RESUMING = "resuming"  # host agent is restoring the VM from its paused state
    SNAPSHOTTING = "snapshotting"  # a template is being made from it; ends paused
    STOPPING = "stopping"  # destroy in progress
    STOPPED = "stopped"  # destroyed; the row is kept for the listing (terminal)
    ERROR = "error"  # failed or lost; `Capsule.error` says why. Only destroy is allowed.


S = Status

# Allowed moves. Failure edges (X -> ERROR) exist from every live state because a VM can die
# at any time; "undo" edges (PAUSING -> RUNNING, ...) are for a failed operation that left
# the VM as it was.
ALLOWED: dict[Status, frozenset[Status]] = {
    S.PENDING: frozenset({S.STARTING, S.STOPPING, S.ERROR}),
    S.STARTING: frozenset({S.RUNNING, S.STOPPING, S.ERROR}),
    S.RUNNING: frozenset({S.PAUSING, S.SNAPSHOTTING, S.STOPPING, S.ERROR}),
    S.PAUSING: frozenset({S.PAUSED, S.RUNNING, S.STOPPING, S.ERROR}),
    S.PAUSED: frozenset({S.RESUMING, S.SNAPSHOTTING, S.STOPPING, S.ERROR}),
    S.RESUMING: frozenset({S.RUNNING, S.PAUSED, S.STOPPING, S.ERROR}),
    S.SNAPSHOTTING: frozenset({S.PAUSED, S.RUNNING, S.STOPPING, S.ERROR}),
    S.STOPPING: frozenset({S.STOPPED, S.ERROR}),
    S.ERROR: frozenset({S.STOPPING}),
    S.STOPPED: frozenset(),
}

# States in which the control plane believes a VM (or its paused state) exists.
ALIVE = frozenset({S.PENDING, S.STARTING, S.RUNNING, S.PAUSING, S.PAUSED, S.RESUMING, S.SNAPSHOTTING})


def sources_of(to: Status) -> frozenset[Status]:
    return frozenset(s for s, targets in ALLOWED.items() if to in targets)


def transition(
    session: Session,
    capsule_id: str,
    to: Status,
    *,
    from_: Iterable[Status] | None = None,
    where: Iterable[ColumnElement[bool]] = (),
    values: dict[str, Any] | None = None,
    force: bool = False,
) -> bool:
    """Move `capsule_id` to `to` if its status is one of `from_` (default: every allowed source)
    and the extra `where` conditions hold; also set `values`. Returns whether it happened.
    The caller commits. `force` skips the table: only for reconciling with what the host found."""
    sources = frozenset(from_) if from_ is not None else sources_of(to)
    if not force:
        bad = [s.value for s in sources if to not in ALLOWED[s]]
        if bad:
            raise ValueError(f"transition {bad} -> {to.value} is not allowed")
    now = utcnow()
    stmt = (
        update(Capsule)
        .where(Capsule.id == capsule_id, Capsule.status.in_([s.value for s in sources]), *where)
        .values(status=to.value, last_updated=now, **(values or {}))
        .execution_options(synchronize_session=False)
    )
    done = session.execute(stmt).rowcount == 1  # type: ignore[attr-defined]
    if done:  # usage: open or close the capsule's running interval, in the same transaction
        record_status_change(session, capsule_id, to.value, (s.value for s in sources), now)
    return done


def touch_active(session: Session, capsule_id: str) -> bool:
    """Record activity (exec, ping) if and only if the capsule is running."""
    stmt = (
        update(Capsule)
        .where(Capsule.id == capsule_id, Capsule.status == S.RUNNING.value)
        .values(last_active_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return session.execute(stmt).rowcount == 1  # type: ignore[attr-defined]
