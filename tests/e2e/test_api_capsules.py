"""The REST API against a real `wrenn server` and real microVMs: capsule lifecycle, listing,
validation, auth, error shapes, team isolation, events, auto-pause, a VM that dies, and many
creates at once.

The helpers at the top (`Api`, `assert_error`, `make_team`, ...) are shared with the other
`test_api_*.py` files.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from tests.conftest import qemu_pids

pytestmark = pytest.mark.vm

CAPSULE_ID = re.compile(r"^cl-[0-9a-z]{25}$")
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
CAPSULE_FIELDS = {"id", "status", "template", "vcpus", "memory_mb", "timeout_sec", "created_at",
                  "last_updated", "started_at", "last_active_at"}
STATUSES = {"pending", "starting", "running", "paused", "stopped", "error",
            "pausing", "resuming", "snapshotting", "stopping"}
UNKNOWN_ID = "cl-" + "0" * 25


# ---- helpers shared by the test_api_* files ----------------------------------------------------


def assert_error(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """`resp` is an error of the documented shape {"error": {"code", "message"}}."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    body = resp.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def parse_ts(value: str) -> datetime:
    assert ISO_Z.match(value), value
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def check_capsule(obj: dict[str, Any]) -> dict[str, Any]:
    """The capsule object of the spec pages: every required field, with its type."""
    assert CAPSULE_FIELDS <= set(obj), obj
    assert CAPSULE_ID.match(obj["id"]), obj["id"]
    assert obj["status"] in STATUSES, obj
    assert isinstance(obj["template"], str)
    for field in ("vcpus", "memory_mb", "timeout_sec"):
        assert type(obj[field]) is int, (field, obj)
    parse_ts(obj["created_at"])
    parse_ts(obj["last_updated"])
    for field in ("started_at", "last_active_at"):
        if obj[field] is not None:
            parse_ts(obj[field])
    if "metadata" in obj:  # the published SDK rejects non-string values
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in obj["metadata"].items()), obj
    return obj


class Api:
    """An httpx client on the server plus the capsules it created (destroyed by `cleanup`)."""

    def __init__(self, server, api_key: str | None = None):
        self.server = server
        self.http = server.client(api_key)
        self.created: list[str] = []

    def __getattr__(self, name: str):  # get/post/delete/... of the httpx client
        return getattr(self.http, name)

    def create(self, **body: Any) -> dict[str, Any]:
        resp = self.http.post("/v1/capsules", json=body)
        assert resp.status_code == 201, resp.text
        obj = check_capsule(resp.json())
        self.created.append(obj["id"])
        return obj

    def get_capsule(self, cid: str) -> dict[str, Any]:
        resp = self.http.get(f"/v1/capsules/{cid}")
        assert resp.status_code == 200, resp.text
        return check_capsule(resp.json())

    def wait(self, cid: str, status: str = "running", timeout: float = 90) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            obj = self.get_capsule(cid)
            if obj["status"] == status:
                return obj
            assert obj["status"] not in ("error", "stopped") or obj["status"] == status, obj
            assert time.monotonic() < deadline, f"{cid} not {status} after {timeout} s: {obj}"
            time.sleep(0.05)

    def running(self, **body: Any) -> dict[str, Any]:
        return self.wait(self.create(**body)["id"])

    def exec(self, cid: str, cmd: str, *args: str, expect: int = 200, **body: Any) -> dict[str, Any]:
        resp = self.http.post(f"/v1/capsules/{cid}/exec", json={"cmd": cmd, "args": list(args), **body})
        assert resp.status_code == expect, resp.text
        return resp.json()

    def sh(self, cid: str, script: str, **body: Any) -> dict[str, Any]:
        return self.exec(cid, "/bin/sh", "-c", script, **body)

    def destroy(self, cid: str) -> None:
        resp = self.http.delete(f"/v1/capsules/{cid}")
        assert resp.status_code == 204, resp.text

    def cleanup(self) -> None:
        for cid in self.created:
            try:
                self.http.delete(f"/v1/capsules/{cid}")
            except httpx.HTTPError:
                pass
        left = {cid: qemu_pids(cid) for cid in self.created}
        self.http.close()
        assert not any(left.values()), f"QEMU left behind: {left}"


@pytest.fixture(scope="module")
def api(wrenn_server) -> Iterator[Api]:
    a = Api(wrenn_server)
    yield a
    a.cleanup()


