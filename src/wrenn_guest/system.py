"""`ping`, `identity` and `metrics`."""

from __future__ import annotations

import base64
import binascii
import fcntl
import logging
import os
import struct
import threading
import time

from . import __version__
from .protocol import AgentError
from .server import Request

log = logging.getLogger("wrenn_guest")

RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
MIN_SEED_BYTES = 32
_STARTED = time.monotonic()


def ping(req: Request) -> dict:
    try:
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        uptime = time.monotonic() - _STARTED
    return {"version": __version__, "uptime_s": round(uptime, 3)}


# identity: the three side effects are plain functions so tests can replace them; with
# WRENN_GUEST_TEST=1 (an agent run on a developer's machine) they are skipped altogether.

def set_hostname(name: str) -> None:
    # The kernel's name only: a capsule never reboots, and a disk write here would sit on the
    # critical path of every create.
    with open("/proc/sys/kernel/hostname", "w") as f:
        f.write(name)


def seed_rng(seed: bytes) -> None:
    # A restored snapshot shares its RNG state with every sibling: mix in fresh host entropy,
    # credit it, and force the CRNG to reseed now rather than at its next scheduled reseed.
    with open("/dev/random", "wb", buffering=0) as f:
        fcntl.ioctl(f, RNDADDENTROPY, struct.pack("ii", len(seed) * 8, len(seed)) + seed)
        fcntl.ioctl(f, RNDRESEEDCRNG)


def set_clock(time_ns: int) -> None:
    time.clock_settime_ns(time.CLOCK_REALTIME, time_ns)


EFFECTS = {"clock": set_clock, "hostname": set_hostname, "rng": seed_rng}
capsule_id: str | None = None


def identity(req: Request) -> dict:
    global capsule_id
    p = req.params
    hostname, cid, time_ns = p.get("hostname"), p.get("capsule_id"), p.get("time_ns")
    if not isinstance(hostname, str) or not 0 < len(hostname) <= 64 or "/" in hostname:
        raise AgentError("invalid", "hostname must be 1-64 characters")
    if not isinstance(cid, str) or not cid:
        raise AgentError("invalid", "capsule_id must be a non-empty string")
    if not isinstance(time_ns, int) or isinstance(time_ns, bool) or time_ns <= 0:
        raise AgentError("invalid", "time_ns must be a positive integer")
    try:
        seed = base64.b64decode(p.get("seed") or "", validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise AgentError("invalid", "seed must be base64") from None
    if len(seed) < MIN_SEED_BYTES:
        raise AgentError("invalid", f"seed must be at least {MIN_SEED_BYTES} bytes")
    capsule_id = cid
    if os.environ.get("WRENN_GUEST_TEST") == "1":
        return {"version": __version__}
    # Clock first: the other steps (and anything logging) should see the right time.
    for step, arg in (("clock", time_ns), ("hostname", hostname), ("rng", seed)):
        try:
            EFFECTS[step](arg)
        except OSError as exc:  # best effort: e.g. not permitted when run outside a VM
            log.warning("identity: %s not applied: %s", step, exc)
    return {"version": __version__}


_cpu_lock = threading.Lock()
_cpu_last: tuple[int, int] | None = None


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user/nice
    return total - idle, total


def metrics(req: Request) -> dict:
    global _cpu_last
    with _cpu_lock:
        now = _cpu_times()
        last, _cpu_last = _cpu_last, now
    busy = now[0] - last[0] if last else 0
    total = now[1] - last[1] if last else 0
    cpu_pct = round(100.0 * busy / total, 1) if total > 0 else 0.0
    mem = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            mem[key] = int(value.split()[0]) * 1024
    st = os.statvfs("/")
    return {
        "cpu_pct": cpu_pct,
        "mem_bytes": mem["MemTotal"] - mem.get("MemAvailable", mem.get("MemFree", 0)),
        "disk_bytes": (st.f_blocks - st.f_bfree) * st.f_frsize,
        "disk_size_bytes": st.f_blocks * st.f_frsize,
    }


def prime_metrics() -> None:
    """Take the first CPU sample at start, so the first `metrics` call has a delta."""
    global _cpu_last
    try:
        _cpu_last = _cpu_times()
    except OSError:
        pass
