"""The host agent methods that are the guest agent's: commands, terminals, files and ports.

Each one finds the capsule's guest connection (`_guest`, which refuses a capsule that is not
running) and translates between the guest protocol (wrenn_guest/PROTOCOL.md) and the typed
results of the host contract (api.py). `LocalHostAgent` mixes this in.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from wrenn_guest.protocol import MAX_PAYLOAD
from wrenn_host import api
from wrenn_host.capsule import LocalCapsule
from wrenn_host.guest import GuestClient
from wrenn_host.network.inbound import StreamTunnel, connect_in_netns
from wrenn_host.network.slots import GUEST_IP

log = logging.getLogger(__name__)


class GuestCalls:
    def _get(self, capsule_id: str) -> LocalCapsule:
        raise NotImplementedError

    def _guest(self, capsule_id: str) -> GuestClient:
        raise NotImplementedError

    # ------------------------------------------------------------------ commands

    async def exec(self, capsule_id: str, cmd: str, args: list[str], *, envs: dict[str, str] | None = None,
                   cwd: str | None = None, timeout_sec: float = 30,
                   max_output_bytes: int | None = None) -> api.ExecResult:
        res, payload = await self._guest(capsule_id).call(
            "exec", cmd=cmd, args=list(args), envs=envs or {}, cwd=cwd, timeout_sec=timeout_sec,
            max_output_bytes=max_output_bytes)
        n = res["stdout_len"]
        return api.ExecResult(stdout=payload[:n], stderr=payload[n:n + res["stderr_len"]], exit_code=res["exit_code"],
                              duration_ms=res["duration_ms"], timed_out=bool(res.get("timed_out")),
                              stdout_truncated=bool(res.get("stdout_truncated")),
                              stderr_truncated=bool(res.get("stderr_truncated")))

    async def spawn(self, capsule_id: str, cmd: str, args: list[str], *, envs: dict[str, str] | None = None,
                    cwd: str | None = None, tag: str | None = None) -> api.ProcessInfo:
        res, _ = await self._guest(capsule_id).call("spawn", cmd=cmd, args=list(args), envs=envs or {}, cwd=cwd, tag=tag)
        return api.ProcessInfo(pid=res["pid"], tag=res["tag"], cmd=cmd, args=list(args), running=True, exit_code=None)

    async def set_defaults(self, capsule_id: str, *, user: str | None = None, cwd: str | None = None,
                           envs: dict[str, str] | None = None) -> api.GuestDefaults:
        fields = {k: v for k, v in (("user", user), ("cwd", cwd), ("envs", envs)) if v is not None}
        res, _ = await self._guest(capsule_id).call("defaults", **fields)
        return api.GuestDefaults(user=res["user"], uid=res["uid"], cwd=res["cwd"], envs=res.get("envs") or {})

    async def processes(self, capsule_id: str) -> list[api.ProcessInfo]:
        res, _ = await self._guest(capsule_id).call("ps")
        return [api.ProcessInfo(pid=p["pid"], tag=p["tag"], cmd=p["cmd"], args=p.get("args", []),
                                running=p.get("running", True), exit_code=p.get("exit_code"))
                for p in res["processes"]]

    async def kill(self, capsule_id: str, target: int | str, signal: str = "SIGKILL") -> None:
        await self._guest(capsule_id).call("kill", target=target, signal=signal)

    async def attach(self, capsule_id: str, target: int | str) -> AsyncIterator[api.StreamEvent]:
        async for header, payload in self._guest(capsule_id).stream("attach", target=target):
            if header.get("type") == "data":
                yield api.StreamEvent(header.get("stream", "stdout"), payload)
            elif header.get("type") == "result":
                yield api.StreamEvent("exit", exit_code=header.get("exit_code"))

    # ------------------------------------------------------------------ terminals

    async def pty_start(self, capsule_id: str, cmd: str = "/bin/bash", args: list[str] | None = None, *,
                        cols: int = 80, rows: int = 24, envs: dict[str, str] | None = None,
                        cwd: str | None = None, tag: str | None = None) -> api.ProcessInfo:
        args = list(args or [])
        res, _ = await self._guest(capsule_id).call("pty_start", cmd=cmd, args=args, cols=cols, rows=rows,
                                                    envs=envs or {}, cwd=cwd, tag=tag)
        return api.ProcessInfo(pid=res["pid"], tag=res["tag"], cmd=cmd, args=args, running=True, exit_code=None)

    async def pty_sessions(self, capsule_id: str) -> list[api.ProcessInfo]:
        res, _ = await self._guest(capsule_id).call("pty_list")
        return [api.ProcessInfo(pid=p["pid"], tag=p["tag"], cmd=p["cmd"], args=p.get("args", []),
                                running=p.get("running", True), exit_code=p.get("exit_code"))
                for p in res["sessions"]]

    async def pty_attach(self, capsule_id: str, target: int | str) -> AsyncIterator[api.StreamEvent]:
        async for header, payload in self._guest(capsule_id).stream("pty_attach", target=target):
            if header.get("type") == "data":
                yield api.StreamEvent("output", payload)
            elif header.get("type") == "result":
                yield api.StreamEvent("exit", exit_code=header.get("exit_code"))

    async def pty_input(self, capsule_id: str, target: int | str, data: bytes) -> None:
        guest = self._guest(capsule_id)
        for i in range(0, len(data), MAX_PAYLOAD):
            await guest.call("pty_input", data[i:i + MAX_PAYLOAD], target=target)

    async def pty_resize(self, capsule_id: str, target: int | str, cols: int, rows: int) -> None:
        await self._guest(capsule_id).call("pty_resize", target=target, cols=cols, rows=rows)

    async def pty_kill(self, capsule_id: str, target: int | str, signal: str = "SIGKILL") -> None:
        await self._guest(capsule_id).call("pty_kill", target=target, signal=signal)

    # ------------------------------------------------------------------ files

    async def read_file(self, capsule_id: str, path: str) -> bytes:
        return b"".join([chunk async for chunk in self.read_file_stream(capsule_id, path)])

    async def read_file_stream(self, capsule_id: str, path: str) -> AsyncIterator[bytes]:
        async for header, payload in self._guest(capsule_id).stream("file_read", path=path):
            if header.get("type") == "data":
                yield payload

    async def write_file(self, capsule_id: str, path: str, data: bytes | AsyncIterator[bytes]) -> int:
        res = await self._guest(capsule_id).upload("file_write", data, path=path)
        return int(res.get("size", 0))

    async def list_dir(self, capsule_id: str, path: str, depth: int = 1) -> list[api.FileInfo]:
        res, _ = await self._guest(capsule_id).call("list", path=path, depth=depth)
        return [api.from_wire(api.FileInfo, e) for e in res["entries"]]

    async def stat(self, capsule_id: str, path: str) -> api.FileInfo:
        res, _ = await self._guest(capsule_id).call("stat", path=path)
        return api.from_wire(api.FileInfo, res["entry"])

    async def mkdir(self, capsule_id: str, path: str) -> api.FileInfo:
        res, _ = await self._guest(capsule_id).call("mkdir", path=path)
        return api.from_wire(api.FileInfo, res["entry"])

    async def remove(self, capsule_id: str, path: str) -> None:
        await self._guest(capsule_id).call("remove", path=path)

    async def metrics(self, capsule_id: str) -> api.CapsuleMetrics:
        res, _ = await self._guest(capsule_id).call("metrics")
        return api.from_wire(api.CapsuleMetrics, res)

    # ------------------------------------------------------------------ ports

    async def tcp_connect(self, capsule_id: str, port: int) -> api.Tunnel:
        """Over the NIC when the service listens on it (faster, see network/inbound.py), else
        through the guest agent, which reaches the guest's loopback."""
        guest = self._guest(capsule_id)
        slot = self._get(capsule_id).slot
        if slot is not None:
            try:
                sock = await asyncio.to_thread(connect_in_netns, slot.netns, (GUEST_IP, port))
                return await StreamTunnel.open(sock)
            except ConnectionRefusedError:
                pass  # nothing on the NIC's address: maybe on loopback only
            except OSError as e:
                log.info("capsule %s: port %s over the NIC failed (%s); using the guest agent", capsule_id, port, e)
        return await guest.open_tunnel("tcp_connect", port=port)

    def open_requests(self, capsule_id: str) -> int:
        """Guest agent requests in flight on this capsule's channel (tests check for leaks)."""
        cap = self._get(capsule_id)
        return len(cap.guest._pending) if cap.guest is not None else 0


__all__ = ["GuestCalls"]
