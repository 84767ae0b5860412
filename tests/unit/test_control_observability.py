"""Control plane observability: GET /v1/capsules/{id}/metrics, /v1/capsules/stats and
/v1/capsules/usage; the sampler; running intervals (usage); events in the published SDK's shape."""

from __future__ import annotations


import asyncio
import time
from datetime import date, datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy import func, select

from wrenn._models import EventType, SSEEvent
from wrenn_control.api.routes.events import format_sse
from wrenn_control.clock import utcnow
from wrenn_control.db.migrate import alembic_config, run_migrations
from wrenn_control.db.models import Capsule, CapsuleMetric, CapsuleRun, Team, TeamStatsSample
from wrenn_control.db.session import Database
from wrenn_control.observability import to_ms
from wrenn_control.workers.sampler import Sampler
from wrenn_host.api import HostAgentError

from .fake_host_agent import TS_RE, assert_error, make_settings, running_app

UTC = timezone.utc


@pytest.fixture
async def h(tmp_path):
    async with running_app(make_settings(tmp_path)) as harness:
        yield harness


class Clock:
    """Stands in for `utcnow` where running intervals are written and where usage is computed."""

    def __init__(self, at: datetime):
        self.at = at

    def __call__(self) -> datetime:
        return self.at


@pytest.fixture
def clock(monkeypatch):
    c = Clock(datetime(2025, 3, 1, 23, 30, tzinfo=UTC))
    monkeypatch.setattr("wrenn_control.lifecycle.utcnow", c)
    monkeypatch.setattr("wrenn_control.api.routes.observability.utcnow", c)
    return c


def _count(h, model) -> int:
    with h.app.state.db.session() as s:
        return s.scalar(select(func.count()).select_from(model))


# ---- routes: order, shapes, validation, isolation ------------------------------------------------


async def test_stats_and_usage_are_not_read_as_a_capsule_id(h):
    stats = await h.client.get("/v1/capsules/stats")
    assert stats.status_code == 200, stats.text
    assert set(stats.json()) == {"range", "current", "peaks", "series"}
    usage = await h.client.get("/v1/capsules/usage")
    assert usage.status_code == 200, usage.text
    assert set(usage.json()) == {"from", "to", "points"}
    # the capsule routes still answer for ids
    assert_error(await h.client.get("/v1/capsules/cl-stats"), 404, "not_found")
    assert_error(await h.client.get("/v1/capsules/stats/metrics"), 404, "not_found")
    assert_error(await h.client.delete("/v1/capsules/stats"), 404, "not_found")


@pytest.mark.parametrize("path", ["/v1/capsules/stats", "/v1/capsules/usage", "/v1/capsules/cl-x/metrics"])
async def test_observability_needs_a_valid_key(h, path):
    async with h.client_for(None) as anon:
        assert_error(await anon.get(path), 401, "unauthorized")
    async with h.client_for("wrn_" + "0" * 32) as bad:
        assert_error(await bad.get(path), 401, "unauthorized")


@pytest.mark.parametrize("range_, points, step", [
    (None, 60, 60), ("5m", 30, 10), ("1h", 60, 60), ("6h", 72, 300), ("24h", 96, 900), ("30d", 120, 21600)])
async def test_stats_of_an_empty_team(h, range_, points, step):
    params = {"range": range_} if range_ else {}
    before = time.time()
    body = (await h.client.get("/v1/capsules/stats", params=params)).json()
    assert body["range"] == (range_ or "1h")
    assert set(body["current"]) == {"running_count", "vcpus_reserved", "memory_mb_reserved", "sampled_at"}
    assert body["current"]["running_count"] == body["current"]["vcpus_reserved"] == 0
    assert TS_RE.match(body["current"]["sampled_at"])
    assert body["peaks"] == {"running_count": 0, "vcpus": 0, "memory_mb": 0}
    series = body["series"]
    assert set(series) == {"labels", "running", "vcpus", "memory_mb"}
    assert all(len(v) == points for v in series.values())
    assert series["running"] == [0] * points
    labels = [datetime.fromisoformat(x.replace("Z", "+00:00")).timestamp() for x in series["labels"]]
    assert all(TS_RE.match(x) for x in series["labels"])
    assert all(b - a == step for a, b in zip(labels, labels[1:])) and labels[0] % step == 0
    assert labels[-1] <= time.time() and labels[-1] + step > before  # the last bucket is the current one


