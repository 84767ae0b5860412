"""The host agent with real microVMs: create from template, exec, files, pause/resume, snapshots."""

from __future__ import annotations

import asyncio
import hashlib
import os
import platform
import secrets
import shutil

import pytest

from tests.conftest import qemu_pids
from wrenn_host.api import GuestError, InvalidShape, TemplateNotFound
from wrenn_host.capsule import LocalCapsule

pytestmark = pytest.mark.vm


def new_id() -> str:
    return "cl-" + secrets.token_hex(12)[:25]


async def sh(agent, cid, script: str, timeout: float = 30):
    return await agent.exec(cid, "/bin/sh", ["-c", script], timeout_sec=timeout)


@pytest.fixture
async def capsule(host_agent):
    cid = new_id()
    await host_agent.create(cid, "minimal", None, None)
    yield cid
    await host_agent.destroy(cid)


async def test_guest_runs_its_own_kernel_with_default_shape(host_agent, capsule):
    r = await sh(host_agent, capsule, "uname -r; nproc; grep MemTotal /proc/meminfo")
    release, nproc, mem = r.stdout.decode().splitlines()
    assert r.exit_code == 0
    assert release != platform.release()
    assert release.endswith("-cloud-amd64")
    assert nproc == "1"
    assert 400_000 < int(mem.split()[1]) <= 512 * 1024  # kB, minus what the kernel reserves
    info = await host_agent.get(capsule)
    assert (info.state, info.vcpus, info.memory_mb) == ("running", 1, 512)
    assert info.metadata["kernel_version"] == release


async def test_exec_env_cwd_exit_code_and_binary_output(host_agent, capsule):
    r = await host_agent.exec(capsule, "/bin/sh", ["-c", 'echo "$GREETING from $(pwd)"; echo oops >&2; exit 3'],
                              envs={"GREETING": "hi"}, cwd="/tmp")
    assert (r.stdout, r.stderr, r.exit_code) == (b"hi from /tmp\n", b"oops\n", 3)
    r = await sh(host_agent, capsule, "printf '\\000\\001\\377\\376'")
    assert r.stdout == b"\x00\x01\xff\xfe"


async def test_exec_errors(host_agent, capsule):
    r = await host_agent.exec(capsule, "/no/such/binary", [])
    assert r.exit_code == 127
    assert b"not found" in r.stderr
    r = await sh(host_agent, capsule, "nosuchcommand")
    assert r.exit_code == 127
    started = asyncio.get_running_loop().time()
    r = await sh(host_agent, capsule, "sleep 60", timeout=1)
    assert r.timed_out and r.exit_code != 0
    assert asyncio.get_running_loop().time() - started < 15
    with pytest.raises(GuestError) as e:
        await host_agent.exec(capsule, "/bin/true", [], cwd="/no/such/dir")
    assert e.value.code == "not_found"


async def test_files_round_trip_10mb_and_errors(host_agent, capsule):
    data = os.urandom(10 * 1024 * 1024)
    assert await host_agent.write_file(capsule, "/root/big.bin", data) == len(data)
    r = await sh(host_agent, capsule, "sha256sum /root/big.bin")
    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    assert await host_agent.read_file(capsule, "/root/big.bin") == data
    with pytest.raises(GuestError) as e:
        await host_agent.read_file(capsule, "/root/missing.txt")
    assert e.value.code == "not_found"
    entry = await host_agent.mkdir(capsule, "/root/a/b")
    assert entry.type == "directory" and entry.path == "/root/a/b"
    entries = await host_agent.list_dir(capsule, "/root", depth=1)
    names = {e.name: e for e in entries}
    assert names["big.bin"].size == len(data) and names["big.bin"].type == "file"
    assert names["a"].type == "directory"
    await host_agent.remove(capsule, "/root/a")
    with pytest.raises(GuestError):
        await host_agent.stat(capsule, "/root/a")


