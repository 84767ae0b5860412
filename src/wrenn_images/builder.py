"""Builds the guest kernel, initramfs and root filesystem images from Debian packages.

Everything lands in the cache directory under a key derived from its recipe; a finished artifact is
built in a temporary directory and renamed into place, so a crash never leaves half an image that
looks complete. A second build with the same recipe is a no-op.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from wrenn_images.recipes import (
    GUEST_AGENT_SRC,
    GUEST_FILES,
    KERNEL,
    TEMPLATES,
    KernelRecipe,
    RootfsRecipe,
    extra_ca_certificates,
)

# Any address routed out of the capsule's namespace works: the host redirects all DNS to its
# forwarder. A link-local one cannot be confused with a real server.
GUEST_NAMESERVER = "169.254.53.53"

Progress = Callable[[str], None]

# Kernel command line that boots fastest under TCG (measured): PVH entry, no legacy probing.
BASE_CMDLINE = "console=ttyS0 quiet reboot=t panic=-1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd"

# Trimmed from the root filesystem (apt-get update fetches the lists again when a capsule needs them).
_TRIM = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/locale")


class BuildError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class KernelImage:
    vmlinux: Path
    initrd: Path
    version: str
    key: str


@dataclasses.dataclass(frozen=True)
class RootfsImage:
    name: str
    path: Path  # raw ext4, read-only base for every capsule's overlay
    key: str
    disk_size_mb: int


def cache_dir() -> Path:
    return Path(os.environ.get("WRENN_CACHE_DIR") or Path.home() / ".cache" / "wrenn")


def _noop(_: str) -> None:
    pass


def run(cmd: list[str], *, cwd: Path | None = None, input: bytes | None = None) -> bytes:
    proc = subprocess.run(cmd, cwd=cwd, input=input, capture_output=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).decode(errors="replace")[-2000:]
        raise BuildError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}): {tail}")
    return proc.stdout


def debian_mirror() -> str:
    """The Debian mirror apt already uses on this host (the only place packages can come from)."""
    if os.environ.get("WRENN_DEBIAN_MIRROR"):
        return os.environ["WRENN_DEBIAN_MIRROR"]
    candidates = sorted(Path("/etc/apt/sources.list.d").glob("*.sources")) + [Path("/etc/apt/sources.list")]
    for f in candidates:
        if not f.exists():
            continue
        for m in re.finditer(r"(?:URIs:|deb)\s+(https?://\S+/debian)\s", f.read_text() + "\n"):
            return m.group(1)
    return "http://deb.debian.org/debian"


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished build into place atomically (a concurrent identical build may win)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- kernel


def kernel_dir(recipe: KernelRecipe = KERNEL) -> Path:
    return cache_dir() / "kernel" / recipe.key()


def build_kernel(recipe: KernelRecipe = KERNEL, *, force: bool = False, progress: Progress = _noop) -> KernelImage:
    final = kernel_dir(recipe)
    if force and final.exists():
        shutil.rmtree(final)
    if not final.exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=final.parent) as work:
            _build_kernel_into(recipe, Path(work), progress)
            _publish(Path(work) / "out", final)
    return KernelImage(final / "vmlinux", final / "initrd.img", (final / "version").read_text().strip(), recipe.key())


def _build_kernel_into(recipe: KernelRecipe, work: Path, progress: Progress) -> None:
    progress(f"kernel: downloading {recipe.package}")
    # The meta package depends on the versioned image package; download that one.
    depends = run(["apt-cache", "depends", recipe.package]).decode()
    m = re.search(r"Depends:\s+(linux-image-\S+)", depends)
    if not m:
        raise BuildError(f"cannot resolve the kernel package behind {recipe.package} (run apt-get update?)")
    run(["apt-get", "download", m.group(1)], cwd=work)
    deb = next(work.glob("linux-image-*.deb"))
    root = work / "pkg"
    run(["dpkg-deb", "-x", str(deb), str(root)])
    vmlinuz = next((root / "boot").glob("vmlinuz-*"))
    version = vmlinuz.name.removeprefix("vmlinuz-")
    out = work / "out"
    out.mkdir()
    progress("kernel: extracting vmlinux (PVH entry)")
    (out / "vmlinux").write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
    (out / "version").write_text(version + "\n")
    progress("kernel: building initramfs")
    _build_initramfs(recipe, root / "lib" / "modules" / version / "kernel", work / "initramfs", out / "initrd.img")


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Find the compressed payload inside a bzImage and decompress it to the ELF vmlinux.

    QEMU's microvm boots an ELF with a PVH note directly, skipping the decompressor and firmware."""
    formats = [  # magic, decompress command
        (b"\x02!L\x18", ["lz4", "-dc"]),
        (b"(\xb5/\xfd", ["zstd", "-dcq"]),
        (b"\xfd7zXZ\x00", ["xz", "-dcq"]),
        (b"\x1f\x8b\x08", ["gzip", "-dcq"]),
    ]
    for magic, cmd in formats:
        start = bzimage.find(magic)
        while start != -1:
            proc = subprocess.run(cmd, input=bzimage[start:], capture_output=True)
            # Trailing data after the stream makes some tools complain; an ELF out is what counts.
            if proc.stdout[:4] == b"\x7fELF":
                return proc.stdout
            start = bzimage.find(magic, start + 1)
    raise BuildError("no known compressed kernel inside the bzImage")


