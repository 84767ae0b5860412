"""A capsule's one teardown (`LocalCapsule.kill`): ordered, safe twice, and a failing step does not
stop the later ones. Fake machine, guest, network and cgroups record what is released; the real
ones are exercised by tests/e2e/test_runtime.py and test_crash_recovery.py."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest

from wrenn_host.capsule import CapsuleMeta, HostResources, LocalCapsule
from wrenn_host.paths import HostPaths
from wrenn_host.vmm import DRIVERS, driver


class Calls(list):
    def count_of(self, name: str) -> int:
        return sum(1 for c in self if c[0] == name)


class FakeMachine:
    def __init__(self, calls: Calls, fail: int = 0):
        self.calls, self.fail = calls, fail
        self.pid = 4242

    async def kill(self) -> None:
        self.calls.append(("machine.kill", self.pid))
        if self.fail:
            self.fail -= 1
            raise OSError("VMM did not exit")

    def is_alive(self) -> bool:
        return False


class FakeGuest:
    def __init__(self, calls: Calls):
        self.calls = calls

    async def close(self) -> None:
        self.calls.append(("guest.close",))


class FakeNet:
    def __init__(self, calls: Calls, fail: int = 0):
        self.calls, self.fail = calls, fail

    async def release(self, slot) -> None:
        self.calls.append(("net.release", slot))
        if self.fail:
            self.fail -= 1
            raise RuntimeError("ip netns delete failed")


class FakeJail:
    def __init__(self, calls: Calls):
        self.calls = calls

    def release(self, key: str) -> None:
        self.calls.append(("jail.release", key))


class FakeDriver:
    name = "fake"

    def __init__(self, calls: Calls, leftover: FakeMachine | None = None):
        self.calls, self.leftover = calls, leftover

    def adopt(self, spec, files):
        self.calls.append(("vmm.adopt", files.pidfile.parent.name))
        found, self.leftover = self.leftover, None
        return found


@pytest.fixture
def host(tmp_path: Path):
    calls = Calls()
    paths = HostPaths(tmp_path / "host")
    res = HostResources(paths, FakeNet(calls), FakeJail(calls), FakeDriver(calls), memory=None)  # type: ignore[arg-type]
    yield res, calls
    shutil.rmtree(paths.run, ignore_errors=True)
    with contextlib.suppress(OSError):
        paths.run.parent.rmdir()


def running_capsule(res: HostResources, calls: Calls, cid: str = "c-1", **machine) -> LocalCapsule:
    paths = res.paths
    meta = CapsuleMeta(cid, "minimal", "/nowhere", 1, 512, "6.1", slot=7, spawned_as="sp-0123")
    cap = LocalCapsule(cid, res, meta, snapshot=None)
    paths.capsule_dir(cid).mkdir()
    paths.capsule_run_dir(cid).mkdir()
    (paths.capsule_dir(cid) / "memory").write_bytes(b"\0" * 16)
    cap.save_meta()
    paths.disk_link("sp-0123").symlink_to(paths.capsule_dir(cid) / "disk.qcow2")
    cap.machine = FakeMachine(calls, **machine)
    cap.guest = FakeGuest(calls)  # type: ignore[assignment]
    cap.slot = "slot-7"  # type: ignore[assignment]
    return cap


def gone(res: HostResources, cid: str) -> bool:
    p = res.paths
    return not p.capsule_dir(cid).exists() and not p.capsule_run_dir(cid).exists() \
        and not p.disk_link("sp-0123").is_symlink()


async def test_kill_releases_in_order_and_a_second_kill_does_nothing(host):
    res, calls = host
    cap = running_capsule(res, calls)
    await cap.kill(remove_files=True)
    assert calls == [("guest.close",), ("machine.kill", 4242), ("net.release", "slot-7"),
                     ("jail.release", "c-1"), ("jail.release", "sp-0123")]
    assert gone(res, "c-1")
    assert cap.machine is None and cap.guest is None and cap.slot is None and cap.meta.slot is None
    calls.clear()
    await cap.kill(remove_files=True)  # nothing left: no second SIGKILL, no second release
    assert calls.count_of("machine.kill") == 0 and calls.count_of("guest.close") == 0
    assert calls.count_of("net.release") == 0
    assert gone(res, "c-1")


async def test_a_failing_step_does_not_stop_the_later_ones(host):
    res, calls = host
    res.net.fail = 1  # the network slot cannot be torn down the first time
    cap = running_capsule(res, calls)
    with pytest.raises(RuntimeError, match="netns delete failed"):
        await cap.kill(remove_files=True)
    # The VMM is gone, the cgroups and files too, although the step before them failed.
    assert calls.count_of("machine.kill") == 1 and calls.count_of("jail.release") == 2
    assert gone(res, "c-1")
    assert cap.slot == "slot-7"  # kept: a second kill retries it
    calls.clear()
    await cap.kill(remove_files=True)
    assert calls.count_of("net.release") == 1 and calls.count_of("machine.kill") == 0
    assert cap.slot is None


async def test_a_vmm_that_does_not_die_is_retried(host):
    res, calls = host
    cap = running_capsule(res, calls, fail=1)
    with pytest.raises(OSError, match="did not exit"):
        await cap.kill()
    assert calls.count_of("net.release") == 1 and calls.count_of("jail.release") == 2
    assert res.paths.capsule_dir("c-1").exists()  # files only when asked
    assert cap.machine is not None
    await cap.kill()
    assert calls.count_of("machine.kill") == 2 and cap.machine is None


async def test_kill_of_what_an_unknown_id_left_finds_its_vmm(host):
    res, calls = host
    paths = res.paths
    paths.capsule_dir("lost-1").mkdir()
    (paths.capsule_dir("lost-1") / "qemu.pid").write_text("4242")
    res.vmm.leftover = FakeMachine(calls)
    await LocalCapsule("lost-1", res).kill(remove_files=True)
    assert ("vmm.adopt", "lost-1") in calls and calls.count_of("machine.kill") == 1
    assert ("jail.release", "lost-1") in calls
    assert not paths.capsule_dir("lost-1").exists()


def test_vmm_driver_is_chosen_by_setting(monkeypatch):
    assert "qemu" in DRIVERS
    monkeypatch.delenv("WRENN_VMM", raising=False)
    assert driver().name == "qemu"
    monkeypatch.setenv("WRENN_VMM", "firecracker")
    with pytest.raises(ValueError, match="unknown VMM driver 'firecracker'.*qemu"):
        driver()
    assert driver("qemu").name == "qemu"
