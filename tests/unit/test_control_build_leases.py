"""Builds with several control-plane replicas (one PostgreSQL database): a replica's start does
not end the others' builds, a cancel through any replica stops the build where it runs, and a
build whose replica died ends failed, its build capsule destroyed at the host's next heartbeat."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

from wrenn_control.clock import utcnow
from wrenn_control.db.models import Build
from wrenn_host.api import StreamEvent

from .fake_host_agent import make_settings
from .fleet_harness import beat, fleet_app, two_replicas


async def _until(predicate, what: str, bound: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + bound
    while not await predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def _status(h, build_id: str) -> str:  # type: ignore[no-untyped-def]
    return (await h.client.get(f"/v1/builds/{build_id}")).json()["status"]


async def test_a_build_outlives_another_replicas_restart_and_stops_on_a_cancel_from_it(tmp_path, postgres_url):
    async with two_replicas(tmp_path, postgres_url) as (a, b, settings):
        agent = a.fleet_host.agent
        agent.attach_events[agent._next_pid + 1] = [StreamEvent("sleep", exit_code=60),
                                                    StreamEvent("exit", exit_code=0)]
        build = (await a.client.post("/v1/builds", json={"name": "slow", "recipe": ["RUN sleep 60"]})).json()

        async def running() -> bool:
            return await _status(b, build["id"]) == "running" and build["id"] in agent.capsules
        await _until(running, "the build running on a")

        # A third replica starting (as b would after a restart) leaves a's build alone.
        async with fleet_app(make_settings(tmp_path / "c", database_url=postgres_url,
                                           bootstrap_api_key=settings[0].bootstrap_api_key), a.fake_fleet):
            assert await _status(b, build["id"]) == "running"

        # Cancelled through b, it stops on a, and a removes its build capsule.
        resp = await b.client.post(f"/v1/builds/{build['id']}/cancel")
        assert resp.status_code == 200 and resp.json()["status"] == "cancelled", resp.text

        async def gone() -> bool:
            return build["id"] not in agent.capsules
        await _until(gone, "the build capsule removed by a")
        assert build["id"] in agent.ops("destroy")


async def test_a_build_whose_replica_died_ends_failed_and_its_capsule_goes(tmp_path, postgres_url):
    async with two_replicas(tmp_path, postgres_url) as (a, b, _settings):
        host, agent = a.fleet_host, a.fleet_host.agent
        # What a replica killed mid-build leaves: a running build under its lapsed lease, and
        # the build capsule on the host.
        build_id = "bld-" + "d" * 20
        await agent.create(build_id, "minimal", 1, 512)
        now = utcnow()

        def orphan(s) -> None:  # type: ignore[no-untyped-def]
            from wrenn_control.db.models import Team
            team_id = s.query(Team.id).first()[0]
            s.add(Build(id=build_id, team_id=team_id, name="orphan", base_template="minimal", status="running",
                        current_step=1, total_steps=3, spec={}, vcpus=1, memory_mb=512, logs="", error=None,
                        template_id=None, cached_steps=0, created_at=now, started_at=now, completed_at=None,
                        claimed_by="gone:1:dead", claimed_until=now - timedelta(seconds=1)))
            s.commit()
        await a.app.state.db.run(orphan)

        # Its lease lapsed: any replica ends it.
        assert await b.app.state.builds.expire_orphans() == 1
        body = (await a.client.get(f"/v1/builds/{build_id}")).json()
        assert body["status"] == "failed" and "replica running it stopped" in body["error"]
        assert await b.app.state.builds.expire_orphans() == 0  # once

        # The host still has the build capsule; its next heartbeat gets it destroyed.
        resp = await beat(a, host)
        assert resp.status_code == 200, resp.text

        async def gone() -> bool:
            return build_id not in agent.capsules
        await _until(gone, "the orphan build capsule destroyed")
