"""The capsule's filesystem: ``capsule.files``."""

from __future__ import annotations

import builtins
import posixpath
import secrets
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from wrenn._calls import _Call, _path, parse_bytes, parse_none
from wrenn._exceptions import WrennConflictError, WrennNotFoundError, error_from_transport
from wrenn._models import FileEntry

if TYPE_CHECKING:
    from wrenn._async_client import AsyncWrennClient
    from wrenn._client import WrennClient

__all__ = ["AsyncFiles", "Files"]

T = TypeVar("T")


def _files_call(
    capsule_id: str, op: str, parse: Callable[[httpx.Response], T], **kwargs: Any
) -> _Call[T]:
    return _Call("POST", _path("/v1/capsules/{}/files/" + op, capsule_id), parse, **kwargs)


def _parse_entries(response: httpx.Response) -> builtins.list[FileEntry]:
    return [FileEntry.model_validate(e) for e in response.json().get("entries") or []]


def _parse_entry(response: httpx.Response) -> FileEntry:
    return FileEntry.model_validate(response.json().get("entry") or {})


def _read_call(capsule_id: str, path: str) -> _Call[bytes]:
    return _files_call(capsule_id, "read", parse_bytes, json={"path": path})


def _write_call(capsule_id: str, path: str, data: str | bytes) -> _Call[None]:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return _files_call(
        capsule_id,
        "write",
        parse_none,
        data={"path": path},
        files={"file": (posixpath.basename(path) or "file", data, "application/octet-stream")},
    )


def _list_call(capsule_id: str, path: str, depth: int) -> _Call[builtins.list[FileEntry]]:
    return _files_call(capsule_id, "list", _parse_entries, json={"path": path, "depth": depth})


def _mkdir_call(capsule_id: str, path: str) -> _Call[FileEntry]:
    return _files_call(capsule_id, "mkdir", _parse_entry, json={"path": path})


def _remove_call(capsule_id: str, path: str) -> _Call[None]:
    return _files_call(capsule_id, "remove", parse_none, json={"path": path})


def _split(path: str) -> tuple[str, str]:
    """Parent directory and name, for checks done by listing the parent."""
    path = path.rstrip("/") or "/"
    return posixpath.dirname(path) or ".", posixpath.basename(path)


def _find(entries: builtins.list[FileEntry], name: str) -> FileEntry | None:
    return next((e for e in entries if e.name == name), None)


# A multipart body written by hand so a large upload is streamed, never held in memory.
def _as_bytes(chunk: bytes | str) -> bytes:
    return chunk.encode("utf-8") if isinstance(chunk, str) else chunk


def _multipart_parts(path: str, boundary: str) -> tuple[bytes, bytes]:
    head = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="path"\r\n\r\n'
        f"{path}\r\n"
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="file"; filename="upload"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head, f"\r\n--{boundary}--\r\n".encode()


def _stream_write_call(capsule_id: str, content: object, boundary: str) -> _Call[None]:
    return _files_call(
        capsule_id,
        "stream/write",
        parse_none,
        content=content,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        timeout=httpx.Timeout(None, connect=10.0),
    )


def _stream_read_call(capsule_id: str, path: str) -> _Call[None]:
    return _files_call(
        capsule_id,
        "stream/read",
        parse_none,
        json={"path": path},
        timeout=httpx.Timeout(None, connect=10.0),
    )


