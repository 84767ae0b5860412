"""Background work of the control plane: the auto-pause reaper, the metrics sampler and the
start-up reconcile."""

from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger(__name__)


class PeriodicWorker:
    """A named task that calls `tick()` every `interval_sec` until stopped. A failing pass is
    logged and the next one runs: one bad pass must never end the work for good."""

    name = "worker"
    interval_sec: float

    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def tick(self) -> None:
        raise NotImplementedError

    def next_delay(self) -> float:
        return self.interval_sec

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:
                log.exception("%s pass failed", self.name)
            await asyncio.sleep(self.next_delay())