@pytest.mark.parametrize("path", [
    "/v1/capsules/stats?range=2h", "/v1/capsules/stats?range=", "/v1/capsules/stats?range=1H",
    "/v1/capsules/CAPSULE/metrics?range=30d", "/v1/capsules/CAPSULE/metrics?range=1d",
    "/v1/capsules/usage?from=2025-1-1", "/v1/capsules/usage?to=yesterday", "/v1/capsules/usage?from=2025-02-30",
    "/v1/capsules/usage?from=20250101", "/v1/capsules/usage?from=2025-03-02&to=2025-03-01",
    "/v1/capsules/usage?from=2023-01-01&to=2025-01-01",
])
async def test_bad_parameters_are_invalid_requests(h, path):
    c = await h.running_capsule()
    err = assert_error(await h.client.get(path.replace("CAPSULE", c["id"])), 400, "invalid_request")
    assert "range" in err["message"] or "from" in err["message"] or "to" in err["message"] \
        or "days" in err["message"]


async def test_other_teams_see_nothing(h):
    mine = await h.running_capsule(vcpus=2, memory_mb=1024)
    await h.app.state.sampler.run_once()
    async with h.new_team() as other:
        assert_error(await other.get(f"/v1/capsules/{mine['id']}/metrics"), 404, "not_found")
        stats = (await other.get("/v1/capsules/stats")).json()
        assert stats["current"]["running_count"] == 0 and stats["peaks"]["vcpus"] == 0
        assert set(stats["series"]["running"]) == {0}
        usage = (await other.get("/v1/capsules/usage")).json()
        assert all(p["cpu_minutes"] == 0 for p in usage["points"])
    assert_error(await h.client.get("/v1/capsules/cl-nope/metrics"), 404, "not_found")
    assert (await h.client.get("/v1/capsules/stats")).json()["current"]["running_count"] == 1


# ---- metrics -----------------------------------------------------------------------------------


