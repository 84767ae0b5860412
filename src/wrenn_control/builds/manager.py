"""Builds of a control plane: records, background tasks, live logs, the step cache, built-ins.

Status moves pending -> running -> success | failed | cancelled, each move one conditional UPDATE
(as capsules do), so a cancel racing the end of a build cannot both win.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import secrets
from collections.abc import AsyncIterator, Iterable
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from wrenn_control import ids
from wrenn_control.builds import builtin
from wrenn_control.builds.context import BuildContext
from wrenn_control.builds.executor import Execution, Job, NoCache, Sink, StepFailed
from wrenn_control.builds.spec import SpecError, layer_keys, parse_recipe, summary
from wrenn_control.clock import utcnow
from wrenn_control.db.models import Build, BuildLayer, Template
from wrenn_control.db.session import Database, add_committed, execute_committed
from wrenn_control.events import TEMPLATE_SNAPSHOT_CREATE, EventBus, payload
from wrenn_host.api import HostAgent, HostAgentError, TemplateNotFound

log = logging.getLogger(__name__)

MAX_LOG_CHARS = 1 << 20  # kept per build (the oldest output goes first)
MAX_LOG_EVENTS = 20_000  # kept for live followers
LOG_FLUSH_S = 1.0
DEFAULT_MAX_LAYERS = 32  # cached layers per team; least recently used go first


class BuildStatus(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"
    CANCELLED = "cancelled"


B = BuildStatus
FINISHED = frozenset({B.SUCCESS, B.FAILED, B.CANCELLED})


class NameTaken(Exception):
    pass


class LiveLog:
    """A build's log while it runs, as events ("log", text) and ("step", (i, n)), followed by any
    number of readers. `text` is the log alone, bounded, as stored in the build record."""

    def __init__(self) -> None:
        self.text = ""
        self.events: list[tuple[str, Any]] = []
        self.first = 0  # absolute index of events[0] (old events go first when there are too many)
        self.done = False
        self.dirty = False
        self.cond = asyncio.Condition()

    def write(self, text: str) -> None:
        self.text = (self.text + text)[-MAX_LOG_CHARS:]
        self._add(("log", text))

    def step(self, i: int, n: int) -> None:
        self._add(("step", (i, n)))

    def _add(self, event: tuple[str, Any]) -> None:
        self.events.append(event)
        if len(self.events) > MAX_LOG_EVENTS:
            cut = len(self.events) - MAX_LOG_EVENTS
            del self.events[:cut]
            self.first += cut
        self.dirty = True
        asyncio.get_running_loop().create_task(self._wake())

    async def _wake(self) -> None:
        async with self.cond:
            self.cond.notify_all()

    async def finish(self) -> None:
        self.done = True
        await self._wake()

    async def follow(self) -> AsyncIterator[tuple[str, Any]]:
        """Every event kept so far, then new ones as they come, until the build ends."""
        pos = self.first
        while True:
            async with self.cond:
                while pos >= self.first + len(self.events) and not self.done:
                    await self.cond.wait()
            batch = self.events[max(pos - self.first, 0):]
            pos = self.first + len(self.events)
            for event in batch:
                yield event
            if not batch and self.done:
                return


def _expire(s: Session, lapsed_before: Any, why: str) -> int:
    """Pending and running builds end as failed: all of them (`lapsed_before` None: one
    process, it restarted) or those whose lease lapsed before then."""
    where = [Build.status.in_([B.PENDING.value, B.RUNNING.value])]
    if lapsed_before is not None:
        where.append(or_(Build.claimed_until.is_(None), Build.claimed_until < lapsed_before))
    count = s.execute(update(Build).where(*where).values(
        status=B.FAILED.value, error=f"interrupted: {why}", completed_at=utcnow(), claimed_by=None,
        claimed_until=None).execution_options(synchronize_session=False)).rowcount  # type: ignore[attr-defined]
    s.commit()
    return int(count)


def _renew(s: Session, build_id: str, replica_id: str, until: Any) -> str | None:
    """Extend this replica's lease on a build still under way; its status either way."""
    s.execute(update(Build).where(Build.id == build_id, Build.claimed_by == replica_id,
                                  Build.status.in_([B.PENDING.value, B.RUNNING.value]))
              .values(claimed_until=until).execution_options(synchronize_session=False))
    s.commit()
    return s.scalar(select(Build.status).where(Build.id == build_id))


