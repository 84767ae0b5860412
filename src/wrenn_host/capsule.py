"""One capsule on this host: what describes it (`CapsuleMeta`, persisted as meta.json) and what it
holds while this process knows it (`LocalCapsule`: its machine, guest connection, serial log
copier, network slot, cgroups and files).

Every way a capsule ends (destroy, a failed create, resume or spare hand-over, a discarded spare,
what start-up finds on disk) goes through one ordered, idempotent `LocalCapsule.kill()`.

A capsule directory holds everything the capsule owns on disk (disk overlay, memory file, device
state while paused, logs, meta.json); its sockets live in a short run directory. The presence of
the `state` file means "paused, restorable"; a live VMM found by pidfile means "running".
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
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wrenn_host.api import VMMError
from wrenn_host.durable import crashpoint, fsync_dir, write_durable
from wrenn_host.guest import GuestClient
from wrenn_host.jail import Confinement
from wrenn_host.network import CapsuleNetwork, EgressPolicy, NetworkError, Slot
from wrenn_host.paths import HostPaths, check_id
from wrenn_host.serial_log import SerialLog
from wrenn_host.vmm import Machine, MachineFiles, VmmDriver

if TYPE_CHECKING:
    from wrenn_host.spares import SpareMemory
    from wrenn_host.templates import TemplateSnapshot

log = logging.getLogger(__name__)

AGENT_CONNECT_TIMEOUT_S = 30.0


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
    spawned_as: str = ""  # the spare id its VMM was started under (its disk symlink is named so)

    @property
    def policy(self) -> EgressPolicy:
        return EgressPolicy.from_dict(self.network)

    def save(self, path: Path) -> None:
        write_durable(path, json.dumps(dataclasses.asdict(self)).encode())

    @classmethod
    def load(cls, path: Path) -> CapsuleMeta:
        return cls(**json.loads(path.read_text()))


@dataclasses.dataclass
class HostResources:
    """What every capsule of this host draws from: file names, network slots, confinement, the
    VMM driver, and template memory copied ahead."""

    paths: HostPaths
    net: CapsuleNetwork
    jail: Confinement
    vmm: VmmDriver
    memory: SpareMemory


class LocalCapsule:
    """`__init__` records; `build`/`restore` acquire (files, slot, machine, guest connection);
    `kill` releases. Every resource acquired is kept as an attribute until it is released, so
    `kill` knows what is left. Lifecycle calls are made under `lock` by the host agent."""

    def __init__(self, capsule_id: str, host: HostResources, meta: CapsuleMeta | None = None,
                 snapshot: TemplateSnapshot | None = None):
        """Without `meta` and `snapshot`: what is on disk under an id the host cannot read or
        does not know; good only for `kill()`."""
        self._id = check_id(capsule_id)  # before it names any file or cgroup
        self.host = host
        self.meta = meta
        self.snapshot = snapshot  # fixes the machine spec for every restore
        self.machine: Machine | None = None
        self.guest: GuestClient | None = None
        self.serial: SerialLog | None = None  # copies the console into the capped serial.log
        self.slot: Slot | None = None  # its network namespace, while the VM runs
        self.warm_disk: tuple[int, int] | None = None  # (used, size) bytes, measured by a spare's warm-up
        self.lock = asyncio.Lock()  # one lifecycle operation at a time

    @classmethod
    def load(cls, capsule_id: str, host: HostResources) -> LocalCapsule | None:
        """The capsule described by its meta.json and template, or None if either is unreadable."""
        from wrenn_host.templates import TemplateSnapshot

        try:
            meta = CapsuleMeta.load(host.paths.capsule_meta(capsule_id))
            return cls(capsule_id, host, meta, TemplateSnapshot.load(Path(meta.template_dir)))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @property
    def id(self) -> str:
        return self._id

    @property
    def files(self) -> MachineFiles:
        return self.host.paths.machine_files(self._id)

    @property
    def state_file(self) -> Path:
        return self.host.paths.capsule_state(self._id)

    def state(self) -> str:
        if self.machine is not None and self.machine.is_alive():
            return "running"
        if self.state_file.exists():
            return "paused"
        return "error"  # the VM died (crash, OOM kill) and there is no pause to go back to

    def save_meta(self) -> None:
        assert self.meta is not None
        self.meta.save(self.host.paths.capsule_meta(self._id))

    # ------------------------------------------------------------------ start

    async def build(self, *, spare: bool = False, nice: int = 0) -> None:
        """Files from the template, restore, identity. On failure the caller kills the capsule
        (with its files): whatever was acquired is recorded here for that."""
        assert self.meta is not None and self.snapshot is not None
        snap, paths = self.snapshot, self.host.paths
        files = self.files
        files.disk.parent.mkdir(parents=True, mode=0o700)
        files.agent.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(snap.overlay_seed, files.disk)
        files.disk.chmod(0o600)
        await self.host.memory.take(snap, files.memory)
        spawn_files = files
        if spare:
            # QEMU re-opens its disk by name at the end of a pause: a link named after the spare,
            # re-pointed when the spare becomes a capsule (see spares.hand_over).
            self.meta.spawned_as = self._id
            link = paths.disk_link(self._id)
            link.unlink(missing_ok=True)
            link.symlink_to(files.disk)
            spawn_files = dataclasses.replace(files, disk=link)
        self.save_meta()
        await self.restore(snap.state, spawn_files, nice=nice, steps="create")

    async def restore(self, state: Path, files: MachineFiles | None = None, nice: int = 0,
                      steps: str = "resume") -> None:
        """Start the machine from `state` (on a network slot if it has a NIC), reconnect the
        guest agent, push identity + clock."""
        assert self.meta is not None and self.snapshot is not None
        spec = self.snapshot.spec
        machine = self.host.vmm.machine(spec, files or self.files)
        # Its sockets' directory is under /run: gone after a host reboot, or never made on a host
        # the capsule was moved to while paused.
        machine.files.agent.parent.mkdir(parents=True, exist_ok=True)
        machine.nice = nice
        machine.confine = lambda: self.host.jail.plan(self._id, spec.vcpus, spec.memory_mb, machine.files.disk)
        self.machine = machine
        if spec.nic:
            try:
                self.slot = await self.host.net.acquire(self.meta.policy)
                self.meta.slot = self.slot.index
                self.save_meta()
                machine.tap_fd = self.host.net.open_tap(self.slot)
            except NetworkError as e:
                raise VMMError(f"capsule {self._id} needs a network slot: {e}") from e

        async def connect_agent() -> None:
            self.guest = await GuestClient.connect_unix(str(machine.files.agent), timeout=AGENT_CONNECT_TIMEOUT_S)
            await self.start_serial()

        await machine.restore(state, before_cont=connect_agent, steps=steps)
        await self.push_identity()
        await crashpoint(f"{steps}.identity")

    async def push_identity(self) -> None:
        """What differs between clones of one snapshot: id, hostname, RNG seed, clock."""
        assert self.guest is not None and self.machine is not None and self.meta is not None
        try:
            ident, _ = await self.guest.call(
                "identity", capsule_id=self._id, hostname=self._id,
                seed=base64.b64encode(os.urandom(64)).decode(), time_ns=time.time_ns())
            if not self.meta.agent_version:
                self.meta.agent_version = str(ident.get("version", ""))
                self.save_meta()
        except Exception as e:
            raise VMMError(f"guest agent did not answer after restore: {e}: {self.machine.log_tail()}") from e

    async def start_serial(self) -> None:
        await self._stop_serial()
        files = self.files
        if files.serial_sock is not None:
            self.serial = SerialLog(files.serial_sock, files.serial_log)
            await self.serial.start()

    def rename(self, new_id: str) -> bool:
        """Move this capsule's directories to `new_id` (a spare handed to a capsule); the running
        VMM keeps its open files and sockets. False, with nothing moved, if a rename failed."""
        paths = self.host.paths
        check_id(new_id)
        try:
            paths.capsule_dir(self._id).rename(paths.capsule_dir(new_id))
        except OSError as e:
            log.warning("capsule %s not renamed to %s: %s", self._id, new_id, e)
            return False
        try:
            paths.capsule_run_dir(self._id).rename(paths.capsule_run_dir(new_id))
        except OSError as e:
            log.warning("capsule %s not renamed to %s: %s", self._id, new_id, e)
            paths.capsule_dir(new_id).rename(paths.capsule_dir(self._id))
            return False
        self._id = new_id
        if self.meta is not None:
            self.meta.capsule_id = new_id
        if self.machine is not None:
            self.machine = self.machine.moved(self.files)
        return True

    # ------------------------------------------------------------------ pause / resume

    async def pause(self) -> None:
        if self.machine is None or not self.machine.is_alive():
            if self.state_file.exists():
                return  # already paused
            raise VMMError(f"capsule {self._id} has no running VM")
        # The agent channel stays connected through the save, so the snapshot holds a guest that
        # believes its host is there: restore reconnects before the vCPUs run (see restore).
        await self.machine.save(self.state_file)
        self.machine = None
        await self._stop_serial()
        await self._close_guest()
        await self._release_slot()

    async def resume(self) -> None:
        if self.machine is not None and self.machine.is_alive():
            return
        state = self.state_file
        if not state.exists():
            raise VMMError(f"capsule {self._id} has no paused state to resume")
        try:
            await self.restore(state)
        except BaseException:
            # Back to paused: the files (and `state`) stay, everything this restore took goes.
            with contextlib.suppress(Exception):
                await self.kill()
            raise
        # The guest now runs on and changes the memory file: the old state no longer matches it.
        state.unlink()
        await crashpoint("resume.state-unlinked")
        fsync_dir(state.parent)
        await crashpoint("resume.dir-synced")

    # ------------------------------------------------------------------ end

    async def disconnect(self) -> None:
        """The server stops: our connections go, the VM keeps running (a restart adopts it)."""
        await self._stop_serial()
        with contextlib.suppress(Exception):
            await self._close_guest()

    async def kill(self, *, remove_files: bool = False) -> None:
        """Release everything this capsule holds, in this order:

        1. the serial log copier and 2. the guest connection: ours, closed before the VM goes so
           no reader takes the VM's end for a guest failure;
        3. the VMM process (forced; a leftover found by pidfile if this object never had one);
        4. the network slot (namespace, veth, tap, rules), once nothing uses its tap;
        5. the cgroups (removable only once the VMM is reaped), also the spare's it began as;
        6. with `remove_files`: the capsule and run directories and the spare's disk link.

        Safe to call twice: a step that succeeded has nothing left to do. A step that fails is
        logged and the later steps still run; the first failure is raised at the end (a second
        call retries what failed)."""
        steps = [self._stop_serial, self._close_guest, self._stop_machine, self._release_slot,
                 self._release_cgroups]
        if remove_files:
            steps.append(self._remove_files)
        errors: list[Exception] = []
        for step in steps:
            try:
                await step()
            except Exception as e:
                log.warning("capsule %s: %s failed: %s", self._id, step.__name__.strip("_"), e)
                errors.append(e)
        if errors:
            raise errors[0]

    async def _stop_serial(self) -> None:
        if self.serial is not None:
            await self.serial.stop()
            self.serial = None

    async def _close_guest(self) -> None:
        if self.guest is not None:
            guest, self.guest = self.guest, None
            await guest.close()

    async def _stop_machine(self) -> None:
        if self.machine is None:
            spec = self.snapshot.spec if self.snapshot is not None else None
            self.machine = self.host.vmm.adopt(spec, self.files)  # one an earlier process left
        if self.machine is not None:
            await self.machine.kill()
            self.machine = None

    async def _release_slot(self) -> None:
        """A paused or dead capsule needs no namespace: a resume takes a fresh one."""
        if self.slot is not None:
            await self.host.net.release(self.slot)
            self.slot = None
        if self.meta is not None and self.meta.slot is not None:
            self.meta.slot = None
            with contextlib.suppress(OSError):
                self.save_meta()

    async def _release_cgroups(self) -> None:
        self.host.jail.release(self._id)
        if self.meta is not None and self.meta.spawned_as and self.meta.spawned_as != self._id:
            self.host.jail.release(self.meta.spawned_as)

    async def _remove_files(self) -> None:
        paths = self.host.paths

        def remove() -> None:
            shutil.rmtree(paths.capsule_dir(self._id), ignore_errors=True)
            shutil.rmtree(paths.capsule_run_dir(self._id), ignore_errors=True)
            if self.meta is not None and self.meta.spawned_as:  # named so at its spawn
                paths.disk_link(self.meta.spawned_as).unlink(missing_ok=True)

        # Off the event loop: unlinking a memory file with data in it takes milliseconds.
        await asyncio.to_thread(remove)


__all__ = ["CapsuleMeta", "HostResources", "LocalCapsule"]
