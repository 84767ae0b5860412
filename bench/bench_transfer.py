"""Moving templates and paused capsules between two host agents on this machine.

Prints, for --n rounds each: a snapshot template moved A -> B, a paused 512 MiB capsule of the
built-in template (its disk flattened) and one of a snapshot template (its overlay only) moved
A -> B, then resumed there: MiB of files, MiB sent (holes are not), seconds, MiB/s, and the
resume on B. Both agents share this machine's disk: a real fleet adds the network in between.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))

from wrenn_control.hosts.transfer import move_paused_capsule, move_template  # noqa: E402
from wrenn_host.agent import LocalHostAgent  # noqa: E402

MiB = 1 << 20


def new_id() -> str:
    return "cl-" + secrets.token_hex(13)[:25]


def summary(values: list[float]) -> str:
    return f"p50 {statistics.median(values):.2f} min {min(values):.2f} max {max(values):.2f}"


def line(name: str, moves: list, resumes: list[float] | None = None) -> None:
    t = moves[-1]
    secs = [m.seconds for m in moves]
    rates = [m.mib_per_s for m in moves]
    extra = f"; resume on B (s) {summary(resumes)}" if resumes else ""
    print(f"{name}: {t.file_bytes / MiB:.0f} MiB of files, {t.bytes / MiB:.1f} MiB sent; "
          f"seconds {summary(secs)}; MiB/s {summary(rates)}{extra}")


async def main(args: argparse.Namespace) -> None:
    dirs = [Path(tempfile.mkdtemp(prefix=f"wrenn-bench-xfer-{n}-")) for n in "ab"]
    agents: list[LocalHostAgent] = []
    try:
        for d in dirs:
            agent = LocalHostAgent(d)
            agent.spares.per_key = 0
            await agent.prepare([("minimal", 1, 512)])
            await agent.start({})
            agents.append(agent)
        a, b = agents
        tpl_moves, flat_moves, overlay_moves = [], [], []
        resumes: dict[str, list[float]] = {"minimal": [], "snapshot": []}
        for i in range(args.n):
            cid, tid = new_id(), f"tpl-bench-{i}"
            await a.create(cid, "minimal", 1, 512)
            await a.exec(cid, "/bin/sh", ["-c", "head -c 64M /dev/urandom > /root/blob; sync"], timeout_sec=120)
            await a.snapshot(cid, tid)
            await a.destroy(cid)
            tpl_moves.append(await move_template(a, b, tid))
            for template, moves in (("minimal", flat_moves), (tid, overlay_moves)):
                cid = new_id()
                await a.create(cid, template, None, None)
                await a.exec(cid, "/bin/sh", ["-c", "head -c 32M /dev/urandom > /tmp/blob"], timeout_sec=120)
                await a.pause(cid)
                moves.append((await move_paused_capsule(a, b, cid, template)).transfer)
                t0 = time.monotonic()
                await b.resume(cid)
                resumes["minimal" if template == "minimal" else "snapshot"].append(time.monotonic() - t0)
                await b.destroy(cid)
        line("snapshot template (64 MiB written to its disk)", tpl_moves)
        line("paused capsule, built-in template (disk flattened, 32 MiB in /tmp)", flat_moves, resumes["minimal"])
        line("paused capsule, snapshot template (overlay only, 32 MiB in /tmp)", overlay_moves, resumes["snapshot"])
    finally:
        for agent in agents:
            for cid in list(agent._capsules):
                try:
                    await agent.destroy(cid)
                except Exception:
                    pass
            await agent.close()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=3, help="rounds")
    asyncio.run(main(p.parse_args()))
