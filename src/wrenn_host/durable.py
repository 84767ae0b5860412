"""Crash consistency helpers: durable writes, a check that a saved device state is whole, and
named crash points for tests.

A pause publishes its result by renaming `state.tmp` to `state` only after the memory file and
the state are on disk; start-up (`recover.py`) reads what is on disk and what is alive and never
has to guess from timing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import struct
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wrenn_host.vmm import MachineFiles

log = logging.getLogger(__name__)

# QEMU's migration stream (7.2 savevm.c): "QEVM" magic, version 3, sections, QEMU_VM_EOF (0x00),
# then, unless the machine suppresses it, QEMU_VM_VMDESCRIPTION (0x06) + be32 length + JSON.
_MAGIC = b"QEVM"
_EOF = 0x00
_VMDESC = 0x06

# Test-only hooks: `WRENN_CRASH_AT=<step>` SIGKILLs the process when it reaches that step,
# `WRENN_HANG_AT=<step>` parks the operation there forever (the test then kills the server).
# The step names are the real points of `QemuMachine.save/restore` and `LocalHostAgent.resume`.
PAUSE_STEPS = ("pause.connected", "pause.stopped", "pause.migrating", "pause.migrated", "pause.quit",
               "pause.exited", "pause.memory-synced", "pause.state-synced", "pause.renamed", "pause.dir-synced")
RESUME_STEPS = ("resume.begin", "resume.spawned", "resume.qmp", "resume.incoming", "resume.loaded",
                "resume.agent-connected", "resume.cont", "resume.identity", "resume.state-unlinked",
                "resume.dir-synced")


async def crashpoint(step: str) -> None:
    if os.environ.get("WRENN_CRASH_AT") == step:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("WRENN_HANG_AT") == step:
        log.warning("test hook: hanging at %s", step)
        await asyncio.Event().wait()


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to `path` atomically: temp file, fsync, rename, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, mode)  # a temp file left by a crash keeps the mode it was made with
        f.write(data)  # (all of it: os.write may write less)
        f.flush()
        os.fsync(fd)
    tmp.rename(path)
    fsync_dir(path.parent)


def state_problem(path: Path) -> str | None:
    """None if `path` holds a whole saved device state, else why not (missing, cut short...).

    A save is written front to back by QEMU and ends with the machine description whose length
    is recorded just before it: a file that ends exactly there was written to the end."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - (1 << 20)))
            tail = f.read()
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable: {e}"
    if len(head) < 8 or head[:4] != _MAGIC:
        return f"not a QEMU device state ({size} bytes)"
    # The description is a JSON object: find the EOF + VMDESC marker whose length reaches the end.
    i = len(tail)
    while True:
        i = tail.rfind(bytes([_EOF, _VMDESC]), 0, i)
        if i < 0:
            break
        if i + 6 <= len(tail):
            (n,) = struct.unpack(">I", tail[i + 2:i + 6])
            if i + 6 + n == len(tail) and tail[i + 6:i + 7] == b"{" and tail.endswith(b"}"):
                return None
    return f"cut short ({size} bytes, no end marker)"


def state_tmp(state: Path) -> Path:
    return state.with_name(state.name + ".tmp")


async def publish_state(files: MachineFiles, tmp: Path, state: Path, steps: str = "recover") -> None:
    """The memory file is written through the shared mapping, the disk through QEMU's
    cache=unsafe (no flushes while running), and QEMU is gone: make both and the device state
    durable, then publish `state` (its presence means "a complete pause")."""
    await asyncio.to_thread(fsync_file, files.memory)
    await asyncio.to_thread(fsync_file, files.disk)
    await crashpoint(f"{steps}.memory-synced")
    fsync_file(tmp)
    await crashpoint(f"{steps}.state-synced")
    tmp.rename(state)
    await crashpoint(f"{steps}.renamed")
    fsync_dir(state.parent)
    await crashpoint(f"{steps}.dir-synced")
