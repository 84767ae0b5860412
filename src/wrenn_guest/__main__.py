"""Entry point: `python3 -m wrenn_guest [--device PATH | --fd N]`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from . import commands, defaults, files, processes, system, terminals, tunnels
from .server import Server, fd_channel

DEFAULT_DEVICE = "/dev/virtio-ports/wrenn.agent"
log = logging.getLogger("wrenn_guest")


def handlers(table: processes.Table, ttys: terminals.Terminals | None = None) -> dict:
    ttys = ttys or terminals.Terminals()
    return {
        "ping": system.ping,
        "identity": system.identity,
        "metrics": system.metrics,
        "defaults": defaults.set_defaults,
        "get_defaults": defaults.get_defaults,
        "exec": commands.exec_,
        "spawn": table.spawn,
        "ps": table.ps,
        "kill": table.kill,
        "attach": table.attach,
        "pty_start": ttys.start,
        "pty_list": ttys.list,
        "pty_attach": ttys.attach,
        "pty_input": ttys.input,
        "pty_resize": ttys.resize,
        "pty_kill": ttys.kill,
        "file_read": files.file_read,
        "file_write": files.file_write,
        "stat": files.stat_,
        "list": files.list_,
        "mkdir": files.mkdir,
        "remove": files.remove,
        "tcp_connect": tunnels.tcp_connect,
    }


def open_device(path: str) -> int:
    """Open the virtio port, waiting for it to appear (the init script names ports at boot)."""
    while True:
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="wrenn_guest", description="Wrenn guest agent")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--device", default=DEFAULT_DEVICE, help="virtio-serial port (default %(default)s)")
    where.add_argument("--fd", type=int, help="serve an already open socket; exit at EOF (tests)")
    args = ap.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="wrenn-guest: %(levelname)s %(message)s")

    system.prime_metrics()
    table = processes.Table()
    ttys = terminals.Terminals()
    fd = args.fd if args.fd is not None else open_device(args.device)
    server = Server(handlers(table, ttys), *fd_channel(fd))
    log.info("serving on %s", f"fd {fd}" if args.fd is not None else args.device)
    try:
        # A virtio port reads EOF whenever the host side is not connected: keep serving.
        server.serve(retry_on_eof=args.fd is None)
    finally:
        table.shutdown()
        ttys.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
