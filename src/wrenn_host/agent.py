"""The local host agent: a registry of this host's capsules, each a microVM (QEMU by default)
restored from a template snapshot (one `capsule.LocalCapsule` each), behind `api.HostAgent`.

What lives elsewhere: a capsule's resources and its one `kill()` (capsule.py), start-up recovery
and orphan sweeps (reclaim.py, recover.py), spare VMs and memory copies (spares.py), templates
made from capsules (publish.py), built-in template snapshots (templates.py), the calls that go to
the guest agent (passthrough.py), the VMM behind a driver interface (vmm/), network slots
(network/), confinement (jail.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from wrenn_host import api, perms, transfer
from wrenn_host.api import CapsuleNotFound, HostAgentError, TemplateNotFound
from wrenn_host.capsule import CapsuleMeta, HostResources, LocalCapsule
from wrenn_host.guest import GuestClient
from wrenn_host.jail import Confinement
from wrenn_host.network import CapsuleNetwork, EgressPolicy, NetworkError
from wrenn_host.passthrough import GuestCalls
from wrenn_host.paths import HostPaths
from wrenn_host.publish import SnapshotTemplates
from wrenn_host.reclaim import reclaim
from wrenn_host.spares import SpareMemory, SparePool, boot_spare, hand_over
from wrenn_host.templates import BuiltinTemplates, TemplateSnapshot
from wrenn_host.vmm import driver
from wrenn_host.vmm.accel import choose_accelerator
from wrenn_images import builder
from wrenn_images.recipes import TEMPLATES

log = logging.getLogger(__name__)

Capsule = LocalCapsule  # the name benchmarks and older code use


def max_restores() -> int:
    """How many VMs this host restores at once (creates without a spare, resumes). A restore is
    CPU-bound (on TCG: hundreds of ms of a core): fifty at once all end late, while taken in turn
    the first ones are running early and the last no later. WRENN_MAX_RESTORES, default the
    number of cores (at least 2)."""
    try:
        value = int(os.environ.get("WRENN_MAX_RESTORES") or 0)
    except ValueError:
        value = 0
    return value if value > 0 else max(2, os.cpu_count() or 2)


class LocalHostAgent(GuestCalls, api.HostAgent):
    def __init__(self, data_dir: Path, *, network: bool | None = None, vmm: str | None = None):
        """`network`: give capsules a NIC (default: on unless WRENN_NETWORK=off, and the host
        can; see wrenn_host.network). `vmm`: the VMM driver (default: WRENN_VMM, else qemu)."""
        self.paths = HostPaths(Path(data_dir) / "host")
        self._capsules: dict[str, LocalCapsule] = {}
        self._accel: str | None = None
        self._builtin: BuiltinTemplates | None = None
        self._vmm_version = ""
        self.reconcile_seconds = 0.0  # how long the last start-up reconcile took
        self.vmm = driver(vmm)
        self.jail = Confinement(self.paths.run, self.paths.run.name)
        self.net = CapsuleNetwork(self.paths.tag, enabled=network)
        self.host = HostResources(self.paths, self.net, self.jail, self.vmm, SpareMemory(self.paths))
        # Capsules restored ahead under placeholder ids: a create takes one (see spares.py).
        self.spares = SparePool(functools.partial(boot_spare, self.host, discard=self._discard_quietly),
                                self._discard)
        self.templates = SnapshotTemplates(self.paths, self.spares, self.host.memory, self._template_in_use)
        self._restores = asyncio.Semaphore(max_restores())  # FIFO: creates are served in turn

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
            self._builtin = BuiltinTemplates(self.accel, self.paths.run, self.net, self.vmm)
        return self._builtin

    async def prepare(self, shapes: list[tuple[str, int, int]] | None = None) -> None:
        """Build what capsules need before serving: images and the default-shape snapshots."""
        await asyncio.to_thread(builder.build_all)
        await self.net.start()
        for name, vcpus, mem in shapes or [(n, 1, 512) for n in self.builtin.names]:
            await self.builtin.get(name, vcpus, mem)

    async def start(self, known: dict[str, str]) -> api.ReconcileReport:
        self._vmm_version = await asyncio.to_thread(self.vmm.version)
        # Older versions left 0644 memory files and disks in 0755 directories: close them.
        await asyncio.to_thread(perms.lock_down, self.paths.root)
        await asyncio.to_thread(perms.lock_down_cache, builder.cache_dir())
        await self.net.start()
        report, self.reconcile_seconds = await reclaim(self.host, known, self._capsules, self.templates.sweep_all)
        # Spares for the default template and shape, if its snapshot is built already.
        default = self.builtin.dir_for("minimal", 1, 512) if "minimal" in self.builtin.names else None
        if default is not None and (default / "meta.json").exists():
            self.spares.want(TemplateSnapshot.load(default))
        return report

    async def close(self) -> None:
        await self.spares.close()  # spares are nobody's capsules: they do not outlive the agent
        self.host.memory.close()
        # Capsules keep running across a server restart; only our connections go.
        for cap in list(self._capsules.values()):
            await cap.disconnect()
        await self.net.close()
        self.jail.close()
        with contextlib.suppress(OSError):  # kept while running capsules have sockets in it
            if [d.name for d in self.paths.run.iterdir()] in ([], [self.jail.empty.name]):
                with contextlib.suppress(FileNotFoundError):
                    self.jail.empty.rmdir()
            self.paths.run.rmdir()

    @property
    def _vmm_label(self) -> str:
        return f"{self.vmm.name} {self._vmm_version}".strip()

    async def health(self) -> dict[str, Any]:
        running = sum(1 for c in self._capsules.values() if c.machine is not None and c.machine.is_alive())
        return {"accelerator": self.accel, "vmm": self._vmm_label,
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

    # ------------------------------------------------------------------ registry

    def _get(self, capsule_id: str) -> LocalCapsule:
        cap = self._capsules.get(capsule_id)
        if cap is None:
            raise CapsuleNotFound(f"capsule {capsule_id} not found on this host")
        return cap

    def _register(self, cap: LocalCapsule) -> None:
        self._capsules[cap.id] = cap

    async def _discard(self, cap: LocalCapsule) -> None:
        """Kill a capsule with its files and forget it. If a step failed it stays registered
        (a later destroy retries what is left) and the failure is raised."""
        await cap.kill(remove_files=True)
        if self._capsules.get(cap.id) is cap:
            del self._capsules[cap.id]
        if cap.meta is not None:
            self.templates.sweep(Path(cap.meta.template_dir))

    async def _discard_quietly(self, cap: LocalCapsule) -> None:
        """On a failure path: the caller raises what went wrong first (kill logs its own)."""
        with contextlib.suppress(Exception):
            await self._discard(cap)

    def _template_in_use(self, template_dir: Path) -> bool:
        return any(c.meta is not None and c.meta.template_dir == str(template_dir) for c in self._capsules.values())

    def _runtime(self, cap: LocalCapsule, *, handed_over: bool = False) -> api.CapsuleRuntime:
        assert cap.meta is not None and cap.snapshot is not None
        metadata = {"kernel_version": cap.meta.kernel_version, "vmm_version": self._vmm_label,
                    "agent_version": cap.meta.agent_version, "accelerator": cap.snapshot.spec.accel}
        used, size = cap.warm_disk if handed_over and cap.warm_disk else (None, None)
        return api.CapsuleRuntime(cap.id, cap.state(), cap.meta.template_id,
                                  cap.meta.vcpus, cap.meta.memory_mb, metadata,
                                  disk_used_bytes=used, disk_size_bytes=size)

    def _guest(self, capsule_id: str) -> GuestClient:
        cap = self._get(capsule_id)
        if cap.guest is None or cap.machine is None:
            raise HostAgentError(f"capsule {capsule_id} is not running", code="invalid_state")
        return cap.guest

    def rss_bytes(self, capsule_id: str) -> int:
        cap = self._get(capsule_id)
        return cap.machine.rss_bytes() if cap.machine else 0

    # ------------------------------------------------------------------ lifecycle

    async def _template(self, template_id: str, vcpus: int | None, memory_mb: int | None) -> TemplateSnapshot:
        if template_id in self.builtin.names:
            vcpus, memory_mb = vcpus or 1, memory_mb or 512
            self._check_shape(vcpus, memory_mb)
            return await self.builtin.get(template_id, vcpus, memory_mb)
        return self.templates.load(template_id, vcpus, memory_mb)

    def _check_shape(self, vcpus: int, memory_mb: int) -> None:
        self._limits().check(vcpus, memory_mb)

    async def create(self, capsule_id: str, template_id: str, vcpus: int | None = None,
                     memory_mb: int | None = None, network: EgressPolicy | None = None) -> api.CapsuleRuntime:
        if capsule_id in self._capsules or self.paths.capsule_dir(capsule_id).exists():
            raise HostAgentError(f"capsule {capsule_id} already exists", code="exists")
        snap = await self._template(template_id, vcpus, memory_mb)
        policy = network or EgressPolicy()
        spare = self.spares.take(snap)
        if spare is not None:
            cap = await hand_over(spare, capsule_id, template_id, policy, self._register, self._discard_quietly)
            if cap is not None:
                return self._runtime(cap, handed_over=True)
        meta = CapsuleMeta(capsule_id, template_id, str(snap.dir), snap.spec.vcpus, snap.spec.memory_mb,
                           snap.kernel_version, network=policy.to_dict())
        cap = LocalCapsule(capsule_id, self.host, meta, snap)
        self._register(cap)
        async with cap.lock:
            try:
                async with self._restores:
                    await cap.build()
            except BaseException:
                await self._discard_quietly(cap)
                raise
        return self._runtime(cap)

    async def pause(self, capsule_id: str) -> None:
        cap = self._get(capsule_id)
        async with cap.lock:
            await cap.pause()

    async def resume(self, capsule_id: str) -> api.CapsuleRuntime:
        cap = self._get(capsule_id)
        async with cap.lock, self._restores:
            await cap.resume()
        return self._runtime(cap)

    async def destroy(self, capsule_id: str) -> None:
        cap = self._capsules.get(capsule_id)
        if cap is None:  # whatever is left on disk under that id (a VMM too) goes
            await LocalCapsule(capsule_id, self.host).kill(remove_files=True)
            return
        async with cap.lock:
            await self._discard(cap)

    async def get(self, capsule_id: str) -> api.CapsuleRuntime:
        return self._runtime(self._get(capsule_id))

    async def update_network(self, capsule_id: str, policy: EgressPolicy) -> None:
        """New egress rules, in force at once for a running capsule (kept for its next resume)."""
        cap = self._get(capsule_id)
        async with cap.lock:
            assert cap.meta is not None
            cap.meta.network = policy.to_dict()
            cap.save_meta()
            if cap.slot is not None:
                try:
                    await self.net.apply(cap.slot, policy)
                except NetworkError as e:
                    raise HostAgentError(f"egress rules not applied: {e}") from e

    # ------------------------------------------------------------------ templates

    async def snapshot(self, capsule_id: str, template_id: str) -> api.TemplateRuntime:
        cap = self._get(capsule_id)
        self.paths.template_dir(template_id)  # an invalid id fails before the pause
        async with cap.lock:
            await cap.pause()
            return await self.templates.publish(cap, template_id)

    async def delete_template(self, template_id: str) -> None:
        if template_id in self.builtin.names:
            raise HostAgentError("built-in templates cannot be deleted", code="forbidden")
        self.templates.delete(template_id)

    async def template_info(self, template_id: str) -> api.TemplateRuntime:
        if template_id in self.builtin.names:
            raise TemplateNotFound(f"{template_id} is a built-in template, not a snapshot")
        return self.templates.info(template_id)

    async def builtin_templates(self) -> list[api.TemplateRuntime]:
        return [api.TemplateRuntime(name, 1, 512, 0, version=TEMPLATES[name].image_key())
                for name in self.builtin.names]

    # ------------------------------------------------------------------ moving between hosts

    async def archive_manifest(self, kind: str, object_id: str) -> api.ArchiveManifest:
        return await transfer.manifest(self, kind, object_id)

    def read_archive(self, kind: str, object_id: str) -> AsyncIterator[bytes]:
        return transfer.read(self, kind, object_id)

    async def write_archive(self, kind: str, object_id: str, data: AsyncIterator[bytes],
                            manifest: api.ArchiveManifest) -> None:
        await transfer.install(self, kind, object_id, data, manifest)


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
