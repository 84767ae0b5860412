"""`Capsule` / `AsyncCapsule` with `run_code`: a capsule of template code-runner-beta whose Jupyter
server (port 8888, no token) is reached through the port proxy with the team's X-API-Key header."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
from websockets.asyncio.client import connect as aconnect
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as sconnect

from wrenn import async_capsule as async_base
from wrenn import capsule as base
from wrenn.code_runner._jupyter import JUPYTER_PORT, KERNEL_RETRY_S, Collector, check_language, execute_request, pick_kernel
from wrenn.code_runner.models import Execution, ExecutionError, Result

DEFAULT_TEMPLATE = "code-runner-beta"
DEFAULT_KERNEL = "wrenn"
_WS_OPEN_TIMEOUT = 30.0


def _ws_base(http_url: str) -> str:
    return "ws" + http_url[len("http"):]


def _endpoint(proxy_url: str, base_url: str) -> tuple[str, dict[str, str], tuple[str, int] | None]:
    """(URL to send HTTP to, extra headers, address to open WebSocket sockets to).

    The port proxy is the API server itself when its domain is the API's own host (the default of
    a self-hosted server: `{port}-{id}.127.0.0.1:8080`, which no resolver knows) or a `*.localhost`
    name (loopback by RFC 6761, though glibc does not resolve it): then connect to that address and
    name the capsule in the Host header, as the proxy routes by Host. Any other domain is DNS's."""
    proxy, api = httpx.URL(proxy_url), httpx.URL(base_url)
    suffix = proxy.host.split(".", 1)[1] if "." in proxy.host else ""
    if proxy.scheme != "http" or (suffix != api.host and not proxy.host.endswith(".localhost")):
        return proxy_url, {}, None
    host, port = ("127.0.0.1" if proxy.host.endswith(".localhost") else api.host), proxy.port or 80
    host_header = f"{proxy.host}:{port}" if proxy.port else proxy.host
    return f"http://{host}:{port}", {"Host": host_header}, (host, port)


