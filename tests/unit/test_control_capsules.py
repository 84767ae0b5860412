"""Control plane: capsule routes (create, list, get, pause, resume, destroy, ping)."""

from __future__ import annotations

import asyncio
import re

import pytest

from wrenn_control import disk_figures
from wrenn_host.api import HostAgentError, VMMError

from .fake_host_agent import TS_RE, assert_error, make_settings, running_app

ID_RE = re.compile(r"^cl-[0-9a-z]{25}$")


@pytest.fixture
async def h(tmp_path):
    async with running_app(make_settings(tmp_path)) as harness:
        yield harness


@pytest.fixture
async def h_nowait(tmp_path):
    """A server that never waits for the boot: create answers `pending` and the boot goes on."""
    async with running_app(make_settings(tmp_path, create_wait_sec=0)) as harness:
        yield harness


async def test_create_answers_once_running(h):
    resp = await h.client.post("/v1/capsules", json={})
    assert resp.status_code == 201, resp.text
    c = resp.json()
    assert ID_RE.match(c["id"])
    assert c["status"] == "running"
    assert (c["template"], c["vcpus"], c["memory_mb"], c["timeout_sec"]) == ("minimal", 1, 512, 0)
    assert TS_RE.match(c["started_at"]) and c["last_active_at"] is None
    assert TS_RE.match(c["created_at"]) and TS_RE.match(c["last_updated"])
    assert c["metadata"]["kernel_version"] == "6.1.0-fake"
    assert h.fake.capsules[c["id"]].state == "running"
    # exec works at once, without any wait
    assert (await h.client.post(f"/v1/capsules/{c['id']}/exec", json={"cmd": "true"})).status_code == 200


async def test_create_slower_than_the_bound_answers_starting(tmp_path):
    async with running_app(make_settings(tmp_path, create_wait_sec=0.1)) as h:
        h.fake.delays["create"] = 0.4
        resp = await h.client.post("/v1/capsules", json={})
        assert resp.status_code == 201, resp.text
        c = resp.json()
        assert c["status"] == "starting" and c["started_at"] is None
        running = await h.wait_status(c["id"], "running")  # the boot went on
        assert TS_RE.match(running["started_at"])


async def test_create_agent_failure_is_502_and_recorded_as_error(h):
    h.fake.fail("create", VMMError("qemu exited with status 1: no kernel"))
    err = assert_error(await h.client.post("/v1/capsules", json={"metadata": {"owner": "ci"}}), 502, "agent_error")
    assert "no kernel" in err["message"]
    [row] = (await h.client.get("/v1/capsules")).json()
    assert row["status"] == "error" and "no kernel" in row["metadata"]["error"]
    assert row["metadata"]["owner"] == "ci"
    assert h.fake.ops("destroy") == [row["id"]]  # half-made leftovers are cleaned


async def test_create_with_defaults_then_running(h_nowait):
    h = h_nowait
    resp = await h.client.post("/v1/capsules", json={})
    assert resp.status_code == 201, resp.text
    c = resp.json()
    assert ID_RE.match(c["id"])
    assert c["status"] in ("pending", "starting")
    assert (c["template"], c["vcpus"], c["memory_mb"], c["timeout_sec"]) == ("minimal", 1, 512, 0)
    assert c["started_at"] is None and c["last_active_at"] is None
    assert TS_RE.match(c["created_at"]) and TS_RE.match(c["last_updated"])
    assert c["metadata"] == {}

    running = await h.wait_status(c["id"], "running")
    assert TS_RE.match(running["started_at"])
    assert running["last_active_at"] is None
    assert running["metadata"]["kernel_version"] == "6.1.0-fake"
    assert h.fake.capsules[c["id"]].template_id == "minimal"
    assert (h.fake.capsules[c["id"]].vcpus, h.fake.capsules[c["id"]].memory_mb) == (1, 512)


async def test_create_without_any_body_and_with_null(h):
    resp = await h.client.post("/v1/capsules")
    assert resp.status_code == 201, resp.text
    assert resp.json()["template"] == "minimal"
    resp = await h.client.post("/v1/capsules", content=b"null", headers={"content-type": "application/json"})
    assert resp.status_code == 201, resp.text


async def test_create_refuses_unknown_fields(h):
    err = assert_error(await h.client.post("/v1/capsules", json={"template": "minimal", "some_future_field": 1}),
                       400, "invalid_request")
    assert "some_future_field" in err["message"]
    assert h.fake.ops("create") == []


