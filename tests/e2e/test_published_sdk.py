"""The published Wrenn SDK (`pip install wrenn==0.3.0`, Python >= 3.13) against our server.

A venv with it is made once in a cache directory and reused. A script run by that interpreter
exercises the SDK's main calls and prints one JSON object: for each call, either its result or
the error it raised. The tests below assert on that object, so a failure names the call.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import qemu_pids

pytestmark = pytest.mark.vm

SDK_VERSION = "0.3.0"
PYTHON313 = [Path("~/.pyenv/versions/3.13.0/bin/python").expanduser(), shutil.which("python3.13")]
CACHE = Path(os.environ.get("WRENN_PUBLISHED_SDK_VENV")
             or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "wrenn" / "published-sdk-venv")

SCRIPT = textwrap.dedent(r'''
    import asyncio, datetime, json, secrets, sys, threading, time, traceback

    import wrenn
    from wrenn import AsyncWrennClient, Capsule, WrennClient

    results = {"sdk_version": wrenn.__version__}
    created = []


    def call(name, fn):
        try:
            value = fn()
        except BaseException as exc:  # noqa: BLE001 - every failure is a result
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000],
                             "code": getattr(exc, "code", None), "status_code": getattr(exc, "status_code", None),
                             "trace": traceback.format_exc()[-2000:]}
            return None
        results[name] = {"ok": True, "value": value}
        return value


    def cap(model):
        return {"id": model.id, "status": str(model.status.value) if model.status else None,
                "template": model.template, "vcpus": model.vcpus, "memory_mb": model.memory_mb,
                "timeout_sec": model.timeout_sec, "started_at": model.started_at is not None}


    with WrennClient() as client:
        # ---- client.capsules ----
        c = call("capsules.create", lambda: cap(client.capsules.create(template="minimal", timeout_sec=0)))
        if c:
            cid = c["id"]
            created.append(cid)
            deadline = time.monotonic() + 60
            while client.capsules.get(cid).status.value != "running" and time.monotonic() < deadline:
                time.sleep(0.1)
            call("capsules.get", lambda: cap(client.capsules.get(cid)))
            call("capsules.list", lambda: [cap(m) for m in client.capsules.list()])
            call("capsules.ping", lambda: client.capsules.ping(cid))
            call("capsules.get.after_ping", lambda: client.capsules.get(cid).last_active_at is not None)
            call("capsules.pause", lambda: cap(client.capsules.pause(cid)))
            call("capsules.resume", lambda: cap(client.capsules.resume(cid)))
            deadline = time.monotonic() + 60
            while client.capsules.get(cid).status.value != "running" and time.monotonic() < deadline:
                time.sleep(0.1)
            call("capsules.destroy", lambda: client.capsules.destroy(cid))
            call("capsules.get.after_destroy", lambda: cap(client.capsules.get(cid)))
        call("capsules.get.unknown", lambda: client.capsules.get("cl-" + "0" * 25))

        # ---- Capsule ----
        box = call("Capsule.wait", lambda: Capsule(template="minimal", wait=True))
        if box is not None:
            results["Capsule.wait"]["value"] = {"id": box.capsule_id, "status": box.info.status.value}
            created.append(box.capsule_id)
            call("Capsule.get_info", lambda: cap(box.get_info()))
            call("Capsule.get_info.static", lambda: cap(Capsule.get_info(box.capsule_id)))
            call("Capsule.is_running", lambda: box.is_running())
            call("Capsule.list", lambda: [m.id for m in Capsule.list()])

            def run(cmd, **kw):
                r = box.commands.run(cmd, **kw)
                return {"stdout": r.stdout, "stderr": r.stderr, "exit_code": r.exit_code,
                        "duration_ms": r.duration_ms}

            call("commands.run", lambda: run("echo hello; echo oops >&2; exit 3"))
            call("commands.run.env_cwd", lambda: run("echo $GREETING; pwd", envs={"GREETING": "hi"}, cwd="/tmp"))
            call("commands.run.binary", lambda: run(r"printf '\377ok'"))
            call("commands.run.timeout", lambda: run("sleep 20", timeout=1))

            def background():
                h = box.commands.run("sleep 300", background=True)
                tagged = box.commands.run("sleep 300", background=True, tag="sdk-tagged")
                listed = [{"pid": p.pid, "tag": p.tag, "cmd": p.cmd, "args": p.args} for p in box.commands.list()]
                box.commands.kill(h.pid)
                box.commands.kill(tagged.pid)
                time.sleep(0.5)
                after = [p.pid for p in box.commands.list()]
                return {"pid": h.pid, "tag": h.tag, "tagged": {"pid": tagged.pid, "tag": tagged.tag},
                        "listed": listed, "after_kill": after}

            call("commands.background", background)
            call("commands.kill.unknown", lambda: box.commands.kill(999999))

            f = box.files
            call("files.make_dir", lambda: (lambda e: {"name": e.name, "path": e.path, "type": str(e.type.value)})(
                f.make_dir("/tmp/pub/sub")))
            call("files.write.text", lambda: f.write("/tmp/pub/a.txt", "héllo\n"))
            call("files.write.bytes", lambda: f.write("/tmp/pub/b.bin", bytes(range(256))))
            call("files.read", lambda: f.read("/tmp/pub/a.txt"))
            call("files.read_bytes", lambda: list(f.read_bytes("/tmp/pub/b.bin")) == list(range(256)))
            call("files.list", lambda: sorted(
                [{"name": e.name, "path": e.path, "type": str(e.type.value), "size": e.size,
                  "permissions": e.permissions, "modified_at": str(e.modified_at)} for e in f.list("/tmp/pub")],
                key=lambda e: e["name"]))
            call("files.exists", lambda: [f.exists("/tmp/pub/a.txt"), f.exists("/tmp/pub/sub"),
                                          f.exists("/tmp/pub/nope"), f.exists("/nope/nope")])
            call("files.upload_stream", lambda: f.upload_stream("/tmp/pub/s.bin", iter([b"x" * 70000] * 5)))
            call("files.download_stream", lambda: len(b"".join(f.download_stream("/tmp/pub/s.bin"))))
            call("files.remove", lambda: f.remove("/tmp/pub/a.txt"))
            call("files.exists.after_remove", lambda: f.exists("/tmp/pub/a.txt"))
            call("files.read.missing", lambda: f.read("/tmp/pub/a.txt"))

            # ---- snapshots ----
            name = "pub-" + secrets.token_hex(4)
            results["snapshot_name"] = name

            def tpl(t):
                return {"name": t.name, "type": str(t.type.value) if t.type else None, "vcpus": t.vcpus,
                        "memory_mb": t.memory_mb, "size_bytes": t.size_bytes}

            call("snapshots.create", lambda: tpl(client.snapshots.create(capsule_id=box.capsule_id, name=name)))
            call("snapshots.create.taken", lambda: tpl(client.snapshots.create(box.capsule_id, name=name)))
            call("snapshots.create.overwrite",
                 lambda: tpl(client.snapshots.create(box.capsule_id, name=name, overwrite=True)))
            call("snapshots.list", lambda: [tpl(t) for t in client.snapshots.list()])
            call("snapshots.list.base", lambda: [tpl(t) for t in client.snapshots.list(type="base")])
            call("Capsule.get_info.after_snapshot", lambda: cap(box.get_info()))

            def from_template():
                with Capsule(template=name, wait=True) as clone:
                    created.append(clone.capsule_id)
                    same = clone.files.read_bytes("/tmp/pub/b.bin") == bytes(range(256))
                    return {"info": cap(clone.get_info()), "file": same}

            call("Capsule.from_snapshot", from_template)
            call("Capsule.create_snapshot", lambda: tpl(box.create_snapshot()))
            call("snapshots.delete", lambda: client.snapshots.delete(name))
            call("snapshots.delete.again", lambda: client.snapshots.delete(name))
            call("snapshots.delete.builtin", lambda: client.snapshots.delete("minimal"))
            call("snapshots.create.reserved", lambda: client.snapshots.create(box.capsule_id, name="minimal"))
            if results["Capsule.create_snapshot"]["ok"]:
                client.snapshots.delete(results["Capsule.create_snapshot"]["value"]["name"])

            # ---- Capsule lifecycle: connect resumes a paused capsule ----
            call("Capsule.connect", lambda: (lambda c2: {"status": c2.info.status.value, "running": c2.is_running()})(
                Capsule.connect(box.capsule_id)))
            call("Capsule.pause", lambda: cap(box.pause()))
            call("Capsule.resume.wait", lambda: cap(box.resume(wait=True)))
            call("Capsule.ping", lambda: box.ping())
            call("Capsule.destroy.wait", lambda: box.destroy(wait=True))
            call("Capsule.get_info.after_destroy", lambda: cap(Capsule.get_info(box.capsule_id)))
            box._client.close()

        # ---- context manager ----
        def context():
            with Capsule(wait=True) as c3:
                created.append(c3.capsule_id)
                out = c3.commands.run("echo ctx").stdout
            return {"stdout": out, "status": client.capsules.get(c3.capsule_id).status.value}

        call("Capsule.context_manager", context)

        # ---- errors ----
        call("errors.validation", lambda: client.capsules.create(vcpus=0))
        call("errors.auth", lambda: WrennClient(api_key="wrn_" + "0" * 32).capsules.list())

        # ---- beyond the main calls: observability and events ----
        call("capsules.stats", lambda: client.capsules.stats().model_dump(mode="json"))
        call("capsules.stats.ranges", lambda: [client.capsules.stats(range=r).range.value
                                               for r in ("5m", "1h", "6h", "24h", "30d")])
        call("capsules.metrics", lambda: client.capsules.metrics(results["capsules.create"]["value"]["id"])
             .model_dump(mode="json"))
        call("capsules.metrics.ranges", lambda: [
            client.capsules.metrics(results["capsules.create"]["value"]["id"], range=r).range.value
            for r in ("5m", "10m", "1h", "2h", "6h", "12h", "24h")])
        call("capsules.usage", lambda: client.capsules.usage().model_dump(mode="json", by_alias=True))
        call("capsules.usage.dates", lambda: client.capsules.usage(
            from_=datetime.date(2025, 3, 1), to="2025-03-02").model_dump(mode="json", by_alias=True))
        call("capsules.stats.invalid", lambda: client.capsules.stats(range="2h"))

        def events():
            got, errors, target = [], [], {}

            def reader():
                try:
                    for ev in client.events.stream():
                        got.append(ev.model_dump(mode="json"))
                        if ev.resource and ev.resource.id == target.get("id") and ev.event == "capsule.destroy":
                            return
                except BaseException as exc:  # noqa: BLE001
                    errors.append(f"{type(exc).__name__}: {exc}"[:800])

            t = threading.Thread(target=reader, daemon=True)
            t.start()
            time.sleep(1)
            tmp = client.capsules.create()
            target["id"] = tmp.id
            created.append(tmp.id)
            deadline = time.monotonic() + 60
            while client.capsules.get(tmp.id).status.value != "running" and time.monotonic() < deadline:
                time.sleep(0.1)
            client.capsules.destroy(tmp.id)
            t.join(20)
            if errors:
                raise RuntimeError(errors[0])
            return {"id": tmp.id, "events": got}

        call("events.stream", events)

    async def async_calls():
        async with AsyncWrennClient() as aclient:
            m = await aclient.capsules.create(template="minimal")
            created.append(m.id)
            for _ in range(600):
                if (await aclient.capsules.get(m.id)).status.value == "running":
                    break
                await asyncio.sleep(0.1)
            listed = [x.id for x in await aclient.capsules.list()]
            stats = await aclient.capsules.stats(range="5m")
            usage = await aclient.capsules.usage()
            metrics = await aclient.capsules.metrics(m.id, range="10m")
            async for first in aclient.events.stream():
                break
            paused = (await aclient.capsules.pause(m.id)).status.value
            await aclient.capsules.resume(m.id)
            await aclient.capsules.destroy(m.id)
            return {"id": m.id, "listed": m.id in listed, "paused": paused,
                    "final": (await aclient.capsules.get(m.id)).status.value,
                    "templates": [t.name for t in await aclient.snapshots.list()],
                    "stats_running": stats.current.running_count, "usage_days": len(usage.points),
                    "metrics_id": metrics.sandbox_id, "first_event": first.event.value}

    call("AsyncWrennClient", lambda: asyncio.run(async_calls()))

    # Whatever the outcome, leave nothing running.
    with WrennClient() as client:
        for cid in created:
            try:
                client.capsules.destroy(cid)
            except Exception:
                pass
    results["created"] = created
    print("RESULTS " + json.dumps(results, default=str))
''')


def _python313() -> Path | None:
    for candidate in PYTHON313:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def published_sdk_python() -> Path:
    """The interpreter of a venv holding wrenn==0.3.0 (made once, then reused)."""
    py313 = _python313()
    if py313 is None:
        pytest.skip("Python 3.13 is not installed (the published wrenn SDK needs >= 3.13)")
    python = CACHE / "bin" / "python"

    def installed() -> bool:
        if not python.is_file():
            return False
        # Without PYTHONPATH: a test run pointed at this repository's src must not import our wrenn.
        clean = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        probe = subprocess.run([str(python), "-c", "import wrenn; print(wrenn.__version__)"],
                               capture_output=True, text=True, env=clean)
        return probe.returncode == 0 and probe.stdout.strip() == SDK_VERSION

    if not installed():
        shutil.rmtree(CACHE, ignore_errors=True)
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(py313), "-m", "venv", str(CACHE)], check=True)
        pip = subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"wrenn=={SDK_VERSION}"],
                             capture_output=True, text=True, timeout=600)
        assert pip.returncode == 0, pip.stderr[-3000:]
        assert installed()
    return python


@pytest.fixture(scope="module")
def results(published_sdk_python: Path, wrenn_server, tmp_path_factory) -> Iterator[dict[str, Any]]:
    script = tmp_path_factory.mktemp("published-sdk") / "exercise.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WRENN_", "PYTHON"))}
    env.update(WRENN_API_KEY=wrenn_server.api_key, WRENN_BASE_URL=wrenn_server.base_url)
    proc = subprocess.run([str(published_sdk_python), str(script)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=script.parent)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")), None)
    assert line is not None, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    out = json.loads(line[len("RESULTS "):])
    yield out
    for cid in out.get("created", []):
        assert qemu_pids(cid) == [], f"QEMU left for {cid}"


def ok(results: dict[str, Any], name: str) -> Any:
    r = results[name]
    assert r["ok"], f"{name} failed: {r['error']}\n{r.get('trace', '')}"
    return r["value"]


def failed(results: dict[str, Any], name: str, exc_type: str, code: str | None = None,
           status: int | None = None) -> str:
    r = results[name]
    assert not r["ok"], f"{name} should have raised {exc_type}, returned {r['value']!r}"
    assert r["error"].startswith(exc_type + ":"), r["error"]
    if code is not None:
        assert (r["code"], r["status_code"]) == (code, status), r
    return r["error"]


def test_published_sdk_is_the_expected_version(results: dict[str, Any]) -> None:
    assert results["sdk_version"] == SDK_VERSION


def test_client_capsules(results: dict[str, Any]) -> None:
    created = ok(results, "capsules.create")
    assert created["id"].startswith("cl-") and created["status"] in ("running", "starting")
    assert (created["template"], created["vcpus"], created["memory_mb"], created["timeout_sec"]) == (
        "minimal", 1, 512, 0)
    got = ok(results, "capsules.get")
    assert got["id"] == created["id"] and got["status"] == "running" and got["started_at"]
    assert created["id"] in [c["id"] for c in ok(results, "capsules.list")]
    assert ok(results, "capsules.ping") is None
    assert ok(results, "capsules.get.after_ping") is True
    assert ok(results, "capsules.pause")["status"] == "paused"
    assert ok(results, "capsules.resume")["status"] in ("resuming", "running")
    assert ok(results, "capsules.destroy") is None
    assert ok(results, "capsules.get.after_destroy")["status"] == "stopped"
    failed(results, "capsules.get.unknown", "WrennNotFoundError")


def test_capsule_class(results: dict[str, Any]) -> None:
    box = ok(results, "Capsule.wait")
    assert box["status"] == "running"
    assert ok(results, "Capsule.get_info")["id"] == box["id"]
    assert ok(results, "Capsule.get_info.static")["status"] == "running"
    assert ok(results, "Capsule.is_running") is True
    assert box["id"] in ok(results, "Capsule.list")
    assert ok(results, "Capsule.connect") == {"status": "running", "running": True}
    assert ok(results, "Capsule.pause")["status"] == "paused"
    assert ok(results, "Capsule.resume.wait")["status"] == "running"
    assert ok(results, "Capsule.ping") is None
    assert ok(results, "Capsule.destroy.wait") is None
    assert ok(results, "Capsule.get_info.after_destroy")["status"] == "stopped"
    assert ok(results, "Capsule.context_manager") == {"stdout": "ctx\n", "status": "stopped"}


def test_commands(results: dict[str, Any]) -> None:
    r = ok(results, "commands.run")
    assert (r["stdout"], r["stderr"], r["exit_code"]) == ("hello\n", "oops\n", 3)
    assert isinstance(r["duration_ms"], int)
    assert ok(results, "commands.run.env_cwd")["stdout"] == "hi\n/tmp\n"
    assert ok(results, "commands.run.binary")["stdout"].endswith("ok")  # base64 decoded by the SDK
    assert ok(results, "commands.run.timeout")["exit_code"] != 0
    bg = ok(results, "commands.background")
    assert bg["pid"] > 0 and bg["tag"]
    assert bg["tagged"]["tag"] == "sdk-tagged"
    listed = {p["pid"]: p for p in bg["listed"]}
    assert {bg["pid"], bg["tagged"]["pid"]} <= set(listed)
    assert listed[bg["tagged"]["pid"]]["tag"] == "sdk-tagged"
    assert listed[bg["pid"]]["cmd"] == "/bin/sh" and listed[bg["pid"]]["args"] == ["-c", "sleep 300"]
    failed(results, "commands.kill.unknown", "WrennNotFoundError")


def test_commands_list_after_kill(results: dict[str, Any]) -> None:
    """The published SDK's `commands.list()` is documented as "running background processes"; it
    has no `running` field, so a killed process that is still listed looks alive to its users."""
    bg = ok(results, "commands.background")
    assert not {bg["pid"], bg["tagged"]["pid"]} & set(bg["after_kill"]), bg


def test_files(results: dict[str, Any]) -> None:
    assert ok(results, "files.make_dir") == {"name": "sub", "path": "/tmp/pub/sub", "type": "directory"}
    assert ok(results, "files.write.text") is None and ok(results, "files.write.bytes") is None
    assert ok(results, "files.read") == "héllo\n"
    assert ok(results, "files.read_bytes") is True
    entries = {e["name"]: e for e in ok(results, "files.list")}
    assert set(entries) == {"a.txt", "b.bin", "sub"}
    assert entries["b.bin"]["size"] == 256 and entries["b.bin"]["type"] == "file"
    assert entries["sub"]["type"] == "directory" and entries["a.txt"]["path"] == "/tmp/pub/a.txt"
    assert ok(results, "files.exists") == [True, True, False, False]
    assert ok(results, "files.upload_stream") is None
    assert ok(results, "files.download_stream") == 350000
    assert ok(results, "files.remove") is None
    assert ok(results, "files.exists.after_remove") is False
    failed(results, "files.read.missing", "WrennNotFoundError")


def test_snapshots(results: dict[str, Any]) -> None:
    name = results["snapshot_name"]
    t = ok(results, "snapshots.create")
    assert (t["name"], t["type"], t["vcpus"], t["memory_mb"]) == (name, "snapshot", 1, 512)
    assert t["size_bytes"] > 0
    # The published SDK maps only the generic codes to classes: the 409 codes the API documents for
    # snapshots (template_name_taken, name_reserved) reach its users as a plain WrennError.
    failed(results, "snapshots.create.taken", "WrennError", "template_name_taken", 409)
    assert ok(results, "snapshots.create.overwrite")["name"] == name
    listed = {x["name"]: x for x in ok(results, "snapshots.list")}
    assert {"minimal", "base-python", name} <= set(listed)
    assert {x["type"] for x in ok(results, "snapshots.list.base")} == {"base"}
    assert ok(results, "Capsule.get_info.after_snapshot")["status"] == "paused"
    clone = ok(results, "Capsule.from_snapshot")
    assert clone["info"]["template"] == name and clone["info"]["status"] == "running" and clone["file"] is True
    assert ok(results, "Capsule.create_snapshot")["name"].startswith("template-")
    assert ok(results, "snapshots.delete") is None
    failed(results, "snapshots.delete.again", "WrennNotFoundError")
    failed(results, "snapshots.delete.builtin", "WrennForbiddenError", "forbidden", 403)
    failed(results, "snapshots.create.reserved", "WrennError", "name_reserved", 409)


def test_errors(results: dict[str, Any]) -> None:
    failed(results, "errors.validation", "WrennValidationError", "invalid_request", 400)
    failed(results, "errors.auth", "WrennAuthenticationError", "unauthorized", 401)


def test_async_client(results: dict[str, Any]) -> None:
    r = ok(results, "AsyncWrennClient")
    assert r["listed"] is True and r["paused"] == "paused" and r["final"] == "stopped"
    assert {"minimal", "base-python"} <= set(r["templates"])
    assert r["stats_running"] >= 1 and r["usage_days"] == 31 and r["metrics_id"] == r["id"]
    assert r["first_event"] == "connected"


def test_event_stream(results: dict[str, Any]) -> None:
    """Every event parses with the published SDK's SSEEvent (it rejects unknown kinds)."""
    r = ok(results, "events.stream")
    cid, events = r["id"], r["events"]
    assert events[0]["event"] == "connected"
    mine = [e for e in events if (e.get("resource") or {}).get("id") == cid]
    labels = ["->" + e["metadata"]["to"] if e["event"] == "capsule.state.changed" else f"{e['event']}:{e['outcome']}"
              for e in mine]
    assert labels == ["->pending", "->starting", "->running", "capsule.create:success",
                      "->stopping", "->stopped", "capsule.destroy:success"], labels
    assert all(e["sandbox"]["id"] == cid and e["resource"]["type"] == "capsule" for e in mine)
    assert mine[3]["sandbox"]["status"] == "running" and mine[-1]["sandbox"]["status"] == "stopped"
    assert mine[1]["metadata"] == {"from": "pending", "to": "starting"}
    assert all(e["actor"]["type"] == "api_key" and e["timestamp"] for e in mine)