def _name_in_use(s: Session, team_id: str, name: str) -> bool:
    """A template of the team's, or a build under way, has the name."""
    if s.scalar(select(Template.id).where(Template.team_id == team_id, Template.name == name)):
        return True
    return s.scalar(select(Build.id).where(Build.team_id == team_id, Build.name == name, Build.status.in_(
        [B.PENDING.value, B.RUNNING.value]))) is not None


def _succeed(s: Session, tpl: Template, build_id: str, cached: int, steps: int, logs: str) -> bool:
    """The template row and running -> success in one transaction: neither without the other
    (a cancel that won meanwhile leaves no template). The whole log goes with the status: a
    build read as finished never shows a log short of its last lines."""
    s.add(tpl)
    s.flush()
    done = s.execute(update(Build).where(Build.id == build_id, Build.status == B.RUNNING.value)
                     .values(status=B.SUCCESS.value, template_id=tpl.id, cached_steps=cached,
                             current_step=steps, completed_at=utcnow(), logs=logs)
                     ).rowcount == 1  # type: ignore[attr-defined]
    if done:
        s.commit()
    else:
        s.rollback()
    return done


class DBLayerCache:
    """The step cache of one team: `build_layers` rows naming hidden host templates."""

    def __init__(self, manager: Builds, team_id: str):
        self.m = manager
        self.team_id = team_id

    async def lookup(self, keys: list[str]) -> tuple[int, str] | None:
        if not keys:
            return None
        return await self.m.db.run(self._lookup, keys)

    def _lookup(self, s: Session, keys: list[str]) -> tuple[int, str] | None:
        rows = s.execute(select(BuildLayer.key, BuildLayer.template_id, BuildLayer.step).where(
            BuildLayer.team_id == self.team_id, BuildLayer.key.in_(keys))).all()
        best = max(rows, key=lambda r: r.step, default=None)
        if best is None:
            return None
        s.execute(update(BuildLayer).where(BuildLayer.key == best.key).values(last_used_at=utcnow()))
        s.commit()
        return best.step, best.template_id

    async def forget(self, key: str) -> None:
        await self.m.db.run(execute_committed, delete(BuildLayer).where(BuildLayer.key == key))

    async def store(self, key: str, template_id: str, steps: int) -> None:
        try:
            replaced, gone = await self.m.db.run(self._store, key, template_id, steps)
        except IntegrityError:
            # Another replica's build stored this key between our read and our insert: the same
            # state, already in the cache (a build going on from it may be using it). Ours is
            # the spare copy; the build that made it goes on in its own capsule.
            log.info("step cache: layer %s was stored by another build meanwhile; dropping %s", key, template_id)
            replaced, gone = template_id, []
        for tid in ([replaced] if replaced else []) + gone:
            await self.m.drop_host_template(tid)

    def _store(self, s: Session, key: str, template_id: str, steps: int) -> tuple[str | None, list[str]]:
        """Record the layer (in place of an old one of that key); evict the least recently used
        past `max_layers`: (the template replaced, those evicted), for the host to delete."""
        now = utcnow()
        old = s.get(BuildLayer, key)
        replaced = old.template_id if old is not None else None
        if old is not None:
            s.delete(old)
            s.flush()
        s.add(BuildLayer(key=key, team_id=self.team_id, template_id=template_id, step=steps,
                         created_at=now, last_used_at=now))
        s.commit()
        evict = s.scalars(select(BuildLayer).where(BuildLayer.team_id == self.team_id)
                          .order_by(BuildLayer.last_used_at.desc()).offset(self.m.max_layers)).all()
        gone = [r.template_id for r in evict]
        for r in evict:
            s.delete(r)
        s.commit()
        return replaced, gone


