"""Density: how many idle 512 MiB capsules run at once here with exec still answering in < 100 ms.

Measured, not extrapolated: creates capsules one after another through the host agent (in
process, spare VMs off unless --spares), and after every --step of them runs `/bin/true` in
--probe capsules chosen at random (each twice; the second, warm, exec is what counts, as the
first exec in a capsule pays QEMU's translation once). Stops at the first failure: a create or
exec failing, the probe median reaching --limit-ms, or the host's MemAvailable falling under
--reserve-mb (the machine is shared). Then destroys everything. Run it under the VM lock.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _stats import pct, meminfo  # noqa: E402

from wrenn_host.agent import LocalHostAgent  # noqa: E402


def proc_mem(pid: int) -> tuple[int, int]:
    """(anonymous, file-backed) resident bytes of one QEMU."""
    anon = file = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            anon = int(line.split()[1]) * 1024
        elif line.startswith(("RssFile:", "RssShmem:")):
            file += int(line.split()[1]) * 1024
    return anon, file


async def probe(agent: LocalHostAgent, ids: list[str], k: int) -> list[float]:
    warm = []
    for cid in random.sample(ids[:-1], min(k - 1, len(ids) - 1)) + ids[-1:]:
        await agent.exec(cid, "/bin/true", [])
        t = time.perf_counter()
        r = await agent.exec(cid, "/bin/true", [])
        warm.append((time.perf_counter() - t) * 1000)
        assert r.exit_code == 0, r
    return warm


async def main(args: argparse.Namespace) -> None:
    data = Path(tempfile.mkdtemp(prefix="wrenn-bench-density-"))
    agent = LocalHostAgent(data)
    if not args.spares:
        agent.spares.per_key = 0
    await agent.prepare([("minimal", 1, 512)])
    await agent.start({})
    mem0 = meminfo()
    print(f"accelerator: {agent.accel}; MemTotal {mem0['MemTotal'] / 2**30:.1f} GiB, "
          f"MemAvailable {mem0['MemAvailable'] / 2**30:.1f} GiB, {os.cpu_count()} CPUs")
    ids: list[str] = []
    best = 0
    reason = f"reached --max {args.max}"
    started = time.monotonic()
    try:
        while len(ids) < args.max:
            try:
                for _ in range(args.step):
                    cid = "cl-" + secrets.token_hex(13)[:25]
                    await agent.create(cid, "minimal", None, None)
                    ids.append(cid)
                await asyncio.sleep(args.settle)
                warm = await probe(agent, ids, args.probe)
            except Exception as e:  # noqa: BLE001 - the first failure ends the run
                reason = f"failure at {len(ids)}: {type(e).__name__}: {e}"[:300]
                break
            mem = meminfo()
            pids = [agent._capsules[c].machine.pid for c in ids]
            anon, file = map(sum, zip(*(proc_mem(p) for p in pids)))
            med = statistics.median(warm)
            load = os.getloadavg()[0]
            print(f"{len(ids):4d} capsules  exec p50 {med:6.1f} ms p95 {pct(warm, 95):6.1f} ms  "
                  f"MemAvailable {mem['MemAvailable'] / 2**30:5.1f} GiB  "
                  f"per capsule: anon {anon / len(ids) / 2**20:5.1f} MiB, file {file / len(ids) / 2**20:5.1f} MiB, "
                  f"host used {(mem0['MemAvailable'] - mem['MemAvailable']) / len(ids) / 2**20:5.1f} MiB  "
                  f"load {load:.1f}  t={time.monotonic() - started:.0f}s", flush=True)
            if med >= args.limit_ms:
                reason = f"exec p50 {med:.0f} ms >= {args.limit_ms:.0f} ms at {len(ids)}"
                break
            best = len(ids)
            if mem["MemAvailable"] < args.reserve_mb * 2**20:
                reason = f"MemAvailable under {args.reserve_mb} MiB at {len(ids)} (stopped to spare the host)"
                break
    finally:
        print(f"idle 512 MiB capsules at once with exec p50 < {args.limit_ms:.0f} ms: {best} ({reason})")
        t = time.monotonic()
        for i in range(0, len(ids), 16):
            await asyncio.gather(*(agent.destroy(c) for c in ids[i:i + 16]), return_exceptions=True)
        await agent.close()
        shutil.rmtree(data, ignore_errors=True)
        print(f"destroyed {len(ids)} in {time.monotonic() - t:.0f} s")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max", type=int, default=300, help="stop after this many capsules")
    p.add_argument("--step", type=int, default=10, help="capsules created between probes")
    p.add_argument("--probe", type=int, default=5, help="capsules probed each step")
    p.add_argument("--settle", type=float, default=1.0, help="seconds idle before each probe")
    p.add_argument("--limit-ms", type=float, default=100.0, help="exec p50 that counts as failure")
    p.add_argument("--reserve-mb", type=int, default=3072, help="stop when MemAvailable falls below")
    p.add_argument("--spares", action="store_true", help="keep spare VMs on (default off: count capsules only)")
    asyncio.run(main(p.parse_args()))
