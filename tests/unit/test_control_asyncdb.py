"""Database work stays off the event loop, and the checks that decide a write hold across threads
and replicas.

Every statement the control plane sends is recorded (a `before_cursor_execute` listener) with the
thread that sent it, while an app serves whole flows: none may come from the event loop's thread
(`Database.run` sends them from its worker threads). Start-up (migrations, bootstrap) runs before
serving and is left out: the listener is installed once the app is up.

Then the team quota across two control planes on one PostgreSQL database (two replicas): two
creates at the limit at once give one 201 and one 403, every time.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import event

from .fake_host_agent import make_settings, running_app
from .fleet_harness import FakeFleet, add_host, beat, fleet_app, two_replicas


@contextlib.contextmanager
def statements_on_the_loop(db) -> Iterator[dict[str, list[str]]]:  # type: ignore[no-untyped-def]
    """{"loop": [statements sent from this (the event loop's) thread], "all": [every statement]}."""
    loop_thread = threading.get_ident()
    seen: dict[str, list[str]] = {"loop": [], "all": []}

    def record(_conn, _cursor, statement, *_rest) -> None:  # type: ignore[no-untyped-def]
        text = " ".join(statement.split())[:120]
        seen["all"].append(text)
        if threading.get_ident() == loop_thread:
            seen["loop"].append(text)

    event.listen(db.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(db.engine, "before_cursor_execute", record)


def ok(resp: httpx.Response, status: int = 200) -> httpx.Response:
    assert resp.status_code == status, (resp.request.method, resp.request.url.path, resp.status_code, resp.text)
    return resp


async def _events_stream_opens(h, ticket: str) -> None:  # type: ignore[no-untyped-def]
    """The SSE stream never ends: its auth (the ticket's team) runs before the first byte; give up after."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(h.client.get("/v1/events/stream", params={"ticket": ticket}), 0.5)


async def _wait_build(h, build_id: str) -> dict:  # type: ignore[no-untyped-def]
    for _ in range(500):
        body = ok(await h.client.get(f"/v1/builds/{build_id}")).json()
        if body["status"] in ("success", "failed", "cancelled"):
            return body
        await asyncio.sleep(0.02)
    raise AssertionError(f"build {build_id} did not finish: {body}")


async def test_a_whole_flow_sends_no_statement_from_the_event_loop(tmp_path):
    async with running_app(make_settings(tmp_path)) as h:
        db = h.app.state.db
        with statements_on_the_loop(db) as seen:
            c = h.client
            # capsules
            cap = ok(await c.post("/v1/capsules", json={"metadata": {"k": "v"}}), 201).json()
            cid = cap["id"]
            assert cap["status"] == "running"
            ok(await c.get(f"/v1/capsules/{cid}"))
            ok(await c.get("/v1/capsules", params={"limit": 1, "metadata": "k=v"}))
            ok(await c.post(f"/v1/capsules/{cid}/ping"), 204)
            ok(await c.patch(f"/v1/capsules/{cid}/network", json={"allow_internet_access": False}))
            # into the guest
            assert ok(await c.post(f"/v1/capsules/{cid}/exec", json={"cmd": "echo", "args": ["hi"]})).json()[
                "exit_code"] == 0
            ok(await c.post(f"/v1/capsules/{cid}/files/write", files={"file": ("f", b"data")},
                            data={"path": "/root/f"}), 204)
            assert ok(await c.post(f"/v1/capsules/{cid}/files/read", json={"path": "/root/f"})).content == b"data"
            ok(await c.post(f"/v1/capsules/{cid}/files/list", json={"path": "/root"}))
            # lifecycle
            assert ok(await c.post(f"/v1/capsules/{cid}/pause")).json()["status"] == "paused"
            assert ok(await c.post(f"/v1/capsules/{cid}/resume")).json()["status"] == "running"
            ok(await c.post("/v1/snapshots", json={"sandbox_id": cid, "name": "snap"}), 201)
            ok(await c.get("/v1/snapshots"))
            again = ok(await c.post("/v1/capsules", json={"template": "snap"}), 201).json()
            # observability and the background workers' passes
            await h.app.state.sampler.run_once()
            await h.app.state.reaper.run_once()
            await h.app.state.reaper.mark_dead()
            ok(await c.get("/v1/capsules/stats"))
            ok(await c.get("/v1/capsules/usage"))
            ok(await c.get(f"/v1/capsules/{cid}/metrics"))
            ok(await c.get("http://test/metrics"))
            # destroy
            for capsule_id in (cid, again["id"]):
                ok(await c.delete(f"/v1/capsules/{capsule_id}"), 204)
            ok(await c.delete("/v1/snapshots/snap"), 204)
            h.app.state.retention.retention_sec = 1e-6  # (purges the stopped ones now)
            await h.app.state.retention.tick()
            assert ok(await c.get("/v1/capsules")).json() == []
            # builds
            build = ok(await c.post("/v1/builds", json={"name": "web", "recipe": ["RUN echo one", "RUN echo two"]}),
                       202).json()
            assert (await _wait_build(h, build["id"]))["status"] == "success"
            ok(await c.get("/v1/builds"))
            ok(await c.get(f"/v1/builds/{build['id']}/logs"))
            # accounts: keys, users, teams, members
            key = ok(await c.post("/v1/api-keys", json={"name": "ci"}), 201).json()
            ok(await c.get("/v1/api-keys"))
            ok(await c.delete(f"/v1/api-keys/{key['id']}"), 204)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=h.app), base_url="http://test/api") as anon:
                alice = ok(await anon.post("/v1/auth/signup", json={"email": "alice@example.com",
                                                                    "password": "correct horse"}), 201).json()
                ok(await anon.post("/v1/auth/signup", json={"email": "bob@example.com", "password": "correct horse"}),
                   201)
                token = ok(await anon.post("/v1/auth/login", json={"email": "alice@example.com",
                                                                   "password": "correct horse"})).json()["token"]
                auth = {"Authorization": f"Bearer {token}"}
                ok(await anon.get("/v1/me", headers=auth))
                ok(await anon.get("/v1/teams", headers=auth))
                team = ok(await anon.post("/v1/teams", json={"name": "more"}, headers=auth), 201).json()
                team_id = alice["team"]["id"]
                bob = ok(await anon.post(f"/v1/teams/{team_id}/members", json={"email": "bob@example.com",
                                                                                "role": "member"}, headers=auth),
                         201).json()
                ok(await anon.get(f"/v1/teams/{team_id}/members", headers=auth))
                ok(await anon.delete(f"/v1/teams/{team_id}/members/{bob['user_id']}", headers=auth), 204)
                ok(await anon.post("/v1/api-keys", json={"name": "user's"}, headers=auth), 201)
                assert team["role"] == "owner"
            # events (a browser's ticket) and the hosts routes (operators; no host in `wrenn server`)
            ticket = ok(await c.post("/v1/auth/ticket"), 201).json()["ticket"]
            await _events_stream_opens(h, ticket)
            assert ok(await c.get("/v1/hosts")).json() == []
        assert len(seen["all"]) > 150
        assert seen["loop"] == []


async def test_a_fleet_flow_sends_no_statement_from_the_event_loop(tmp_path):
    """Fleet mode: registration, heartbeats, placement, routing to a capsule's host, drain."""
    fleet = FakeFleet()
    async with fleet_app(make_settings(tmp_path), fleet) as h:
        db = h.app.state.db
        with statements_on_the_loop(db) as seen:
            c = h.client
            h1 = await add_host(h, fleet, 1)
            h2 = await add_host(h, fleet, 2)
            cap = ok(await c.post("/v1/capsules", json={}), 201).json()
            cid = cap["id"]
            ok(await c.post(f"/v1/capsules/{cid}/exec", json={"cmd": "true"}))
            ok(await c.post(f"/v1/capsules/{cid}/pause"))
            ok(await beat(h, h1))
            ok(await beat(h, h2))
            src = next(x for x in (h1, h2) if x.id == cap["host_id"])
            ok(await c.post(f"/v1/hosts/{src.id}/drain"))
            moved = await h.app.state.drainer.run_once()
            assert list(moved.moved) == [cid], moved
            assert ok(await c.post(f"/v1/capsules/{cid}/resume")).json()["host_id"] != src.id
            await asyncio.to_thread(h.app.state.heartbeats.run_once)  # (its own pass, as a tick runs it)
            await h.app.state.heartbeats.tick()
            ok(await c.get("/v1/hosts"))
            ok(await c.get(f"/v1/hosts/{src.id}"))
            ok(await c.delete(f"/v1/capsules/{cid}"), 204)
            ok(await c.delete(f"/v1/hosts/{src.id}"), 204)
        assert len(seen["all"]) > 50
        assert seen["loop"] == []


async def test_two_replicas_creating_at_the_team_quota_admit_exactly_one(tmp_path, postgres_url):
    """Two control planes on one PostgreSQL database, a team quota of one capsule: a create on
    each at once gives one 201 and one 403, round after round (the quota check and the row's
    insert are one transaction holding the team's row, see limits.py)."""
    async with two_replicas(tmp_path, postgres_url, team_max_capsules=1) as (a, b, _):
        for _ in range(5):
            resps = await asyncio.gather(a.client.post("/v1/capsules", json={}),
                                         b.client.post("/v1/capsules", json={}))
            assert sorted(r.status_code for r in resps) == [201, 403], [r.text for r in resps]
            refused = next(r for r in resps if r.status_code == 403).json()["error"]
            assert refused["code"] == "forbidden" and "at most 1 capsules" in refused["message"]
            winner = next((h, r.json()["id"]) for h, r in zip((a, b), resps) if r.status_code == 201)
            ok(await winner[0].client.delete(f"/v1/capsules/{winner[1]}"), 204)
        listed = ok(await a.client.get("/v1/capsules")).json()
        assert len(listed) == 5 and {x["status"] for x in listed} == {"stopped"}


async def test_two_replicas_resuming_at_the_team_quota_admit_exactly_one(tmp_path, postgres_url):
    """The same for resumes: two paused capsules, room for one running."""
    async with two_replicas(tmp_path, postgres_url) as (a, b, settings):
        ids = []
        for h in (a, b):
            cid = ok(await h.client.post("/v1/capsules", json={}), 201).json()["id"]
            ok(await h.client.post(f"/v1/capsules/{cid}/pause"))
            ids.append(cid)
        for s in settings:  # (read by each request)
            s.team_max_capsules = 1
        resps = await asyncio.gather(a.client.post(f"/v1/capsules/{ids[0]}/resume"),
                                     b.client.post(f"/v1/capsules/{ids[1]}/resume"))
        assert sorted(r.status_code for r in resps) == [200, 403], [r.text for r in resps]


@pytest.mark.parametrize("threads", [1, 3])
def test_run_returns_the_jobs_result_from_a_worker_thread(database_url, threads):
    from wrenn_control.db.migrate import run_migrations
    from wrenn_control.db.session import Database

    db = Database(database_url, threads=threads)
    try:
        run_migrations(db)

        def job(s, x, *, y):  # type: ignore[no-untyped-def]
            from sqlalchemy import text

            return threading.get_ident(), s.scalar(text("SELECT 1")) + x + y

        async def main() -> list[tuple[int, int]]:
            return await asyncio.gather(*(db.run(job, 1, y=2) for _ in range(6)))

        results = asyncio.run(main())
        assert {r for _, r in results} == {4}
        used = {t for t, _ in results}
        assert threading.get_ident() not in used and used <= db.worker_threads
        # SQLite: one worker, whatever was asked; PostgreSQL: as many as asked
        assert db.threads == (1 if db.backend == "sqlite" else threads)
        assert len(db.worker_threads) <= db.threads
    finally:
        db.dispose()


async def test_a_lock_wait_stalls_only_its_own_request(tmp_path, postgres_url):
    """Another connection holds the team's row: a create waits for it (in a worker thread) while
    the same app keeps answering other requests; the create goes through once the lock is gone."""
    from sqlalchemy import select

    from wrenn_control.db.models import Team
    from wrenn_control.db.session import Database

    async with running_app(make_settings(tmp_path, database_url=postgres_url)) as h:
        cid = ok(await h.client.post("/v1/capsules", json={}), 201).json()["id"]
        other = Database(postgres_url)
        try:
            with other.session() as s:
                s.execute(select(Team).with_for_update()).all()  # held until the commit below
                create = asyncio.create_task(h.client.post("/v1/capsules", json={}))
                done, _ = await asyncio.wait({create}, timeout=0.3)
                assert not done  # waiting for the lock
                assert ok(await h.client.get(f"/v1/capsules/{cid}")).json()["status"] == "running"
                ok(await h.client.get("/v1/capsules"))
                assert not create.done()
                s.commit()
            assert ok(await create, 201).json()["status"] == "running"
        finally:
            other.dispose()