class Files:
    """Read and write files in a capsule. Reached as ``capsule.files``."""

    def __init__(self, capsule_id: str, client: WrennClient) -> None:
        self._capsule_id = capsule_id
        self._client = client

    def read(self, path: str) -> str:
        """Read a file as text (UTF-8, undecodable bytes replaced).

        Raises :class:`WrennNotFoundError` if it does not exist.
        """
        return self.read_bytes(path).decode("utf-8", errors="replace")

    def read_bytes(self, path: str) -> bytes:
        """Read a file's exact bytes."""
        return self._client._call(_read_call(self._capsule_id, path))

    def write(self, path: str, data: str | bytes) -> None:
        """Write a file, creating or replacing it; ``str`` is written as UTF-8.
        Raises :class:`WrennTooLargeError` over the size limit (100 MB)."""
        self._client._call(_write_call(self._capsule_id, path, data))

    def list(self, path: str, depth: int = 1) -> builtins.list[FileEntry]:
        """List a directory; ``depth=1`` gives its direct children only."""
        return self._client._call(_list_call(self._capsule_id, path, depth))

    def exists(self, path: str) -> bool:
        """Whether a file, directory or symlink exists at ``path``."""
        parent, name = _split(path)
        if not name:  # "/" always exists
            return True
        try:
            return _find(self.list(parent, depth=1), name) is not None
        except WrennNotFoundError:
            return False

    def make_dir(self, path: str) -> FileEntry:
        """Create a directory and its parents. Succeeds if it already exists."""
        try:
            return self._client._call(_mkdir_call(self._capsule_id, path))
        except WrennConflictError:
            parent, name = _split(path)
            entry = _find(self.list(parent, depth=1), name)
            if entry is None or not entry.is_dir:
                raise
            return entry

    def remove(self, path: str) -> None:
        """Remove a file, or a directory with everything in it."""
        self._client._call(_remove_call(self._capsule_id, path))

    def upload_stream(self, path: str, stream: Iterable[bytes]) -> None:
        """Write a file from an iterable of byte chunks, of any size, without buffering it."""
        boundary = secrets.token_hex(16)
        head, tail = _multipart_parts(path, boundary)

        def body() -> Iterator[bytes]:
            yield head
            for chunk in stream:
                yield _as_bytes(chunk)
            yield tail

        self._client._call(_stream_write_call(self._capsule_id, body(), boundary))

    def download_stream(self, path: str) -> Iterator[bytes]:
        """Read a file of any size as an iterator of byte chunks."""
        with self._client._stream(_stream_read_call(self._capsule_id, path)) as response:
            try:
                yield from response.iter_bytes()
            except httpx.TransportError as exc:
                raise error_from_transport(exc, response.request) from exc


class AsyncFiles:
    """Async twin of :class:`Files`. Reached as ``capsule.files`` on an AsyncCapsule."""

    def __init__(self, capsule_id: str, client: AsyncWrennClient) -> None:
        self._capsule_id = capsule_id
        self._client = client

    async def read(self, path: str) -> str:
        """Read a file as text (UTF-8, undecodable bytes replaced)."""
        return (await self.read_bytes(path)).decode("utf-8", errors="replace")

    async def read_bytes(self, path: str) -> bytes:
        """Read a file's exact bytes."""
        return await self._client._call(_read_call(self._capsule_id, path))

    async def write(self, path: str, data: str | bytes) -> None:
        """Write a file, creating or replacing it; ``str`` is written as UTF-8."""
        await self._client._call(_write_call(self._capsule_id, path, data))

    async def list(self, path: str, depth: int = 1) -> builtins.list[FileEntry]:
        """List a directory; ``depth=1`` gives its direct children only."""
        return await self._client._call(_list_call(self._capsule_id, path, depth))

    async def exists(self, path: str) -> bool:
        """Whether a file, directory or symlink exists at ``path``."""
        parent, name = _split(path)
        if not name:
            return True
        try:
            return _find(await self.list(parent, depth=1), name) is not None
        except WrennNotFoundError:
            return False

    async def make_dir(self, path: str) -> FileEntry:
        """Create a directory and its parents. Succeeds if it already exists."""
        try:
            return await self._client._call(_mkdir_call(self._capsule_id, path))
        except WrennConflictError:
            parent, name = _split(path)
            entry = _find(await self.list(parent, depth=1), name)
            if entry is None or not entry.is_dir:
                raise
            return entry

    async def remove(self, path: str) -> None:
        """Remove a file, or a directory with everything in it."""
        await self._client._call(_remove_call(self._capsule_id, path))

    async def upload_stream(
        self, path: str, stream: AsyncIterable[bytes] | Iterable[bytes]
    ) -> None:
        """Write a file from (async) byte chunks, of any size, without buffering it."""
        boundary = secrets.token_hex(16)
        head, tail = _multipart_parts(path, boundary)

        async def body() -> AsyncIterator[bytes]:
            yield head
            if isinstance(stream, AsyncIterable):
                async for chunk in stream:
                    yield _as_bytes(chunk)
            else:
                for chunk in stream:
                    yield _as_bytes(chunk)
            yield tail

        await self._client._call(_stream_write_call(self._capsule_id, body(), boundary))

    async def download_stream(self, path: str) -> AsyncIterator[bytes]:
        """Read a file of any size as an async iterator of byte chunks."""
        async with self._client._stream(_stream_read_call(self._capsule_id, path)) as response:
            try:
                async for chunk in response.aiter_bytes():
                    yield chunk
            except httpx.TransportError as exc:
                raise error_from_transport(exc, response.request) from exc
