"""The local host agent: capsules as QEMU microVMs restored from template snapshots.

A capsule directory holds everything the capsule owns on disk (disk overlay, memory file, device
state while paused, logs, meta.json); its sockets live in a short run directory. The presence of the
`state` file means "paused, restorable"; a live QEMU found by pidfile means "running".
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal as _signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from wrenn_guest.protocol import MAX_PAYLOAD
from wrenn_host import api, perms
from wrenn_host.api import CapsuleNotFound, HostAgentError, InvalidShape, TemplateNotFound, VMMError
from wrenn_host.durable import crashpoint, fsync_dir, write_durable
from wrenn_host.guest import GuestClient
from wrenn_host.jail import Confinement
from wrenn_host.network import CapsuleNetwork, EgressPolicy, NetworkError, Slot
from wrenn_host.network.inbound import StreamTunnel, connect_in_netns
from wrenn_host.network.slots import GUEST_IP
from wrenn_host.paths import HostPaths
from wrenn_host.recover import recover
from wrenn_host.serial_log import SerialLog
from wrenn_host.spares import SparePool
from wrenn_host.templates import BuiltinTemplates, TemplateSnapshot, make_overlay_seed, qemu_img, sparse_copy
from wrenn_host.vmm.accel import choose_accelerator
from wrenn_host.vmm.qemu import MachineFiles, QemuMachine, qemu_version, uses_file
from wrenn_images import builder
from wrenn_images.recipes import TEMPLATES

log = logging.getLogger(__name__)

AGENT_CONNECT_TIMEOUT_S = 30.0
SPARE_NICE = 10  # spares are restored and warmed at a low CPU priority: creates and execs go first
SPARE_MEMORY_FILES = 2  # per template shape: the sparse copy (~25 ms) happens off the create path


@dataclasses.dataclass
class CapsuleMeta:
    """What describes a capsule on this host (persisted as meta.json)."""

    capsule_id: str
    template_id: str
    template_dir: str
    vcpus: int
    memory_mb: int
    kernel_version: str
    agent_version: str = ""
    network: dict[str, Any] | None = None  # the egress policy (EgressPolicy.to_dict)
    slot: int | None = None  # the network slot while the VM runs
    spawned_as: str = ""  # the spare id its QEMU was started under (its disk symlink is named so)

    @property
    def policy(self) -> EgressPolicy:
        return EgressPolicy.from_dict(self.network)

    def save(self, path: Path) -> None:
        write_durable(path, json.dumps(dataclasses.asdict(self)).encode())

    @classmethod
    def load(cls, path: Path) -> CapsuleMeta:
        return cls(**json.loads(path.read_text()))


class Capsule:
    """What a capsule holds while this process knows it: its machine and guest connection."""

    def __init__(self, meta: CapsuleMeta, snapshot: TemplateSnapshot):
        self.meta = meta
        self.snapshot = snapshot  # fixes the machine spec for every restore
        self.machine: QemuMachine | None = None
        self.guest: GuestClient | None = None
        self.serial: SerialLog | None = None  # copies the console into the capped serial.log
        self.slot: Slot | None = None  # its network namespace, while the VM runs
        self.lock = asyncio.Lock()  # one lifecycle operation at a time

    @property
    def id(self) -> str:
        return self.meta.capsule_id


class LocalHostAgent(api.HostAgent):
    def __init__(self, data_dir: Path, *, network: bool | None = None):
        """`network`: give capsules a NIC (default: on unless WRENN_NETWORK=off, and the host
        can; see wrenn_host.network)."""
        self.paths = HostPaths(Path(data_dir) / "host")
        self._capsules: dict[str, Capsule] = {}
        self._accel: str | None = None
        self._builtin: BuiltinTemplates | None = None
        self._vmm_version = ""
        self._refills: dict[Path, asyncio.Task] = {}
        self.reconcile_seconds = 0.0  # how long the last start-up reconcile took
        self.jail = Confinement(self.paths.run, self.paths.run.name)
        self.net = CapsuleNetwork(self.paths.tag, enabled=network)
        # Capsules restored ahead under placeholder ids: a create takes one (see spares.py).
        self.spares = SparePool(self._boot_spare, self._teardown)

    # ------------------------------------------------------------------ setup

    @property
    def accel(self) -> str:
        if self._accel is None:
            kernel = builder.build_kernel()
            self._accel = choose_accelerator(kernel.vmlinux, kernel.initrd, builder.cache_dir() / "accel.json")
        return self._accel

    @property
    def builtin(self) -> BuiltinTemplates:
        if self._builtin is None:
            self._builtin = BuiltinTemplates(self.accel, self.paths.run, self.net)
        return self._builtin

    async def prepare(self, shapes: list[tuple[str, int, int]] | None = None) -> None:
        """Build what capsules need before serving: images and the default-shape snapshots."""
        await asyncio.to_thread(builder.build_all)
        await self.net.start()
        for name, vcpus, mem in shapes or [(n, 1, 512) for n in self.builtin.names]:
            await self.builtin.get(name, vcpus, mem)

    async def start(self, known: dict[str, str]) -> api.ReconcileReport:
        self._vmm_version = await asyncio.to_thread(qemu_version)
        # Older versions left 0644 memory files and disks in 0755 directories: close them.
        await asyncio.to_thread(perms.lock_down, self.paths.root)
        await asyncio.to_thread(perms.lock_down_cache, builder.cache_dir())
        await self.net.start()
        report = await self._reconcile(known)
        in_use = {c.meta.slot: (c.id, c.meta.policy) for c in self._capsules.values()
                  if c.machine is not None and c.meta.slot is not None}
        await self.net.reclaim(in_use)
        for cap in self._capsules.values():
            if cap.machine is not None and cap.meta.slot is not None:
                cap.slot = Slot(self.net.tag, cap.meta.slot, self.net.pool)
        # Spares for the default template and shape, if its snapshot is built already.
        default = self.builtin.dir_for("minimal", 1, 512) if "minimal" in self.builtin.names else None
        if default is not None and (default / "meta.json").exists():
            self.spares.want(TemplateSnapshot.load(default))
        return report

    async def close(self) -> None:
        await self.spares.close()  # spares are nobody's capsules: they do not outlive the agent
        for task in self._refills.values():
            task.cancel()
        # Capsules keep running across a server restart; only our connections go.
        for cap in list(self._capsules.values()):
            await self._stop_serial(cap)
            if cap.guest is not None:
                await cap.guest.close()
                cap.guest = None
        await self.net.close()
        self.jail.close()
        with contextlib.suppress(OSError):  # kept while running capsules have sockets in it
            if [d.name for d in self.paths.run.iterdir()] in ([], [self.jail.empty.name]):
                with contextlib.suppress(FileNotFoundError):
                    self.jail.empty.rmdir()
            self.paths.run.rmdir()

    async def health(self) -> dict[str, Any]:
        running = sum(1 for c in self._capsules.values() if c.machine is not None and c.machine.is_alive())
        return {"accelerator": self.accel, "vmm": f"qemu {self._vmm_version}".strip(),
                "capsules_running": running, "capsules_known": len(self._capsules),
                "reconcile_seconds": round(self.reconcile_seconds, 3), "confinement": self.jail.report(),
                "network": self.net.status(), "spare_vms": self.spares.count()}

    async def limits(self) -> api.HostLimits:
        return self._limits()

    def _limits(self) -> api.HostLimits:
        total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
        return api.HostLimits(max_vcpus=os.cpu_count() or 1, min_memory_mb=128,
                              max_memory_mb=max(128, (total_mb * 3 // 4) // 64 * 64))

    async def capacity(self) -> dict[str, int | None]:
        return await asyncio.to_thread(host_capacity, self.paths.root)

    # ------------------------------------------------------------------ reconcile

    async def _reconcile(self, known: dict[str, str]) -> api.ReconcileReport:
        """Match capsule directories with what the control plane believes. Capsules it does not
        know are cleaned up (reported lost); the others are recovered from what is on disk and
        alive (recover.py), all at once; one whose files make no sense is kept aside as `error`."""
        t0 = time.monotonic()
        running, paused, lost, errors = [], [], [], {}

        async def one(cid: str) -> None:
            cap = self._load_capsule(cid)
            if cid not in known:
                await self._kill_leftover(cid)
                self._remove_files(cid)
                lost.append(cid)
                return
            if cap is None:
                await self._kill_leftover(cid)
                errors[cid] = self._quarantine(cid, "capsule metadata or its template is missing or unreadable")
                return
            files = self.paths.machine_files(cid)
            out = await recover(cid, cap.snapshot.spec, files, self.paths.capsule_state(cid))
            if out.status == "error":
                errors[cid] = self._quarantine(cid, out.reason)
                return
            cap.machine, cap.guest = out.machine, out.guest
            self._capsules[cid] = cap
            if out.status == "running":
                await self._start_serial(cap)
            (running if out.status == "running" else paused).append(cid)

        cids = sorted(d.name for d in self.paths.capsules.iterdir())
        results = await asyncio.gather(*(one(cid) for cid in cids), return_exceptions=True)
        for cid, res in zip(cids, results):
            if isinstance(res, BaseException):  # an unexpected failure must not hide the capsule
                log.exception("capsule %s: recovery failed", cid, exc_info=res)
                await self._kill_leftover(cid)
                errors[cid] = self._quarantine(cid, f"recovery failed: {res}")
        for d in self.paths.templates.iterdir():
            if d.name.startswith("."):  # an interrupted snapshot
                shutil.rmtree(d, ignore_errors=True)
            else:
                self._sweep_template(d)
        # Spare memory copies may belong to templates that changed or are gone: start afresh.
        for f in self.paths.spare.iterdir():
            f.unlink(missing_ok=True)
        # Disk links of spares and capsules that are gone.
        for f in self.paths.links.iterdir():
            if not f.exists():
                f.unlink(missing_ok=True)
        # Stray socket directories from builds or capsules that are gone, and their cgroups.
        for d in self.paths.run.iterdir():
            if d.name not in self._capsules and d != self.jail.empty:
                shutil.rmtree(d, ignore_errors=True)
        self.jail.reclaim(set(self._capsules))
        self.reconcile_seconds = time.monotonic() - t0
        log.info("reconciled %d capsules in %.3f s: %d running, %d paused, %d lost, %d error",
                 len(cids), self.reconcile_seconds, len(running), len(paused), len(lost), len(errors))
        return api.ReconcileReport(running=sorted(running), paused=sorted(paused), lost=sorted(lost),
                                   errors=errors)

    def _quarantine(self, cid: str, reason: str) -> str:
        """Move a capsule's files aside (never delete what could not be understood) and say where."""
        src = self.paths.capsule_dir(cid)
        dest = self.paths.quarantine / f"{cid}-{time.strftime('%Y%m%dT%H%M%S')}"
        try:
            self.paths.quarantine.mkdir(mode=0o700, exist_ok=True)
            src.rename(dest)
            write_durable(dest / "reason.txt", (reason + "\n").encode())
        except OSError as e:
            log.error("capsule %s: could not move its files aside: %s", cid, e)
            return reason
        shutil.rmtree(self.paths.capsule_run_dir(cid), ignore_errors=True)
        log.warning("capsule %s: %s; files kept in %s", cid, reason, dest)
        return f"{reason}; files kept in {dest}"

    def _load_capsule(self, cid: str) -> Capsule | None:
        try:
            meta = CapsuleMeta.load(self.paths.capsule_meta(cid))
            return Capsule(meta, TemplateSnapshot.load(Path(meta.template_dir)))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    async def _kill_leftover(self, cid: str) -> None:
        files = self.paths.machine_files(cid)
        with contextlib.suppress(OSError, ValueError):
            pid = int(files.pidfile.read_text().strip())
            if uses_file(pid, files.memory):
                os.kill(pid, _signal.SIGKILL)
                for _ in range(200):
                    if not Path(f"/proc/{pid}").exists():
                        break
                    await asyncio.sleep(0.01)

    def _remove_files(self, cid: str) -> None:
        shutil.rmtree(self.paths.capsule_dir(cid), ignore_errors=True)
        shutil.rmtree(self.paths.capsule_run_dir(cid), ignore_errors=True)

    # ------------------------------------------------------------------ lifecycle

    async def _template(self, template_id: str, vcpus: int | None, memory_mb: int | None) -> TemplateSnapshot:
        if template_id in self.builtin.names:
            vcpus, memory_mb = vcpus or 1, memory_mb or 512
            self._check_shape(vcpus, memory_mb)
            return await self.builtin.get(template_id, vcpus, memory_mb)
        d = self.paths.template_dir(template_id)
        if not (d / "meta.json").exists() or (d / "deleted").exists():
            raise TemplateNotFound(f"template {template_id} not found")
        snap = TemplateSnapshot.load(d)
        if (vcpus not in (None, snap.spec.vcpus)) or (memory_mb not in (None, snap.spec.memory_mb)):
            raise InvalidShape(f"template {template_id} is a snapshot with {snap.spec.vcpus} vCPU and "
                               f"{snap.spec.memory_mb} MiB; it cannot be started with another shape")
        return snap

    def _check_shape(self, vcpus: int, memory_mb: int) -> None:
        self._limits().check(vcpus, memory_mb)

    async def create(self, capsule_id: str, template_id: str, vcpus: int | None = None,
                     memory_mb: int | None = None, network: EgressPolicy | None = None) -> api.CapsuleRuntime:
        if capsule_id in self._capsules or self.paths.capsule_dir(capsule_id).exists():
            raise HostAgentError(f"capsule {capsule_id} already exists", code="exists")
        snap = await self._template(template_id, vcpus, memory_mb)
        spare = self.spares.take(snap)
        if spare is not None:
            cap = await self._from_spare(spare, capsule_id, template_id, network or EgressPolicy())
            if cap is not None:
                return self._runtime(cap)
        meta = CapsuleMeta(capsule_id, template_id, str(snap.dir), snap.spec.vcpus, snap.spec.memory_mb,
                           snap.kernel_version, network=(network or EgressPolicy()).to_dict())
        cap = Capsule(meta, snap)
        self._capsules[capsule_id] = cap
        async with cap.lock:
            await self._build(cap)
        return self._runtime(cap)

    async def _build(self, cap: Capsule, *, spare: bool = False) -> None:
        """Files, restore from the template, identity; on any failure everything goes again."""
        snap = cap.snapshot
        try:
            files = self.paths.machine_files(cap.id)
            files.disk.parent.mkdir(parents=True, mode=0o700)
            files.agent.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(snap.overlay_seed, files.disk)
            files.disk.chmod(0o600)
            await self._take_memory(snap, files.memory)
            spawn_files = files
            if spare:
                cap.meta.spawned_as = cap.id
                link = self.paths.disk_link(cap.id)
                link.unlink(missing_ok=True)
                link.symlink_to(files.disk)
                spawn_files = dataclasses.replace(files, disk=link)
            cap.meta.save(self.paths.capsule_meta(cap.id))
            await self._restore(cap, snap.state, spawn_files, nice=SPARE_NICE if spare else 0, steps="create")
        except BaseException:
            await self._teardown(cap)
            raise

    async def _boot_spare(self, spare_id: str, snap: TemplateSnapshot) -> Capsule:
        """A capsule under a placeholder id, with the path of a first command already run once
        (QEMU's translation cache is warm: see spares.py). Not registered as a capsule."""
        cap = Capsule(CapsuleMeta(spare_id, snap.template_id, str(snap.dir), snap.spec.vcpus,
                                  snap.spec.memory_mb, snap.kernel_version), snap)
        await self._build(cap, spare=True)
        try:
            assert cap.guest is not None
            # What a first command goes through: the worker thread, fork + exec of a shell, and
            # the file ops' first lookups (NSS for owner names).
            await cap.guest.call("exec", cmd="/bin/sh", args=["-c", "echo ok"], envs={}, cwd=None, timeout_sec=30)
            await cap.guest.call("list", path="/", depth=1)
            await cap.guest.call("metrics")  # GET of one capsule asks for its disk usage
        except BaseException:
            await self._teardown(cap)
            raise
        return cap

    async def _from_spare(self, cap: Capsule, capsule_id: str, template_id: str,
                          network: EgressPolicy) -> Capsule | None:
        """Hand a spare to `capsule_id`: rename its directories, push the capsule's identity.
        None if the rename failed (the caller then creates the usual way)."""
        old = cap.id
        try:
            self.paths.capsule_dir(old).rename(self.paths.capsule_dir(capsule_id))
        except OSError as e:
            log.warning("spare %s not usable: %s", old, e)
            await self._teardown(cap)
            return None
        try:
            self.paths.capsule_run_dir(old).rename(self.paths.capsule_run_dir(capsule_id))
        except OSError as e:
            log.warning("spare %s not usable: %s", old, e)
            self.paths.capsule_dir(capsule_id).rename(self.paths.capsule_dir(old))
            await self._teardown(cap)
            return None
        cap.meta.capsule_id, cap.meta.template_id = capsule_id, template_id
        cap.meta.network = network.to_dict()
        assert cap.machine is not None
        cap.machine = cap.machine.moved(self.paths.machine_files(capsule_id))
        cap.machine.set_nice(0)
        self._capsules[capsule_id] = cap
        async with cap.lock:
            try:
                link = self.paths.disk_link(cap.meta.spawned_as)
                tmp = link.with_suffix(".new")
                tmp.unlink(missing_ok=True)
                tmp.symlink_to(self.paths.machine_files(capsule_id).disk)
                tmp.replace(link)  # atomic: QEMU never finds the name missing
                cap.meta.save(self.paths.capsule_meta(capsule_id))
                await self._start_serial(cap)  # its socket and log moved with the directories
                self.jail.move(cap.meta.spawned_as, capsule_id, cap.meta.vcpus, cap.meta.memory_mb)
                if cap.slot is not None and not network.is_default:  # spares run the default rules
                    try:
                        await self.net.apply(cap.slot, network)
                    except NetworkError as e:
                        raise VMMError(f"egress rules not applied: {e}") from e
                await self._push_identity(cap)
            except BaseException:
                await self._teardown(cap)
                raise
        return cap

    async def _take_memory(self, snap: TemplateSnapshot, dest: Path) -> None:
        """Give `dest` a private copy of the template's memory: a spare one if ready, else copy."""
        for n in range(SPARE_MEMORY_FILES):
            spare = self.paths.spare_memory(snap.dir, n)
            try:
                spare.rename(dest)
                break
            except FileNotFoundError:
                continue
        else:
            await asyncio.to_thread(sparse_copy, snap.memory, dest)
        if snap.dir not in self._refills or self._refills[snap.dir].done():
            self._refills[snap.dir] = asyncio.create_task(self._refill(snap), name=f"refill {snap.dir.name}")

    async def _refill(self, snap: TemplateSnapshot) -> None:
        for n in range(SPARE_MEMORY_FILES):
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

    async def _restore(self, cap: Capsule, state: Path, files: MachineFiles | None = None,
                       nice: int = 0, steps: str = "resume") -> None:
        """Start the machine from `state` (on a network slot if it has a NIC), reconnect the
        guest agent, push identity + clock."""
        machine = QemuMachine(cap.snapshot.spec, files or self.paths.machine_files(cap.id))
        machine.nice = nice
        spec = cap.snapshot.spec
        machine.confine = lambda: self.jail.plan(cap.id, spec.vcpus, spec.memory_mb, machine.files.disk)
        cap.machine = machine
        if cap.snapshot.spec.nic:
            try:
                cap.slot = await self.net.acquire(cap.meta.policy)
                cap.meta.slot = cap.slot.index
                cap.meta.save(self.paths.capsule_meta(cap.id))
                machine.tap_fd = self.net.open_tap(cap.slot)
            except NetworkError as e:
                raise VMMError(f"capsule {cap.id} needs a network slot: {e}") from e

        async def connect_agent() -> None:
            cap.guest = await GuestClient.connect_unix(str(machine.files.agent), timeout=AGENT_CONNECT_TIMEOUT_S)
            await self._start_serial(cap)

        await machine.restore(state, before_cont=connect_agent, steps=steps)
        await self._push_identity(cap)
        await crashpoint(f"{steps}.identity")

    async def _push_identity(self, cap: Capsule) -> None:
        """What differs between clones of one snapshot: id, hostname, RNG seed, clock."""
        assert cap.guest is not None and cap.machine is not None
        try:
            ident, _ = await cap.guest.call(
                "identity", capsule_id=cap.id, hostname=cap.id,
                seed=base64.b64encode(os.urandom(64)).decode(), time_ns=time.time_ns())
            if not cap.meta.agent_version:
                cap.meta.agent_version = str(ident.get("version", ""))
                cap.meta.save(self.paths.capsule_meta(cap.id))
        except Exception as e:
            raise VMMError(f"guest agent did not answer after restore: {e}: {cap.machine.log_tail()}") from e

    async def _start_serial(self, cap: Capsule) -> None:
        await self._stop_serial(cap)
        files = self.paths.machine_files(cap.id)
        if files.serial_sock is not None:
            cap.serial = SerialLog(files.serial_sock, files.serial_log)
            await cap.serial.start()

    async def _stop_serial(self, cap: Capsule) -> None:
        if cap.serial is not None:
            await cap.serial.stop()
            cap.serial = None

    async def pause(self, capsule_id: str) -> None:
        cap = self._get(capsule_id)
        async with cap.lock:
            await self._pause_locked(cap)

    async def _pause_locked(self, cap: Capsule) -> None:
        if cap.machine is None or not cap.machine.is_alive():
            if self.paths.capsule_state(cap.id).exists():
                return  # already paused
            raise VMMError(f"capsule {cap.id} has no running VM")
        # The agent channel stays connected through the save, so the snapshot holds a guest that
        # believes its host is there: restore reconnects before the vCPUs run (see _restore).
        await cap.machine.save(self.paths.capsule_state(cap.id))
        cap.machine = None
        await self._stop_serial(cap)
        if cap.guest is not None:
            await cap.guest.close()
            cap.guest = None
        await self._release_slot(cap)

    async def _release_slot(self, cap: Capsule) -> None:
        """A paused or dead capsule needs no namespace: a resume takes a fresh one."""
        if cap.slot is not None:
            await self.net.release(cap.slot)
            cap.slot = None
        if cap.meta.slot is not None:
            cap.meta.slot = None
            with contextlib.suppress(OSError):
                cap.meta.save(self.paths.capsule_meta(cap.id))

    async def resume(self, capsule_id: str) -> api.CapsuleRuntime:
        cap = self._get(capsule_id)
        async with cap.lock:
            state = self.paths.capsule_state(capsule_id)
            if cap.machine is not None and cap.machine.is_alive():
                return self._runtime(cap)
            if not state.exists():
                raise VMMError(f"capsule {capsule_id} has no paused state to resume")
            try:
                await self._restore(cap, state)
            except BaseException:
                if cap.machine is not None:
                    await cap.machine.kill()
                    cap.machine = None
                await self._release_slot(cap)
                raise
            # The guest now runs on and changes the memory file: the old state no longer matches it.
            state.unlink()
            await crashpoint("resume.state-unlinked")
            fsync_dir(state.parent)
            await crashpoint("resume.dir-synced")
        return self._runtime(cap)

    async def destroy(self, capsule_id: str) -> None:
        cap = self._capsules.get(capsule_id)
        if cap is None:
            await self._kill_leftover(capsule_id)
            self._remove_files(capsule_id)
            self.jail.release(capsule_id)
            return
        async with cap.lock:
            await self._teardown(cap)

    async def _teardown(self, cap: Capsule) -> None:
        """Release everything, in order: guest connection, VMM process, files, sockets."""
        await self._stop_serial(cap)
        if cap.guest is not None:
            with contextlib.suppress(Exception):
                await cap.guest.close()
            cap.guest = None
        if cap.machine is not None:
            await cap.machine.kill()
            cap.machine = None
        else:
            await self._kill_leftover(cap.id)
        await self._release_slot(cap)
        # Off the event loop: unlinking a memory file with data in it takes milliseconds.
        await asyncio.to_thread(self._remove_files, cap.id)
        self.jail.release(cap.id)
        if cap.meta.spawned_as:  # a capsule that began as a spare VM: named so at its spawn
            self.paths.disk_link(cap.meta.spawned_as).unlink(missing_ok=True)
            self.jail.release(cap.meta.spawned_as)
        self._capsules.pop(cap.id, None)
        self._sweep_template(Path(cap.meta.template_dir))

    async def get(self, capsule_id: str) -> api.CapsuleRuntime:
        return self._runtime(self._get(capsule_id))

    def _get(self, capsule_id: str) -> Capsule:
        cap = self._capsules.get(capsule_id)
        if cap is None:
            raise CapsuleNotFound(f"capsule {capsule_id} not found on this host")
        return cap

    def _runtime(self, cap: Capsule) -> api.CapsuleRuntime:
        if cap.machine is not None and cap.machine.is_alive():
            state = "running"
        elif self.paths.capsule_state(cap.id).exists():
            state = "paused"
        else:
            state = "error"  # the VM died (crash, OOM kill) and there is no pause to go back to
        metadata = {"kernel_version": cap.meta.kernel_version, "vmm_version": f"qemu {self._vmm_version}".strip(),
                    "agent_version": cap.meta.agent_version, "accelerator": cap.snapshot.spec.accel}
        return api.CapsuleRuntime(cap.id, state, cap.meta.template_id,
                                  cap.meta.vcpus, cap.meta.memory_mb, metadata)

    def _guest(self, capsule_id: str) -> GuestClient:
        cap = self._get(capsule_id)
        if cap.guest is None or cap.machine is None:
            raise HostAgentError(f"capsule {capsule_id} is not running", code="invalid_state")
        return cap.guest

    def rss_bytes(self, capsule_id: str) -> int:
        cap = self._get(capsule_id)
        return cap.machine.rss_bytes() if cap.machine else 0

    # ------------------------------------------------------------------ templates

    async def snapshot(self, capsule_id: str, template_id: str) -> api.TemplateRuntime:
        cap = self._get(capsule_id)
        dest = self.paths.template_dir(template_id)
        async with cap.lock:
            await self._pause_locked(cap)
            work = dest.with_name(f".{template_id}.tmp")
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(mode=0o700)
            try:
                files = self.paths.machine_files(capsule_id)
                # Flatten the disk so the template does not depend on the capsule's backing chain.
                await asyncio.to_thread(qemu_img, "convert", "-O", "qcow2", str(files.disk), str(work / "disk.qcow2"))
                await asyncio.to_thread(sparse_copy, files.memory, work / "memory")
                shutil.copyfile(self.paths.capsule_state(capsule_id), work / "state")
                await asyncio.to_thread(make_overlay_seed, work / "disk.qcow2", dest / "disk.qcow2",
                                        work / "overlay.qcow2")
                TemplateSnapshot(template_id, work, cap.snapshot.spec, cap.meta.kernel_version).save_meta()
                if dest.exists():  # overwrite: running capsules keep their own copies
                    self._drop_spares(dest)
                    shutil.rmtree(dest)
                work.rename(dest)
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
        snap = TemplateSnapshot.load(dest)
        return api.TemplateRuntime(template_id, snap.spec.vcpus, snap.spec.memory_mb, snap.size_bytes())

    async def delete_template(self, template_id: str) -> None:
        if template_id in self.builtin.names:
            raise HostAgentError("built-in templates cannot be deleted", code="forbidden")
        d = self.paths.template_dir(template_id)
        if not (d / "meta.json").exists() or (d / "deleted").exists():
            raise TemplateNotFound(f"template {template_id} not found")
        # Capsules made from it use its disk as their overlay's backing file: keep the files until
        # the last of them is destroyed (the marker hides the template meanwhile).
        (d / "deleted").touch()
        self.spares.drop(d)
        self._sweep_template(d)

    def _sweep_template(self, d: Path) -> None:
        if (d / "deleted").exists() and not any(c.meta.template_dir == str(d) for c in self._capsules.values()):
            self._drop_spares(d)
            shutil.rmtree(d, ignore_errors=True)

    def _drop_spares(self, template_dir: Path) -> None:
        """Spare copies of a template's memory that is being replaced or deleted."""
        self.spares.drop(template_dir)
        refill = self._refills.pop(template_dir, None)
        if refill is not None:
            refill.cancel()
        for n in range(SPARE_MEMORY_FILES):
            self.paths.spare_memory(template_dir, n).unlink(missing_ok=True)

    async def template_info(self, template_id: str) -> api.TemplateRuntime:
        if template_id in self.builtin.names:
            raise TemplateNotFound(f"{template_id} is a built-in template, not a snapshot")
        d = self.paths.template_dir(template_id)
        if not (d / "meta.json").exists() or (d / "deleted").exists():
            raise TemplateNotFound(f"template {template_id} not found")
        snap = TemplateSnapshot.load(d)
        return api.TemplateRuntime(template_id, snap.spec.vcpus, snap.spec.memory_mb, snap.size_bytes())

    async def update_network(self, capsule_id: str, policy: EgressPolicy) -> None:
        """New egress rules, in force at once for a running capsule (kept for its next resume)."""
        cap = self._get(capsule_id)
        async with cap.lock:
            cap.meta.network = policy.to_dict()
            cap.meta.save(self.paths.capsule_meta(capsule_id))
            if cap.slot is not None:
                try:
                    await self.net.apply(cap.slot, policy)
                except NetworkError as e:
                    raise HostAgentError(f"egress rules not applied: {e}") from e

    async def builtin_templates(self) -> list[api.TemplateRuntime]:
        return [api.TemplateRuntime(name, 1, 512, 0, version=TEMPLATES[name].image_key())
                for name in self.builtin.names]

    # ------------------------------------------------------------------ commands

    async def exec(self, capsule_id: str, cmd: str, args: list[str], *, envs: dict[str, str] | None = None,
                   cwd: str | None = None, timeout_sec: float = 30,
                   max_output_bytes: int | None = None) -> api.ExecResult:
        res, payload = await self._guest(capsule_id).call(
            "exec", cmd=cmd, args=list(args), envs=envs or {}, cwd=cwd, timeout_sec=timeout_sec,
            max_output_bytes=max_output_bytes)
        n = res["stdout_len"]
        return api.ExecResult(stdout=payload[:n], stderr=payload[n:n + res["stderr_len"]], exit_code=res["exit_code"],
                              duration_ms=res["duration_ms"], timed_out=bool(res.get("timed_out")),
                              stdout_truncated=bool(res.get("stdout_truncated")),
                              stderr_truncated=bool(res.get("stderr_truncated")))

    async def spawn(self, capsule_id: str, cmd: str, args: list[str], *, envs: dict[str, str] | None = None,
                    cwd: str | None = None, tag: str | None = None) -> api.ProcessInfo:
        res, _ = await self._guest(capsule_id).call("spawn", cmd=cmd, args=list(args), envs=envs or {}, cwd=cwd, tag=tag)
        return api.ProcessInfo(pid=res["pid"], tag=res["tag"], cmd=cmd, args=list(args), running=True, exit_code=None)

    async def set_defaults(self, capsule_id: str, *, user: str | None = None, cwd: str | None = None,
                           envs: dict[str, str] | None = None) -> api.GuestDefaults:
        fields = {k: v for k, v in (("user", user), ("cwd", cwd), ("envs", envs)) if v is not None}
        res, _ = await self._guest(capsule_id).call("defaults", **fields)
        return api.GuestDefaults(user=res["user"], uid=res["uid"], cwd=res["cwd"], envs=res.get("envs") or {})

    async def processes(self, capsule_id: str) -> list[api.ProcessInfo]:
        res, _ = await self._guest(capsule_id).call("ps")
        return [api.ProcessInfo(pid=p["pid"], tag=p["tag"], cmd=p["cmd"], args=p.get("args", []),
                                running=p.get("running", True), exit_code=p.get("exit_code"))
                for p in res["processes"]]

    async def kill(self, capsule_id: str, target: int | str, signal: str = "SIGKILL") -> None:
        await self._guest(capsule_id).call("kill", target=target, signal=signal)

    async def attach(self, capsule_id: str, target: int | str) -> AsyncIterator[api.StreamEvent]:
        async for header, payload in self._guest(capsule_id).stream("attach", target=target):
            if header.get("type") == "data":
                yield api.StreamEvent(header.get("stream", "stdout"), payload)
            elif header.get("type") == "result":
                yield api.StreamEvent("exit", exit_code=header.get("exit_code"))

    # ------------------------------------------------------------------ terminals

    async def pty_start(self, capsule_id: str, cmd: str = "/bin/bash", args: list[str] | None = None, *,
                        cols: int = 80, rows: int = 24, envs: dict[str, str] | None = None,
                        cwd: str | None = None, tag: str | None = None) -> api.ProcessInfo:
        args = list(args or [])
        res, _ = await self._guest(capsule_id).call("pty_start", cmd=cmd, args=args, cols=cols, rows=rows,
                                                    envs=envs or {}, cwd=cwd, tag=tag)
        return api.ProcessInfo(pid=res["pid"], tag=res["tag"], cmd=cmd, args=args, running=True, exit_code=None)

    async def pty_sessions(self, capsule_id: str) -> list[api.ProcessInfo]:
        res, _ = await self._guest(capsule_id).call("pty_list")
        return [api.ProcessInfo(pid=p["pid"], tag=p["tag"], cmd=p["cmd"], args=p.get("args", []),
                                running=p.get("running", True), exit_code=p.get("exit_code"))
                for p in res["sessions"]]

    async def pty_attach(self, capsule_id: str, target: int | str) -> AsyncIterator[api.StreamEvent]:
        async for header, payload in self._guest(capsule_id).stream("pty_attach", target=target):
            if header.get("type") == "data":
                yield api.StreamEvent("output", payload)
            elif header.get("type") == "result":
                yield api.StreamEvent("exit", exit_code=header.get("exit_code"))

    async def pty_input(self, capsule_id: str, target: int | str, data: bytes) -> None:
        guest = self._guest(capsule_id)
        for i in range(0, len(data), MAX_PAYLOAD):
            await guest.call("pty_input", data[i:i + MAX_PAYLOAD], target=target)

    async def pty_resize(self, capsule_id: str, target: int | str, cols: int, rows: int) -> None:
        await self._guest(capsule_id).call("pty_resize", target=target, cols=cols, rows=rows)

    async def pty_kill(self, capsule_id: str, target: int | str, signal: str = "SIGKILL") -> None:
        await self._guest(capsule_id).call("pty_kill", target=target, signal=signal)

    # ------------------------------------------------------------------ files

    async def read_file(self, capsule_id: str, path: str) -> bytes:
        return b"".join([chunk async for chunk in self.read_file_stream(capsule_id, path)])

    async def read_file_stream(self, capsule_id: str, path: str) -> AsyncIterator[bytes]:
        async for header, payload in self._guest(capsule_id).stream("file_read", path=path):
            if header.get("type") == "data":
                yield payload

    async def write_file(self, capsule_id: str, path: str, data: bytes | AsyncIterator[bytes]) -> int:
        res = await self._guest(capsule_id).upload("file_write", data, path=path)
        return int(res.get("size", 0))

    async def list_dir(self, capsule_id: str, path: str, depth: int = 1) -> list[api.FileInfo]:
        res, _ = await self._guest(capsule_id).call("list", path=path, depth=depth)
        return [api.from_wire(api.FileInfo, e) for e in res["entries"]]

    async def stat(self, capsule_id: str, path: str) -> api.FileInfo:
        res, _ = await self._guest(capsule_id).call("stat", path=path)
        return api.from_wire(api.FileInfo, res["entry"])

    async def mkdir(self, capsule_id: str, path: str) -> api.FileInfo:
        res, _ = await self._guest(capsule_id).call("mkdir", path=path)
        return api.from_wire(api.FileInfo, res["entry"])

    async def remove(self, capsule_id: str, path: str) -> None:
        await self._guest(capsule_id).call("remove", path=path)

    async def metrics(self, capsule_id: str) -> api.CapsuleMetrics:
        res, _ = await self._guest(capsule_id).call("metrics")
        return api.from_wire(api.CapsuleMetrics, res)

    # ------------------------------------------------------------------ ports

    async def tcp_connect(self, capsule_id: str, port: int) -> api.Tunnel:
        """Over the NIC when the service listens on it (faster, see network/inbound.py), else
        through the guest agent, which reaches the guest's loopback."""
        guest = self._guest(capsule_id)
        slot = self._get(capsule_id).slot
        if slot is not None:
            try:
                sock = await asyncio.to_thread(connect_in_netns, slot.netns, (GUEST_IP, port))
                return await StreamTunnel.open(sock)
            except ConnectionRefusedError:
                pass  # nothing on the NIC's address: maybe on loopback only
            except OSError as e:
                log.info("capsule %s: port %s over the NIC failed (%s); using the guest agent", capsule_id, port, e)
        return await guest.open_tunnel("tcp_connect", port=port)

    def open_requests(self, capsule_id: str) -> int:
        """Guest agent requests in flight on this capsule's channel (tests check for leaks)."""
        cap = self._get(capsule_id)
        return len(cap.guest._pending) if cap.guest is not None else 0


def host_capacity(data_root: Path) -> dict[str, int | None]:
    """MemAvailable (what can be given without swapping) and the free space of the data disk."""
    free_mem: int | None = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free_mem = int(line.split()[1]) // 1024
                    break
    except OSError:
        pass
    try:
        st = os.statvfs(data_root if data_root.exists() else data_root.parent)
        free_disk: int | None = st.f_bavail * st.f_frsize // (1024 * 1024)
    except OSError:
        free_disk = None
    return {"free_memory_mb": free_mem, "free_disk_mb": free_disk}


__all__ = ["LocalHostAgent"]
