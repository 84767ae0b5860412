"""The one way into a capsule's guest: every route that runs a command, moves a file, opens a
stream or proxies a port goes through `GuestGateway.open`.

    async with gateway.open(capsule) as guest:
        result = await guest.exec("ls", ["-la"])

`open(capsule)` checks that the capsule is running (409 invalid_state), finds its host in the
`HostDirectory` (503 host_unavailable), and while it is open marks the capsule busy (the reaper
does not auto-pause it). With `activity=True` the check also records activity (`last_active_at`),
in one conditional update: the row is touched only if it is still running.

Each call of the `Guest` it yields counts as a guest call in flight (a pause or snapshot waits
for those, see `CapsuleOps._drain`), and its failure is translated here, in one place: the
guest's own errors are the user's (4xx), a VM taken away by a pause, snapshot or destroy is 409,
a missing or broken VM is 502 agent_error and marks the capsule `error`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Mapping
from typing import TypeVar

from wrenn_control.db.models import Capsule
from wrenn_control.errors import APIError, agent_error, from_guest_error, invalid_state, not_found
from wrenn_control.hosts import HostDirectory
from wrenn_control.lifecycle import Status
from wrenn_control.operations import CapsuleOps
from wrenn_host.api import (
    CapsuleNotFound,
    ExecResult,
    FileInfo,
    GuestError,
    HostAgent,
    HostAgentError,
    ProcessInfo,
    StreamEvent,
    Tunnel,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
S = Status

# A guest call that fails while the capsule is in one of these lost its VM to a lifecycle call.
_TAKEN_AWAY = frozenset(s.value for s in (S.PAUSING, S.PAUSED, S.SNAPSHOTTING, S.STOPPING, S.STOPPED))
ACTIVITY_INTERVAL_SEC = 1.0  # at most one last_active_at write a second per capsule from traffic
_ACTIVITY_ENTRIES = 10000  # capsules remembered for that before the table starts over

# A guest error code -> the API's answer: (status, code) keeping the guest's message, or a whole error.
Overrides = Mapping[str, "tuple[int, str] | APIError"]


class GuestGateway:
    def __init__(self, ops: CapsuleOps, hosts: HostDirectory):
        self.ops = ops
        self.hosts = hosts
        self._active: dict[str, float] = {}  # capsule id -> when its activity was last written

    async def capsule(self, capsule_id: str, team_id: str | None) -> Capsule:
        """The capsule if it belongs to `team_id` (None: any team, as the port proxy sees it).
        Unknown and other teams' capsules are both 404."""
        if team_id is not None:
            return await self.ops.get_for_team(team_id, capsule_id)
        row = await self.ops.get(capsule_id)
        if row is None:
            raise not_found("capsule")
        return row

    @contextlib.asynccontextmanager
    async def open(self, capsule: Capsule, *, activity: bool = False,
                   purpose: str | None = None) -> AsyncIterator[Guest]:
        """The capsule's guest, for the time of the `async with`. `purpose` (the port proxy's "to
        reach its ports") names the capsule and the reason in the 409's message."""
        if activity:
            status = None if await self.ops.touch(capsule.id) else await self.ops.status(capsule.id)
        else:
            status = None if capsule.status == S.RUNNING.value else capsule.status
        if status is not None:
            if purpose is None:
                raise invalid_state(f"capsule is {status}; it must be running")
            raise invalid_state(f"capsule {capsule.id} is {status}; it must be running {purpose}")
        host = await self.hosts.for_capsule(capsule.host_id)  # NULL: the in-process host of `wrenn server`
        if activity:
            self._active[capsule.id] = time.monotonic()
        with self.ops.busy(capsule.id):
            yield Guest(self, capsule.id, host)

    async def record_activity(self, capsule_id: str, *, force: bool = False) -> None:
        """Write `last_active_at`, at most once a second per capsule unless `force`. Bookkeeping:
        it never fails the traffic it counts."""
        now = time.monotonic()
        if not force and now - self._active.get(capsule_id, 0.0) < ACTIVITY_INTERVAL_SEC:
            return
        if len(self._active) > _ACTIVITY_ENTRIES:
            self._active.clear()
        self._active[capsule_id] = now
        try:
            await self.ops.touch(capsule_id)
        except Exception as exc:
            log.warning("could not record activity of %s: %s", capsule_id, exc)

    async def translate(self, capsule_id: str, host: HostAgent, exc: HostAgentError,
                        overrides: Overrides | None = None) -> APIError:
        """The API's answer to a failed guest call; a VM found gone is recorded (`error`)."""
        if isinstance(exc, GuestError):
            override = (overrides or {}).get(exc.code)
            if isinstance(override, APIError):
                return override
            return from_guest_error(exc, {code: o for code, o in (overrides or {}).items()
                                          if not isinstance(o, APIError)})
        status = await self.ops.status(capsule_id)
        if status in _TAKEN_AWAY:
            # A pause, snapshot or destroy took the VM away under this call: the caller's
            # problem of timing (409), not a broken agent.
            return invalid_state(f"capsule became {status} during the call")
        if isinstance(exc, CapsuleNotFound):
            await self.ops.mark_lost(capsule_id, exc.message)
        else:  # the VMM failed or the guest connection dropped: is the VM still there?
            try:
                if (await host.get(capsule_id)).state != "running":
                    await self.ops.mark_lost(capsule_id, exc.message)
            except CapsuleNotFound:
                await self.ops.mark_lost(capsule_id, exc.message)
            except HostAgentError:
                pass
        return agent_error(exc)


