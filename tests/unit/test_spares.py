"""The spare VM pool's rules, with fake VMs (the real ones: tests/e2e/test_runtime.py)."""

from __future__ import annotations

import asyncio
import os
import types
from pathlib import Path

from wrenn_host.spares import SPARE_PREFIX, SparePool


class FakeVM:
    def __init__(self, spare_id: str, snap):
        self.id = spare_id
        self.snap = snap
        self.alive = True
        self.machine = types.SimpleNamespace(is_alive=lambda: self.alive, pid=1)
        self.guest = types.SimpleNamespace(closed=False)


def make_snap(tmp_path: Path, name: str = "t", memory_mb: int = 512):
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    for f in ("meta.json", "memory", "state", "disk.qcow2"):
        (d / f).write_text("x")
    return types.SimpleNamespace(dir=d, spec=types.SimpleNamespace(memory_mb=memory_mb))


class Harness:
    def __init__(self, **kw):
        self.booted: list[FakeVM] = []
        self.discarded: list[FakeVM] = []
        self.fail = False
        self.pool = SparePool(self.boot, self.discard, **kw)

    async def boot(self, spare_id, snap):
        await asyncio.sleep(0.01)
        if self.fail:
            raise OSError("no room")
        vm = FakeVM(spare_id, snap)
        self.booted.append(vm)
        return vm

    async def discard(self, vm):
        self.discarded.append(vm)


async def test_first_take_is_empty_then_spares_are_served(tmp_path):
    h = Harness(per_key=2, budget_mb=4096)
    snap = make_snap(tmp_path)
    assert h.pool.take(snap) is None  # nothing yet: the pool starts filling for this template
    assert await h.pool.wait_full(5)
    assert h.pool.count() == 2 and all(vm.id.startswith(SPARE_PREFIX) for vm in h.booted)
    got = h.pool.take(snap)
    assert got is h.booted[0]
    assert await h.pool.wait_full(5)
    assert h.pool.count() == 2 and len(h.booted) == 3  # refilled in the background
    await h.pool.close()
    assert sorted(vm.id for vm in h.discarded) == sorted(vm.id for vm in h.booted[1:])


async def test_memory_budget_bounds_the_pool(tmp_path):
    h = Harness(per_key=4, budget_mb=1024)
    a, b = make_snap(tmp_path, "a"), make_snap(tmp_path, "b")
    h.pool.want(a)
    assert await h.pool.wait_full(5)
    assert h.pool.count() == 2  # 2 x 512 MiB
    h.pool.want(b)  # more recently used: it takes the budget from `a`
    assert await h.pool.wait_full(5)
    assert h.pool.count() == 2
    assert {vm.snap.dir.name for vm in h.booted if vm not in h.discarded} == {"b"}
    await h.pool.close()


async def test_a_changed_template_never_serves_an_old_spare(tmp_path):
    h = Harness(per_key=1, budget_mb=4096)
    snap = make_snap(tmp_path)
    h.pool.want(snap)
    assert await h.pool.wait_full(5)
    old = h.booted[0]
    # overwritten in place: same directory, new files
    (snap.dir / "memory").unlink()
    (snap.dir / "memory").write_text("new")
    os.utime(snap.dir / "memory", ns=(1, 1))
    assert h.pool.take(snap) is None
    await asyncio.sleep(0.05)
    assert old in h.discarded
    assert await h.pool.wait_full(5)
    new = h.pool.take(snap)
    assert new is not None and new is not old
    await h.pool.close()


async def test_dead_spares_are_discarded_and_drop_empties(tmp_path):
    h = Harness(per_key=2, budget_mb=4096)
    snap = make_snap(tmp_path)
    h.pool.want(snap)
    assert await h.pool.wait_full(5)
    for vm in h.booted:
        vm.alive = False
    assert h.pool.take(snap) is None
    await asyncio.sleep(0.05)
    assert set(h.booted[:2]) <= set(h.discarded)
    assert await h.pool.wait_full(5)
    h.pool.drop(snap.dir)
    await asyncio.sleep(0.05)
    assert h.pool.count() == 0
    assert h.pool.take(make_snap(tmp_path, "other")) is None
    await h.pool.close()


async def test_boot_failure_stops_filling_that_template_and_off_switch(tmp_path):
    h = Harness(per_key=2, budget_mb=4096)
    h.fail = True
    snap = make_snap(tmp_path)
    h.pool.want(snap)
    assert await h.pool.wait_full(5)  # gave up on it: nothing left to fill
    assert h.pool.count() == 0
    await h.pool.close()
    off = Harness(per_key=0)
    off.pool.want(snap)
    assert off.pool.take(snap) is None and off.booted == []
