"""Which hosts are offline, as this process last read the hosts table (the heartbeat watcher
refreshes it every pass). A capsule of an offline host is *shown* `missing` (a status the
published SDK knows) while its row keeps its real status: when the host comes back and reports
its capsules they show that status again, with no row rewritten either way."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from wrenn_control.db.models import Host

MISSING = "missing"
OFFLINE = "offline"  # a host's status
# Statuses in which a capsule lives on its host (lifecycle.ALIVE, by value).
ON_HOST = frozenset({"pending", "starting", "running", "pausing", "paused", "resuming", "snapshotting"})

_offline: frozenset[str] = frozenset()


def set_offline(host_ids: Iterable[str]) -> None:
    global _offline
    _offline = frozenset(host_ids)


def mark(host_id: str, offline: bool) -> None:
    set_offline(_offline | {host_id} if offline else _offline - {host_id})


def back_online(session: Session, host_ids: Iterable[str]) -> dict[str, str]:
    """Those of `host_ids` the hosts table no longer says are offline: host id -> status."""
    return {hid: status for hid, status in session.execute(
        select(Host.id, Host.status).where(Host.id.in_(sorted(host_ids)), Host.status != OFFLINE))}


def confirm(session: Session, host_ids: Iterable[str | None] | None = None) -> None:
    """Re-read the status of the hosts this process reads as offline (those of `host_ids`; None:
    all), one query: a host back through another replica's heartbeat shows its capsules' real
    status at once, not after this process's next refresh. A no-op while none is offline."""
    asked = _offline if host_ids is None else _offline & {h for h in host_ids if h is not None}
    if not asked:
        return
    back = back_online(session, asked)
    if back:
        set_offline(_offline - set(back))


def is_offline(host_id: str | None) -> bool:
    return host_id is not None and host_id in _offline


def shown_status(status: str, host_id: str | None) -> str:
    return MISSING if status in ON_HOST and is_offline(host_id) else status
