"""The host agent's Prometheus metrics (`GET /metrics`).

One registry per service (not prometheus-client's global one): tests run several services in one
process. Latencies are observed as calls go through; capsule counts and capacity are read from
the agent when Prometheus scrapes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from wrenn_host.service.book import Book

# TCG restores take seconds, KVM ones tens of milliseconds: buckets cover both.
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
TIMED = ("create", "pause", "resume", "snapshot", "destroy")


class HostMetrics:
    def __init__(self, book: Book):
        self.book = book
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.latency = Histogram("wrenn_host_operation_seconds", "Time a lifecycle call took on this host",
                                 ["operation", "outcome"], buckets=BUCKETS, registry=r)
        self.calls = Counter("wrenn_host_calls", "Calls served, by method and outcome",
                             ["method", "outcome"], registry=r)
        self.capsules = Gauge("wrenn_host_capsules", "Capsules on this host by state", ["state"], registry=r)
        self.reserved = Gauge("wrenn_host_reserved", "What running capsules reserve", ["resource"], registry=r)
        self.capacity = Gauge("wrenn_host_capacity", "What this host can give at most", ["resource"], registry=r)
        self.free = Gauge("wrenn_host_free", "What this host has left now", ["resource"], registry=r)
        self.tunnels = Gauge("wrenn_host_tunnels_open", "TCP tunnels open through this service", registry=r)

    def observe(self, method: str, seconds: float, outcome: str) -> None:
        self.calls.labels(method, outcome).inc()
        if method in TIMED:
            self.latency.labels(method, outcome).observe(seconds)

    async def render(self) -> bytes:
        inv = await self.book.inventory()
        by_state = inv.by_state()
        for state in {"running", "paused", "error", *by_state}:
            self.capsules.labels(state).set(by_state.get(state, 0))
        usage = await self.book.usage(inv)
        self.reserved.labels("vcpus").set(usage["reserved_vcpus"])
        self.reserved.labels("memory_mb").set(usage["reserved_memory_mb"])
        limits = await self.book.agent.limits()
        self.capacity.labels("vcpus").set(limits.max_vcpus)
        self.capacity.labels("memory_mb").set(limits.max_memory_mb)
        for key in ("free_memory_mb", "free_disk_mb"):
            if usage.get(key) is not None:
                self.free.labels(key.removeprefix("free_")).set(usage[key])
        return generate_latest(self.registry)
