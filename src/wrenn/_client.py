"""The synchronous client: :class:`WrennClient` and its resources (``capsules``,
``snapshots``, ``events``), sending the calls built in :mod:`wrenn._calls` on the base in
:mod:`wrenn._base_client`. The async twin is in :mod:`wrenn._async_client`;
``AsyncWrennClient`` is still importable from here.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import date
from typing import Any, TypeVar

import httpx

from wrenn._async_client import AsyncWrennClient
from wrenn._base_client import _BaseClient
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
from wrenn._exceptions import error_from_response, error_from_transport
from wrenn._models import CapsuleInfo, CapsuleMetrics, CapsuleStats, SSEEvent, Template, UsageResponse
from wrenn._wait import DEFAULT_WAIT_TIMEOUT, drive, wait_flow

__all__ = ["AsyncWrennClient", "WrennClient"]

T = TypeVar("T")


# --- sync ----------------------------------------------------------------------------------


class CapsulesResource:
    """Capsule control-plane operations: ``client.capsules``."""

    def __init__(self, client: WrennClient) -> None:
        self._client = client

    def create(
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
        """Create a capsule. Omitted fields take the server defaults.

        Args:
            template: Template to boot from (server default ``"minimal"``).
            vcpus: Virtual CPUs (default 1).
            memory_mb: Memory in MiB (default 512).
            timeout_sec: Inactivity TTL before auto-pause; ``0`` disables it.
            metadata: User labels (string to string), set at create time only.
            allow_internet_access: ``False`` denies ``0.0.0.0/0`` (server default ``True``).
            network: Egress rules ``{"allow_out": [...], "deny_out": [...]}``: IPv4
                addresses, CIDRs or domains; an ``allow_out`` entry wins.

        Returns:
            The new capsule.
        """
        return self._client._call(
            create_capsule_call(template, vcpus, memory_mb, timeout_sec, metadata,
                                allow_internet_access, network)
        )

    def update_network(
        self,
        id: str,
        *,
        allow_internet_access: bool | None = None,
        network: dict[str, Any] | None = None,
    ) -> CapsuleInfo:
        """Change a running or paused capsule's egress rules, without a restart. Omitted
        fields keep their value."""
        return self._client._call(update_network_call(id, allow_internet_access, network))

    def get(self, id: str) -> CapsuleInfo:
        """Get one capsule by ID. Raises :class:`WrennNotFoundError` if there is none."""
        return self._client._call(get_capsule_call(id))

    def list(self) -> builtins.list[CapsuleInfo]:
        """List the team's capsules in every status, newest first."""
        return self._client._call(list_capsules_call())

    def pause(self, id: str) -> CapsuleInfo:
        """Pause a running capsule: memory and disk are saved and the VM stops.

        Returns the capsule, now ``paused``.
        """
        return self._client._call(capsule_action_call(id, "pause"))

    def resume(self, id: str) -> CapsuleInfo:
        """Resume a paused capsule. Returns its updated state."""
        return self._client._call(capsule_action_call(id, "resume"))

    def ping(self, id: str) -> None:
        """Reset the capsule's inactivity timer so it is not auto-paused."""
        self._client._call(ping_capsule_call(id))

    def stats(self, range: str | None = None) -> CapsuleStats:
        """The team's capsule stats: what runs now (``current``), 30-day ``peaks`` and a chart
        ``series`` over ``range``: ``"5m"``, ``"1h"`` (server default), ``"6h"``, ``"24h"``, ``"30d"``."""
        return self._client._call(capsule_stats_call(range))

    def usage(self, from_: str | date | None = None, to: str | date | None = None) -> UsageResponse:
        """Per-day (UTC) ``cpu_minutes`` and ``ram_mb_minutes`` from ``from_`` to ``to`` (both
        included; ``YYYY-MM-DD`` or ``date``). Defaults: the last 30 days up to today."""
        return self._client._call(capsule_usage_call(from_, to))

    def metrics(self, id: str, range: str | None = None) -> CapsuleMetrics:
        """CPU, memory and disk points of a capsule over ``range``: ``"5m"``, ``"10m"`` (server
        default), ``"1h"``, ``"2h"``, ``"6h"``, ``"12h"``, ``"24h"``."""
        return self._client._call(capsule_metrics_call(id, range))

    def destroy(self, id: str) -> None:
        """Destroy a capsule permanently."""
        self._client._call(destroy_capsule_call(id))

    def wait(
        self,
        id: str,
        status: str | Iterable[str] = "running",
        timeout: float = DEFAULT_WAIT_TIMEOUT,
    ) -> CapsuleInfo:
        """Poll a capsule until its status is ``status`` (or one of several).

        Raises:
            WrennCapsuleStateError: It reached ``error`` or ``stopped`` instead.
            WrennWaitTimeoutError: Not there within ``timeout`` seconds.
        """
        targets = {status} if isinstance(status, str) else set(status)
        return drive(wait_flow(id, targets, timeout), self._client, id)


