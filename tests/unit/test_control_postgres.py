"""Control plane storage on PostgreSQL (and what must hold on both backends).

The other `test_control_*` modules already run every test on SQLite and on PostgreSQL (see
conftest.py). Here: what is specific to PostgreSQL (URLs, real concurrent transactions,
migrations from empty and back, concurrent migrations) and storage properties checked on both
(ordering ties, timestamps, NUL characters, no connection held while the host agent works).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import event, inspect, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.pool import QueuePool

from wrenn_control.bootstrap import add_team
from wrenn_control.clock import utcnow
from wrenn_control.db.migrate import alembic_config, run_migrations
from wrenn_control.db.models import Base, Capsule
from wrenn_control.db.session import POOL_OVERFLOW, Database, normalize_url
from wrenn_control.lifecycle import Status, transition

from .fake_host_agent import FakeHostAgent, make_settings, running_app

S = Status
TABLES = {"teams", "api_keys", "capsules", "templates", "capsule_runs", "capsule_metrics", "team_stats_samples",
          "users", "team_members", "builds", "build_layers", "hosts", "worker_passes"}


def _capsule(team_id: str, cid: str, status: str = "running", created_at: datetime | None = None) -> Capsule:
    now = created_at or utcnow()
    return Capsule(id=cid, team_id=team_id, status=status, template="minimal", template_id="minimal", vcpus=1,
                   memory_mb=512, timeout_sec=0, meta={}, created_at=now, last_updated=now)


def _diff(db: Database) -> list:
    with db.engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)


# ---- PostgreSQL only -------------------------------------------------------------------------


def test_plain_postgres_urls_mean_psycopg(postgres_url):
    assert normalize_url("postgres://u:p@db.example/wrenn").drivername == "postgresql+psycopg"
    assert normalize_url("postgresql://u@/wrenn?host=/run/pg").drivername == "postgresql+psycopg"
    assert normalize_url("postgresql+psycopg2://u@h/w").drivername == "postgresql+psycopg2"  # an explicit choice
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"

    # what an operator would paste: postgresql://... (SQLAlchemy alone would want psycopg2)
    plain = make_url(postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
    db = Database(plain)
    try:
        assert db.engine.dialect.driver == "psycopg"
        # one connection per database worker thread (8 by default), a few more, bounded
        assert isinstance(db.engine.pool, QueuePool) and db.threads == 8
        assert db.engine.pool.size() == 8 and db.engine.pool._max_overflow == POOL_OVERFLOW
        with db.session() as s:
            # a lock wait holds a worker thread (and a request): it is bounded, as SQLite's busy_timeout
            assert s.scalar(text("SHOW lock_timeout")) == "5s"
            assert s.scalar(text("SHOW transaction_isolation")) == "read committed"
        run_migrations(db)
        assert _diff(db) == []
    finally:
        db.dispose()


def test_pooled_connections_survive_a_database_restart(postgres_url, postgres_server):
    db = Database(postgres_url)
    try:
        with db.session() as s:
            before = s.scalar(text("SELECT pg_backend_pid()"))
        with postgres_server.connect() as admin:  # as a server restart would: the pooled one dies
            admin.execute("SELECT pg_terminate_backend(%s)", (before,))
        with db.session() as s:  # pinged, found dead, replaced: no failed request
            assert s.scalar(text("SELECT pg_backend_pid()")) != before
    finally:
        db.dispose()


def test_migrations_from_empty_down_and_up_again(postgres_url):
    db = Database(postgres_url)
    try:
        assert inspect(db.engine).get_table_names() == []
        run_migrations(db)
        assert set(inspect(db.engine).get_table_names()) == TABLES | {"alembic_version"}
        assert _diff(db) == []
        cfg = alembic_config(db)
        with db.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "base")
        assert set(inspect(db.engine).get_table_names()) == {"alembic_version"}
        run_migrations(db)
        assert _diff(db) == []
        # seq is a real sequence: never reused, so newest-first stays stable
        with db.session() as s:
            team = add_team(s, "t")
            s.add_all([_capsule(team.id, "cl-a"), _capsule(team.id, "cl-b")])
            s.commit()
            s.execute(Capsule.__table__.delete().where(Capsule.id == "cl-b"))
            s.add(_capsule(team.id, "cl-c"))
            s.commit()
            assert s.scalars(select(Capsule.seq).order_by(Capsule.seq)).all() == [1, 3]
    finally:
        db.dispose()


def test_two_control_planes_migrating_at_once(postgres_url):
    """Both start on an empty database: one migrates, the other waits and finds nothing to do."""
    dbs = [Database(postgres_url) for _ in range(4)]
    barrier = threading.Barrier(len(dbs))

    def start(db: Database) -> None:
        barrier.wait()
        run_migrations(db)

    try:
        with ThreadPoolExecutor(len(dbs)) as pool:
            for f in [pool.submit(start, db) for db in dbs]:
                f.result(timeout=60)
        assert _diff(dbs[0]) == []
    finally:
        for db in dbs:
            db.dispose()


def test_conditional_transition_across_real_concurrent_transactions(postgres_url):
    """Two connections (as two processes would be): the second UPDATE waits for the first
    transaction, then re-checks its WHERE and does nothing. Exactly one wins."""
    db = Database(postgres_url)
    try:
        run_migrations(db)
        with db.session() as s:
            team = add_team(s, "t")
            s.add(_capsule(team.id, "cl-1"))
            s.commit()
        started = threading.Event()

        def second() -> bool:
            with db.session() as s2:
                started.set()
                won = transition(s2, "cl-1", S.STOPPING)  # blocks on the row lock
                s2.commit()
                return won

        with db.session() as s1, ThreadPoolExecutor(1) as pool:
            assert transition(s1, "cl-1", S.PAUSING, from_={S.RUNNING})
            fut = pool.submit(second)
            started.wait(5)
            # the other transaction is blocked on our row lock, not failed nor finished
            with pytest.raises(TimeoutError):
                fut.result(timeout=0.3)
            assert transition(s1, "cl-1", S.PAUSED, from_={S.PAUSING})
            s1.commit()
            # STOPPING is allowed from PAUSED: the second sees the committed row and wins now
            assert fut.result(timeout=5) is True
        with db.session() as s:
            assert s.scalar(select(Capsule.status).where(Capsule.id == "cl-1")) == "stopping"

        # and when the committed row no longer qualifies, the waiting one loses
        with db.session() as s1, ThreadPoolExecutor(1) as pool:
            assert transition(s1, "cl-1", S.STOPPED)
            fut = pool.submit(lambda: _transition_alone(db, "cl-1", S.ERROR))
            with pytest.raises(TimeoutError):
                fut.result(timeout=0.3)
            s1.commit()
            assert fut.result(timeout=5) is False
    finally:
        db.dispose()


def _transition_alone(db: Database, cid: str, to: Status) -> bool:
    with db.session() as s:
        won = transition(s, cid, to)
        s.commit()
        return won


# ---- both backends ---------------------------------------------------------------------------


async def test_newest_first_ties_broken_by_creation_order(tmp_path):
    """Capsules with the very same created_at still list newest first (by seq)."""
    async with running_app(make_settings(tmp_path)) as h:
        ids = [(await h.client.post("/v1/capsules", json={})).json()["id"] for _ in range(6)]
        for cid in ids:
            await h.wait_status(cid, "running")
        same = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)
        with h.app.state.db.session() as s:
            s.execute(update(Capsule).values(created_at=same))
            s.commit()
        listed = (await h.client.get("/v1/capsules")).json()
        assert [c["id"] for c in listed] == ids[::-1]
        assert {c["created_at"] for c in listed} == {"2025-01-02T03:04:05Z"}


def test_timestamps_keep_the_instant_and_microseconds(database_url):
    db = Database(database_url)
    try:
        run_migrations(db)
        plus2 = timezone(timedelta(hours=2))
        local = datetime(2025, 6, 1, 12, 0, 0, 123456, tzinfo=plus2)
        with db.session() as s:
            team = add_team(s, "t")
            s.add(_capsule(team.id, "cl-1", created_at=local))
            s.commit()
        with db.session() as s:
            row = s.scalar(select(Capsule).where(Capsule.id == "cl-1"))
            assert row.created_at == local and row.created_at.tzinfo == timezone.utc
            assert row.created_at.microsecond == 123456 and row.created_at.hour == 10
            # comparisons in SQL use the same UTC instants (the reaper's cutoffs do)
            assert s.scalar(select(Capsule.id).where(Capsule.created_at > local - timedelta(microseconds=1)))
            assert not s.scalar(select(Capsule.id).where(Capsule.created_at > local))
    finally:
        db.dispose()


async def test_nul_characters_are_not_found_not_a_server_error(tmp_path):
    """PostgreSQL cannot compare text with NUL in it: such ids and names are simply not found."""
    async with running_app(make_settings(tmp_path)) as h:
        assert (await h.client.get("/v1/capsules/cl-x%00y")).status_code == 404
        assert (await h.client.delete("/v1/capsules/cl-x%00y")).status_code == 404
        assert (await h.client.delete("/v1/snapshots/a%00b")).status_code == 404
        assert (await h.client.post("/v1/capsules", json={"template": "a\u0000b"})).status_code == 400
        assert (await h.client.post("/v1/snapshots", json={"sandbox_id": "cl-\u0000", "name": "x"})).status_code == 404
        # label values are JSON: kept as given
        c = await h.running_capsule(metadata={"k": "a\u0000b"})
        assert c["metadata"]["k"] == "a\u0000b"
        # free text with a NUL (e.g. a host error message) is stored, the NUL replaced
        with h.app.state.db.session() as s:
            s.execute(update(Capsule).where(Capsule.id == c["id"]).values(status="error", error="bad\x00news"))
            s.commit()
        assert (await h.client.get(f"/v1/capsules/{c['id']}")).json()["metadata"]["error"] == "bad\ufffdnews"


async def test_no_connection_is_held_while_the_host_agent_works(tmp_path):
    """A connection checked out on the event loop across an await could be waited for by the
    next coroutine. Count the connections the event loop's thread holds at every host agent call,
    with many capsules created, paused, resumed and destroyed at once (lookups done in worker
    threads check theirs out and in within the thread, never across an await)."""
    fake = FakeHostAgent()
    fake.delays.update(create=0.02, pause=0.02, resume=0.02, destroy=0.02)
    out = {"n": 0, "total": 0}
    seen: list[tuple[str, int]] = []
    hook = fake._hook

    async def counting_hook(op: str, target: str = "") -> None:
        seen.append((op, out["n"]))
        await hook(op, target)

    fake._hook = counting_hook  # type: ignore[method-assign]
    async with running_app(make_settings(tmp_path), fake) as h:
        engine = h.app.state.db.engine

        loop_thread = threading.get_ident()

        @event.listens_for(engine, "checkout")
        def _out(*_a):  # type: ignore[no-untyped-def]
            out["total"] += 1
            if threading.get_ident() == loop_thread:
                out["n"] += 1

        @event.listens_for(engine, "checkin")
        def _in(*_a):  # type: ignore[no-untyped-def]
            if threading.get_ident() == loop_thread:
                out["n"] -= 1

        resps = await asyncio.gather(*(h.client.post("/v1/capsules", json={}) for _ in range(20)))
        ids = [r.json()["id"] for r in resps]
        await asyncio.gather(*(h.wait_status(cid, "running") for cid in ids))
        paused = await asyncio.gather(*(h.client.post(f"/v1/capsules/{cid}/pause") for cid in ids))
        assert [r.status_code for r in paused] == [200] * 20
        resumed = await asyncio.gather(*(h.client.post(f"/v1/capsules/{cid}/resume") for cid in ids))
        assert [r.status_code for r in resumed] == [200] * 20
        gone = await asyncio.gather(*(h.client.delete(f"/v1/capsules/{cid}") for cid in ids))
        assert [r.status_code for r in gone] == [204] * 20
        assert {c["status"] for c in (await h.client.get("/v1/capsules")).json()} == {"stopped"}
        assert out["n"] == 0 and out["total"] > 100
    ops = [op for op, _ in seen if op in ("create", "pause", "resume", "destroy")]
    assert len(ops) >= 80
    assert [(op, n) for op, n in seen if n] == []
