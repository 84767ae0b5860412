"""The build context: a tar the user uploads with the build, unpacked on the host, read by COPY.

Unpacked with tarfile's `data` filter: no absolute paths, no `..`, no links out of the context, no
devices; owners dropped. Its size is bounded on upload (see the route).
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import stat
import tarfile
import tempfile
from pathlib import Path

from wrenn_control.builds.spec import SpecError


@dataclasses.dataclass(frozen=True)
class ContextFile:
    rel: str  # path relative to the COPY destination
    path: Path  # on the host
    mode: int


class BuildContext:
    def __init__(self, root: Path | None):
        self.root = root

    @classmethod
    def from_tar(cls, tar_path: Path, work_dir: Path) -> BuildContext:
        root = Path(tempfile.mkdtemp(dir=work_dir, prefix="ctx-"))
        try:
            with tarfile.open(tar_path) as tar:  # any compression tarfile knows
                tar.extractall(root, filter="data")
        except (tarfile.TarError, OSError, EOFError) as exc:
            shutil.rmtree(root, ignore_errors=True)
            raise SpecError(f"build context: not a valid tar archive: {exc}") from None
        return cls(root)

    def close(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def sources(self, srcs: tuple[str, ...], what: str) -> list[tuple[str, list[ContextFile], bool]]:
        """For each COPY source: (source, its files, whether it is a directory). Globs allowed."""
        if self.root is None:
            raise SpecError(f"{what}: COPY needs a build context (send the build as multipart with a "
                            "`context` tar, or `--context DIR` on the CLI)")
        out = []
        for src in srcs:
            pattern = src.strip("/") or "."
            matches = sorted(self.root.glob(pattern)) if any(c in pattern for c in "*?[") else [self.root / pattern]
            matches = [m for m in matches if m.exists() or m.is_symlink()]
            if not matches:
                raise SpecError(f"{what}: {src!r} is not in the build context")
            for m in matches:
                if m.is_dir() and not m.is_symlink():
                    files = [ContextFile(str(p.relative_to(m)), p, stat.S_IMODE(p.lstat().st_mode))
                             for p in sorted(m.rglob("*")) if p.is_file() and not p.is_symlink()]
                    out.append((src, files, True))
                elif m.is_file() and not m.is_symlink():
                    out.append((src, [ContextFile(m.name, m, stat.S_IMODE(m.stat().st_mode))], False))
                else:
                    raise SpecError(f"{what}: {src!r} is not a regular file or directory")
        return out

    def digest(self, srcs: tuple[str, ...], what: str) -> str:
        """What the step cache keys a COPY by: every file's path, mode and content."""
        h = hashlib.sha256()
        for src, files, is_dir in self.sources(srcs, what):
            h.update(f"{src}\0{is_dir}\0".encode())
            for f in files:
                h.update(f"{f.rel}\0{f.mode:o}\0".encode())
                with open(f.path, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
        return h.hexdigest()
