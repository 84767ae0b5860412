"""One `HostAgent` over a fleet: each call goes to the host its capsule lives on.

`wrenn control-plane` gives this to the code that was written for one host (CapsuleOps, the
routes, the reaper, the sampler), so that code keeps one path. A capsule's host is its row's
`host_id`, set by placement when the row is written and changed only when a drain moves the
capsule (workers/drainer.py), so it is looked up once per capsule and kept, and looked up again
when the host remembered no longer has it. A create on a host that lacks its snapshot template
copies the template there first (hosts/transfer.py). Calls for a capsule whose host is offline or unknown fail
with `HostUnreachable` (a HostAgentError, so that the lifecycle flows settle the capsule as for
any host failure; 503 host_unavailable) before anything is sent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from wrenn_control.db.models import BuildLayer, Capsule, Host, Template
from wrenn_control.db.session import Database
from wrenn_control.errors import APIError
from wrenn_control.hosts.directory import HostUnavailable as NotInDirectory
from wrenn_control.hosts.registry import FleetDirectory
from wrenn_control.hosts.transfer import move_template
from wrenn_host.api import (
    CapsuleNotFound,
    HostAgent,
    HostAgentError,
    HostLimits,
    ReconcileReport,
    StreamEvent,
    TemplateNotFound,
    TemplateRuntime,
    Tunnel,
)

log = logging.getLogger(__name__)
_CACHE_MAX = 100_000
T = TypeVar("T")


class HostUnreachable(HostAgentError):
    """The capsule's host is offline, unknown or not answering: 503 host_unavailable."""

    code = "host_unavailable"


