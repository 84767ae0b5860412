"""Time to interactive: create -> first command (`echo ok`) answered -> destroy, as users see it.

In one run, on this machine:
- the floor: the host agent's own create + first exec (`/bin/sh -c 'echo ok'`), in process;
- our SDK (`Capsule(wait=True)` + `commands.run("echo ok")`) against a local `wrenn server`;
- the published SDK 0.3.0, the same calls, from its own Python 3.13 venv (made by this script:
  `python3.13 -m venv` + `pip install wrenn==0.3.0`, kept in ~/.cache/wrenn/bench-published-sdk).
Each sequentially (one capsule at a time, `--gap` seconds between them: a steady create rate the
spare VMs keep up with; `--gap 0` shows the drained pool) and in bursts of `--bursts` at once
(time from the burst's start to each capsule's first answer). Prints medians, p95s and ratios:
sequential to the floor, bursts to the sequential median. Run it under the VM lock.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _stats import pct  # noqa: E402
from bench_api import start_server, stop_server  # noqa: E402

from wrenn_host.spares import SparePool  # noqa: E402

PUBLISHED = "0.3.0"
PYTHON313 = [Path("~/.pyenv/versions/3.13.0/bin/python3").expanduser(), shutil.which("python3.13")]
VENV = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "wrenn" / "bench-published-sdk"

# Run by each SDK's interpreter: sequential runs then bursts, one JSON line of timings (ms).
DRIVER = r'''
import json, os, sys, threading, time
import httpx
from wrenn import Capsule, WrennClient
n, gap, bursts = int(sys.argv[1]), float(sys.argv[2]), [int(b) for b in sys.argv[3].split(",") if b]
spares = int(sys.argv[4])

def settle():
    """Until the server's spare VMs are back (its /health says how many are ready)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if httpx.get(os.environ["WRENN_BASE_URL"] + "/health").json().get("spare_vms", 0) >= spares:
            return
        time.sleep(0.1)

def tti(start):
    c = Capsule(template="minimal", wait=True)
    r = c.commands.run("echo ok")
    ms = (time.perf_counter() - start) * 1000
    assert r.stdout.strip() == "ok", r
    return c, ms

out = {"sequential": [], "bursts": {}, "client_setup": []}
tti(time.perf_counter())[0].destroy()  # warm: first create of the shape, imports, connections
settle()
for _ in range(n):  # what each Capsule(...) spends making its own client, before any request
    t = time.perf_counter()
    WrennClient().close()
    out["client_setup"].append((time.perf_counter() - t) * 1000)
for _ in range(n):
    c, ms = tti(time.perf_counter())
    out["sequential"].append(ms)
    c.destroy()
    time.sleep(gap)
for size in bursts:
    caps, times, errors = [], [], []
    start_at = threading.Barrier(size + 1)
    def one():
        start_at.wait()
        try:
            c, ms = tti(t0[0])
            caps.append(c); times.append(ms)
        except Exception as e:
            errors.append(repr(e))
    t0 = [0.0]
    threads = [threading.Thread(target=one) for _ in range(size)]
    for t in threads: t.start()
    t0[0] = time.perf_counter()
    start_at.wait()
    for t in threads: t.join()
    for c in caps:
        try: c.destroy()
        except Exception: pass
    out["bursts"][str(size)] = {"ms": times, "errors": errors}
    time.sleep(2.0)
    settle()  # bursts start from a full pool
