"""HTTP clients for the Wrenn API.

Everything that does no I/O lives in :class:`_BaseClient` and in :class:`_Call` (one API
call: what to send and how to read the answer). :class:`WrennClient` and
:class:`AsyncWrennClient` only send calls, retry, close; so the two cannot drift apart.
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import date
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from wrenn._exceptions import error_from_response, error_from_transport
from wrenn._models import CapsuleInfo, CapsuleMetrics, CapsuleStats, SSEEvent, Template, UsageResponse
from wrenn._wait import DEFAULT_WAIT_TIMEOUT, adrive, drive, wait_flow

__all__ = ["AsyncWrennClient", "WrennClient"]

DEFAULT_BASE_URL = "https://app.wrenn.dev/api"
DEFAULT_PROXY_DOMAIN = "wrenn.dev"
ENV_API_KEY = "WRENN_API_KEY"
ENV_BASE_URL = "WRENN_BASE_URL"
ENV_PROXY_DOMAIN = "WRENN_PROXY_DOMAIN"

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
# Calls that start or copy a VM can be slow on a loaded (or TCG) host, and a POST is never
# retried, so give them room rather than fail a call that is about to succeed.
LONG_TIMEOUT = httpx.Timeout(120.0, connect=10.0)

T = TypeVar("T")


def _path(template: str, *parts: str | int) -> str:
    """Fill path parameters, escaped so an id or name can never change the route."""
    return template.format(*(quote(str(p), safe="") for p in parts))


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One TLS context per process, shared by every client: building one (loading the CA bundle)
    costs ~20 ms, and `Capsule(...)` makes a client each time. Contexts are safe to share."""
    return httpx.create_ssl_context()


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One API call: the request to send and how to turn a 2xx response into a result."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: dict[str, Any] | None = None
    json: Any = None
    data: dict[str, Any] | None = None
    files: dict[str, Any] | None = None
    content: Any = None
    headers: dict[str, str] | None = None
    timeout: httpx.Timeout | None = None  # None: the client's default


def parse_none(response: httpx.Response) -> None:
    return None


def parse_bytes(response: httpx.Response) -> bytes:
    return response.content


def parse_capsule(response: httpx.Response) -> CapsuleInfo:
    return CapsuleInfo.model_validate(response.json())


def parse_capsule_list(response: httpx.Response) -> builtins.list[CapsuleInfo]:
    return [CapsuleInfo.model_validate(item) for item in response.json()]


def parse_template(response: httpx.Response) -> Template:
    return Template.model_validate(response.json())


def parse_template_list(response: httpx.Response) -> builtins.list[Template]:
    body = response.json()
    # Tolerate a wrapped list ({"templates": [...]}) as well as the bare array.
    items = body.get("templates", []) if isinstance(body, dict) else body
    return [Template.model_validate(item) for item in items]


# --- capsule and snapshot calls (shared by the sync and async resources) -------------------


def create_capsule_call(
    template: str | None,
    vcpus: int | None,
    memory_mb: int | None,
    timeout_sec: int | None,
    metadata: dict[str, str] | None,
    allow_internet_access: bool | None = None,
    network: dict[str, Any] | None = None,
) -> _Call[CapsuleInfo]:
    # Only send what was given: the server owns the defaults (minimal, 1 vCPU, 512 MiB, 0).
    body = {
        k: v
        for k, v in {
            "template": template,
            "vcpus": vcpus,
            "memory_mb": memory_mb,
            "timeout_sec": timeout_sec,
            "metadata": metadata,
            "allow_internet_access": allow_internet_access,
            "network": _network_body(network),
        }.items()
        if v is not None
    }
    return _Call("POST", "/v1/capsules", parse_capsule, json=body, timeout=LONG_TIMEOUT)


def _network_body(network: Any) -> dict[str, Any] | None:
    """``{"allow_out": [...], "deny_out": [...]}`` from a dict or a NetworkRules."""
    if network is None:
        return None
    if hasattr(network, "model_dump"):
        network = network.model_dump()
    return {k: list(v) for k, v in dict(network).items() if v is not None}


