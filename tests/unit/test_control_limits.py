"""Control plane: limits on what a caller controls (issue 11), with the fake host agent.

Body cap and auth before the body, unknown fields, short echoes, exec output flags, signup off,
team quotas, host room, list filters and cursor, retention purge, path normalisation, NUL and
env names, pause draining guest calls, OpenAPI and Allow."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from wrenn_control.clock import utcnow
from wrenn_control.db.models import Capsule, Team
from wrenn_host.api import ExecResult, HostAgentError

from .fake_host_agent import assert_error, make_settings, running_app

MIB = 1024 * 1024


@pytest.fixture
async def h(tmp_path):
    async with running_app(make_settings(tmp_path)) as harness:
        yield harness


async def _chunks(total: int, size: int = 64 * 1024):
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        sent += n
        yield b" " * n


# ---- bodies -----------------------------------------------------------------------------


async def test_body_over_the_cap_is_413_from_its_content_length(h):
    body = b'{"template": "minimal", "x": "' + b"a" * (2 * MIB) + b'"}'
    err = assert_error(await h.client.post("/v1/capsules", content=body,
                                           headers={"content-type": "application/json"}), 413, "too_large")
    assert str(MIB) in err["message"]
    assert h.fake.ops("create") == []


async def test_chunked_body_over_the_cap_is_413_without_reading_it_all(h):
    read = 0

    async def body():
        nonlocal read
        async for chunk in _chunks(50 * MIB):
            read += len(chunk)
            yield chunk

    resp = await h.client.post("/v1/capsules", content=body(), headers={"content-type": "application/json"})
    assert_error(resp, 413, "too_large")
    assert "transfer-encoding" not in resp.request.headers or resp.request.headers["transfer-encoding"] == "chunked"
    assert read < 4 * MIB  # refused soon after the cap, not after 50 MiB


async def test_cap_is_a_setting(tmp_path):
    async with running_app(make_settings(tmp_path, max_body_bytes=100)) as h:
        assert_error(await h.client.post("/v1/capsules", json={"metadata": {"k": "v" * 60, "l": "w" * 60}}),
                     413, "too_large")
        assert (await h.client.post("/v1/capsules", json={})).status_code == 201


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrn_" + "0" * 32}, {"Authorization": "Bearer nonsense"}])
async def test_unauthenticated_body_is_refused_before_it_is_read(h, headers):
    read = 0

    async def body():
        nonlocal read
        async for chunk in _chunks(400 * MIB):
            read += len(chunk)
            yield chunk

    async with h.client_for(None) as anon:
        resp = await anon.post("/v1/capsules/cl-x/files/stream/write?path=/tmp/x", content=body(), headers=headers)
    assert_error(resp, 401, "unauthorized")
    assert read <= 64 * 1024  # not a byte past what the transport had in hand
    assert h.fake.written == {}


async def test_signup_login_and_health_still_take_bodies_without_a_key(h):
    async with h.client_for(None) as anon:
        resp = await anon.post("/v1/auth/signup", json={"email": "a@example.com", "password": "password1"})
        assert resp.status_code == 201, resp.text
        assert (await anon.post("/v1/auth/login", json={"email": "a@example.com", "password": "password1"})
                ).status_code == 200
        token = resp.json()["token"]
        # a valid JWT passes the guard with a body
        resp = await anon.post("/v1/api-keys", json={"name": "k"}, headers={"Authorization": f"Bearer {token}"})
        assert resp.status_code == 201, resp.text


async def test_unknown_field_is_400_naming_it(h):
    cap = await h.running_capsule()
    for path, body in (("/v1/capsules", {"tempalte": "minimal"}),
                       (f"/v1/capsules/{cap['id']}/exec", {"cmd": "true", "bakground": True}),
                       (f"/v1/capsules/{cap['id']}/files/list", {"path": "/", "dept": 2})):
        err = assert_error(await h.client.post(path, json=body), 400, "invalid_request")
        assert next(k for k in body if k not in ("cmd", "path")) in err["message"]


async def test_error_messages_quote_a_short_prefix_only(h):
    huge = "a" * 500_000
    async with running_app(make_settings(h.settings.data_dir / "big", max_body_bytes=4 * MIB)) as big:
        for body in ({"template": huge}, {"template": "no-such-" + "b" * 60}, {huge: 1}, {"metadata": {huge: "x"}}):
            resp = await big.client.post("/v1/capsules", json=body)
            assert resp.status_code == 400, resp.text[:200]
            assert len(resp.content) < 2000


# ---- exec -------------------------------------------------------------------------------


async def test_exec_passes_the_output_cap_and_reports_truncation(tmp_path):
    async with running_app(make_settings(tmp_path, exec_max_output_bytes=1000)) as h:
        cap = await h.running_capsule()
        h.fake.exec_handler = lambda *a: ExecResult(b"x" * 1000, b"e", 0, 5, stdout_truncated=True)
        body = (await h.client.post(f"/v1/capsules/{cap['id']}/exec", json={"cmd": "yes"})).json()
        assert h.fake.exec_caps == [1000]
        assert (body["truncated"], body["stdout_truncated"], body["stderr_truncated"]) == (True, True, False)
        assert len(body["stdout"]) == 1000 and body["stderr"] == "e"


@pytest.mark.parametrize("body, word", [
    ({"cmd": "echo\x00x"}, "cmd"),
    ({"cmd": "echo", "args": ["a\x00b"]}, "args"),
    ({"cmd": "env", "envs": {"A": "1\x002"}}, "envs"),
    ({"cmd": "env", "envs": {"A=B": "1"}}, "envs"),
    ({"cmd": "env", "envs": {"": "1"}}, "envs"),
    ({"cmd": "pwd", "cwd": "/tmp\x00"}, "cwd"),
    ({"cmd": "true", "background": True, "tag": "t\x00"}, "tag"),
])
async def test_nul_and_bad_env_names_are_400(h, body, word):
    cap = await h.running_capsule()
    err = assert_error(await h.client.post(f"/v1/capsules/{cap['id']}/exec", json=body), 400, "invalid_request")
    assert word in err["message"]
    assert h.fake.ops("exec") == [] and h.fake.ops("spawn") == []


async def test_nul_in_a_path_is_400(h):
    cap = await h.running_capsule()
    for op in ("read", "list", "mkdir", "remove"):
        assert_error(await h.client.post(f"/v1/capsules/{cap['id']}/files/{op}", json={"path": "/tmp/\x00x"}),
                     400, "invalid_request")


@pytest.mark.parametrize("path", ["/", "//", "///", "/./", "/tmp/..", "//tmp/../", "/root/../../.."])
async def test_remove_of_the_root_in_any_spelling_is_refused(h, path):
    cap = await h.running_capsule()
    err = assert_error(await h.client.post(f"/v1/capsules/{cap['id']}/files/remove", json={"path": path}),
                       400, "invalid_request")
    assert "refusing" in err["message"]
    assert h.fake.paths_seen == []


async def test_paths_reach_the_guest_normalised(h):
    cap = await h.running_capsule()
    await h.client.post(f"/v1/capsules/{cap['id']}/files/mkdir", json={"path": "/tmp/d"})
    resp = await h.client.post(f"/v1/capsules/{cap['id']}/files/remove", json={"path": "//tmp/./d//"})
    assert resp.status_code == 204, resp.text
    assert h.fake.paths_seen == [("remove", "/tmp/d")]


# ---- signup, quotas, host room ------------------------------------------------------------


async def test_signup_can_be_turned_off(tmp_path):
    async with running_app(make_settings(tmp_path, allow_signup=False)) as h:
        async with h.client_for(None) as anon:
            err = assert_error(await anon.post("/v1/auth/signup", json={"email": "a@example.com",
                                                                         "password": "password1"}), 403, "forbidden")
            assert "signup" in err["message"]
            assert_error(await anon.post("/v1/auth/signup", json={}), 403, "forbidden")


async def test_team_quotas(tmp_path):
    settings = make_settings(tmp_path, team_max_capsules=2, team_max_vcpus=3, team_max_memory_mb=1536)
    async with running_app(settings) as h:
        a = await h.running_capsule(vcpus=2)
        err = assert_error(await h.client.post("/v1/capsules", json={"vcpus": 2}), 403, "forbidden")
        assert "vCPUs" in err["message"] and "WRENN_TEAM_MAX_VCPUS" in err["message"]
        err = assert_error(await h.client.post("/v1/capsules", json={"memory_mb": 1100}), 403, "forbidden")
        assert "memory" in err["message"]
        await h.running_capsule()
        err = assert_error(await h.client.post("/v1/capsules", json={}), 403, "forbidden")
        assert "capsules" in err["message"]
        async with h.new_team() as other:  # per team
            assert (await other.post("/v1/capsules", json={})).status_code == 201
        # paused capsules do not count; resuming one counts again
        assert (await h.client.post(f"/v1/capsules/{a['id']}/pause")).status_code == 200
        b = await h.running_capsule(vcpus=2)
        assert_error(await h.client.post(f"/v1/capsules/{a['id']}/resume"), 403, "forbidden")
        assert (await h.client.delete(f"/v1/capsules/{b['id']}")).status_code == 204
        assert (await h.client.post(f"/v1/capsules/{a['id']}/resume")).status_code == 200
        # a team's own quota overrides the default
        with h.app.state.db.session() as s:
            team_id = s.scalar(select(Capsule.team_id).where(Capsule.id == a["id"]))
            s.execute(update(Team).where(Team.id == team_id).values(max_capsules=5, max_vcpus=10))
            s.commit()
        await h.running_capsule()
        assert len(h.fake.ops("create")) == 5


async def test_a_create_that_would_overfill_the_host_is_503(h):
    h.fake.free = {"free_memory_mb": 700, "free_disk_mb": 100_000}
    err = assert_error(await h.client.post("/v1/capsules", json={"memory_mb": 512}), 503, "host_unavailable")
    assert "memory" in err["message"]
    h.fake.free = {"free_memory_mb": 16000, "free_disk_mb": 1200}
    err = assert_error(await h.client.post("/v1/capsules", json={}), 503, "host_unavailable")
    assert "disk" in err["message"]
    h.fake.free = {"free_memory_mb": None, "free_disk_mb": None}  # unknown: no refusal
    assert (await h.client.post("/v1/capsules", json={})).status_code == 201
    h.fake.fail("capacity", HostAgentError("agent gone"))
    assert_error(await h.client.post("/v1/capsules", json={}), 503, "host_unavailable")
    assert len((await h.client.get("/v1/capsules")).json()) == 1


# ---- list filters, cursor, retention -----------------------------------------------------


async def test_list_filters_and_pages(h):
    ids = []
    for i in range(5):
        c = await h.running_capsule(metadata={"n": str(i), "kind": "even" if i % 2 == 0 else "odd"})
        ids.append(c["id"])
    await h.client.post(f"/v1/capsules/{ids[0]}/pause")
    plain = await h.client.get("/v1/capsules")
    assert [c["id"] for c in plain.json()] == ids[::-1] and "x-next-token" not in plain.headers

    paused = (await h.client.get("/v1/capsules", params={"status": "paused"})).json()
    assert [c["id"] for c in paused] == [ids[0]]
    both = (await h.client.get("/v1/capsules", params=[("status", "paused"), ("status", "running")])).json()
    assert len(both) == 5
    even = (await h.client.get("/v1/capsules", params={"metadata": "kind=even"})).json()
    assert [c["id"] for c in even] == [ids[4], ids[2], ids[0]]
    one = (await h.client.get("/v1/capsules", params=[("metadata", "kind=even"), ("metadata", "n=2")])).json()
    assert [c["id"] for c in one] == [ids[2]]

    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"next": cursor} if cursor else {})}
        resp = await h.client.get("/v1/capsules", params=params)
        assert resp.status_code == 200 and isinstance(resp.json(), list)
        seen += [c["id"] for c in resp.json()]
        cursor = resp.headers.get("x-next-token")
        if cursor is None:
            break
    assert seen == ids[::-1]
    for bad in ({"status": "sleeping"}, {"metadata": "novalue"}, {"limit": 0}, {"next": "abc"}):
        assert_error(await h.client.get("/v1/capsules", params=bad), 400, "invalid_request")


async def test_old_stopped_capsules_are_purged(h):
    old, recent, running = (await h.running_capsule()), (await h.running_capsule()), (await h.running_capsule())
    for c in (old, recent):
        assert (await h.client.delete(f"/v1/capsules/{c['id']}")).status_code == 204
    with h.app.state.db.session() as s:
        s.execute(update(Capsule).where(Capsule.id == old["id"])
                  .values(last_updated=utcnow() - timedelta(days=31)))
        s.commit()
    assert h.app.state.retention.run_once() == 1
    listed = [c["id"] for c in (await h.client.get("/v1/capsules")).json()]
    assert listed == [running["id"], recent["id"]]
    assert_error(await h.client.get(f"/v1/capsules/{old['id']}"), 404, "not_found")


# ---- pause while a guest call is in flight --------------------------------------------------


async def test_pause_waits_for_an_exec_in_flight(h):
    cap = await h.running_capsule()
    h.fake.delays["exec"] = 0.5
    exec_task = asyncio.create_task(h.client.post(f"/v1/capsules/{cap['id']}/exec", json={"cmd": "sleep"}))
    await asyncio.sleep(0.1)
    pause = await h.client.post(f"/v1/capsules/{cap['id']}/pause")
    assert pause.status_code == 200, pause.text
    resp = await exec_task
    assert resp.status_code == 200, resp.text
    assert h.fake.calls.index(("exec", cap["id"])) < h.fake.calls.index(("pause", cap["id"]))


async def test_a_call_cut_by_a_pause_is_409_not_502(tmp_path):
    async with running_app(make_settings(tmp_path, pause_drain_sec=0.1)) as h:
        cap = await h.running_capsule()
        h.fake.delays["exec"] = 1.0
        h.fake.fail("exec", HostAgentError("guest agent connection lost"))
        exec_task = asyncio.create_task(h.client.post(f"/v1/capsules/{cap['id']}/exec", json={"cmd": "sleep"}))
        await asyncio.sleep(0.1)
        assert (await h.client.post(f"/v1/capsules/{cap['id']}/pause")).status_code == 200
        assert_error(await exec_task, 409, "invalid_state")
        assert (await h.client.get(f"/v1/capsules/{cap['id']}")).json()["status"] == "paused"


# ---- OpenAPI, OPTIONS, Allow ----------------------------------------------------------------


async def test_openapi_documents_400_not_422(h):
    spec = (await h.client.get("/openapi.json")).json()
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert "422" not in op["responses"], (method, path)
            if op.get("requestBody") or op.get("parameters"):
                assert op["responses"]["400"]["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ErrorBody"}, (method, path)
            if op.get("security"):
                assert "401" in op["responses"], (method, path)
    create = spec["components"]["schemas"]["CapsuleCreate"]["properties"]
    assert {"type": "integer", "minimum": 1, "maximum": 8} in create["vcpus"]["anyOf"]
    assert create["metadata"]["anyOf"][0]["propertyNames"]["pattern"].startswith("^[a-zA-Z0-9]")


async def test_options_and_405_carry_the_right_allow(h):
    resp = await h.client.options("/v1/capsules")
    assert resp.status_code == 204 and resp.headers["allow"] == "GET, HEAD, OPTIONS, POST"
    resp = await h.client.options("/v1/capsules/cl-x")
    assert resp.headers["allow"] == "DELETE, GET, HEAD, OPTIONS"
    resp = await h.client.put("/v1/capsules")
    assert_error(resp, 405, "method_not_allowed")
    assert resp.headers["allow"] == "GET, HEAD, OPTIONS, POST"
    resp = await h.client.patch("/v1/capsules/stats")
    assert resp.status_code == 405 and resp.headers["allow"] == "GET, HEAD, OPTIONS"


async def test_a_path_component_over_255_bytes_is_400(h):
    cap = await h.running_capsule()
    for op in ("read", "list", "mkdir", "remove"):
        err = assert_error(await h.client.post(f"/v1/capsules/{cap['id']}/files/{op}",
                                               json={"path": "/tmp/" + "a" * 256}), 400, "invalid_request")
        assert "255" in err["message"]
    assert h.fake.paths_seen == []