class Builds:
    def __init__(self, db: Database, host: HostAgent, events: EventBus, *, work_dir, max_layers: int = DEFAULT_MAX_LAYERS,
                 concurrency: int = 2):
        self.db = db
        self.host = host
        self.events = events
        self.work_dir = work_dir
        self.max_layers = max_layers
        self._sem = asyncio.Semaphore(concurrency)
        # Replicas (`wrenn control-plane`): this one's id, put on the builds it runs with a lease
        # it renews; a build whose lease lapsed lost its replica (`expire_orphans`).
        self.replica_id: str | None = None
        self.lease_sec = 30.0
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._logs: dict[str, LiveLog] = {}
        self._builtin_tasks: dict[str, asyncio.Task[str]] = {}

    # ---- records ------------------------------------------------------------------------------

    def recover(self) -> None:
        """At start-up: builds that were under way when the server stopped did not finish (their
        build capsules are removed by the host agent's reconcile). With replicas only those
        whose replica is gone (lease lapsed): the others' builds are still running."""
        with self.db.session() as s:
            _expire(s, None if self.replica_id is None else utcnow(), "the server stopped during the build")

    async def expire_orphans(self) -> int:
        """Builds whose replica stopped (lease lapsed) end as failed; their build capsules go at
        their host's next heartbeat. Any replica may run it: the UPDATE is conditional."""
        return await self.db.run(_expire, utcnow(), "the control plane replica running it stopped")

    async def get(self, team_id: str, build_id: str) -> Build | None:
        return await self.db.run(lambda s: s.scalar(select(Build).where(Build.id == build_id,
                                                                         Build.team_id == team_id)))

    async def list(self, team_id: str) -> list[Build]:
        return await self.db.run(lambda s: list(s.scalars(select(Build).where(Build.team_id == team_id)
                                                          .order_by(Build.created_at.desc(), Build.id)).all()))

    def logs_of(self, row: Build) -> str:
        live = self._logs.get(row.id)
        return live.text if live is not None else row.logs

    def live_log(self, build_id: str) -> LiveLog | None:
        return self._logs.get(build_id)

    async def name_in_use(self, team_id: str, name: str) -> bool:
        return await self.db.run(_name_in_use, team_id, name)

    async def _move(self, build_id: str, to: BuildStatus, from_: Iterable[BuildStatus], **values: Any) -> bool:
        return await self.db.run(execute_committed, update(Build).where(
            Build.id == build_id, Build.status.in_([f.value for f in from_])).values(status=to.value, **values)
            .execution_options(synchronize_session=False)) == 1

    async def _flush_log(self, build_id: str) -> None:
        live = self._logs.get(build_id)
        if live is not None and live.dirty:
            live.dirty = False
            await self.db.run(execute_committed, update(Build).where(Build.id == build_id).values(logs=live.text))

    # ---- submit / cancel ----------------------------------------------------------------------

    async def submit(self, team_id: str, *, name: str, base_name: str, base_template_id: str, base_version: str,
                     spec, vcpus: int | None, memory_mb: int | None, shape: tuple[int, int],
                     context: BuildContext) -> Build:
        now = utcnow()
        row = Build(id="bld-" + secrets.token_hex(10), team_id=team_id, name=name, base_template=base_name,
                    status=B.PENDING.value, current_step=0, total_steps=len(spec.steps), spec=summary(spec),
                    vcpus=shape[0], memory_mb=shape[1], logs="", error=None, template_id=None, cached_steps=0,
                    created_at=now, started_at=None, completed_at=None, claimed_by=self.replica_id,
                    claimed_until=now + timedelta(seconds=self.lease_sec) if self.replica_id else None)
        await self.db.run(add_committed, row)
        job = Job(build_id=row.id, spec=spec, base_template_id=base_template_id, base_version=base_version,
                  vcpus=vcpus, memory_mb=memory_mb, target_template_id=ids.template_id(), context=context,
                  cache_scope=team_id)
        self._logs[row.id] = LiveLog()
        task = asyncio.create_task(self._run(team_id, name, job), name=f"build {row.id}")
        self._tasks[row.id] = task
        task.add_done_callback(lambda _t, bid=row.id: self._tasks.pop(bid, None))
        return row

    async def cancel(self, build_id: str) -> bool:
        """False if the build had already finished."""
        task = self._tasks.get(build_id)
        if not await self._move(build_id, B.CANCELLED, {B.PENDING, B.RUNNING}, error="cancelled", completed_at=utcnow()):
            return False
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})  # the build capsule is gone when this returns
        return True

    async def shutdown(self) -> None:
        for task in list(self._tasks.values()) + list(self._builtin_tasks.values()):
            task.cancel()
        pending = [t for t in list(self._tasks.values()) + list(self._builtin_tasks.values()) if not t.done()]
        if pending:
            await asyncio.wait(pending)

    async def drop_host_template(self, template_id: str) -> None:
        try:
            await self.host.delete_template(template_id)
        except HostAgentError as exc:
            log.warning("could not delete host template %s: %s", template_id, exc)

    # ---- running ------------------------------------------------------------------------------

    async def _run(self, team_id: str, name: str, job: Job) -> None:
        live = self._logs[job.build_id]

        async def on_step(i: int, n: int) -> None:
            live.step(i, n)
            await self.db.run(execute_committed, update(Build).where(Build.id == job.build_id).values(current_step=i))

        flusher = asyncio.create_task(self._keeper(job.build_id, asyncio.current_task()))
        execution = Execution(self.host, job, Sink(on_step, live.write), DBLayerCache(self, team_id))
        try:
            async with self._sem:
                if not await self._move(job.build_id, B.RUNNING, {B.PENDING}, started_at=utcnow()):
                    return  # cancelled while waiting for a slot
                try:
                    runtime = await execution.run()
                except StepFailed as exc:
                    await self._fail(job.build_id, str(exc), live)
                    return
                except (HostAgentError, SpecError) as exc:
                    await self._fail(job.build_id, f"build failed: {exc}", live)
                    return
                except asyncio.CancelledError:
                    live.write("==> cancelled\n")
                    raise
                except Exception as exc:  # a bug must still end the build truthfully
                    log.exception("build %s failed", job.build_id)
                    await self._fail(job.build_id, f"internal error: {exc!r}", live)
                    return
            await self._publish(team_id, name, job, runtime, execution.cached_steps, live)
        finally:
            flusher.cancel()
            job.context.close()
            await self._flush_log(job.build_id)
            await live.finish()
            self._logs.pop(job.build_id, None)

    async def _fail(self, build_id: str, error: str, live: LiveLog) -> None:
        live.write(f"==> failed: {error}\n")
        # (the whole log with the status, as `_succeed` does)
        await self._move(build_id, B.FAILED, {B.RUNNING}, error=error, completed_at=utcnow(), logs=live.text)

    async def _publish(self, team_id: str, name: str, job: Job, runtime, cached: int, live: LiveLog) -> None:
        """The template becomes the team's, unless the build was cancelled or the name was taken
        meanwhile (then its files go)."""
        tpl = Template(id=job.target_template_id, team_id=team_id, name=name, vcpus=runtime.vcpus,
                       memory_mb=runtime.memory_mb, size_bytes=runtime.size_bytes, source_capsule_id=None,
                       created_at=utcnow())
        ready = f"==> template {name} ready\n"
        try:
            done = await self.db.run(_succeed, tpl, job.build_id, cached, len(job.spec.steps), live.text + ready)
        except IntegrityError:
            done = False
            await self._fail(job.build_id, f"template_name_taken: a template named {name!r} was created during the build",
                       live)
        if not done:
            await self.drop_host_template(job.target_template_id)
            return
        live.write(ready)
        self.events.publish(TEMPLATE_SNAPSHOT_CREATE, team_id, payload(
            name, "template", outcome="success", metadata={"build_id": job.build_id}))

    async def _keeper(self, build_id: str, runner: asyncio.Task[Any] | None) -> None:
        """While a build runs: its log is flushed, its lease renewed, and a cancel made through
        another replica (the row says cancelled) stops it here, its build capsule with it."""
        while True:
            await asyncio.sleep(LOG_FLUSH_S)
            await self._flush_log(build_id)
            if self.replica_id is None:
                continue
            status = await self.db.run(_renew, build_id, self.replica_id,
                                       utcnow() + timedelta(seconds=self.lease_sec))
            if status in (B.CANCELLED.value, B.FAILED.value) and runner is not None:
                runner.cancel()
                return

    # ---- built-in templates made by a build (code-runner-beta) --------------------------------

    def builtin_names(self) -> list[str]:
        return list(builtin.BUILTIN_BUILDS)

    async def builtin_template_id(self, name: str) -> str:
        return await builtin_template_id(self.host, name)

    async def ensure_builtin(self, name: str) -> str:
        """The template id of built-in `name`, building it first if this host has none (once, however
        many ask at the same time)."""
        template_id = await self.builtin_template_id(name)
        try:
            await self.host.template_info(template_id)
            return template_id
        except TemplateNotFound:
            pass
        task = self._builtin_tasks.get(name)
        if task is None or task.done():
            task = asyncio.create_task(build_builtin(self.host, name, template_id), name=f"build {name}")
            self._builtin_tasks[name] = task
        try:
            return await asyncio.shield(task)
        except HostAgentError as failed:
            # Another replica's build of it may have finished first (its publish then refused
            # ours): the template is there all the same.
            try:
                await self.host.template_info(template_id)
            except HostAgentError:
                raise failed from None
            return template_id