async def test_create_with_values_and_labels(h):
    resp = await h.client.post("/v1/capsules", json={
        "template": "base-python", "vcpus": 2, "memory_mb": 1024, "timeout_sec": 300,
        "metadata": {"owner": "ci"}})
    assert resp.status_code == 201, resp.text
    c = resp.json()
    assert (c["template"], c["vcpus"], c["memory_mb"], c["timeout_sec"]) == ("base-python", 2, 1024, 300)
    running = await h.wait_status(c["id"], "running")
    assert running["metadata"]["owner"] == "ci" and "agent_version" in running["metadata"]
    assert h.fake.capsules[c["id"]].vcpus == 2


@pytest.mark.parametrize("body, field", [
    ({"vcpus": True}, "vcpus"),
    ({"vcpus": "2"}, "vcpus"),
    ({"vcpus": 1.5}, "vcpus"),
    ({"vcpus": 0}, "vcpus"),
    ({"vcpus": 9}, "vcpus"),  # the fake host's max is 8
    ({"memory_mb": 64}, "memory_mb"),  # below min 128
    ({"memory_mb": 100000}, "memory_mb"),
    ({"memory_mb": "512"}, "memory_mb"),
    ({"timeout_sec": -1}, "timeout_sec"),
    ({"timeout_sec": False}, "timeout_sec"),
    ({"template": 5}, "template"),
    ({"template": "no-such-template"}, "template"),
    ({"metadata": {"a": 1}}, "metadata"),
    ({"metadata": {"kernel_version": "x"}}, "reserved"),
    ({"metadata": {"bad key": "x"}}, "metadata"),
])
async def test_create_validation_errors(h, body, field):
    resp = await h.client.post("/v1/capsules", json=body)
    err = assert_error(resp, 400, "invalid_request")
    assert field in err["message"]
    assert (await h.client.get("/v1/capsules")).json() == []  # nothing was created
    assert h.fake.ops("create") == []


async def test_create_bad_json_and_wrong_body_kinds(h):
    err = assert_error(await h.client.post("/v1/capsules", content=b"{nope",
                                           headers={"content-type": "application/json"}), 400, "invalid_request")
    assert "JSON" in err["message"]
    assert_error(await h.client.post("/v1/capsules", json=[1, 2]), 400, "invalid_request")
    # `curl -d` labels JSON as a form: it is read as JSON; a real form body gets a clear 400
    resp = await h.client.post("/v1/capsules", content=b'{"vcpus": 1}',
                               headers={"content-type": "application/x-www-form-urlencoded"})
    assert resp.status_code == 201, resp.text
    err = assert_error(await h.client.post("/v1/capsules", content=b"vcpus=1",
                                           headers={"content-type": "application/x-www-form-urlencoded"}),
                       400, "invalid_request")
    assert "JSON" in err["message"]
    # JSON without any Content-Type is accepted
    resp = await h.client.post("/v1/capsules", content=b'{"vcpus": 2}')
    assert resp.status_code == 201, resp.text
    assert resp.json()["vcpus"] == 2


async def test_list_newest_first_with_all_statuses(h):
    assert (await h.client.get("/v1/capsules")).json() == []
    ids = [(await h.client.post("/v1/capsules", json={})).json()["id"] for _ in range(4)]
    for cid in ids:
        await h.wait_status(cid, "running")
    assert (await h.client.delete(f"/v1/capsules/{ids[1]}")).status_code == 204
    assert (await h.client.post(f"/v1/capsules/{ids[2]}/pause")).status_code == 200
    listed = (await h.client.get("/v1/capsules")).json()
    # created within the same second: the order must still be newest first
    assert [c["id"] for c in listed] == ids[::-1]
    assert {c["id"]: c["status"] for c in listed} == {
        ids[0]: "running", ids[1]: "stopped", ids[2]: "paused", ids[3]: "running"}
    assert all("disk_used_mb" not in c for c in listed)


async def test_get_one_has_disk_fields_and_404s(h):
    c = await h.running_capsule()
    got = (await h.client.get(f"/v1/capsules/{c['id']}")).json()
    assert got["id"] == c["id"]
    assert got["disk_used_mb"] == 3 and got["disk_size_mb"] == 2048
    assert_error(await h.client.get("/v1/capsules/cl-doesnotexist000000000000"), 404, "not_found")