class Capsule(base.Capsule):
    """A code runner capsule: `run_code` executes Python in one kernel that keeps its state.

    Args: as :class:`wrenn.Capsule` (template defaults to ``code-runner-beta``), plus
        kernel: the Jupyter kernelspec to use (default ``wrenn``).
    """

    def __init__(self, template: str | None = None, vcpus: int | None = None, memory_mb: int | None = None,
                 timeout: int | None = None, *, kernel: str | None = None, **kwargs: Any) -> None:
        self._kernel_name = kernel or DEFAULT_KERNEL
        self._kernel_id: str | None = None
        self._http: httpx.Client | None = None
        self._ws: Any = None
        super().__init__(template or DEFAULT_TEMPLATE, vcpus, memory_mb, timeout, **kwargs)

    @classmethod
    def create(cls, template: str | None = None, vcpus: int | None = None, memory_mb: int | None = None,  # type: ignore[override]
               timeout: int | None = None, *, kernel: str | None = None, wait: bool = False,
               api_key: str | None = None, base_url: str | None = None, **kwargs: Any) -> Capsule:
        return cls(template, vcpus, memory_mb, timeout, kernel=kernel, wait=wait, api_key=api_key,
                   base_url=base_url, **kwargs)

    def _jupyter(self) -> httpx.Client:
        if self._http is None:
            url, headers, _ = _endpoint(self.get_url(JUPYTER_PORT), self._client.base_url)
            self._http = httpx.Client(base_url=url, headers={"X-API-Key": self._client._api_key, **headers},
                                      timeout=30)
        return self._http

    def _ensure_kernel(self, jupyter_timeout: float) -> str:
        """A running kernel of our kernelspec (the template starts one), else a new one."""
        if self._kernel_id is not None:
            return self._kernel_id
        deadline = time.monotonic() + jupyter_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                resp = self._jupyter().get("/api/kernels")
                if resp.status_code < 500:
                    resp.raise_for_status()
                    self._kernel_id = pick_kernel(resp.json(), self._kernel_name)
                    if self._kernel_id is None:
                        resp = self._jupyter().post("/api/kernels", json={"name": self._kernel_name})
                        resp.raise_for_status()
                        self._kernel_id = resp.json()["id"]
                    return self._kernel_id
                last = RuntimeError(f"Jupyter answered {resp.status_code}")
            except httpx.HTTPStatusError:
                raise
            except httpx.HTTPError as exc:  # not up yet (the proxy answers 502 meanwhile)
                last = exc
            time.sleep(KERNEL_RETRY_S)
        raise TimeoutError(f"Jupyter not available within {jupyter_timeout}s: {last}")

    def _channels(self, kernel_id: str) -> Any:
        if self._ws is None:
            proxy = self.get_url(JUPYTER_PORT)
            _, _, addr = _endpoint(proxy, self._client.base_url)
            sock = socket.create_connection(addr, timeout=_WS_OPEN_TIMEOUT) if addr else None
            self._ws = sconnect(_ws_base(proxy) + f"/api/kernels/{kernel_id}/channels", sock=sock, legacy=True,
                                additional_headers={"X-API-Key": self._client._api_key},
                                open_timeout=_WS_OPEN_TIMEOUT, max_size=None, compression=None)
        return self._ws

    def run_code(self, code: str, language: str = "python", timeout: float = 30, jupyter_timeout: float = 30,
                 on_result: Callable[[Result], Any] | None = None, on_stdout: Callable[[str], Any] | None = None,
                 on_stderr: Callable[[str], Any] | None = None,
                 on_error: Callable[[ExecutionError], Any] | None = None) -> Execution:
        """Run `code` in the kernel; variables, imports and functions stay for the next call.
        A raised exception is returned as ``execution.error`` (an :class:`ExecutionError`)."""
        check_language(language)
        kernel_id = self._ensure_kernel(jupyter_timeout)
        msg = execute_request(code)
        col = Collector(msg["header"]["msg_id"], on_result, on_stdout, on_stderr, on_error)
        deadline = time.monotonic() + timeout
        try:
            ws = self._channels(kernel_id)
            ws.send(json.dumps(msg))
            while (left := deadline - time.monotonic()) > 0:
                try:
                    raw = ws.recv(timeout=left)
                except TimeoutError:
                    break
                if col.feed(json.loads(raw)):
                    return col.execution
        except (ConnectionClosed, OSError) as exc:
            self._close_ws()
            col.error(ExecutionError("Disconnected", f"kernel WebSocket closed: {exc}"))
            col.execution.timed_out = True
            return col.execution
        return col.timed_out(timeout)

    def _close_ws(self) -> None:
        if self._ws is not None:
            try:
                self._ws.close()
            except Exception:
                pass
            self._ws = None

    def close(self) -> None:
        self._close_ws()
        if self._http is not None:
            self._http.close()
            self._http = None
        super().close()

    def _discard(self) -> None:
        self._close_ws()
        if self._http is not None:
            self._http.close()
            self._http = None
        super()._discard()


