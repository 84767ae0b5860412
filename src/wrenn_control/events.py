"""In-process pub/sub of platform events (capsule.created, capsule.running, ...).

Publishing never blocks: each subscriber has a bounded queue and loses its oldest events when it
falls behind, so a slow SSE client cannot stall a lifecycle operation.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from wrenn_control.clock import utcnow


@dataclasses.dataclass(frozen=True)
class Event:
    type: str  # e.g. "capsule.running", "template.snapshot.created"
    team_id: str
    data: dict[str, Any]
    at: datetime = dataclasses.field(default_factory=utcnow)


class Subscription:
    def __init__(self, bus: "EventBus", team_id: str | None, maxsize: int):
        self._bus = bus
        self.team_id = team_id
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)

    def offer(self, event: Event) -> None:
        if self.team_id is not None and event.team_id != self.team_id:
            return
        if self.queue.full():
            self.queue.get_nowait()  # drop the oldest
        self.queue.put_nowait(event)

    async def get(self) -> Event:
        return await self.queue.get()

    def close(self) -> None:
        self._bus._subs.discard(self)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[Event]:
        while True:
            yield await self.queue.get()


class EventBus:
    def __init__(self) -> None:
        self._subs: set[Subscription] = set()

    def subscribe(self, team_id: str | None = None, maxsize: int = 1000) -> Subscription:
        sub = Subscription(self, team_id, maxsize)
        self._subs.add(sub)
        return sub

    def publish(self, type: str, team_id: str, data: dict[str, Any]) -> None:
        event = Event(type, team_id, data)
        for sub in list(self._subs):
            sub.offer(event)