async def test_get_reuses_disk_figures_for_a_few_seconds(h, monkeypatch):
    c = await h.running_capsule()
    first = (await h.client.get(f"/v1/capsules/{c['id']}")).json()
    h.fake.capsules[c["id"]].files["/home/user/big"] = b"x" * (5 * 1024 * 1024)
    again = (await h.client.get(f"/v1/capsules/{c['id']}")).json()
    # A poll does not ask the guest each time: the figures of a moment ago are reused...
    assert again["disk_used_mb"] == first["disk_used_mb"] == 3
    assert h.fake.ops("metrics").count(c["id"]) == 1
    # ...but only for a while: then the guest is asked again and the new file shows.
    monkeypatch.setattr(disk_figures, "FRESH_SEC", 0.0)
    later = (await h.client.get(f"/v1/capsules/{c['id']}")).json()
    assert later["disk_used_mb"] == 8 and later["disk_size_mb"] == 2048
    assert h.fake.ops("metrics").count(c["id"]) == 2


async def test_disk_figures_given_at_create_spare_the_guest_a_call(h):
    h.fake.create_disk = (700 * 1024 * 1024, 4000 * 1024 * 1024)
    c = await h.running_capsule()
    got = (await h.client.get(f"/v1/capsules/{c['id']}")).json()
    assert (got["disk_used_mb"], got["disk_size_mb"]) == (700, 4000)
    assert c["id"] not in h.fake.ops("metrics")


async def test_a_request_looks_its_api_key_up_once(h):
    """The guard checks the key before reading a body; the route reuses what it found."""
    from sqlalchemy import event

    c = await h.running_capsule()
    lookups: list[str] = []

    def record(_conn, _cursor, statement, *_rest) -> None:  # type: ignore[no-untyped-def]
        if "api_keys" in statement:
            lookups.append(statement)
    engine = h.app.state.db.engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        for send in (lambda: h.client.post(f"/v1/capsules/{c['id']}/exec", json={"cmd": "true"}),  # a body
                     lambda: h.client.get(f"/v1/capsules/{c['id']}")):  # none
            lookups.clear()
            assert (await send()).status_code == 200
            assert len(lookups) == 1, lookups
        async with h.client_for("wrn_" + "0" * 32) as stranger:  # a bad key: still refused
            assert_error(await stranger.post(f"/v1/capsules/{c['id']}/exec", json={"cmd": "true"}), 401,
                         "unauthorized")
    finally:
        event.remove(engine, "before_cursor_execute", record)


async def test_other_team_cannot_see_or_touch(h):
    c = await h.running_capsule()
    async with h.new_team() as other:
        assert (await other.get("/v1/capsules")).json() == []
        unknown = assert_error(await other.get("/v1/capsules/cl-doesnotexist000000000000"), 404, "not_found")
        foreign = assert_error(await other.get(f"/v1/capsules/{c['id']}"), 404, "not_found")
        assert unknown == foreign  # indistinguishable
        for method, path in [("POST", "pause"), ("POST", "resume"), ("POST", "ping"), ("DELETE", "")]:
            url = f"/v1/capsules/{c['id']}/{path}".rstrip("/")
            assert_error(await other.request(method, url), 404, "not_found")
        assert_error(await other.post(f"/v1/capsules/{c['id']}/exec", json={"cmd": "true"}), 404, "not_found")
        mine = await h.running_capsule(client=other)
        assert [x["id"] for x in (await other.get("/v1/capsules")).json()] == [mine["id"]]
    assert [x["id"] for x in (await h.client.get("/v1/capsules")).json()] == [c["id"]]
    assert (await h.client.get(f"/v1/capsules/{c['id']}")).json()["status"] == "running"


async def test_pause_and_resume(h):
    c = await h.running_capsule()
    resp = await h.client.post(f"/v1/capsules/{c['id']}/pause")
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "paused"
    assert h.fake.capsules[c["id"]].state == "paused"
    assert assert_error(await h.client.post(f"/v1/capsules/{c['id']}/pause"), 409, "invalid_state")
    assert_error(await h.client.post(f"/v1/capsules/{c['id']}/ping"), 409, "invalid_state")

    resp = await h.client.post(f"/v1/capsules/{c['id']}/resume")
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "running"
    assert resp.json()["started_at"] >= c["started_at"]
    assert h.fake.capsules[c["id"]].state == "running"
    assert_error(await h.client.post(f"/v1/capsules/{c['id']}/resume"), 409, "invalid_state")


async def test_pause_while_booting_is_409(h_nowait):
    h = h_nowait
    h.fake.delays["create"] = 0.3
    cid = (await h.client.post("/v1/capsules", json={})).json()["id"]
    err = assert_error(await h.client.post(f"/v1/capsules/{cid}/pause"), 409, "invalid_state")
    assert "running" in err["message"]
    await h.wait_status(cid, "running")