def update_network_call(
    capsule_id: str, allow_internet_access: bool | None, network: dict[str, Any] | None
) -> _Call[CapsuleInfo]:
    body = {k: v for k, v in {"allow_internet_access": allow_internet_access,
                              "network": _network_body(network)}.items() if v is not None}
    return _Call("PATCH", _path("/v1/capsules/{}/network", capsule_id), parse_capsule, json=body)


def get_capsule_call(capsule_id: str) -> _Call[CapsuleInfo]:
    return _Call("GET", _path("/v1/capsules/{}", capsule_id), parse_capsule)


def list_capsules_call() -> _Call[builtins.list[CapsuleInfo]]:
    return _Call("GET", "/v1/capsules", parse_capsule_list)


def capsule_action_call(capsule_id: str, action: str) -> _Call[CapsuleInfo]:
    return _Call(
        "POST", _path("/v1/capsules/{}/" + action, capsule_id), parse_capsule, timeout=LONG_TIMEOUT
    )


def ping_capsule_call(capsule_id: str) -> _Call[None]:
    return _Call("POST", _path("/v1/capsules/{}/ping", capsule_id), parse_none)


def destroy_capsule_call(capsule_id: str) -> _Call[None]:
    return _Call("DELETE", _path("/v1/capsules/{}", capsule_id), parse_none, timeout=LONG_TIMEOUT)


def create_snapshot_call(capsule_id: str, name: str | None, overwrite: bool) -> _Call[Template]:
    body: dict[str, Any] = {"sandbox_id": capsule_id}
    if name is not None:
        body["name"] = name
    params = {"overwrite": "true"} if overwrite else None
    return _Call(
        "POST", "/v1/snapshots", parse_template, params=params, json=body, timeout=LONG_TIMEOUT
    )


def list_snapshots_call(type: str | None) -> _Call[builtins.list[Template]]:
    params = {"type": str(type)} if type is not None else None
    return _Call("GET", "/v1/snapshots", parse_template_list, params=params)


def delete_snapshot_call(name: str) -> _Call[None]:
    return _Call("DELETE", _path("/v1/snapshots/{}", name), parse_none)


# --- observability and events --------------------------------------------------------------


def _range_params(range: str | None) -> dict[str, str] | None:
    return {"range": str(range)} if range is not None else None


def _date_param(value: str | date | None) -> str | None:
    return value.isoformat() if isinstance(value, date) else value


def capsule_stats_call(range: str | None) -> _Call[CapsuleStats]:
    return _Call("GET", "/v1/capsules/stats",
                 lambda r: CapsuleStats.model_validate(r.json()), params=_range_params(range))


def capsule_usage_call(from_: str | date | None, to: str | date | None) -> _Call[UsageResponse]:
    params = {k: v for k, v in (("from", _date_param(from_)), ("to", _date_param(to))) if v is not None}
    return _Call("GET", "/v1/capsules/usage",
                 lambda r: UsageResponse.model_validate(r.json()), params=params or None)


def capsule_metrics_call(capsule_id: str, range: str | None) -> _Call[CapsuleMetrics]:
    return _Call("GET", _path("/v1/capsules/{}/metrics", capsule_id),
                 lambda r: CapsuleMetrics.model_validate(r.json()), params=_range_params(range))


def events_stream_call() -> _Call[None]:
    # No read timeout: the server holds the stream open (with a keepalive every 15 s).
    return _Call("GET", "/v1/events/stream", parse_none,
                 headers={"Accept": "text/event-stream"}, timeout=httpx.Timeout(30.0, connect=10.0, read=None))


