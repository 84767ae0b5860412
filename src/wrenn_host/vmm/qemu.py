"""QEMU `microvm` driver: cold boot, restore from files, pause to files, stop.

`QemuDriver` implements `wrenn_host.vmm.VmmDriver` and `QemuMachine` its `Machine` (boot /
restore / save / kill); nothing outside this module knows QEMU's command line or QMP. Guest memory is always a file (`memory-backend-file,share=on`): pausing writes only the
device state (~60 KB) because the memory is already on disk, and restoring maps the same file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from qemu.qmp import EventListener, QMPClient

from wrenn_host.api import VMMError
from wrenn_host.durable import crashpoint, publish_state, state_problem, state_tmp
from wrenn_host.jail import Plan
from wrenn_host.network.slots import GUEST_MAC
from wrenn_host.vmm import MachineFiles, MachineSpec  # noqa: F401  (re-exported: older imports)

log = logging.getLogger(__name__)

AGENT_PORT = "wrenn.agent"
TCG_TB_SIZE_MB = 0  # 0: QEMU's default (see _accel_option)


def qemu_version() -> str:
    import subprocess

    out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout
    return out.split("\n", 1)[0].removeprefix("QEMU emulator version ").split(" ")[0]


def _accel_option(accel: str) -> str:
    """TCG's translation buffer is QEMU's own memory, grown as guest code is translated (1 GiB
    virtual by default): bounded, an idle capsule's QEMU stays small. Not part of the device
    state, so it can change between a save and a restore."""
    tb_mb = int(os.environ.get("WRENN_TCG_TB_SIZE_MB") or TCG_TB_SIZE_MB)
    return f"tcg,tb-size={tb_mb}" if accel == "tcg" and tb_mb > 0 else accel


def build_argv(spec: MachineSpec, files: MachineFiles, *, incoming: bool, tap_fd: int | None = None) -> list[str]:
    mem = f"{spec.memory_mb}M"
    argv = [
        "qemu-system-x86_64",
        "-M", "microvm,acpi=on,pit=off,pic=off,rtc=on,isa-serial=on",
        "-accel", _accel_option(spec.accel),
        "-cpu", "host" if spec.accel == "kvm" else "max",
        "-smp", str(spec.vcpus),
        "-m", mem,
        "-object", f"memory-backend-file,id=mem,size={mem},mem-path={files.memory},share=on",
        "-machine", "memory-backend=mem",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", str(spec.kernel), "-initrd", str(spec.initrd), "-append", spec.cmdline,
        *(["-serial", f"file:{files.serial_log}"] if files.serial_sock is None else
          ["-chardev", f"socket,id=serial0,path={files.serial_sock},server=on,wait=off", "-serial", "chardev:serial0"]),
        "-drive", f"id=root,file={files.disk},format=qcow2,if=none,cache=unsafe,discard=unmap",
        "-device", "virtio-blk-device,drive=root",
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=agent,path={files.agent},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent,name={AGENT_PORT}",
        "-device", "virtio-rng-device",
        *(_nic_args(tap_fd) if spec.nic else []),
        "-qmp", f"unix:{files.qmp},server=on,wait=off",
        "-pidfile", str(files.pidfile),
        # The guest runs untrusted code: confine QEMU with its seccomp filter (no spawning, no
        # set*uid, no obsolete or scheduler/affinity syscalls). jail.py adds the rest (user,
        # chroot, cgroup, disks as descriptors) and relaxes set*uid for QEMU's own -runas.
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ]
    if spec.nic and tap_fd is None:
        raise VMMError("this machine has a NIC: it needs the tap of a network slot")
    if incoming:
        # x-ignore-shared cannot be set on the command line in 7.2: defer, then set it over QMP.
        argv += ["-incoming", "defer"]
    return argv


def _nic_args(tap_fd: int | None) -> list[str]:
    """The guest's NIC: the same MAC in every capsule, backed by its network slot's tap."""
    return ["-netdev", f"tap,id=net0,fd={tap_fd}",
            "-device", f"virtio-net-device,netdev=net0,mac={GUEST_MAC}"]


# Migration state changes come as MIGRATION events (the `events` capability), so a restore or a
# pause is noticed the moment it ends instead of by polling QEMU every few ms (a poll is a QMP
# round trip; ten restores at once spent their CPU on it).
_MIGRATE_CAPS = [{"capability": "x-ignore-shared", "state": True}, {"capability": "events", "state": True}]
_SAFETY_POLL_S = 0.05


async def _until(done: Callable[[], Awaitable[bool]], events: EventListener, timeout: float, what: str) -> None:
    """Until `done()` (QEMU's own answer, the authority): asked again at each event, and every
    `_SAFETY_POLL_S` in case an event came before the listener did."""
    deadline = time.monotonic() + timeout
    while not await done():
        if time.monotonic() > deadline:
            raise VMMError(f"{what} timed out")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(events.get(), _SAFETY_POLL_S)


class _QMP(QMPClient):
    """qemu.qmp formats every message for its debug log (`str(msg)`, a json.dumps) even when
    nothing logs at debug level; skip that unless something does."""

    def _cb_outbound(self, msg):  # type: ignore[no-untyped-def]
        return super()._cb_outbound(msg) if self.logger.isEnabledFor(logging.DEBUG) else msg

    def _cb_inbound(self, msg):  # type: ignore[no-untyped-def]
        return super()._cb_inbound(msg) if self.logger.isEnabledFor(logging.DEBUG) else msg


class QemuMachine:
    """One QEMU process. `__init__` records; boot()/restore() spawn; save()/kill() end it.

    `tap_fd` (machines with a NIC): an open tap descriptor QEMU inherits at spawn; the machine
    closes its own copy once QEMU has it."""

    def __init__(self, spec: MachineSpec, files: MachineFiles, pid: int | None = None,
                 tap_fd: int | None = None):
        self.spec = spec
        self.files = files
        self.pid = pid
        self.tap_fd = tap_fd
        self._proc: asyncio.subprocess.Process | None = None
        self.nice = 0  # > 0: start QEMU at a lower CPU priority (spare VMs, see set_nice)
        # Set by the host agent: returns the confinement of the next spawn (wrenn_host/jail.py).
        self.confine: Callable[[], Plan] | None = None

    # -------------------------------------------------------------- start

    async def _spawn(self, *, incoming: bool) -> None:
        for sock in (self.files.qmp, self.files.agent, self.files.serial_sock):
            if sock is not None:
                sock.unlink(missing_ok=True)
        argv = build_argv(self.spec, self.files, incoming=incoming, tap_fd=self.tap_fd)
        # QEMU creates the serial log with its umask: make it (and ours) the platform's own first.
        os.close(os.open(self.files.serial_log, os.O_WRONLY | os.O_CREAT, 0o600))
        plan = self.confine() if self.confine is not None else Plan()
        argv = plan.apply(argv)
        logf = os.fdopen(os.open(self.files.qemu_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
        try:
            # Own session: QEMU must outlive a restart of the server (capsules keep running).
            if self.nice:  # `nice` execs QEMU in its place: same pid, QEMU's command line
                argv = ["nice", "-n", str(self.nice), *argv]
            self._proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True,
                pass_fds=(*plan.pass_fds, *(() if self.tap_fd is None else (self.tap_fd,))),
            )
        finally:
            logf.close()
            plan.close()
            self.close_tap()
        self.pid = self._proc.pid

    async def _qmp(self, timeout: float = 10.0) -> QMPClient:
        qmp = _QMP(f"qemu-{self.pid}")
        deadline = time.monotonic() + timeout
        while True:
            if not self.is_alive():
                raise VMMError(f"QEMU exited during start: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise VMMError(f"QMP did not come up: {self.log_tail()}")
            if not self.files.qmp.exists():  # not listening yet; connecting now only logs errors
                await asyncio.sleep(0.002)
                continue
            try:
                await qmp.connect(str(self.files.qmp))
                return qmp
            except Exception:  # the socket exists but QEMU is not accepting yet
                await asyncio.sleep(0.003)

    async def boot(self) -> None:
        """Cold boot (used only to build template snapshots)."""
        await self._spawn(incoming=False)
        qmp = await self._qmp()
        await qmp.disconnect()

    async def restore(self, state: Path, timeout: float = 30.0,
                      before_cont: Callable[[], Awaitable[None]] | None = None, steps: str = "resume") -> None:
        """Start QEMU and load device state from `state`; guest RAM comes from the memory file.

        `before_cont` runs once the device state is loaded and before the vCPUs start: connecting
        the guest agent channel there means the guest never sees its host side disconnected."""
        await crashpoint(f"{steps}.begin")
        await self._spawn(incoming=True)
        await crashpoint(f"{steps}.spawned")
        qmp = await self._qmp()
        try:
            await crashpoint(f"{steps}.qmp")
            await qmp.execute("migrate-set-capabilities", {"capabilities": _MIGRATE_CAPS})
            # Handed over as a file descriptor: the sandboxed QEMU may not spawn `cat`.
            await _pass_fd(qmp, os.open(state, os.O_RDONLY), "wrenn-state-in")
            with qmp.listener("MIGRATION") as migration:
                await qmp.execute("migrate-incoming", {"uri": "fd:wrenn-state-in"})
                await crashpoint(f"{steps}.incoming")

                async def loaded() -> bool:
                    return (await qmp.execute("query-status"))["status"] != "inmigrate"
                await _until(loaded, migration, timeout, "restore")
            status = (await qmp.execute("query-status"))["status"]
            if status not in ("paused", "postmigrate", "prelaunch", "running"):
                raise VMMError(f"restore failed (status {status}): {self.log_tail()}")
            await crashpoint(f"{steps}.loaded")
            if before_cont is not None:
                await before_cont()
            await crashpoint(f"{steps}.agent-connected")
            await qmp.execute("cont")
            await crashpoint(f"{steps}.cont")
        except VMMError:
            raise
        except Exception as e:
            raise VMMError(f"restore failed: {e}: {self.log_tail()}") from e
        finally:
            with contextlib.suppress(Exception):
                await qmp.disconnect()

    # -------------------------------------------------------------- stop

    async def save(self, state: Path, timeout: float = 60.0, steps: str = "pause") -> None:
        """Pause: stop vCPUs, write device state to `state.tmp`, quit, make memory and state
        durable, publish `state`. Memory is already in the memory file (shared mapping), so only
        ~60 KB are written here. Every step is one a restart can pick up from (recover.py)."""
        tmp = state_tmp(state)
        qmp = await self._qmp()
        try:
            await crashpoint(f"{steps}.connected")
            await qmp.execute("stop")
            await crashpoint(f"{steps}.stopped")
            await self._migrate_out(qmp, tmp, timeout, steps)
            with contextlib.suppress(Exception):
                await qmp.execute("quit")
            await crashpoint(f"{steps}.quit")
        except VMMError:
            # Leave the VM stopped but alive: the caller decides (resume it with cont, or kill).
            # A half-written state must never be taken for a pause once the guest runs on.
            tmp.unlink(missing_ok=True)
            with contextlib.suppress(Exception):
                await qmp.execute("cont")
            raise
        finally:
            with contextlib.suppress(Exception):
                await qmp.disconnect()
        await self._wait_exit(5.0)
        await crashpoint(f"{steps}.exited")
        await publish_state(self.files, tmp, state, steps)

    async def _migrate_out(self, qmp: QMPClient, tmp: Path, timeout: float, steps: str = "pause") -> None:
        await qmp.execute("migrate-set-capabilities", {"capabilities": _MIGRATE_CAPS})
        await _pass_fd(qmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wrenn-state-out")
        with qmp.listener("MIGRATION") as migration:
            await qmp.execute("migrate", {"uri": "fd:wrenn-state-out"})
            await crashpoint(f"{steps}.migrating")

            async def ended() -> bool:
                info = await qmp.execute("query-migrate")
                if info.get("status") in ("failed", "cancelled"):
                    raise VMMError(f"pause failed: {info.get('error-desc', info)}")
                return bool(info.get("status") == "completed")
            await _until(ended, migration, timeout, "pause")
        await crashpoint(f"{steps}.migrated")

    async def finish_pause(self, state: Path, timeout: float = 10.0) -> None:
        """After a restart: complete a pause this machine was in the middle of (vCPUs stopped,
        state being or already written). Ends like save(): QEMU gone, `state` published."""
        tmp = state_tmp(state)
        qmp = await self._qmp(timeout=2.0)
        try:
            deadline = time.monotonic() + timeout
            while (status := await self._status(qmp)) == "finish-migrate":  # QEMU writes on alone
                if time.monotonic() > deadline:
                    raise VMMError("pause did not finish")
                await asyncio.sleep(0.005)
            problem = state_problem(tmp)
            if status == "postmigrate" and problem is not None:
                await qmp.execute("cont")  # QEMU refuses a second migration until it ran again
            if status != "postmigrate" or problem is not None:
                await qmp.execute("stop")
                await self._migrate_out(qmp, tmp, timeout, "recover")
            with contextlib.suppress(Exception):
                await qmp.execute("quit")
        finally:
            with contextlib.suppress(Exception):
                await qmp.disconnect()
        await self._wait_exit(5.0)
        await publish_state(self.files, tmp, state)

    async def status(self, timeout: float = 2.0) -> str:
        """QEMU's run state ("running", "paused", "inmigrate", "postmigrate", ...)."""
        qmp = await self._qmp(timeout=timeout)
        try:
            return await self._status(qmp)
        finally:
            with contextlib.suppress(Exception):
                await qmp.disconnect()

    @staticmethod
    async def _status(qmp: QMPClient) -> str:
        return str((await qmp.execute("query-status"))["status"])

    def close_tap(self) -> None:
        """Our copy of the tap descriptor (QEMU holds its own once spawned)."""
        if self.tap_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.tap_fd)
            self.tap_fd = None

    async def kill(self) -> None:
        """Forced stop; safe to call twice or on a dead machine."""
        self.close_tap()
        if self.pid is None:
            return
        if self.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        await self._wait_exit(5.0)

    async def _wait_exit(self, timeout: float) -> None:
        if self._proc is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._proc.wait(), timeout)
        else:  # adopted after a restart: not our child, poll
            deadline = time.monotonic() + timeout
            while self.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        if self.is_alive():
            raise VMMError(f"QEMU pid {self.pid} did not exit")
        with contextlib.suppress(FileNotFoundError):
            self.files.pidfile.unlink()

    # -------------------------------------------------------------- inspection

    def is_alive(self) -> bool:
        if self.pid is None:
            return False
        if self._proc is not None and self._proc.returncode is not None:
            return False
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().split(") ", 1)[1][0] != "Z"
        except (FileNotFoundError, IndexError):
            return False

    @classmethod
    def adopt(cls, spec: MachineSpec | None, files: MachineFiles) -> QemuMachine | None:
        """Find a QEMU left running by an earlier server process (by pidfile + memory file).
        Without `spec` it is good only for kill()."""
        try:
            pid = int(files.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        if not uses_file(pid, files.memory):
            return None
        machine = cls(spec, files, pid=pid)
        return machine if machine.is_alive() else None

    def set_nice(self, value: int) -> None:
        """CPU priority of every QEMU thread (Linux nice values are per thread)."""
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{self.pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    os.setpriority(os.PRIO_PROCESS, int(task.name), value)
        self.nice = value

    def moved(self, files: MachineFiles) -> QemuMachine:
        """The same process after its directories were renamed (a spare VM handed to a capsule):
        QEMU keeps its open files and listening sockets, only our paths to them change."""
        other = QemuMachine(self.spec, files, pid=self.pid)
        other._proc, other.nice = self._proc, self.nice
        return other

    def rss_bytes(self) -> int:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def log_tail(self, n: int = 1500) -> str:
        parts = []
        for f in (self.files.qemu_log, self.files.serial_log):
            with contextlib.suppress(OSError):
                parts.append(f.read_bytes()[-n:].decode(errors="replace").strip())
        return " | ".join(p for p in parts if p) or "(no output)"


class QemuDriver:
    """The `qemu` VMM driver (wrenn_host.vmm.VmmDriver)."""

    name = "qemu"

    def version(self) -> str:
        return qemu_version()

    def machine(self, spec: MachineSpec, files: MachineFiles) -> QemuMachine:
        return QemuMachine(spec, files)

    def adopt(self, spec: MachineSpec | None, files: MachineFiles) -> QemuMachine | None:
        return QemuMachine.adopt(spec, files)


def uses_file(pid: int, path: Path) -> bool:
    """Whether QEMU process `pid` runs with `path` as its memory file: named on its command line,
    or mapped under that name now (a renamed spare's command line has its old name)."""
    name = str(path).encode()
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if not cmdline.startswith(b"qemu-system"):
            return False
        if name in cmdline:
            return True
        with open(f"/proc/{pid}/maps", "rb") as f:
            return any(line.rstrip().endswith(b" " + name) for line in f)
    except OSError:
        return False


async def _pass_fd(qmp: QMPClient, fd: int, name: str) -> None:
    """Give QEMU an open file under `name` (SCM_RIGHTS over the QMP socket); ours is closed."""
    try:
        _send_fd_scm(qmp, fd)
        await qmp.execute("getfd", {"fdname": name})
    finally:
        os.close(fd)


def _send_fd_scm(qmp: QMPClient, fd: int) -> None:
    """`QMPClient.send_fd_scm` without its reach into `socket._sock`, which uvloop's transports
    (what `wrenn server` runs on) lack: sendmsg on a duplicate of the QMP socket's descriptor.
    Nothing else is written meanwhile: QMP commands are sent one at a time, awaited."""
    import socket
    import struct

    sock = qmp._writer.transport.get_extra_info("socket")  # type: ignore[union-attr]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=os.dup(sock.fileno())) as dup:
        dup.sendmsg([b" "], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("@i", fd))])
