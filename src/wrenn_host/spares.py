"""Spare VMs: capsules restored ahead of time, so a create skips QEMU's start-up and the restore.

Measured here (bench/probe_first_exec.py, TCG): a fresh QEMU process has an empty translation-block
cache, so the first exec after a restore re-translates ~10 000 blocks of guest code (kernel fork and
exec paths, the guest agent's worker thread) and costs ~70-120 ms against ~25-30 ms for the next
one; QEMU's own start and the restore cost another ~100 ms. Neither can be kept in a snapshot (the
translation cache is QEMU's host-side state). A spare pays both ahead: it is restored from the
template under a placeholder id, its guest agent is connected, and one `/bin/sh -c` exec has run
through the same path a user's first command takes. A create then renames the spare's directories
to the capsule's id and pushes the capsule's identity (hostname, RNG seed, clock): the guest is a
fresh clone that has simply been running for a while.

Keyed by the template's directory and its files' identity (inode, size, mtime of memory, state,
disk, meta.json): a template that is rebuilt, overwritten or deleted never serves a capsule from a
spare restored from its old files. Bounded: at most `per_key` spares per template and shape and
`budget_mb` of guest memory in all; refilled in the background, one restore at a time so spares
never compete much with the creates they are for.

Under KVM the translation cost does not exist; a spare still saves QEMU's start and the restore.

Also here: `boot_spare` and `hand_over` (how a spare is made and how it becomes a capsule), and
`SpareMemory`, template memory files copied ahead for creates that find no spare VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wrenn_host.api import VMMError
from wrenn_host.network import EgressPolicy, NetworkError

if TYPE_CHECKING:
    from wrenn_host.capsule import HostResources, LocalCapsule as Capsule
    from wrenn_host.paths import HostPaths
    from wrenn_host.templates import TemplateSnapshot

log = logging.getLogger(__name__)

REFILL_DELAY_S = 0.3
SPARE_NICE = 10  # spares are restored and warmed at a low CPU priority: creates and execs go first
SPARE_MEMORY_FILES = 2  # per template shape: the sparse copy (~25 ms) happens off the create path
SPARE_PREFIX = "sp-"  # spare ids; the control plane never knows them, so a restart's reconcile removes them


def spare_id() -> str:
    return SPARE_PREFIX + secrets.token_hex(8)


def template_key(snap: TemplateSnapshot) -> tuple[Any, ...]:
    """What must not change between restoring a spare and handing it out."""
    ident: list[Any] = [str(snap.dir)]
    for name in ("meta.json", "memory", "state", "disk.qcow2"):
        try:
            st = (snap.dir / name).stat()
            ident.append((name, st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            ident.append((name, None))
    return tuple(ident)


@dataclasses.dataclass
class Spare:
    key: tuple[Any, ...]
    cap: Capsule
    memory_mb: int


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name) or default)
    except ValueError:
        return default


class SparePool:
    """`boot(spare_id, snap) -> Capsule` restores and warms a capsule under `spare_id`;
    `discard(cap)` tears one down. The agent supplies both, so a spare is made exactly as a
    create makes a capsule (disk overlay, memory copy, and whatever per-capsule resources such
    as a network slot the agent's create takes)."""

    def __init__(self, boot: Callable[[str, TemplateSnapshot], Awaitable[Capsule]],
                 discard: Callable[[Capsule], Awaitable[None]], *, per_key: int | None = None,
                 budget_mb: int | None = None):
        self._boot = boot
        self._discard = discard
        # WRENN_SPARE_VMS=0 turns the pool off. 10 per shape: a burst of 10 creates finds all of
        # them warm (measured: burst of 10 on the host agent, median create -> first answer 356 ms
        # with 10 spares, 1749 ms without). An idle spare costs ~105 MiB RSS and ~0.4% of a core.
        self.per_key = per_key if per_key is not None else _env_int("WRENN_SPARE_VMS", 10)
        self.budget_mb = budget_mb if budget_mb is not None else _env_int("WRENN_SPARE_MEMORY_MB", 5120)
        self._ready: dict[tuple[Any, ...], list[Spare]] = {}
        self._booting: dict[tuple[Any, ...], int] = {}
        self._wanted: dict[tuple[Any, ...], TemplateSnapshot] = {}  # keys to keep filled
        self._refill_task: asyncio.Task | None = None
        self._closed = False
        self._tasks: set[asyncio.Task] = set()  # discards under way (kept referenced)

    # ---- use ------------------------------------------------------------------------------

    def take(self, snap: TemplateSnapshot) -> Capsule | None:
        """A ready spare for `snap` (removed from the pool), or None. Remembers `snap` so the pool
        keeps spares for it from now on."""
        if self.per_key <= 0 or self._closed:
            return None
        key = template_key(snap)
        self._forget_stale(snap.dir, key)
        self._wanted.pop(key, None)
        self._wanted[key] = snap  # most recently used last: the budget goes to recent templates
        ready = self._ready.get(key) or []
        spare = None
        while ready and spare is None:
            s = ready.pop(0)
            if s.cap.machine is not None and s.cap.machine.is_alive() and s.cap.guest is not None \
                    and not s.cap.guest.closed:
                spare = s
            else:  # died while waiting (OOM kill, crash): never hand it out
                self._spawn(self._discard(s.cap), "discard dead spare")
        self._kick()
        return spare.cap if spare is not None else None

    def want(self, snap: TemplateSnapshot) -> None:
        """Keep spares for `snap` without taking one (e.g. the default template at start)."""
        if self.per_key <= 0 or self._closed:
            return
        key = template_key(snap)
        self._forget_stale(snap.dir, key)
        self._wanted[key] = snap
        self._kick()

    def drop(self, template_dir: Path) -> None:
        """The template in `template_dir` is being replaced or deleted: its spares go."""
        self._forget_stale(template_dir, None)

    def count(self) -> int:
        return sum(len(v) for v in self._ready.values())

    def pids(self) -> list[int]:
        return [s.cap.machine.pid for v in self._ready.values() for s in v
                if s.cap.machine is not None and s.cap.machine.pid is not None]

    async def wait_full(self, timeout: float = 30.0) -> bool:
        """For benchmarks and tests: until every wanted key has its spares (or the budget is used)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self._refill_task is None or self._refill_task.done():
                if self._next_to_fill() is None:
                    return True
                self._kick()
            await asyncio.sleep(0.02)
        return False

    async def close(self) -> None:
        self._closed = True
        if self._refill_task is not None:
            self._refill_task.cancel()
            with contextlib.suppress(BaseException):
                await self._refill_task
        spares = [s for v in self._ready.values() for s in v]
        self._ready.clear()
        for s in spares:
            with contextlib.suppress(Exception):
                await self._discard(s.cap)
        if self._tasks:
            await asyncio.wait(set(self._tasks))

    # ---- filling --------------------------------------------------------------------------

    def _used_mb(self) -> int:
        ready = sum(s.memory_mb for v in self._ready.values() for s in v)
        booting = sum(self._wanted[k].spec.memory_mb * n for k, n in self._booting.items() if k in self._wanted)
        return ready + booting

    def _next_to_fill(self) -> tuple[Any, ...] | None:
        for key, snap in reversed(self._wanted.items()):  # most recently used first
            have = len(self._ready.get(key, [])) + self._booting.get(key, 0)
            if have >= self.per_key:
                continue
            if self._used_mb() + snap.spec.memory_mb > self.budget_mb:
                self._evict_for(key, snap.spec.memory_mb)
            if self._used_mb() + snap.spec.memory_mb <= self.budget_mb:
                return key
        return None

    def _evict_for(self, key: tuple[Any, ...], memory_mb: int) -> None:
        """Make room for `key` by discarding spares of templates used less recently."""
        for other in list(self._wanted):  # least recently used first
            if other == key:
                return
            while self._ready.get(other) and self._used_mb() + memory_mb > self.budget_mb:
                self._spawn(self._discard(self._ready[other].pop().cap), "evict spare")
            if self._used_mb() + memory_mb <= self.budget_mb:
                return

    def _kick(self) -> None:
        if self._closed or (self._refill_task is not None and not self._refill_task.done()):
            return
        if self._next_to_fill() is None:
            return
        self._refill_task = asyncio.get_running_loop().create_task(self._refill(), name="spare refill")

    async def _refill(self) -> None:
        # A capsule just taken runs its first command now: leave it the CPU for a moment.
        await asyncio.sleep(REFILL_DELAY_S)
        while not self._closed and (key := self._next_to_fill()) is not None:
            snap = self._wanted[key]
            self._booting[key] = self._booting.get(key, 0) + 1
            try:
                cap = await self._boot(spare_id(), snap)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the template went away meanwhile, out of memory, ...
                log.warning("spare for %s not made: %s", snap.dir.name, e)
                self._wanted.pop(key, None)  # until the next create asks again
                continue
            finally:
                self._booting[key] -= 1
                if not self._booting[key]:
                    del self._booting[key]
            if self._closed or key not in self._wanted or template_key(snap) != key:
                await self._discard(cap)  # the template changed while this one was restored
                continue
            self._ready.setdefault(key, []).append(Spare(key, cap, snap.spec.memory_mb))

    def _forget_stale(self, template_dir: Path, current: tuple[Any, ...] | None) -> None:
        for key in [k for k in list(self._wanted) + list(self._ready) if k[0] == str(template_dir) and k != current]:
            self._wanted.pop(key, None)
            for s in self._ready.pop(key, []):
                self._spawn(self._discard(s.cap), "discard stale spare")

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda t: t.cancelled() or (t.exception() and log.warning(
            "%s failed: %s", name, t.exception())))


# ---- making a spare and handing it over ------------------------------------------------------

Discard = Callable[["Capsule"], Awaitable[None]]


async def boot_spare(host: HostResources, spare_id: str, snap: TemplateSnapshot, discard: Discard) -> Capsule:
    """A capsule under a placeholder id, with the path of a first command already run once
    (QEMU's translation cache is warm). Not registered as a capsule."""
    from wrenn_host.capsule import CapsuleMeta, LocalCapsule

    cap = LocalCapsule(spare_id, host, CapsuleMeta(spare_id, snap.template_id, str(snap.dir), snap.spec.vcpus,
                                                   snap.spec.memory_mb, snap.kernel_version), snap)
    try:
        await cap.build(spare=True, nice=SPARE_NICE)
        assert cap.guest is not None
        # What a first command goes through: the worker thread, fork + exec of a shell, and
        # the file ops' first lookups (NSS for owner names).
        await cap.guest.call("exec", cmd="/bin/sh", args=["-c", "echo ok"], envs={}, cwd=None, timeout_sec=30)
        await cap.guest.call("list", path="/", depth=1)
        res, _ = await cap.guest.call("metrics")  # GET of one capsule asks for its disk usage
        used, size = res.get("disk_bytes"), res.get("disk_size_bytes")
        if isinstance(used, int) and isinstance(size, int):
            cap.warm_disk = (used, size)  # the template's disk: nothing has written to the clone yet
    except BaseException:
        await discard(cap)
        raise
    return cap


async def hand_over(cap: Capsule, capsule_id: str, template_id: str, network: EgressPolicy,
                    register: Callable[[Capsule], None], discard: Discard) -> Capsule | None:
    """Hand a spare to `capsule_id`: rename its directories, push the capsule's identity.
    None if the rename failed (the caller then creates the usual way)."""
    host = cap.host
    assert cap.meta is not None and cap.machine is not None
    if not cap.rename(capsule_id):
        await discard(cap)
        return None
    cap.meta.template_id = template_id
    cap.meta.network = network.to_dict()
    assert cap.machine is not None
    cap.machine.set_nice(0)
    register(cap)
    async with cap.lock:
        try:
            link = host.paths.disk_link(cap.meta.spawned_as)
            tmp = link.with_suffix(".new")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(cap.files.disk)
            tmp.replace(link)  # atomic: QEMU never finds the name missing
            cap.save_meta()
            await cap.start_serial()  # its socket and log moved with the directories
            host.jail.move(cap.meta.spawned_as, capsule_id, cap.meta.vcpus, cap.meta.memory_mb)
            if cap.slot is not None and not network.is_default:  # spares run the default rules
                try:
                    await host.net.apply(cap.slot, network)
                except NetworkError as e:
                    raise VMMError(f"egress rules not applied: {e}") from e
            await cap.push_identity()
        except BaseException:
            await discard(cap)
            raise
    return cap


# ---- memory files copied ahead ---------------------------------------------------------------

class SpareMemory:
    """Private copies of template memory files, made in the background after a create used one."""

    def __init__(self, paths: HostPaths, copies: int = SPARE_MEMORY_FILES):
        self.paths = paths
        self.copies = copies
        self._refills: dict[Path, asyncio.Task] = {}

    async def take(self, snap: TemplateSnapshot, dest: Path) -> None:
        """Give `dest` a private copy of the template's memory: a spare one if ready, else copy."""
        from wrenn_host.templates import sparse_copy

        for n in range(self.copies):
            try:
                self.paths.spare_memory(snap.dir, n).rename(dest)
                break
            except FileNotFoundError:
                continue
        else:
            await asyncio.to_thread(sparse_copy, snap.memory, dest)
        if snap.dir not in self._refills or self._refills[snap.dir].done():
            self._refills[snap.dir] = asyncio.create_task(self._refill(snap), name=f"refill {snap.dir.name}")

    async def _refill(self, snap: TemplateSnapshot) -> None:
        from wrenn_host.templates import sparse_copy

        for n in range(self.copies):
            spare = self.paths.spare_memory(snap.dir, n)
            if spare.exists():
                continue
            tmp = spare.with_suffix(".tmp")
            try:
                await asyncio.to_thread(sparse_copy, snap.memory, tmp)
                tmp.rename(spare)  # atomic: a create never takes a half-written copy
            except OSError as e:  # the template went away meanwhile: nothing to keep spare
                log.info("spare memory for %s not made: %s", snap.dir.name, e)
                tmp.unlink(missing_ok=True)
                return

    def drop(self, template_dir: Path) -> None:
        """The template's memory is being replaced or deleted: its copies go."""
        refill = self._refills.pop(template_dir, None)
        if refill is not None:
            refill.cancel()
        for n in range(self.copies):
            self.paths.spare_memory(template_dir, n).unlink(missing_ok=True)

    def clear(self) -> None:
        """Start-up: copies may belong to templates that changed or are gone: start afresh."""
        for f in self.paths.spare.iterdir():
            f.unlink(missing_ok=True)

    def close(self) -> None:
        for task in self._refills.values():
            task.cancel()
