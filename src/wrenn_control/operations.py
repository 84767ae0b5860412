"""Capsule operations: the flows that change a capsule by calling the host agent.

Shared by the routes and the reaper, so an auto-pause is exactly an API pause. Every flow has the
same shape:
1. a conditional transition into a transitional state (pausing, resuming, ...): the guard that
   makes concurrent requests lose cleanly instead of racing;
2. the host call, under a per-capsule lock so that this process never runs two lifecycle calls
   on one VM at once (a destroy waits for an in-flight pause instead of overlapping it);
3. the final transition.
When the host call fails, `_settle` asks the host what is true and records that: a capsule is
never left in a transitional state, and one whose VM is gone becomes `error` with the reason.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

from sqlalchemy import ColumnElement, or_, update
from sqlalchemy.orm import Session

from wrenn_control import events as ev
from wrenn_control import ids
from wrenn_control.clock import utcnow
from wrenn_control.db.models import Capsule
from wrenn_control.db.session import Database, execute_committed
from wrenn_control.disk_figures import DiskFigures
from wrenn_control.errors import APIError, agent_error, invalid_state, not_found
from wrenn_control.events import EventBus
from wrenn_control.hosts import HostDirectory
from wrenn_control.lifecycle import Status
from wrenn_control.limits import Quotas, check_team_quota
from wrenn_control import capsule_rows as rows
from wrenn_control.schemas import CapsuleOut
from wrenn_host.network.policy import EgressPolicy
from wrenn_host.api import (
    CapsuleNotFound,
    CapsuleRuntime,
    HostAgent,
    HostAgentError,
    TemplateRuntime,
)

log = logging.getLogger(__name__)
S = Status


@contextlib.contextmanager
def _counted(counter: collections.Counter[str], key: str) -> Iterator[None]:
    counter[key] += 1
    try:
        yield
    finally:
        counter[key] -= 1
        if counter[key] <= 0:
            del counter[key]


class CapsuleOps:
    def __init__(self, db: Database, host: HostAgent, events: EventBus, *, create_wait_sec: float = 5.0,
                 hosts: HostDirectory | None = None):
        self.db = db
        self.host = host  # the local host (the lifecycle flows still call it directly)
        self.hosts = hosts or HostDirectory(host)
        self.events = events
        self.create_wait_sec = create_wait_sec
        self._boot_tasks: dict[str, asyncio.Task[None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # Requests in flight per capsule (exec, file transfer): the reaper leaves these alone.
        self._busy: collections.Counter[str] = collections.Counter()
        # Guest calls in flight per capsule (`guest_call`): a pause or snapshot waits
        # for them, up to `drain_sec`, before it stops the VM (see `_drain`).
        self._calls: collections.Counter[str] = collections.Counter()
        self.drain_sec = 10.0
        # Fleet mode (`wrenn control-plane`): `place(session, vcpus=, memory_mb=, template_id=)`
        # picks a new capsule's host (hosts/placement.py) in the transaction that writes its row;
        # `replica_id` names this process in the capsules' lifecycle leases (see `hold`).
        self.place: Callable[..., str] | None = None
        self.replica_id: str | None = None
        self.lease_sec = 30.0
        # Latency of create/pause/resume, for /metrics (observability: a prometheus Histogram).
        self.latency: Any = None
        self.disk = DiskFigures(host)  # for GET of one capsule

    # ---- reads ----------------------------------------------------------------------------

    async def get(self, capsule_id: str) -> Capsule | None:
        return await self.db.run(rows.get_row, capsule_id)

    async def get_for_team(self, team_id: str, capsule_id: str) -> Capsule:
        """Unknown and other teams' capsules are indistinguishable (both 404)."""
        row = await self.db.run(rows.get_row, capsule_id, team_id)
        if row is None:
            raise not_found("capsule")
        return row

    async def status(self, capsule_id: str) -> str | None:
        return await self.db.run(rows.get_status, capsule_id)

    # ---- state changes --------------------------------------------------------------------

    async def transition(self, capsule_id: str, to: Status, *, from_: Iterable[Status] | None = None,
                         where: Iterable[ColumnElement[bool]] = (), values: dict[str, Any] | None = None,
                         force: bool = False) -> bool:
        """`lifecycle.transition` in its own short transaction, publishing an event on success."""
        before, row = await self.db.run(rows.set_status, capsule_id, to, from_, tuple(where), values, force)
        return self._changed_to(before, row)

    def _changed_to(self, before: str | None, row: Capsule | None) -> bool:
        if row is not None:
            self._publish(row, ev.CAPSULE_STATE_CHANGED, metadata={"from": before or "", "to": row.status})
        return row is not None

    async def touch(self, capsule_id: str) -> bool:
        """Record activity; False if the capsule is not running."""
        return await self.db.run(rows.touch, capsule_id)

    def _publish(self, row: Capsule, kind: str, *, outcome: str | None = None, error: str | None = None,
                 metadata: dict[str, str] | None = None) -> None:
        self.events.publish(kind, row.team_id, ev.payload(
            row.id, "capsule", outcome=outcome, error=error, metadata=metadata,
            sandbox=CapsuleOut.of(row).model_dump(mode="json")))

    async def _finished(self, capsule_id: str, kind: str, error: str | None = None,
                        reason: str | None = None) -> None:
        """An action (create, pause, resume, destroy) ended: `error` None means it succeeded."""
        row = await self.get(capsule_id)
        if row is not None:
            self._publish(row, kind, outcome="success" if error is None else "error", error=error,
                          metadata={"reason": reason} if reason else None)

    def _lock(self, capsule_id: str) -> asyncio.Lock:
        return self._locks.setdefault(capsule_id, asyncio.Lock())

    @asynccontextmanager
    async def hold(self, capsule_id: str) -> AsyncIterator[None]:
        """The right to make a lifecycle call on the capsule's VM: this process's lock, and with
        replicas (`replica_id`) a lease in the capsule's row, so that two control planes never
        call one VM's host at once (a destroy on one waits for a pause on the other). The lease
        is renewed while held and lapses after `lease_sec` if its replica dies."""
        async with self._lock(capsule_id):
            if self.replica_id is None:
                yield
                return
            await self._claim(capsule_id)
            renew = asyncio.create_task(self._renew(capsule_id), name=f"lease {capsule_id}")
            try:
                yield
            finally:
                renew.cancel()
                await self._set_claim(capsule_id, release=True)

    def host_moved(self, capsule_id: str) -> None:
        """The capsule's row names another host now (a drain moved it): forget where it was."""
        forget = getattr(self.host, "forget", None)
        if forget is not None:
            forget(capsule_id)

    async def _set_claim(self, capsule_id: str, *, release: bool = False) -> bool:
        now = utcnow()
        mine = Capsule.claimed_by == self.replica_id
        stmt = update(Capsule).where(Capsule.id == capsule_id).execution_options(synchronize_session=False)
        if release:
            stmt = stmt.where(mine).values(claimed_by=None, claimed_until=None)
        else:
            stmt = stmt.where(or_(Capsule.claimed_by.is_(None), mine, Capsule.claimed_until < now)).values(
                claimed_by=self.replica_id, claimed_until=now + timedelta(seconds=self.lease_sec))
        return await self.db.run(execute_committed, stmt) == 1

    async def _claim(self, capsule_id: str) -> None:
        deadline = asyncio.get_running_loop().time() + self.lease_sec + 5
        while not await self._set_claim(capsule_id):
            if await self.get(capsule_id) is None:
                return  # no row (nothing to claim): the call below finds nothing either
            if asyncio.get_running_loop().time() > deadline:
                raise invalid_state("another control-plane replica holds the capsule; try again")
            await asyncio.sleep(0.05)

    async def _renew(self, capsule_id: str) -> None:
        while True:
            await asyncio.sleep(self.lease_sec / 3)
            await self._set_claim(capsule_id)

    async def _reachable(self, capsule_id: str) -> None:
        """503 host_unavailable, before any state change, if the capsule's host is offline (a
        fleet's RoutingHostAgent knows; the in-process host always is reachable)."""
        check = getattr(self.host, "check_reachable", None)
        if check is not None:
            try:
                await check(capsule_id)
            except HostAgentError as exc:
                if exc.code == "host_unavailable":
                    raise agent_error(exc) from exc

    def _observe(self, op: str, started: float) -> None:
        if self.latency is not None:
            self.latency.labels(op).observe(asyncio.get_running_loop().time() - started)

    # ---- create ---------------------------------------------------------------------------

    async def create(self, team_id: str, *, template: str, template_id: str, vcpus: int, memory_mb: int,
                     timeout_sec: int, labels: dict[str, str], network: EgressPolicy | None = None,
                     prepare: Callable[[], Awaitable[object]] | None = None,
                     quotas: Quotas | None = None) -> Capsule:
        """Write the row as `pending`, boot, and answer once the capsule is running, as Wrenn's
        server does. A boot longer than `create_wait_sec` (a new shape's first, cold, boot, or a
        built-in template built on first use by `prepare`) goes on in the background and the
        answer says `starting`. A failed boot raises 502 agent_error; the capsule stays recorded
        as `error` with the reason."""
        row = await self.start_create(team_id, template=template, template_id=template_id, vcpus=vcpus,
                                      memory_mb=memory_mb, timeout_sec=timeout_sec, labels=labels,
                                      network=network, prepare=prepare, quotas=quotas)
        task = self._boot_tasks.get(row.id)
        if task is not None and self.create_wait_sec > 0:
            # asyncio.wait never cancels the boot: a client that hangs up leaves it to finish.
            await asyncio.wait({task}, timeout=self.create_wait_sec)
        now = await self.get(row.id) or row
        if now.status == S.ERROR.value and task is not None and task.done():
            raise agent_error(now.error or "create failed")
        return now

    async def start_create(self, team_id: str, *, template: str, template_id: str, vcpus: int, memory_mb: int,
                           timeout_sec: int, labels: dict[str, str], network: EgressPolicy | None = None,
                           prepare: Callable[[], Awaitable[object]] | None = None,
                           quotas: Quotas | None = None) -> Capsule:
        """Write the row as `pending` and start the boot in the background; `prepare` is awaited
        before the host creates the VM. With `quotas`, the team's quotas are checked (403) in the
        transaction that places and writes the row, the team row locked: concurrent creates (in
        this process or another replica) cannot both squeeze past."""
        now = utcnow()
        network = network or EgressPolicy()
        rules = network.to_dict()
        row = Capsule(
            id=ids.capsule_id(), team_id=team_id, status=S.PENDING.value, template=template,
            template_id=template_id, vcpus=vcpus, memory_mb=memory_mb, timeout_sec=timeout_sec,
            meta=dict(labels), created_at=now, last_updated=now,
            allow_internet_access=network.allow_internet_access,
            egress={"allow_out": rules["allow_out"], "deny_out": rules["deny_out"]},
        )
        await self.db.run(self._insert, row, quotas)
        self._publish(row, ev.CAPSULE_STATE_CHANGED, metadata={"to": row.status})
        task = asyncio.create_task(self._boot(row.id, template_id, vcpus, memory_mb, network, prepare),
                                   name=f"boot {row.id}")
        self._boot_tasks[row.id] = task
        task.add_done_callback(lambda _t, cid=row.id: self._boot_tasks.pop(cid, None))
        return row

    def _insert(self, s: Session, row: Capsule, quotas: Quotas | None) -> None:
        if quotas is not None:
            check_team_quota(s, quotas, row.team_id, row.vcpus, row.memory_mb)
        if self.place is not None:  # its host, chosen in the transaction that writes the row
            row.host_id = self.place(s, vcpus=row.vcpus, memory_mb=row.memory_mb, template_id=row.template_id)
        s.add(row)
        s.commit()

    async def _boot(self, capsule_id: str, template_id: str, vcpus: int, memory_mb: int,
                    network: EgressPolicy | None = None,
                    prepare: Callable[[], Awaitable[object]] | None = None) -> None:
        if not await self.transition(capsule_id, S.STARTING, from_={S.PENDING}):
            return  # destroyed before the boot began
        started = asyncio.get_running_loop().time()
        try:
            if prepare is not None:
                await prepare()
            async with self.hold(capsule_id):
                runtime = await self.host.create(capsule_id, template_id, vcpus, memory_mb, network=network)
        except HostAgentError as exc:
            await self._fail_boot(capsule_id, f"create failed: {exc.message}")
            return
        except Exception as exc:  # a bug must still leave a truthful status
            log.exception("boot of %s failed", capsule_id)
            await self._fail_boot(capsule_id, f"create failed: internal error: {exc!r}")
            return
        # If this fails, a destroy took the capsule over while it booted; that destroy waits for
        # this task and then removes the VM, so nothing leaks.
        self.disk.note(capsule_id, runtime.disk_used_bytes, runtime.disk_size_bytes)  # (if it gave them)
        if await self._set_running(capsule_id, runtime, from_={S.STARTING}):
            self._observe("create", started)
            await self._finished(capsule_id, ev.CAPSULE_CREATE)

    async def _fail_boot(self, capsule_id: str, reason: str) -> None:
        log.warning("capsule %s: %s", capsule_id, reason)
        # First free whatever a half-done create left behind (destroy is idempotent), so that
        # a capsule seen as `error` holds nothing on its host. (A destroy taking over meanwhile
        # cancels this task and does the same.)
        try:
            async with self.hold(capsule_id):
                await self.host.destroy(capsule_id)
        except HostAgentError as exc:
            log.warning("cleanup of failed capsule %s: %s", capsule_id, exc)
        if await self.transition(capsule_id, S.ERROR, from_={S.STARTING}, values={"error": reason}):
            await self._finished(capsule_id, ev.CAPSULE_CREATE, error=reason)

    async def _set_running(self, capsule_id: str, runtime: CapsuleRuntime, *, from_: Iterable[Status]) -> bool:
        meta = {str(k): str(v) for k, v in runtime.metadata.items()}
        return self._changed_to(*await self.db.run(rows.set_running, capsule_id, meta, tuple(from_)))

    # ---- pause / resume / snapshot / destroy ----------------------------------------------

    async def pause(self, capsule_id: str, *, where: Iterable[ColumnElement[bool]] = (),
                    reason: str | None = None) -> bool:
        """False if the capsule was not running (or `where` did not hold); APIError on failure.
        `reason` goes into the event's metadata (the reaper's: ttl_expired)."""
        await self._reachable(capsule_id)
        if not await self.transition(capsule_id, S.PAUSING, from_={S.RUNNING}, where=where):
            return False
        started = asyncio.get_running_loop().time()
        await self._drain(capsule_id)
        async with self.hold(capsule_id):
            await self._still(capsule_id, S.PAUSING, "pause")
            try:
                await self.host.pause(capsule_id)
            except HostAgentError as exc:
                await self._settle(capsule_id, S.PAUSING, f"pause failed: {exc.message}")
                await self._finished(capsule_id, ev.CAPSULE_PAUSE, error=f"pause failed: {exc.message}",
                                     reason=reason)
                raise agent_error(exc) from exc
        if not await self.transition(capsule_id, S.PAUSED, from_={S.PAUSING}):
            raise await self._changed(capsule_id, "pause")
        self._observe("pause", started)
        await self._finished(capsule_id, ev.CAPSULE_PAUSE, reason=reason)
        return True

    async def resume(self, capsule_id: str, *, quotas: Quotas | None = None) -> bool:
        """False if the capsule was not paused. With `quotas`, the team's quotas are checked (403)
        in the transaction of the transition to `resuming`, the team row locked (see start_create)."""
        await self._reachable(capsule_id)
        if not self._changed_to(*await self.db.run(rows.resuming, capsule_id, quotas)):
            return False
        started = asyncio.get_running_loop().time()
        async with self.hold(capsule_id):
            await self._still(capsule_id, S.RESUMING, "resume")
            try:
                runtime = await self.host.resume(capsule_id)
            except HostAgentError as exc:
                await self._settle(capsule_id, S.RESUMING, f"resume failed: {exc.message}")
                await self._finished(capsule_id, ev.CAPSULE_RESUME, error=f"resume failed: {exc.message}")
                raise agent_error(exc) from exc
        if not await self._set_running(capsule_id, runtime, from_={S.RESUMING}):
            raise await self._changed(capsule_id, "resume")
        self._observe("resume", started)
        await self._finished(capsule_id, ev.CAPSULE_RESUME)
        return True

    async def snapshot(self, capsule_id: str, template_id: str) -> TemplateRuntime:
        """Make a template from a running or paused capsule; the capsule ends paused."""
        await self._reachable(capsule_id)
        if not await self.transition(capsule_id, S.SNAPSHOTTING, from_={S.RUNNING, S.PAUSED}):
            raise invalid_state(f"capsule is {await self.status(capsule_id)}; "
                                "only running or paused capsules can be snapshotted")
        await self._drain(capsule_id)
        async with self.hold(capsule_id):
            await self._still(capsule_id, S.SNAPSHOTTING, "snapshot")
            try:
                template = await self.host.snapshot(capsule_id, template_id)
            except HostAgentError as exc:
                await self._settle(capsule_id, S.SNAPSHOTTING, f"snapshot failed: {exc.message}")
                raise agent_error(exc) from exc
        # If a destroy came in meanwhile the template is still good; the capsule is just gone.
        await self.transition(capsule_id, S.PAUSED, from_={S.SNAPSHOTTING})
        return template

    async def destroy(self, capsule_id: str) -> None:
        """From any state. Idempotent: an already stopped (or stopping) capsule is left as is."""
        if not await self.transition(capsule_id, S.STOPPING):
            return
        boot = self._boot_tasks.get(capsule_id)
        if boot is not None and not boot.done():
            # Stop a boot in progress; the host.destroy below removes whatever it had made.
            boot.cancel()
            await asyncio.wait({boot})
        async with self.hold(capsule_id):
            try:
                await self.host.destroy(capsule_id)
            except HostAgentError as exc:
                if exc.code == "host_unavailable":
                    # Its host is offline: the capsule is gone for the user now, and the host
                    # destroys it when it is back (its heartbeat reports a capsule stopped here).
                    if await self.transition(capsule_id, S.STOPPED, from_={S.STOPPING}):
                        await self._finished(capsule_id, ev.CAPSULE_DESTROY)
                    return
                await self.transition(capsule_id, S.ERROR, from_={S.STOPPING},
                                      values={"error": f"destroy failed: {exc.message}"})
                await self._finished(capsule_id, ev.CAPSULE_DESTROY, error=f"destroy failed: {exc.message}")
                raise agent_error(exc) from exc
        if await self.transition(capsule_id, S.STOPPED, from_={S.STOPPING}):
            await self._finished(capsule_id, ev.CAPSULE_DESTROY)
        self._locks.pop(capsule_id, None)
        self.disk.forget(capsule_id)

    async def update_network(self, row: Capsule, policy: EgressPolicy) -> Capsule:
        """New egress rules for a running or paused capsule, in force without a restart."""
        if row.status not in (S.RUNNING.value, S.PAUSED.value):
            raise invalid_state(f"capsule is {row.status}; only running or paused capsules can change their network")
        await self._reachable(row.id)
        async with self.hold(row.id):
            status = await self.status(row.id)
            if status not in (S.RUNNING.value, S.PAUSED.value):
                raise invalid_state(f"capsule is {status}; only running or paused capsules can change their network")
            try:
                await self.host.update_network(row.id, policy)
            except HostAgentError as exc:
                raise agent_error(exc) from exc
            rules = policy.to_dict()
            return await self.db.run(rows.set_network, row.id, policy.allow_internet_access,
                                     {"allow_out": rules["allow_out"], "deny_out": rules["deny_out"]})

    async def _still(self, capsule_id: str, expected: Status, op: str) -> None:
        """After waiting for the lock: a destroy may have taken over meanwhile."""
        if await self.status(capsule_id) != expected.value:
            raise await self._changed(capsule_id, op)

    async def _changed(self, capsule_id: str, op: str) -> APIError:
        return invalid_state(f"capsule became {await self.status(capsule_id)} during {op}")

    async def _settle(self, capsule_id: str, transitional: Status, reason: str) -> None:
        """After a failed host call: record what the host says is true."""
        try:
            state = (await self.host.get(capsule_id)).state
        except CapsuleNotFound:
            state = None
        except HostAgentError as exc:
            log.warning("capsule %s: state unknown after failure: %s", capsule_id, exc)
            state = None
        if state == "running":
            await self.transition(capsule_id, S.RUNNING, from_={transitional})
        elif state == "paused":
            await self.transition(capsule_id, S.PAUSED, from_={transitional})
        else:
            await self.transition(capsule_id, S.ERROR, from_={transitional}, values={"error": reason})

    # ---- calls into the guest (exec, processes, files): see gateway.py --------------------

    def guest_call(self, capsule_id: str) -> contextlib.AbstractContextManager[None]:
        """A guest call in flight: a pause or snapshot waits for it (see `_drain`)."""
        return _counted(self._calls, capsule_id)

    async def _drain(self, capsule_id: str) -> None:
        """Let the guest calls in flight end (new ones are refused: the capsule is no longer
        running), for at most `drain_sec`; those still running then end with 409."""
        deadline = asyncio.get_running_loop().time() + self.drain_sec
        while self._calls.get(capsule_id, 0) > 0 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)

    async def mark_lost(self, capsule_id: str, message: str) -> None:
        # Only from running: if a pause or destroy is under way, that flow owns the status.
        await self.transition(capsule_id, S.ERROR, from_={S.RUNNING}, values={"error": f"VM lost: {message}"})

    def busy(self, capsule_id: str) -> contextlib.AbstractContextManager[None]:
        """A request in flight (exec, file transfer, stream, proxied connection): no auto-pause."""
        return _counted(self._busy, capsule_id)

    def is_busy(self, capsule_id: str) -> bool:
        return self._busy.get(capsule_id, 0) > 0

    def in_lifecycle_call(self, capsule_id: str) -> bool:
        """A host lifecycle call (create, pause, resume, snapshot, destroy) is under way for it."""
        lock = self._locks.get(capsule_id)
        return lock is not None and lock.locked()

    # ---- shutdown -------------------------------------------------------------------------

    async def shutdown(self, grace_sec: float) -> None:
        """Let in-flight boots finish for a bounded time, then cancel them. A cancelled boot
        stays `starting` in the DB and is settled by the reconcile at the next start."""
        tasks = [t for t in self._boot_tasks.values() if not t.done()]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace_sec)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
