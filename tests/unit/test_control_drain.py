"""A fleet's capsules and templates are not tied to one host: a drained host's paused capsules
move to the others (workers/drainer.py), and a snapshot template made on one host is copied to
the host a create is placed on (hosts/router.py). Fake host agents with the real archive format
and checks (tests/unit/fake_host_agent.py); SQLite and PostgreSQL."""

from __future__ import annotations

from .fake_host_agent import make_settings
from .fleet_harness import FakeFleet, add_host, beat, fleet_app


async def _capsule_on(h, host) -> dict:
    """A running capsule, which placement puts on `host` (the only host yet, or the least loaded)."""
    cap = await h.running_capsule()
    assert cap["host_id"] == host.id, (cap, host.id)
    return cap


async def test_drain_moves_paused_capsules_and_leaves_running_ones(tmp_path):
    fleet = FakeFleet()
    async with fleet_app(make_settings(tmp_path), fleet) as h:
        a = await add_host(h, fleet, 1)
        paused = await _capsule_on(h, a)
        third = await _capsule_on(h, a)
        b = await add_host(h, fleet, 2)
        assert (await h.running_capsule())["host_id"] == b.id  # the least loaded
        assert (await h.client.post(f"/v1/capsules/{paused['id']}/pause")).status_code == 200

        assert (await h.client.post(f"/v1/hosts/{a.id}/drain")).json()["status"] == "draining"
        done = await h.app.state.drainer.run_once()
        assert done.moved == {paused["id"]: b.id} and done.failed == {}
        moved = (await h.client.get(f"/v1/capsules/{paused['id']}")).json()
        assert moved["host_id"] == b.id and moved["status"] == "paused"
        assert paused["id"] not in a.agent.capsules and b.agent.capsules[paused["id"]].state == "paused"
        # it resumes on its new host, as it was
        resumed = await h.client.post(f"/v1/capsules/{paused['id']}/resume")
        assert resumed.status_code == 200 and resumed.json()["host_id"] == b.id
        ran = await h.client.post(f"/v1/capsules/{paused['id']}/exec", json={"cmd": "true"})
        assert ran.status_code == 200 and paused["id"] in b.agent.ops("exec")

        # a running capsule stays on the draining host until it is paused; then it moves too
        assert third["id"] in a.agent.capsules
        assert (await h.app.state.drainer.run_once()).moved == {}
        assert (await h.client.post(f"/v1/capsules/{third['id']}/pause")).status_code == 200
        assert (await h.app.state.drainer.run_once()).moved == {third["id"]: b.id}
        assert a.agent.capsules == {}
        # empty now: it can be removed
        assert (await h.client.delete(f"/v1/hosts/{a.id}")).status_code == 204


async def test_a_failed_move_leaves_the_capsule_where_it_was(tmp_path):
    fleet = FakeFleet()
    async with fleet_app(make_settings(tmp_path), fleet) as h:
        a = await add_host(h, fleet, 1)
        cap = await _capsule_on(h, a)
        b = await add_host(h, fleet, 2)
        assert (await h.client.post(f"/v1/capsules/{cap['id']}/pause")).status_code == 200
        await h.client.post(f"/v1/hosts/{a.id}/drain")
        a.agent.archive_tamper = lambda chunk: chunk[:-1] + bytes([chunk[-1] ^ 1])  # damaged in flight
        done = await h.app.state.drainer.run_once()
        assert done.moved == {} and cap["id"] in done.failed
        shown = (await h.client.get(f"/v1/capsules/{cap['id']}")).json()
        assert shown["host_id"] == a.id and shown["status"] == "paused"
        assert a.agent.capsules[cap["id"]].state == "paused" and cap["id"] not in b.agent.capsules
        # the next pass, the network healthy again, moves it
        a.agent.archive_tamper = None
        assert (await h.app.state.drainer.run_once()).moved == {cap["id"]: b.id}
        resumed = await h.client.post(f"/v1/capsules/{cap['id']}/resume")
        assert resumed.status_code == 200 and resumed.json()["status"] == "running"


async def test_a_snapshot_made_on_one_host_starts_a_capsule_on_another(tmp_path):
    fleet = FakeFleet()
    async with fleet_app(make_settings(tmp_path), fleet) as h:
        a = await add_host(h, fleet, 1)
        source = await _capsule_on(h, a)
        made = await h.client.post("/v1/snapshots", json={"sandbox_id": source["id"], "name": "web"})
        assert made.status_code == 201, made.text
        await beat(h, a)  # its heartbeat now lists the template
        b = await add_host(h, fleet, 2)
        await h.client.post(f"/v1/hosts/{a.id}/drain")
        cap = await h.running_capsule(template="web")
        assert cap["host_id"] == b.id
        template_ids = set(b.agent.templates)
        assert template_ids and template_ids <= set(a.agent.templates)  # copied, not made anew
        assert b.agent.capsules[cap["id"]].template_id in template_ids
        shown = (await h.client.get(f"/v1/hosts/{b.id}")).json()
        assert set(shown["templates"]) >= template_ids  # placement knows before the next heartbeat
        # a second create finds it there: nothing copied again
        again = await h.running_capsule(template="web")
        assert again["host_id"] == b.id
        assert len(a.agent.ops("read_archive")) == 1
