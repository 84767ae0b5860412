"""Templates and paused capsules move between two real host agents (separate data directories, one
machine): a snapshot made on host A starts a capsule on host B; a paused capsule moved from A
resumes on B with its processes, memory and /tmp, and is gone from A."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from tests.conftest import kill_qemus, qemu_pids
from wrenn_control.hosts.transfer import move_paused_capsule, move_template
from wrenn_host.api import CapsuleNotFound, HostAgentError
from wrenn_host.jail import backing_of
from wrenn_host.network import EgressPolicy

pytestmark = pytest.mark.vm


def new_id() -> str:
    return "cl-" + secrets.token_hex(12)[:25]


async def sh(agent, cid, script: str):
    r = await agent.exec(cid, "/bin/sh", ["-c", script], timeout_sec=30)
    assert r.exit_code == 0, r.stderr
    return r.stdout.decode()


class Hosts:
    """Two host agents, each with its own data directory."""

    def __init__(self, tmp_path_factory):
        self.dirs = [tmp_path_factory.mktemp("host-a"), tmp_path_factory.mktemp("host-b")]
        self.agents: list = []

    @staticmethod
    async def start(data_dir, known: dict[str, str]):
        from wrenn_host.agent import LocalHostAgent

        agent = LocalHostAgent(data_dir)
        agent.spares.per_key = 0  # no spare VMs: two pools would only compete for the CPU here
        await agent.prepare([("minimal", 1, 512)])
        await agent.start(known)
        return agent

    async def restart_b(self, known: dict[str, str]):
        """b's agent process ends and a new one starts on the same data directory."""
        await self.agents[1].close()
        self.agents[1] = await self.start(self.dirs[1], known)
        return self.agents[1]

    @property
    def a(self):
        return self.agents[0]

    @property
    def b(self):
        return self.agents[1]


@pytest.fixture(scope="module")
async def hosts(tmp_path_factory):
    h = Hosts(tmp_path_factory)
    try:
        for d in h.dirs:
            h.agents.append(await h.start(d, {}))
        yield h
    finally:
        for agent in h.agents:
            for cid in list(agent._capsules):
                try:
                    await agent.destroy(cid)
                except Exception:
                    pass
            await agent.close()
        for d in h.dirs:
            kill_qemus(d)


def report(what: str, t) -> None:
    print(f"\n{what}: {t.file_bytes / (1 << 20):.0f} MiB of files, {t.bytes / (1 << 20):.1f} MiB sent "
          f"in {t.seconds:.2f} s ({t.mib_per_s:.1f} MiB/s)")


async def test_snapshot_made_on_one_host_starts_a_capsule_on_another(hosts):
    a, b = hosts.a, hosts.b
    cid, tid = new_id(), "tpl-" + secrets.token_hex(6)
    await a.create(cid, "minimal", None, None)
    await sh(a, cid, "echo made-on-a > /root/hello.txt; sync")
    await a.snapshot(cid, tid)
    await a.destroy(cid)

    moved = await move_template(a, b, tid)
    report("template", moved)
    assert moved.moved
    info = await b.template_info(tid)
    assert (info.vcpus, info.memory_mb) == (1, 512)
    assert not (await move_template(a, b, tid)).moved  # cached on b from now on

    on_b = new_id()
    await b.create(on_b, tid, None, None)
    assert await sh(b, on_b, "cat /root/hello.txt") == "made-on-a\n"
    # b's capsule backs onto b's copy, not a's
    assert backing_of(b.paths.machine_files(on_b).disk)[0] == b.paths.template_dir(tid) / "disk.qcow2"
    await b.destroy(on_b)

    # a capsule of that template, paused on a, moves to b too (its overlay rebased onto b's copy)
    from_tpl = new_id()
    await a.create(from_tpl, tid, None, None)
    await sh(a, from_tpl, "echo overlay > /tmp/o")
    await a.pause(from_tpl)
    result = await move_paused_capsule(a, b, from_tpl, tid)
    report("paused 512 MiB capsule (snapshot template: overlay only)", result.transfer)
    assert not result.template.moved and result.source_removed
    assert backing_of(b.paths.machine_files(from_tpl).disk)[0] == b.paths.template_dir(tid) / "disk.qcow2"
    await b.resume(from_tpl)
    assert await sh(b, from_tpl, "cat /tmp/o /root/hello.txt") == "overlay\nmade-on-a\n"
    await b.destroy(from_tpl)


