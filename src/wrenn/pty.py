"""Interactive terminals in a capsule: ``capsule.pty()`` and ``capsule.pty_connect(tag)``.

A PTY session is a program (``/bin/bash`` by default) on a pseudo-terminal in the capsule. It
lives in the capsule, not in the connection: :meth:`PtySession.detach` (or a dropped network)
leaves it running, and ``capsule.pty_connect(tag)`` attaches again, replaying its recent output
(up to 64 KiB) before the live output. Leaving a ``with`` block kills it unless it was detached.

Example::

    with capsule.pty(cols=120, rows=40) as term:
        term.write(b"echo hello\\n")
        for event in term:
            if event.type == "output":
                sys.stdout.buffer.write(event.data)
            elif event.type == "exit":
                break
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import builtins
import collections
import enum
import json
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from wrenn import _ws
from wrenn._calls import _path
from wrenn._exceptions import WrennConnectionError, WrennError

if TYPE_CHECKING:
    from wrenn._async_client import AsyncWrennClient
    from wrenn._client import WrennClient

__all__ = ["AsyncPtySession", "PtyEvent", "PtyEventType", "PtySession"]


class PtyEventType(enum.StrEnum):
    started = "started"
    output = "output"
    exit = "exit"
    error = "error"
    ping = "ping"


class PtyEvent(BaseModel):
    """One event of a PTY session.

    - ``started``: ``pid`` and ``tag`` of the session;
    - ``output``: ``data``, the terminal's bytes as they came;
    - ``exit``: ``exit_code`` of the program (``-9`` when killed); the last event;
    - ``error``: ``data`` (text) says what went wrong; ``fatal`` errors end the session's stream;
    - ``ping``: a keep-alive from the server (answered for you).
    """

    model_config = ConfigDict(extra="ignore")

    type: PtyEventType | str
    pid: int | None = None
    tag: str | None = None
    data: bytes | str | None = None
    exit_code: int | None = None
    fatal: bool | None = None


def pty_event(message: dict[str, Any] | bytes) -> PtyEvent:
    """The event for one server message: binary frames are output; so is ``{"type": "output",
    "data": <base64>}``."""
    if isinstance(message, bytes):
        return PtyEvent(type=PtyEventType.output, data=message)
    kind = message.get("type")
    if kind == "output":
        try:
            data = base64.b64decode(message.get("data") or "", validate=True)
        except (binascii.Error, ValueError, TypeError):
            data = str(message.get("data") or "").encode()
        return PtyEvent(type=PtyEventType.output, data=data)
    if kind == "started":
        return PtyEvent(type=PtyEventType.started, pid=message.get("pid"), tag=message.get("tag"))
    if kind == "exit":
        code = message.get("exit_code")
        return PtyEvent(type=PtyEventType.exit, exit_code=-1 if code is None else code)
    if kind == "error":
        return PtyEvent(type=PtyEventType.error, data=str(message.get("data") or "error"),
                        fatal=bool(message.get("fatal", False)))
    if kind == "ping":
        return PtyEvent(type=PtyEventType.ping)
    return PtyEvent(type=str(kind or "unknown"), data=message.get("data"))


def _start_message(cmd: str, args: builtins.list[str] | None, cols: int, rows: int,
                   envs: dict[str, str] | None, cwd: str | None, tag: str | None) -> dict[str, Any]:
    _check_size(cols, rows)
    msg: dict[str, Any] = {"type": "start", "cmd": cmd, "cols": cols, "rows": rows}
    if args:
        msg["args"] = list(args)
    if envs:
        msg["envs"] = envs
    if cwd:
        msg["cwd"] = cwd
    if tag:
        msg["tag"] = tag
    return msg


def _connect_message(tag: str) -> dict[str, Any]:
    return {"type": "connect", "tag": tag}


def _check_size(cols: int, rows: int) -> None:
    if cols <= 0 or rows <= 0:
        raise ValueError("cols and rows must be greater than 0")


def _pty_path(capsule_id: str) -> str:
    return _path("/v1/capsules/{}/pty", capsule_id)


def _as_bytes(data: bytes | str) -> bytes:
    return data.encode("utf-8") if isinstance(data, str) else bytes(data)


class _SessionState:
    """What sync and async sessions share: the tag and pid, the end of the stream."""

    def __init__(self, capsule_id: str) -> None:
        self._capsule_id = capsule_id
        self._tag: str | None = None
        self._pid: int | None = None
        self._done = False  # exit or fatal error seen (or the socket closed)
        self._detached = False
        self._pending: collections.deque[PtyEvent] = collections.deque()

    @property
    def tag(self) -> str | None:
        """The session's tag: give it to ``capsule.pty_connect(tag)`` to attach again."""
        return self._tag

    @property
    def pid(self) -> int | None:
        """The program's process id in the capsule."""
        return self._pid

    @property
    def capsule_id(self) -> str:
        return self._capsule_id

    def _note(self, event: PtyEvent) -> None:
        if event.type == PtyEventType.started:
            self._tag = event.tag or self._tag
            self._pid = event.pid if event.pid is not None else self._pid
        elif event.type == PtyEventType.exit or (event.type == PtyEventType.error and event.fatal):
            self._done = True

    def _opened(self, first: PtyEvent) -> None:
        """Check the server's answer to start/connect: a fatal error is raised here."""
        self._note(first)
        if first.type == PtyEventType.error and first.fatal:
            raise WrennError("pty_error", str(first.data))
        self._pending.append(first)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(capsule_id={self._capsule_id!r}, tag={self._tag!r}, pid={self._pid!r})"


