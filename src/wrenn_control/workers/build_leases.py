"""Builds whose control-plane replica stopped: their lease lapses, and this ends them as failed
(builds/manager.py). Every replica runs it; the UPDATE is conditional, so each build ends once.
Their build capsules are destroyed at their host's next heartbeat (api/routes/hosts.py)."""

from __future__ import annotations

import logging

from wrenn_control.builds.manager import Builds
from wrenn_control.workers import PeriodicWorker

log = logging.getLogger(__name__)


class BuildLeaseWatcher(PeriodicWorker):
    name = "build-leases"

    def __init__(self, builds: Builds):
        self.builds = builds
        self.interval_sec = builds.lease_sec / 3

    async def tick(self) -> None:
        ended = await self.builds.expire_orphans()
        if ended:
            log.warning("%d build(s) ended as failed: the replica running them stopped", ended)
