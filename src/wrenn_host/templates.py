"""Template snapshots: a paused guest (memory file + device state + disk) that capsules restore from.

Built-in templates (`minimal`, `base-python`) are built per shape (vcpus, memory) on first use and
cached by recipe key, accelerator and shape: a snapshot fixes both. Templates made from capsules
live in the host data directory and keep the shape of the capsule they came from.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from wrenn_host.api import VMMError
from wrenn_host.durable import write_durable
from wrenn_host.guest import GuestClient
from wrenn_host.network import CapsuleNetwork, EgressPolicy
from wrenn_host.vmm import MachineFiles, MachineSpec, VmmDriver, driver
from wrenn_images import builder
from wrenn_images.recipes import TEMPLATES

BOOT_TIMEOUT_S = 120.0  # cold boot + first agent answer; ~5 s on TCG, generous for a loaded host


@dataclasses.dataclass(frozen=True)
class TemplateSnapshot:
    """Files of one template snapshot and the machine shape they fix."""

    template_id: str
    dir: Path
    spec: MachineSpec
    kernel_version: str

    @property
    def memory(self) -> Path:
        return self.dir / "memory"

    @property
    def state(self) -> Path:
        return self.dir / "state"

    @property
    def disk(self) -> Path:
        return self.dir / "disk.qcow2"

    @property
    def overlay_seed(self) -> Path:
        """An empty qcow2 overlay on `disk`; copying it is faster than running qemu-img."""
        return self.dir / "overlay.qcow2"

    def size_bytes(self) -> int:
        return sum(_allocated(p) for p in (self.memory, self.state, self.disk))

    def save_meta(self) -> None:
        meta = {"template_id": self.template_id, "kernel_version": self.kernel_version,
                "spec": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self.spec).items()}}
        write_durable(self.dir / "meta.json", json.dumps(meta, indent=1).encode())

    @classmethod
    def load(cls, dir: Path) -> TemplateSnapshot:
        meta = json.loads((dir / "meta.json").read_text())
        s = meta["spec"]
        spec = MachineSpec(vcpus=s["vcpus"], memory_mb=s["memory_mb"], kernel=Path(s["kernel"]),
                           initrd=Path(s["initrd"]), cmdline=s["cmdline"], accel=s["accel"],
                           nic=bool(s.get("nic", False)))
        return cls(meta["template_id"], dir, spec, meta.get("kernel_version", ""))

    def delete(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _allocated(p: Path) -> int:
    try:
        return p.stat().st_blocks * 512
    except OSError:
        return 0


def sparse_copy(src: Path, dst: Path) -> None:
    """Copy only the data extents of a sparse file (guest memory is mostly holes)."""
    with open(src, "rb") as s, os.fdopen(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as d:
        size = os.fstat(s.fileno()).st_size
        d.truncate(size)
        off = 0
        while off < size:
            try:
                data = os.lseek(s.fileno(), off, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after off
                break
            hole = os.lseek(s.fileno(), data, os.SEEK_HOLE)
            pos, left = data, hole - data
            while left > 0:
                n = os.copy_file_range(s.fileno(), d.fileno(), left, pos, pos)
                if n == 0:
                    break
                pos += n
                left -= n
            off = hole


def qemu_img(*args: str) -> None:
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise VMMError(f"qemu-img {' '.join(args)}: {proc.stderr.strip()}")


def make_overlay_seed(disk: Path, final_disk: Path, out: Path) -> None:
    """An empty overlay for `disk` that will live at `final_disk` once the build is published
    (-u: the backing file is not there yet)."""
    info = subprocess.run(["qemu-img", "info", "--output=json", str(disk)], capture_output=True, text=True)
    size = json.loads(info.stdout)["virtual-size"]
    qemu_img("create", "-q", "-u", "-f", "qcow2", "-b", str(final_disk), "-F", "qcow2", str(out), str(size))


def kernel_cmdline(accel: str) -> str:
    cmdline = builder.BASE_CMDLINE
    if accel == "tcg":
        # Under TCG the boot can hang calibrating the TSC: tell the kernel the host's frequency.
        khz = _host_tsc_khz()
        if khz:
            cmdline += f" tsc_early_khz={khz}"
    return cmdline


def _host_tsc_khz() -> int | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    except OSError:
        pass
    return None


async def boot_snapshot(template_id: str, dir: Path, spec: MachineSpec, base_disk: Path,
                        kernel_version: str, run_dir: Path, net: CapsuleNetwork | None = None,
                        vmm: VmmDriver | None = None) -> TemplateSnapshot:
    """Cold-boot a guest from `base_disk`, wait for its agent, pause it into `dir`.
    A machine with a NIC boots on a network slot of its own (every clone gets the same guest
    address, MAC and gateway the snapshot was taken with)."""
    dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=dir.parent, prefix=".build-"))
    sock_dir = Path(tempfile.mkdtemp(dir=run_dir, prefix="b"))
    files = MachineFiles(disk=work / "disk.qcow2", memory=work / "memory", qmp=sock_dir / "q",
                         agent=sock_dir / "a", serial_log=work / "serial.log", qemu_log=work / "qemu.log",
                         pidfile=work / "qemu.pid")
    machine = (vmm or driver()).machine(spec, files)
    slot = None
    try:
        if spec.nic:
            assert net is not None
            slot = await net.acquire(EgressPolicy())
            machine.tap_fd = net.open_tap(slot)
        qemu_img("create", "-q", "-f", "qcow2", "-b", str(base_disk), "-F", "raw", str(files.disk))
        with os.fdopen(os.open(files.memory, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.truncate(spec.memory_mb * 1024 * 1024)
        await machine.boot()
        guest = await GuestClient.connect_unix(str(files.agent), timeout=BOOT_TIMEOUT_S)
        try:
            await guest.wait_ready(timeout=BOOT_TIMEOUT_S)
            # Run once what every clone runs first, so its lazy imports and files are already in
            # the snapshot's memory; then settle, so every clone starts from a quiet guest.
            await guest.call("identity", capsule_id=template_id, hostname="wrenn",
                             seed=base64.b64encode(os.urandom(64)).decode(), time_ns=time.time_ns())
            await guest.call("exec", cmd="/bin/sync", args=[], timeout_sec=30)
            # Saved while connected: clones reconnect before they run and never see a hang-up.
            await machine.save(work / "state", steps="build")
        finally:
            await guest.close()
        make_overlay_seed(files.disk, dir / "disk.qcow2", work / "overlay.qcow2")
        for f in (files.serial_log, files.qemu_log):
            f.unlink(missing_ok=True)
        snap = TemplateSnapshot(template_id, work, spec, kernel_version)
        snap.save_meta()
        if dir.exists():
            shutil.rmtree(dir)
        work.rename(dir)
        return TemplateSnapshot(template_id, dir, spec, kernel_version)
    except BaseException as e:
        await machine.kill()
        tail = machine.log_tail()
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(e, VMMError) or not isinstance(e, Exception):
            raise
        raise VMMError(f"building template {template_id} failed: {e}: {tail}") from e
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
        if slot is not None:
            await net.release(slot)


class BuiltinTemplates:
    """Snapshots of the built-in templates, one per shape, built on first use and cached."""

    def __init__(self, accel: str, run_dir: Path, net: CapsuleNetwork | None = None,
                 vmm: VmmDriver | None = None):
        self.accel = accel
        self.vmm = vmm or driver()
        self.run_dir = run_dir
        self.net = net  # capsules have a NIC when it is enabled (snapshots with and without differ)
        self._locks: dict[tuple, asyncio.Lock] = {}
        self._kernel: builder.KernelImage | None = None

    @property
    def nic(self) -> bool:
        return self.net is not None and self.net.enabled

    @property
    def names(self) -> list[str]:
        return list(TEMPLATES)

    def kernel(self) -> builder.KernelImage:
        if self._kernel is None:
            self._kernel = builder.build_kernel()
        return self._kernel

    def dir_for(self, name: str, vcpus: int, memory_mb: int) -> Path:
        recipe = TEMPLATES[name]
        key = f"{name}-{recipe.image_key()}-{self.kernel().key}-{self.accel}-{vcpus}c-{memory_mb}m"
        if self.nic:
            key += "-net"
        if self.vmm.name != "qemu":  # a snapshot is one VMM's device state (QEMU's keys unchanged)
            key += f"-{self.vmm.name}"
        return builder.cache_dir() / "snapshots" / key

    async def get(self, name: str, vcpus: int, memory_mb: int) -> TemplateSnapshot:
        d = self.dir_for(name, vcpus, memory_mb)
        if (d / "meta.json").exists():
            return TemplateSnapshot.load(d)
        lock = self._locks.setdefault((name, vcpus, memory_mb), asyncio.Lock())
        async with lock:
            if (d / "meta.json").exists():
                return TemplateSnapshot.load(d)
            kernel = self.kernel()
            root = await asyncio.to_thread(builder.build_rootfs, TEMPLATES[name])
            spec = MachineSpec(vcpus=vcpus, memory_mb=memory_mb, kernel=kernel.vmlinux, initrd=kernel.initrd,
                               cmdline=kernel_cmdline(self.accel), accel=self.accel, nic=self.nic)
            return await boot_snapshot(name, d, spec, root.path, kernel.version, self.run_dir, self.net, self.vmm)
