"""A server restart with capsules running and paused: they carry on as if nothing happened."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator

import pytest

from tests.conftest import qemu_pids
from tests.e2e.test_api_capsules import Api

pytestmark = pytest.mark.vm


@pytest.fixture
def api(wrenn_server) -> Iterator[Api]:
    a = Api(wrenn_server)
    names: list[str] = []
    a.snapshot_names = names  # type: ignore[attr-defined]
    yield a
    if wrenn_server.proc is None or wrenn_server.proc.poll() is not None:
        wrenn_server.start()  # a failed test must not leave the session without its server
    a.http.close()
    a.http = wrenn_server.client()
    for name in names:
        a.delete(f"/v1/snapshots/{name}")
    a.cleanup()


def test_restart_keeps_running_and_paused_capsules(api: Api, wrenn_server) -> None:
    # A running capsule with state on disk, in RAM and in a process.
    running = api.running()["id"]
    api.sh(running, "echo disk > /tmp/r; echo ram > /dev/shm/r")
    bg = api.post(f"/v1/capsules/{running}/exec", json={
        "cmd": "/bin/sh", "args": ["-c", "n=0; while true; do n=$((n+1)); echo $n > /dev/shm/n; sleep 0.2; done"],
        "background": True, "tag": "counter"})
    assert bg.status_code == 202, bg.text
    pid = bg.json()["pid"]
    # A paused one.
    paused = api.running()["id"]
    api.sh(paused, "echo paused-ram > /dev/shm/p")
    assert api.post(f"/v1/capsules/{paused}/pause").status_code == 200
    # A snapshot template, and a destroyed capsule.
    source = api.running()["id"]
    api.sh(source, "echo from-template > /root/t")
    name = f"restart-{secrets.token_hex(4)}"
    assert api.post("/v1/snapshots", json={"sandbox_id": source, "name": name}).status_code == 201
    api.snapshot_names.append(name)  # type: ignore[attr-defined]
    gone = api.running()["id"]
    api.destroy(gone)
    before = {c["id"]: c for c in api.get("/v1/capsules").json()}

    api.http.close()
    wrenn_server.stop()
    # The server is gone; the running VM is not.
    assert wrenn_server.proc.poll() is not None
    assert len(qemu_pids(running)) == 1
    assert qemu_pids(paused) == [] and qemu_pids(source) == []
    log_offset = wrenn_server.log.stat().st_size
    wrenn_server.start()
    api.http = wrenn_server.client()

    after = {c["id"]: c for c in api.get("/v1/capsules").json()}
    assert set(after) == set(before)
    for cid in (running, paused, source, gone):
        assert after[cid]["status"] == before[cid]["status"], (cid, before[cid], after[cid])
        assert after[cid]["created_at"] == before[cid]["created_at"]
    assert after[running]["started_at"] == before[running]["started_at"]
    assert [c for c in after.values() if c["status"] == "error"] == []

    # The running capsule answers, with its state and its process intact.
    n1 = int(api.sh(running, "cat /dev/shm/n")["stdout"])
    assert api.sh(running, "cat /tmp/r /dev/shm/r")["stdout"] == "disk\nram\n"
    procs = {p["tag"]: p for p in api.get(f"/v1/capsules/{running}/processes").json()["processes"]}
    assert procs["counter"]["pid"] == pid and procs["counter"].get("running", True)
    assert int(api.sh(running, "sleep 0.5; cat /dev/shm/n")["stdout"]) > n1
    # Files API and pause/resume too.
    assert api.post(f"/v1/capsules/{running}/files/read", json={"path": "/tmp/r"}).content == b"disk\n"
    assert api.post(f"/v1/capsules/{running}/pause").json()["status"] == "paused"
    assert api.post(f"/v1/capsules/{running}/resume").status_code == 200
    api.wait(running)
    assert api.sh(running, "cat /dev/shm/r")["stdout"] == "ram\n"

    # The paused one resumes with its memory.
    assert api.post(f"/v1/capsules/{paused}/resume").status_code == 200
    api.wait(paused)
    assert api.sh(paused, "cat /dev/shm/p")["stdout"] == "paused-ram\n"

    # Templates still work: built-in and the team's snapshot.
    clone = api.running(template=name)
    assert api.sh(clone["id"], "cat /root/t")["stdout"] == "from-template\n"
    fresh = api.running()
    assert api.sh(fresh["id"], "echo ok")["stdout"] == "ok\n"

    # Nothing reported wrong.
    health = api.get("/health").json()
    assert health["status"] == "ok"
    log = wrenn_server.log.read_bytes()[log_offset:].decode(errors="replace")
    assert not re.search(r"Traceback|ERROR|WARNING|not found on the host|could not be recovered", log), log[-3000:]
    for cid in (running, paused, source, clone["id"], fresh["id"]):
        api.destroy(cid)
        assert qemu_pids(cid) == []
