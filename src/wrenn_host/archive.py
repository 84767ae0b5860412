"""The archive stream that carries a template's or a paused capsule's files from host to host.

Format ("wrenn archive 1"), a flat list of regular files, sparse-aware:

    MAGIC                               b"WRNARC1\\n"
    per file, in the manifest's order:
      b"F" u16 name_len, name (utf-8), u64 size, u32 mode
      b"D" u64 offset, u32 length, data  (any number; offsets increasing, inside [0, size))
      b"E"                               (end of the file)
    b"Z"                                 (end of the archive)

All integers are big-endian. Bytes between extents are holes (zeros): guest memory files and
disks are mostly holes, and all-zero chunks of data extents are sent as holes too, so the
receiver's copy is as sparse as the source (or sparser). The `sha256` of a file in its
`ArchiveManifest` is over its whole content, holes read as zeros; the receiver hashes what it
writes and refuses a file whose size or hash differs.

Nothing is ever held whole in memory: files are read and written in chunks of `CHUNK`, each in a
worker thread (hashing releases the GIL).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from wrenn_host.api import ArchiveFile, ArchiveManifest, HostAgentError

MAGIC = b"WRNARC1\n"
FORMAT = "wrenn-archive-1"
CHUNK = 1 << 20
MAX_EXTENT = 8 << 20  # a peer may not make us buffer more than this at once
_ZEROS = bytes(CHUNK)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # flat: no directories, no dot files
_FILE = struct.Struct(">QI")
_EXTENT = struct.Struct(">QI")


class ArchiveError(HostAgentError):
    """The stream does not match its manifest (code "checksum_mismatch") or is not an archive
    ("invalid_archive")."""

    code = "checksum_mismatch"


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ArchiveError(f"archive file name {name!r} not allowed", code="invalid_archive")
    return name


# ---------------------------------------------------------------------- reading files

def data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the data extents of an open file (SEEK_DATA/SEEK_HOLE), in chunks of
    at most CHUNK. A file system without hole reporting gives the whole file as data."""
    off = 0
    while off < size:
        try:
            data = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == 6:  # ENXIO: only a hole after off
                return
            data, hole = off, size  # EINVAL: no hole support here
        else:
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        pos = data
        while pos < hole:
            n = min(CHUNK, hole - pos)
            yield pos, n
            pos += n
        off = hole


def _read_chunk(fd: int, off: int, n: int) -> bytes | None:
    """The chunk, or None if it is all zeros (sent as a hole)."""
    data = os.pread(fd, n, off)
    if len(data) != n:
        raise ArchiveError(f"file changed while it was read (short read at {off})")
    return None if data == _ZEROS[:n] else data


class _Hasher:
    """sha256 of a file fed in order, holes as zeros."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.pos = 0

    def skip_to(self, off: int) -> None:
        while self.pos < off:
            n = min(CHUNK, off - self.pos)
            self.h.update(_ZEROS[:n])
            self.pos += n

    def data(self, off: int, data: bytes) -> None:
        self.skip_to(off)
        self.h.update(data)
        self.pos += len(data)

    def hexdigest(self, size: int) -> str:
        self.skip_to(size)
        return self.h.hexdigest()


def describe(path: Path, name: str | None = None) -> ArchiveFile:
    """Size, sha256 and mode of one file (sparse-aware: holes are hashed, not read). Blocking."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        hasher = _Hasher()
        for off, n in data_ranges(fd, st.st_size):
            hasher.data(off, os.pread(fd, n, off))
        return ArchiveFile(path=name or path.name, size=st.st_size, sha256=hasher.hexdigest(st.st_size),
                           mode=st.st_mode & 0o777)
    finally:
        os.close(fd)


async def stream_files(files: list[tuple[str, Path]]) -> AsyncIterator[bytes]:
    """The archive of `files` ((name in the archive, path on disk)), chunk by chunk."""
    yield MAGIC
    for name, path in files:
        fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            raw = check_name(name).encode()
            yield b"F" + struct.pack(">H", len(raw)) + raw + _FILE.pack(st.st_size, st.st_mode & 0o777)
            ranges = data_ranges(fd, st.st_size)
            while True:
                # next() runs lseek: cheap, but keep the loop's thread free of file I/O anyway
                batch = await asyncio.to_thread(_next_data, fd, ranges)
                if batch is None:
                    break
                off, data = batch
                yield b"D" + _EXTENT.pack(off, len(data))
                yield data
            yield b"E"
        finally:
            os.close(fd)
    yield b"Z"


def _next_data(fd: int, ranges: Iterator[tuple[int, int]]) -> tuple[int, bytes] | None:
    for off, n in ranges:
        data = _read_chunk(fd, off, n)
        if data is not None:
            return off, data
    return None


