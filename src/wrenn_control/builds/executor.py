"""One build, run in a build capsule: restore from the base (or the longest cached prefix), run the
steps through the guest agent, wait for the healthcheck, snapshot into the target template.

The build capsule is the host agent's only (no capsule row: it is no user's capsule) and is
destroyed on every path: success, failed step, cancel, crash of the control plane (the host agent's
start-up reconcile removes capsules the DB does not know).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import posixpath
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from wrenn_control import ids
from wrenn_control.builds.context import BuildContext
from wrenn_control.builds.spec import BuildSpec, SpecError, Step, layer_keys
from wrenn_host.api import GuestError, HostAgent, HostAgentError, TemplateNotFound, TemplateRuntime

log = logging.getLogger(__name__)

LAYERED = frozenset({"RUN", "COPY", "START"})  # steps worth a cache layer (the others take no time)
ERROR_TAIL_CHARS = 2000
START_SETTLE_S = 1.0  # a START that dies this soon fails the build with its output


class StepFailed(Exception):
    """A step (or the healthcheck) failed: the message is the build's `error`."""


class LayerCache(Protocol):
    async def lookup(self, keys: list[str]) -> tuple[int, str] | None:
        """(steps held, template id) of the longest cached prefix, or None."""

    async def forget(self, key: str) -> None: ...

    async def store(self, key: str, template_id: str, steps: int) -> None: ...


class NoCache:
    async def lookup(self, keys: list[str]) -> tuple[int, str] | None:
        return None

    async def forget(self, key: str) -> None:
        pass

    async def store(self, key: str, template_id: str, steps: int) -> None:
        raise AssertionError("NoCache stores nothing")


@dataclasses.dataclass
class Job:
    build_id: str
    spec: BuildSpec
    base_template_id: str  # host id
    base_version: str  # built-in templates: their image key; snapshots: "" (their id is unique)
    vcpus: int | None  # None: the base's own shape (a snapshot base)
    memory_mb: int | None
    target_template_id: str
    context: BuildContext
    cache_scope: str  # the team (layers are never shared between teams)


class Sink:
    """Where a build reports: progress (step i of n) and log text."""

    def __init__(self, on_step: Callable[[int, int], Awaitable[None]], on_log: Callable[[str], None]):
        self.on_step = on_step
        self.on_log = on_log

    def line(self, text: str) -> None:
        self.on_log(text if text.endswith("\n") else text + "\n")


def _tail(text: str) -> str:
    text = text.strip()
    return text if len(text) <= ERROR_TAIL_CHARS else "..." + text[-ERROR_TAIL_CHARS:]


