"""Waits written once: "poll until running", "connect, resuming if paused".

A flow is a generator that yields steps (``GET``, ``RESUME``, or a number of seconds to
sleep) and receives each step's reply; :func:`drive` runs it with a sync client and
:func:`adrive` with an async one, like httpx's auth flows. API errors met while running a
step are thrown into the flow, which may handle them (a 404 while waiting for ``missing``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Generator, Iterable
from typing import TYPE_CHECKING, Any

from wrenn._exceptions import (
    WrennAPIError,
    WrennCapsuleStateError,
    WrennNotFoundError,
    WrennWaitTimeoutError,
)
from wrenn._models import CapsuleInfo, Status

if TYPE_CHECKING:
    from wrenn._async_client import AsyncWrennClient
    from wrenn._client import WrennClient

DEFAULT_WAIT_TIMEOUT = 60.0  # seconds; generous because a cold boot under TCG takes seconds
# A create or resume usually completes in a few hundred ms: poll briskly for the first seconds (a
# GET costs the server ~5 ms), then back off for slow cold boots.
_FIRST_POLL = 0.05
_BRISK_FOR = 2.0
_MAX_POLL = 1.0

GET = "get"  # step: fetch the capsule; the reply is a CapsuleInfo
RESUME = "resume"  # step: resume the capsule; the reply is a CapsuleInfo
_Step = str | float  # a float step means "sleep this many seconds"
_Flow = Generator[_Step, Any, CapsuleInfo]

# States a capsule never leaves by itself: waiting for anything else is hopeless.
_DEAD = frozenset({Status.error, Status.stopped, Status.missing})


def wait_flow(
    capsule_id: str, targets: Iterable[str], timeout: float = DEFAULT_WAIT_TIMEOUT
) -> _Flow:
    """Poll until the capsule's status is in ``targets``; fail fast on a dead state."""
    want = frozenset(targets)  # Status values equal (and hash as) their strings
    started = time.monotonic()
    deadline = started + timeout
    delay = _FIRST_POLL
    while True:
        try:
            info: CapsuleInfo = yield GET
        except WrennNotFoundError:
            if Status.missing in want:
                return CapsuleInfo(id=capsule_id, status=Status.missing)
            raise
        if info.status in want:
            return info
        wanted = " or ".join(sorted(str(t) for t in want))
        if info.status in _DEAD:
            raise WrennCapsuleStateError(
                "capsule_failed",
                f"capsule {capsule_id} went to '{info.status}' while waiting for {wanted}",
                capsule_id,
                str(info.status),
            )
        left = deadline - time.monotonic()
        if left <= 0:
            raise WrennWaitTimeoutError(
                "wait_timeout",
                f"capsule {capsule_id} did not become {wanted} within {timeout:g}s "
                f"(last status: '{info.status}')",
                capsule_id,
                str(info.status),
            )
        yield min(delay, left)
        if time.monotonic() - started > _BRISK_FOR:
            delay = min(delay * 2, _MAX_POLL)


def connect_flow(capsule_id: str, timeout: float) -> _Flow:
    """Bring an existing capsule to ``running``: let a pause finish, resume, wait."""
    info: CapsuleInfo = yield GET
    if info.status in (Status.pausing, Status.snapshotting):
        settled = frozenset({Status.paused, Status.running})
        info = yield from wait_flow(capsule_id, settled, timeout)
    if info.status in (Status.paused, Status.hibernated):
        info = yield RESUME
    if info.status != Status.running:
        info = yield from wait_flow(capsule_id, frozenset({Status.running}), timeout)
    return info


def drive(flow: _Flow, client: WrennClient, capsule_id: str) -> CapsuleInfo:
    """Run a flow with the sync client. API errors are thrown into the flow to handle."""
    reply: Any = None
    error: WrennAPIError | None = None
    while True:
        try:
            step = flow.throw(error) if error is not None else flow.send(reply)
        except StopIteration as stop:
            result: CapsuleInfo = stop.value
            return result
        reply, error = None, None
        try:
            if step == GET:
                reply = client.capsules.get(capsule_id)
            elif step == RESUME:
                reply = client.capsules.resume(capsule_id)
            else:
                time.sleep(float(step))
        except WrennAPIError as exc:
            error = exc


async def adrive(flow: _Flow, client: AsyncWrennClient, capsule_id: str) -> CapsuleInfo:
    """Run a flow with the async client; the async twin of :func:`drive`."""
    reply: Any = None
    error: WrennAPIError | None = None
    while True:
        try:
            step = flow.throw(error) if error is not None else flow.send(reply)
        except StopIteration as stop:
            result: CapsuleInfo = stop.value
            return result
        reply, error = None, None
        try:
            if step == GET:
                reply = await client.capsules.get(capsule_id)
            elif step == RESUME:
                reply = await client.capsules.resume(capsule_id)
            else:
                await asyncio.sleep(float(step))
        except WrennAPIError as exc:
            error = exc