async def test_destroy_keeps_row_as_stopped_and_is_idempotent(h):
    c = await h.running_capsule()
    resp = await h.client.delete(f"/v1/capsules/{c['id']}")
    assert resp.status_code == 204 and resp.content == b""
    assert c["id"] not in h.fake.capsules
    got = (await h.client.get(f"/v1/capsules/{c['id']}")).json()
    assert got["status"] == "stopped"
    assert (await h.client.delete(f"/v1/capsules/{c['id']}")).status_code == 204
    assert_error(await h.client.post(f"/v1/capsules/{c['id']}/pause"), 409, "invalid_state")
    assert_error(await h.client.post(f"/v1/capsules/{c['id']}/resume"), 409, "invalid_state")


async def test_destroy_paused_capsule(h):
    c = await h.running_capsule()
    await h.client.post(f"/v1/capsules/{c['id']}/pause")
    assert (await h.client.delete(f"/v1/capsules/{c['id']}")).status_code == 204
    assert c["id"] not in h.fake.capsules
    assert (await h.client.get(f"/v1/capsules/{c['id']}")).json()["status"] == "stopped"


async def test_destroy_while_booting_does_not_leak_the_vm(h_nowait):
    h = h_nowait
    h.fake.delays["create"] = 0.3
    cid = (await h.client.post("/v1/capsules", json={})).json()["id"]
    await asyncio.sleep(0.05)  # the boot is inside host.create now
    assert h.fake.ops("create") == [cid]
    assert (await h.client.delete(f"/v1/capsules/{cid}")).status_code == 204
    await asyncio.sleep(0.5)  # past the moment the create would have finished
    assert cid not in h.fake.capsules
    assert h.fake.ops("destroy") == [cid]
    assert (await h.client.get(f"/v1/capsules/{cid}")).json()["status"] == "stopped"


async def test_destroy_before_the_boot_task_ran(h_nowait):
    h = h_nowait
    # No await between create and destroy on the server side besides the requests themselves.
    cids = [(await h.client.post("/v1/capsules", json={})).json()["id"] for _ in range(3)]
    await asyncio.gather(*(h.client.delete(f"/v1/capsules/{cid}") for cid in cids))
    await asyncio.sleep(0.1)
    for cid in cids:
        assert cid not in h.fake.capsules
        assert (await h.client.get(f"/v1/capsules/{cid}")).json()["status"] == "stopped"


async def test_boot_failure_records_error_and_can_be_destroyed(h_nowait):
    h = h_nowait
    h.fake.fail("create", VMMError("qemu exited with status 1: no kernel"))
    cid = (await h.client.post("/v1/capsules", json={})).json()["id"]
    c = await h.wait_status(cid, "error")
    assert "no kernel" in c["metadata"]["error"]
    assert c["started_at"] is None
    assert h.fake.ops("destroy") == [cid]  # half-made leftovers are cleaned
    assert_error(await h.client.post(f"/v1/capsules/{cid}/exec", json={"cmd": "true"}), 409, "invalid_state")
    assert (await h.client.delete(f"/v1/capsules/{cid}")).status_code == 204
    assert (await h.client.get(f"/v1/capsules/{cid}")).json()["status"] == "stopped"


async def test_pause_agent_failure_with_vm_alive_stays_running(h):
    c = await h.running_capsule()
    h.fake.fail("pause", VMMError("migrate failed: disk full"))
    err = assert_error(await h.client.post(f"/v1/capsules/{c['id']}/pause"), 502, "agent_error")
    assert "disk full" in err["message"]
    assert (await h.client.get(f"/v1/capsules/{c['id']}")).json()["status"] == "running"


async def test_pause_agent_failure_with_vm_lost_is_error(h):
    c = await h.running_capsule()
    await h.app.state.reaper.stop()  # (its dead-VM check could mark it first: then the pause is a 409)
    h.fake.fail("pause", VMMError("qemu died"))
    h.fake.crash(c["id"])
    assert_error(await h.client.post(f"/v1/capsules/{c['id']}/pause"), 502, "agent_error")
    got = (await h.client.get(f"/v1/capsules/{c['id']}")).json()
    assert got["status"] == "error" and "qemu died" in got["metadata"]["error"]


async def test_resume_agent_failure_keeps_it_paused(h):
    c = await h.running_capsule()
    await h.client.post(f"/v1/capsules/{c['id']}/pause")
    h.fake.fail("resume", VMMError("restore failed"))
    assert_error(await h.client.post(f"/v1/capsules/{c['id']}/resume"), 502, "agent_error")
    assert (await h.client.get(f"/v1/capsules/{c['id']}")).json()["status"] == "paused"
    assert (await h.client.post(f"/v1/capsules/{c['id']}/resume")).json()["status"] == "running"


