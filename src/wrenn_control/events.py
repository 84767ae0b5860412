"""In-process pub/sub of platform events, and their payloads.

Kinds and payload follow the published Wrenn SDK's `SSEEvent` (its client rejects anything else):
- `capsule.state.changed`: every status change; metadata {from, to} (no `from` for a new capsule).
- `capsule.create|pause|resume|destroy`: an action finished, `outcome` success or error (then
  `error` says why). create finishes when the capsule is running or failed to boot; an auto-pause
  is a `capsule.pause` by the system with metadata {reason: ttl_expired}.
- `template.snapshot.create|delete`: resource {id: name, type: template}.
Capsule events carry the capsule under `sandbox` and {id, type: capsule} as `resource`; every event
has the `actor` (the API key, or {type: system}). `connected` opens each stream (api/routes/events.py).

Publishing never blocks: each subscriber has a bounded queue and loses its oldest events when it
falls behind, so a slow SSE client cannot stall a lifecycle operation.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from wrenn_control.clock import utcnow

CONNECTED = "connected"
CAPSULE_STATE_CHANGED = "capsule.state.changed"
CAPSULE_CREATE = "capsule.create"
CAPSULE_PAUSE = "capsule.pause"
CAPSULE_RESUME = "capsule.resume"
CAPSULE_DESTROY = "capsule.destroy"
TEMPLATE_SNAPSHOT_CREATE = "template.snapshot.create"
TEMPLATE_SNAPSHOT_DELETE = "template.snapshot.delete"

# Who causes what happens in this context: set per request by the auth dependency, inherited by the
# tasks a request starts (a capsule's boot). Unset (the reaper, start-up): the system.
current_actor: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("wrenn_actor", default=None)


def actor() -> dict[str, str]:
    return dict(current_actor.get() or {"type": "system"})


def payload(resource_id: str, resource_type: str, *, outcome: str | None = None, error: str | None = None,
            metadata: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    """An event's body (less `event` and `timestamp`, added when it is sent)."""
    body: dict[str, Any] = {"resource": {"id": resource_id, "type": resource_type}, "actor": actor()}
    if outcome is not None:
        body["outcome"] = outcome
    if error is not None:
        body["error"] = error
    if metadata:
        body["metadata"] = {str(k): str(v) for k, v in metadata.items()}
    body.update(extra)
    return body


@dataclasses.dataclass(frozen=True)
class Event:
    type: str  # e.g. "capsule.state.changed", "template.snapshot.create"
    team_id: str
    data: dict[str, Any]  # the payload: resource, actor, outcome, metadata, sandbox, ...
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
