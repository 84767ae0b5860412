"""Host hardening pieces without VMs: the saved-state check, durable writes, crash points, file
modes, the VMM jail's plan (descriptor sets over a real qcow2 chain, argv, degrading), the capped
serial log, and the control plane recording what the host kept aside at start-up."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from wrenn_host import jail, perms
from wrenn_host.durable import state_problem, write_durable
from wrenn_host.serial_log import SerialLog

from .fake_host_agent import FakeHostAgent, make_settings, running_app


def fake_state(body: bytes = b"\x04" * 1000) -> bytes:
    desc = json.dumps({"page_size": 4096, "devices": []}).encode()
    return b"QEVM\x00\x00\x00\x03" + body + b"\x00\x06" + struct.pack(">I", len(desc)) + desc


def test_state_check_accepts_a_whole_save_and_refuses_the_rest(tmp_path: Path) -> None:
    p = tmp_path / "state"
    assert state_problem(p) == "missing"
    data = fake_state()
    p.write_bytes(data)
    assert state_problem(p) is None
    for cut in (1, 10, len(data) // 2, len(data) - 9):
        p.write_bytes(data[:-cut])
        assert "cut short" in state_problem(p), cut
    p.write_bytes(b"")
    assert "not a QEMU device state" in state_problem(p)
    p.write_bytes(b"garbage" * 100)
    assert "not a QEMU device state" in state_problem(p)


def test_durable_write_is_private_and_atomic(tmp_path: Path) -> None:
    p = tmp_path / "meta.json"
    write_durable(p, b"one")
    write_durable(p, b"two")
    assert p.read_bytes() == b"two" and stat.S_IMODE(p.stat().st_mode) == 0o600
    assert sorted(x.name for x in tmp_path.iterdir()) == ["meta.json"]
    # a temp file a crash left behind, readable by all, does not pass its mode on
    leftover = tmp_path / "meta.json.tmp"
    leftover.write_bytes(b"half")
    leftover.chmod(0o644)
    write_durable(p, b"three" * 100_000)
    assert p.read_bytes() == b"three" * 100_000 and stat.S_IMODE(p.stat().st_mode) == 0o600


def test_crash_point_kills_only_at_its_step() -> None:
    code = "import asyncio; from wrenn_host.durable import crashpoint; asyncio.run(crashpoint('a')); " \
           "asyncio.run(crashpoint('pause.stopped')); print('not reached')"
    env = dict(os.environ, WRENN_CRASH_AT="pause.stopped", PYTHONPATH=str(Path(__file__).parents[2] / "src"))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == -9 and "not reached" not in proc.stdout


def test_lock_down_closes_modes_but_keeps_guest_trees(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "host" / "capsules" / "c").mkdir(parents=True)
    f = data / "host" / "capsules" / "c" / "memory"
    f.write_bytes(b"x")
    f.chmod(0o644)
    x = data / "tool"
    x.write_bytes(b"#!/bin/sh\n")
    x.chmod(0o755)
    (data / "link").symlink_to("/etc/hostname")
    os.chmod(data, 0o755)
    assert perms.lock_down(data) >= 4
    assert stat.S_IMODE(f.stat().st_mode) == 0o600 and stat.S_IMODE(x.stat().st_mode) == 0o700
    for d in (data, data / "host", data / "host" / "capsules"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE(Path("/etc/hostname").stat().st_mode) & 0o044  # not followed
    cache = tmp_path / "cache"
    (cache / "trees" / "minimal" / "etc").mkdir(parents=True)
    guest = cache / "trees" / "minimal" / "etc" / "passwd"
    guest.write_text("root:x:0:0\n")
    guest.chmod(0o644)
    (cache / "snapshots" / "s").mkdir(parents=True)
    (cache / "snapshots" / "s" / "memory").write_bytes(b"m")
    os.chmod(cache / "snapshots" / "s" / "memory", 0o644)
    perms.lock_down_cache(cache)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700 and stat.S_IMODE((cache / "trees").stat().st_mode) == 0o700
    assert stat.S_IMODE(guest.stat().st_mode) == 0o644  # the guest's own mode
    assert stat.S_IMODE((cache / "snapshots" / "s" / "memory").stat().st_mode) == 0o600


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def test_disks_go_to_qemu_as_descriptor_sets(tmp_path: Path) -> None:
    base, mid, top = tmp_path / "root.img", tmp_path / "tpl.qcow2", tmp_path / "disk.qcow2"
    _qemu_img("create", "-q", "-f", "raw", str(base), "16M")
    _qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(mid))
    _qemu_img("create", "-q", "-f", "qcow2", "-b", "tpl.qcow2", "-F", "qcow2", str(top))  # relative
    assert jail.backing_of(top) == (mid, "qcow2")
    assert jail.backing_of(mid) == (base, "raw")
    assert jail.backing_of(base) is None
    drive, fds, args = jail._disk_fdsets(top)
    try:
        assert drive == ("id=root,if=none,cache=unsafe,discard=unmap,format=qcow2,file=/dev/fdset/1,"
                         "backing.driver=qcow2,backing.file.filename=/dev/fdset/2,"
                         "backing.backing.driver=raw,backing.backing.file.filename=/dev/fdset/3")
        assert len(fds) == 4 and args == [x for fd, s in zip(fds, (1, 1, 2, 3))
                                          for x in ("-add-fd", f"fd={fd},set={s}")]
        modes = [os.readlink(f"/proc/self/fd/{fd}") for fd in fds]
        assert modes == [str(top), str(top), str(mid), str(base)]
        # Only the capsule's own overlay is writable.
        assert [os.O_ACCMODE & _flags(fd) for fd in fds] == \
            [os.O_RDWR, os.O_RDONLY, os.O_RDONLY, os.O_RDONLY]
    finally:
        for fd in fds:
            os.close(fd)


def _flags(fd: int) -> int:
    import fcntl
    return fcntl.fcntl(fd, fcntl.F_GETFL)


def test_plan_rewrites_argv_and_degrades(tmp_path: Path) -> None:
    argv = ["qemu-system-x86_64", "-drive", "id=root,file=/x", "-sandbox", jail.SANDBOX_STRICT, "-m", "512M"]
    plan = jail.Plan(prefix=["/bin/sh", "-c", "x"], extra=["-runas", "u"], drive="id=root,file=/dev/fdset/1",
                     sandbox=jail.SANDBOX_RUNAS)
    assert plan.apply(argv) == ["/bin/sh", "-c", "x", "qemu-system-x86_64", "-drive", "id=root,file=/dev/fdset/1",
                                "-sandbox", jail.SANDBOX_RUNAS, "-m", "512M", "-runas", "u"]
    off = jail.Confinement(tmp_path, "t", enabled=False)
    assert off.report()["user"] is None and off.report()["cgroup"] is None and off.report()["seccomp"] is True
    assert off.report()["degraded"] and off.plan("c", 1, 512, tmp_path / "d").apply(argv) == argv


async def test_serial_log_is_capped_and_rotated(tmp_path: Path) -> None:
    sock = tmp_path / "serial.sock"
    chunks = [bytes([65 + i % 26]) * 10_000 for i in range(40)]  # 400 KB

    async def qemu_side(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for c in chunks:
            writer.write(c)
            await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(qemu_side, path=str(sock))
    log = SerialLog(sock, tmp_path / "serial.log", max_bytes=64 << 10)
    await log.start()
    for _ in range(500):
        if log._task.done():
            break
        await asyncio.sleep(0.01)
    await log.stop()
    server.close()
    sizes = {p.name: p.stat().st_size for p in tmp_path.glob("serial.log*")}
    assert set(sizes) == {"serial.log", "serial.log.1"} and max(sizes.values()) <= 64 << 10, sizes
    got = (tmp_path / "serial.log.1").read_bytes() + (tmp_path / "serial.log").read_bytes()
    assert b"".join(chunks).endswith(got)  # the newest bytes, in order
    assert stat.S_IMODE((tmp_path / "serial.log").stat().st_mode) == 0o600


async def test_serial_log_without_a_socket_gives_up_at_once(tmp_path: Path) -> None:
    log = SerialLog(tmp_path / "none.sock", tmp_path / "serial.log")
    await asyncio.wait_for(log.start(), 0.2)
    await log.stop()


async def test_reconcile_records_why_the_host_kept_a_capsule_aside(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    fake1 = FakeHostAgent()
    async with running_app(settings, fake1) as h:
        kept = await h.running_capsule()
        fine = await h.running_capsule()
    fake2 = fake1.survivors()
    fake2.errors_on_start = {kept["id"]: "VM not running and no paused state; files kept in /q/x"}
    async with running_app(settings, fake2) as h:
        got = (await h.client.get(f"/v1/capsules/{kept['id']}")).json()
        assert got["status"] == "error"
        assert "no paused state; files kept in /q/x" in got["metadata"]["error"], got
        assert (await h.client.get(f"/v1/capsules/{fine['id']}")).json()["status"] == "running"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_confinement_detects_this_host(tmp_path: Path) -> None:
    c = jail.Confinement(tmp_path, "unit-test")
    r = c.report()
    assert r["seccomp"] is True and r["chroot"] is True
    assert r["cgroup"] in ("v1", "v2", None)
