"""A capsule's serial console, capped: QEMU writes it to a unix socket, the host agent keeps the
last bytes in `serial.log` and, once that reaches the cap, rotates it to `serial.log.1`.

QEMU's `-serial file:` cannot cap. With a socket, a guest flooding its console is slowed by
the UART's own flow control when the host reads slower than it writes, and while no host is
connected (the server restarting) QEMU drops the output instead of queueing it: on disk there
are never more than two files of at most the cap each. What the guest writes while the server
is down is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from pathlib import Path

log = logging.getLogger(__name__)

MAX_BYTES = int(os.environ.get("WRENN_SERIAL_LOG_MAX_BYTES", str(1 << 20)))
READ_SIZE = 64 << 10
# QEMU's UART writes the socket a byte at a time, and a unix socket holds only a few hundred of
# those one-byte writes before the writer must wait. Reading each as it comes costs the server a
# wake-up per byte (measured: 0.4 s of CPU per second of flood). Reading every BATCH_S instead
# costs almost nothing and throttles a flooding guest at its UART (~25 kB/s), which costs QEMU
# ten times less CPU than the flood did; ordinary console output is far below that rate.
BATCH_S = 0.01


class SerialLog:
    def __init__(self, sock: Path, path: Path, max_bytes: int = MAX_BYTES):
        self.sock = sock
        self.path = path
        self.max_bytes = max(max_bytes, READ_SIZE)
        self._task: asyncio.Task | None = None
        self._conn: socket.socket | None = None

    async def start(self, timeout: float = 0.5) -> None:
        """Connect to QEMU's serial socket and copy from it. QEMU made the socket before it
        answered QMP, so it is there by now (a QEMU from an older version has none: no log)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, str(self.sock))
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                sock.close()
                if isinstance(e, FileNotFoundError) or loop.time() > deadline:
                    log.warning("serial console %s not reachable: %s", self.sock, e)
                    return
                await asyncio.sleep(0.01)
        self._conn = sock
        self._task = loop.create_task(self._copy(sock), name=f"serial {self.path.parent.name}")

    async def _copy(self, sock: socket.socket) -> None:
        # Plain socket reads, not a stream transport: a transport would wake up for every few
        # bytes QEMU writes even while we wait; sock_recv reads what has gathered, once.
        loop = asyncio.get_running_loop()
        f = self._open()
        try:
            size = os.fstat(f.fileno()).st_size
            while data := await loop.sock_recv(sock, READ_SIZE):
                if size + len(data) > self.max_bytes:
                    f.close()
                    os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                    f, size = self._open(), 0
                f.write(data)
                size += len(data)
                await asyncio.sleep(BATCH_S)
        except (OSError, ConnectionError) as e:
            log.info("serial console %s: %s", self.path, e)
        finally:
            f.close()

    def _open(self):
        return os.fdopen(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab", buffering=0)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