def make_team(server, name: str) -> tuple[str, str]:
    """A second team with its own key, written straight into the server's database."""
    from wrenn_control.bootstrap import create_team
    from wrenn_control.config import Settings
    from wrenn_control.db.session import Database

    db = Database(Settings(data_dir=server.data_dir, database_url=None).db_url)
    try:
        return create_team(db, name)
    finally:
        db.dispose()


@pytest.fixture(scope="module")
def other_team(wrenn_server) -> Iterator[Api]:
    """An Api for a second team (its capsules are destroyed at the end)."""
    _, key = make_team(wrenn_server, f"other-{os.getpid()}-{time.monotonic_ns()}")
    a = Api(wrenn_server, key)
    yield a
    a.cleanup()


# ---- lifecycle -------------------------------------------------------------------------------


def test_create_defaults_then_running(api: Api) -> None:
    resp = api.post("/v1/capsules", json={})
    assert resp.status_code == 201, resp.text
    created = check_capsule(resp.json())
    api.created.append(created["id"])
    # The server answers once the VM runs; `starting` only if the boot outlasts its wait.
    assert created["status"] in ("running", "starting")
    assert (created["template"], created["vcpus"], created["memory_mb"], created["timeout_sec"]) == (
        "minimal", 1, 512, 0)
    assert (created["started_at"] is not None) == (created["status"] == "running")
    assert created["last_active_at"] is None
    assert parse_ts(created["last_updated"]) >= parse_ts(created["created_at"])

    # Poll: only pending/starting before running, and started_at stays null until running.
    seen = []
    deadline = time.monotonic() + 90
    while True:
        obj = api.get_capsule(created["id"])
        seen.append(obj["status"])
        if obj["status"] == "running":
            break
        assert obj["status"] in ("pending", "starting"), obj
        assert obj["started_at"] is None, obj
        assert time.monotonic() < deadline, seen
        time.sleep(0.02)
    assert obj["started_at"] is not None
    assert parse_ts(obj["started_at"]) >= parse_ts(obj["created_at"])
    assert obj["created_at"] == created["created_at"] and obj["id"] == created["id"]
    assert obj["metadata"]["kernel_version"] and obj["metadata"]["agent_version"]
    assert isinstance(obj.get("disk_size_mb"), int) and isinstance(obj.get("disk_used_mb"), int)
    # The new capsule really is a VM of that shape.
    out = api.sh(obj["id"], "nproc; grep MemTotal /proc/meminfo")
    nproc, mem = out["stdout"].splitlines()
    assert nproc == "1" and 400_000 < int(mem.split()[1]) <= 512 * 1024


def test_body_may_be_omitted_and_unknown_fields_are_refused(api: Api) -> None:
    resp = api.post("/v1/capsules")  # no body at all
    assert resp.status_code == 201, resp.text
    api.created.append(resp.json()["id"])
    assert resp.json()["template"] == "minimal"
    err = assert_error(api.post("/v1/capsules", json={"template": "minimal", "future_field": {"x": 1}}),
                       400, "invalid_request")
    assert "future_field" in err["message"]
    obj = api.create(template="minimal", metadata={"suite": "api"})
    # user labels come back as given (beside the system keys of a capsule already running)
    assert obj["metadata"]["suite"] == "api"
    assert set(obj["metadata"]) <= {"suite", "kernel_version", "vmm_version", "agent_version", "accelerator"}
    assert api.wait(obj["id"])["metadata"]["suite"] == "api"
    for cid in (resp.json()["id"], obj["id"]):
        api.destroy(cid)