class AsyncCapsule(async_base.AsyncCapsule):
    """The async twin: ``await capsule.run_code(...)``."""

    def __init__(self, template: str | None = None, vcpus: int | None = None, memory_mb: int | None = None,
                 timeout: int | None = None, *, kernel: str | None = None, **kwargs: Any) -> None:
        self._kernel_name = kernel or DEFAULT_KERNEL
        self._kernel_id: str | None = None
        self._http: httpx.AsyncClient | None = None
        self._ws: Any = None
        super().__init__(template or DEFAULT_TEMPLATE, vcpus, memory_mb, timeout, **kwargs)

    @classmethod
    async def create(cls, template: str | None = None, vcpus: int | None = None, memory_mb: int | None = None,  # type: ignore[override]
                     timeout: int | None = None, *, kernel: str | None = None, wait: bool = False,
                     api_key: str | None = None, base_url: str | None = None, **kwargs: Any) -> AsyncCapsule:
        return await cls(template, vcpus, memory_mb, timeout, kernel=kernel, wait=wait, api_key=api_key,
                         base_url=base_url, **kwargs)

    def _jupyter(self) -> httpx.AsyncClient:
        if self._http is None:
            url, headers, _ = _endpoint(self.get_url(JUPYTER_PORT), self._client.base_url)
            self._http = httpx.AsyncClient(base_url=url, headers={"X-API-Key": self._client._api_key, **headers},
                                           timeout=30)
        return self._http

    async def _ensure_kernel(self, jupyter_timeout: float) -> str:
        if self._kernel_id is not None:
            return self._kernel_id
        deadline = time.monotonic() + jupyter_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                resp = await self._jupyter().get("/api/kernels")
                if resp.status_code < 500:
                    resp.raise_for_status()
                    self._kernel_id = pick_kernel(resp.json(), self._kernel_name)
                    if self._kernel_id is None:
                        resp = await self._jupyter().post("/api/kernels", json={"name": self._kernel_name})
                        resp.raise_for_status()
                        self._kernel_id = resp.json()["id"]
                    return self._kernel_id
                last = RuntimeError(f"Jupyter answered {resp.status_code}")
            except httpx.HTTPStatusError:
                raise
            except httpx.HTTPError as exc:
                last = exc
            await asyncio.sleep(KERNEL_RETRY_S)
        raise TimeoutError(f"Jupyter not available within {jupyter_timeout}s: {last}")

    async def run_code(self, code: str, language: str = "python", timeout: float = 30, jupyter_timeout: float = 30,
                       on_result: Callable[[Result], Any] | None = None, on_stdout: Callable[[str], Any] | None = None,
                       on_stderr: Callable[[str], Any] | None = None,
                       on_error: Callable[[ExecutionError], Any] | None = None) -> Execution:
        """As :meth:`Capsule.run_code`."""
        check_language(language)
        kernel_id = await self._ensure_kernel(jupyter_timeout)
        msg = execute_request(code)
        col = Collector(msg["header"]["msg_id"], on_result, on_stdout, on_stderr, on_error)
        deadline = time.monotonic() + timeout
        try:
            if self._ws is None:
                proxy = self.get_url(JUPYTER_PORT)
                _, _, addr = _endpoint(proxy, self._client.base_url)
                sock = None
                if addr:
                    sock = await asyncio.to_thread(socket.create_connection, addr, _WS_OPEN_TIMEOUT)
                    sock.setblocking(False)
                self._ws = await aconnect(_ws_base(proxy) + f"/api/kernels/{kernel_id}/channels", sock=sock,
                                          additional_headers={"X-API-Key": self._client._api_key},
                                          open_timeout=_WS_OPEN_TIMEOUT, max_size=None, compression=None)
            await self._ws.send(json.dumps(msg))
            while (left := deadline - time.monotonic()) > 0:
                try:
                    raw = await asyncio.wait_for(self._ws.recv(), left)
                except asyncio.TimeoutError:
                    break
                if col.feed(json.loads(raw)):
                    return col.execution
        except (ConnectionClosed, OSError) as exc:
            await self._close_ws()
            col.error(ExecutionError("Disconnected", f"kernel WebSocket closed: {exc}"))
            col.execution.timed_out = True
            return col.execution
        return col.timed_out(timeout)

    async def _close_ws(self) -> None:
        if self._ws is not None:
            try:
                await self._ws.close()
            except Exception:
                pass
            self._ws = None

    async def aclose(self) -> None:
        await self._close_ws()
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        await super().aclose()

    async def _discard(self) -> None:
        await self._close_ws()
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        await super()._discard()