async def test_destroy_agent_failure_then_retry(h):
    c = await h.running_capsule()
    h.fake.fail("destroy", HostAgentError("could not remove netns"))
    err = assert_error(await h.client.delete(f"/v1/capsules/{c['id']}"), 502, "agent_error")
    assert "netns" in err["message"]
    got = (await h.client.get(f"/v1/capsules/{c['id']}")).json()
    assert got["status"] == "error" and "destroy failed" in got["metadata"]["error"]
    assert (await h.client.delete(f"/v1/capsules/{c['id']}")).status_code == 204
    assert (await h.client.get(f"/v1/capsules/{c['id']}")).json()["status"] == "stopped"


async def test_ping_sets_last_active_at(h):
    c = await h.running_capsule()
    assert c["last_active_at"] is None
    resp = await h.client.post(f"/v1/capsules/{c['id']}/ping")
    assert resp.status_code == 204 and resp.content == b""
    got = (await h.client.get(f"/v1/capsules/{c['id']}")).json()
    assert TS_RE.match(got["last_active_at"])
    assert got["last_updated"] == c["last_updated"]  # activity is not a status change


async def test_twenty_concurrent_creates_all_reach_running(h):
    h.fake.delays["create"] = 0.05
    resps = await asyncio.gather(*(h.client.post("/v1/capsules", json={"timeout_sec": 600}) for _ in range(20)))
    assert [r.status_code for r in resps] == [201] * 20
    ids = [r.json()["id"] for r in resps]
    assert len(set(ids)) == 20
    await asyncio.gather(*(h.wait_status(cid, "running") for cid in ids))
    listed = (await h.client.get("/v1/capsules")).json()
    assert len(listed) == 20 and {c["status"] for c in listed} == {"running"}
    assert sorted(h.fake.capsules) == sorted(ids)


async def test_concurrent_pauses_only_one_wins(h):
    c = await h.running_capsule()
    h.fake.delays["pause"] = 0.05
    resps = await asyncio.gather(*(h.client.post(f"/v1/capsules/{c['id']}/pause") for _ in range(8)))
    codes = sorted(r.status_code for r in resps)
    assert codes == [200] + [409] * 7
    assert h.fake.ops("pause") == [c["id"]]


async def test_destroy_during_pause_leaves_nothing_behind(h):
    c = await h.running_capsule()
    h.fake.delays["pause"] = 0.1
    pause, destroy = await asyncio.gather(h.client.post(f"/v1/capsules/{c['id']}/pause"),
                                          h.client.delete(f"/v1/capsules/{c['id']}"))
    assert destroy.status_code == 204
    assert pause.status_code in (200, 409)
    assert c["id"] not in h.fake.capsules
    assert (await h.client.get(f"/v1/capsules/{c['id']}")).json()["status"] == "stopped"


async def test_lifecycle_events_are_published(h):
    sub = h.app.state.events.subscribe()
    c = await h.running_capsule()
    await h.client.post(f"/v1/capsules/{c['id']}/pause")
    await h.client.delete(f"/v1/capsules/{c['id']}")
    seen = []
    while not sub.queue.empty():
        seen.append(sub.queue.get_nowait())
    sub.close()
    # Named as the published SDK's SSEEvent accepts: every status change, then each finished action.
    names = [(e.type, (e.data.get("metadata") or {}).get("from"), (e.data.get("metadata") or {}).get("to"))
             for e in seen]
    assert names == [
        ("capsule.state.changed", None, "pending"), ("capsule.state.changed", "pending", "starting"),
        ("capsule.state.changed", "starting", "running"), ("capsule.create", None, None),
        ("capsule.state.changed", "running", "pausing"), ("capsule.state.changed", "pausing", "paused"),
        ("capsule.pause", None, None),
        ("capsule.state.changed", "paused", "stopping"), ("capsule.state.changed", "stopping", "stopped"),
        ("capsule.destroy", None, None)]
    for e in seen:
        assert e.data["resource"] == {"id": c["id"], "type": "capsule"}
        assert e.data["sandbox"]["id"] == c["id"]
        assert e.data["actor"]["type"] == "api_key" and e.data["actor"]["id"].startswith("key")
        assert ("outcome" in e.data) == (e.type != "capsule.state.changed")
    assert seen[3].data["outcome"] == "success" and seen[3].data["sandbox"]["status"] == "running"
    assert seen[-1].data["sandbox"]["status"] == "stopped"
