"""A capsule's disk figures (`disk_used_mb`, `disk_size_mb`, on GET of one capsule), reused for
a few seconds instead of asking the guest on every poll: the ones a create gives (a spare VM's,
measured as it was warmed), the sampler's, and the last GET's."""

from __future__ import annotations

import asyncio
from typing import Any

from wrenn_control.db.models import Capsule
from wrenn_control.lifecycle import Status
from wrenn_host.api import HostAgent, HostAgentError

FRESH_SEC = 5.0  # a GET shows figures at most this old
MIB = 1024 * 1024


def _mb(value: Any) -> int | None:
    return int(value) // MIB if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class DiskFigures:
    def __init__(self, host: HostAgent):
        self.host = host
        self._known: dict[str, tuple[float, int, int]] = {}  # capsule -> (loop time, used, size) bytes

    def note(self, capsule_id: str, used_bytes: Any, size_bytes: Any) -> None:
        if _mb(used_bytes) is not None and _mb(size_bytes) is not None:
            self._known[capsule_id] = (asyncio.get_running_loop().time(), int(used_bytes), int(size_bytes))

    def forget(self, capsule_id: str) -> None:
        self._known.pop(capsule_id, None)

    async def of(self, row: Capsule, timeout: float = 0.25) -> dict[str, int | None]:
        """Best effort: at most `FRESH_SEC` old, never slowing a poll by more than `timeout`,
        nothing when the capsule is not running or the host cannot tell."""
        if row.status != Status.RUNNING.value:
            return {}
        known = self._known.get(row.id)
        if known is not None and asyncio.get_running_loop().time() - known[0] < FRESH_SEC:
            return {"disk_used_mb": known[1] // MIB, "disk_size_mb": known[2] // MIB}
        try:
            metrics = await asyncio.wait_for(self.host.metrics(row.id), timeout)
        except (HostAgentError, asyncio.TimeoutError):
            return {}
        self.note(row.id, metrics.disk_bytes, metrics.disk_size_bytes)
        return {"disk_used_mb": _mb(metrics.disk_bytes), "disk_size_mb": _mb(metrics.disk_size_bytes)}