async def test_metrics_points_are_averaged_per_bucket(h):
    c = await h.running_capsule(memory_mb=1024)
    cid, sampler = c["id"], h.app.state.sampler
    base = (int(time.time()) // 30) * 30 - 120  # 2 to 2.5 minutes ago, on a 30 s boundary
    for offset, cpu, mem in [(0, 10.0, 100), (10, 30.0, 300), (20, 20.0, 200), (30, 50.0, 500), (-5400, 99.0, 9)]:
        h.fake.metrics_values[cid] = {"cpu_pct": cpu, "mem_bytes": mem, "disk_bytes": 7}
        done = await sampler.run_once(now=datetime.fromtimestamp(base + offset, UTC))
        assert done.sampled == [cid]

    async def points(range_: str | None) -> list[dict]:
        resp = await h.client.get(f"/v1/capsules/{cid}/metrics", params={"range": range_} if range_ else {})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["sandbox_id"] == cid and body["range"] == (range_ or "10m")
        return body["points"]

    # 10m (the default) and 5m: one point per sample
    raw = await points(None)
    assert [p["timestamp_unix"] for p in raw] == [base, base + 10, base + 20, base + 30]
    assert [p["cpu_pct"] for p in raw] == [10.0, 30.0, 20.0, 50.0]
    assert raw[0] == {"timestamp_unix": base, "cpu_pct": 10.0, "mem_bytes": 100, "disk_bytes": 7}
    assert await points("5m") == raw
    # 1h: 30 s averages; the sample 90 minutes old is out of range
    assert await points("1h") == [
        {"timestamp_unix": base, "cpu_pct": 20.0, "mem_bytes": 200, "disk_bytes": 7},
        {"timestamp_unix": base + 30, "cpu_pct": 50.0, "mem_bytes": 500, "disk_bytes": 7}]
    # 2h and longer include it, first
    for range_ in ("2h", "6h", "12h", "24h"):
        got = await points(range_)
        assert got[0]["cpu_pct"] == 99.0 and got[0]["timestamp_unix"] < base - 5000, range_
        assert all(isinstance(p["timestamp_unix"], int) for p in got)
        assert [p["timestamp_unix"] for p in got] == sorted(p["timestamp_unix"] for p in got)
    day = await points("24h")  # 5-minute buckets: the four recent samples are one or two points
    assert sum(1 for p in day if p["timestamp_unix"] >= base - 300) in (1, 2)


async def test_metrics_stay_after_the_capsule_stops(h):
    c = await h.running_capsule()
    await h.app.state.sampler.run_once()
    assert (await h.client.delete(f"/v1/capsules/{c['id']}")).status_code == 204
    body = (await h.client.get(f"/v1/capsules/{c['id']}/metrics")).json()
    assert len(body["points"]) == 1 and body["points"][0]["cpu_pct"] == 1.5


async def test_a_capsule_without_samples_has_no_points(h):
    c = await h.running_capsule()
    body = (await h.client.get(f"/v1/capsules/{c['id']}/metrics?range=24h")).json()
    assert body == {"sandbox_id": c["id"], "range": "24h", "points": []}


# ---- stats -------------------------------------------------------------------------------------


async def test_stats_current_peaks_and_series(h):
    a = await h.running_capsule(vcpus=2, memory_mb=1024)
    await h.running_capsule(vcpus=1, memory_mb=512)
    paused = await h.running_capsule(vcpus=4, memory_mb=2048)
    assert (await h.client.post(f"/v1/capsules/{paused['id']}/pause")).status_code == 200
    now = utcnow()
    team_id = (await h.app.state.ops.get(a["id"])).team_id
    with h.app.state.db.session() as s:  # history: a bigger day two days ago, and one 40 days ago
        s.add_all([TeamStatsSample(team_id=team_id, ts_ms=to_ms(now - timedelta(days=2)), running_count=5,
                                   vcpus=9, memory_mb=4096),
                   TeamStatsSample(team_id=team_id, ts_ms=to_ms(now - timedelta(days=40)), running_count=50,
                                   vcpus=90, memory_mb=40960)])
        s.commit()
    done = await h.app.state.sampler.run_once()
    assert done.teams == {team_id: (2, 3, 1536)}

    body = (await h.client.get("/v1/capsules/stats")).json()
    assert {k: v for k, v in body["current"].items() if k != "sampled_at"} == {
        "running_count": 2, "vcpus_reserved": 3, "memory_mb_reserved": 1536}
    assert body["peaks"] == {"running_count": 5, "vcpus": 9, "memory_mb": 4096}  # 30 days, not 40
    assert body["series"]["running"][-1] == 2 and body["series"]["vcpus"][-1] == 3
    assert body["series"]["memory_mb"][-1] == 1536 and max(body["series"]["running"]) == 2

    month = (await h.client.get("/v1/capsules/stats?range=30d")).json()["series"]
    assert max(month["running"]) == 5 and max(month["vcpus"]) == 9 and month["running"][-1] == 2
    at = month["labels"][month["running"].index(5)]
    when = datetime.fromisoformat(at.replace("Z", "+00:00"))
    assert now - timedelta(days=2, hours=6) < when <= now - timedelta(days=2)


async def test_stats_current_needs_no_sample(h):
    """`current` (and the last series point) are read live: right after a start, before any pass."""
    await h.running_capsule(vcpus=3, memory_mb=768)
    body = (await h.client.get("/v1/capsules/stats?range=5m")).json()
    assert body["current"]["running_count"] == 1 and body["current"]["vcpus_reserved"] == 3
    assert body["peaks"] == {"running_count": 1, "vcpus": 3, "memory_mb": 768}
    assert body["series"]["running"][-1] == 1 and body["series"]["memory_mb"][-1] == 768


# ---- the sampler -------------------------------------------------------------------------------


async def test_sampler_skips_what_it_should(h):
    ok = await h.running_capsule()
    failing = await h.running_capsule()
    slow = await h.running_capsule()
    locked = await h.running_capsule()
    paused = await h.running_capsule()
    pausing = await h.running_capsule()
    assert (await h.client.post(f"/v1/capsules/{paused['id']}/pause")).status_code == 200
    h.fake.metrics_values[failing["id"]] = HostAgentError("guest not answering")
    h.fake.metrics_delays[slow["id"]] = 30.0
    h.fake.delays["pause"] = 0.5
    pause = asyncio.create_task(h.client.post(f"/v1/capsules/{pausing['id']}/pause"))
    await h.wait_status(pausing["id"], "pausing")
    sampler = h.app.state.sampler
    sampler.metrics_timeout_sec = 0.2
    calls_before = len(h.fake.ops("metrics"))
    async with h.app.state.ops._lock(locked["id"]):  # a lifecycle call under way
        started = time.monotonic()
        done = await sampler.run_once()
        took = time.monotonic() - started
    await pause
    assert took < 1.5  # bounded by the timeout, not by the slow capsule
    assert done.sampled == [ok["id"]]
    assert set(done.skipped) == {failing["id"], slow["id"], locked["id"]}
    asked = h.fake.ops("metrics")[calls_before:]
    assert sorted(asked) == sorted([ok["id"], failing["id"], slow["id"]])  # never paused/pausing/locked
    with h.app.state.db.session() as s:
        assert s.scalars(select(CapsuleMetric.capsule_id)).all() == [ok["id"]]
        # the team's count is every running capsule, answered or not
        assert s.scalars(select(TeamStatsSample.running_count)).all() == [4]


async def test_no_point_for_a_capsule_that_stopped_running_meanwhile(h):
    c = await h.running_capsule()
    h.fake.metrics_delays[c["id"]] = 0.3
    sampling = asyncio.create_task(h.app.state.sampler.run_once())
    await asyncio.sleep(0.05)
    assert (await h.client.post(f"/v1/capsules/{c['id']}/pause")).status_code == 200
    done = await sampling
    assert done.sampled == [] and done.skipped == [c["id"]]
    assert _count(h, CapsuleMetric) == 0


async def test_odd_metric_values_are_stored_as_null(h):
    c = await h.running_capsule()
    h.fake.metrics_values[c["id"]] = {"cpu_pct": "lots", "mem_bytes": None, "disk_bytes": True}
    await h.app.state.sampler.run_once()
    point = (await h.client.get(f"/v1/capsules/{c['id']}/metrics")).json()["points"][0]
    assert point["cpu_pct"] is None and point["mem_bytes"] is None and point["disk_bytes"] is None


async def test_a_second_pass_in_the_same_instant_is_ignored(h):
    await h.running_capsule()
    now = utcnow()
    await h.app.state.sampler.run_once(now=now)
    await h.app.state.sampler.run_once(now=now)
    assert _count(h, CapsuleMetric) == 1 and _count(h, TeamStatsSample) == 1


async def test_retention(h):
    c = await h.running_capsule()
    sampler, now = h.app.state.sampler, utcnow()
    for age in (timedelta(days=40), timedelta(days=3), timedelta(hours=30), timedelta(0)):
        await sampler.run_once(now=now - age)
    sampler.prune(now)
    with h.app.state.db.session() as s:
        points = s.scalars(select(CapsuleMetric.ts_ms).order_by(CapsuleMetric.ts_ms)).all()
        teams = s.scalars(select(TeamStatsSample.ts_ms).order_by(TeamStatsSample.ts_ms)).all()
    # capsule points: 2 days (the longest metrics range is 24h); team stats: 31 days
    assert points == [to_ms(now - timedelta(hours=30)), to_ms(now)]
    assert teams == [to_ms(now - timedelta(days=3)), to_ms(now - timedelta(hours=30)), to_ms(now)]
    # a pass prunes by itself too (at most once a minute): a fresh sampler's first pass does
    await sampler.run_once(now=now - timedelta(days=10))
    fresh = Sampler(h.app.state.db, h.app.state.ops, 3600)
    assert (await fresh.run_once(now=now + timedelta(seconds=1))).pruned == 1
    assert c["id"]


async def test_the_sampler_runs_by_itself(tmp_path):
    async with running_app(make_settings(tmp_path, sampler_interval_sec=0.05)) as h:
        c = await h.running_capsule()
        deadline = time.monotonic() + 5
        while True:
            points = (await h.client.get(f"/v1/capsules/{c['id']}/metrics?range=5m")).json()["points"]
            if points:
                break
            assert time.monotonic() < deadline, "no point recorded"
            await asyncio.sleep(0.05)
        assert points[0]["cpu_pct"] == 1.5
        # a failing pass does not stop it
        h.fake.metrics_values[c["id"]] = {"cpu_pct": 77.0}
        deadline = time.monotonic() + 5
        while not any(p["cpu_pct"] == 77.0 for p in
                      (await h.client.get(f"/v1/capsules/{c['id']}/metrics?range=5m")).json()["points"]):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    assert h.app.state.sampler._task is None  # stopped with the app


# ---- usage -------------------------------------------------------------------------------------


async def test_usage_across_days_and_pause_resume(h, clock):
    a = await h.running_capsule(vcpus=2, memory_mb=1024)  # running from 2025-03-01 23:30
    clock.at = datetime(2025, 3, 2, 0, 30, tzinfo=UTC)
    assert (await h.client.post(f"/v1/capsules/{a['id']}/pause")).status_code == 200
    clock.at = datetime(2025, 3, 2, 10, 0, tzinfo=UTC)
    assert (await h.client.post(f"/v1/capsules/{a['id']}/resume")).status_code == 200
    clock.at = datetime(2025, 3, 2, 10, 15, tzinfo=UTC)
    assert (await h.client.delete(f"/v1/capsules/{a['id']}")).status_code == 204
    clock.at = datetime(2025, 3, 2, 23, 0, tzinfo=UTC)
    await h.running_capsule(vcpus=1, memory_mb=512)  # still running at "now"
    clock.at = datetime(2025, 3, 3, 1, 0, tzinfo=UTC)

    body = (await h.client.get("/v1/capsules/usage?from=2025-03-01&to=2025-03-04")).json()
    assert body == {"from": "2025-03-01", "to": "2025-03-04", "points": [
        {"date": "2025-03-01", "cpu_minutes": 60.0, "ram_mb_minutes": 30720.0},  # a: 30 min
        {"date": "2025-03-02", "cpu_minutes": 150.0, "ram_mb_minutes": 76800.0},  # a: 30+15 min, b: 60 min
        {"date": "2025-03-03", "cpu_minutes": 60.0, "ram_mb_minutes": 30720.0},  # b: 60 min so far
        {"date": "2025-03-04", "cpu_minutes": 0.0, "ram_mb_minutes": 0.0},
    ]}
    one = (await h.client.get("/v1/capsules/usage?from=2025-03-02&to=2025-03-02")).json()
    assert one["points"] == [{"date": "2025-03-02", "cpu_minutes": 150.0, "ram_mb_minutes": 76800.0}]
    # defaults: the 30 days before today, and today
    default = (await h.client.get("/v1/capsules/usage")).json()
    assert (default["from"], default["to"]) == ("2025-02-01", "2025-03-03") and len(default["points"]) == 31
    assert default["points"][-1]["cpu_minutes"] == 60.0
    only_to = (await h.client.get("/v1/capsules/usage?to=2025-03-02")).json()
    assert only_to["from"] == "2025-01-31" and only_to["points"][-1]["cpu_minutes"] == 150.0

    with h.app.state.db.session() as s:
        runs = s.execute(select(CapsuleRun.capsule_id, CapsuleRun.started_at, CapsuleRun.ended_at)
                         .order_by(CapsuleRun.id)).all()
    assert [(r.started_at.hour, r.ended_at and r.ended_at.hour) for r in runs] == [(23, 0), (10, 10), (23, None)]


async def test_usage_survives_restarts(tmp_path, clock):
    settings = make_settings(tmp_path)
    async with running_app(settings) as h:
        c = await h.running_capsule(vcpus=2, memory_mb=256)  # 2025-03-01 23:30
        fake = h.fake
    clock.at += timedelta(minutes=10)  # the VM ran on while the control plane was down
    async with running_app(settings, fake.survivors()) as h:
        assert (await h.client.get(f"/v1/capsules/{c['id']}")).json()["status"] == "running"
        points = (await h.client.get("/v1/capsules/usage?from=2025-03-01&to=2025-03-01")).json()["points"]
        assert points == [{"date": "2025-03-01", "cpu_minutes": 20.0, "ram_mb_minutes": 2560.0}]
        fake = h.fake
    clock.at += timedelta(minutes=10)
    async with running_app(settings, fake.survivors(drop={c["id"]})) as h:  # lost while down
        assert (await h.client.get(f"/v1/capsules/{c['id']}")).json()["status"] == "error"
        clock.at += timedelta(minutes=15)  # no longer counted
        points = (await h.client.get("/v1/capsules/usage?from=2025-03-01&to=2025-03-02")).json()["points"]
        assert [p["cpu_minutes"] for p in points] == [40.0, 0.0]


def test_migration_opens_runs_for_capsules_already_running(database_url):
    db = Database(database_url)
    try:
        cfg = alembic_config(db)
        with db.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0001")
        started = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
        with db.session() as s:
            # Core inserts of the 0001 columns only (the models have columns of later migrations).
            s.execute(sa.insert(Team.__table__).values(id="team-0001", name="t", created_at=started))
            team = SimpleNamespace(id="team-0001")
            s.commit()
            team_id = team.id
        # Rows as revision 0001 knew them (the ORM model has columns added by later revisions).
        with db.engine.begin() as conn:
            capsules = sa.Table("capsules", sa.MetaData(), autoload_with=conn)
            for cid, status in (("cl-run", "running"), ("cl-paused", "paused")):
                conn.execute(capsules.insert().values(
                    id=cid, team_id=team_id, status=status, template="minimal", template_id="minimal", vcpus=2,
                    memory_mb=512, timeout_sec=0, metadata={}, created_at=started.replace(tzinfo=None),
                    last_updated=started.replace(tzinfo=None), started_at=started.replace(tzinfo=None)))
        run_migrations(db)
        with db.session() as s:
            runs = s.execute(select(CapsuleRun.capsule_id, CapsuleRun.team_id, CapsuleRun.vcpus,
                                    CapsuleRun.started_at, CapsuleRun.ended_at)).all()
        assert runs == [("cl-run", team_id, 2, started, None)]
    finally:
        db.dispose()


# ---- events: the published SDK's shape ---------------------------------------------------------


def _sdk_events(sub) -> list[SSEEvent]:
    """What an SDK reading the stream gets: each event sent as SSE, parsed by the SDK's model."""
    out = []
    while not sub.queue.empty():
        text = format_sse(sub.queue.get_nowait())
        event = SSEEvent.model_validate_json(text.split("data: ", 1)[1])
        assert isinstance(event.event, EventType), event.event  # a kind the published SDK knows
        out.append(event)
    return out


async def test_auto_pause_event_is_by_the_system(tmp_path):
    async with running_app(make_settings(tmp_path, reaper_interval_sec=0.05)) as h:
        c = await h.running_capsule(timeout_sec=1)
        sub = h.app.state.events.subscribe()
        await h.wait_status(c["id"], "paused", timeout=5)
        events = _sdk_events(sub)
    pause = [e for e in events if e.event == "capsule.pause"]
    assert len(pause) == 1 and pause[0].outcome == "success"
    assert pause[0].actor.type == "system" and pause[0].metadata == {"reason": "ttl_expired"}
    assert pause[0].sandbox.status == "paused" and pause[0].resource.id == c["id"]
    changes = [(e.metadata["from"], e.metadata["to"]) for e in events if e.event == "capsule.state.changed"]
    assert changes == [("running", "pausing"), ("pausing", "paused")]


async def test_failed_actions_have_an_error_outcome(h):
    sub = h.app.state.events.subscribe()
    h.fake.fail("create", HostAgentError("no room"))
    assert (await h.client.post("/v1/capsules", json={})).status_code == 502
    c = await h.running_capsule()
    h.fake.fail("pause", HostAgentError("disk full"))
    assert (await h.client.post(f"/v1/capsules/{c['id']}/pause")).status_code == 502
    events = [e for e in _sdk_events(sub) if e.event != "capsule.state.changed"]
    assert [(e.event, e.outcome) for e in events] == [
        ("capsule.create", "error"), ("capsule.create", "success"), ("capsule.pause", "error")]
    assert "no room" in events[0].error and "disk full" in events[2].error
    assert events[0].actor.type == "api_key" and events[0].sandbox.status == "error"


async def test_snapshot_events(h):
    c = await h.running_capsule()
    sub = h.app.state.events.subscribe()
    resp = await h.client.post("/v1/snapshots", json={"sandbox_id": c["id"], "name": "snap-1"})
    assert resp.status_code == 201
    assert (await h.client.delete("/v1/snapshots/snap-1")).status_code == 204
    events = [e for e in _sdk_events(sub) if e.event.startswith("template.")]
    assert [(e.event, e.outcome, e.resource.id, e.resource.type) for e in events] == [
        ("template.snapshot.create", "success", "snap-1", "template"),
        ("template.snapshot.delete", "success", "snap-1", "template")]
    assert events[0].metadata == {"sandbox_id": c["id"]} and events[0].sandbox is None
    assert events[0].timestamp.tzinfo is not None


async def test_usage_dates_are_utc_days(h, clock):
    clock.at = datetime(2025, 12, 31, 23, 59, tzinfo=UTC)
    await h.running_capsule()
    clock.at = datetime(2026, 1, 1, 0, 1, tzinfo=UTC)
    points = (await h.client.get("/v1/capsules/usage?from=2025-12-31&to=2026-01-01")).json()["points"]
    assert [(p["date"], p["cpu_minutes"]) for p in points] == [("2025-12-31", 1.0), ("2026-01-01", 1.0)]
    assert date.fromisoformat(points[0]["date"]) == date(2025, 12, 31)
