"""Confined VMMs, like Firecracker's jailer, as a seam beside `QemuMachine._spawn`.

Each QEMU a capsule runs:
- starts as root only long enough to open its files, then becomes `wrenn-vmm` (`-runas`): after
  setuid to a non-root user the kernel clears every capability;
- is chrooted (`-chroot`) into an empty directory: after start-up it can reach no path at all.
  Its disks are handed over as file descriptors (`-add-fd` + `/dev/fdset/N`): QEMU re-opens its
  disks when a migration ends (pause) or an incoming one is activated (resume), and re-opening
  a descriptor set needs no path; device state comes over QMP (`getfd`), guest memory is mapped
  at start. The files stay root's, 0600;
- runs in a cgroup of its own with memory (guest + overhead), CPU (quota = vcpus) and pids limits
  (v2 where the host has it, else v1), joined before QEMU's first instruction;
- keeps QEMU's seccomp sandbox; `elevateprivileges` must allow QEMU's own setuid for `-runas`
  (there is nothing left to elevate to once it has dropped to an unprivileged user).

Whatever the host cannot do (not root, no cgroup, no such user) is left out and reported
(`report()`, shown by /api/health); a create never fails for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pwd
import shutil
import struct
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

VMM_USER = os.environ.get("WRENN_VMM_USER", "wrenn-vmm")
MEMORY_OVERHEAD_MB = 256  # QEMU itself: TCG translation cache, device buffers, libraries
CPU_PERIOD_US = 100_000
PIDS_MAX = 160  # vCPU threads + QEMU's block I/O pool (up to 64) + a few helpers
CG_ROOT = Path(os.environ.get("WRENN_CGROUP_ROOT", "/sys/fs/cgroup"))
V1_CONTROLLERS = ("memory", "cpu", "pids")

SANDBOX_STRICT = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
SANDBOX_RUNAS = "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny"


@dataclasses.dataclass
class Plan:
    """What one QEMU spawn gets: a command prefix, argv changes, descriptors to inherit."""

    prefix: list[str] = dataclasses.field(default_factory=list)
    extra: list[str] = dataclasses.field(default_factory=list)
    drive: str | None = None  # replaces the root -drive value
    sandbox: str = SANDBOX_STRICT
    pass_fds: list[int] = dataclasses.field(default_factory=list)

    def apply(self, argv: list[str]) -> list[str]:
        argv = list(argv)
        for i, a in enumerate(argv[:-1]):
            if a == "-drive" and self.drive and argv[i + 1].startswith("id=root,"):
                argv[i + 1] = self.drive
            if a == "-sandbox":
                argv[i + 1] = self.sandbox
        return self.prefix + argv + self.extra

    def close(self) -> None:
        """Our copies of the descriptors, once QEMU has its own."""
        for fd in self.pass_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pass_fds = []


class Confinement:
    """What this host can confine, detected once; makes a Plan per spawn."""

    def __init__(self, run_dir: Path, tag: str, enabled: bool | None = None):
        if enabled is None:
            enabled = os.environ.get("WRENN_JAIL", "1") != "0"
        self.tag = tag
        self.empty = run_dir / "jail"  # the chroot: an empty directory nobody may write
        self.reasons: list[str] = []
        self.root = enabled and os.geteuid() == 0
        if not enabled:
            self.reasons.append("disabled by WRENN_JAIL=0")
        elif not self.root:
            self.reasons.append("not running as root: QEMU runs as the server's user")
        self.user = _ensure_user(VMM_USER, self.reasons) if self.root else None
        self.chroot = self.root
        self.cgroup = _detect_cgroup(self.reasons) if self.root else None

    def report(self) -> dict:
        out = {"user": self.user, "chroot": self.chroot, "cgroup": self.cgroup, "seccomp": True,
               "capabilities": "none" if self.user else "inherited"}
        if self.reasons:
            out["degraded"] = self.reasons
        return out

    # ------------------------------------------------------------------ per spawn

    def plan(self, key: str, vcpus: int, memory_mb: int, disk: Path) -> Plan:
        plan = Plan()
        if not self.root:
            return plan
        try:
            plan.drive, plan.pass_fds, fd_args = _disk_fdsets(disk)
            plan.extra += fd_args
            if self.user:
                plan.extra += ["-runas", self.user]
                plan.sandbox = SANDBOX_RUNAS
            self.empty.mkdir(mode=0o555, parents=True, exist_ok=True)
            plan.extra += ["-chroot", str(self.empty)]
        except OSError as e:  # never fail a create for confinement: run it unconfined, say so
            log.warning("capsule %s: VMM user and chroot not applied: %s", key, e)
            plan.close()
            plan = Plan()
        if self.cgroup:
            try:
                procs = self._make_cgroup(key, vcpus, memory_mb)
                # Join the cgroup before exec: QEMU's first allocation is already accounted.
                plan.prefix = ["/bin/sh", "-c", _JOIN, "wrenn-join", *map(str, procs), "--"]
            except OSError as e:
                log.warning("capsule %s: VMM cgroup not applied: %s", key, e)
        return plan

    def cgroup_dirs(self, key: str) -> list[Path]:
        if self.cgroup == "v2":
            return [CG_ROOT / f"wrenn-{self.tag}" / key]
        if self.cgroup == "v1":
            return [CG_ROOT / c / "wrenn" / self.tag / key for c in V1_CONTROLLERS]
        return []

    def _make_cgroup(self, key: str, vcpus: int, memory_mb: int) -> list[Path]:
        mem = (memory_mb + MEMORY_OVERHEAD_MB) * 1024 * 1024
        quota = vcpus * CPU_PERIOD_US
        dirs = self.cgroup_dirs(key)
        if self.cgroup == "v2":
            parent = dirs[0].parent
            parent.mkdir(exist_ok=True)
            _write(CG_ROOT / "cgroup.subtree_control", "+memory +cpu +pids")
            _write(parent / "cgroup.subtree_control", "+memory +cpu +pids")
            dirs[0].mkdir(exist_ok=True)
            _write(dirs[0] / "memory.max", str(mem))
            _write(dirs[0] / "memory.swap.max", "0", missing_ok=True)
            _write(dirs[0] / "cpu.max", f"{quota} {CPU_PERIOD_US}")
            _write(dirs[0] / "pids.max", str(PIDS_MAX))
        else:
            for d in dirs:
                d.mkdir(parents=True, exist_ok=True)
            mem_d, cpu_d, pids_d = dirs
            _write(mem_d / "memory.limit_in_bytes", str(mem))
            _write(cpu_d / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(cpu_d / "cpu.cfs_quota_us", str(quota))
            _write(pids_d / "pids.max", str(PIDS_MAX))
        return [d / "cgroup.procs" for d in dirs]

    def move(self, old: str, new: str, vcpus: int, memory_mb: int) -> None:
        """A spare VM became capsule `new`: its QEMU moves to a cgroup of that name (same limits)."""
        if not self.cgroup or old == new:
            return
        try:
            procs = self._make_cgroup(new, vcpus, memory_mb)
            for old_dir, new_procs in zip(self.cgroup_dirs(old), procs):
                for pid in (old_dir / "cgroup.procs").read_text().split():
                    _write(new_procs, pid)
        except OSError as e:
            log.warning("capsule %s: VMM cgroup not moved from %s: %s", new, old, e)
            return
        self.release(old)

    # ------------------------------------------------------------------ clean-up

    def release(self, key: str) -> None:
        """The capsule is gone: its cgroups go (empty once QEMU has been reaped)."""
        for d in self.cgroup_dirs(key):
            with contextlib.suppress(FileNotFoundError, OSError):
                d.rmdir()

    def close(self) -> None:
        """The server stops: this data dir's cgroup parents go if no capsule is left in them."""
        for parent in self._parents():
            with contextlib.suppress(OSError):
                parent.rmdir()

    def _parents(self) -> list[Path]:
        if self.cgroup == "v2":
            return [CG_ROOT / f"wrenn-{self.tag}"]
        if self.cgroup == "v1":
            return [CG_ROOT / c / "wrenn" / self.tag for c in V1_CONTROLLERS]
        return []

    def reclaim(self, keep: set[str]) -> list[str]:
        """Start-up: remove the cgroups of capsules this host no longer has."""
        removed = []
        for parent in self._parents():
            with contextlib.suppress(FileNotFoundError):
                for d in parent.iterdir():
                    if d.is_dir() and d.name not in keep:
                        with contextlib.suppress(OSError):
                            d.rmdir()
                            removed.append(d.name)
        return sorted(set(removed))


