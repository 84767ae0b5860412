"""What the guest images are made of. Changing a recipe changes its key, so the next build redoes it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

GUEST_FILES = Path(__file__).parent / "guest_files"
GUEST_AGENT_SRC = Path(__file__).parent.parent / "wrenn_guest"


@dataclasses.dataclass(frozen=True)
class KernelRecipe:
    package: str = "linux-image-cloud-amd64"
    # Loaded by the initramfs in this order (dependencies first). ext4 is built into the kernel.
    modules: tuple[str, ...] = (
        "drivers/virtio/virtio_ring",
        "drivers/virtio/virtio",
        "drivers/virtio/virtio_mmio",
        "drivers/block/virtio_blk",
        "drivers/char/virtio_console",
        "drivers/char/hw_random/virtio-rng",
        "drivers/virtio/virtio_balloon",
        "net/core/failover",
        "drivers/net/net_failover",
        "drivers/net/virtio_net",
    )

    def key(self) -> str:
        return digest(dataclasses.asdict(self), files=[GUEST_FILES / "initramfs-init"])


@dataclasses.dataclass(frozen=True)
class RootfsRecipe:
    name: str
    packages: tuple[str, ...]
    suite: str = "bookworm"
    disk_size_mb: int = 4096  # what the guest sees; the image file is sparse

    def tree_key(self) -> str:
        return digest({"packages": sorted(self.packages), "suite": self.suite})

    def image_key(self) -> str:
        agent_files = sorted(p for p in GUEST_AGENT_SRC.rglob("*.py"))
        return digest(
            {"tree": self.tree_key(), "disk": self.disk_size_mb},
            files=[GUEST_FILES / "wrenn-init", *agent_files, *extra_ca_certificates()],
        )


def extra_ca_certificates() -> list[Path]:
    """CA certificates the host added to its trust store (a corporate or egress proxy's CA):
    guests trust them too, so TLS from a capsule works wherever it works from the host.
    `WRENN_GUEST_CA_DIR` chooses another directory; an empty value adds none."""
    d = os.environ.get("WRENN_GUEST_CA_DIR", "/usr/local/share/ca-certificates")
    return sorted(Path(d).rglob("*.crt")) if d and Path(d).is_dir() else []


_MINIMAL = (
    "python3",  # the guest agent needs json, which python3-minimal lacks
    "tini",
    "procps",
    "iproute2",
    "ca-certificates",
    "xxd",
    "less",
    "curl",
    "git",  # capsule.git runs the git binary inside the capsule
)

TEMPLATES: dict[str, RootfsRecipe] = {
    "minimal": RootfsRecipe("minimal", _MINIMAL),
    "base-python": RootfsRecipe("base-python", _MINIMAL + ("python3-pip", "python3-venv", "python3-dev")),
}
KERNEL = KernelRecipe()


def digest(obj: object, files: list[Path] = ()) -> str:
    h = hashlib.sha256(json.dumps(obj, sort_keys=True).encode())
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]