def test_observability(results: dict[str, Any]) -> None:
    stats = ok(results, "capsules.stats")
    assert stats["range"] == "1h"
    assert set(stats["current"]) == {"running_count", "vcpus_reserved", "memory_mb_reserved"}  # the SDK's model
    assert stats["peaks"]["running_count"] >= 1  # capsules ran during this script
    assert len(stats["series"]["labels"]) == len(stats["series"]["running"]) == 60
    assert ok(results, "capsules.stats.ranges") == ["5m", "1h", "6h", "24h", "30d"]
    failed(results, "capsules.stats.invalid", "WrennValidationError", "invalid_request", 400)

    created = ok(results, "capsules.create")
    m = ok(results, "capsules.metrics")
    assert m["sandbox_id"] == created["id"] and m["range"] == "10m" and isinstance(m["points"], list)
    assert ok(results, "capsules.metrics.ranges") == ["5m", "10m", "1h", "2h", "6h", "12h", "24h"]

    usage = ok(results, "capsules.usage")
    assert len(usage["points"]) == 31 and usage["to"] == usage["points"][-1]["date"]
    assert sum(p["cpu_minutes"] for p in usage["points"]) > 0
    assert sum(p["ram_mb_minutes"] for p in usage["points"]) > 0
    dates = ok(results, "capsules.usage.dates")
    assert (dates["from"], dates["to"]) == ("2025-03-01", "2025-03-02")
    assert [p["date"] for p in dates["points"]] == ["2025-03-01", "2025-03-02"]
