"""Control plane: snapshot templates."""

from __future__ import annotations

import re

import pytest

from wrenn_host.api import VMMError

from .fake_host_agent import TS_RE, assert_error, make_settings, running_app


@pytest.fixture
async def h(tmp_path):
    async with running_app(make_settings(tmp_path)) as harness:
        yield harness


@pytest.fixture
async def cap(h):
    return await h.running_capsule(vcpus=2, memory_mb=1024)


async def snap(h, capsule_id, name=None, overwrite=None, client=None):
    body = {"sandbox_id": capsule_id}
    if name is not None:
        body["name"] = name
    params = {"overwrite": overwrite} if overwrite is not None else {}
    return await (client or h.client).post("/v1/snapshots", json=body, params=params)


async def test_create_snapshot_from_running_leaves_it_paused(h, cap):
    resp = await snap(h, cap["id"], "my-snap")
    assert resp.status_code == 201, resp.text
    t = resp.json()
    assert t["name"] == "my-snap" and t["type"] == "snapshot"
    assert (t["vcpus"], t["memory_mb"]) == (2, 1024)
    assert t["size_bytes"] > 0 and TS_RE.match(t["created_at"])
    assert (await h.client.get(f"/v1/capsules/{cap['id']}")).json()["status"] == "paused"
    # the host knows it by an opaque id, not by the user's name
    (host_id,) = h.fake.templates
    assert re.fullmatch(r"tpl-[0-9a-f]{24}", host_id)


async def test_snapshot_of_paused_capsule_and_default_name(h, cap):
    await h.client.post(f"/v1/capsules/{cap['id']}/pause")
    resp = await snap(h, cap["id"])
    assert resp.status_code == 201, resp.text
    assert re.fullmatch(r"template-[0-9a-f]{8}", resp.json()["name"])
    assert (await h.client.get(f"/v1/capsules/{cap['id']}")).json()["status"] == "paused"


async def test_list_filters_and_order(h, cap):
    await snap(h, cap["id"], "one")
    await snap(h, cap["id"], "two")
    everything = (await h.client.get("/v1/snapshots")).json()
    assert [(t["name"], t["type"]) for t in everything[:3]] == [
        ("minimal", "base"), ("base-python", "base"), ("code-runner-beta", "base")]
    assert everything[0]["created_at"] is None
    assert {t["name"] for t in everything[3:]} == {"one", "two"}
    assert [t["name"] for t in (await h.client.get("/v1/snapshots?type=base")).json()] == [
        "minimal", "base-python", "code-runner-beta"]
    assert {t["name"] for t in (await h.client.get("/v1/snapshots?type=snapshot")).json()} == {"one", "two"}
    assert_error(await h.client.get("/v1/snapshots?type=other"), 400, "invalid_request")


async def test_name_taken_and_overwrite(h, cap):
    first = (await snap(h, cap["id"], "dup")).json()
    old_ids = set(h.fake.templates)
    err = assert_error(await snap(h, cap["id"], "dup"), 409, "template_name_taken")
    assert "overwrite" in err["message"]
    assert_error(await snap(h, cap["id"], "dup", overwrite="false"), 409, "template_name_taken")
    resp = await snap(h, cap["id"], "dup", overwrite="true")
    assert resp.status_code == 201, resp.text
    assert resp.json()["name"] == "dup"
    assert len(h.fake.templates) == 1 and set(h.fake.templates) != old_ids  # the old one was deleted
    assert [t["name"] for t in (await h.client.get("/v1/snapshots?type=snapshot")).json()] == ["dup"]
    assert first["name"] == "dup"
    assert_error(await snap(h, cap["id"], "dup", overwrite="maybe"), 400, "invalid_request")


@pytest.mark.parametrize("name", ["minimal", "base-python"])
async def test_builtin_names_are_reserved(h, cap, name):
    assert_error(await snap(h, cap["id"], name), 409, "name_reserved")
    assert h.fake.ops("snapshot") == []


@pytest.mark.parametrize("name", ["", "Upper", "-lead", ".lead", "a" * 64, "has space", "a/b", "ünï", 5])
async def test_invalid_names(h, cap, name):
    resp = await h.client.post("/v1/snapshots", json={"sandbox_id": cap["id"], "name": name})
    assert_error(resp, 400, "invalid_request")
    assert h.fake.ops("snapshot") == []


async def test_valid_name_edges(h, cap):
    for name in ["a", "a" * 63, "v1.2_x-y"]:
        assert (await snap(h, cap["id"], name)).status_code == 201


