"""VMM drivers: what the host agent needs from a virtual machine monitor, and nothing more.

The host agent types against `Machine` and `VmmDriver` only; QEMU (`qemu.QemuDriver`) is the one
implementation today, chosen by the `WRENN_VMM` setting (default `qemu`). A Firecracker driver
(snapshot/load over its API socket) would sit beside it:

    vmm = driver()                               # from WRENN_VMM
    machine = vmm.machine(spec, files)           # records paths and shape; starts nothing
    await machine.boot()                         # cold boot (template builds only)
    await machine.restore(state, before_cont=...)  # start from saved device state + memory file
    await machine.save(state)                    # pause to files; the process is gone afterwards
    await machine.kill()                         # forced stop; safe twice
    machine.is_alive(); machine.pid
    vmm.adopt(spec, files)                       # one left running by an earlier server process
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from wrenn_host.jail import Plan

DEFAULT_DRIVER = "qemu"
# name -> "module:class"; imported on first use so an unused driver costs nothing.
DRIVERS = {"qemu": "wrenn_host.vmm.qemu:QemuDriver"}


@dataclasses.dataclass(frozen=True)
class MachineSpec:
    """Everything that must be identical between a save and a restore of the same guest."""

    vcpus: int
    memory_mb: int
    kernel: Path
    initrd: Path
    cmdline: str
    accel: str  # "kvm" | "tcg"
    nic: bool = False  # a virtio-net device, backed by the capsule's tap (see wrenn_host.network)


@dataclasses.dataclass(frozen=True)
class MachineFiles:
    """Per-machine files. Sockets live in a short run directory (unix socket paths max 107 bytes)."""

    disk: Path  # qcow2 overlay
    memory: Path  # guest RAM, sparse file
    qmp: Path  # the VMM's control socket (QMP for QEMU)
    agent: Path  # host end of the guest agent's serial port
    serial_log: Path
    qemu_log: Path  # the VMM's own output
    pidfile: Path
    # Serial console to a socket the host agent reads into a capped log (serial_log.py); None:
    # straight to `serial_log` (template cold boots, whose whole console is wanted on failure).
    serial_sock: Path | None = None


class Machine(Protocol):
    """One VMM process. Made by a driver; `boot`/`restore` spawn it, `save`/`kill` end it."""

    spec: MachineSpec
    files: MachineFiles
    pid: int | None
    tap_fd: int | None  # an open tap the VMM inherits at spawn (machines with a NIC)
    nice: int  # > 0: spawn at a lower CPU priority (spare VMs)
    confine: Callable[[], Plan] | None  # the confinement of the next spawn (wrenn_host/jail.py)

    async def boot(self) -> None: ...

    async def restore(self, state: Path, timeout: float = 30.0,
                      before_cont: Callable[[], Awaitable[None]] | None = None, steps: str = "resume") -> None:
        """Start from `state`; `before_cont` runs with the device state loaded, before the vCPUs."""

    async def save(self, state: Path, timeout: float = 60.0, steps: str = "pause") -> None:
        """Pause to files and end the process; `state` appears only once the pause is whole."""

    async def finish_pause(self, state: Path, timeout: float = 10.0) -> None:
        """After a restart: complete a pause this machine was in the middle of."""

    async def status(self, timeout: float = 2.0) -> str:
        """The run state: "running", "paused", "inmigrate", "postmigrate", ..."""

    async def kill(self) -> None:
        """Forced stop; safe to call twice or on a dead machine."""

    def is_alive(self) -> bool: ...

    def moved(self, files: MachineFiles) -> Machine:
        """The same process after its directories were renamed (a spare handed to a capsule)."""

    def set_nice(self, value: int) -> None: ...

    def rss_bytes(self) -> int: ...

    def log_tail(self, n: int = 1500) -> str: ...


class VmmDriver(Protocol):
    name: str  # shown in health and capsule metadata ("qemu 7.2.0")

    def version(self) -> str:
        """The VMM's version (blocking: it may run the binary)."""

    def machine(self, spec: MachineSpec, files: MachineFiles) -> Machine: ...

    def adopt(self, spec: MachineSpec | None, files: MachineFiles) -> Machine | None:
        """The live VMM an earlier server process left on `files`, or None. Without `spec` the
        machine is good only for `kill()` (a leftover whose capsule is unknown)."""


def driver(name: str | None = None) -> VmmDriver:
    """The driver named `name`, else by the `WRENN_VMM` setting, else QEMU."""
    name = (name or os.environ.get("WRENN_VMM") or DEFAULT_DRIVER).strip().lower()
    if name not in DRIVERS:
        raise ValueError(f"unknown VMM driver {name!r} (WRENN_VMM); known: {', '.join(sorted(DRIVERS))}")
    module, cls = DRIVERS[name].split(":")
    return getattr(importlib.import_module(module), cls)()


__all__ = ["DEFAULT_DRIVER", "DRIVERS", "Machine", "MachineFiles", "MachineSpec", "VmmDriver", "driver"]