def test_pause_resume_ping_destroy(api: Api) -> None:
    cap = api.running(timeout_sec=0)
    cid = cap["id"]
    assert cap["last_active_at"] is None

    before = datetime.now().astimezone()
    resp = api.post(f"/v1/capsules/{cid}/ping")
    assert resp.status_code == 204 and resp.content == b""
    pinged = api.get_capsule(cid)
    assert pinged["last_active_at"] is not None
    assert parse_ts(pinged["last_active_at"]).timestamp() >= before.timestamp() - 1.5

    api.sh(cid, "echo kept > /tmp/state; sleep 3600 >/dev/null 2>&1 & echo $! > /tmp/pid")
    pid = api.sh(cid, "cat /tmp/pid")["stdout"].strip()

    resp = api.post(f"/v1/capsules/{cid}/pause")
    assert resp.status_code == 200, resp.text
    paused = check_capsule(resp.json())
    assert paused["status"] == "paused" and paused["id"] == cid
    assert paused["started_at"] == pinged["started_at"]
    assert parse_ts(paused["last_updated"]) >= parse_ts(pinged["last_updated"])
    assert api.get_capsule(cid)["status"] == "paused"
    assert qemu_pids(cid) == []  # a paused capsule holds no VM process

    # Only running capsules can be paused, pinged, exec'd; only paused ones resumed.
    assert_error(api.post(f"/v1/capsules/{cid}/pause"), 409, "invalid_state")
    assert_error(api.post(f"/v1/capsules/{cid}/ping"), 409, "invalid_state")
    assert_error(api.post(f"/v1/capsules/{cid}/exec", json={"cmd": "true"}), 409, "invalid_state")
    assert_error(api.get(f"/v1/capsules/{cid}/processes"), 409, "invalid_state")
    assert_error(api.post(f"/v1/capsules/{cid}/files/read", json={"path": "/tmp/state"}), 409, "invalid_state")

    resp = api.post(f"/v1/capsules/{cid}/resume")
    assert resp.status_code == 200, resp.text
    resumed = check_capsule(resp.json())
    assert resumed["status"] in ("resuming", "running")
    api.wait(cid)
    assert_error(api.post(f"/v1/capsules/{cid}/resume"), 409, "invalid_state")
    # Memory and processes are as they were.
    out = api.sh(cid, f"cat /tmp/state; kill -0 {pid} && echo alive")
    assert out["stdout"] == "kept\nalive\n"

    resp = api.delete(f"/v1/capsules/{cid}")
    assert resp.status_code == 204 and resp.content == b""
    stopped = api.get_capsule(cid)
    assert stopped["status"] == "stopped"
    assert qemu_pids(cid) == []
    assert api.delete(f"/v1/capsules/{cid}").status_code == 204  # idempotent
    for action in ("pause", "resume", "ping"):
        assert_error(api.post(f"/v1/capsules/{cid}/{action}"), 409, "invalid_state")
    assert_error(api.post(f"/v1/capsules/{cid}/exec", json={"cmd": "true"}), 409, "invalid_state")


def test_destroy_paused_and_just_created(api: Api) -> None:
    paused = api.running()["id"]
    assert api.post(f"/v1/capsules/{paused}/pause").status_code == 200
    fresh = api.create()["id"]  # destroyed while it may still be booting
    for cid in (paused, fresh):
        api.destroy(cid)
    for cid in (paused, fresh):
        assert api.get_capsule(cid)["status"] == "stopped"
    time.sleep(0.5)  # a boot cancelled by the destroy has had its moment
    assert qemu_pids(paused) == [] and qemu_pids(fresh) == []


def test_list_newest_first_with_every_status(api: Api) -> None:
    a = api.running()["id"]
    b = api.running()["id"]
    c = api.running()["id"]
    assert api.post(f"/v1/capsules/{b}/pause").status_code == 200
    api.destroy(c)
    resp = api.get("/v1/capsules")
    assert resp.status_code == 200
    listed = [check_capsule(x) for x in resp.json()]
    ids = [x["id"] for x in listed]
    assert ids.index(c) < ids.index(b) < ids.index(a)
    by_id = {x["id"]: x for x in listed}
    assert (by_id[a]["status"], by_id[b]["status"], by_id[c]["status"]) == ("running", "paused", "stopped")
    created = [parse_ts(x["created_at"]) for x in listed]
    assert created == sorted(created, reverse=True)
    assert len(ids) == len(set(ids))
    for cid in (a, b):
        api.destroy(cid)


# ---- errors, validation, auth ----------------------------------------------------------------


@pytest.mark.parametrize("body, fragment", [
    ({"vcpus": 0}, "vcpus"),
    ({"vcpus": 99}, "vcpus"),
    ({"vcpus": -1}, "vcpus"),
    ({"memory_mb": 10**7}, "memory_mb"),
    ({"memory_mb": 1}, "memory_mb"),
    ({"template": "no-such-template"}, "no-such-template"),
    ({"vcpus": "2"}, "vcpus"),
    ({"memory_mb": "512"}, "memory_mb"),
    ({"timeout_sec": "10"}, "timeout_sec"),
    ({"timeout_sec": -1}, "timeout_sec"),
    ({"vcpus": 1.5}, "vcpus"),
    ({"vcpus": True}, "vcpus"),
    ({"template": 7}, "template"),
    ({"metadata": {"k": 1}}, "metadata"),
    ({"metadata": {"kernel_version": "1"}}, "reserved"),
])
def test_create_validation(api: Api, body: dict[str, Any], fragment: str) -> None:
    before = len(api.get("/v1/capsules").json())
    err = assert_error(api.post("/v1/capsules", json=body), 400, "invalid_request")
    assert fragment in err["message"], err
    assert len(api.get("/v1/capsules").json()) == before  # nothing was created


