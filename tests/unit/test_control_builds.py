"""Control plane: the builds API on the fake host agent (the real VMs: tests/e2e/test_builds.py)."""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
import time

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from wrenn_control.builds.manager import Builds, DBLayerCache
from wrenn_control.clock import utcnow
from wrenn_control.db.models import Build, BuildLayer, Team
from wrenn_host.api import HostAgentError, StreamEvent

from .fake_host_agent import TS_RE, assert_error, make_settings, running_app


@pytest.fixture
async def h(tmp_path):
    async with running_app(make_settings(tmp_path)) as harness:
        yield harness


async def wait_build(h, build_id, *statuses, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        body = (await h.client.get(f"/v1/builds/{build_id}")).json()
        if body["status"] in statuses:
            return body
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.02)


def context_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if name.endswith(".sh") else 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


RECIPE = ["RUN echo one", "ENV GREETING=hi", "WORKDIR /tmp", "USER root", "START python3 -m http.server 8000",
          "RUN echo last"]


async def test_recipe_build_makes_a_team_template(h):
    resp = await h.client.post("/v1/builds", json={"name": "web", "recipe": RECIPE,
                                                    "healthcheck": "--interval=0.1s true"})
    assert resp.status_code == 202, resp.text
    b = resp.json()
    assert b["status"] == "pending" and b["total_steps"] == 6 and b["base_template"] == "minimal"
    assert TS_RE.match(b["created_at"]) and b["steps"] == RECIPE
    done = await wait_build(h, b["id"], "success", "failed")
    assert done["status"] == "success", done
    assert done["current_step"] == 6 and TS_RE.match(done["completed_at"]) and done["error"] is None
    assert any("step 6/6: RUN echo last" in line for line in done["logs"])
    names = {t["name"]: t for t in (await h.client.get("/v1/snapshots")).json()}
    assert names["web"]["type"] == "snapshot"
    # its capsules start from it; the build capsule is gone
    cap = await h.running_capsule(template="web")
    assert cap["template"] == "web"
    assert [c for c in h.fake.capsules if c.startswith("bld-")] == []
    defaults = h.fake.capsules[cap["id"]].defaults
    assert defaults["envs"] == {"GREETING": "hi"} and defaults["cwd"] == "/tmp"
    # listed, newest first
    listed = (await h.client.get("/v1/builds")).json()
    assert [x["id"] for x in listed] == [b["id"]]
    # the name is now taken; builtin names are reserved
    assert_error(await h.client.post("/v1/builds", json={"name": "web", "recipe": ["RUN true"]}), 409,
                 "template_name_taken")
    assert_error(await h.client.post("/v1/builds", json={"name": "code-runner-beta", "recipe": ["RUN true"]}), 409,
                 "name_reserved")
    assert (await h.client.delete("/v1/snapshots/web")).status_code == 204