class RoutingHostAgent(HostAgent):
    def __init__(self, db: Database, directory: FleetDirectory):
        self.db = db
        self.directory = directory
        self._host_of: dict[str, str | None] = {}
        self._builtins: list[TemplateRuntime] | None = None
        self._copying: dict[tuple[str, str], asyncio.Lock] = {}  # (host, template) copies under way
        # placement.place with the app's overcommit settings, for capsules without a row (builds)
        self.place: Any = None

    async def host_of(self, capsule_id: str) -> str | None:
        if capsule_id not in self._host_of:
            found = await self.db.run(
                lambda s: s.execute(select(Capsule.host_id).where(Capsule.id == capsule_id)).first())
            if found is None:
                raise CapsuleNotFound(f"no capsule {capsule_id}")
            if len(self._host_of) >= _CACHE_MAX:
                self._host_of.clear()
            self._host_of[capsule_id] = found[0]
        return self._host_of[capsule_id]

    async def _to(self, capsule_id: str) -> HostAgent:
        try:
            return await self.directory.for_capsule(await self.host_of(capsule_id))
        except NotInDirectory as exc:
            raise HostUnreachable(exc.message) from None

    def forget(self, capsule_id: str) -> None:
        """Its host changed (a drain moved it): look it up again on the next call."""
        self._host_of.pop(capsule_id, None)

    async def _routed(self, capsule_id: str, call: Callable[[HostAgent], Awaitable[T]]) -> T:
        """`call` on the capsule's host. The host is remembered per replica; a capsule moved by
        another replica's drain is not found on the old one, so look again once before failing."""
        agent = await self._to(capsule_id)
        try:
            return await call(agent)
        except CapsuleNotFound:
            was = self._host_of.pop(capsule_id, None)
            if await self.host_of(capsule_id) == was:
                raise
            return await call(await self._to(capsule_id))

    async def check_reachable(self, capsule_id: str) -> None:
        """HostUnreachable if the capsule's host is offline or unknown (CapsuleOps asks first)."""
        await self._to(capsule_id)

    async def _online(self) -> list[tuple[str, HostAgent]]:
        """The hosts not offline. None in this replica's copy of the hosts table (it re-reads it
        every second): read it now, since hosts may have registered through another replica."""
        hosts = self.directory.all()
        if not hosts:
            await self.directory.reload()
            hosts = self.directory.all()
        if not hosts:
            raise HostUnreachable("no host is online")
        return hosts

    async def _online_or_none(self) -> list[tuple[str, HostAgent]]:
        try:
            return await self._online()
        except HostUnreachable:
            return []

    # ---- the fleet as a whole -----------------------------------------------------------

    async def start(self, known: dict[str, str]) -> ReconcileReport:
        # Each host reconciles through its heartbeats (api/routes/hosts.py), not at our start.
        return ReconcileReport(running=[], paused=[], lost=[], errors={})

    async def close(self) -> None:
        await self.directory.close()

    async def health(self) -> dict[str, Any]:
        return {"mode": "fleet", "hosts": {hid: self.directory.status(hid) for hid, _ in self.directory.all()}}

    async def limits(self) -> HostLimits:
        """The largest shape some host takes (each host checks its own on create)."""
        found: list[HostLimits] = []
        for hid, agent in await self._online():
            try:
                found.append(await agent.limits())
            except HostAgentError as exc:
                log.warning("limits of host %s: %s", hid, exc)
        if not found:
            raise HostUnreachable("no host answered")
        return HostLimits(max_vcpus=max(x.max_vcpus for x in found),
                          min_memory_mb=min(x.min_memory_mb for x in found),
                          max_memory_mb=max(x.max_memory_mb for x in found))

    async def capacity(self) -> dict[str, int | None]:
        # Room is placement's question (hosts/placement.py), per host; nothing to say fleet-wide.
        return {"free_memory_mb": None, "free_disk_mb": None}

    async def builtin_templates(self) -> list[TemplateRuntime]:
        """Those of the hosts online (the last ones known while none is; none ever: 503)."""
        seen: dict[str, TemplateRuntime] = {}
        failed: list[str] = []
        online = await self._online_or_none()
        for hid, agent in online:
            try:
                for t in await agent.builtin_templates():
                    seen.setdefault(t.template_id, t)
            except HostAgentError as exc:
                log.warning("built-in templates of host %s: %s", hid, exc)
                failed.append(f"{hid}: {exc.message}")
        if seen:
            self._builtins = list(seen.values())
        elif self._builtins is None:
            raise HostUnreachable(f"no host answered ({'; '.join(failed)})" if online else "no host is online")
        return list(self._builtins)

    async def delete_template(self, template_id: str) -> None:
        deleted = False
        for _, agent in await self._online_or_none():
            try:
                await agent.delete_template(template_id)
                deleted = True
            except TemplateNotFound:
                pass
        if not deleted:
            raise TemplateNotFound(f"no template {template_id}")

    async def template_info(self, template_id: str) -> TemplateRuntime:
        for _, agent in await self._online_or_none():
            try:
                return await agent.template_info(template_id)
            except TemplateNotFound:
                continue
        raise TemplateNotFound(f"no template {template_id}")

    # ---- one capsule's host ---------------------------------------------------------------

    async def create(self, capsule_id: str, template_id: str, vcpus: int | None, memory_mb: int | None,
                     *args: Any, **kwargs: Any) -> Any:
        try:
            agent = await self._to(capsule_id)
        except CapsuleNotFound:
            # No capsule row: a build's capsule (builds/executor.py). Placed here, and kept.
            agent = await self._place_unlisted(capsule_id, template_id, vcpus or 1, memory_mb or 512)
        await self._bring_template(capsule_id, agent, template_id)
        return await agent.create(capsule_id, template_id, vcpus, memory_mb, *args, **kwargs)

    @staticmethod
    def _template_holders(s: Session, template_id: str) -> tuple[bool, list[str]]:
        """(is it a snapshot template or build layer, the live hosts holding it)."""
        pinned = s.get(Template, template_id) is not None or s.scalar(
            select(BuildLayer.template_id).where(BuildLayer.template_id == template_id).limit(1)) is not None
        hosts = s.execute(select(Host.id, Host.templates).where(Host.status.in_(("online", "draining")))).all()
        return pinned, [hid for hid, templates in hosts if template_id in (templates or [])]

    @staticmethod
    def _note_template(s: Session, host_id: str, template_id: str) -> None:
        """Until its next heartbeat says so, the host holds it (placement prefers it from now on).
        The row locked: two notes at once (two copies finishing) both land."""
        host = s.scalar(select(Host).where(Host.id == host_id).with_for_update())
        if host is not None and template_id not in (host.templates or []):
            host.templates = [*(host.templates or []), template_id]
            s.commit()

    async def _bring_template(self, capsule_id: str, agent: HostAgent, template_id: str) -> None:
        """A snapshot template made on another host is copied to this capsule's host first
        (checksummed; kept there after, so the next create finds it)."""
        host_id = self._host_of.get(capsule_id)
        if host_id is None:
            return
        pinned, holders = await self.db.run(self._template_holders, template_id)
        if not pinned or host_id in holders:
            return
        async with self._copying.setdefault((host_id, template_id), asyncio.Lock()):
            for src_id in holders:
                try:
                    src = await self.directory.for_capsule(src_id)
                except NotInDirectory:
                    continue
                moved = await move_template(src, agent, template_id)
                log.info("template %s copied from host %s to %s (%.1f MiB in %.1f s)", template_id, src_id, host_id,
                         moved.bytes / 2**20, moved.seconds)
                await self.db.run(self._note_template, host_id, template_id)
                return
        raise HostUnreachable(f"no live host holds template {template_id} to copy it from")

    async def _place_unlisted(self, capsule_id: str, template_id: str, vcpus: int, memory_mb: int) -> HostAgent:
        if self.place is None:
            raise CapsuleNotFound(f"no capsule {capsule_id}")
        try:
            host_id = await self.db.run(self._place, vcpus, memory_mb, template_id)
        except APIError as exc:
            raise HostUnreachable(exc.message) from exc
        self._host_of[capsule_id] = host_id
        return await self._to(capsule_id)

    def _place(self, s: Session, vcpus: int, memory_mb: int, template_id: str) -> str:
        host_id = self.place(s, vcpus=vcpus, memory_mb=memory_mb, template_id=template_id)
        s.commit()
        return host_id

    async def update_network(self, capsule_id: str, *args: Any, **kwargs: Any) -> Any:
        return await self._routed(capsule_id, lambda agent: agent.update_network(capsule_id, *args, **kwargs))

    async def pause(self, capsule_id: str) -> None:
        await self._routed(capsule_id, lambda agent: agent.pause(capsule_id))

    async def resume(self, capsule_id: str) -> Any:
        return await self._routed(capsule_id, lambda agent: agent.resume(capsule_id))

    async def destroy(self, capsule_id: str) -> None:
        try:
            agent = await self._to(capsule_id)
        except CapsuleNotFound:
            return  # idempotent, as the contract says
        await agent.destroy(capsule_id)

    async def get(self, capsule_id: str) -> Any:
        return await self._routed(capsule_id, lambda agent: agent.get(capsule_id))

    async def snapshot(self, capsule_id: str, template_id: str) -> TemplateRuntime:
        made = await self._routed(capsule_id, lambda agent: agent.snapshot(capsule_id, template_id))
        host_id = self._host_of.get(capsule_id)
        if host_id is not None:  # placement may send a create from it elsewhere before the next heartbeat
            await self.db.run(self._note_template, host_id, template_id)
        return made

    async def exec(self, capsule_id: str, *args: Any, **kwargs: Any) -> Any:
        return await self._routed(capsule_id, lambda agent: agent.exec(capsule_id, *args, **kwargs))

    async def spawn(self, capsule_id: str, *args: Any, **kwargs: Any) -> Any:
        return await self._routed(capsule_id, lambda agent: agent.spawn(capsule_id, *args, **kwargs))

    async def processes(self, capsule_id: str) -> Any:
        return await self._routed(capsule_id, lambda agent: agent.processes(capsule_id))

    async def set_defaults(self, capsule_id: str, **kwargs: Any) -> Any:
        return await self._routed(capsule_id, lambda agent: agent.set_defaults(capsule_id, **kwargs))

    async def kill(self, capsule_id: str, *args: Any, **kwargs: Any) -> None:
        await self._routed(capsule_id, lambda agent: agent.kill(capsule_id, *args, **kwargs))

    async def attach(self, capsule_id: str, target: int | str) -> AsyncIterator[StreamEvent]:  # type: ignore[override]
        async for event in (await self._to(capsule_id)).attach(capsule_id, target):
            yield event

    async def pty_start(self, capsule_id: str, *args: Any, **kwargs: Any) -> Any:
        return await self._routed(capsule_id, lambda agent: agent.pty_start(capsule_id, *args, **kwargs))

    async def pty_sessions(self, capsule_id: str) -> Any:
        return await self._routed(capsule_id, lambda agent: agent.pty_sessions(capsule_id))

    async def pty_attach(self, capsule_id: str, target: int | str) -> AsyncIterator[StreamEvent]:  # type: ignore[override]
        async for event in (await self._to(capsule_id)).pty_attach(capsule_id, target):
            yield event

    async def pty_input(self, capsule_id: str, *args: Any) -> None:
        await self._routed(capsule_id, lambda agent: agent.pty_input(capsule_id, *args))

    async def pty_resize(self, capsule_id: str, *args: Any) -> None:
        await self._routed(capsule_id, lambda agent: agent.pty_resize(capsule_id, *args))

    async def pty_kill(self, capsule_id: str, *args: Any, **kwargs: Any) -> None:
        await self._routed(capsule_id, lambda agent: agent.pty_kill(capsule_id, *args, **kwargs))

    async def read_file(self, capsule_id: str, path: str) -> bytes:
        return await self._routed(capsule_id, lambda agent: agent.read_file(capsule_id, path))

    async def read_file_stream(self, capsule_id: str, path: str) -> AsyncIterator[bytes]:  # type: ignore[override]
        async for chunk in (await self._to(capsule_id)).read_file_stream(capsule_id, path):
            yield chunk

    async def write_file(self, capsule_id: str, path: str, data: Any) -> int:
        return await (await self._to(capsule_id)).write_file(capsule_id, path, data)  # a stream: never sent twice

    async def list_dir(self, capsule_id: str, *args: Any, **kwargs: Any) -> Any:
        return await self._routed(capsule_id, lambda agent: agent.list_dir(capsule_id, *args, **kwargs))

    async def stat(self, capsule_id: str, path: str) -> Any:
        return await self._routed(capsule_id, lambda agent: agent.stat(capsule_id, path))

    async def mkdir(self, capsule_id: str, path: str) -> Any:
        return await self._routed(capsule_id, lambda agent: agent.mkdir(capsule_id, path))

    async def remove(self, capsule_id: str, path: str) -> None:
        await self._routed(capsule_id, lambda agent: agent.remove(capsule_id, path))

    async def metrics(self, capsule_id: str) -> Any:
        return await self._routed(capsule_id, lambda agent: agent.metrics(capsule_id))

    async def tcp_connect(self, capsule_id: str, port: int) -> Tunnel:
        return await self._routed(capsule_id, lambda agent: agent.tcp_connect(capsule_id, port))