class SnapshotsResource:
    """Snapshot template operations: ``client.snapshots``."""

    def __init__(self, client: WrennClient) -> None:
        self._client = client

    def create(self, capsule_id: str, name: str | None = None, overwrite: bool = False) -> Template:
        """Snapshot a running or paused capsule into a reusable template.

        The capsule is left paused. ``name`` defaults to a generated one; with
        ``overwrite=True`` an existing snapshot of that name is replaced instead of
        raising :class:`WrennConflictError`.
        """
        return self._client._call(create_snapshot_call(capsule_id, name, overwrite))

    def list(self, type: str | None = None) -> builtins.list[Template]:
        """List templates (built-in and the team's snapshots); ``type`` filters by
        ``"base"`` or ``"snapshot"``."""
        return self._client._call(list_snapshots_call(type))

    def delete(self, name: str) -> None:
        """Delete a snapshot template by name."""
        self._client._call(delete_snapshot_call(name))


class EventsResource:
    """The team's lifecycle events as they happen: ``client.events``."""

    def __init__(self, client: WrennClient) -> None:
        self._client = client

    def stream(self) -> Iterator[SSEEvent]:
        """Iterate over events (the first is ``connected``); the connection stays open until
        the iterator is closed (or the loop left)::

            for event in client.events.stream():
                print(event.event, event.resource)
        """
        parser = _SSEParser()
        with self._client._stream(events_stream_call()) as response:
            for line in response.iter_lines():
                event = parser.feed(line)
                if event is not None:
                    yield event


class WrennClient(_BaseClient):
    """Synchronous client for the Wrenn API.

    Args:
        api_key: API key (``wrn_...``); defaults to the ``WRENN_API_KEY`` environment variable.
            Raises ``ValueError`` if neither is set.
        base_url: API base URL; defaults to ``WRENN_BASE_URL``, then
            ``https://app.wrenn.dev/api``. Routes are ``/v1/...`` under it.
        proxy_domain: Host suffix for port-proxy URLs; defaults to ``WRENN_PROXY_DOMAIN``,
            then the base URL's host.
        timeout: Default HTTP timeout (seconds or ``httpx.Timeout``); 30 s, 10 s to connect.
        transport: An ``httpx`` transport to use instead of the network (e.g. for tests).

    Example::

        with WrennClient() as client:
            capsule = client.capsules.create(template="minimal")
            client.capsules.destroy(capsule.id)
    """

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        proxy_domain: str | None = None,
        timeout: httpx.Timeout | float | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(api_key, base_url, proxy_domain, timeout)
        self._http = httpx.Client(transport=transport, **self._client_kwargs())
        self.capsules = CapsulesResource(self)
        self.snapshots = SnapshotsResource(self)
        self.events = EventsResource(self)

    @property
    def http(self) -> httpx.Client:
        """The underlying ``httpx.Client``, already authenticated."""
        return self._http

    def _send(self, call: _Call[Any], *, stream: bool = False) -> httpx.Response:
        request = self._build_request(self._http, call)
        attempt = 0
        while True:
            try:
                response = self._http.send(request, stream=stream)
                break
            except httpx.TransportError as exc:
                delay = self._retry_delay(request, attempt, exc)
                if delay is None:
                    raise error_from_transport(exc, request) from exc
                time.sleep(delay)
                attempt += 1
        if response.status_code >= 400:
            try:
                body = response.read()
            except httpx.TransportError:
                body = b""
            finally:
                response.close()
            raise error_from_response(response.status_code, body)
        return response

    def _call(self, call: _Call[T]) -> T:
        response = self._send(call)
        return call.parse(response)

    @contextmanager
    def _stream(self, call: _Call[Any]) -> Iterator[httpx.Response]:
        response = self._send(call, stream=True)
        try:
            yield response
        finally:
            response.close()

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._http.close()

    def __enter__(self) -> WrennClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