async def stream_blobs(blobs: list[tuple[str, bytes, int]]) -> AsyncIterator[bytes]:
    """The archive of in-memory files ((name, content, mode)): what the fake host agent sends."""
    yield MAGIC
    for name, data, mode in blobs:
        raw = check_name(name).encode()
        yield b"F" + struct.pack(">H", len(raw)) + raw + _FILE.pack(len(data), mode)
        for off in range(0, len(data), CHUNK):
            yield b"D" + _EXTENT.pack(off, len(data[off:off + CHUNK]))
            yield data[off:off + CHUNK]
        yield b"E"
    yield b"Z"


def describe_blob(name: str, data: bytes, mode: int = 0o600) -> ArchiveFile:
    return ArchiveFile(path=name, size=len(data), sha256=hashlib.sha256(data).hexdigest(), mode=mode)


# ---------------------------------------------------------------------- receiving

class _Input:
    """Exact reads over an async iterator of arbitrary chunks."""

    def __init__(self, data: AsyncIterator[bytes]):
        self._it = data.__aiter__()
        self._buf = bytearray()
        self.received = 0

    async def exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            try:
                chunk = await self._it.__anext__()
            except StopAsyncIteration:
                raise ArchiveError("archive stream ended early", code="invalid_archive") from None
            self._buf += chunk
            self.received += len(chunk)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def rest_is_empty(self) -> bool:
        if self._buf:
            return False
        async for chunk in self._it:
            if chunk:
                return False
        return True


class Sink:
    """Where one received file goes. The default writes a sparse file in a directory."""

    def __init__(self, path: Path, size: int, mode: int):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self.fd, size)
        os.fchmod(self.fd, mode & 0o700)  # never wider than the owner: these are guest memory and disks

    def write(self, off: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, off)
            view, off = view[n:], off + n

    def finish(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)

    def abort(self) -> None:
        os.close(self.fd)


class MemorySink:
    """A received file kept in memory (the fake host agent's small files)."""

    def __init__(self, size: int):
        self.buf = bytearray(size)

    def write(self, off: int, data: bytes) -> None:
        self.buf[off:off + len(data)] = data

    def finish(self) -> None:
        pass

    def abort(self) -> None:
        pass


async def receive(data: AsyncIterator[bytes], manifest: ArchiveManifest, open_sink) -> int:
    """Parse the archive, write each file through `open_sink(file: ArchiveFile) -> Sink` (called in
    a worker thread) and check it against `manifest`: same files in the same order, sizes,
    sha256. Raises ArchiveError (nothing is cleaned here: the caller removes its staging).
    Returns the bytes received."""
    inp = _Input(data)
    if await inp.exactly(len(MAGIC)) != MAGIC:
        raise ArchiveError("not a wrenn archive stream", code="invalid_archive")
    expected = list(manifest.files)
    for want in expected:
        kind = await inp.exactly(1)
        if kind != b"F":
            raise ArchiveError(f"archive has fewer files than its manifest (missing {want.path})")
        (nlen,) = struct.unpack(">H", await inp.exactly(2))
        name = (await inp.exactly(nlen)).decode("utf-8", "replace")
        size, _mode = _FILE.unpack(await inp.exactly(_FILE.size))
        if name != want.path:
            raise ArchiveError(f"archive file {name!r} where the manifest has {want.path!r}")
        if size != want.size:
            raise ArchiveError(f"{name}: {size} bytes in the archive, {want.size} in the manifest")
        sink = await asyncio.to_thread(open_sink, want)
        try:
            hasher = _Hasher()
            while True:
                kind = await inp.exactly(1)
                if kind == b"E":
                    break
                if kind != b"D":
                    raise ArchiveError(f"{name}: bad frame {kind!r}", code="invalid_archive")
                off, n = _EXTENT.unpack(await inp.exactly(_EXTENT.size))
                if n > MAX_EXTENT or off < hasher.pos or off + n > size:
                    raise ArchiveError(f"{name}: extent {off}+{n} out of order or out of bounds",
                                       code="invalid_archive")
                chunk = await inp.exactly(n)
                await asyncio.to_thread(_take, sink, hasher, off, chunk)
            digest = await asyncio.to_thread(hasher.hexdigest, size)
            if digest != want.sha256:
                raise ArchiveError(f"{name}: sha256 {digest} does not match the manifest's {want.sha256}")
            await asyncio.to_thread(sink.finish)
        except BaseException:
            sink.abort()
            raise
    if await inp.exactly(1) != b"Z" or not await inp.rest_is_empty():
        raise ArchiveError("archive has more files than its manifest")
    return inp.received


def _take(sink: Sink, hasher: _Hasher, off: int, data: bytes) -> None:
    hasher.data(off, data)
    sink.write(off, data)


async def receive_into(directory: Path, data: AsyncIterator[bytes], manifest: ArchiveManifest) -> int:
    """`receive` into regular files named as in the manifest inside `directory` (which exists)."""
    for f in manifest.files:
        check_name(f.path)
    return await receive(data, manifest, lambda f: Sink(directory / f.path, f.size, f.mode))