print("RESULT " + json.dumps(out))
'''


def published_python() -> Path:
    py = VENV / "bin" / "python"
    if py.exists() and subprocess.run([py, "-c", f"import wrenn; assert wrenn.__version__ == '{PUBLISHED}'"],
                                      capture_output=True).returncode == 0:
        return py
    base = next((p for p in PYTHON313 if p and Path(p).exists()), None)
    if base is None:
        raise SystemExit("Python 3.13 not found (the published SDK needs >= 3.13)")
    shutil.rmtree(VENV, ignore_errors=True)
    subprocess.run([base, "-m", "venv", VENV], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", f"wrenn=={PUBLISHED}"], check=True)
    return py


async def floor(n: int, gap: float, bursts: list[int]) -> tuple[list[float], list[float], list[float],
                                                                dict[int, list[float]]]:
    """The host agent's create + first exec, in process; also each part alone; and the same
    in bursts (what this machine itself allows when that many start at once)."""
    from wrenn_host.agent import LocalHostAgent

    data = Path(tempfile.mkdtemp(prefix="wrenn-bench-tti-"))
    agent = LocalHostAgent(data)
    await agent.prepare([("minimal", 1, 512)])
    await agent.start({})
    total, create, first = [], [], []
    try:
        for i in range(n + 1):
            cid = "cl-" + secrets.token_hex(13)[:25]
            t = time.perf_counter()
            await agent.create(cid, "minimal", None, None)
            c = time.perf_counter()
            r = await agent.exec(cid, "/bin/sh", ["-c", "echo ok"])
            e = time.perf_counter()
            assert r.stdout == b"ok\n", r
            if i:  # the first one is the warm-up (it also starts the spares)
                total.append((e - t) * 1000)
                create.append((c - t) * 1000)
                first.append((e - c) * 1000)
            await agent.destroy(cid)
            if i == 0:
                await agent.spares.wait_full(60)
            await asyncio.sleep(gap)
        burst_ms: dict[int, list[float]] = {}
        for size in bursts:
            await agent.spares.wait_full(60)
            start = time.perf_counter()

            async def one() -> tuple[str, float]:
                cid = "cl-" + secrets.token_hex(13)[:25]
                await agent.create(cid, "minimal", None, None)
                r = await agent.exec(cid, "/bin/sh", ["-c", "echo ok"])
                assert r.stdout == b"ok\n", r
                return cid, (time.perf_counter() - start) * 1000
            done = await asyncio.gather(*(one() for _ in range(size)))
            burst_ms[size] = [ms for _, ms in done]
            await asyncio.gather(*(agent.destroy(cid) for cid, _ in done))
            await asyncio.sleep(2.0)
    finally:
        await agent.close()
        shutil.rmtree(data, ignore_errors=True)
    return total, create, first, burst_ms


def run_driver(python: Path | str, server, n: int, gap: float, bursts: list[int], src: Path | None,
               spares: int) -> dict:
    env = dict(os.environ, WRENN_API_KEY=server.api_key, WRENN_BASE_URL=server.base_url)
    env.pop("PYTHONPATH", None)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    proc = subprocess.run([str(python), "-c", DRIVER, str(n), str(gap), ",".join(map(str, bursts)), str(spares)],
                          env=env, capture_output=True, text=True, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"driver failed ({proc.returncode}): {proc.stderr[-3000:]}")


def line(name: str, values: list[float], ref: float | None = None, ref_name: str = "") -> str:
    if not values:
        return f"{name:<44} (no values)"
    med = statistics.median(values)
    ratio = f"  {med / ref:5.2f}x {ref_name}" if ref else ""
    return f"{name:<44} n={len(values):<3} p50={med:8.1f} ms  p95={pct(values, 95):8.1f} ms{ratio}"


def main(args: argparse.Namespace) -> None:
    bursts = [int(b) for b in args.bursts.split(",") if b]
    pub = published_python() if not args.skip_published else None
    total, create, first, floor_bursts = asyncio.run(floor(args.n, args.gap, bursts))
    print(f"gap between sequential creates: {args.gap} s; spare VMs per shape: {SparePool(None, None).per_key}; "
          f"load average {os.getloadavg()[0]:.1f}")
    fl = statistics.median(total)
    print(line("floor: host create + first exec", total))
    print(line("  host create", create))
    print(line("  host first exec (sh -c 'echo ok')", first))
    for size, values in floor_bursts.items():
        print(line(f"floor: burst of {size} (host alone)", values, fl, "floor"))

    server = start_server()
    ids: list[str] = []
    try:
        results = {}
        spares = SparePool(None, None).per_key  # what the server's pool holds per shape (same env)
        results["our SDK"] = run_driver(sys.executable, server, args.n, args.gap, bursts,
                                        Path(__file__).resolve().parents[1] / "src", spares)
        if pub is not None:
            results[f"published SDK {PUBLISHED}"] = run_driver(pub, server, args.n, args.gap, bursts, None, spares)
        ids = [c["id"] for c in server.client().get("/v1/capsules").json()]
    finally:
        stop_server(server, ids)
    for name, res in results.items():
        seq = res["sequential"]
        print(line(f"{name}: sequential", seq, fl, "floor"))
        setup = res.get("client_setup") or []
        if setup:
            # Client-side, before any request reaches the server: the SDK's own cost in each TTI.
            print(line(f"  {name}: client set-up (in each TTI)", setup))
            print(line(f"  {name}: sequential less client set-up", [v - statistics.median(setup) for v in seq],
                       fl, "floor"))
        for size, b in res["bursts"].items():
            print(line(f"{name}: burst of {size}", b["ms"], statistics.median(seq), "sequential"))
            if b["errors"]:
                print(f"  {len(b['errors'])} failed: {b['errors'][:3]}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=20, help="sequential capsules per SDK (and for the floor)")
    p.add_argument("--gap", type=float, default=0.5, help="seconds between sequential creates")
    p.add_argument("--bursts", default="10,50", help="burst sizes, comma-separated")
    p.add_argument("--skip-published", action="store_true", help="only the floor and our SDK")
    main(p.parse_args())