class Guest:
    """A running capsule's guest agent, reached through the capsule's host. Every call raises
    APIError (translated by the gateway) rather than HostAgentError."""

    def __init__(self, gateway: GuestGateway, capsule_id: str, host: HostAgent):
        self.id = capsule_id
        self.host = host
        self._gateway = gateway
        self._ops = gateway.ops

    async def record_activity(self, *, force: bool = False) -> None:
        await self._gateway.record_activity(self.id, force=force)

    async def _call(self, call: Awaitable[T], overrides: Overrides | None = None) -> T:
        with self._ops.guest_call(self.id):
            try:
                return await call
            except HostAgentError as exc:
                raise await self._gateway.translate(self.id, self.host, exc, overrides) from exc

    async def _stream(self, stream: AsyncIterator[T]) -> AsyncGenerator[T, None]:
        """A guest stream: a call in flight and the capsule busy for as long as it is read (it
        may outlive the `open` that made it, as a file read's response body does)."""
        with self._ops.guest_call(self.id), self._ops.busy(self.id):
            try:
                async for item in stream:
                    yield item
            except HostAgentError as exc:
                raise await self._gateway.translate(self.id, self.host, exc) from exc

    # ---- commands and processes -------------------------------------------------------------

    async def exec(self, cmd: str, args: list[str], *, envs: dict[str, str] | None = None,
                   cwd: str | None = None, timeout_sec: float = 30,
                   max_output_bytes: int | None = None) -> ExecResult:
        return await self._call(self.host.exec(self.id, cmd, args, envs=envs, cwd=cwd, timeout_sec=timeout_sec,
                                               max_output_bytes=max_output_bytes))

    async def spawn(self, cmd: str, args: list[str], *, envs: dict[str, str] | None = None,
                    cwd: str | None = None, tag: str | None = None) -> ProcessInfo:
        # `exists`: the tag is held by a live process
        return await self._call(self.host.spawn(self.id, cmd, args, envs=envs, cwd=cwd, tag=tag),
                                overrides={"exists": (409, "conflict")})

    async def processes(self) -> list[ProcessInfo]:
        return await self._call(self.host.processes(self.id))

    async def kill(self, target: int | str, signal: str = "SIGKILL") -> None:
        await self._call(self.host.kill(self.id, target, signal))

    def attach(self, target: int | str) -> AsyncGenerator[StreamEvent, None]:
        return self._stream(self.host.attach(self.id, target))

    # ---- terminals --------------------------------------------------------------------------

    async def pty_start(self, cmd: str, args: list[str] | None, *, cols: int, rows: int,
                        envs: dict[str, str] | None = None, cwd: str | None = None,
                        tag: str | None = None) -> ProcessInfo:
        return await self._call(self.host.pty_start(self.id, cmd, args, cols=cols, rows=rows, envs=envs,
                                                    cwd=cwd, tag=tag))

    async def pty_sessions(self) -> list[ProcessInfo]:
        return await self._call(self.host.pty_sessions(self.id))

    def pty_attach(self, tag: str) -> AsyncGenerator[StreamEvent, None]:
        return self._stream(self.host.pty_attach(self.id, tag))

    async def pty_input(self, tag: str, data: bytes) -> None:
        await self._call(self.host.pty_input(self.id, tag, data))

    async def pty_resize(self, tag: str, cols: int, rows: int) -> None:
        await self._call(self.host.pty_resize(self.id, tag, cols, rows))

    async def pty_kill(self, tag: str, signal: str = "SIGKILL") -> None:
        await self._call(self.host.pty_kill(self.id, tag, signal))

    # ---- files ------------------------------------------------------------------------------

    def read_file(self, path: str) -> AsyncGenerator[bytes, None]:
        return self._stream(self.host.read_file_stream(self.id, path))

    async def write_file(self, path: str, data: bytes | AsyncIterator[bytes]) -> int:
        return await self._call(self.host.write_file(self.id, path, data))

    async def list_dir(self, path: str, depth: int = 1) -> list[FileInfo]:
        return await self._call(self.host.list_dir(self.id, path, depth))

    async def mkdir(self, path: str) -> FileInfo:
        return await self._call(self.host.mkdir(self.id, path))

    async def remove(self, path: str) -> None:
        await self._call(self.host.remove(self.id, path))

    # ---- ports ------------------------------------------------------------------------------

    async def tcp_connect(self, port: int) -> Tunnel:
        return await self._call(self.host.tcp_connect(self.id, port), overrides={
            "refused": APIError(502, "agent_error", f"nothing is listening on port {port} in capsule {self.id}"),
            "unknown_op": APIError(502, "agent_error", "this capsule's guest agent cannot forward ports "
                                   "(its template predates the port proxy)"),
        })