async def test_pause_resume_keeps_processes_files_and_memory(host_agent, capsule):
    await host_agent.write_file(capsule, "/tmp/note.txt", b"kept")
    # A counter loop, and a python process holding a random value only in its memory.
    await host_agent.spawn(capsule, "/bin/sh", ["-c", "i=0; while :; do i=$((i+1)); echo $i > /tmp/c.tmp; mv /tmp/c.tmp /tmp/counter; sleep 0.2; done"])
    await host_agent.spawn(capsule, "python3", ["-c", (
        "import os, time\nsecret = os.urandom(8).hex()\n"
        "while True:\n    open('/tmp/s.tmp', 'w').write(secret)\n    os.replace('/tmp/s.tmp', '/tmp/secret')\n"
        "    time.sleep(0.2)")], tag="holder")
    await asyncio.sleep(1.5)
    before = int((await host_agent.read_file(capsule, "/tmp/counter")).decode())
    secret = await host_agent.read_file(capsule, "/tmp/secret")
    assert before > 0 and len(secret) == 16

    await host_agent.pause(capsule)
    assert qemu_pids(capsule) == []
    assert (await host_agent.get(capsule)).state == "paused"
    await asyncio.sleep(1.0)
    await host_agent.resume(capsule)

    after_resume = int((await host_agent.read_file(capsule, "/tmp/counter")).decode())
    assert before <= after_resume <= before + 3  # continued from where it stopped, not restarted
    await asyncio.sleep(1.0)
    later = int((await host_agent.read_file(capsule, "/tmp/counter")).decode())
    assert later > after_resume  # still counting
    assert await host_agent.read_file(capsule, "/tmp/note.txt") == b"kept"
    assert await host_agent.read_file(capsule, "/tmp/secret") == secret
    assert "holder" in {p.tag for p in await host_agent.processes(capsule)}


async def test_resume_after_the_hosts_run_directory_went_away(host_agent, capsule):
    """/run is empty after a reboot of the host: a paused capsule still resumes."""
    await host_agent.write_file(capsule, "/tmp/before-reboot", b"yes")
    await host_agent.pause(capsule)
    shutil.rmtree(host_agent.paths.capsule_run_dir(capsule))
    await host_agent.resume(capsule)
    assert await host_agent.read_file(capsule, "/tmp/before-reboot") == b"yes"


async def test_clones_are_independent_with_own_identity(host_agent):
    a, b = new_id(), new_id()
    await asyncio.gather(host_agent.create(a, "minimal", None, None), host_agent.create(b, "minimal", None, None))
    try:
        await sh(host_agent, a, "echo only-in-a > /root/mine")
        r = await sh(host_agent, b, "cat /root/mine")
        assert r.exit_code != 0
        outs = {}
        for cid in (a, b):
            r = await sh(host_agent, cid, "hostname; head -c 16 /dev/urandom | xxd -p; "
                                          "python3 -c 'import random; print(random.random())'")
            outs[cid] = r.stdout.decode().split()
        assert outs[a][0] == a and outs[b][0] == b
        assert outs[a][1] != outs[b][1]
        assert outs[a][2] != outs[b][2]
    finally:
        await asyncio.gather(host_agent.destroy(a), host_agent.destroy(b))


async def test_snapshot_template_carries_files_and_processes(host_agent, capsule):
    await host_agent.write_file(capsule, "/root/state.txt", b"from the snapshot")
    await host_agent.spawn(capsule, "/bin/sh", ["-c", "while :; do date +%s%N > /tmp/a.tmp; mv /tmp/a.tmp /tmp/alive; sleep 0.2; done"], tag="ticker")
    r = await sh(host_agent, capsule, "for i in $(seq 100); do [ -s /tmp/alive ] && exit 0; sleep 0.1; done; exit 1")
    assert r.exit_code == 0  # the ticker is running before the snapshot is taken
    tid = "tpl-" + secrets.token_hex(4)
    tpl = await host_agent.snapshot(capsule, tid)
    assert (tpl.vcpus, tpl.memory_mb) == (1, 512) and tpl.size_bytes > 0
    assert (await host_agent.get(capsule)).state == "paused"
    child = new_id()
    await host_agent.create(child, tid, None, None)
    try:
        assert await host_agent.read_file(child, "/root/state.txt") == b"from the snapshot"
        assert "ticker" in {p.tag for p in await host_agent.processes(child)}
        first = await host_agent.read_file(child, "/tmp/alive")
        await asyncio.sleep(1.5)
        assert await host_agent.read_file(child, "/tmp/alive") != first
        with pytest.raises(InvalidShape):
            await host_agent.create(new_id(), tid, 2, None)
    finally:
        await host_agent.destroy(child)
    await host_agent.delete_template(tid)
    with pytest.raises(TemplateNotFound):
        await host_agent.create(new_id(), tid, None, None)


