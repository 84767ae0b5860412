"""Small helpers shared by the benchmarks."""

from __future__ import annotations

import statistics
from pathlib import Path


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def summary(name: str, values_ms: list[float]) -> str:
    return (f"{name:<34} n={len(values_ms):<4} p50={statistics.median(values_ms):8.2f} ms  "
            f"p95={pct(values_ms, 95):8.2f} ms  min={min(values_ms):8.2f} ms")


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (the benchmarks' host-memory figures)."""
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, v = line.split(":")
        out[k] = int(v.split()[0]) * 1024
    return out
