"""API call descriptors shared by :class:`~wrenn.WrennClient` and :class:`~wrenn.AsyncWrennClient`.

:class:`_Call` is one API call (what to send and how to read the answer); the ``*_call``
functions build them, the ``parse_*`` functions read responses, :class:`_SSEParser` reads the
event stream, and the timeout and proxy-domain helpers resolve client settings. Nothing here
does I/O, so the sync and async clients cannot drift apart.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from wrenn._models import CapsuleInfo, CapsuleMetrics, CapsuleStats, SSEEvent, Template, UsageResponse

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
