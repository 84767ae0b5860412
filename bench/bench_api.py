"""REST API benchmark: what a client of the control plane sees, end to end.

Starts its own `wrenn server` on a free port with a temporary data directory (the image and
template caches are reused), then prints:
- create -> running: POST /v1/capsules, then poll GET every --poll ms until `running`;
- exec round trip: POST /exec of `true` (and of `/bin/sh -c true`, what the SDKs send);
- GET of one capsule and ping, for the cost of the API itself;
- pause and resume through the API, and resume -> first exec answered.
Every capsule it made is destroyed and the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT))
from _stats import summary  # noqa: E402

from tests.conftest import ServerHandle, _free_port, kill_qemus, qemu_pids  # noqa: E402


def start_server(data_dir: Path | None = None) -> ServerHandle:
    """A server on a temporary data directory, or on `data_dir` (kept: see stop_server)."""
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
    data_dir = data_dir or Path(tempfile.mkdtemp(prefix="wrenn-bench-api-"))
    port = _free_port()
    server = ServerHandle(f"http://127.0.0.1:{port}/api", "wrn_" + secrets.token_hex(16), data_dir, port)
    t = time.perf_counter()
    server.start()
    print(f"server up in {time.perf_counter() - t:.2f} s (port {port}, data {data_dir})")
    return server


def stop_server(server: ServerHandle, capsule_ids: list[str], keep: bool = False) -> None:
    """Stop the server, say if any destroyed capsule left a QEMU behind, remove its data (unless `keep`)."""
    server.stop()
    left = [cid for cid in capsule_ids if qemu_pids(cid)]
    kill_qemus(server.data_dir)
    if not keep:
        shutil.rmtree(server.data_dir, ignore_errors=True)
    if left:
        print(f"warning: QEMU was left for {left} (killed)")


def ms_since(t: float) -> float:
    return (time.perf_counter() - t) * 1000


def main(args: argparse.Namespace) -> None:
    server = start_server()
    created: list[str] = []
    http = server.client()
    try:
        health = http.get("/health").json()
        print(f"accelerator: {health.get('accelerator')}; {health.get('vmm')}")

        def wait_running(cid: str, poll: float) -> None:
            while (status := http.get(f"/v1/capsules/{cid}").json()["status"]) != "running":
                if status in ("error", "stopped"):
                    raise RuntimeError(f"{cid} went {status}")
                time.sleep(poll)

        # create -> running (sequential, one capsule at a time)
        post_ms, running_ms = [], []
        for _ in range(args.n):
            t = time.perf_counter()
            resp = http.post("/v1/capsules", json={})
            post_ms.append(ms_since(t))
            resp.raise_for_status()
            cid = resp.json()["id"]
            created.append(cid)
            wait_running(cid, args.poll / 1000)
            running_ms.append(ms_since(t))
        print(summary("POST /capsules (answer)", post_ms))
        print(summary("create -> running (POST + poll)", running_ms))

        # Keep one capsule; the others go (destroy time measured on the way).
        cid = created[0]
        destroy_ms = []
        for other in created[1:]:
            t = time.perf_counter()
            http.delete(f"/v1/capsules/{other}").raise_for_status()
            destroy_ms.append(ms_since(t))
        print(summary("DELETE /capsules/{id}", destroy_ms))

        def timed(n: int, fn) -> list[float]:
            out = []
            for _ in range(n):
                t = time.perf_counter()
                fn()
                out.append(ms_since(t))
            return out

        def exec_true() -> None:
            r = http.post(f"/v1/capsules/{cid}/exec", json={"cmd": "true"})
            assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text

        def exec_sh_true() -> None:
            r = http.post(f"/v1/capsules/{cid}/exec", json={"cmd": "/bin/sh", "args": ["-c", "true"]})
            assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text

        timed(5, exec_true)  # warm up
        print(summary("GET /capsules/{id}", timed(args.m, lambda: http.get(f"/v1/capsules/{cid}").raise_for_status())))
        print(summary("POST /ping", timed(args.m, lambda: http.post(f"/v1/capsules/{cid}/ping").raise_for_status())))
        print(summary("exec `true` round trip", timed(args.m, exec_true)))
        print(summary("exec `/bin/sh -c true` round trip", timed(args.m, exec_sh_true)))

        # pause / resume through the API (64 MiB of guest memory touched first)
        http.post(f"/v1/capsules/{cid}/exec", json={
            "cmd": "/bin/sh", "args": ["-c", "head -c 64M /dev/urandom > /dev/shm/touched"], "timeout_sec": 120,
        }).raise_for_status()
        pause_ms, resume_ms, resume_exec_ms = [], [], []
        for _ in range(args.cycles):
            t = time.perf_counter()
            r = http.post(f"/v1/capsules/{cid}/pause")
            pause_ms.append(ms_since(t))
            assert r.status_code == 200 and r.json()["status"] == "paused", r.text
            t = time.perf_counter()
            r = http.post(f"/v1/capsules/{cid}/resume")
            resume_ms.append(ms_since(t))
            assert r.status_code == 200, r.text
            if r.json()["status"] != "running":
                wait_running(cid, args.poll / 1000)
            exec_true()
            resume_exec_ms.append(ms_since(t))
        print(summary("POST /pause", pause_ms))
        print(summary("POST /resume", resume_ms))
        print(summary("resume -> first exec answered", resume_exec_ms))
    finally:
        for cid in created:
            try:
                http.delete(f"/v1/capsules/{cid}")
            except Exception:  # noqa: BLE001 - cleanup goes on
                pass
        http.close()
        stop_server(server, created)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=15, help="capsules to create (create -> running)")
    parser.add_argument("-m", type=int, default=50, help="exec / GET / ping round trips")
    parser.add_argument("--cycles", type=int, default=10, help="pause/resume cycles")
    parser.add_argument("--poll", type=float, default=10, help="GET poll interval while waiting, ms")
    main(parser.parse_args())