class _SSEParser:
    """Server-Sent Events, line by line: ``data:`` lines are joined until a blank line ends the
    event; comments (``: keepalive``) are skipped. The JSON payload's own ``event`` field names the
    kind (the ``event:`` line is used only when it lacks one)."""

    def __init__(self) -> None:
        self._data: builtins.list[str] = []
        self._name: str | None = None

    def feed(self, line: str) -> SSEEvent | None:
        if line == "":
            data, name = self._data, self._name
            self._data, self._name = [], None
            if not data:
                return None
            event = SSEEvent.model_validate_json("\n".join(data))
            if event.event is None and name:
                event = event.model_copy(update={"event": name})
            return event
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._name = value
        return None


# --- configuration and request building ----------------------------------------------------


def _resolve_timeout(timeout: httpx.Timeout | float | None) -> httpx.Timeout:
    if timeout is None:
        return DEFAULT_TIMEOUT
    if isinstance(timeout, httpx.Timeout):
        return timeout
    return httpx.Timeout(timeout)


def _resolve_proxy_domain(base_url: str, override: str | None) -> str:
    """Host suffix for ``{port}-{capsule_id}.<domain>`` URLs (see :meth:`Capsule.get_url`)."""
    resolved = override or os.environ.get(ENV_PROXY_DOMAIN)
    if resolved:
        return resolved
    url = httpx.URL(base_url)
    if url.host == httpx.URL(DEFAULT_BASE_URL).host:
        return DEFAULT_PROXY_DOMAIN
    return f"{url.host}:{url.port}" if url.port else url.host


class _BaseClient:
    """Configuration, request building and error translation; no I/O."""

    # Methods safe to resend after a transport failure: they change nothing twice.
    _RETRY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "PUT"})
    _RETRY_EXCEPTIONS: tuple[type[Exception], ...] = (
        httpx.NetworkError,
        httpx.RemoteProtocolError,
        httpx.ConnectTimeout,
        httpx.ReadTimeout,
    )
    _MAX_ATTEMPTS = 3
    _RETRY_BACKOFF = 0.3  # seconds, doubled on each retry

    def __init__(
        self,
        api_key: str | None,
        base_url: str | None,
        proxy_domain: str | None,
        timeout: httpx.Timeout | float | None,
    ) -> None:
        key = api_key or os.environ.get(ENV_API_KEY)
        if not key:
            raise ValueError(
                f"No Wrenn API key: pass api_key= or set the {ENV_API_KEY} environment variable."
            )
        self._api_key = key
        self._base_url = (base_url or os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL).rstrip("/")
        self._proxy_domain = _resolve_proxy_domain(self._base_url, proxy_domain)
        self._timeout = _resolve_timeout(timeout)

    @property
    def base_url(self) -> str:
        """The API base URL, e.g. ``https://app.wrenn.dev/api``."""
        return self._base_url

    def _client_kwargs(self) -> dict[str, Any]:
        return {
            # Trailing slash so httpx joins "/v1/..." under ".../api", not at the host root.
            "base_url": self._base_url + "/",
            "headers": {"X-API-Key": self._api_key, "User-Agent": "wrenn-python"},
            "timeout": self._timeout,
            "verify": _tls_context(),
        }

    @staticmethod
    def _build_request(http: httpx.Client | httpx.AsyncClient, call: _Call[Any]) -> httpx.Request:
        kwargs: dict[str, Any] = {}
        if call.timeout is not None:
            kwargs["timeout"] = call.timeout
        return http.build_request(
            call.method,
            call.path.lstrip("/"),
            params=call.params,
            json=call.json,
            data=call.data,
            files=call.files,
            content=call.content,
            headers=call.headers,
            **kwargs,
        )

    def _retry_delay(self, request: httpx.Request, attempt: int, exc: Exception) -> float | None:
        """Seconds to wait before resending, or None to give up.

        Only idempotent methods are resent: a POST that failed mid-way may have run.
        """
        if (
            request.method in self._RETRY_METHODS
            and isinstance(exc, self._RETRY_EXCEPTIONS)
            and attempt + 1 < self._MAX_ATTEMPTS
        ):
            return float(self._RETRY_BACKOFF * 2**attempt)
        return None


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


# --- async ---------------------------------------------------------------------------------


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
