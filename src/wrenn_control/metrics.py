"""Prometheus metrics of the control plane, at GET /metrics (text exposition format).

- `wrenn_capsules{status, host}`: capsules by (shown) status and host ("local": the in-process
  host of `wrenn server`); stopped ones are not counted.
- `wrenn_capsule_operation_seconds{op}`: create (to running), pause and resume latency, as this
  replica saw them (a histogram per replica; Prometheus sums them).
- `wrenn_host_up{host, status}`, `wrenn_host_capacity{host, resource}`, `wrenn_host_usage{host,
  field}` (the last heartbeat's), `wrenn_host_heartbeat_age_seconds{host}`.
Capsule and host series are read from the database at each scrape (in a worker thread), so every
replica answers the same. Each app has its own registry (several apps in one test process).
WRENN_METRICS_TOKEN, when set, is required as `Authorization: Bearer`.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.requests import Request
from starlette.responses import Response

from wrenn_control.clock import utcnow
from wrenn_control.db.models import Capsule, Host
from wrenn_control.db.session import Database
from wrenn_control.errors import error_response
from wrenn_control.hosts import liveness

_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _FromDatabase(Collector):
    def __init__(self, db: Database):
        self.db = db

    def collect(self) -> Iterator[Metric]:
        now = utcnow()
        with self.db.session() as s:
            counts = s.execute(select(Capsule.status, Capsule.host_id, func.count())
                               .where(Capsule.status != "stopped").group_by(Capsule.status, Capsule.host_id)).all()
            hosts = s.scalars(select(Host).order_by(Host.id)).all()
        capsules = GaugeMetricFamily("wrenn_capsules", "Capsules by status and host (stopped ones not counted).",
                                     labels=["status", "host"])
        shown: dict[tuple[str, str], int] = {}
        for status, host_id, n in counts:
            key = (liveness.shown_status(status, host_id), host_id or "local")
            shown[key] = shown.get(key, 0) + int(n)
        for (status, host), n in sorted(shown.items()):
            capsules.add_metric([status, host], n)
        yield capsules
        up = GaugeMetricFamily("wrenn_host_up", "1 if the host is online or draining.", labels=["host", "status"])
        capacity = GaugeMetricFamily("wrenn_host_capacity", "Registered capacity of the host.",
                                     labels=["host", "resource"])
        usage = GaugeMetricFamily("wrenn_host_usage", "Usage from the host's last heartbeat.", labels=["host", "field"])
        age = GaugeMetricFamily("wrenn_host_heartbeat_age_seconds", "Seconds since the host's last heartbeat.",
                                labels=["host"])
        for h in hosts:
            up.add_metric([h.id, h.status], 1 if h.status in ("online", "draining") else 0)
            for resource, value in (("vcpus", h.vcpus), ("memory_mb", h.memory_mb), ("disk_mb", h.disk_mb)):
                if value is not None:
                    capacity.add_metric([h.id, resource], value)
            for field, value in sorted((h.usage or {}).items()):
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    usage.add_metric([h.id, field], value)
            if h.last_heartbeat_at is not None:
                age.add_metric([h.id], max(0.0, (now - h.last_heartbeat_at).total_seconds()))
        yield from (up, capacity, usage, age)


class ControlMetrics:
    def __init__(self, db: Database):
        self.registry = CollectorRegistry(auto_describe=False)
        self.latency = Histogram("wrenn_capsule_operation_seconds", "Latency of capsule operations.",
                                 ["op"], buckets=_BUCKETS, registry=self.registry)
        self.registry.register(_FromDatabase(db))

    async def endpoint(self, request: Request) -> Response:
        token = request.app.state.settings.metrics_token
        if token:
            scheme, _, given = (request.headers.get("authorization") or "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
                return error_response(401, "unauthorized", "GET /metrics wants Authorization: Bearer <WRENN_METRICS_TOKEN>")
        body = await asyncio.to_thread(generate_latest, self.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)
