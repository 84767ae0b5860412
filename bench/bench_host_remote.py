"""The host agent in-process vs over the network: what the wire protocol costs.

One LocalHostAgent on a temporary data directory (image and template caches reused), served by
the host agent service on loopback; the same calls made on the agent itself and through a
RemoteHostAgent, side by side:
- create -> running (the call returns once the guest answers), destroy;
- exec round trip of `/bin/true`;
- a 16 MiB file written (streamed) and read back (streamed): MiB/s;
- pause and resume.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))
from _stats import summary  # noqa: E402

from tests.conftest import kill_qemus  # noqa: E402
from tests.hostservice import serving  # noqa: E402


async def measure(name: str, agent, args) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"create -> running": [], "exec /bin/true": [], "pause": [], "resume": []}
    mib: dict[str, list[float]] = {"write 16 MiB (MiB/s)": [], "read 16 MiB (MiB/s)": []}
    data = os.urandom(16 * 1024 * 1024)

    async def chunks():
        for i in range(0, len(data), 256 * 1024):
            yield data[i:i + 256 * 1024]

    for _ in range(args.creates):
        cid = "cl-" + secrets.token_hex(10)
        t = time.perf_counter()
        await agent.create(cid, "minimal", None, None)
        out["create -> running"].append((time.perf_counter() - t) * 1000)
        try:
            for _ in range(args.execs // args.creates):
                t = time.perf_counter()
                await agent.exec(cid, "/bin/true", [])
                out["exec /bin/true"].append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            await agent.write_file(cid, "/root/big.bin", chunks())
            mib["write 16 MiB (MiB/s)"].append(16 / (time.perf_counter() - t))
            t = time.perf_counter()
            got = 0
            async for chunk in agent.read_file_stream(cid, "/root/big.bin"):
                got += len(chunk)
            mib["read 16 MiB (MiB/s)"].append(16 / (time.perf_counter() - t))
            assert got == len(data)
            t = time.perf_counter()
            await agent.pause(cid)
            out["pause"].append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            await agent.resume(cid)
            out["resume"].append((time.perf_counter() - t) * 1000)
        finally:
            await agent.destroy(cid)
    print(f"\n{name}")
    for key, values in out.items():
        print("  " + summary(key, values))
    for key, values in mib.items():
        print(f"  {key:<34} n={len(values):<4} median={sorted(values)[len(values) // 2]:8.1f}")
    return out


async def main(args) -> None:
    from wrenn_control.hosts.remote import RemoteHostAgent
    from wrenn_host.agent import LocalHostAgent

    data_dir = Path(tempfile.mkdtemp(prefix="wrenn-bench-remote-"))
    agent = LocalHostAgent(data_dir)
    try:
        await agent.prepare([("minimal", 1, 512)])
        await agent.start({})
        await asyncio.sleep(args.settle)  # spare VMs boot in the background: let them be ready
        await measure("in-process LocalHostAgent", agent, args)
        async with serving(agent) as (url, token, _app):
            remote = RemoteHostAgent(url, token)
            await asyncio.sleep(args.settle)
            await measure(f"RemoteHostAgent over loopback HTTP ({url})", remote, args)
            await remote.close()
    finally:
        await agent.close()
        kill_qemus(data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--creates", type=int, default=5)
    p.add_argument("--execs", type=int, default=100)
    p.add_argument("--settle", type=float, default=5.0, help="seconds for spares to boot before each run")
    asyncio.run(main(p.parse_args()))
