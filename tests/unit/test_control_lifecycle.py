"""Control plane: the state machine's table and conditional transitions; the event bus and SSE."""

from __future__ import annotations

import asyncio
import json

import pytest
from sqlalchemy import select

from wrenn_control.api.routes.events import format_sse, sse_stream
from wrenn_control.bootstrap import add_team
from wrenn_control.clock import utcnow
from wrenn_control.db.migrate import run_migrations
from wrenn_control.db.models import Capsule
from wrenn_control.db.session import Database
from wrenn_control.events import Event, EventBus
from wrenn_control.lifecycle import ALLOWED, Status, sources_of, touch_active, transition

from .fake_host_agent import TS_RE

S = Status


@pytest.fixture
def db(database_url):
    database = Database(database_url)
    run_migrations(database)
    with database.session() as s:
        team = add_team(s, "t")
        now = utcnow()
        s.add(Capsule(id="cl-1", team_id=team.id, status="running", template="minimal", template_id="minimal",
                      vcpus=1, memory_mb=512, timeout_sec=0, meta={}, created_at=now, last_updated=now,
                      started_at=now))
        s.commit()
    yield database
    database.dispose()


def status_of(db, cid="cl-1"):
    with db.session() as s:
        return s.scalar(select(Capsule.status).where(Capsule.id == cid))


def test_table_shape():
    assert ALLOWED[S.STOPPED] == frozenset()  # terminal
    assert ALLOWED[S.ERROR] == {S.STOPPING}  # only destroy
    for state in Status:
        if state not in (S.STOPPED, S.STOPPING):
            assert S.STOPPING in ALLOWED[state], state  # destroy from any state
    assert sources_of(S.PAUSING) == {S.RUNNING}
    assert sources_of(S.RESUMING) == {S.PAUSED}
    assert sources_of(S.SNAPSHOTTING) == {S.RUNNING, S.PAUSED}


def test_transition_is_conditional(db):
    with db.session() as s:
        assert transition(s, "cl-1", S.PAUSING, from_={S.RUNNING})
        assert not transition(s, "cl-1", S.PAUSING, from_={S.RUNNING})  # the second one loses
        s.commit()
    assert status_of(db) == "pausing"
    with db.session() as s:
        assert not touch_active(s, "cl-1")  # activity only counts while running
        assert transition(s, "cl-1", S.PAUSED)
        assert not transition(s, "cl-1", S.PAUSED, from_={S.PAUSING})
        assert not transition(s, "cl-x", S.STOPPING)  # unknown id
        s.commit()
    assert status_of(db) == "paused"


def test_disallowed_edges_raise(db):
    with db.session() as s:
        with pytest.raises(ValueError):
            transition(s, "cl-1", S.RUNNING, from_={S.PAUSED})  # resume must go through resuming
        with pytest.raises(ValueError):
            transition(s, "cl-1", S.RUNNING, from_={S.STOPPED})
        # only the reconcile may force what the host found
        assert transition(s, "cl-1", S.PAUSED, from_={S.RUNNING}, force=True)
        s.commit()
    assert status_of(db) == "paused"


def test_transition_sets_values_and_last_updated(db):
    with db.session() as s:
        before = s.scalar(select(Capsule.last_updated).where(Capsule.id == "cl-1"))
        assert transition(s, "cl-1", S.ERROR, values={"error": "boom"})
        s.commit()
    with db.session() as s:
        row = s.scalar(select(Capsule).where(Capsule.id == "cl-1"))
    assert (row.status, row.error) == ("error", "boom")
    assert row.last_updated >= before and row.last_updated.tzinfo is not None


async def test_event_bus_filters_by_team_and_drops_oldest():
    bus = EventBus()
    mine, everyone = bus.subscribe("t1", maxsize=2), bus.subscribe()
    for i in range(3):
        bus.publish("capsule.state.changed", "t1", {"i": i})
    bus.publish("capsule.pause", "t2", {"i": 9})
    assert [mine.queue.get_nowait().data["i"] for _ in range(mine.queue.qsize())] == [1, 2]
    assert everyone.queue.qsize() == 4
    mine.close()
    bus.publish("capsule.state.changed", "t1", {})
    assert mine.queue.empty()


async def test_sse_stream_format():
    bus = EventBus()
    sub = bus.subscribe("t1")
    stream = sse_stream(sub, keepalive_sec=0.05)
    first = await anext(stream)
    assert first.startswith("event: connected\ndata: ") and first.endswith("\n\n")
    assert set(json.loads(first.split("data: ", 1)[1])) == {"event", "timestamp"}
    assert await anext(stream) == ": keepalive\n\n"
    bus.publish("capsule.state.changed", "t1", {"resource": {"id": "cl-1", "type": "capsule"}})
    text = await anext(stream)
    assert text.startswith("event: capsule.state.changed\ndata: ") and text.endswith("\n\n")
    payload = json.loads(text.split("data: ", 1)[1])  # one data line: the body, flat
    assert payload["event"] == "capsule.state.changed" and payload["resource"] == {"id": "cl-1", "type": "capsule"}
    assert TS_RE.match(payload["timestamp"])
    await stream.aclose()
    assert sub not in bus._subs  # unsubscribed when the client goes away
    assert format_sse(Event("x.y", "t", {})).startswith("event: x.y\ndata: {")


async def test_concurrent_transitions_from_many_tasks(db):
    """Many coroutines race to pause one capsule: exactly one wins."""
    async def attempt():
        await asyncio.sleep(0)
        with db.session() as s:
            won = transition(s, "cl-1", S.PAUSING, from_={S.RUNNING})
            s.commit()
        return won

    results = await asyncio.gather(*(attempt() for _ in range(20)))
    assert results.count(True) == 1