async def test_paused_capsule_moves_and_resumes_with_its_processes(hosts):
    a, b, a_dir = hosts.a, hosts.b, hosts.dirs[0]
    cid = new_id()
    # most creates take a spare VM (started under another id, its disk through a link): move one
    a.spares.per_key = 1
    a.spares.want(await a.builtin.get("minimal", 1, 512))
    assert await a.spares.wait_full(timeout=180)
    await a.create(cid, "minimal", 1, 512)
    a.spares.per_key = 0
    assert a._capsules[cid].meta.spawned_as
    policy = EgressPolicy.parse(allow_internet_access=False, allow_out=["10.9.0.0/16"])
    await a.update_network(cid, policy)
    await a.write_file(cid, "/tmp/note.txt", b"kept across hosts")
    counter = await a.spawn(cid, "/bin/sh", ["-c", "i=0; while :; do i=$((i+1)); echo $i > /tmp/c.tmp; "
                                                   "mv /tmp/c.tmp /tmp/counter; sleep 0.2; done"])
    holder = await a.spawn(cid, "python3", ["-c", (
        "import os, time\nsecret = os.urandom(8).hex()\n"
        "while True:\n    open('/tmp/s.tmp', 'w').write(secret)\n    os.replace('/tmp/s.tmp', '/tmp/secret')\n"
        "    time.sleep(0.2)")], tag="holder")
    await asyncio.sleep(1.5)
    before = int((await a.read_file(cid, "/tmp/counter")).decode())
    secret = await a.read_file(cid, "/tmp/secret")

    with pytest.raises(HostAgentError) as e:  # running: it must be paused first
        await move_paused_capsule(a, b, cid, "minimal")
    assert e.value.code == "invalid_state"

    await a.pause(cid)
    result = await move_paused_capsule(a, b, cid, "minimal")
    report("paused 512 MiB capsule (built-in template: disk flattened)", result.transfer)
    assert result.source_removed and (await b.get(cid)).state == "paused"

    # gone from a: not known, no files, no QEMU
    with pytest.raises(CapsuleNotFound):
        await a.get(cid)
    assert not a.paths.capsule_dir(cid).exists()
    assert list(a.paths.links.iterdir()) == []
    assert qemu_pids(a_dir) == []
    assert [p.name for p in a.paths.templates.iterdir() if p.name.startswith(".")] == []

    # b's agent restarts before the resume: the capsule it received is on disk, paused; a
    # half-written transfer (as a crash mid-stream leaves it) is cleaned up at start
    leftover = b.paths.templates / f".in-capsule-{new_id()}-0badf00d"
    leftover.mkdir()
    (leftover / "memory").write_bytes(b"half")
    b = await hosts.restart_b({cid: "paused"})
    assert (await b.get(cid)).state == "paused"
    assert not leftover.exists()

    await b.resume(cid)
    assert await b.read_file(cid, "/tmp/note.txt") == b"kept across hosts"
    after = int((await b.read_file(cid, "/tmp/counter")).decode())
    assert before <= after <= before + 3  # continued where it stopped, not restarted
    running = {p.pid for p in await b.processes(cid) if p.running}
    assert {counter.pid, holder.pid} <= running  # the same processes
    await asyncio.sleep(1.0)
    assert int((await b.read_file(cid, "/tmp/counter")).decode()) > after
    assert await b.read_file(cid, "/tmp/secret") == secret  # memory only the process held
    assert b._capsules[cid].meta.policy == policy  # its egress rules came along
    await b.destroy(cid)
