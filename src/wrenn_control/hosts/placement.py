"""Where a new capsule goes: the least loaded online host with room for it.

Load is what a host has promised, not what it measures: the vCPUs and memory of the capsules it
holds (running, paused or on their way), against its capacity times an overcommit factor
(WRENN_OVERCOMMIT_VCPU, WRENN_OVERCOMMIT_MEMORY). Hosts that already hold the template come
first (no template copy); a team's snapshot template (or a build layer) goes elsewhere only if a
live host holds it to copy from (the router copies it before the create).
Offline, draining and not yet registered hosts never get one. On PostgreSQL the candidate rows are
locked (FOR UPDATE) until the caller commits the new capsule row, so that replicas placing at the
same time see each other's choice.
"""

from __future__ import annotations

import dataclasses

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from wrenn_control.db.models import BuildLayer, Capsule, Host, Template
from wrenn_control.errors import APIError

ONLINE = "online"
DRAINING = "draining"
RESERVING = ("pending", "starting", "running", "pausing", "paused", "resuming", "snapshotting")


@dataclasses.dataclass(frozen=True)
class Candidate:
    host_id: str
    load: float  # the larger of vCPU and memory use after placing, as a fraction of the allowance
    has_template: bool


def reserved(session: Session, host_ids: list[str]) -> dict[str, tuple[int, int]]:
    """host id -> (vCPUs, memory MiB) its capsules hold."""
    rows = session.execute(
        select(Capsule.host_id, func.coalesce(func.sum(Capsule.vcpus), 0), func.coalesce(func.sum(Capsule.memory_mb), 0))
        .where(Capsule.host_id.in_(host_ids), Capsule.status.in_(RESERVING))
        .group_by(Capsule.host_id)).all()
    return {hid: (int(v), int(m)) for hid, v, m in rows}


def candidates(session: Session, *, vcpus: int, memory_mb: int, template_id: str,
               overcommit_vcpu: float, overcommit_memory: float) -> list[Candidate]:
    query = select(Host).where(Host.status == ONLINE).order_by(Host.id)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    hosts = session.scalars(query).all()
    pinned = session.scalar(select(func.count()).select_from(Template).where(Template.id == template_id)) or \
        session.scalar(select(func.count()).select_from(BuildLayer).where(BuildLayer.template_id == template_id))
    # A snapshot template another live host holds can be copied to the chosen one (hosts/router.py).
    copyable = bool(pinned) and any(template_id in (templates or []) for templates in session.scalars(
        select(Host.templates).where(Host.status.in_((ONLINE, DRAINING)))))
    used = reserved(session, [h.id for h in hosts])
    found = []
    for host in hosts:
        if not host.vcpus or not host.memory_mb:
            continue
        has_template = template_id in (host.templates or [])
        if pinned and not has_template and not copyable:
            continue
        used_v, used_m = used.get(host.id, (0, 0))
        allow_v, allow_m = host.vcpus * overcommit_vcpu, host.memory_mb * overcommit_memory
        if used_v + vcpus > allow_v or used_m + memory_mb > allow_m:
            continue
        free_disk = (host.usage or {}).get("free_disk_mb")
        if isinstance(free_disk, (int, float)) and free_disk < memory_mb:  # its memory file goes to disk
            continue
        load = max((used_v + vcpus) / allow_v, (used_m + memory_mb) / allow_m)
        found.append(Candidate(host.id, load, has_template))
    # Template holders first, then the least loaded; ties by id, so the choice is deterministic.
    found.sort(key=lambda c: (not c.has_template, c.load, c.host_id))
    return found


def place(session: Session, *, vcpus: int, memory_mb: int, template_id: str, overcommit_vcpu: float = 4.0,
          overcommit_memory: float = 1.0) -> str:
    """The chosen host's id, or 503 host_unavailable."""
    found = candidates(session, vcpus=vcpus, memory_mb=memory_mb, template_id=template_id,
                       overcommit_vcpu=overcommit_vcpu, overcommit_memory=overcommit_memory)
    if found:
        return found[0].host_id
    online = session.scalar(select(func.count()).select_from(Host).where(Host.status == ONLINE))
    if not online:
        raise APIError(503, "host_unavailable", "no host is online to take the capsule")
    raise APIError(503, "host_unavailable", f"no online host has room for {vcpus} vCPUs and {memory_mb} MiB"
                   + (f" with template {template_id}" if template_id else ""))
