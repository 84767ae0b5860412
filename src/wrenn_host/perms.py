"""Files only the platform can read: guest memory holds the guests' secrets, the database holds
password hashes and key hashes. Directories 0700, files 0600, whatever umask the process had and
whatever an older version left behind.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

PRIVATE_UMASK = 0o077


def private_umask() -> None:
    """Every file the server creates from now on is its own (QEMU's logs and sockets too)."""
    os.umask(PRIVATE_UMASK)


def make_private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    _chmod(path, 0o700)
    return path


def lock_down(root: Path) -> int:
    """Take group and other bits off `root` and everything under it (dirs 0700, files 0600 or
    0700 if executable). Symlinks are not followed. Returns how many modes were changed."""
    changed = 0
    if not root.exists():
        return 0
    changed += _private(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            changed += _private(Path(dirpath) / name)
    return changed


def lock_down_cache(cache: Path) -> int:
    """The image cache: its top directory closed to others (that alone hides the rootfs trees,
    whose own modes are the guests' and must stay), the files the platform made inside closed too."""
    if not cache.exists():
        return 0
    changed = _private(cache)
    for sub in ("snapshots", "rootfs", "kernel"):
        changed += lock_down(cache / sub)
    trees = cache / "trees"
    if trees.exists():
        changed += _private(trees)
    return changed


def _private(p: Path) -> int:
    try:
        st = p.lstat()
    except OSError:
        return 0
    if stat.S_ISLNK(st.st_mode) or not st.st_mode & 0o077:
        return 0
    mode = stat.S_IMODE(st.st_mode) & 0o700
    if stat.S_ISDIR(st.st_mode):
        mode = 0o700
    _chmod(p, mode)
    return 1


def _chmod(p: Path, mode: int) -> None:
    with contextlib.suppress(OSError):
        os.chmod(p, mode)  # never a symlink here: _private skips them
