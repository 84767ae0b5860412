"""Server-Sent Events: the team's platform events as they happen.

Each message: `event: <kind>` and one `data:` line, a JSON object with `event` (the kind again:
the published SDK reads only the data), `timestamp` and the payload of `wrenn_control.events`
(`resource`, `actor`, `outcome`, `error`, `metadata`, `sandbox`). The stream opens with a
`connected` event; a `: keepalive` comment follows every quiet 15 s. Browsers (EventSource sends
no headers) authenticate with `?ticket=` from `POST /v1/auth/ticket`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from wrenn_control.api.deps import EventsDep
from wrenn_control.api.routes.tickets import StreamTeam
from wrenn_control.clock import iso_z
from wrenn_control.events import CONNECTED, Event, Subscription

router = APIRouter(tags=["events"])
KEEPALIVE_SEC = 15.0


def format_sse(event: Event) -> str:
    payload = {"event": event.type, **event.data, "timestamp": iso_z(event.at)}
    return f"event: {event.type}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def sse_stream(sub: Subscription, request: Request | None = None,
                     keepalive_sec: float = KEEPALIVE_SEC) -> AsyncIterator[str]:
    try:
        yield format_sse(Event(CONNECTED, sub.team_id or "", {}))
        while request is None or not await request.is_disconnected():
            try:
                event = await asyncio.wait_for(sub.get(), keepalive_sec)
            except asyncio.TimeoutError:
                yield ": keepalive\n\n"  # a comment line keeps proxies from closing an idle stream
                continue
            yield format_sse(event)
    finally:
        sub.close()


@router.get("/events/stream", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
async def event_stream(team: StreamTeam, events: EventsDep, request: Request) -> StreamingResponse:
    sub = events.subscribe(team.id)
    return StreamingResponse(sse_stream(sub, request), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
