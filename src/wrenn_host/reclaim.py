"""Start-up: match what is on disk and alive with what the control plane believes, and reclaim
every orphan an earlier server process left (a crash, a restart, a `kill -9`).

For each capsule directory (names from paths.py): a capsule the control plane does not know is
killed with its files (reported lost); one it knows is recovered from its files and its live VMM
(recover.py decides, all capsules at once); one whose files make no sense is killed and its files
are moved aside (`quarantine/`, never deleted) and reported as an error. Then the sweeps: broken
snapshot builds, spare memory copies, dangling disk links, stray run directories, cgroups and
network slots of capsules that are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Callable

from wrenn_host import api
from wrenn_host.capsule import HostResources, LocalCapsule
from wrenn_host.durable import write_durable
from wrenn_host.network import Slot
from wrenn_host.recover import recover

log = logging.getLogger(__name__)


async def reclaim(host: HostResources, known: dict[str, str], capsules: dict[str, LocalCapsule],
                  sweep_templates: Callable[[], None]) -> tuple[api.ReconcileReport, float]:
    """Fill `capsules` (this host's registry) with what survived; `sweep_templates` runs once
    they are known (a deleted template goes only when no capsule uses it). Returns the report
    and how long the capsules took (network slots are reclaimed after)."""
    t0 = time.monotonic()
    running: list[str] = []
    paused: list[str] = []
    lost: list[str] = []
    errors: dict[str, str] = {}

    async def one(cid: str) -> None:
        cap = LocalCapsule.load(cid, host)
        if cid not in known:
            with contextlib.suppress(Exception):  # each failed step is logged by kill()
                await (cap or LocalCapsule(cid, host)).kill(remove_files=True)
            lost.append(cid)
            return
        if cap is None:
            await _kill_quietly(LocalCapsule(cid, host))
            errors[cid] = quarantine(host, cid, "capsule metadata or its template is missing or unreadable")
            return
        assert cap.snapshot is not None
        out = await recover(cid, cap.snapshot.spec, cap.files, cap.state_file, host.vmm)
        if out.status == "error":
            errors[cid] = quarantine(host, cid, out.reason)
            return
        cap.machine, cap.guest = out.machine, out.guest
        capsules[cid] = cap
        if out.status == "running":
            await cap.start_serial()
        (running if out.status == "running" else paused).append(cid)

    cids = sorted(d.name for d in host.paths.capsules.iterdir())
    results = await asyncio.gather(*(one(cid) for cid in cids), return_exceptions=True)
    for cid, res in zip(cids, results):
        if isinstance(res, BaseException):  # an unexpected failure must not hide the capsule
            log.exception("capsule %s: recovery failed", cid, exc_info=res)
            cap = capsules.pop(cid, None) or LocalCapsule(cid, host)
            await _kill_quietly(cap)
            errors[cid] = quarantine(host, cid, f"recovery failed: {res}")
    sweep_templates()
    host.memory.clear()
    _sweep_orphans(host, set(capsules))
    seconds = time.monotonic() - t0
    log.info("reconciled %d capsules in %.3f s: %d running, %d paused, %d lost, %d error",
             len(cids), seconds, len(running), len(paused), len(lost), len(errors))
    await _reclaim_slots(host, capsules)
    report = api.ReconcileReport(running=sorted(running), paused=sorted(paused), lost=sorted(lost), errors=errors)
    return report, seconds


async def _kill_quietly(cap: LocalCapsule) -> None:
    """Its VMM and whatever else it holds go; its files stay for the quarantine."""
    with contextlib.suppress(Exception):  # each failed step is logged by kill()
        await cap.kill()


def quarantine(host: HostResources, cid: str, reason: str) -> str:
    """Move a capsule's files aside (never delete what could not be understood) and say where."""
    paths = host.paths
    src = paths.capsule_dir(cid)
    dest = paths.quarantine / f"{cid}-{time.strftime('%Y%m%dT%H%M%S')}"
    try:
        paths.quarantine.mkdir(mode=0o700, exist_ok=True)
        src.rename(dest)
        write_durable(dest / "reason.txt", (reason + "\n").encode())
    except OSError as e:
        log.error("capsule %s: could not move its files aside: %s", cid, e)
        return reason
    shutil.rmtree(paths.capsule_run_dir(cid), ignore_errors=True)
    log.warning("capsule %s: %s; files kept in %s", cid, reason, dest)
    return f"{reason}; files kept in {dest}"


def _sweep_orphans(host: HostResources, keep: set[str]) -> None:
    paths = host.paths
    # Disk links of spares and capsules that are gone.
    for f in paths.links.iterdir():
        if not f.exists():
            f.unlink(missing_ok=True)
    # Stray socket directories from builds or capsules that are gone, and their cgroups.
    for d in paths.run.iterdir():
        if d.name not in keep and d != host.jail.empty:
            shutil.rmtree(d, ignore_errors=True)
    host.jail.reclaim(keep)


async def _reclaim_slots(host: HostResources, capsules: dict[str, LocalCapsule]) -> None:
    """Running capsules keep their network slots; every other slot this server left goes."""
    alive = [c for c in capsules.values() if c.machine is not None and c.meta is not None and c.meta.slot is not None]
    await host.net.reclaim({c.meta.slot: (c.id, c.meta.policy) for c in alive})  # type: ignore[union-attr]
    for cap in alive:
        assert cap.meta is not None and cap.meta.slot is not None
        cap.slot = Slot(host.net.tag, cap.meta.slot, host.net.pool)


__all__ = ["quarantine", "reclaim"]