async def test_capsule_must_exist_in_team_and_be_running_or_paused(h, cap):
    assert_error(await snap(h, "cl-doesnotexist000000000000", "x"), 404, "not_found")
    assert_error(await h.client.post("/v1/snapshots", json={"name": "x"}), 400, "invalid_request")
    async with h.new_team() as other:
        assert_error(await snap(h, cap["id"], "x", client=other), 404, "not_found")
    h.fake.delays["create"] = 0.3
    h.app.state.ops.create_wait_sec = 0  # answer while it boots
    booting = (await h.client.post("/v1/capsules", json={})).json()
    err = assert_error(await snap(h, booting["id"], "x"), 409, "invalid_state")
    assert "running or paused" in err["message"]
    await h.client.delete(f"/v1/capsules/{cap['id']}")
    assert_error(await snap(h, cap["id"], "x"), 409, "invalid_state")
    assert h.fake.ops("snapshot") == []


async def test_capsule_from_snapshot_keeps_shape_and_state(h, cap):
    await h.client.post(f"/v1/capsules/{cap['id']}/files/write", files={"file": ("f", b"state")},
                        data={"path": "/root/kept.txt"})
    await snap(h, cap["id"], "golden")
    (host_id,) = h.fake.templates

    resp = await h.client.post("/v1/capsules", json={"template": "golden"})
    assert resp.status_code == 201, resp.text
    c = resp.json()
    assert (c["template"], c["vcpus"], c["memory_mb"]) == ("golden", 2, 1024)
    await h.wait_status(c["id"], "running")
    assert h.fake.capsules[c["id"]].template_id == host_id
    read = await h.client.post(f"/v1/capsules/{c['id']}/files/read", json={"path": "/root/kept.txt"})
    assert read.content == b"state"

    # naming the same shape explicitly is fine; another shape is refused
    assert (await h.client.post("/v1/capsules", json={"template": "golden", "vcpus": 2, "memory_mb": 1024})).status_code == 201
    err = assert_error(await h.client.post("/v1/capsules", json={"template": "golden", "vcpus": 1}), 400, "invalid_request")
    assert "vcpus" in err["message"]
    assert_error(await h.client.post("/v1/capsules", json={"template": "golden", "memory_mb": 512}), 400, "invalid_request")


async def test_snapshots_are_per_team(h, cap):
    await snap(h, cap["id"], "shared-name")
    async with h.new_team() as other:
        assert [t["name"] for t in (await other.get("/v1/snapshots?type=snapshot")).json()] == []
        assert_error(await other.post("/v1/capsules", json={"template": "shared-name"}), 400, "invalid_request")
        assert_error(await other.delete("/v1/snapshots/shared-name"), 404, "not_found")
        theirs = await h.running_capsule(client=other)
        assert (await snap(h, theirs["id"], "shared-name", client=other)).status_code == 201
    assert len(h.fake.templates) == 2


async def test_delete_snapshot(h, cap):
    await snap(h, cap["id"], "gone")
    resp = await h.client.delete("/v1/snapshots/gone")
    assert resp.status_code == 204 and resp.content == b""
    assert h.fake.templates == {}
    assert [t["name"] for t in (await h.client.get("/v1/snapshots?type=snapshot")).json()] == []
    assert_error(await h.client.delete("/v1/snapshots/gone"), 404, "not_found")
    assert_error(await h.client.delete("/v1/snapshots/minimal"), 403, "forbidden")
    # the name is free again
    await h.client.post(f"/v1/capsules/{cap['id']}/resume")
    assert (await snap(h, cap["id"], "gone")).status_code == 201


async def test_delete_snapshot_agent_failure_keeps_record(h, cap):
    await snap(h, cap["id"], "sticky")
    h.fake.fail("delete_template", VMMError("busy"))
    assert_error(await h.client.delete("/v1/snapshots/sticky"), 502, "agent_error")
    assert [t["name"] for t in (await h.client.get("/v1/snapshots?type=snapshot")).json()] == ["sticky"]


async def test_snapshot_agent_failure(h, cap):
    h.fake.fail("snapshot", VMMError("disk full"))
    err = assert_error(await snap(h, cap["id"], "broken"), 502, "agent_error")
    assert "disk full" in err["message"]
    assert (await h.client.get(f"/v1/capsules/{cap['id']}")).json()["status"] == "running"  # VM still fine
    assert (await h.client.get("/v1/snapshots?type=snapshot")).json() == []
