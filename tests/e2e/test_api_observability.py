"""Observability against a real `wrenn server` and real microVMs: a busy capsule's metrics, the
team's stats, daily usage. The server's sampler runs every WRENN_SAMPLER_INTERVAL_SEC (set by
tests/conftest.py's ServerHandle)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.e2e.test_api_capsules import Api, assert_error, make_team, other_team, parse_ts  # noqa: F401 (fixture)

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def api(wrenn_server) -> Iterator[Api]:
    a = Api(wrenn_server)
    yield a
    a.cleanup()


@pytest.fixture
def fresh_team(wrenn_server) -> Iterator[Api]:
    """A team of its own, so that its stats and usage are exactly what the test did."""
    _, key = make_team(wrenn_server, f"obs-{os.getpid()}-{time.monotonic_ns()}")
    a = Api(wrenn_server, key)
    yield a
    a.cleanup()


def metrics(api: Api, cid: str, range_: str = "5m") -> list[dict[str, Any]]:
    resp = api.get(f"/v1/capsules/{cid}/metrics", params={"range": range_})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["sandbox_id"] == cid and body["range"] == range_, body
    for p in body["points"]:
        assert set(p) == {"timestamp_unix", "cpu_pct", "mem_bytes", "disk_bytes"}, p
        assert type(p["timestamp_unix"]) is int
    return body["points"]


def test_a_busy_capsule_shows_high_cpu(api: Api, other_team: Api) -> None:
    busy = api.running()["id"]
    idle = api.running()["id"]
    api.exec(busy, "/bin/sh", "-c", "yes > /dev/null", background=True, expect=202)
    started = time.time()
    deadline = time.monotonic() + 90
    while True:
        points = [p for p in metrics(api, busy) if p["timestamp_unix"] >= started]
        if sum(1 for p in points if (p["cpu_pct"] or 0) >= 75) >= 2:
            break
        assert time.monotonic() < deadline, f"cpu_pct never high: {points}"
        time.sleep(0.5)
    p = points[-1]
    assert 0 < p["mem_bytes"] <= 512 * 1024 * 1024 and p["disk_bytes"] > 0
    assert abs(p["timestamp_unix"] - time.time()) < 120
    # the idle one, sampled as often, stays low
    quiet = [q["cpu_pct"] for q in metrics(api, idle) if q["timestamp_unix"] >= started]
    assert quiet and min(quiet) < 30, quiet
    # longer ranges average the same samples into fewer points
    hour = metrics(api, busy, "1h")
    assert hour and len(hour) <= len(metrics(api, busy, "10m")) + 1
    assert max(q["cpu_pct"] for q in hour) >= 50
    # errors: a bad range, another team's capsule
    assert_error(api.get(f"/v1/capsules/{busy}/metrics", params={"range": "3d"}), 400, "invalid_request")
    assert_error(other_team.get(f"/v1/capsules/{busy}/metrics"), 404, "not_found")
    for cid in (busy, idle):
        api.destroy(cid)
    # the points stay readable after the capsule is gone
    assert metrics(api, busy)


def test_stats_match_what_runs(fresh_team: Api) -> None:
    api = fresh_team
    empty = api.get("/v1/capsules/stats").json()
    assert empty["current"]["running_count"] == 0 and empty["range"] == "1h"
    a, b = api.create(), api.create()
    api.wait(a["id"])
    api.wait(b["id"])
    stats = api.get("/v1/capsules/stats", params={"range": "5m"}).json()
    assert {k: v for k, v in stats["current"].items() if k != "sampled_at"} == {
        "running_count": 2, "vcpus_reserved": 2, "memory_mb_reserved": 1024}
    assert abs(parse_ts(stats["current"]["sampled_at"]) - datetime.now(UTC)) < timedelta(seconds=60)
    assert stats["peaks"]["running_count"] >= 2 and stats["peaks"]["memory_mb"] >= 1024
    series = stats["series"]
    assert len(series["labels"]) == len(series["running"]) == len(series["vcpus"]) == 30
    assert series["running"][-1] == 2
    # the sampler records it: soon two buckets (not only the live last one) show both
    deadline = time.monotonic() + 60
    while sum(1 for n in api.get("/v1/capsules/stats?range=5m").json()["series"]["running"] if n == 2) < 2:
        assert time.monotonic() < deadline, "the sampler recorded no stats"
        time.sleep(0.5)
    assert api.post(f"/v1/capsules/{a['id']}/pause").status_code == 200
    after = api.get("/v1/capsules/stats").json()
    assert after["current"]["running_count"] == 1 and after["current"]["memory_mb_reserved"] == 512
    assert after["peaks"]["running_count"] >= 2
    assert_error(api.get("/v1/capsules/stats", params={"range": "7d"}), 400, "invalid_request")


def test_usage_counts_a_capsule_that_ran(fresh_team: Api) -> None:
    api = fresh_team
    today = datetime.now(UTC).date()
    before = api.get("/v1/capsules/usage", params={"from": today.isoformat(), "to": today.isoformat()}).json()
    assert before == {"from": today.isoformat(), "to": today.isoformat(),
                      "points": [{"date": today.isoformat(), "cpu_minutes": 0.0, "ram_mb_minutes": 0.0}]}
    t0 = time.monotonic()
    cid = api.running()["id"]
    time.sleep(3)
    api.destroy(cid)
    elapsed_min = (time.monotonic() - t0) / 60
    # (from yesterday: a run that crossed midnight UTC still counts)
    body = api.get("/v1/capsules/usage", params={"from": (today - timedelta(days=1)).isoformat()}).json()
    assert body["to"] == datetime.now(UTC).date().isoformat()
    cpu = sum(p["cpu_minutes"] for p in body["points"])
    ram = sum(p["ram_mb_minutes"] for p in body["points"])
    assert 3 / 60 <= cpu <= elapsed_min + 0.01, (cpu, elapsed_min)
    assert ram == pytest.approx(cpu * 512, rel=1e-3)  # 1 vCPU, 512 MiB
    # it stopped: no more minutes accrue
    time.sleep(1.5)
    again = api.get("/v1/capsules/usage", params={"from": (today - timedelta(days=1)).isoformat()}).json()
    assert sum(p["cpu_minutes"] for p in again["points"]) == pytest.approx(cpu)
    assert_error(api.get("/v1/capsules/usage", params={"from": "2025-13-01"}), 400, "invalid_request")
    assert_error(api.get("/v1/capsules/usage", params={"from": today.isoformat(),
                                                        "to": (today - timedelta(days=2)).isoformat()}),
                 400, "invalid_request")