class PtySession(_SessionState):
    """A PTY session over a WebSocket. Iterate it for :class:`PtyEvent` objects (the first is
    ``started``); the iteration ends after the ``exit`` event. Made by ``capsule.pty()``."""

    def __init__(self, ws: _ws.SyncConnection, capsule_id: str) -> None:
        super().__init__(capsule_id)
        self._ws = ws

    @classmethod
    def _open(cls, client: WrennClient, capsule_id: str, first: dict[str, Any]) -> PtySession:
        ws = _ws.open_sync(client, _pty_path(capsule_id))
        session = cls(ws, capsule_id)
        try:
            try:
                ws.send(json.dumps(first))
            except _ws.ConnectionClosed:
                pass  # refused (e.g. a bad key): the server's error message is still to be read
            event = session._receive(_ws.OPEN_TIMEOUT)
            if event is None:
                raise WrennConnectionError("connection_error", "the server closed the PTY WebSocket")
            session._opened(event)
        except BaseException:
            ws.close()
            raise
        return session

    def write(self, data: bytes | str) -> None:
        """Send keystrokes (raw bytes; ``str`` is sent as UTF-8), e.g. ``b"ls\\n"`` or ``b"\\x03"``."""
        self._send(_as_bytes(data))

    def resize(self, cols: int, rows: int) -> None:
        """Change the terminal size; the program gets SIGWINCH."""
        _check_size(cols, rows)
        self._send(json.dumps({"type": "resize", "cols": cols, "rows": rows}))

    def kill(self) -> None:
        """SIGKILL the program; its ``exit`` event follows."""
        self._send(json.dumps({"type": "kill"}))

    def detach(self) -> None:
        """Close the connection and leave the session running (``pty_connect(tag)`` resumes it)."""
        self._detached = True
        self._ws.close()

    def close(self) -> None:
        """Close the connection; the session keeps running (same as :meth:`detach`)."""
        self.detach()

    def receive(self, timeout: float | None = None) -> PtyEvent | None:
        """The next event, or ``None`` once the stream has ended. Raises ``TimeoutError`` if
        nothing came within ``timeout`` seconds."""
        if self._pending:
            return self._pending.popleft()
        if self._done:
            return None
        return self._receive(timeout)

    def _receive(self, timeout: float | None) -> PtyEvent | None:
        while True:
            try:
                message = self._ws.recv(timeout)
            except _ws.ConnectionClosed:
                self._done = True
                return None
            event = pty_event(_ws.decode(message))
            self._note(event)
            if event.type == PtyEventType.ping:
                self._pong()
            return event

    def _pong(self) -> None:
        try:
            self._ws.send(json.dumps({"type": "pong"}))
        except _ws.ConnectionClosed:
            pass

    def _send(self, message: str | bytes) -> None:
        try:
            self._ws.send(message)
        except _ws.ConnectionClosed as exc:
            raise WrennConnectionError("connection_error", f"the PTY connection is closed: {exc}") from exc

    def __iter__(self) -> Iterator[PtyEvent]:
        return self

    def __next__(self) -> PtyEvent:
        event = self.receive()
        if event is None:
            raise StopIteration
        return event

    def __enter__(self) -> PtySession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not (self._detached or self._done):
            try:
                self.kill()
            except WrennError:
                pass
        self._ws.close()


