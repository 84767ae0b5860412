"""Capsule / AsyncCapsule, commands and files against a small in-memory fake of the API
served through httpx.MockTransport."""

from __future__ import annotations

import base64
import functools
import json
import re
from collections.abc import Iterator

import httpx
import pytest

import wrenn
import wrenn._wait
from wrenn import (
    AsyncCapsule,
    AsyncWrennClient,
    BackgroundProcess,
    Capsule,
    CapsuleInfo,
    ExecResult,
    FileEntry,
    Status,
    WrennCapsuleStateError,
    WrennClient,
    WrennConflictError,
    WrennError,
    WrennNotFoundError,
    WrennWaitTimeoutError,
)

BASE = "http://wrenn.test/api"
KEY = "wrn_" + "1" * 32


def _error(status: int, code: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message}})


def _multipart_fields(request: httpx.Request) -> dict[str, bytes]:
    boundary = re.search(r"boundary=([^;]+)", request.headers["content-type"]).group(1)
    fields = {}
    for part in request.content.split(b"--" + boundary.encode())[1:-1]:
        head, _, value = part.partition(b"\r\n\r\n")
        name = re.search(rb'name="([^"]+)"', head).group(1).decode()
        fields[name] = value[: -len(b"\r\n")]
    return fields


class FakeWrenn:
    """Just enough of the Wrenn API. ``boot`` is the sequence of statuses successive GETs
    report after a create or resume, ending where the capsule stays."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.capsules: dict[str, dict] = {}
        self.boot: list[str] = ["starting", "running"]
        self.pending: dict[str, list[str]] = {}
        self.files: dict[str, bytes] = {}
        self.dirs: set[str] = {"/", "/tmp", "/home"}
        self.processes: dict[int, dict] = {}
        self.exec_reply: dict | None = None
        self.counter = 0

    def routes(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        m, path = request.method, request.url.path.removeprefix("/api")
        body = (
            json.loads(request.content)
            if request.headers.get("content-type") == "application/json"
            else None
        )
        if request.headers.get("x-api-key") != KEY:
            return _error(401, "unauthorized", "bad key")
        if (m, path) == ("POST", "/v1/capsules"):
            self.counter += 1
            cid = f"cl-{self.counter:025d}"
            self.capsules[cid] = {
                "id": cid,
                "status": "pending",
                "template": body.get("template", "minimal"),
                "vcpus": body.get("vcpus", 1),
                "memory_mb": body.get("memory_mb", 512),
                "timeout_sec": body.get("timeout_sec", 0),
                "created_at": "2024-11-01T10:00:00Z",
                "last_updated": "2024-11-01T10:00:00Z",
            }
            self.pending[cid] = list(self.boot)
            return httpx.Response(201, json=self.capsules[cid])
        if (m, path) == ("GET", "/v1/capsules"):
            return httpx.Response(200, json=list(self.capsules.values())[::-1])
        if (m, path) == ("POST", "/v1/snapshots"):
            cap = self.capsules[body["sandbox_id"]]
            cap["status"] = "paused"
            return httpx.Response(
                201, json={"name": body.get("name", "template-1234abcd"), "type": "snapshot"}
            )
        match = re.fullmatch(r"/v1/capsules/(cl-\w+)(/.*)?", path)
        if not match or match.group(1) not in self.capsules:
            return _error(404, "not_found", "no such capsule")
        cap, rest = self.capsules[match.group(1)], match.group(2) or ""
        if (m, rest) == ("GET", ""):
            steps = self.pending.get(cap["id"])
            if steps:
                cap["status"] = steps.pop(0)
            return httpx.Response(200, json=cap)
        if (m, rest) == ("DELETE", ""):
            cap["status"] = "stopped"
            self.pending.pop(cap["id"], None)
            return httpx.Response(204)
        if rest == "/pause":
            if cap["status"] != "running":
                return _error(409, "invalid_state", "capsule is not running")
            cap["status"] = "paused"
            return httpx.Response(200, json=cap)
        if rest == "/resume":
            if cap["status"] != "paused":
                return _error(409, "invalid_state", "capsule is not paused")
            cap["status"] = "resuming"
            self.pending[cap["id"]] = ["running"]
            return httpx.Response(200, json=cap)
        if rest == "/ping":
            return httpx.Response(204)
        if rest == "/exec":
            return self.exec(cap, body)
        if rest == "/processes":
            return httpx.Response(200, json={"processes": list(self.processes.values())})
        if rest.startswith("/processes/"):
            key = rest.rsplit("/", 1)[1]
            for pid, proc in list(self.processes.items()):
                if key in (str(pid), proc["tag"]):
                    del self.processes[pid]
                    return httpx.Response(204)
            return _error(404, "not_found", "no such process")
        if rest.startswith("/files/"):
            return self.file_op(rest.removeprefix("/files/"), request, body)
        return _error(400, "invalid_request", f"unknown route {m} {path}")

    def exec(self, cap: dict, body: dict) -> httpx.Response:
        if cap["status"] != "running":
            return _error(409, "invalid_state", "capsule is not running")
        if body.get("background"):
            pid = 100 + len(self.processes)
            tag = body.get("tag") or f"proc-{pid:08x}"
            self.processes[pid] = {"pid": pid, "tag": tag, "cmd": body["cmd"], "args": body["args"]}
            return httpx.Response(
                202, json={"sandbox_id": cap["id"], "cmd": body["cmd"], "pid": pid, "tag": tag}
            )
        if self.exec_reply is not None:
            return httpx.Response(200, json=self.exec_reply)
        line = body["args"][1]
        out = line.removeprefix("echo ") + "\n" if line.startswith("echo ") else ""
        return httpx.Response(
            200,
            json={
                "sandbox_id": cap["id"],
                "cmd": body["cmd"],
                "stdout": out,
                "stderr": "",
                "exit_code": 0,
                "duration_ms": 3,
                "encoding": "utf-8",
            },
        )

    def file_op(self, op: str, request: httpx.Request, body: dict | None) -> httpx.Response:
        if op in ("write", "stream/write"):
            fields = _multipart_fields(request)
            self.files[fields["path"].decode()] = fields["file"]
            return httpx.Response(204)
        path = body["path"]
        if op in ("read", "stream/read"):
            if path not in self.files:
                return _error(404, "not_found", f"{path}: no such file")
            return httpx.Response(200, content=self.files[path])
        if op == "list":
            if path not in self.dirs:
                return _error(404, "not_found", f"{path}: no such directory")
            entries = [
                {"name": p.rsplit("/", 1)[1], "path": p, "type": kind, "size": size}
                for kind, items in (
                    ("file", self.files),
                    ("directory", {d: b"" for d in self.dirs}),
                )
                for p, size in ((p, len(v)) for p, v in items.items())
                if p != "/"
                and p.rsplit("/", 1)[0] in (path.rstrip("/"), "")
                and (p.rsplit("/", 1)[0] or "/") == path
            ]
            return httpx.Response(200, json={"entries": entries})
        if op == "mkdir":
            if path in self.dirs:
                return _error(409, "conflict", "already_exists")
            self.dirs.add(path)
            return httpx.Response(
                200,
                json={"entry": {"name": path.rsplit("/", 1)[1], "path": path, "type": "directory"}},
            )
        if op == "remove":
            if path not in self.files and path not in self.dirs:
                return _error(404, "not_found", "missing")
            self.files.pop(path, None)
            self.dirs.discard(path)
            return httpx.Response(204)
        return _error(400, "invalid_request", op)

    def calls(self) -> list[tuple[str, str]]:
        return [(r.method, r.url.path.removeprefix("/api")) for r in self.requests]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeWrenn]:
    """Every client the SDK builds talks to one FakeWrenn; waits do not sleep."""
    server = FakeWrenn()
    transport = httpx.MockTransport(server.routes)
    monkeypatch.setenv("WRENN_API_KEY", KEY)
    monkeypatch.setenv("WRENN_BASE_URL", BASE)
    monkeypatch.setattr(
        wrenn.capsule, "WrennClient", functools.partial(WrennClient, transport=transport)
    )
    monkeypatch.setattr(
        wrenn.async_capsule, "AsyncWrennClient", functools.partial(AsyncWrennClient, transport=transport)
    )
    monkeypatch.setattr(wrenn._wait, "_FIRST_POLL", 0.0)
    monkeypatch.setattr(wrenn._wait, "_MAX_POLL", 0.0)
    yield server


# --- Capsule lifecycle ---------------------------------------------------------------------


def test_constructor_creates_without_waiting(fake: FakeWrenn) -> None:
    capsule = Capsule(template="base-python", vcpus=2, memory_mb=1024, timeout=300)
    assert capsule.id.startswith("cl-") and capsule.capsule_id == capsule.id
    assert capsule.status == "pending"
    assert fake.calls() == [("POST", "/v1/capsules")]
    assert json.loads(fake.requests[0].content) == {
        "template": "base-python",
        "vcpus": 2,
        "memory_mb": 1024,
        "timeout_sec": 300,
    }


def test_wait_true_polls_until_running(fake: FakeWrenn) -> None:
    fake.boot = ["pending", "starting", "starting", "running"]
    capsule = Capsule(template="minimal", wait=True)
    assert capsule.status == Status.running and str(capsule.status) == "running"
    assert fake.calls() == [("POST", "/v1/capsules")] + [("GET", f"/v1/capsules/{capsule.id}")] * 4


def test_wait_raises_when_capsule_goes_to_error_and_cleans_up(fake: FakeWrenn) -> None:
    fake.boot = ["starting", "error"]
    with pytest.raises(WrennCapsuleStateError) as info:
        Capsule(wait=True)
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, WrennError)
    assert info.value.status == "error" and "error" in info.value.message
    # The caller never got the object, so the SDK destroyed the failed capsule.
    assert fake.calls()[-1] == ("DELETE", f"/v1/capsules/{info.value.capsule_id}")


def test_wait_ready_times_out(fake: FakeWrenn) -> None:
    fake.boot = ["starting"]
    capsule = Capsule.create()
    with pytest.raises(WrennWaitTimeoutError) as info:
        capsule.wait_ready(timeout=0.05)
    assert isinstance(info.value, TimeoutError)
    assert "starting" in info.value.message


def test_connect_resumes_a_paused_capsule(fake: FakeWrenn) -> None:
    cid = Capsule(wait=True).id
    fake.capsules[cid]["status"] = "paused"
    fake.requests.clear()
    capsule = Capsule.connect(cid)
    assert capsule.status == "running"
    assert fake.calls() == [
        ("GET", f"/v1/capsules/{cid}"),
        ("POST", f"/v1/capsules/{cid}/resume"),
        ("GET", f"/v1/capsules/{cid}"),
    ]


def test_connect_to_running_only_reads_and_missing_raises(fake: FakeWrenn) -> None:
    cid = Capsule(wait=True).id
    fake.requests.clear()
    assert Capsule.connect(cid).status == "running"
    assert fake.calls() == [("GET", f"/v1/capsules/{cid}")]
    with pytest.raises(WrennNotFoundError):
        Capsule.connect("cl-nope")


def test_get_info_works_on_class_and_instance(fake: FakeWrenn) -> None:
    cid = Capsule(template="base-python", wait=True).id
    info = Capsule.get_info(cid)
    assert isinstance(info, CapsuleInfo) and info.template == "base-python"
    capsule = Capsule.connect(cid)
    fake.capsules[cid]["vcpus"] = 4
    assert capsule.get_info().vcpus == 4 and capsule.info.vcpus == 4


def test_pause_resume_ping_destroy_refresh_status(fake: FakeWrenn) -> None:
    capsule = Capsule(wait=True)
    capsule.pause()
    assert capsule.status == "paused"
    assert not capsule.is_running()
    capsule.resume(wait=True)
    assert capsule.status == "running" and capsule.is_running()
    capsule.ping()
    assert fake.calls()[-1] == ("POST", f"/v1/capsules/{capsule.id}/ping")
    capsule.destroy()
    assert capsule.status == "stopped"
    assert fake.capsules[capsule.id]["status"] == "stopped"


def test_pause_of_non_running_raises_conflict(fake: FakeWrenn) -> None:
    capsule = Capsule(wait=True)
    capsule.pause()
    with pytest.raises(WrennConflictError) as info:
        capsule.pause()
    assert info.value.code == "invalid_state" and info.value.status_code == 409


def test_class_level_lifecycle_calls(fake: FakeWrenn) -> None:
    cid = Capsule(wait=True).id
    assert Capsule.pause(cid).status == "paused"
    assert Capsule.resume(cid, wait=True).status == "running"
    Capsule.ping(cid)
    Capsule.destroy(cid, wait=True)
    assert fake.capsules[cid]["status"] == "stopped"
    assert [c.id for c in Capsule.list()] == [cid]


def test_context_manager_destroys_on_exit(fake: FakeWrenn) -> None:
    with Capsule(wait=True) as capsule:
        cid = capsule.id
    assert fake.calls()[-1] == ("DELETE", f"/v1/capsules/{cid}")
    assert capsule._client.http.is_closed


def test_create_snapshot_refreshes_status(fake: FakeWrenn) -> None:
    capsule = Capsule(wait=True)
    template = capsule.create_snapshot(name="snap", overwrite=True)
    assert template.name == "snap"
    post = next(r for r in fake.requests if r.url.path == "/api/v1/snapshots")
    assert json.loads(post.content) == {"sandbox_id": capsule.id, "name": "snap"}
    assert post.url.params["overwrite"] == "true"
    assert capsule.status == "paused"


def test_get_url(fake: FakeWrenn, monkeypatch: pytest.MonkeyPatch) -> None:
    capsule = Capsule()
    assert capsule.get_url(8080) == f"http://8080-{capsule.id}.wrenn.test"
    monkeypatch.setenv("WRENN_PROXY_DOMAIN", "proxy.example.com")
    assert Capsule().get_url(80).endswith(".proxy.example.com")


def test_get_host(fake: FakeWrenn, monkeypatch: pytest.MonkeyPatch) -> None:
    capsule = Capsule()
    assert capsule.get_host(8080) == f"8080-{capsule.id}.wrenn.test"
    assert capsule.get_url(8080) == f"http://{capsule.get_host(8080)}"
    monkeypatch.setenv("WRENN_PROXY_DOMAIN", "localhost:9000")
    other = Capsule()
    assert other.get_host(3000) == f"3000-{other.id}.localhost:9000"


def test_missing_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WRENN_API_KEY", raising=False)
    with pytest.raises(ValueError):
        Capsule()
    with pytest.raises(ValueError):
        AsyncCapsule()


# --- commands ------------------------------------------------------------------------------


def test_run_sends_shell_command(fake: FakeWrenn) -> None:
    capsule = Capsule(wait=True)
    result = capsule.commands.run("echo hello", envs={"A": "1"}, cwd="/tmp", timeout=5)
    assert isinstance(result, ExecResult)
    assert (result.stdout, result.stderr, result.exit_code, result.duration_ms) == (
        "hello\n",
        "",
        0,
        3,
    )
    assert result.stdout_bytes == b"hello\n"
    request = fake.requests[-1]
    assert request.url.path == f"/api/v1/capsules/{capsule.id}/exec"
    assert json.loads(request.content) == {
        "cmd": "/bin/sh",
        "args": ["-c", "echo hello"],
        "background": False,
        "timeout_sec": 5,
        "envs": {"A": "1"},
        "cwd": "/tmp",
    }
    # The HTTP read timeout outlives the command's own timeout.
    assert request.extensions["timeout"]["read"] > 5


def test_run_decodes_base64_output(fake: FakeWrenn) -> None:
    capsule = Capsule(wait=True)
    raw = b"\xff\xfebinary\n"
    fake.exec_reply = {
        "stdout": base64.b64encode(raw).decode(),
        "stderr": base64.b64encode(b"err").decode(),
        "exit_code": 3,
        "duration_ms": 7,
        "encoding": "base64",
    }
    result = capsule.commands.run("cat /bin/true")
    assert result.stdout_bytes == raw and result.stderr_bytes == b"err"
    assert result.stdout == raw.decode("utf-8", errors="replace") and result.stderr == "err"
    assert result.exit_code == 3  # a failing command is a result, not an exception


def test_background_list_and_kill(fake: FakeWrenn) -> None:
    capsule = Capsule(wait=True)
    handle = capsule.commands.run("sleep 100", background=True, tag="sleeper")
    assert isinstance(handle, BackgroundProcess)
    assert (handle.tag, handle.capsule_id) == ("sleeper", capsule.id)
    body = json.loads(fake.requests[-1].content)
    assert body["background"] is True and "timeout_sec" not in body and body["tag"] == "sleeper"
    other = capsule.commands.run("sleep 200", background=True)
    assert [p.pid for p in capsule.commands.list()] == [handle.pid, other.pid]

    capsule.commands.kill(handle.pid)
    assert fake.requests[-1].method == "DELETE"
    assert fake.requests[-1].url.path.endswith(f"/processes/{handle.pid}")
    assert fake.requests[-1].url.params["signal"] == "SIGKILL"
    capsule.commands.kill(other.tag, signal="term")
    assert fake.requests[-1].url.params["signal"] == "SIGTERM"
    assert capsule.commands.list() == []
    with pytest.raises(WrennNotFoundError):
        capsule.commands.kill(12345)


def test_exec_on_paused_capsule_is_a_conflict(fake: FakeWrenn) -> None:
    capsule = Capsule(wait=True)
    capsule.pause()
    with pytest.raises(WrennConflictError):
        capsule.commands.run("true")


# --- files ---------------------------------------------------------------------------------


def test_files_round_trip(fake: FakeWrenn) -> None:
    capsule = Capsule(wait=True)
    capsule.files.write("/tmp/hello.txt", "héllo")
    assert fake.files["/tmp/hello.txt"] == "héllo".encode()
    capsule.files.write("/tmp/blob", b"\x00\xff")
    assert capsule.files.read("/tmp/hello.txt") == "héllo"
    assert capsule.files.read_bytes("/tmp/blob") == b"\x00\xff"

    entries = capsule.files.list("/tmp")
    assert all(isinstance(e, FileEntry) for e in entries)
    assert sorted(e.name for e in entries) == ["blob", "hello.txt"]
    assert json.loads(fake.requests[-1].content) == {"path": "/tmp", "depth": 1}

    assert capsule.files.exists("/tmp/hello.txt")
    assert not capsule.files.exists("/tmp/nope")
    assert not capsule.files.exists("/nowhere/file")
    assert capsule.files.exists("/")

    entry = capsule.files.make_dir("/tmp/d")
    assert entry.is_dir and entry.path == "/tmp/d"
    assert capsule.files.make_dir("/tmp/d").name == "d"  # already there: fine

    capsule.files.remove("/tmp/hello.txt")
    assert not capsule.files.exists("/tmp/hello.txt")
    with pytest.raises(WrennNotFoundError):
        capsule.files.read("/tmp/hello.txt")


def test_files_streams(fake: FakeWrenn) -> None:
    capsule = Capsule(wait=True)
    capsule.files.upload_stream("/tmp/big", iter([b"a" * 10, b"b" * 5]))
    assert fake.files["/tmp/big"] == b"a" * 10 + b"b" * 5
    assert b"".join(capsule.files.download_stream("/tmp/big")) == b"a" * 10 + b"b" * 5
    with pytest.raises(WrennNotFoundError):
        list(capsule.files.download_stream("/tmp/none"))


# --- AsyncCapsule --------------------------------------------------------------------------


async def test_async_create_wait_and_lifecycle(fake: FakeWrenn) -> None:
    fake.boot = ["starting", "starting", "running"]
    capsule = await AsyncCapsule(template="minimal", wait=True)
    assert capsule.status == "running"
    assert (await capsule.get_info()).id == capsule.id
    assert (await AsyncCapsule.get_info(capsule.id)).status == "running"
    await capsule.pause()
    assert capsule.status == "paused"
    await capsule.resume(wait=True)
    assert await capsule.is_running()
    await capsule.ping()
    assert [c.id for c in await AsyncCapsule.list()] == [capsule.id]
    await capsule.destroy()
    assert capsule.status == "stopped"
    await capsule.aclose()


async def test_async_create_classmethod_and_context_manager(fake: FakeWrenn) -> None:
    async with await AsyncCapsule.create(wait=True) as capsule:
        result = await capsule.commands.run("echo hi")
        assert result.stdout == "hi\n"
    assert fake.calls()[-1] == ("DELETE", f"/v1/capsules/{capsule.id}")

    async with AsyncCapsule(template="minimal") as other:  # created on enter
        assert other.id != capsule.id and other.status == "pending"


async def test_async_capsule_must_be_awaited_before_use(fake: FakeWrenn) -> None:
    pending = AsyncCapsule()
    with pytest.raises(RuntimeError, match="await"):
        _ = pending.id
    assert fake.requests == []
    capsule = await pending
    assert capsule is pending and await pending is pending  # awaiting again creates nothing
    assert fake.calls() == [("POST", "/v1/capsules")]


async def test_async_wait_raises_on_error(fake: FakeWrenn) -> None:
    fake.boot = ["error"]
    with pytest.raises(WrennCapsuleStateError):
        await AsyncCapsule.create(wait=True)
    assert fake.calls()[-1][0] == "DELETE"


async def test_async_connect_resumes(fake: FakeWrenn) -> None:
    capsule = await AsyncCapsule.create(wait=True)
    await AsyncCapsule.pause(capsule.id)
    again = await AsyncCapsule.connect(capsule.id)
    assert again.status == "running"
    assert ("POST", f"/v1/capsules/{capsule.id}/resume") in fake.calls()
    await AsyncCapsule.destroy(capsule.id)
    assert fake.capsules[capsule.id]["status"] == "stopped"


async def test_async_commands_and_files(fake: FakeWrenn) -> None:
    capsule = await AsyncCapsule.create(wait=True)
    handle = await capsule.commands.run("sleep 9", background=True)
    assert [p.tag for p in await capsule.commands.list()] == [handle.tag]
    await capsule.commands.kill(handle.tag, signal="SIGTERM")
    assert await capsule.commands.list() == []

    await capsule.files.write("/tmp/a.txt", "alpha")
    assert await capsule.files.read("/tmp/a.txt") == "alpha"
    assert await capsule.files.read_bytes("/tmp/a.txt") == b"alpha"
    assert [e.name for e in await capsule.files.list("/tmp")] == ["a.txt"]
    assert await capsule.files.exists("/tmp/a.txt")
    assert (await capsule.files.make_dir("/tmp/sub")).is_dir
    await capsule.files.remove("/tmp/a.txt")
    assert not await capsule.files.exists("/tmp/a.txt")

    async def chunks():
        yield b"x" * 3
        yield b"y"

    await capsule.files.upload_stream("/tmp/s", chunks())
    assert b"".join([c async for c in capsule.files.download_stream("/tmp/s")]) == b"xxxy"
    template = await capsule.create_snapshot()
    assert template.name.startswith("template-") and capsule.status == "paused"
    await capsule.aclose()


async def test_client_wait_helper(fake: FakeWrenn) -> None:
    fake.boot = ["starting", "running"]
    async with wrenn.async_capsule.AsyncWrennClient() as client:
        info = await client.capsules.create()
        assert (await client.capsules.wait(info.id)).status == "running"
        await client.capsules.pause(info.id)
        assert (await client.capsules.wait(info.id, {"paused", "running"})).status == "paused"
