"""Running commands in a capsule: ``capsule.commands``."""

from __future__ import annotations

import builtins
import signal as _signal
from typing import TYPE_CHECKING, Any, Literal, overload

import httpx

from wrenn._client import _Call, _path, parse_none
from wrenn._models import BackgroundProcess, ExecResult, ProcessInfo

if TYPE_CHECKING:
    from wrenn._client import AsyncWrennClient, WrennClient

__all__ = ["AsyncCommands", "Commands"]

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
