"""Host agent runtime benchmark: create, exec round trip, pause/resume, density, networking.

Prints: create->exec-ready from template (p50/p95), pause and resume times, state file size,
exec round trips (guest ping, `true`), RSS per idle capsule, and how many idle 512 MiB capsules
fit in this host's memory (measured on --density capsules, extrapolated to MemTotal).
Networking (root only): create latency with and without a NIC, measured alternately in the same
run, NIC throughput guest->host and host->guest against a test host in a namespace made here, and
inbound throughput through the guest-agent tunnel (what the port proxy uses) against the NIC.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from _stats import summary, meminfo  # noqa: E402

from wrenn_host.agent import LocalHostAgent  # noqa: E402


def new_id() -> str:
    return "cl-" + secrets.token_hex(13)[:25]


async def network_section(args: argparse.Namespace) -> None:
    """Two agents, one with networking and one without, created from alternately."""
    import os

    from tests.nethost import TestHost

    if os.geteuid() != 0:
        print("networking: skipped (needs root)")
        return
    agents = {}
    dirs = []
    try:
        for net in (True, False):
            d = Path(tempfile.mkdtemp(prefix="wrenn-bench-net-"))
            dirs.append(d)
            agent = LocalHostAgent(d, network=net)
            await agent.prepare([("minimal", 1, 512)])
            await agent.start({})
            agents[net] = agent
        assert agents[True].net.enabled, agents[True].net.reason
        from wrenn_host.network import EgressPolicy

        rules = EgressPolicy.parse(False, ["198.51.100.0/24", "pypi.org"], ["198.51.100.99"])
        variants = {"with networking": (agents[True], None), "without networking": (agents[False], None),
                    "with networking + egress rules": (agents[True], rules)}
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.n):
            for name, (agent, policy) in variants.items():
                cid = new_id()
                t = time.perf_counter()
                await agent.create(cid, "minimal", None, None, network=policy)
                times[name].append((time.perf_counter() - t) * 1000)
                await agent.destroy(cid)
                await asyncio.sleep(0.5)  # between creates the pools refill, as in steady use
        for name, values in times.items():
            print(summary(f"create, {name}", values))
        p50 = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        print(f"{'create with/without networking':<34} {p50['with networking'] / p50['without networking']:.2f}x (p50)")

        agent = agents[True]
        cid = new_id()
        await agent.create(cid, "minimal", None, None)
        mib = args.net_mib
        with TestHost("198.51.100.10"):
            await agent.exec(cid, "/bin/sh", ["-c", f"head -c {mib}M /dev/urandom > /tmp/blob"], timeout_sec=60)
            for label, script in (
                ("NIC guest -> host (upload)", f"curl -s -o /dev/null -w '%{{speed_upload}}' "
                                                f"--data-binary @/tmp/blob http://198.51.100.10/sink"),
                ("NIC host -> guest (download)", f"curl -s -o /dev/null -w '%{{speed_download}}' "
                                                  f"http://198.51.100.10/bytes/{mib * 2**20}"),
            ):
                res = await agent.exec(cid, "/bin/sh", ["-c", script], timeout_sec=300)
                rate = float(res.stdout.decode() or 0) / 2**20
                print(f"{label:<34} {rate:.2f} MiB/s ({mib} MiB, curl in the guest, test host in a netns)")
            # Inbound, as the port proxy would carry it: guest-agent tunnel against the NIC.
            await agent.spawn(cid, "/bin/sh", ["-c", "cd /tmp && exec python3 -m http.server 8000"])
            await asyncio.sleep(1.5)
            req = b"GET /blob HTTP/1.0\r\n\r\n"
            for label, connect in (
                    ("inbound via guest-agent tunnel", lambda: agent._guest(cid).open_tunnel("tcp_connect", port=8000)),
                    ("inbound via the NIC (port proxy)", lambda: agent.tcp_connect(cid, 8000))):
                rates, opens = [], []
                for _ in range(3):
                    t = time.perf_counter()
                    tunnel = await connect()
                    opens.append((time.perf_counter() - t) * 1000)
                    got = 0
                    await tunnel.write(req)
                    while chunk := await tunnel.read():
                        got += len(chunk)
                    await tunnel.close()
                    rates.append(got / 2**20 / (time.perf_counter() - t))
                print(f"{label:<34} {sorted(rates)[1]:.2f} MiB/s (median of 3, {mib} MiB), "
                      f"connect {sorted(opens)[1]:.2f} ms")
        await agent.destroy(cid)
    finally:
        for agent in agents.values():
            await agent.close()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


async def main(args: argparse.Namespace) -> None:
    if args.network_only:
        await network_section(args)
        return
    data = Path(tempfile.mkdtemp(prefix="wrenn-bench-"))
    agent = LocalHostAgent(data)
    await agent.prepare([("minimal", 1, 512)])
    await agent.start({})
    print(f"accelerator: {agent.accel}")
    ids: list[str] = []
    try:
        # create -> exec-ready (create returns once the guest agent has answered)
        create_ms, first_exec_ms = [], []
        for _ in range(args.n):
            cid = new_id()
            t = time.perf_counter()
            await agent.create(cid, "minimal", None, None)
            create_ms.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            await agent.exec(cid, "/bin/true", [])
            first_exec_ms.append((time.perf_counter() - t) * 1000)
            ids.append(cid)
        print(summary("create -> exec-ready", create_ms))
        print(summary("first exec of /bin/true", first_exec_ms))

        cid = ids[0]
        guest = agent._guest(cid)
        for _ in range(20):
            await guest.call("ping")
        ping = []
        for _ in range(300):
            t = time.perf_counter()
            await guest.call("ping")
            ping.append((time.perf_counter() - t) * 1000)
        print(summary("host agent -> guest round trip", ping))
        ex = []
        for _ in range(30):
            t = time.perf_counter()
            await agent.exec(cid, "/bin/true", [])
            ex.append((time.perf_counter() - t) * 1000)
        print(summary("exec /bin/true (warm)", ex))

        # pause / resume a 512 MiB capsule with 64 MiB touched
        await agent.exec(cid, "/bin/sh", ["-c", "head -c 64M /dev/urandom > /dev/shm/touched"], timeout_sec=120)
        pause_ms, resume_ms, resume_exec_ms, state_sizes = [], [], [], []
        for _ in range(args.cycles):
            t = time.perf_counter()
            await agent.pause(cid)
            pause_ms.append((time.perf_counter() - t) * 1000)
            state_sizes.append(agent.paths.capsule_state(cid).stat().st_size)
            t = time.perf_counter()
            await agent.resume(cid)
            resume_ms.append((time.perf_counter() - t) * 1000)
            await agent.exec(cid, "/bin/true", [])
            resume_exec_ms.append((time.perf_counter() - t) * 1000)
        print(summary("pause (512 MiB, 64 MiB touched)", pause_ms))
        print(summary("resume -> agent answering", resume_ms))
        print(summary("resume -> first exec done", resume_exec_ms))
        print(f"{'state file size':<34} {max(state_sizes) / 1024:.0f} KiB (memory stays in the memory file)")

        # density: idle capsules' cost in host memory
        for extra in ids[1:]:
            await agent.destroy(extra)
        ids = ids[:1]
        await asyncio.sleep(2)
        before = meminfo()
        batch = []
        for _ in range(args.density):
            c = new_id()
            await agent.create(c, "minimal", None, None)
            batch.append(c)
        ids += batch
        await asyncio.sleep(5)  # let them go idle
        after = meminfo()
        rss = [agent.rss_bytes(c) for c in batch]
        used = (before["MemAvailable"] - after["MemAvailable"]) / len(batch)
        print(f"{'RSS per idle capsule':<34} p50={sorted(rss)[len(rss) // 2] / 2**20:.1f} MiB "
              f"(QEMU RSS, incl. mapped guest pages)")
        print(f"{'host memory per idle capsule':<34} {used / 2**20:.1f} MiB (MemAvailable drop / {len(batch)})")
        rss_p50 = sorted(rss)[len(rss) // 2]
        # Conservative: every capsule's whole RSS stays resident (its guest pages are file-backed
        # and could be written back under pressure, which MemAvailable counts as reclaimable).
        print(f"{'idle 512 MiB capsules that fit':<34} ~{int(after['MemTotal'] * 0.9 / rss_p50)} by RSS, "
              f"~{int(after['MemTotal'] * 0.9 / max(used, 1))} by MemAvailable, in "
              f"{after['MemTotal'] / 2**30:.1f} GiB (extrapolated from {len(batch)})")
    finally:
        for c in ids:
            await agent.destroy(c)
        await agent.close()
        shutil.rmtree(data, ignore_errors=True)
    await network_section(args)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("-n", type=int, default=20, help="capsules to create for the create latency")
    p.add_argument("--cycles", type=int, default=10, help="pause/resume cycles")
    p.add_argument("--density", type=int, default=20, help="idle capsules for the memory figure")
    p.add_argument("--net-mib", type=int, default=8, help="MiB moved for the NIC throughput figures")
    p.add_argument("--network-only", action="store_true", help="only the networking section")
    asyncio.run(main(p.parse_args()))
