"""Running commands in a capsule: ``capsule.commands``."""

from __future__ import annotations

import builtins
import json
import signal as _signal
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, Literal, overload

import httpx

from wrenn import _ws
from wrenn._calls import _Call, _path, parse_none
from wrenn._models import BackgroundProcess, ExecResult, ProcessInfo

if TYPE_CHECKING:
    from wrenn._async_client import AsyncWrennClient
    from wrenn._client import WrennClient

__all__ = [
    "AsyncCommands",
    "Commands",
    "StreamErrorEvent",
    "StreamEvent",
    "StreamExitEvent",
    "StreamStartEvent",
    "StreamStderrEvent",
    "StreamStdoutEvent",
]

_DEFAULT_EXEC_TIMEOUT = 30  # the server's default for timeout_sec


def _run_call(
    capsule_id: str,
    cmd: str,
    background: bool,
    timeout: int | None,
    envs: dict[str, str] | None,
    cwd: str | None,
    tag: str | None,
) -> _Call[ExecResult | BackgroundProcess]:
    # A command line, run by the shell so pipes, globs and quoting work as typed.
    body: dict[str, Any] = {"cmd": "/bin/sh", "args": ["-c", cmd], "background": background}
    if timeout is not None and not background:
        body["timeout_sec"] = timeout
    if envs is not None:
        body["envs"] = envs
    if cwd is not None:
        body["cwd"] = cwd
    if tag is not None:
        body["tag"] = tag
    http_timeout = None
    if not background:
        # The server enforces the command timeout; wait longer than it for the reply.
        run_for = timeout if timeout is not None else _DEFAULT_EXEC_TIMEOUT
        http_timeout = httpx.Timeout(run_for + 30.0, connect=10.0)

    def parse(response: httpx.Response) -> ExecResult | BackgroundProcess:
        data = response.json()
        if background:
            data.setdefault("sandbox_id", capsule_id)
            return BackgroundProcess.model_validate(data)
        return ExecResult.from_wire(data)

    return _Call(
        "POST", _path("/v1/capsules/{}/exec", capsule_id), parse, json=body, timeout=http_timeout
    )


def _list_call(capsule_id: str) -> _Call[builtins.list[ProcessInfo]]:
    def parse(response: httpx.Response) -> builtins.list[ProcessInfo]:
        body = response.json()
        items = (body.get("processes") or []) if isinstance(body, dict) else body
        return [ProcessInfo.model_validate(p) for p in items]

    return _Call("GET", _path("/v1/capsules/{}/processes", capsule_id), parse)


def _signal_name(sig: str | int) -> str:
    """``9``, ``"kill"``, ``"SIGKILL"`` and ``signal.SIGKILL`` all become ``"SIGKILL"``."""
    if isinstance(sig, int):
        return _signal.Signals(sig).name
    name = sig.upper()
    return name if name.startswith("SIG") else "SIG" + name


def _kill_call(capsule_id: str, pid_or_tag: int | str, sig: str | int) -> _Call[None]:
    return _Call(
        "DELETE",
        _path("/v1/capsules/{}/processes/{}", capsule_id, pid_or_tag),
        parse_none,
        params={"signal": _signal_name(sig)},
    )


# --- streamed commands ----------------------------------------------------------------------


class StreamEvent:
    """One event of a streamed command (:meth:`Commands.stream`, :meth:`Commands.connect`).

    ``type`` is ``"start"``, ``"stdout"``, ``"stderr"``, ``"exit"`` or ``"error"``; each has its
    own class with the fields that go with it.
    """

    __slots__ = ("type",)

    def __init__(self, type: str) -> None:
        self.type = type

    def _fields(self) -> dict[str, Any]:
        names = [n for cls in reversed(type(self).__mro__) for n in getattr(cls, "__slots__", ())]
        return {n: getattr(self, n) for n in names}

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self._fields().items())
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._fields() == self._fields()  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]


class StreamStartEvent(StreamEvent):
    """The command started; ``pid`` is its process id in the capsule."""

    __slots__ = ("pid",)

    def __init__(self, pid: int) -> None:
        super().__init__("start")
        self.pid = pid


class StreamStdoutEvent(StreamEvent):
    """Output on stdout as it arrived (UTF-8 text, undecodable bytes replaced)."""

    __slots__ = ("data",)

    def __init__(self, data: str) -> None:
        super().__init__("stdout")
        self.data = data


class StreamStderrEvent(StreamEvent):
    """Output on stderr as it arrived."""

    __slots__ = ("data",)

    def __init__(self, data: str) -> None:
        super().__init__("stderr")
        self.data = data


