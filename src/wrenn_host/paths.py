"""Every file name the host agent uses, derived from an id in one place.

The start-up reconciler (`reclaim.py`) lists the same directories, so nothing a capsule owns can
exist under a name this module does not know.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from wrenn_host.perms import make_private_dir
from wrenn_host.vmm import MachineFiles

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_id(value: str) -> str:
    """Ids become file names: refuse anything that could escape the directory."""
    if not _ID.match(value) or value in (".", ".."):
        raise ValueError(f"invalid id {value!r}")
    return value


class HostPaths:
    def __init__(self, data_dir: Path):
        self.root = data_dir.resolve()
        self.capsules = self.root / "capsules"
        self.templates = self.root / "templates"
        self.spare = self.root / "spare"  # pre-copied template memory files, ready for a create
        # Spare VMs open their disk through a symlink named after the spare, re-pointed when the
        # spare becomes a capsule: QEMU re-opens its disk by name at the end of a pause.
        self.links = self.root / "links"
        self.quarantine = self.root / "quarantine"  # capsules whose files made no sense at start-up
        # Unix socket paths are limited to 107 bytes: keep sockets under a short run directory,
        # one per data directory so two servers on one host never collide.
        tag = hashlib.sha256(str(self.root).encode()).hexdigest()[:10]
        self.tag = tag  # names this server's sockets, network slots and firewall table
        base = Path("/run") if os.access("/run", os.W_OK) else Path("/tmp")
        self.run = base / "wrenn" / tag
        make_private_dir(self.root)
        make_private_dir(self.run.parent)
        for d in (self.capsules, self.templates, self.spare, self.links, self.run):
            make_private_dir(d)

    # capsules
    def capsule_dir(self, capsule_id: str) -> Path:
        return self.capsules / check_id(capsule_id)

    def capsule_run_dir(self, capsule_id: str) -> Path:
        return self.run / check_id(capsule_id)

    def capsule_meta(self, capsule_id: str) -> Path:
        return self.capsule_dir(capsule_id) / "meta.json"

    def capsule_state(self, capsule_id: str) -> Path:
        """Present exactly while the capsule is paused: device state of a complete pause."""
        return self.capsule_dir(capsule_id) / "state"

    def machine_files(self, capsule_id: str) -> MachineFiles:
        d, r = self.capsule_dir(capsule_id), self.capsule_run_dir(capsule_id)
        return MachineFiles(
            disk=d / "disk.qcow2",
            memory=d / "memory",
            qmp=r / "qmp.sock",
            agent=r / "agent.sock",
            serial_log=d / "serial.log",
            qemu_log=d / "qemu.log",
            pidfile=d / "qemu.pid",
            serial_sock=r / "serial.sock",
        )

    def disk_link(self, spare_id: str) -> Path:
        return self.links / f"{check_id(spare_id)}.qcow2"

    def spare_memory(self, template_dir: Path, n: int) -> Path:
        key = hashlib.sha256(str(template_dir).encode()).hexdigest()[:16]
        return self.spare / f"{key}-{n}"

    # templates made from capsules
    def template_dir(self, template_id: str) -> Path:
        return self.templates / check_id(template_id)
