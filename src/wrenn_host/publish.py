"""Templates made from capsules: publishing a paused capsule as a template snapshot, looking one
up for a create, deleting it, and removing its files once nothing uses them.

A snapshot template lives in the host data directory (`HostPaths.template_dir`) and keeps the
shape of the capsule it came from; capsules made from it use its disk as their overlay's backing
file, so a deleted template is only hidden (`deleted` marker) until its last capsule is gone.
Built-in templates are built per shape instead (templates.BuiltinTemplates).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

from wrenn_host import api
from wrenn_host.api import InvalidShape, TemplateNotFound
from wrenn_host.capsule import LocalCapsule
from wrenn_host.paths import HostPaths
from wrenn_host.spares import SpareMemory, SparePool
from wrenn_host.templates import TemplateSnapshot, make_overlay_seed, qemu_img, sparse_copy


class SnapshotTemplates:
    """`in_use(dir)`: whether a capsule of this host was made from the template in `dir`."""

    def __init__(self, paths: HostPaths, spares: SparePool, memory: SpareMemory,
                 in_use: Callable[[Path], bool]):
        self.paths = paths
        self.spares = spares
        self.memory = memory
        self.in_use = in_use

    def _dir(self, template_id: str) -> Path:
        d = self.paths.template_dir(template_id)
        if not (d / "meta.json").exists() or (d / "deleted").exists():
            raise TemplateNotFound(f"template {template_id} not found")
        return d

    def load(self, template_id: str, vcpus: int | None = None, memory_mb: int | None = None) -> TemplateSnapshot:
        """The snapshot a create starts from; its shape is fixed."""
        snap = TemplateSnapshot.load(self._dir(template_id))
        if (vcpus not in (None, snap.spec.vcpus)) or (memory_mb not in (None, snap.spec.memory_mb)):
            raise InvalidShape(f"template {template_id} is a snapshot with {snap.spec.vcpus} vCPU and "
                               f"{snap.spec.memory_mb} MiB; it cannot be started with another shape")
        return snap

    def info(self, template_id: str) -> api.TemplateRuntime:
        return _runtime(template_id, TemplateSnapshot.load(self._dir(template_id)))

    async def publish(self, cap: LocalCapsule, template_id: str) -> api.TemplateRuntime:
        """`cap` is paused (and its lock held): copy its disk, memory and device state into a
        new template, published by one rename (an overwrite replaces the old one whole)."""
        assert cap.meta is not None and cap.snapshot is not None
        dest = self.paths.template_dir(template_id)
        work = dest.with_name(f".{template_id}.tmp")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(mode=0o700)
        try:
            files = cap.files
            # Flatten the disk so the template does not depend on the capsule's backing chain.
            await asyncio.to_thread(qemu_img, "convert", "-O", "qcow2", str(files.disk), str(work / "disk.qcow2"))
            await asyncio.to_thread(sparse_copy, files.memory, work / "memory")
            shutil.copyfile(cap.state_file, work / "state")
            await asyncio.to_thread(make_overlay_seed, work / "disk.qcow2", dest / "disk.qcow2",
                                    work / "overlay.qcow2")
            TemplateSnapshot(template_id, work, cap.snapshot.spec, cap.meta.kernel_version).save_meta()
            if dest.exists():  # overwrite: running capsules keep their own copies
                self.drop_spares(dest)
                shutil.rmtree(dest)
            work.rename(dest)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return _runtime(template_id, TemplateSnapshot.load(dest))

    def delete(self, template_id: str) -> None:
        d = self._dir(template_id)
        # Capsules made from it use its disk as their overlay's backing file: keep the files until
        # the last of them is destroyed (the marker hides the template meanwhile).
        (d / "deleted").touch()
        self.spares.drop(d)
        self.sweep(d)

    def sweep(self, d: Path) -> None:
        """Remove a deleted template's files once no capsule of this host uses them."""
        if (d / "deleted").exists() and not self.in_use(d):
            self.drop_spares(d)
            shutil.rmtree(d, ignore_errors=True)

    def drop_spares(self, template_dir: Path) -> None:
        """Spare VMs and memory copies of a template that is being replaced or deleted."""
        self.spares.drop(template_dir)
        self.memory.drop(template_dir)

    def sweep_all(self) -> None:
        """Start-up: interrupted snapshots go, and deleted templates nothing uses any more."""
        for d in self.paths.templates.iterdir():
            if d.name.startswith("."):  # an interrupted snapshot
                shutil.rmtree(d, ignore_errors=True)
            else:
                self.sweep(d)


def _runtime(template_id: str, snap: TemplateSnapshot) -> api.TemplateRuntime:
    return api.TemplateRuntime(template_id, snap.spec.vcpus, snap.spec.memory_mb, snap.size_bytes())


__all__ = ["SnapshotTemplates"]