class AsyncPtySession(_SessionState):
    """Async twin of :class:`PtySession`: ``async with capsule.pty() as term``,
    ``await term.write(...)``, ``async for event in term``."""

    def __init__(self, ws: _ws.AsyncConnection, capsule_id: str) -> None:
        super().__init__(capsule_id)
        self._ws = ws

    @classmethod
    async def _open(cls, client: AsyncWrennClient, capsule_id: str, first: dict[str, Any]) -> AsyncPtySession:
        ws = await _ws.aopen(client, _pty_path(capsule_id))
        session = cls(ws, capsule_id)
        try:
            try:
                await ws.send(json.dumps(first))
            except _ws.ConnectionClosed:
                pass  # refused: the server's error message is still to be read
            event = await session._receive(_ws.OPEN_TIMEOUT)
            if event is None:
                raise WrennConnectionError("connection_error", "the server closed the PTY WebSocket")
            session._opened(event)
        except BaseException:
            await ws.close()
            raise
        return session

    async def write(self, data: bytes | str) -> None:
        """Send keystrokes (raw bytes; ``str`` is sent as UTF-8)."""
        await self._send(_as_bytes(data))

    async def resize(self, cols: int, rows: int) -> None:
        """Change the terminal size; the program gets SIGWINCH."""
        _check_size(cols, rows)
        await self._send(json.dumps({"type": "resize", "cols": cols, "rows": rows}))

    async def kill(self) -> None:
        """SIGKILL the program; its ``exit`` event follows."""
        await self._send(json.dumps({"type": "kill"}))

    async def detach(self) -> None:
        """Close the connection and leave the session running."""
        self._detached = True
        await self._ws.close()

    async def close(self) -> None:
        """Close the connection; the session keeps running (same as :meth:`detach`)."""
        await self.detach()

    async def receive(self, timeout: float | None = None) -> PtyEvent | None:
        """The next event, or ``None`` once the stream has ended; ``TimeoutError`` after
        ``timeout`` seconds without one."""
        if self._pending:
            return self._pending.popleft()
        if self._done:
            return None
        return await self._receive(timeout)

    async def _receive(self, timeout: float | None) -> PtyEvent | None:
        try:
            message = await asyncio.wait_for(self._ws.recv(), timeout)
        except _ws.ConnectionClosed:
            self._done = True
            return None
        event = pty_event(_ws.decode(message))
        self._note(event)
        if event.type == PtyEventType.ping:
            try:
                await self._ws.send(json.dumps({"type": "pong"}))
            except _ws.ConnectionClosed:
                pass
        return event

    async def _send(self, message: str | bytes) -> None:
        try:
            await self._ws.send(message)
        except _ws.ConnectionClosed as exc:
            raise WrennConnectionError("connection_error", f"the PTY connection is closed: {exc}") from exc

    def __aiter__(self) -> AsyncIterator[PtyEvent]:
        return self

    async def __anext__(self) -> PtyEvent:
        event = await self.receive()
        if event is None:
            raise StopAsyncIteration
        return event

    async def __aenter__(self) -> AsyncPtySession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if not (self._detached or self._done):
            try:
                await self.kill()
            except WrennError:
                pass
        await self._ws.close()


class _AsyncPtyOpener:
    """What ``AsyncCapsule.pty()`` returns: ``async with`` it (kills the session on exit unless
    detached) or ``await`` it for the session."""

    def __init__(self, client: AsyncWrennClient, capsule_id: str, first: dict[str, Any]) -> None:
        self._args = (client, capsule_id, first)
        self._session: AsyncPtySession | None = None

    def __await__(self):  # type: ignore[no-untyped-def]
        return AsyncPtySession._open(*self._args).__await__()

    async def __aenter__(self) -> AsyncPtySession:
        self._session = await AsyncPtySession._open(*self._args)
        return self._session

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.__aexit__(*exc_info)
