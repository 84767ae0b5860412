"""What a team may have running, and what the host can still give.

Before a create or a resume puts a capsule (back) on the host:
- `host_room()`: the host's free memory and disk (asked of the host agent), minus a reserve: 503
  `host_unavailable` rather than a VM that would be OOM-killed or fill the disk. It awaits the
  host, so it comes first, outside any transaction.
- `check_team_quota()`: the team's quotas (Settings.team_max_capsules / _vcpus / _memory_mb, or
  the team row's own override) over its active capsules: 403 `forbidden`. It runs inside the
  database job that then writes the row (CapsuleOps.start_create, CapsuleOps.resume), with the
  team's row locked (`SELECT ... FOR UPDATE`) until that job commits: concurrent creates, in
  this process or in another replica, take turns, and the second counts the first's capsule.
  (SQLite ignores FOR UPDATE; its jobs run one at a time anyway, see db/session.py.)
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from wrenn_control.config import Settings
from wrenn_control.db.models import Capsule, Team
from wrenn_control.errors import APIError
from wrenn_control.lifecycle import Status
from wrenn_host.api import HostAgent, HostAgentError

# Statuses that hold (or are about to hold) a VM on the host.
ACTIVE = tuple(s.value for s in (Status.PENDING, Status.STARTING, Status.RUNNING, Status.PAUSING,
                                 Status.RESUMING, Status.SNAPSHOTTING))


async def host_room(host: HostAgent, settings: Settings, memory_mb: int) -> None:
    """503 if the host has not `memory_mb` (+ reserve) of memory, or of disk, to spare: a
    capsule's memory file is on disk, and takes up to its memory_mb once written."""
    try:
        free = await host.capacity()
    except HostAgentError as exc:
        raise APIError(503, "host_unavailable", f"host agent unavailable: {exc.message}") from exc
    mem, disk = free.get("free_memory_mb"), free.get("free_disk_mb")
    if mem is not None and mem - settings.host_reserve_memory_mb < memory_mb:
        raise APIError(503, "host_unavailable", f"the host has {mem} MiB of memory available; "
                       f"{memory_mb} MiB more would leave less than {settings.host_reserve_memory_mb} MiB")
    if disk is not None and disk - settings.host_reserve_disk_mb < memory_mb:
        raise APIError(503, "host_unavailable", f"the host has {disk} MiB of disk free; a capsule of "
                       f"{memory_mb} MiB would leave less than {settings.host_reserve_disk_mb} MiB")


# The settings whose team_max_* quotas apply (a team row's own values override them).
Quotas = Settings


def check_team_quota(s: Session, settings: Quotas, team_id: str, vcpus: int, memory_mb: int) -> None:
    """403 if one more active capsule of this shape would go past one of the team's quotas. Locks
    the team's row for the rest of the caller's transaction, which must write the capsule's row
    (or its new status) before it commits."""
    team = s.scalar(select(Team).where(Team.id == team_id).with_for_update())
    count, used_vcpus, used_mem = s.execute(
        select(func.count(), func.coalesce(func.sum(Capsule.vcpus), 0),
               func.coalesce(func.sum(Capsule.memory_mb), 0))
        .where(Capsule.team_id == team_id, Capsule.status.in_(ACTIVE))).one()
    quotas = (
        ("capsules", "max_capsules", "team_max_capsules", "WRENN_TEAM_MAX_CAPSULES", count + 1),
        ("vCPUs", "max_vcpus", "team_max_vcpus", "WRENN_TEAM_MAX_VCPUS", used_vcpus + vcpus),
        ("MiB of memory", "max_memory_mb", "team_max_memory_mb", "WRENN_TEAM_MAX_MEMORY_MB", used_mem + memory_mb),
    )
    for what, column, setting, env, wanted in quotas:
        own = getattr(team, column, None) if team is not None else None
        limit = own if own is not None else getattr(settings, setting)
        if limit and wanted > limit:
            source = "this team's quota" if own is not None else env
            raise APIError(403, "forbidden", f"team quota exceeded: at most {limit} {what} in active "
                           f"capsules ({source}); this would make {wanted}. Pause or destroy some first")