_JOIN = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 126; shift; done; shift; exec "$@"'


def _write(path: Path, value: str, missing_ok: bool = False) -> None:
    try:
        path.write_text(value)
    except FileNotFoundError:
        if not missing_ok:
            raise


def _ensure_user(name: str, reasons: list[str]) -> str | None:
    try:
        pwd.getpwnam(name)
        return name
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd:
        proc = subprocess.run([useradd, "--system", "--no-create-home", "--home-dir", "/nonexistent",
                               "--shell", "/usr/sbin/nologin", name], capture_output=True, text=True)
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
        reasons.append(f"could not create user {name}: {proc.stderr.strip()}")
    else:
        reasons.append(f"no user {name} and no useradd")
    return None


def _detect_cgroup(reasons: list[str]) -> str | None:
    """v2 if the unified hierarchy at the root has the controllers, else v1 if its controllers are
    mounted and writable, else none."""
    ctl = CG_ROOT / "cgroup.controllers"
    if ctl.exists():
        have = set(ctl.read_text().split())
        if {"memory", "cpu", "pids"} <= have and os.access(CG_ROOT, os.W_OK):
            return "v2"
        reasons.append(f"cgroup v2 without memory/cpu/pids controllers ({' '.join(sorted(have))})")
        return None
    if all(os.access(CG_ROOT / c, os.W_OK) and (CG_ROOT / c / "cgroup.procs").exists() for c in V1_CONTROLLERS):
        return "v1"
    reasons.append("no writable cgroup memory/cpu/pids controllers")
    return None