class StreamExitEvent(StreamEvent):
    """The command ended (the last event); ``-9`` when it was killed."""

    __slots__ = ("exit_code",)

    def __init__(self, exit_code: int) -> None:
        super().__init__("exit")
        self.exit_code = exit_code


class StreamErrorEvent(StreamEvent):
    """The server could not run or follow the command (the last event); ``data`` says why."""

    __slots__ = ("data",)

    def __init__(self, data: str) -> None:
        super().__init__("error")
        self.data = data


def stream_event(raw: dict[str, Any]) -> StreamEvent:
    """The event for one server message."""
    kind = raw.get("type")
    if kind == "start":
        return StreamStartEvent(int(raw.get("pid") or 0))
    if kind == "stdout":
        return StreamStdoutEvent(str(raw.get("data") or ""))
    if kind == "stderr":
        return StreamStderrEvent(str(raw.get("data") or ""))
    if kind == "exit":
        code = raw.get("exit_code")
        return StreamExitEvent(-1 if code is None else int(code))
    if kind == "error":
        return StreamErrorEvent(str(raw.get("data") or "error"))
    return StreamEvent(str(kind or "unknown"))


_FINAL = ("exit", "error")


def _stream_start(
    cmd: str,
    args: builtins.list[str] | None,
    envs: dict[str, str] | None,
    cwd: str | None,
    timeout: float | None,
) -> str:
    # Without args, cmd is a command line for the shell, as with run().
    body: dict[str, Any] = {"type": "start", "cmd": cmd, "args": list(args)} if args else {
        "type": "start", "cmd": "/bin/sh", "args": ["-c", cmd]}
    if envs:
        body["envs"] = envs
    if cwd:
        body["cwd"] = cwd
    if timeout is not None:
        body["timeout_sec"] = timeout
    return json.dumps(body)


def _exec_stream_path(capsule_id: str) -> str:
    return _path("/v1/capsules/{}/exec/stream", capsule_id)


def _process_stream_path(capsule_id: str, pid_or_tag: int | str) -> str:
    return _path("/v1/capsules/{}/processes/{}/stream", capsule_id, pid_or_tag)


def _follow_sync(ws: _ws.SyncConnection, start: str | None) -> Iterator[StreamEvent]:
    try:
        if start is not None:
            try:
                ws.send(start)
            except _ws.ConnectionClosed:
                pass  # refused (e.g. a bad key): the server's error message is still to be read
        while True:
            try:
                body = _ws.decode(ws.recv())
            except _ws.ConnectionClosed:
                return
            if isinstance(body, bytes):
                continue
            event = stream_event(body)
            yield event
            if event.type in _FINAL:
                return
    finally:
        ws.close()  # leaving early: a streamed command is killed, an attached process runs on


async def _follow_async(ws: _ws.AsyncConnection, start: str | None) -> AsyncIterator[StreamEvent]:
    try:
        if start is not None:
            try:
                await ws.send(start)
            except _ws.ConnectionClosed:
                pass  # refused: the server's error message is still to be read
        while True:
            try:
                body = _ws.decode(await ws.recv())
            except _ws.ConnectionClosed:
                return
            if isinstance(body, bytes):
                continue
            event = stream_event(body)
            yield event
            if event.type in _FINAL:
                return
    finally:
        await ws.close()


