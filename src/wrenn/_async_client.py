"""The asynchronous client: :class:`AsyncWrennClient` and its resources.

It sends the same calls as :class:`~wrenn.WrennClient` (built in :mod:`wrenn._calls`) and shares
its configuration and retry rules through :class:`wrenn._base_client._BaseClient`.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from datetime import date
from typing import Any, TypeVar

import httpx

from wrenn._calls import (
    _Call,
    _SSEParser,
    capsule_action_call,
    capsule_metrics_call,
    capsule_stats_call,
    capsule_usage_call,
    create_capsule_call,
    create_snapshot_call,
    delete_snapshot_call,
    destroy_capsule_call,
    events_stream_call,
    get_capsule_call,
    list_capsules_call,
    list_snapshots_call,
    ping_capsule_call,
    update_network_call,
)
from wrenn._base_client import _BaseClient
from wrenn._exceptions import error_from_response, error_from_transport
from wrenn._models import CapsuleInfo, CapsuleMetrics, CapsuleStats, SSEEvent, Template, UsageResponse
from wrenn._wait import DEFAULT_WAIT_TIMEOUT, adrive, wait_flow

__all__ = ["AsyncWrennClient"]

T = TypeVar("T")


class AsyncCapsulesResource:
    """Async capsule control-plane operations: ``client.capsules``. Every method is a coroutine."""

    def __init__(self, client: AsyncWrennClient) -> None:
        self._client = client

    async def create(
        self,
        template: str | None = None,
        vcpus: int | None = None,
        memory_mb: int | None = None,
        timeout_sec: int | None = None,
        *,
        metadata: dict[str, str] | None = None,
        allow_internet_access: bool | None = None,
        network: dict[str, Any] | None = None,
    ) -> CapsuleInfo:
        """Create a capsule. See :meth:`CapsulesResource.create`."""
        return await self._client._call(
            create_capsule_call(template, vcpus, memory_mb, timeout_sec, metadata,
                                allow_internet_access, network)
        )

    async def update_network(
        self,
        id: str,
        *,
        allow_internet_access: bool | None = None,
        network: dict[str, Any] | None = None,
    ) -> CapsuleInfo:
        """See :meth:`CapsulesResource.update_network`."""
        return await self._client._call(update_network_call(id, allow_internet_access, network))

    async def get(self, id: str) -> CapsuleInfo:
        """Get one capsule by ID."""
        return await self._client._call(get_capsule_call(id))

    async def list(self) -> builtins.list[CapsuleInfo]:
        """List the team's capsules, newest first."""
        return await self._client._call(list_capsules_call())

    async def pause(self, id: str) -> CapsuleInfo:
        """Pause a running capsule."""
        return await self._client._call(capsule_action_call(id, "pause"))

    async def resume(self, id: str) -> CapsuleInfo:
        """Resume a paused capsule."""
        return await self._client._call(capsule_action_call(id, "resume"))

    async def ping(self, id: str) -> None:
        """Reset the capsule's inactivity timer."""
        await self._client._call(ping_capsule_call(id))

    async def stats(self, range: str | None = None) -> CapsuleStats:
        """The team's capsule stats. See :meth:`CapsulesResource.stats`."""
        return await self._client._call(capsule_stats_call(range))

    async def usage(self, from_: str | date | None = None, to: str | date | None = None) -> UsageResponse:
        """Per-day CPU and RAM usage. See :meth:`CapsulesResource.usage`."""
        return await self._client._call(capsule_usage_call(from_, to))

    async def metrics(self, id: str, range: str | None = None) -> CapsuleMetrics:
        """A capsule's metrics points. See :meth:`CapsulesResource.metrics`."""
        return await self._client._call(capsule_metrics_call(id, range))

    async def destroy(self, id: str) -> None:
        """Destroy a capsule permanently."""
        await self._client._call(destroy_capsule_call(id))

    async def wait(
        self,
        id: str,
        status: str | Iterable[str] = "running",
        timeout: float = DEFAULT_WAIT_TIMEOUT,
    ) -> CapsuleInfo:
        """Poll a capsule until its status is ``status``. See :meth:`CapsulesResource.wait`."""
        targets = {status} if isinstance(status, str) else set(status)
        return await adrive(wait_flow(id, targets, timeout), self._client, id)


class AsyncSnapshotsResource:
    """Async snapshot template operations: ``client.snapshots``."""

    def __init__(self, client: AsyncWrennClient) -> None:
        self._client = client

    async def create(
        self, capsule_id: str, name: str | None = None, overwrite: bool = False
    ) -> Template:
        """Snapshot a capsule into a template. See :meth:`SnapshotsResource.create`."""
        return await self._client._call(create_snapshot_call(capsule_id, name, overwrite))

    async def list(self, type: str | None = None) -> builtins.list[Template]:
        """List templates, optionally only ``"base"`` or ``"snapshot"`` ones."""
        return await self._client._call(list_snapshots_call(type))

    async def delete(self, name: str) -> None:
        """Delete a snapshot template by name."""
        await self._client._call(delete_snapshot_call(name))


class AsyncEventsResource:
    """The team's lifecycle events as they happen: ``client.events``."""

    def __init__(self, client: AsyncWrennClient) -> None:
        self._client = client

    async def stream(self) -> AsyncIterator[SSEEvent]:
        """Iterate over events (the first is ``connected``). See :meth:`EventsResource.stream`."""
        parser = _SSEParser()
        async with self._client._stream(events_stream_call()) as response:
            async for line in response.aiter_lines():
                event = parser.feed(line)
                if event is not None:
                    yield event


class AsyncWrennClient(_BaseClient):
    """Asynchronous client for the Wrenn API; same arguments as :class:`WrennClient`.

    Uses an ``httpx.AsyncClient``: do not share one instance across event loops.

    Example::

        async with AsyncWrennClient() as client:
            capsule = await client.capsules.create(template="minimal")
            await client.capsules.destroy(capsule.id)
    """

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        proxy_domain: str | None = None,
        timeout: httpx.Timeout | float | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(api_key, base_url, proxy_domain, timeout)
        self._http = httpx.AsyncClient(transport=transport, **self._client_kwargs())
        self.capsules = AsyncCapsulesResource(self)
        self.snapshots = AsyncSnapshotsResource(self)
        self.events = AsyncEventsResource(self)

    @property
    def http(self) -> httpx.AsyncClient:
        """The underlying ``httpx.AsyncClient``, already authenticated."""
        return self._http

    async def _send(self, call: _Call[Any], *, stream: bool = False) -> httpx.Response:
        request = self._build_request(self._http, call)
        attempt = 0
        while True:
            try:
                response = await self._http.send(request, stream=stream)
                break
            except httpx.TransportError as exc:
                delay = self._retry_delay(request, attempt, exc)
                if delay is None:
                    raise error_from_transport(exc, request) from exc
                await asyncio.sleep(delay)
                attempt += 1
        if response.status_code >= 400:
            try:
                body = await response.aread()
            except httpx.TransportError:
                body = b""
            finally:
                await response.aclose()
            raise error_from_response(response.status_code, body)
        return response

    async def _call(self, call: _Call[T]) -> T:
        response = await self._send(call)
        return call.parse(response)

    @asynccontextmanager
    async def _stream(self, call: _Call[Any]) -> AsyncIterator[httpx.Response]:
        response = await self._send(call, stream=True)
        try:
            yield response
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        """Close the HTTP connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncWrennClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