async def test_step_cache_reuses_the_longest_prefix(h):
    first = (await h.client.post("/v1/builds", json={"name": "a", "recipe": RECIPE})).json()
    assert (await wait_build(h, first["id"], "success", "failed"))["status"] == "success"
    creates_before = len(h.fake.ops("create"))
    second = (await h.client.post("/v1/builds", json={"name": "b", "recipe": RECIPE[:-1] + ["RUN echo changed"]})).json()
    done = await wait_build(h, second["id"], "success", "failed")
    assert done["status"] == "success", done
    assert done["cached_steps"] == 5
    assert any("steps 1-5 of 6 from the step cache" in line for line in done["logs"])
    assert len(h.fake.ops("create")) == creates_before + 1
    # another team never sees this team's layers
    other = h.new_team()
    third = (await other.post("/v1/builds", json={"name": "a", "recipe": RECIPE})).json()
    deadline = time.monotonic() + 10
    while (body := (await other.get(f"/v1/builds/{third['id']}")).json())["status"] not in ("success", "failed"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert body["status"] == "success" and body["cached_steps"] == 0


async def test_a_layer_two_builds_store_at_once_is_kept_once(h, monkeypatch):
    """Two replicas' builds reach the same step at once: the second insert of the layer's key
    loses the race. The layer already stored stays in the cache; the loser's copy is deleted
    from the host, and its build goes on (no error)."""
    db = h.app.state.db
    team_id = await db.run(lambda s: s.scalar(select(Team.id)))
    cache = DBLayerCache(h.app.state.builds, team_id)
    key = "k" * 64
    read = Session.get

    def read_then_other_stores(self, model, ident, **kw):
        found = read(self, model, ident, **kw)
        if model is BuildLayer:  # the other replica's insert lands between our read and ours
            monkeypatch.setattr(Session, "get", read)
            with db.session() as other:
                other.add(BuildLayer(key=ident, team_id=team_id, template_id="tpl-theirs", step=2,
                                     created_at=utcnow(), last_used_at=utcnow()))
                other.commit()
        return found

    monkeypatch.setattr(Session, "get", read_then_other_stores)
    await cache.store(key, "tpl-ours", 2)
    assert await cache.lookup([key]) == (2, "tpl-theirs")
    assert h.fake.ops("delete_template") == ["tpl-ours"]


async def test_failing_step_fails_the_build_with_exit_code_and_output(h):
    h.fake.attach_events[h.fake._next_pid + 1] = [StreamEvent("stdout", b"compiling...\nerror: no such thing\n"),
                                                  StreamEvent("exit", exit_code=3)]
    b = (await h.client.post("/v1/builds", json={"name": "bad", "recipe": ["RUN make", "RUN echo never"]})).json()
    done = await wait_build(h, b["id"], "success", "failed")
    assert done["status"] == "failed"
    assert "step 1/2 (RUN make) failed with exit code 3" in done["error"]
    assert "error: no such thing" in done["error"]
    assert [c for c in h.fake.capsules if c.startswith("bld-")] == []
    assert "bad" not in {t["name"] for t in (await h.client.get("/v1/snapshots")).json()}


async def test_a_finished_build_is_stored_with_its_whole_log(h, monkeypatch):
    """The status and the whole log are written together: a build read as finished (through
    another replica, or before the last periodic flush) never shows a log short of its end."""
    monkeypatch.setattr(Builds, "_flush_log", lambda self, build_id: asyncio.sleep(0))  # no periodic flush

    async def stored(build_id: str) -> Build:
        deadline = time.monotonic() + 10
        while (row := await h.app.state.db.run(lambda s: s.get(Build, build_id))).status in ("pending", "running"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        return row

    ok = (await h.client.post("/v1/builds", json={"name": "logged", "recipe": RECIPE})).json()
    row = await stored(ok["id"])
    assert row.status == "success" and "step 6/6: RUN echo last" in row.logs and "template logged ready" in row.logs
    h.fake.attach_events[h.fake._next_pid + 1] = [StreamEvent("stdout", b"error: no such thing\n"),
                                                  StreamEvent("exit", exit_code=3)]
    bad = (await h.client.post("/v1/builds", json={"name": "bad", "recipe": ["RUN make"]})).json()
    row = await stored(bad["id"])
    assert row.status == "failed" and "error: no such thing" in row.logs and "==> failed:" in row.logs


async def test_bad_input(h):
    bad = await h.client.post("/v1/builds", json={"name": "x", "dockerfile": "FROM minimal\nADD a /b\n"})
    assert "line 2 (ADD)" in assert_error(bad, 400, "invalid_request")["message"]
    assert_error(await h.client.post("/v1/builds", json={"name": "x"}), 400, "invalid_request")
    assert_error(await h.client.post("/v1/builds", json={"name": "x", "recipe": ["RUN a"], "dockerfile": "FROM x"}),
                 400, "invalid_request")
    assert_error(await h.client.post("/v1/builds", json={"name": "Bad Name", "recipe": ["RUN a"]}), 400,
                 "invalid_request")
    assert_error(await h.client.post("/v1/builds", json={"name": "x", "recipe": ["RUN a"], "base_template": "nope"}),
                 400, "invalid_request")
    copy = await h.client.post("/v1/builds", json={"name": "x", "recipe": ["COPY a.txt /a"]})
    assert "build context" in assert_error(copy, 400, "invalid_request")["message"]
    assert_error(await h.client.get("/v1/builds/bld-nope"), 404, "not_found")
    assert_error(await h.client.post("/v1/builds", content=b"{nope", headers={"Content-Type": "application/json"}),
                 400, "invalid_request")


async def test_multipart_with_context_and_dockerfile(h):
    dockerfile = "FROM minimal\nCOPY hello.txt run.sh /srv/\nCMD python3 -m http.server\n"
    files = {"build": (None, json.dumps({"name": "ctx", "dockerfile": dockerfile})),
             "context": ("context.tar", context_tar({"hello.txt": b"hello\n", "run.sh": b"#!/bin/sh\n"}))}
    resp = await h.client.post("/v1/builds", files=files)
    assert resp.status_code == 202, resp.text
    done = await wait_build(h, resp.json()["id"], "success", "failed")
    assert done["status"] == "success", done
    cap = await h.running_capsule(template="ctx")
    assert h.fake.capsules[cap["id"]].files["/srv/hello.txt"] == b"hello\n"
    missing = {"build": (None, json.dumps({"name": "m", "recipe": ["COPY nothere /x"]})),
               "context": ("c.tar", context_tar({"a": b""}))}
    assert "not in the build context" in assert_error(await h.client.post("/v1/builds", files=missing), 400,
                                                      "invalid_request")["message"]


async def test_cancel_stops_the_build_and_removes_its_capsule(h):
    pid = h.fake._next_pid + 1
    h.fake.attach_events[pid] = [StreamEvent("sleep", exit_code=60), StreamEvent("exit", exit_code=0)]
    b = (await h.client.post("/v1/builds", json={"name": "slow", "recipe": ["RUN sleep 60"]})).json()
    await wait_build(h, b["id"], "running")
    while not any(c.startswith("bld-") for c in h.fake.capsules):
        await asyncio.sleep(0.01)
    started = time.monotonic()
    resp = await h.client.post(f"/v1/builds/{b['id']}/cancel")
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "cancelled"
    assert time.monotonic() - started < 5
    assert [c for c in h.fake.capsules if c.startswith("bld-")] == []
    assert_error(await h.client.post(f"/v1/builds/{b['id']}/cancel"), 409, "invalid_state")


async def test_log_stream(h):
    b = (await h.client.post("/v1/builds", json={"name": "logs", "recipe": ["RUN echo a", "RUN echo b"]})).json()
    events = []
    async with h.client.stream("GET", f"/v1/builds/{b['id']}/logs") as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        kind = None
        async for line in resp.aiter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
    kinds = [k for k, _ in events]
    assert "log" in kinds and kinds[-1] == "end"
    assert ("step", {"current_step": 2, "total_steps": 2}) in events
    assert events[-1][1]["status"] == "success"
    text = "".join(d["data"] for k, d in events if k == "log")
    assert "step 2/2: RUN echo b" in text


async def test_a_build_under_way_at_a_restart_ends_failed(tmp_path):
    from .fake_host_agent import FakeHostAgent

    settings = make_settings(tmp_path)
    fake = FakeHostAgent()
    pid = fake._next_pid + 1
    fake.attach_events[pid] = [StreamEvent("sleep", exit_code=60), StreamEvent("exit", exit_code=0)]
    async with running_app(settings, fake) as h:
        b = (await h.client.post("/v1/builds", json={"name": "slow", "recipe": ["RUN sleep 60"]})).json()
        await wait_build(h, b["id"], "running")
        # the server stops: the build's task is cancelled with it, its capsule destroyed
    async with running_app(settings, fake.survivors()) as h2:
        body = (await h2.client.get(f"/v1/builds/{b['id']}")).json()
        assert body["status"] == "failed" and "interrupted" in body["error"]
        assert [c for c in fake.capsules if c.startswith("bld-")] == []


async def test_a_builtin_another_replica_published_first_is_used(h, monkeypatch):
    """Replicas may build a built-in template (code-runner-beta, made on first use) at the same
    time, each in a build capsule of its own. The one whose publish is refused because the other's
    landed first uses that template: the user's create still succeeds."""
    publish = h.fake.snapshot

    async def other_published_first(capsule_id, template_id):
        await publish(capsule_id, template_id)  # the other replica's (the same state)
        raise HostAgentError(f"template {template_id} exists")

    monkeypatch.setattr(h.fake, "snapshot", other_published_first)
    made = await h.client.post("/v1/capsules", json={"template": "code-runner-beta"})
    assert made.status_code == 201, made.text
    assert made.json()["status"] == "running"
    builders = [c for c in h.fake.ops("create") if c.startswith("bld-")]
    assert len(builders) == 1 and builders[0] not in h.fake.capsules  # its build capsule is gone
    # the next build of it (its template gone) runs in a capsule of another id
    monkeypatch.setattr(h.fake, "snapshot", publish)
    for template_id in [t for t in h.fake.templates if t.startswith("builtin-code-runner-beta")]:
        await h.fake.delete_template(template_id)
    assert (await h.client.post("/v1/capsules", json={"template": "code-runner-beta"})).status_code == 201
    again = [c for c in h.fake.ops("create") if c.startswith("bld-")]
    assert len(again) == 2 and again[0] != again[1]


async def test_a_builtin_whose_build_fails_says_why(h, monkeypatch):
    async def refused(capsule_id, template_id):
        raise HostAgentError("disk full")

    monkeypatch.setattr(h.fake, "snapshot", refused)
    made = await h.client.post("/v1/capsules", json={"template": "code-runner-beta"})
    assert made.status_code == 502 and "disk full" in made.json()["error"]["message"], made.text
    assert not [c for c in h.fake.capsules if c.startswith("bld-")]
