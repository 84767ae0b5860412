"""Why is the first exec after a create (or resume) slower than the next? Measures, per call:
host round trip, the guest's own exec duration (popen -> exit), QEMU's page faults (minflt from
/proc/PID/stat) and, under TCG, how many translation blocks QEMU had to make (`info jit`).

Calls, in a fresh capsule: ping (answered on the guest's reader thread), stat (a worker thread, no
fork), exec /bin/true, exec /bin/sh -c true; then each again (warm). The same after a resume.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from qemu.qmp import QMPClient

sys.path.insert(0, str(Path(__file__).parent))
from wrenn_host.agent import LocalHostAgent  # noqa: E402


def new_id() -> str:
    return "cl-" + secrets.token_hex(13)[:25]


def minflt(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    return int(fields[7])  # minflt (field 10 of stat, 8th after the comm)


async def tb_count(qmp_path: Path) -> int | None:
    qmp = QMPClient("probe")
    try:
        await qmp.connect(str(qmp_path))
        out = await qmp.execute("human-monitor-command", {"command-line": "info jit"})
        m = re.search(r"TB count\s+(\d+)", str(out))
        return int(m.group(1)) if m else None
    except Exception:  # noqa: BLE001 - KVM has no jit
        return None
    finally:
        await qmp.disconnect()


CALLS = [
    ("ping", "ping", {}),
    ("stat /", "stat", {"path": "/"}),
    ("exec /bin/true", "exec", {"cmd": "/bin/true", "args": [], "timeout_sec": 30}),
    ("exec sh -c true", "exec", {"cmd": "/bin/sh", "args": ["-c", "true"], "timeout_sec": 30}),
    ("exec sh -c 'echo ok'", "exec", {"cmd": "/bin/sh", "args": ["-c", "echo ok"], "timeout_sec": 30}),
]


async def probe(agent: LocalHostAgent, cid: str, label: str, rows: dict) -> None:
    cap = agent._capsules[cid]
    pid, qmp = cap.machine.pid, cap.machine.files.qmp
    for rnd in ("first", "second", "third"):
        for name, op, params in CALLS:
            tb0, f0 = await tb_count(qmp), minflt(pid)
            t = time.perf_counter()
            res, _ = await cap.guest.call(op, **params)
            ms = (time.perf_counter() - t) * 1000
            tb1, f1 = await tb_count(qmp), minflt(pid)
            key = (label, rnd, name)
            rows.setdefault(key, []).append(
                (ms, res.get("duration_ms"), f1 - f0, (tb1 - tb0) if tb0 is not None and tb1 is not None else None))


async def main(args: argparse.Namespace) -> None:
    data = Path(tempfile.mkdtemp(prefix="wrenn-probe-"))
    agent = LocalHostAgent(data)
    await agent.prepare([("minimal", 1, 512)])
    if args.no_spares:
        agent.spares.per_key = 0
    await agent.start({})
    print(f"accelerator: {agent.accel}; spare VMs: {agent.spares.per_key}")
    rows: dict = {}
    ids = []
    try:
        for _ in range(args.n):
            cid = new_id()
            ids.append(cid)
            await agent.spares.wait_full()
            t = time.perf_counter()
            await agent.create(cid, "minimal", None, None)
            rows.setdefault(("create", "-", "host create"), []).append(
                ((time.perf_counter() - t) * 1000, None, None, None))
            if args.quiet:
                await agent.spares.wait_full()  # the refill does not compete with the probe
            await probe(agent, cid, "create", rows)
            await agent.pause(cid)
            await agent.resume(cid)
            await probe(agent, cid, "resume", rows)
            await agent.destroy(cid)
        print(f"{'after':<7} {'round':<7} {'call':<22} {'host ms':>8} {'guest ms':>8} {'minflt':>7} {'new TBs':>8}")
        for (label, rnd, name), vals in rows.items():
            med = [statistics.median([v[i] for v in vals if v[i] is not None] or [float('nan')]) for i in range(4)]
            print(f"{label:<7} {rnd:<7} {name:<22} {med[0]:8.1f} {med[1]:8.1f} {med[2]:7.0f} {med[3]:8.0f}")
    finally:
        for c in ids:
            await agent.destroy(c)
        await agent.close()
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("-n", type=int, default=5, help="capsules (each: create, probe, pause, resume, probe)")
    p.add_argument("--quiet", action="store_true", help="let the spare refill finish before probing")
    p.add_argument("--no-spares", action="store_true", help="create without spare VMs")
    asyncio.run(main(p.parse_args()))
