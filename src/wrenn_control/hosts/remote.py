"""`RemoteHostAgent`: a host agent on another machine, reached over HTTP (wrenn_host.service).

Same contract as the in-process agent: results decoded into the api dataclasses, errors re-raised
as the `HostAgentError` subclass the host raised. A host that cannot be reached (refused, reset,
timed out) raises `HostUnreachable` (code ``host_unavailable``).
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import httpx
import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from wrenn_host import api
from wrenn_host.network.policy import EgressPolicy
from wrenn_host.service import wire
from wrenn_host.service.tls import pinned_context


class HostUnreachable(api.HostAgentError):
    """The host agent did not answer (connection refused or broken, or too slow)."""

    code = "host_unavailable"


# Per-call read timeouts (seconds). Restores, pauses and snapshots copy guest memory: on TCG a
# create can take a minute; exec waits for the command's own timeout.
SLOW = {"create": 300.0, "resume": 300.0, "pause": 300.0, "snapshot": 600.0, "destroy": 120.0,
        "delete_template": 120.0, "start": 600.0, "template_info": 60.0}
DEFAULT_TIMEOUT = 30.0
CONNECT_TIMEOUT = 5.0
WS_MESSAGE = 1024 * 1024  # a tunnel write goes in messages of at most this


class RemoteHostAgent(api.HostAgent):
    def __init__(self, base_url: str, control_token: str, *, tls_cert: str | None = None,
                 transport: httpx.AsyncBaseTransport | None = None):
        """`tls_cert`: the PEM certificate the agent registered with (an https address): it
        alone is trusted for this host. Without it an https address is checked against the
        system's CAs."""
        self.base_url = base_url.rstrip("/")
        self._token = control_token
        self._headers = {"Authorization": f"Bearer {control_token}"}
        self._tls = pinned_context(tls_cert) if tls_cert else None
        # No cap on connections: every attached process or terminal holds one for as long as it
        # is watched, and a capped pool would make other calls wait behind them.
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self._headers, transport=transport,
                                       verify=self._tls or True,
                                       timeout=httpx.Timeout(DEFAULT_TIMEOUT, connect=CONNECT_TIMEOUT),
                                       limits=httpx.Limits(max_connections=None, max_keepalive_connections=32))

    def __repr__(self) -> str:
        return f"RemoteHostAgent({self.base_url!r})"

    # ---- plumbing ------------------------------------------------------------------------------

    def _unreachable(self, exc: Exception) -> HostUnreachable:
        return HostUnreachable(f"host agent at {self.base_url} is unavailable: {type(exc).__name__}: {exc}")

    def _raise_for(self, resp: httpx.Response) -> None:
        if resp.is_success:
            return
        try:
            body = resp.json()
        except ValueError:
            body = None
        raise wire.error_from_wire(body, f"host agent answered {resp.status_code}")

    async def _call(self, method: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        body = wire.encode_args(method, args, kwargs)
        read = timeout if timeout is not None else SLOW.get(method, DEFAULT_TIMEOUT)
        try:
            resp = await self._http.post(f"/host/v1/{method}", json=body,
                                         timeout=httpx.Timeout(read, connect=CONNECT_TIMEOUT))
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        self._raise_for(resp)
        return wire.decode_result(method, resp.json())

    @contextlib.asynccontextmanager
    async def _stream(self, method: str, *, json_body: dict | None = None, params: dict | None = None,
                      content: Any = None, read: float | None = None,
                      headers: dict[str, str] | None = None) -> AsyncIterator[httpx.Response]:
        try:
            req = self._http.build_request("POST", f"/host/v1/{method}", json=json_body, params=params,
                                           content=content, headers=headers,
                                           timeout=httpx.Timeout(read, connect=CONNECT_TIMEOUT))
            resp = await self._http.send(req, stream=True)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        try:
            if not resp.is_success:
                await resp.aread()
                self._raise_for(resp)
            yield resp
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        finally:
            await resp.aclose()

    # ---- agent ---------------------------------------------------------------------------------

    async def start(self, known: dict[str, str]) -> api.ReconcileReport:
        return await self._call("start", known)

    async def close(self) -> None:
        """Closes this client only: the host agent and its capsules go on."""
        await self._http.aclose()

    async def health(self) -> dict[str, Any]:
        try:
            resp = await self._http.get("/host/v1/health")
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        self._raise_for(resp)
        return resp.json()

    async def limits(self) -> api.HostLimits:
        return await self._call("limits")

    async def capacity(self) -> dict[str, int | None]:
        return await self._call("capacity")

    async def builtin_templates(self) -> list[api.TemplateRuntime]:
        return await self._call("builtin_templates")

    async def metrics_text(self) -> str:
        """The host's Prometheus metrics, as text."""
        try:
            resp = await self._http.get("/metrics")
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        self._raise_for(resp)
        return resp.text

    # ---- lifecycle and templates ---------------------------------------------------------------

    async def create(self, capsule_id: str, template_id: str, vcpus: int | None, memory_mb: int | None,
                     network: EgressPolicy | None = None) -> api.CapsuleRuntime:
        return await self._call("create", capsule_id, template_id, vcpus, memory_mb, network)

    async def update_network(self, capsule_id: str, policy: EgressPolicy) -> None:
        await self._call("update_network", capsule_id, policy)

    async def pause(self, capsule_id: str) -> None:
        await self._call("pause", capsule_id)

    async def resume(self, capsule_id: str) -> api.CapsuleRuntime:
        return await self._call("resume", capsule_id)

    async def destroy(self, capsule_id: str) -> None:
        await self._call("destroy", capsule_id)

    async def get(self, capsule_id: str) -> api.CapsuleRuntime:
        return await self._call("get", capsule_id)

    async def snapshot(self, capsule_id: str, template_id: str) -> api.TemplateRuntime:
        return await self._call("snapshot", capsule_id, template_id)

    async def delete_template(self, template_id: str) -> None:
        await self._call("delete_template", template_id)

    async def template_info(self, template_id: str) -> api.TemplateRuntime:
        return await self._call("template_info", template_id)

    # ---- commands and processes ----------------------------------------------------------------

    async def exec(self, capsule_id: str, cmd: str, args: list[str], *, envs: dict[str, str] | None = None,
                   cwd: str | None = None, timeout_sec: float = 30,
                   max_output_bytes: int | None = None) -> api.ExecResult:
        return await self._call("exec", capsule_id, cmd, args, envs=envs, cwd=cwd, timeout_sec=timeout_sec,
                                max_output_bytes=max_output_bytes, timeout=float(timeout_sec) + 30)

    async def spawn(self, capsule_id: str, cmd: str, args: list[str], *, envs: dict[str, str] | None = None,
                    cwd: str | None = None, tag: str | None = None) -> api.ProcessInfo:
        return await self._call("spawn", capsule_id, cmd, args, envs=envs, cwd=cwd, tag=tag)

    async def processes(self, capsule_id: str) -> list[api.ProcessInfo]:
        return await self._call("processes", capsule_id)

    async def set_defaults(self, capsule_id: str, *, user: str | None = None, cwd: str | None = None,
                           envs: dict[str, str] | None = None) -> api.GuestDefaults:
        return await self._call("set_defaults", capsule_id, user=user, cwd=cwd, envs=envs)

    async def kill(self, capsule_id: str, target: int | str, signal: str = "SIGKILL") -> None:
        await self._call("kill", capsule_id, target, signal)

    async def _events(self, method: str, capsule_id: str, target: int | str) -> AsyncIterator[api.StreamEvent]:
        body = wire.encode_args(method, (capsule_id, target), {})
        async with self._stream(method, json_body=body) as resp:  # silent for as long as the process is
            async for line in resp.aiter_lines():
                if not line:
                    continue
                item = json.loads(line)
                if "error" in item:
                    raise wire.error_from_wire(item)
                yield wire.decode(api.StreamEvent, item)

    def attach(self, capsule_id: str, target: int | str) -> AsyncIterator[api.StreamEvent]:
        return self._events("attach", capsule_id, target)

    # ---- terminals -----------------------------------------------------------------------------

    async def pty_start(self, capsule_id: str, cmd: str = "/bin/bash", args: list[str] | None = None, *,
                        cols: int = 80, rows: int = 24, envs: dict[str, str] | None = None,
                        cwd: str | None = None, tag: str | None = None) -> api.ProcessInfo:
        return await self._call("pty_start", capsule_id, cmd, args, cols=cols, rows=rows, envs=envs, cwd=cwd, tag=tag)

    async def pty_sessions(self, capsule_id: str) -> list[api.ProcessInfo]:
        return await self._call("pty_sessions", capsule_id)

    def pty_attach(self, capsule_id: str, target: int | str) -> AsyncIterator[api.StreamEvent]:
        return self._events("pty_attach", capsule_id, target)

    async def pty_input(self, capsule_id: str, target: int | str, data: bytes) -> None:
        await self._call("pty_input", capsule_id, target, data)

    async def pty_resize(self, capsule_id: str, target: int | str, cols: int, rows: int) -> None:
        await self._call("pty_resize", capsule_id, target, cols, rows)

    async def pty_kill(self, capsule_id: str, target: int | str, signal: str = "SIGKILL") -> None:
        await self._call("pty_kill", capsule_id, target, signal)

    # ---- files ---------------------------------------------------------------------------------

    async def read_file(self, capsule_id: str, path: str) -> bytes:
        return b"".join([chunk async for chunk in self.read_file_stream(capsule_id, path)])

    async def read_file_stream(self, capsule_id: str, path: str) -> AsyncIterator[bytes]:  # type: ignore[override]
        body = wire.encode_args("read_file_stream", (capsule_id, path), {})
        async with self._stream("read_file_stream", json_body=body, read=120.0) as resp:
            async for chunk in resp.aiter_raw():
                if chunk:
                    yield chunk

    async def write_file(self, capsule_id: str, path: str, data: bytes | AsyncIterator[bytes]) -> int:
        async with self._stream("write_file", params={"capsule_id": capsule_id, "path": path}, content=data,
                                read=300.0) as resp:
            await resp.aread()
            return int(resp.json())

    async def list_dir(self, capsule_id: str, path: str, depth: int = 1) -> list[api.FileInfo]:
        return await self._call("list_dir", capsule_id, path, depth)

    async def stat(self, capsule_id: str, path: str) -> api.FileInfo:
        return await self._call("stat", capsule_id, path)

    async def mkdir(self, capsule_id: str, path: str) -> api.FileInfo:
        return await self._call("mkdir", capsule_id, path)

    async def remove(self, capsule_id: str, path: str) -> None:
        await self._call("remove", capsule_id, path)

    async def metrics(self, capsule_id: str) -> api.CapsuleMetrics:
        return await self._call("metrics", capsule_id)

    # ---- moving templates and paused capsules between hosts --------------------------------------

    async def archive_manifest(self, kind: str, object_id: str) -> api.ArchiveManifest:
        return await self._call("archive_manifest", kind, object_id, timeout=600.0)  # hashes GiBs

    async def read_archive(self, kind: str, object_id: str) -> AsyncIterator[bytes]:  # type: ignore[override]
        body = wire.encode_args("read_archive", (kind, object_id), {})
        async with self._stream("read_archive", json_body=body, read=300.0) as resp:
            async for chunk in resp.aiter_raw():
                if chunk:
                    yield chunk

    async def write_archive(self, kind: str, object_id: str, data: AsyncIterator[bytes],
                            manifest: api.ArchiveManifest) -> None:
        header = base64.urlsafe_b64encode(json.dumps(api.to_wire(manifest)).encode()).decode()
        async with self._stream("write_archive", params={"kind": kind, "object_id": object_id}, content=data,
                                headers={"X-Wrenn-Manifest": header}, read=600.0) as resp:
            await resp.aread()

    # ---- ports ---------------------------------------------------------------------------------

    async def tcp_connect(self, capsule_id: str, port: int) -> api.Tunnel:
        url = self.base_url.replace("http", "ws", 1) + "/host/v1/tcp_connect?" + urlencode(
            {"capsule_id": capsule_id, "port": port})
        try:
            ws = await connect(url, additional_headers=self._headers, open_timeout=CONNECT_TIMEOUT + 10,
                               max_size=16 * WS_MESSAGE, compression=None, ping_interval=20, ping_timeout=60,
                               **({"ssl": self._tls} if self._tls is not None and url.startswith("wss:") else {}))
        except InvalidStatus as exc:
            status = exc.response.status_code
            raise api.HostAgentError(f"host agent refused the tunnel ({status})",
                                     code="unauthorized" if status in (401, 403) else None) from exc
        except (OSError, TimeoutError, websockets.exceptions.WebSocketException) as exc:
            raise self._unreachable(exc) from exc
        try:
            first = json.loads(await ws.recv())
        except (ConnectionClosed, ValueError, TypeError) as exc:
            await ws.close()
            raise self._unreachable(exc) from exc
        if "error" in first:
            await ws.close()
            raise wire.error_from_wire(first)
        return RemoteTunnel(ws, self)


class RemoteTunnel(api.Tunnel):
    """A tunnel over a WebSocket to the host agent (protocol in wrenn_host.service.app._tunnel)."""

    def __init__(self, ws: ClientConnection, agent: RemoteHostAgent):
        self._ws = ws
        self._agent = agent
        self._eof = False
        self._closed = False

    async def read(self) -> bytes:
        if self._eof or self._closed:
            return b""
        try:
            msg = await self._ws.recv()
        except ConnectionClosed as exc:
            if self._closed or (exc.rcvd is not None and exc.rcvd.code == 1000):
                self._eof = True
                return b""
            raise api.HostAgentError(f"tunnel broke: {exc}") from exc
        if isinstance(msg, bytes):
            return msg
        item = json.loads(msg)
        if "error" in item:
            self._eof = True
            raise wire.error_from_wire(item)
        self._eof = True  # {"eof": true}: the service closed its side
        return b""

    async def write(self, data: bytes) -> None:
        if self._closed:
            raise api.HostAgentError("the tunnel is closed")
        try:
            for i in range(0, len(data), WS_MESSAGE):
                await self._ws.send(data[i:i + WS_MESSAGE])
        except ConnectionClosed as exc:
            raise api.HostAgentError(f"tunnel broke: {exc}") from exc

    async def write_eof(self) -> None:
        if not self._closed:
            with contextlib.suppress(ConnectionClosed):
                await self._ws.send(json.dumps({"eof": True}))

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._ws.close()


__all__ = ["HostUnreachable", "RemoteHostAgent", "RemoteTunnel"]