async def builtin_template_id(host: HostAgent, name: str) -> str:
    """The host id of a built-in build's template: it changes whenever its recipe or base does."""
    b = builtin.BUILTIN_BUILDS[name]
    spec = parse_recipe(list(b.recipe), b.healthcheck)
    version = {t.template_id: t.version for t in await host.builtin_templates()}.get(b.base, "")
    keys = layer_keys("builtin", f"{b.base}@{version}", spec.steps, {}, (b.vcpus, b.memory_mb))
    check = spec.healthcheck.canonical() if spec.healthcheck else ""
    return f"builtin-{name}-{hashlib.sha256((keys[-1] + check).encode()).hexdigest()[:16]}"


async def build_builtin(host: HostAgent, name: str, template_id: str,
                        on_log=lambda text: log.info("%s", text.rstrip())) -> str:
    """Run a built-in template's build (no team, no record, no step cache)."""
    b = builtin.BUILTIN_BUILDS[name]
    spec = parse_recipe(list(b.recipe), b.healthcheck)
    # (an id of its own per run: replicas may build the same built-in at the same time)
    job = Job(build_id=f"bld-{name.replace('-', '')}{secrets.token_hex(4)}", spec=spec, base_template_id=b.base,
              base_version="", vcpus=b.vcpus, memory_mb=b.memory_mb, target_template_id=template_id,
              context=BuildContext(None), cache_scope="builtin")
    async def no_step(i: int, n: int) -> None:
        pass

    sink = Sink(no_step, on_log)
    try:
        await Execution(host, job, sink, NoCache()).run()
    except StepFailed as exc:
        raise HostAgentError(f"building the {name} template failed: {exc}") from exc
    return template_id