class Execution:
    def __init__(self, host: HostAgent, job: Job, sink: Sink, cache: LayerCache):
        self.host = host
        self.job = job
        self.sink = sink
        self.cache = cache
        self.capsule_id = f"bld-{job.build_id.removeprefix('bld-')}"
        self.cached_steps = 0

    async def run(self) -> TemplateRuntime:
        job, steps = self.job, self.job.spec.steps
        digests = {i: job.context.digest(s.srcs, f"step {i + 1} ({s.kind})")
                   for i, s in enumerate(steps) if s.kind == "COPY"}
        keys = layer_keys(job.cache_scope, f"{job.base_template_id}@{job.base_version}", steps, digests,
                          (job.vcpus or 0, job.memory_mb or 0))
        await self._create(keys)
        try:
            for i in range(self.cached_steps, len(steps)):
                step = steps[i]
                await self.sink.on_step(i + 1, len(steps))
                self.sink.line(f"==> step {i + 1}/{len(steps)}: {step.text}")
                started = time.monotonic()
                await self._step(i, step)
                if i < len(steps) - 1 and step.kind in LAYERED and not isinstance(self.cache, NoCache):
                    await self._layer(keys[i], i + 1)
                self.sink.line(f"    done in {time.monotonic() - started:.1f}s")
            if job.spec.healthcheck is not None:
                await self._healthcheck()
            self.sink.line("==> snapshotting the template")
            return await self.host.snapshot(self.capsule_id, job.target_template_id)
        finally:
            # Shielded: a cancel must not leave the VM behind.
            await asyncio.shield(self._destroy())

    async def _create(self, keys: list[str]) -> None:
        hit = await self.cache.lookup(keys)
        while hit is not None:
            held, template_id = hit
            try:
                await self.host.create(self.capsule_id, template_id, None, None)
                self.cached_steps = held
                await self.sink.on_step(held, len(keys))
                self.sink.line(f"==> steps 1-{held} of {len(keys)} from the step cache")
                return
            except TemplateNotFound:  # its files went away: forget it, look for a shorter prefix
                await self.cache.forget(keys[held - 1])
                hit = await self.cache.lookup(keys[:held - 1])
        self.sink.line(f"==> starting the build capsule from {self.job.spec.base_template or 'the base template'}")
        await self.host.create(self.capsule_id, self.job.base_template_id, self.job.vcpus, self.job.memory_mb)

    async def _destroy(self) -> None:
        try:
            await self.host.destroy(self.capsule_id)
        except HostAgentError as exc:
            log.warning("build capsule %s: destroy failed: %s", self.capsule_id, exc)

    async def _layer(self, key: str, held: int) -> None:
        """Keep the capsule's state after `held` steps as a hidden template, then go on."""
        template_id = ids.template_id()
        await self.host.snapshot(self.capsule_id, template_id)
        try:
            await self.cache.store(key, template_id, held)
        finally:
            await self.host.resume(self.capsule_id)

    # ---- steps --------------------------------------------------------------------------------

    async def _step(self, i: int, step: Step) -> None:
        what = f"step {i + 1}/{len(self.job.spec.steps)} ({step.text})"
        try:
            if step.kind == "RUN":
                await self._run(step, what)
            elif step.kind == "START":
                await self._start(i, step, what)
            elif step.kind == "ENV":
                await self.host.set_defaults(self.capsule_id, envs=dict(step.envs))
            elif step.kind == "WORKDIR":
                await self.host.mkdir(self.capsule_id, step.path)
                await self.host.set_defaults(self.capsule_id, cwd=step.path)
            elif step.kind == "USER":
                await self.host.set_defaults(self.capsule_id, user=step.path)
            elif step.kind == "COPY":
                await self._copy(step, what)
        except GuestError as exc:
            raise StepFailed(f"{what} failed: {exc.message}") from exc
        except SpecError as exc:
            raise StepFailed(str(exc)) from exc

    async def _run(self, step: Step, what: str) -> None:
        proc = await self.host.spawn(self.capsule_id, "/bin/sh", ["-c", step.cmd], envs=dict(step.envs))
        output: list[str] = []

        async def follow() -> int | None:
            code = None
            async for ev in self.host.attach(self.capsule_id, proc.pid):
                if ev.kind == "exit":
                    code = ev.exit_code
                else:
                    text = ev.data.decode("utf-8", "replace")
                    output.append(text)
                    self.sink.on_log(text)
            return code

        try:
            code = await asyncio.wait_for(follow(), step.timeout_s)
        except asyncio.TimeoutError:
            raise StepFailed(f"{what} timed out after {step.timeout_s:g}s: {_tail(''.join(output))}") from None
        finally:
            # Stop it if still running (timeout, cancel) and drop it from the process list either
            # way: the template's capsules must not list the build's commands.
            try:
                await self.host.kill(self.capsule_id, proc.pid)
            except HostAgentError:
                pass
        if code != 0:
            raise StepFailed(f"{what} failed with exit code {code}: {_tail(''.join(output))}")

    async def _start(self, i: int, step: Step, what: str) -> None:
        proc = await self.host.spawn(self.capsule_id, "/bin/sh", ["-c", step.cmd], envs=dict(step.envs),
                                     tag=f"start-{i + 1}")
        await asyncio.sleep(START_SETTLE_S)
        info = next((p for p in await self.host.processes(self.capsule_id) if p.pid == proc.pid), None)
        if info is not None and not info.running:
            out = b"".join([ev.data async for ev in self.host.attach(self.capsule_id, proc.pid) if ev.kind != "exit"])
            await self.host.kill(self.capsule_id, proc.pid)
            raise StepFailed(f"{what} exited at once with exit code {info.exit_code}: "
                             f"{_tail(out.decode('utf-8', 'replace'))}")
        self.sink.line(f"    started (pid {proc.pid}, tag start-{i + 1})")

    async def _copy(self, step: Step, what: str) -> None:
        sources = self.job.context.sources(step.srcs, what)
        dst = step.path
        into_dir = dst.endswith("/") or len(sources) > 1 or any(is_dir for _, _, is_dir in sources)
        if not into_dir:
            try:
                into_dir = (await self.host.stat(self.capsule_id, dst)).type == "directory"
            except GuestError as exc:
                if exc.code != "not_found":
                    raise
        executable = []
        count = 0
        for _src, files, is_dir in sources:
            for f in files:
                target = posixpath.join(dst, f.rel) if into_dir else dst
                await self.host.write_file(self.capsule_id, target, f.path.read_bytes())
                count += 1
                if f.mode & 0o111:
                    executable.append(target)
        if executable:  # write_file makes 0644 files: give scripts back their x bits
            res = await self.host.exec(self.capsule_id, "chmod", ["+x", "--", *executable], timeout_sec=60)
            if res.exit_code != 0:
                raise StepFailed(f"{what} failed: chmod: {_tail(res.stderr.decode('utf-8', 'replace'))}")
        self.sink.line(f"    copied {count} file(s) to {dst}")

    async def _healthcheck(self) -> None:
        check = self.job.spec.healthcheck
        assert check is not None
        self.sink.line(f"==> healthcheck: {check.cmd}")
        started = time.monotonic()
        failures = 0
        while True:
            res = await self.host.exec(self.capsule_id, "/bin/sh", ["-c", check.cmd], timeout_sec=check.timeout_s)
            if res.exit_code == 0 and not res.timed_out:
                self.sink.line(f"    healthy after {time.monotonic() - started:.1f}s")
                return
            out = (res.stdout + res.stderr).decode("utf-8", "replace")
            in_grace = time.monotonic() - started < check.start_period_s
            if not in_grace:
                failures += 1
                if failures >= check.retries:
                    why = "timed out" if res.timed_out else f"exit code {res.exit_code}"
                    raise StepFailed(f"healthcheck failed {failures} times (last: {why}): {_tail(out)}")
            self.sink.line(f"    not healthy yet ({'start period' if in_grace else f'{failures}/{check.retries}'})")
            await asyncio.sleep(check.interval_s)