async def test_destroy_leaves_nothing(host_agent):
    cid = new_id()
    await host_agent.create(cid, "minimal", None, None)
    assert len(qemu_pids(cid)) == 1
    await host_agent.destroy(cid)
    assert qemu_pids(cid) == []
    assert not host_agent.paths.capsule_dir(cid).exists()
    assert not host_agent.paths.capsule_run_dir(cid).exists()
    await host_agent.destroy(cid)  # idempotent


async def test_a_create_from_a_spare_tells_its_disk_figures(host_agent):
    """Served from a spare VM, a create says what the guest's disk holds: its first GET then
    needs no guest call."""
    assert await host_agent.spares.wait_full(60)
    cid = new_id()
    runtime = await host_agent.create(cid, "minimal", None, None)
    try:
        measured = await host_agent.metrics(cid)
        assert runtime.disk_size_bytes == measured.disk_size_bytes
        assert runtime.disk_used_bytes is not None and measured.disk_bytes is not None
        assert abs(runtime.disk_used_bytes - measured.disk_bytes) < 1024 * 1024
        await sh(host_agent, cid, "head -c 8388608 /dev/urandom > /root/blob && sync")
        assert (await host_agent.metrics(cid)).disk_bytes >= runtime.disk_used_bytes + 7 * 1024 * 1024
    finally:
        await host_agent.destroy(cid)


async def test_restores_are_taken_in_turn(host_agent, monkeypatch):
    """Creates without a spare restore one after the other up to the host's bound (here 1):
    all of them end running, none waits for the others to finish together."""
    monkeypatch.setattr(host_agent, "_restores", asyncio.Semaphore(1))
    monkeypatch.setattr(host_agent.spares, "take", lambda snap: None)  # every create restores
    in_flight, most = 0, 0
    build = LocalCapsule.build

    async def counted(self, *args, **kwargs):
        nonlocal in_flight, most
        if kwargs.get("spare"):
            return await build(self, *args, **kwargs)
        in_flight += 1
        most = max(most, in_flight)
        try:
            return await build(self, *args, **kwargs)
        finally:
            in_flight -= 1
    monkeypatch.setattr(LocalCapsule, "build", counted)
    ids = [new_id() for _ in range(3)]
    try:
        await asyncio.gather(*(host_agent.create(cid, "minimal", None, None) for cid in ids))
        assert most == 1
        for cid in ids:
            assert (await sh(host_agent, cid, "hostname")).stdout.decode().strip() == cid
    finally:
        await asyncio.gather(*(host_agent.destroy(cid) for cid in ids))


async def test_base_python_template(host_agent):
    cid = new_id()
    await host_agent.create(cid, "base-python", None, None)
    try:
        r = await sh(host_agent, cid, "python3 -c 'print(1+1)'; python3 -m pip --version; python3 -m venv --without-pip /tmp/v && /tmp/v/bin/python -c 'import sys; print(sys.prefix)' && echo venv-ok")
        lines = r.stdout.decode().splitlines()
        assert lines[0] == "2"
        assert lines[1].startswith("pip ")
        assert lines[2:] == ["/tmp/v", "venv-ok"]
    finally:
        await host_agent.destroy(cid)


async def test_overwritten_template_never_serves_stale_memory(host_agent, capsule):
    tid = "tpl-" + secrets.token_hex(4)
    await host_agent.write_file(capsule, "/root/v.txt", b"one")
    await host_agent.snapshot(capsule, tid)
    first = new_id()
    await host_agent.create(first, tid, None, None)  # also fills the spare memory copies
    await asyncio.sleep(1)
    await host_agent.destroy(first)
    await host_agent.resume(capsule)
    await host_agent.write_file(capsule, "/root/v.txt", b"two")
    await sh(host_agent, capsule, "echo in-memory-two > /dev/shm/m")
    await host_agent.snapshot(capsule, tid)  # same id: overwrite
    second = new_id()
    await host_agent.create(second, tid, None, None)
    try:
        assert await host_agent.read_file(second, "/root/v.txt") == b"two"
        assert await host_agent.read_file(second, "/dev/shm/m") == b"in-memory-two\n"
    finally:
        await host_agent.destroy(second)
        await host_agent.delete_template(tid)