class Commands:
    """Run and manage commands in a capsule. Reached as ``capsule.commands``."""

    def __init__(self, capsule_id: str, client: WrennClient) -> None:
        self._capsule_id = capsule_id
        self._client = client

    @overload
    def run(
        self,
        cmd: str,
        background: Literal[False] = False,
        timeout: int | None = 30,
        envs: dict[str, str] | None = None,
        cwd: str | None = None,
        tag: str | None = None,
    ) -> ExecResult: ...

    @overload
    def run(
        self,
        cmd: str,
        background: Literal[True],
        timeout: int | None = 30,
        envs: dict[str, str] | None = None,
        cwd: str | None = None,
        tag: str | None = None,
    ) -> BackgroundProcess: ...

    def run(
        self,
        cmd: str,
        background: bool = False,
        timeout: int | None = 30,
        envs: dict[str, str] | None = None,
        cwd: str | None = None,
        tag: str | None = None,
    ) -> ExecResult | BackgroundProcess:
        """Run a shell command line (``/bin/sh -c cmd``) in the capsule.

        Args:
            cmd: The command line.
            background: Start it in the background and return at once with a
                :class:`BackgroundProcess` (pid, tag) instead of waiting.
            timeout: Seconds before a foreground command is killed (default 30).
            envs: Extra environment variables.
            cwd: Working directory.
            tag: Name for a background process, usable with :meth:`kill`.

        Returns:
            :class:`ExecResult` (stdout, stderr, exit_code, duration_ms) for a foreground
            command; a non-zero exit code is returned, not raised.
        """
        return self._client._call(
            _run_call(self._capsule_id, cmd, background, timeout, envs, cwd, tag)
        )

    def list(self) -> builtins.list[ProcessInfo]:
        """List the background processes running in the capsule."""
        return self._client._call(_list_call(self._capsule_id))

    def kill(self, pid: int | str, signal: str | int = "SIGKILL") -> None:
        """Send a signal (default ``SIGKILL``; ``SIGTERM`` also works) to a background
        process, given its pid or its tag."""
        self._client._call(_kill_call(self._capsule_id, pid, signal))

    def stream(
        self,
        cmd: str,
        args: builtins.list[str] | None = None,
        *,
        envs: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> Iterator[StreamEvent]:
        """Run a command and yield its output as it is produced.

        Without ``args``, ``cmd`` is a shell command line (``/bin/sh -c cmd``); with ``args``,
        ``cmd`` is the program. Yields :class:`StreamStartEvent`, then
        :class:`StreamStdoutEvent` / :class:`StreamStderrEvent` as output arrives, then
        :class:`StreamExitEvent` (or :class:`StreamErrorEvent`). ``timeout`` (seconds) kills the
        command; by default it may run for as long as it is followed. Leaving the loop early
        kills the command.

        Example::

            for event in capsule.commands.stream("for i in 1 2 3; do echo $i; sleep 1; done"):
                if event.type == "stdout":
                    print(event.data, end="")
        """
        ws = _ws.open_sync(self._client, _exec_stream_path(self._capsule_id))
        yield from _follow_sync(ws, _stream_start(cmd, args, envs, cwd, timeout))

    def connect(self, pid: int | str) -> Iterator[StreamEvent]:
        """Follow a background process (by pid or tag): a :class:`StreamStartEvent`, its
        output so far (the last 4 MiB per stream), then live output until its
        :class:`StreamExitEvent`. Leaving the loop early leaves the process running."""
        ws = _ws.open_sync(self._client, _process_stream_path(self._capsule_id, pid))
        yield from _follow_sync(ws, None)


class AsyncCommands:
    """Async twin of :class:`Commands`. Reached as ``capsule.commands`` on an AsyncCapsule."""

    def __init__(self, capsule_id: str, client: AsyncWrennClient) -> None:
        self._capsule_id = capsule_id
        self._client = client

    @overload
    async def run(
        self,
        cmd: str,
        background: Literal[False] = False,
        timeout: int | None = 30,
        envs: dict[str, str] | None = None,
        cwd: str | None = None,
        tag: str | None = None,
    ) -> ExecResult: ...

    @overload
    async def run(
        self,
        cmd: str,
        background: Literal[True],
        timeout: int | None = 30,
        envs: dict[str, str] | None = None,
        cwd: str | None = None,
        tag: str | None = None,
    ) -> BackgroundProcess: ...

    async def run(
        self,
        cmd: str,
        background: bool = False,
        timeout: int | None = 30,
        envs: dict[str, str] | None = None,
        cwd: str | None = None,
        tag: str | None = None,
    ) -> ExecResult | BackgroundProcess:
        """Run a shell command line in the capsule. See :meth:`Commands.run`."""
        return await self._client._call(
            _run_call(self._capsule_id, cmd, background, timeout, envs, cwd, tag)
        )

    async def list(self) -> builtins.list[ProcessInfo]:
        """List the background processes running in the capsule."""
        return await self._client._call(_list_call(self._capsule_id))

    async def kill(self, pid: int | str, signal: str | int = "SIGKILL") -> None:
        """Signal a background process by pid or tag. See :meth:`Commands.kill`."""
        await self._client._call(_kill_call(self._capsule_id, pid, signal))

    async def stream(
        self,
        cmd: str,
        args: builtins.list[str] | None = None,
        *,
        envs: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[StreamEvent]:
        """Run a command and yield its output as it is produced. See :meth:`Commands.stream`."""
        ws = await _ws.aopen(self._client, _exec_stream_path(self._capsule_id))
        async with aclosing(_follow_async(ws, _stream_start(cmd, args, envs, cwd, timeout))) as events:
            async for event in events:
                yield event

    async def connect(self, pid: int | str) -> AsyncIterator[StreamEvent]:
        """Follow a background process by pid or tag. See :meth:`Commands.connect`."""
        ws = await _ws.aopen(self._client, _process_stream_path(self._capsule_id, pid))
        async with aclosing(_follow_async(ws, None)) as events:
            async for event in events:
                yield event