# ---------------------------------------------------------------- disks as descriptors

def backing_of(path: Path) -> tuple[Path, str] | None:
    """(backing file, its format) recorded in a qcow2 header, or None (raw, or no backing)."""
    with open(path, "rb") as f:
        head = f.read(4096)
        if head[:4] != b"QFI\xfb":
            return None
        version, off, size = struct.unpack(">IQI", head[4:20])
        if not off:
            return None
        f.seek(off)
        name = f.read(size).decode()
        fmt = None
        # Header extensions (v3: after the 104-byte header or its header_length; v2: after 72).
        pos = struct.unpack(">I", head[100:104])[0] if version >= 3 else 72
        while pos + 8 <= len(head):
            ext, length = struct.unpack(">II", head[pos:pos + 8])
            if ext == 0:
                break
            if ext == 0xE2792ACA:  # backing file format name
                fmt = head[pos + 8:pos + 8 + length].decode()
            pos += 8 + (length + 7) // 8 * 8
    backing = Path(name) if os.path.isabs(name) else path.parent / name
    return backing, fmt or ("qcow2" if _is_qcow2(backing) else "raw")


def _is_qcow2(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"QFI\xfb"


def _disk_fdsets(disk: Path) -> tuple[str, list[int], list[str]]:
    """The root -drive over descriptor sets: the capsule's overlay read-write (and read-only, for
    QEMU's re-opens), every backing file read-only."""
    fds: list[int] = []
    args: list[str] = []

    def add(fd_set: int, path: Path, flags: int) -> None:
        fd = os.open(path, flags | os.O_CLOEXEC)
        fds.append(fd)
        args.extend(["-add-fd", f"fd={fd},set={fd_set}"])

    try:
        add(1, disk, os.O_RDWR)
        add(1, disk, os.O_RDONLY)
        drive = "id=root,if=none,cache=unsafe,discard=unmap,format=qcow2,file=/dev/fdset/1"
        node, prefix, fd_set = disk, "", 1
        while (b := backing_of(node)) is not None:
            node, fmt = b
            fd_set += 1
            prefix += "backing."
            add(fd_set, node, os.O_RDONLY)
            drive += f",{prefix}driver={fmt},{prefix}file.filename=/dev/fdset/{fd_set}"
            if fmt != "qcow2":
                break
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return drive, fds, args
