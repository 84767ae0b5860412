"""`kill -9` of `wrenn server` in the middle of a pause and of a resume, at every step of each
(the steps are the real points of QemuMachine.save/restore, see wrenn_host/durable.py), then a
restart: the capsule is `paused` or `running`, with its /tmp file and its background process.

Also: 5 capsules whose pause was cut right after their vCPUs stopped (the case that used to lose
them and cost 10 s each) are all recovered at once; the start-up time is printed."""

from __future__ import annotations

import secrets
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import ServerHandle, _free_port, kill_qemus, qemu_pids
from tests.e2e.test_api_capsules import Api
from wrenn_host.durable import PAUSE_STEPS, RESUME_STEPS

pytestmark = pytest.mark.vm

COUNTER = "n=0; while true; do n=$((n+1)); echo $n > /dev/shm/n; sleep 0.2; done"


@pytest.fixture
def server(tmp_path_factory, monkeypatch) -> Iterator[ServerHandle]:
    data_dir = tmp_path_factory.mktemp("crash")
    port = _free_port()
    handle = ServerHandle(f"http://127.0.0.1:{port}/api", "wrn_" + secrets.token_hex(16), data_dir, port)
    handle.monkeypatch = monkeypatch  # type: ignore[attr-defined]
    yield handle
    monkeypatch.delenv("WRENN_CRASH_AT", raising=False)
    monkeypatch.delenv("WRENN_HANG_AT", raising=False)
    if handle.proc is not None and handle.proc.poll() is None:
        with handle.client() as c:
            for cap in c.get("/v1/capsules").json():
                c.delete(f"/v1/capsules/{cap['id']}")
    handle.stop()
    kill_qemus(data_dir)


def restart(server: ServerHandle, **env: str) -> float:
    """Start the server with the given crash hooks; returns how long its reconcile took."""
    for name in ("WRENN_CRASH_AT", "WRENN_HANG_AT"):
        server.monkeypatch.delenv(name, raising=False)  # type: ignore[attr-defined]
    for name, value in env.items():
        server.monkeypatch.setenv(name, value)  # type: ignore[attr-defined]
    server.start()
    return float(httpx.get(f"{server.base_url}/health").json()["reconcile_seconds"])


def killed(server: ServerHandle, timeout: float = 60) -> None:
    """The server killed itself (SIGKILL at its crash point)."""
    server.proc.wait(timeout)
    assert server.proc.returncode == -signal.SIGKILL, (server.proc.returncode, server.log.read_text()[-2000:])


def post_until_killed(api: Api, path: str) -> None:
    try:
        resp = api.post(path)
        pytest.fail(f"{path} answered {resp.status_code} instead of the server dying: {resp.text}")
    except httpx.HTTPError:
        pass


def check_alive(api: Api, cid: str, bg_pid: int) -> None:
    assert api.sh(cid, "cat /tmp/f")["stdout"] == "crash-test\n"
    procs = {p["tag"]: p for p in api.get(f"/v1/capsules/{cid}/processes").json()["processes"]}
    assert procs["counter"]["pid"] == bg_pid and procs["counter"].get("running", True), procs
    n1 = int(api.sh(cid, "cat /dev/shm/n")["stdout"])
    assert int(api.sh(cid, "sleep 0.5; cat /dev/shm/n")["stdout"]) > n1


def start_capsule(api: Api) -> tuple[str, int]:
    cid = api.running()["id"]
    api.sh(cid, "echo crash-test > /tmp/f")
    bg = api.post(f"/v1/capsules/{cid}/exec", json={"cmd": "/bin/sh", "args": ["-c", COUNTER],
                                                     "background": True, "tag": "counter"})
    assert bg.status_code == 202, bg.text
    return cid, bg.json()["pid"]


def test_kill_during_pause_and_resume_at_every_step(server: ServerHandle) -> None:
    restart(server)
    api = Api(server)
    cid, bg_pid = start_capsule(api)
    outcomes: dict[str, tuple[str, float]] = {}  # crash step -> (status after restart, reconcile s)
    prev = None
    for step in PAUSE_STEPS + RESUME_STEPS:
        op = step.split(".")[0]
        api.http.close()
        server.stop()
        seconds = restart(server, WRENN_CRASH_AT=step)
        api.http = server.client()
        status = api.get_capsule(cid)["status"]
        assert status in ("running", "paused"), (prev, status, api.get_capsule(cid))
        if prev:
            outcomes[prev] = (status, round(seconds, 3))
        # Bring it where the operation starts from (this server only dies at `step`).
        if op == "pause" and status == "paused":
            assert api.post(f"/v1/capsules/{cid}/resume").status_code == 200
        if status == "running" or op == "pause":
            check_alive(api, cid, bg_pid)
        if op == "resume" and status == "running":
            assert api.post(f"/v1/capsules/{cid}/pause").status_code == 200
        post_until_killed(api, f"/v1/capsules/{cid}/{op}")
        killed(server)
        assert len(qemu_pids(cid)) <= 1
        prev = step
    api.http.close()
    seconds = restart(server)
    api.http = server.client()
    final = api.get_capsule(cid)
    assert final["status"] in ("running", "paused"), final
    outcomes[prev] = (final["status"], round(seconds, 3))
    if final["status"] == "paused":
        assert api.post(f"/v1/capsules/{cid}/resume").status_code == 200
    check_alive(api, cid, bg_pid)
    assert [c for c in api.get("/v1/capsules").json() if c["status"] == "error"] == []
    print("\nafter a kill at each step: (status, reconcile seconds)")
    for step, outcome in outcomes.items():
        print(f"  {step:24} {outcome}")
    api.cleanup()


def test_five_capsules_stopped_mid_pause_recover_at_once(server: ServerHandle) -> None:
    restart(server, WRENN_HANG_AT="pause.stopped")
    api = Api(server)
    caps = [start_capsule(api) for _ in range(5)]
    # Five pauses that stop their vCPUs and then never go on; then the server is killed.
    threads = [threading.Thread(target=post_until_killed, args=(Api(server), f"/v1/capsules/{cid}/pause"),
                                daemon=True) for cid, _ in caps]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while server.log.read_text(errors="replace").count("hanging at pause.stopped") < 5:
        assert time.monotonic() < deadline, server.log.read_text()[-2000:]
        time.sleep(0.1)
    api.http.close()
    server.proc.send_signal(signal.SIGKILL)
    killed(server)
    assert all(len(qemu_pids(cid)) == 1 for cid, _ in caps)
    t0 = time.monotonic()
    seconds = restart(server)
    print(f"\nstart-up with 5 capsules stopped mid-pause: reconcile {seconds:.3f} s, "
          f"server start to /health {time.monotonic() - t0:.2f} s")
    api.http = server.client()
    for cid, bg_pid in caps:
        assert api.get_capsule(cid)["status"] == "paused"
        assert qemu_pids(cid) == []
        assert api.post(f"/v1/capsules/{cid}/resume").status_code == 200
        check_alive(api, cid, bg_pid)
    api.cleanup()
