"""The drainer: paused capsules on a draining host move to other hosts, memory and files included
(hosts/transfer.py), so that the host can be emptied and removed. Running capsules stay where
they are until they are paused or destroyed; a later pass moves them once paused.

Every replica runs it. Each move holds the capsule's lifecycle right (`CapsuleOps.hold`: this
process's lock and the lease in its row), so no resume, pause, snapshot or destroy runs on it
meanwhile, on any replica, and two drainers never move one capsule. The database says the new
host only once the new host has the capsule, and the old copy is destroyed only after that: a
failure at any step leaves the capsule paused where it was (the next pass tries again).
"""

from __future__ import annotations

import dataclasses
import logging

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from wrenn_control.db.models import Capsule, Host
from wrenn_control.errors import APIError
from wrenn_control.hosts.registry import FleetDirectory
from wrenn_control.hosts.transfer import move_paused_capsule
from wrenn_control.lifecycle import Status
from wrenn_control.operations import CapsuleOps
from wrenn_control.workers import PeriodicWorker
from wrenn_host.api import HostAgentError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DrainPass:
    moved: dict[str, str] = dataclasses.field(default_factory=dict)  # capsule id -> new host id
    failed: dict[str, str] = dataclasses.field(default_factory=dict)  # capsule id -> why


class Drainer(PeriodicWorker):
    name = "drainer"

    def __init__(self, ops: CapsuleOps, directory: FleetDirectory, interval_sec: float = 5.0):
        self.ops = ops
        self.db = ops.db
        self.directory = directory
        self.interval_sec = interval_sec

    async def tick(self) -> None:
        await self.run_once()

    @staticmethod
    def _paused_on_draining(s: Session) -> list[tuple[str, str]]:
        return [(cid, hid) for cid, hid in s.execute(
            select(Capsule.id, Capsule.host_id).join(Host, Host.id == Capsule.host_id)
            .where(Host.draining.is_(True), Host.status == "draining",
                   Capsule.status == Status.PAUSED.value)
            .order_by(Capsule.id)).all()]

    async def run_once(self) -> DrainPass:
        done = DrainPass()
        for capsule_id, host_id in await self.db.run(self._paused_on_draining):
            try:
                new_host = await self.move(capsule_id, host_id)
            except (APIError, HostAgentError) as exc:
                done.failed[capsule_id] = getattr(exc, "message", str(exc))
                log.warning("drain: capsule %s stays on host %s for now: %s", capsule_id, host_id,
                            done.failed[capsule_id])
                continue
            if new_host is not None:
                done.moved[capsule_id] = new_host
        return done

    async def move(self, capsule_id: str, host_id: str) -> str | None:
        """Move one paused capsule off `host_id`; its new host's id, or None if it was not
        (any more) a paused capsule of that host by the time it was held."""
        async with self.ops.hold(capsule_id):
            row = await self.ops.get(capsule_id)
            if row is None or row.status != Status.PAUSED.value or row.host_id != host_id:
                return None
            dst_id = await self.db.run(self._place, row)  # the host is draining: placement never picks it
            src, dst = await self.directory.for_capsule(host_id), await self.directory.for_capsule(dst_id)

            async def record() -> None:
                await self.db.run(_set_host, capsule_id, dst_id)
                self.ops.host_moved(capsule_id)

            move = await move_paused_capsule(src, dst, capsule_id, row.template_id, on_moved=record)
            log.info("drain: capsule %s moved from host %s to %s (%.1f MiB in %.1f s)", capsule_id, host_id,
                     dst_id, move.transfer.bytes / 2**20, move.transfer.seconds)
            return dst_id

    def _place(self, s: Session, row: Capsule) -> str:
        assert self.ops.place is not None
        host_id = self.ops.place(s, vcpus=row.vcpus, memory_mb=row.memory_mb, template_id=row.template_id)
        s.commit()
        return host_id


def _set_host(s: Session, capsule_id: str, host_id: str) -> None:
    s.execute(update(Capsule).where(Capsule.id == capsule_id).values(host_id=host_id)
              .execution_options(synchronize_session=False))
    s.commit()