@pytest.mark.parametrize("content, content_type", [
    (b"{bad json", "application/json"),
    (b'{"vcpus": 1', "application/json"),
    (b"[1, 2]", "application/json"),
    (b'"minimal"', "application/json"),
    (b"{bad json", None),
])
def test_create_rejects_malformed_bodies(api: Api, content: bytes, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    assert_error(api.post("/v1/capsules", content=content, headers=headers), 400, "invalid_request")


def test_other_validation_errors(api: Api) -> None:
    cid = api.running()["id"]
    assert_error(api.post(f"/v1/capsules/{cid}/exec", json={}), 400, "invalid_request")
    assert_error(api.post(f"/v1/capsules/{cid}/exec", json={"cmd": ""}), 400, "invalid_request")
    assert_error(api.post(f"/v1/capsules/{cid}/exec", json={"cmd": "ls", "args": "-l"}), 400, "invalid_request")
    assert_error(api.post(f"/v1/capsules/{cid}/exec", json={"cmd": "true", "timeout_sec": "5"}), 400,
                 "invalid_request")
    assert_error(api.post(f"/v1/capsules/{cid}/files/read", json={}), 400, "invalid_request")
    assert_error(api.post(f"/v1/capsules/{cid}/files/list", json={"path": "/", "depth": "1"}), 400,
                 "invalid_request")
    assert_error(api.post("/v1/snapshots", json={}), 400, "invalid_request")
    assert_error(api.post("/v1/snapshots", json={"sandbox_id": cid, "name": "Bad Name!"}), 400, "invalid_request")
    assert_error(api.get("/v1/snapshots", params={"type": "other"}), 400, "invalid_request")
    assert_error(api.delete(f"/v1/capsules/{cid}/processes/1", params={"signal": "SIGHUP"}), 400,
                 "invalid_request")
    assert api.get_capsule(cid)["status"] == "running"  # none of that touched it
    api.destroy(cid)


def test_not_found_everywhere(api: Api) -> None:
    u = UNKNOWN_ID
    for method, path, body in [
        ("GET", f"/v1/capsules/{u}", None),
        ("DELETE", f"/v1/capsules/{u}", None),
        ("POST", f"/v1/capsules/{u}/pause", None),
        ("POST", f"/v1/capsules/{u}/resume", None),
        ("POST", f"/v1/capsules/{u}/ping", None),
        ("POST", f"/v1/capsules/{u}/exec", {"cmd": "true"}),
        ("GET", f"/v1/capsules/{u}/processes", None),
        ("DELETE", f"/v1/capsules/{u}/processes/1", None),
        ("POST", f"/v1/capsules/{u}/files/read", {"path": "/etc/hostname"}),
        ("POST", f"/v1/capsules/{u}/files/list", {"path": "/"}),
        ("POST", f"/v1/capsules/{u}/files/mkdir", {"path": "/tmp/x"}),
        ("POST", f"/v1/capsules/{u}/files/remove", {"path": "/tmp/x"}),
        ("POST", "/v1/snapshots", {"sandbox_id": u, "name": "never"}),
        ("DELETE", "/v1/snapshots/never-made-here", None),
        ("GET", "/v1/capsules/cl-abc123", None),
        ("GET", "/v1/capsules/not-even-an-id", None),
    ]:
        resp = api.request(method, path, json=body)
        assert_error(resp, 404, "not_found")
    resp = api.post(f"/v1/capsules/{u}/files/write", files={"file": ("f", b"x")}, data={"path": "/tmp/x"})
    assert_error(resp, 404, "not_found")
    # Unknown routes and methods answer in the same shape.
    assert_error(api.get("/v1/no-such-route"), 404, "not_found")
    assert_error(api.put("/v1/capsules"), 405)


AUTHED_ROUTES = [
    ("GET", "/v1/capsules"),
    ("POST", "/v1/capsules"),
    ("GET", f"/v1/capsules/{UNKNOWN_ID}"),
    ("DELETE", f"/v1/capsules/{UNKNOWN_ID}"),
    ("POST", f"/v1/capsules/{UNKNOWN_ID}/pause"),
    ("POST", f"/v1/capsules/{UNKNOWN_ID}/resume"),
    ("POST", f"/v1/capsules/{UNKNOWN_ID}/ping"),
    ("POST", f"/v1/capsules/{UNKNOWN_ID}/exec"),
    ("GET", f"/v1/capsules/{UNKNOWN_ID}/processes"),
    ("DELETE", f"/v1/capsules/{UNKNOWN_ID}/processes/1"),
    ("POST", f"/v1/capsules/{UNKNOWN_ID}/files/write"),
    ("POST", f"/v1/capsules/{UNKNOWN_ID}/files/read"),
    ("POST", f"/v1/capsules/{UNKNOWN_ID}/files/stream/write"),
    ("POST", f"/v1/capsules/{UNKNOWN_ID}/files/stream/read"),
    ("POST", f"/v1/capsules/{UNKNOWN_ID}/files/list"),
    ("POST", f"/v1/capsules/{UNKNOWN_ID}/files/mkdir"),
    ("POST", f"/v1/capsules/{UNKNOWN_ID}/files/remove"),
    ("POST", "/v1/snapshots"),
    ("GET", "/v1/snapshots"),
    ("DELETE", "/v1/snapshots/minimal"),
    ("GET", "/v1/events/stream"),
]


@pytest.mark.parametrize("key", [None, "", "wrn_" + "0" * 32, "not-a-key", "Bearer wrn_x"])
def test_missing_or_invalid_key_is_401_on_every_route(wrenn_server, key: str | None) -> None:
    headers = {} if key is None else {"X-API-Key": key}
    with httpx.Client(base_url=wrenn_server.base_url, headers=headers, timeout=30) as anon:
        for method, path in AUTHED_ROUTES:
            assert_error(anon.request(method, path), 401, "unauthorized")
        health = anon.get("/health")  # the one public route
        assert health.status_code == 200 and health.json()["status"] == "ok"


def test_health(api: Api) -> None:
    body = api.get("/health").json()
    assert body["status"] == "ok" and body["accelerator"] in ("kvm", "tcg")


def test_cross_team_isolation(api: Api, other_team: Api) -> None:
    # A new team sees nothing.
    assert other_team.get("/v1/capsules").json() == []
    assert [t["type"] for t in other_team.get("/v1/snapshots").json()] == ["base", "base", "base"]  # minimal, base-python, code-runner-beta

    mine = api.running()["id"]
    theirs = other_team.running()["id"]
    assert mine not in [c["id"] for c in other_team.get("/v1/capsules").json()]
    assert theirs not in [c["id"] for c in api.get("/v1/capsules").json()]
    assert [c["id"] for c in other_team.get("/v1/capsules").json()] == [theirs]

    # Everything about my capsule is a 404 for them, exactly like an unknown id.
    for method, path, body in [
        ("GET", f"/v1/capsules/{mine}", None),
        ("POST", f"/v1/capsules/{mine}/pause", None),
        ("POST", f"/v1/capsules/{mine}/resume", None),
        ("POST", f"/v1/capsules/{mine}/ping", None),
        ("POST", f"/v1/capsules/{mine}/exec", {"cmd": "true"}),
        ("GET", f"/v1/capsules/{mine}/processes", None),
        ("DELETE", f"/v1/capsules/{mine}/processes/1", None),
        ("POST", f"/v1/capsules/{mine}/files/read", {"path": "/etc/hostname"}),
        ("POST", f"/v1/capsules/{mine}/files/list", {"path": "/"}),
        ("POST", f"/v1/capsules/{mine}/files/remove", {"path": "/tmp"}),
        ("POST", "/v1/snapshots", {"sandbox_id": mine, "name": "stolen"}),
        ("DELETE", f"/v1/capsules/{mine}", None),
    ]:
        err = assert_error(other_team.request(method, path, json=body), 404, "not_found")
        assert mine not in err["message"] or "not found" in err["message"]
    # ...and it is untouched.
    assert api.get_capsule(mine)["status"] == "running"
    assert api.sh(mine, "echo still mine")["stdout"] == "still mine\n"
    for cid in (mine,):
        api.destroy(cid)
    other_team.destroy(theirs)


# ---- events ---------------------------------------------------------------------------------


class SSEReader:
    """Reads a team's /v1/events/stream on a thread into a queue of (event, payload)."""

    def __init__(self, server, api_key: str | None = None):
        self.events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self._client = server.client(api_key)
        self._ready = threading.Event()
        self._stop = False
        self.status: int | None = None
        self.content_type: str | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(30), "event stream did not open"

    def _run(self) -> None:
        try:
            with self._client.stream("GET", "/v1/events/stream", timeout=httpx.Timeout(5, read=None)) as resp:
                self.status, self.content_type = resp.status_code, resp.headers.get("content-type")
                name = None
                for line in resp.iter_lines():
                    if self._stop:
                        return
                    if line.startswith("event:"):
                        name = line[6:].strip()
                    elif line.startswith("data:"):
                        payload = json.loads(line[5:])
                        if name == "connected":
                            self._ready.set()
                        else:
                            self.events.put((name or "", payload))
        except (httpx.HTTPError, RuntimeError):
            pass
        finally:
            self._ready.set()

    @staticmethod
    def label(name: str, payload: dict[str, Any]) -> str:
        """`->running` for a status change, `capsule.pause:success` for a finished action."""
        if name == "capsule.state.changed":
            return "->" + payload["metadata"]["to"]
        return f"{name}:{payload.get('outcome')}"

    def until(self, capsule_id: str, event: str, timeout: float = 30) -> list[str]:
        """Labels of the events seen for `capsule_id` up to and including `event` (see `label`)."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no {event} for {capsule_id}; saw {seen}"
            try:
                name, payload = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if (payload.get("resource") or {}).get("id") == capsule_id:
                # the published SDK's SSEEvent: the kind repeated in the data, the capsule as `sandbox`
                assert payload["event"] == name and ISO_Z.match(payload["timestamp"]), payload
                assert payload["resource"]["type"] == "capsule" and check_capsule(payload["sandbox"])["id"] == capsule_id
                assert payload["actor"]["type"] == "api_key", payload
                seen.append(self.label(name, payload))
                if seen[-1] == event:
                    return seen

    def drain(self) -> list[tuple[str, dict[str, Any]]]:
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self._stop = True
        self._client.close()


def test_event_stream(api: Api, other_team: Api, wrenn_server) -> None:
    mine = SSEReader(wrenn_server)
    theirs = SSEReader(wrenn_server, other_team.http.headers["X-API-Key"])
    try:
        assert mine.status == 200 and mine.content_type.startswith("text/event-stream")
        cid = api.create()["id"]
        assert mine.until(cid, "capsule.create:success") == [
            "->pending", "->starting", "->running", "capsule.create:success"]
        assert api.post(f"/v1/capsules/{cid}/pause").status_code == 200
        assert mine.until(cid, "capsule.pause:success") == ["->pausing", "->paused", "capsule.pause:success"]
        api.destroy(cid)
        assert mine.until(cid, "capsule.destroy:success") == ["->stopping", "->stopped", "capsule.destroy:success"]
        time.sleep(0.3)
        assert not any((p.get("resource") or {}).get("id") == cid for _, p in theirs.drain()), \
            "event leaked to another team"
    finally:
        mine.close()
        theirs.close()


# ---- failures -------------------------------------------------------------------------------


def test_vm_that_dies_is_reported_as_error(api: Api) -> None:
    cid = api.running()["id"]
    pids = qemu_pids(cid)
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while qemu_pids(cid) and time.monotonic() < deadline:
        time.sleep(0.05)

    assert_error(api.post(f"/v1/capsules/{cid}/exec", json={"cmd": "true"}), 502, "agent_error")
    dead = api.get_capsule(cid)
    assert dead["status"] == "error", dead
    assert dead["metadata"].get("error"), dead
    # An errored capsule can only be destroyed.
    assert_error(api.post(f"/v1/capsules/{cid}/exec", json={"cmd": "true"}), 409, "invalid_state")
    assert_error(api.post(f"/v1/capsules/{cid}/pause"), 409, "invalid_state")
    assert_error(api.post(f"/v1/capsules/{cid}/resume"), 409, "invalid_state")
    api.destroy(cid)
    assert api.get_capsule(cid)["status"] == "stopped"


def test_vm_that_dies_then_pause_is_error_not_paused(api: Api) -> None:
    cid = api.running()["id"]
    for pid in qemu_pids(cid):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while qemu_pids(cid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert_error(api.post(f"/v1/capsules/{cid}/pause"), 502, "agent_error")
    assert api.get_capsule(cid)["status"] == "error"  # not "paused": nothing could resume it
    api.destroy(cid)


# ---- auto-pause -----------------------------------------------------------------------------


def test_auto_pause_keeps_memory(api: Api) -> None:
    cap = api.running(timeout_sec=2)
    cid = cap["id"]
    assert cap["timeout_sec"] == 2
    # Activity (exec) keeps it running; write state and start a process right away.
    api.sh(cid, "echo remembered > /tmp/auto; echo in-ram > /dev/shm/auto")  # /dev/shm: tmpfs, RAM only
    started = api.post(f"/v1/capsules/{cid}/exec",
                       json={"cmd": "/bin/sh", "args": ["-c", "n=0; while true; do n=$((n+1)); sleep 0.1; done"],
                             "background": True, "tag": "counter"})
    assert started.status_code == 202, started.text
    pid = started.json()["pid"]
    last = time.monotonic()
    deadline = last + 20
    while (obj := api.get_capsule(cid))["status"] != "paused":
        assert obj["status"] in ("running", "pausing"), obj
        assert time.monotonic() < deadline, "not auto-paused"
        time.sleep(0.1)
    idle = time.monotonic() - last
    assert idle >= 1.5, f"paused after {idle:.1f} s of inactivity, before its 2 s timeout"
    assert qemu_pids(cid) == []

    assert api.post(f"/v1/capsules/{cid}/resume").status_code == 200
    api.wait(cid)
    assert api.sh(cid, "cat /tmp/auto /dev/shm/auto")["stdout"] == "remembered\nin-ram\n"
    procs = {p["tag"]: p for p in api.get(f"/v1/capsules/{cid}/processes").json()["processes"]}
    assert procs["counter"]["pid"] == pid and procs["counter"].get("running", True)
    assert api.sh(cid, f"kill -0 {pid} && echo alive")["stdout"] == "alive\n"

    # Pings keep it from pausing: 4 s of pings every 0.5 s against a 2 s timeout.
    end = time.monotonic() + 4
    while time.monotonic() < end:
        assert api.post(f"/v1/capsules/{cid}/ping").status_code == 204
        time.sleep(0.5)
    assert api.get_capsule(cid)["status"] == "running"
    api.destroy(cid)


# ---- many at once ---------------------------------------------------------------------------


async def test_twenty_concurrent_creates(wrenn_server, api: Api) -> None:
    n = 20
    async with httpx.AsyncClient(base_url=wrenn_server.base_url, timeout=120,
                                 headers={"X-API-Key": wrenn_server.api_key}) as client:
        responses = await asyncio.gather(*(client.post("/v1/capsules", json={}) for _ in range(n)))
        ids = []
        for r in responses:
            if r.status_code == 201:
                ids.append(r.json()["id"])
        api.created.extend(ids)  # cleaned up even if what follows fails
        assert [r.status_code for r in responses] == [201] * n, [r.text for r in responses if r.status_code != 201]
        assert len(set(ids)) == n

        async def until_running(cid: str) -> dict[str, Any]:
            deadline = time.monotonic() + 180
            while True:
                obj = (await client.get(f"/v1/capsules/{cid}")).json()
                if obj["status"] == "running":
                    return obj
                assert obj["status"] in ("pending", "starting"), obj
                assert time.monotonic() < deadline, obj
                await asyncio.sleep(0.2)

        running = await asyncio.gather(*(until_running(cid) for cid in ids))
        assert all(r["status"] == "running" for r in running)
        listed = {c["id"]: c["status"] for c in (await client.get("/v1/capsules")).json()}
        assert all(listed[cid] == "running" for cid in ids)  # none lost
        # Each answers, and each is its own VM.
        outs = await asyncio.gather(*(client.post(f"/v1/capsules/{cid}/exec", json={"cmd": "hostname"})
                                      for cid in ids))
        assert sorted(o.json()["stdout"].strip() for o in outs) == sorted(ids)

        deleted = await asyncio.gather(*(client.delete(f"/v1/capsules/{cid}") for cid in ids))
        assert [d.status_code for d in deleted] == [204] * n
        listed = {c["id"]: c["status"] for c in (await client.get("/v1/capsules")).json()}
        assert all(listed[cid] == "stopped" for cid in ids)
    assert {cid: qemu_pids(cid) for cid in ids if qemu_pids(cid)} == {}