def _build_initramfs(recipe: KernelRecipe, modules_root: Path, tree: Path, out: Path) -> None:
    for d in ("bin", "lib/modules", "proc", "sys", "dev", "newroot"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    busybox = Path("/bin/busybox")
    if b"statically linked" not in run(["file", "-L", str(busybox)]):
        raise BuildError("/bin/busybox is not static: install busybox-static")
    shutil.copy2(busybox, tree / "bin" / "busybox")
    names = []
    for mod in recipe.modules:
        src = modules_root / f"{mod}.ko"
        shutil.copy2(src, tree / "lib" / "modules" / src.name)
        names.append(src.stem)
    (tree / "lib" / "modules" / "order").write_text("\n".join(names) + "\n")
    shutil.copy2(GUEST_FILES / "initramfs-init", tree / "init")
    (tree / "init").chmod(0o755)
    files = run(["find", "."], cwd=tree)
    out.write_bytes(run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=tree, input=files))


# ---------------------------------------------------------------- root filesystems


def rootfs_dir(recipe: RootfsRecipe) -> Path:
    return cache_dir() / "rootfs" / f"{recipe.name}-{recipe.image_key()}"


def build_rootfs(recipe: RootfsRecipe, *, force: bool = False, progress: Progress = _noop) -> RootfsImage:
    final = rootfs_dir(recipe)
    if force and final.exists():
        shutil.rmtree(final)
    if not final.exists():
        tree = _debootstrap(recipe, force=force, progress=progress)
        final.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=final.parent) as work:
            progress(f"{recipe.name}: writing root filesystem image")
            out = Path(work) / "out"
            out.mkdir()
            _make_image(recipe, tree, Path(work) / "stage", out / "root.img")
            _publish(out, final)
    return RootfsImage(recipe.name, final / "root.img", recipe.image_key(), recipe.disk_size_mb)


def _debootstrap(recipe: RootfsRecipe, *, force: bool, progress: Progress) -> Path:
    """The Debian userland, cached by package list (slow: tens of seconds to minutes)."""
    final = cache_dir() / "trees" / f"{recipe.name}-{recipe.tree_key()}"
    if force and final.exists():
        shutil.rmtree(final)
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=final.parent))
    try:
        mirror = debian_mirror()
        progress(f"{recipe.name}: debootstrap {recipe.suite} from {mirror} (a few minutes)")
        run(["debootstrap", "--variant=minbase", f"--include={','.join(recipe.packages)}",
             recipe.suite, str(work / "tree"), mirror])
        for rel in _TRIM:
            target = work / "tree" / rel
            if target.is_dir():
                shutil.rmtree(target)
                target.mkdir()
        _publish(work / "tree", final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _make_image(recipe: RootfsRecipe, tree: Path, stage: Path, out: Path) -> None:
    """Tree + guest init + guest agent -> sparse ext4 image (mkfs -d needs no loop mount)."""
    run(["cp", "-a", str(tree), str(stage)])
    shutil.copy2(GUEST_FILES / "wrenn-init", stage / "sbin" / "wrenn-init")
    (stage / "sbin" / "wrenn-init").chmod(0o755)
    agent_dst = stage / "opt" / "wrenn" / "wrenn_guest"
    shutil.copytree(GUEST_AGENT_SRC, agent_dst, ignore=shutil.ignore_patterns("__pycache__", "*.md"))
    (stage / "etc" / "hostname").write_text("wrenn\n")
    (stage / "etc" / "hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost\n")
    # The guest's resolver is the host's DNS forwarder (reached through the gateway; see
    # wrenn_host.network), which applies the capsule's domain rules.
    (stage / "etc" / "resolv.conf").unlink(missing_ok=True)
    (stage / "etc" / "resolv.conf").write_text(f"nameserver {GUEST_NAMESERVER}\noptions timeout:2 attempts:2\n")
    certs = extra_ca_certificates()
    if certs:
        dest = stage / "usr" / "local" / "share" / "ca-certificates"
        dest.mkdir(parents=True, exist_ok=True)
        with open(stage / "etc" / "ssl" / "certs" / "ca-certificates.crt", "ab") as bundle:
            for cert in certs:
                shutil.copy2(cert, dest / cert.name)
                bundle.write(b"\n" + cert.read_bytes())
    with open(out, "wb") as f:
        f.truncate(recipe.disk_size_mb * 1024 * 1024)
    run(["mkfs.ext4", "-q", "-F", "-L", "wrenn-root", "-d", str(stage), str(out)])
    shutil.rmtree(stage)


def build_all(*, force: bool = False, progress: Progress = _noop) -> tuple[KernelImage, dict[str, RootfsImage]]:
    kernel = build_kernel(force=force, progress=progress)
    roots = {name: build_rootfs(recipe, force=force, progress=progress) for name, recipe in TEMPLATES.items()}
    return kernel, roots


def is_built() -> bool:
    return kernel_dir().exists() and all(rootfs_dir(r).exists() for r in TEMPLATES.values())
