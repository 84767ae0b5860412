"""One machine against a fleet, side by side in one run:

1. `wrenn server` (SQLite, in-process host agent): create -> running, and exec round trip
   (`echo ok`), `--n` times each, one capsule at a time;
2. the fleet (tests/fleet.py: PostgreSQL, three host agents each in its own network namespace,
   two control-plane replicas behind a load balancer): the same calls through its one URL, so
   every call crosses the control plane -> host agent network hop;
3. `--burst` creates (200 by default) on the fleet, `--parallel` at a time: wall time, creates
   per second, and how many landed on each host (placement counts); then destroyed.

Prints medians, p95s and the fleet / server ratio. Spare VMs are off in both so that both pay
for a real boot (restore) on each create. Run it under the VM lock:
`flock /tmp/wrenn-vm.lock python3 bench/bench_fleet.py`.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from _stats import meminfo, summary  # noqa: E402
from bench_api import start_server, stop_server  # noqa: E402

from tests.fleet import Fleet  # noqa: E402


def lifecycle(client, n: int) -> tuple[list[float], list[float], list[str]]:
    """(create -> running ms, exec round trip ms, capsule ids) for n capsules one at a time."""
    creates, execs, ids = [], [], []
    for _ in range(n):
        t = time.perf_counter()
        r = client.post("/v1/capsules", json={"template": "minimal", "timeout_sec": 0})
        r.raise_for_status()
        cap = r.json()
        while cap["status"] != "running":
            if cap["status"] in ("error", "stopped"):
                raise RuntimeError(f"create failed: {cap}")
            time.sleep(0.05)
            cap = client.get(f"/v1/capsules/{cap['id']}").json()
        creates.append((time.perf_counter() - t) * 1000)
        ids.append(cap["id"])
        for _ in range(5):
            t = time.perf_counter()
            r = client.post(f"/v1/capsules/{cap['id']}/exec", json={"cmd": "echo", "args": ["ok"]})
            r.raise_for_status()
            assert r.json()["stdout"] == "ok\n"
            execs.append((time.perf_counter() - t) * 1000)
        client.delete(f"/v1/capsules/{cap['id']}").raise_for_status()
    return creates, execs, ids


def burst(fleet: Fleet, count: int, parallel: int) -> None:
    free_before = meminfo()["MemAvailable"]

    def one(_: int) -> tuple[str, str]:
        with fleet.client(timeout=600) as c:
            r = c.post("/v1/capsules", json={"template": "minimal", "timeout_sec": 0})
            if r.status_code != 201:
                raise RuntimeError(f"create {r.status_code}: {r.text}")
            return r.json()["id"], r.json()["host_id"]

    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        results = list(pool.map(one, range(count)))
    wall = time.perf_counter() - t
    placed = collections.Counter(host for _, host in results)
    names = {n.host_id: f"host{n.index}" for n in fleet.hosts}
    used = (free_before - meminfo()["MemAvailable"]) / 2**20
    print(f"{count} creates, {parallel} at a time: wall {wall:.1f} s, {count / wall:.2f} creates/s, "
          f"host memory used {used:.0f} MiB ({used / count:.1f} MiB per capsule)")
    print("placement: " + ", ".join(f"{names.get(h, h)}={placed[h]}" for h in sorted(placed, key=str)))
    with fleet.client(timeout=600) as c:
        hosts = c.get("/v1/hosts").json()
        print("hosts report: " + ", ".join(f"{names.get(h['id'], h['id'])}: {h['capsule_count']} capsules"
                                           for h in hosts))
        t = time.perf_counter()

        def destroy(cid: str) -> None:
            with fleet.client(timeout=600) as d:
                d.delete(f"/v1/capsules/{cid}").raise_for_status()

        with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
            list(pool.map(destroy, [cid for cid, _ in results]))
        print(f"destroyed {count} in {time.perf_counter() - t:.1f} s")


def main(args: argparse.Namespace) -> None:
    import os

    os.environ["WRENN_SPARE_VMS"] = "0"
    server = start_server()
    ids: list[str] = []
    try:
        with server.client() as c:
            lifecycle(c, 1)  # warm-up: first restore of the template
            s_create, s_exec, ids = lifecycle(c, args.n)
    finally:
        stop_server(server, ids)

    t = time.perf_counter()
    # Three "hosts" share this machine's 2 cores and 24 GiB: placement's default allowance
    # (4 vCPUs per core, memory 1:1) would stop at 24 capsules; idle capsules cost little.
    # The team's default quotas (50 capsules, 100 vCPUs, 100 GiB) are raised to fit the burst.
    quota = args.burst + 20
    with Fleet(hosts=3, replicas=2, env={"WRENN_OVERCOMMIT_VCPU": str(args.overcommit_vcpu),
                                         "WRENN_OVERCOMMIT_MEMORY": str(args.overcommit_memory),
                                         "WRENN_TEAM_MAX_CAPSULES": str(quota), "WRENN_TEAM_MAX_VCPUS": str(quota),
                                         "WRENN_TEAM_MAX_MEMORY_MB": str(quota * 512)}) as fleet:
        print(f"fleet up in {time.perf_counter() - t:.1f} s (3 hosts, 2 replicas, PostgreSQL)")
        with fleet.client() as c:
            lifecycle(c, 3)  # warm-up: each host's first restore
            f_create, f_exec, _ = lifecycle(c, args.n)
        print()
        print(summary("server create -> running", s_create))
        print(summary("fleet  create -> running", f_create))
        print(f"{'':34} fleet / server p50 = {statistics.median(f_create) / statistics.median(s_create):.2f}x")
        print(summary("server exec round trip", s_exec))
        print(summary("fleet  exec round trip", f_exec))
        print(f"{'':34} fleet / server p50 = {statistics.median(f_exec) / statistics.median(s_exec):.2f}x")
        print()
        burst(fleet, args.burst, args.parallel)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10, help="capsules per side for create/exec timings")
    p.add_argument("--burst", type=int, default=200, help="creates spread over the fleet")
    p.add_argument("--parallel", type=int, default=8, help="creates in flight at once in the burst")
    p.add_argument("--overcommit-vcpu", type=float, default=100.0, help="WRENN_OVERCOMMIT_VCPU for the fleet")
    p.add_argument("--overcommit-memory", type=float, default=2.0, help="WRENN_OVERCOMMIT_MEMORY for the fleet")
    main(p.parse_args())
