"""SDK: capsules.stats / usage / metrics and events.stream, sync and async — requests sent,
models parsed, the SSE parser — and against the real control plane app (fake host agent)."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime

import httpx
import pytest

import wrenn
from wrenn import AsyncWrennClient, WrennClient, WrennNotFoundError, WrennValidationError
from wrenn.models import (
    CapsuleInfo,
    CapsuleMetrics,
    CapsuleStats,
    EventType,
    SSEEvent,
    UsageResponse,
)

from .fake_host_agent import make_settings, running_app

BASE = "http://wrenn.test/api"
KEY = "wrn_" + "0" * 32

STATS = {
    "range": "1h",
    "current": {"running_count": 2, "vcpus_reserved": 3, "memory_mb_reserved": 1536,
                "sampled_at": "2025-03-01T10:00:05Z"},
    "peaks": {"running_count": 5, "vcpus": 9, "memory_mb": 4096},
    "series": {"labels": ["2025-03-01T09:59:00Z", "2025-03-01T10:00:00Z"], "running": [1, 2], "vcpus": [1, 3],
               "memory_mb": [512, 1536]},
}
USAGE = {"from": "2025-03-01", "to": "2025-03-02", "points": [
    {"date": "2025-03-01", "cpu_minutes": 60.0, "ram_mb_minutes": 30720.0},
    {"date": "2025-03-02", "cpu_minutes": 0.5, "ram_mb_minutes": 256}]}
METRICS = {"sandbox_id": "cl-abc", "range": "10m", "points": [
    {"timestamp_unix": 1740823200, "cpu_pct": 12.5, "mem_bytes": 1000, "disk_bytes": 2000}]}
CAPSULE = {"id": "cl-abc", "status": "running", "template": "minimal", "vcpus": 1, "memory_mb": 512,
           "timeout_sec": 0, "created_at": "2025-03-01T10:00:00Z", "last_updated": "2025-03-01T10:00:01Z",
           "started_at": "2025-03-01T10:00:01Z", "last_active_at": None, "metadata": {}}


def _answer(request: httpx.Request) -> httpx.Response:
    path = request.url.path
    if path == "/api/v1/capsules/stats":
        return httpx.Response(200, json=STATS)
    if path == "/api/v1/capsules/usage":
        return httpx.Response(200, json=USAGE)
    if path.endswith("/metrics"):
        return httpx.Response(200, json=METRICS)
    return httpx.Response(404, json={"error": {"code": "not_found", "message": "no"}})


def _check_models(stats: CapsuleStats, usage: UsageResponse, metrics: CapsuleMetrics) -> None:
    assert stats.range == "1h" and stats.current.running_count == 2 and stats.current.memory_mb_reserved == 1536
    assert stats.current.sampled_at == datetime(2025, 3, 1, 10, 0, 5, tzinfo=UTC)
    assert stats.peaks.vcpus == 9 and stats.series.running == [1, 2]
    assert stats.series.labels[1] == datetime(2025, 3, 1, 10, 0, tzinfo=UTC)
    assert usage.from_ == date(2025, 3, 1) and usage.to == date(2025, 3, 2)
    assert [(p.date, p.cpu_minutes, p.ram_mb_minutes) for p in usage.points] == [
        (date(2025, 3, 1), 60.0, 30720.0), (date(2025, 3, 2), 0.5, 256.0)]
    assert metrics.sandbox_id == metrics.capsule_id == "cl-abc" and metrics.range == "10m"
    assert metrics.points[0].cpu_pct == 12.5 and metrics.points[0].timestamp_unix == 1740823200


def test_sync_observability_calls() -> None:
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return _answer(request)

    with WrennClient(api_key=KEY, base_url=BASE, transport=httpx.MockTransport(answer)) as client:
        stats = client.capsules.stats()
        client.capsules.stats(range="24h")
        usage = client.capsules.usage()
        client.capsules.usage(from_=date(2025, 3, 1), to="2025-03-02")
        client.capsules.usage(to=date(2025, 3, 2))
        metrics = client.capsules.metrics("cl-abc")
        client.capsules.metrics("cl/../x", range="2h")
    _check_models(stats, usage, metrics)
    assert [(r.url.raw_path.decode().split("?")[0], dict(r.url.params)) for r in sent] == [
        ("/api/v1/capsules/stats", {}),
        ("/api/v1/capsules/stats", {"range": "24h"}),
        ("/api/v1/capsules/usage", {}),
        ("/api/v1/capsules/usage", {"from": "2025-03-01", "to": "2025-03-02"}),
        ("/api/v1/capsules/usage", {"to": "2025-03-02"}),
        ("/api/v1/capsules/cl-abc/metrics", {}),
        ("/api/v1/capsules/cl%2F..%2Fx/metrics", {"range": "2h"}),
    ]


async def test_async_observability_calls() -> None:
    async with AsyncWrennClient(api_key=KEY, base_url=BASE, transport=httpx.MockTransport(_answer)) as client:
        _check_models(await client.capsules.stats(range="1h"),
                      await client.capsules.usage(from_="2025-03-01", to=date(2025, 3, 2)),
                      await client.capsules.metrics("cl-abc", range="10m"))


# ---- events ----------------------------------------------------------------------------------

EVENT = {"event": "capsule.state.changed", "resource": {"id": "cl-abc", "type": "capsule"},
         "actor": {"type": "api_key", "id": "key-1", "name": "default"},
         "metadata": {"from": "starting", "to": "running"}, "sandbox": CAPSULE,
         "timestamp": "2025-03-01T10:00:01Z"}
STREAM = (
    'event: connected\ndata: {"event":"connected","timestamp":"2025-03-01T10:00:00Z"}\n\n'
    ": keepalive\n\n"
    f"event: capsule.state.changed\ndata: {json.dumps(EVENT)}\n\n"
    # data over several lines, and no `event` in the payload: the `event:` line names it
    'event: capsule.create\ndata: {"outcome": "success",\ndata: "resource": {"id": "cl-abc"}}\n\n'
    # a kind this SDK does not know is kept as text
    'data: {"event": "capsule.renamed", "extra": 1}\n\n'
)


def _sse(request: httpx.Request) -> httpx.Response:
    assert request.url.path == "/api/v1/events/stream"
    assert request.headers["x-api-key"] == KEY
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=STREAM.encode())


def _check_events(events: list[SSEEvent]) -> None:
    assert [e.event for e in events] == ["connected", "capsule.state.changed", "capsule.create", "capsule.renamed"]
    assert events[0].event is EventType.connected and events[3].event == "capsule.renamed"
    changed = events[1]
    assert changed.resource.id == "cl-abc" and changed.actor.name == "default"
    assert changed.metadata == {"from": "starting", "to": "running"}
    assert isinstance(changed.sandbox, CapsuleInfo) and changed.sandbox.status == "running"
    assert changed.timestamp == datetime(2025, 3, 1, 10, 0, 1, tzinfo=UTC)
    assert events[2].outcome == "success" and events[2].resource.id == "cl-abc"


def test_sync_event_stream() -> None:
    with WrennClient(api_key=KEY, base_url=BASE, transport=httpx.MockTransport(_sse)) as client:
        _check_events(list(client.events.stream()))
        stream = client.events.stream()
        assert next(stream).event == "connected"
        stream.close()  # leaving early closes the connection


async def test_async_event_stream() -> None:
    async with AsyncWrennClient(api_key=KEY, base_url=BASE, transport=httpx.MockTransport(_sse)) as client:
        _check_events([e async for e in client.events.stream()])


def test_event_stream_errors_are_raised() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": {"code": "unauthorized", "message": "invalid API key"}})

    with WrennClient(api_key=KEY, base_url=BASE, transport=httpx.MockTransport(answer)) as client:
        with pytest.raises(wrenn.WrennAuthenticationError):
            next(client.events.stream())


# ---- against the control plane ---------------------------------------------------------------


async def test_sdk_against_the_control_plane(tmp_path) -> None:
    async with running_app(make_settings(tmp_path)) as h:
        c = await h.running_capsule(vcpus=2, memory_mb=1024)
        await h.app.state.sampler.run_once()
        transport = httpx.ASGITransport(app=h.app)
        async with AsyncWrennClient(api_key=h.key, base_url="http://test/api", transport=transport) as client:
            stats = await client.capsules.stats(range="5m")
            assert stats.current.running_count == 1 and stats.current.vcpus_reserved == 2
            assert len(stats.series.labels) == len(stats.series.running) == 30
            assert stats.series.labels[-1].tzinfo is not None
            metrics = await client.capsules.metrics(c["id"])
            assert metrics.capsule_id == c["id"] and metrics.points[0].cpu_pct == 1.5
            usage = await client.capsules.usage()
            assert usage.to == datetime.now(UTC).date() and usage.points[-1].cpu_minutes > 0
            with pytest.raises(WrennValidationError):
                await client.capsules.stats(range="2h")
            with pytest.raises(WrennNotFoundError):
                await client.capsules.metrics("cl-nope")
