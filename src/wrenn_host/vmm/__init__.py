"""VMM drivers. The host agent needs only this narrow surface from one, so a Firecracker driver
(snapshot/load over its API socket) can sit beside the QEMU one (`qemu.QemuMachine`):

    machine = Driver(spec, files)        # records paths and shape; starts nothing
    await machine.boot()                 # cold boot (template builds only)
    await machine.restore(state, before_cont=...)  # start from saved device state + memory file
    await machine.save(state)            # pause to files; the process is gone afterwards
    await machine.kill()                 # forced stop; safe twice
    machine.is_alive(); machine.pid; Driver.adopt(spec, files)  # find one left by a restart
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol


class Machine(Protocol):
    pid: int | None

    async def boot(self) -> None: ...

    async def restore(self, state: Path, timeout: float = 30.0,
                      before_cont: Callable[[], Awaitable[None]] | None = None) -> None: ...

    async def save(self, state: Path, timeout: float = 60.0) -> None: ...

    async def kill(self) -> None: ...

    def is_alive(self) -> bool: ...
