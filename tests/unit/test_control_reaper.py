"""Control plane: the auto-pause reaper and the reconcile on restart."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import update

from wrenn_control.clock import utcnow
from wrenn_control.db.models import Capsule
from wrenn_host.api import VMMError

from .fake_host_agent import FakeHostAgent, make_settings, running_app


async def test_idle_capsule_is_auto_paused(tmp_path):
    async with running_app(make_settings(tmp_path, reaper_interval_sec=0.05)) as h:
        idle = await h.running_capsule(timeout_sec=1)
        forever = await h.running_capsule(timeout_sec=0)
        await asyncio.sleep(0.5)
        assert (await h.client.get(f"/v1/capsules/{idle['id']}")).json()["status"] == "running"
        paused = await h.wait_status(idle["id"], "paused", timeout=3)
        assert h.fake.capsules[idle["id"]].state == "paused"
        assert paused["last_updated"] >= paused["started_at"]
        assert (await h.client.get(f"/v1/capsules/{forever['id']}")).json()["status"] == "running"
        # resume gives it a fresh window (started_at is "last reached running")
        assert (await h.client.post(f"/v1/capsules/{idle['id']}/resume")).json()["status"] == "running"
        await asyncio.sleep(0.3)
        assert (await h.client.get(f"/v1/capsules/{idle['id']}")).json()["status"] == "running"
        await h.wait_status(idle["id"], "paused", timeout=3)


async def test_pings_keep_it_running(tmp_path):
    async with running_app(make_settings(tmp_path, reaper_interval_sec=0.05)) as h:
        c = await h.running_capsule(timeout_sec=1)
        for _ in range(8):  # 2 s of pings every 0.25 s
            assert (await h.client.post(f"/v1/capsules/{c['id']}/ping")).status_code == 204
            await asyncio.sleep(0.25)
        assert (await h.client.get(f"/v1/capsules/{c['id']}")).json()["status"] == "running"
        assert h.fake.ops("pause") == []
        await h.wait_status(c["id"], "paused", timeout=3)


async def test_long_exec_is_not_paused_under_it(tmp_path):
    async with running_app(make_settings(tmp_path, reaper_interval_sec=0.05)) as h:
        c = await h.running_capsule(timeout_sec=1)
        h.fake.delays["exec"] = 1.6
        resp = await h.client.post(f"/v1/capsules/{c['id']}/exec", json={"cmd": "sleep", "args": ["1.6"]})
        assert resp.status_code == 200, resp.text
        assert h.fake.ops("pause") == []
        assert (await h.client.get(f"/v1/capsules/{c['id']}")).json()["status"] == "running"


async def test_run_once_decides_by_the_clock(tmp_path):
    # Reaper loop effectively off; drive single passes with an explicit "now".
    async with running_app(make_settings(tmp_path, reaper_interval_sec=3600)) as h:
        reaper = h.app.state.reaper
        c = await h.running_capsule(timeout_sec=100)
        now = utcnow()
        assert await reaper.run_once(now + timedelta(seconds=50)) == []
        await h.client.post(f"/v1/capsules/{c['id']}/ping")
        assert await reaper.run_once(utcnow() + timedelta(seconds=99)) == []
        assert await reaper.run_once(utcnow() + timedelta(seconds=101)) == [c["id"]]
        assert (await h.client.get(f"/v1/capsules/{c['id']}")).json()["status"] == "paused"
        assert await reaper.run_once(utcnow() + timedelta(seconds=500)) == []  # already paused


async def test_auto_pause_failure_is_recorded_truthfully(tmp_path):
    async with running_app(make_settings(tmp_path, reaper_interval_sec=3600)) as h:
        c = await h.running_capsule(timeout_sec=5)
        h.fake.fail("pause", VMMError("qemu died"))
        h.fake.crash(c["id"])
        assert await h.app.state.reaper.run_once(utcnow() + timedelta(seconds=10)) == []
        got = (await h.client.get(f"/v1/capsules/{c['id']}")).json()
        assert got["status"] == "error" and "pause failed" in got["metadata"]["error"]


async def test_restart_reconciles_with_what_the_host_found(tmp_path):
    settings = make_settings(tmp_path)
    fake1 = FakeHostAgent()
    async with running_app(settings, fake1) as h:
        alive = await h.running_capsule()
        paused = await h.running_capsule()
        await h.client.post(f"/v1/capsules/{paused['id']}/pause")
        vanished = await h.running_capsule()
        broken = await h.running_capsule()
        stopped = await h.running_capsule()
        await h.client.delete(f"/v1/capsules/{stopped['id']}")
        failed = await h.running_capsule()
        with h.app.state.db.session() as s:  # a capsule whose destroy was interrupted
            s.execute(update(Capsule).where(Capsule.id == failed["id"]).values(status="stopping"))
            s.commit()
    assert fake1.closed

    fake2 = fake1.survivors(drop={vanished["id"]}, lost={broken["id"]})
    async with running_app(settings, fake2) as h:
        assert fake2.started_with == {alive["id"]: "running", paused["id"]: "paused",
                                      vanished["id"]: "running", broken["id"]: "running"}
        assert failed["id"] in fake2.cleaned_on_start  # not in `known`: the host removed it
        status = {c["id"]: c for c in (await h.client.get("/v1/capsules")).json()}
        assert status[alive["id"]]["status"] == "running"
        assert status[paused["id"]]["status"] == "paused"
        assert status[vanished["id"]]["status"] == "error"
        assert "not found on the host" in status[vanished["id"]]["metadata"]["error"]
        assert status[broken["id"]]["status"] == "error"
        assert "could not be recovered" in status[broken["id"]]["metadata"]["error"]
        assert status[stopped["id"]]["status"] == "stopped"
        assert status[failed["id"]]["status"] == "stopped"
        # the restored capsules work
        assert (await h.client.post(f"/v1/capsules/{alive['id']}/exec", json={"cmd": "true"})).status_code == 200
        assert (await h.client.post(f"/v1/capsules/{paused['id']}/resume")).json()["status"] == "running"


async def test_restart_with_interrupted_boot(tmp_path):
    settings = make_settings(tmp_path, shutdown_grace_sec=0.05, create_wait_sec=0.05)
    fake1 = FakeHostAgent()
    fake1.delays["create"] = 5
    async with running_app(settings, fake1) as h:
        cid = (await h.client.post("/v1/capsules", json={})).json()["id"]
        await asyncio.sleep(0.05)
    # shutdown cancelled the boot after the grace period: the DB still says starting
    async with running_app(settings, fake1.survivors()) as h:
        got = (await h.client.get(f"/v1/capsules/{cid}")).json()
        assert got["status"] == "error" and "was starting" in got["metadata"]["error"]


@pytest.mark.parametrize("host_state", ["running", "paused"])
async def test_error_capsule_found_alive_is_restored(tmp_path, host_state):
    settings = make_settings(tmp_path)
    fake1 = FakeHostAgent()
    async with running_app(settings, fake1) as h:
        c = await h.running_capsule()
        with h.app.state.db.session() as s:
            s.execute(update(Capsule).where(Capsule.id == c["id"]).values(status="error", error="x"))
            s.commit()
    fake1.capsules[c["id"]].state = host_state
    async with running_app(settings, fake1.survivors()) as h:
        got = (await h.client.get(f"/v1/capsules/{c['id']}")).json()
        assert got["status"] == host_state and "error" not in got["metadata"]


async def test_vm_that_died_is_marked_error_without_any_call(tmp_path):
    async with running_app(make_settings(tmp_path, reaper_interval_sec=0.05)) as h:
        dead = await h.running_capsule(timeout_sec=0)
        alive = await h.running_capsule(timeout_sec=0)
        h.fake.capsules[dead["id"]].state = "error"  # what the host reports for a crashed VM
        got = await h.wait_status(dead["id"], "error", timeout=3)
        assert "stopped unexpectedly" in got["metadata"]["error"]
        assert (await h.client.get(f"/v1/capsules/{alive['id']}")).json()["status"] == "running"
        # a destroy still cleans it up
        assert (await h.client.delete(f"/v1/capsules/{dead['id']}")).status_code == 204
