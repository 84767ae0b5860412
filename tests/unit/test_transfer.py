"""Moving templates and paused capsules between hosts, without VMs: the archive format, the local
host agent's install (staging, checksums, rebased overlays) on fabricated files, and the control
plane's move functions against the fake host agent."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.unit.fake_host_agent import FakeHostAgent
from wrenn_control.hosts.transfer import move_paused_capsule, move_template
from wrenn_host import archive
from wrenn_host.api import (
    ArchiveFile,
    ArchiveManifest,
    CapsuleNotFound,
    HostAgentError,
    TemplateNotFound,
    from_wire,
    to_wire,
)
from wrenn_host.jail import backing_of

MiB = 1 << 20


def sparse_file(path: Path, size: int, pieces: dict[int, bytes]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in pieces.items():
            f.seek(off)
            f.write(data)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def collect(stream) -> list[bytes]:
    return [chunk async for chunk in stream]


async def replay(chunks: list[bytes]):
    for c in chunks:
        yield c


# ---------------------------------------------------------------------- the archive format

def test_manifest_round_trips_through_the_wire_form():
    m = ArchiveManifest("template", "tpl-1", [ArchiveFile("memory", 5, "ab" * 32, 0o600)], {"format": "x"})
    assert from_wire(ArchiveManifest, json.loads(json.dumps(to_wire(m)))) == m
    assert m.size == 5


async def test_sparse_files_arrive_identical_and_stay_sparse(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(), dst.mkdir()
    sparse_file(src / "memory", 64 * MiB, {0: b"head", 10 * MiB: os.urandom(3 * MiB + 17), 63 * MiB: b"tail"})
    sparse_file(src / "zeros", 8 * MiB, {2 * MiB: bytes(2 * MiB)})  # allocated but all zero
    (src / "state").write_bytes(os.urandom(70_000))
    files = [(n, src / n) for n in ("memory", "zeros", "state")]
    m = ArchiveManifest("template", "t", [archive.describe(p) for _, p in files], {})
    chunks = await collect(archive.stream_files(files))
    sent = sum(len(c) for c in chunks)
    assert sent < 4 * MiB  # holes and zero chunks are not sent
    received = await archive.receive_into(dst, replay(chunks), m)
    assert received == sent
    for name, path in files:
        assert sha(dst / name) == sha(path)
        assert (dst / name).stat().st_size == path.stat().st_size
    assert (dst / "memory").stat().st_blocks * 512 < 8 * MiB
    assert (dst / "zeros").stat().st_blocks * 512 < MiB


async def test_damaged_or_short_streams_are_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "state").write_bytes(os.urandom(3 * MiB))
    m = ArchiveManifest("template", "t", [archive.describe(src / "state")], {})
    chunks = await collect(archive.stream_files([("state", src / "state")]))

    flipped = [bytes(c[:-1]) + bytes([c[-1] ^ 1]) if len(c) > 1000 else c for c in chunks]
    (tmp_path / "a").mkdir()
    with pytest.raises(HostAgentError) as e:
        await archive.receive_into(tmp_path / "a", replay(flipped), m)
    assert e.value.code == "checksum_mismatch"

    (tmp_path / "b").mkdir()
    with pytest.raises(HostAgentError) as e:
        await archive.receive_into(tmp_path / "b", replay(chunks[:-3]), m)
    assert e.value.code == "invalid_archive"

    wrong = dataclasses.replace(m, files=[dataclasses.replace(m.files[0], size=5)])
    (tmp_path / "c").mkdir()
    with pytest.raises(HostAgentError) as e:
        await archive.receive_into(tmp_path / "c", replay(chunks), wrong)
    assert e.value.code == "checksum_mismatch"

    evil = dataclasses.replace(m, files=[dataclasses.replace(m.files[0], path="../state")])
    with pytest.raises(HostAgentError):
        await archive.receive_into(tmp_path / "c", replay(chunks), evil)
    assert not (tmp_path / "state").exists()


# ---------------------------------------------------------------------- the local host agent

def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.fixture
async def agents(tmp_path):
    from wrenn_host.agent import LocalHostAgent

    kernel = tmp_path / "kernel"
    kernel.mkdir()
    (kernel / "vmlinux").write_bytes(b"k")
    (kernel / "initrd.img").write_bytes(b"i")
    made = []
    for name in ("a", "b"):
        agent = LocalHostAgent(tmp_path / name, network=False)
        agent._accel = "tcg"  # no accelerator probe: nothing here boots
        made.append(agent)
    yield made[0], made[1], kernel
    for agent in made:
        await agent.close()
        shutil.rmtree(agent.paths.run, ignore_errors=True)  # (kept for capsules that run on: none here)


def fake_template(agent, template_id: str, kernel: Path) -> Path:
    """A snapshot template's files as LocalHostAgent.snapshot leaves them (no VM behind them)."""
    from wrenn_host.templates import TemplateSnapshot, make_overlay_seed
    from wrenn_host.vmm.qemu import MachineSpec

    d = agent.paths.template_dir(template_id)
    d.mkdir()
    sparse_file(d / "memory", 128 * MiB, {MiB: os.urandom(MiB), 100 * MiB: b"memory"})
    (d / "state").write_bytes(b"QEVM" + os.urandom(50_000))
    qemu_img("create", "-q", "-f", "qcow2", str(d / "disk.qcow2"), "64M")
    make_overlay_seed(d / "disk.qcow2", d / "disk.qcow2", d / "overlay.qcow2")
    spec = MachineSpec(vcpus=1, memory_mb=128, kernel=kernel / "vmlinux", initrd=kernel / "initrd.img",
                       cmdline="console=ttyS0", accel="tcg", nic=False)
    TemplateSnapshot(template_id, d, spec, "6.1-test").save_meta()
    return d


def fake_paused_capsule(agent, capsule_id: str, template_id: str) -> Path:
    from wrenn_host.capsule import CapsuleMeta, LocalCapsule
    from wrenn_host.templates import TemplateSnapshot

    tdir = agent.paths.template_dir(template_id)
    d = agent.paths.capsule_dir(capsule_id)
    d.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(tdir / "disk.qcow2"), "-F", "qcow2", str(d / "disk.qcow2"))
    sparse_file(d / "memory", 128 * MiB, {5 * MiB: os.urandom(2 * MiB)})
    (d / "state").write_bytes(b"QEVM" + os.urandom(60_000))
    meta = CapsuleMeta(capsule_id, template_id, str(tdir), 1, 128, "6.1-test",
                       network={"allow_out": ["10.0.0.0/8"]}, slot=3, spawned_as="spare-x")
    meta.save(d / "meta.json")
    agent._capsules[capsule_id] = LocalCapsule(capsule_id, agent.host, meta, TemplateSnapshot.load(tdir))
    return d


async def test_template_moves_between_local_agents_and_is_cached(agents):
    a, b, kernel = agents
    src = fake_template(a, "tpl-1", kernel)
    m1 = await a.archive_manifest("template", "tpl-1")
    assert [f.path for f in m1.files] == ["memory", "state", "disk.qcow2"]
    assert m1.files[0].sha256 == sha(src / "memory") and m1.files[0].size == 128 * MiB
    assert (src / "manifest.json").exists() and await a.archive_manifest("template", "tpl-1") == m1

    moved = await move_template(a, b, "tpl-1")
    assert moved.moved and moved.bytes < 4 * MiB
    info = await b.template_info("tpl-1")
    assert (info.vcpus, info.memory_mb) == (1, 128)
    dst = b.paths.template_dir("tpl-1")
    for name in ("memory", "state", "disk.qcow2"):
        assert sha(dst / name) == sha(src / name)
    # its overlay seed is b's own: capsules made from it back onto b's copy of the disk
    assert backing_of(dst / "overlay.qcow2")[0] == dst / "disk.qcow2"
    assert not (await move_template(a, b, "tpl-1")).moved  # the cache
    assert [p.name for p in b.paths.templates.iterdir()] == ["tpl-1"]  # no staging left


async def test_damaged_template_is_refused_and_nothing_installed(agents):
    a, b, kernel = agents
    fake_template(a, "tpl-2", kernel)
    m = await a.archive_manifest("template", "tpl-2")
    bad = dataclasses.replace(m, files=[dataclasses.replace(m.files[0], sha256="0" * 64), *m.files[1:]])
    with pytest.raises(HostAgentError) as e:
        await b.write_archive("template", "tpl-2", a.read_archive("template", "tpl-2"), bad)
    assert e.value.code == "checksum_mismatch"
    assert list(b.paths.templates.iterdir()) == []
    with pytest.raises(TemplateNotFound):
        await b.template_info("tpl-2")
    with pytest.raises(TemplateNotFound):
        await a.archive_manifest("template", "minimal")  # built-ins are built by every host


async def test_paused_capsule_moves_with_its_overlay_rebased(agents):
    a, b, kernel = agents
    fake_template(a, "tpl-3", kernel)
    src = fake_paused_capsule(a, "cap-1", "tpl-3")
    memory_sha = sha(src / "memory")
    with pytest.raises(TemplateNotFound):  # the template must be there first
        await b.write_archive("capsule", "cap-1", a.read_archive("capsule", "cap-1"),
                              await a.archive_manifest("capsule", "cap-1"))
    assert not b.paths.capsule_dir("cap-1").exists()

    result = await move_paused_capsule(a, b, "cap-1", "tpl-3")
    assert result.template.moved and result.transfer.moved and result.source_removed
    assert (await b.get("cap-1")).state == "paused"
    assert not b.paths.capsule_run_dir("cap-1").exists()  # its sockets' directory is made when it resumes
    dst = b.paths.capsule_dir("cap-1")
    assert sha(dst / "memory") == memory_sha
    assert backing_of(dst / "disk.qcow2")[0] == b.paths.template_dir("tpl-3") / "disk.qcow2"
    meta = json.loads((dst / "meta.json").read_text())
    assert meta["network"] == {"allow_out": ["10.0.0.0/8"]}  # its egress policy came along
    assert (meta["slot"], meta["spawned_as"], meta["template_dir"]) == (None, "", str(b.paths.template_dir("tpl-3")))
    with pytest.raises(CapsuleNotFound):
        await a.get("cap-1")
    assert not src.exists()
    assert sorted(p.name for p in b.paths.templates.iterdir()) == ["tpl-3"]


async def test_running_capsule_does_not_move(agents):
    a, b, kernel = agents
    fake_template(a, "tpl-4", kernel)
    fake_paused_capsule(a, "cap-2", "tpl-4")

    class Alive:
        def is_alive(self) -> bool:
            return True

    a._capsules["cap-2"].machine = Alive()
    with pytest.raises(HostAgentError) as e:
        await a.archive_manifest("capsule", "cap-2")
    assert e.value.code == "invalid_state"
    a._capsules["cap-2"].machine = None


# ---------------------------------------------------------------------- control plane, fake hosts

async def paused_fake_capsule(fake: FakeHostAgent, cid: str, template: str = "minimal") -> None:
    await fake.create(cid, template, None, None)
    await fake.write_file(cid, "/tmp/note", b"kept")
    await fake.pause(cid)


async def test_fake_hosts_move_a_template_once():
    a, b = FakeHostAgent(), FakeHostAgent()
    await a.create("c1", "minimal", None, None)
    await a.snapshot("c1", "tpl")
    assert (await move_template(a, b, "tpl")).moved
    await b.create("c2", "tpl", None, None)
    assert not (await move_template(a, b, "tpl")).moved
    assert not (await move_template(a, b, "minimal")).moved  # built-in: every host has its own
    assert b.ops("write_archive") == ["tpl"]


async def test_fake_damaged_template_is_refused():
    a, b = FakeHostAgent(), FakeHostAgent()
    await a.create("c1", "minimal", None, None)
    await a.snapshot("c1", "tpl")
    a.archive_tamper = lambda c: c[:-1] + bytes([c[-1] ^ 0xFF])
    with pytest.raises(HostAgentError) as e:
        await move_template(a, b, "tpl")
    assert e.value.code == "checksum_mismatch"
    assert "tpl" not in b.templates


async def test_fake_paused_capsule_moves_and_resumes_on_the_other_host():
    a, b = FakeHostAgent(), FakeHostAgent()
    await paused_fake_capsule(a, "c1")
    recorded = []

    async def record():
        recorded.append(("c1", "b", "c1" in a.capsules))

    result = await move_paused_capsule(a, b, "c1", "minimal", on_moved=record)
    assert recorded == [("c1", "b", True)]  # recorded before the source copy goes
    assert result.capsule.state == "paused" and result.source_removed and not result.template.moved
    assert "c1" not in a.capsules
    await b.resume("c1")
    assert await b.read_file("c1", "/tmp/note") == b"kept"


async def test_fake_capsule_from_a_snapshot_takes_its_template_along():
    a, b = FakeHostAgent(), FakeHostAgent()
    await a.create("c0", "minimal", None, None)
    await a.snapshot("c0", "tpl")
    await paused_fake_capsule(a, "c1", "tpl")
    result = await move_paused_capsule(a, b, "c1", "tpl")
    assert result.template.moved and "tpl" in b.templates and "tpl" in a.templates


async def test_fake_running_capsule_does_not_move():
    a, b = FakeHostAgent(), FakeHostAgent()
    await a.create("c1", "minimal", None, None)
    with pytest.raises(HostAgentError) as e:
        await move_paused_capsule(a, b, "c1", "minimal")
    assert e.value.code == "invalid_state"
    with pytest.raises(HostAgentError) as e:
        await a.archive_manifest("capsule", "c1")
    assert e.value.code == "invalid_state"
    assert a.capsules["c1"].state == "running" and "c1" not in b.capsules


@pytest.mark.parametrize("failure", ["damaged", "write", "record"])
async def test_fake_failed_move_keeps_the_source_and_cleans_the_destination(failure):
    a, b = FakeHostAgent(), FakeHostAgent()
    await paused_fake_capsule(a, "c1")

    async def record():
        if failure == "record":
            raise RuntimeError("database down")

    if failure == "damaged":
        a.archive_tamper = lambda c: bytes(len(c))
    if failure == "write":
        b.fail("write_archive", HostAgentError("disk full"))
    with pytest.raises((HostAgentError, RuntimeError)):
        await move_paused_capsule(a, b, "c1", "minimal", on_moved=record)
    assert a.capsules["c1"].state == "paused" and a.capsules["c1"].files["/tmp/note"] == b"kept"
    assert "c1" not in b.capsules
    assert a.ops("destroy") == []


async def test_fake_move_refuses_an_id_the_destination_has():
    a, b = FakeHostAgent(), FakeHostAgent()
    await paused_fake_capsule(a, "c1")
    await b.create("c1", "minimal", None, None)
    with pytest.raises(HostAgentError) as e:
        await move_paused_capsule(a, b, "c1", "minimal")
    assert e.value.code == "exists"
    assert "c1" in a.capsules and b.capsules["c1"].state == "running" and b.ops("destroy") == []


async def test_bad_kind_or_id_is_a_clear_error(agents):
    a, _, _ = agents
    for kind, oid in (("volume", "x"), ("template", "../etc"), ("capsule", "")):
        with pytest.raises(HostAgentError) as e:
            await a.archive_manifest(kind, oid)
        assert e.value.code == "invalid"


async def test_incompatible_snapshot_is_refused(agents):
    a, b, kernel = agents
    fake_template(a, "tpl-5", kernel)
    m = await a.archive_manifest("template", "tpl-5")
    b._accel = "kvm"
    with pytest.raises(HostAgentError) as e:
        await b.write_archive("template", "tpl-5", a.read_archive("template", "tpl-5"), m)
    assert e.value.code == "incompatible"
    assert list(b.paths.templates.iterdir()) == []


async def test_cut_stream_leaves_nothing_on_the_receiver(agents):
    a, b, kernel = agents
    fake_template(a, "tpl-6", kernel)
    await move_template(a, b, "tpl-6")
    fake_paused_capsule(a, "cap-6", "tpl-6")
    m = await a.archive_manifest("capsule", "cap-6")
    chunks = await collect(a.read_archive("capsule", "cap-6"))
    with pytest.raises(HostAgentError) as e:  # the connection broke half way
        await b.write_archive("capsule", "cap-6", replay(chunks[:len(chunks) // 2]), m)
    assert e.value.code == "invalid_archive"
    with pytest.raises(CapsuleNotFound):
        await b.get("cap-6")
    assert not b.paths.capsule_dir("cap-6").exists()
    assert [p.name for p in b.paths.templates.iterdir()] == ["tpl-6"]
    assert (await a.get("cap-6")).state == "paused"  # the source is untouched


async def test_capsule_of_a_deleted_template_moves_flattened(agents):
    a, b, kernel = agents
    fake_template(a, "tpl-7", kernel)
    fake_paused_capsule(a, "cap-7", "tpl-7")
    await a.delete_template("tpl-7")  # its files stay while cap-7 uses them
    result = await move_paused_capsule(a, b, "cap-7", "tpl-7")
    assert not result.template.moved and result.source_removed
    dst = b.paths.capsule_dir("cap-7")
    assert backing_of(dst / "disk.qcow2") is None  # standalone: b never had the template
    assert json.loads((dst / "meta.json").read_text())["template_dir"] == str(dst / "template")
    assert (await b.get("cap-7")).state == "paused"
    assert not b.paths.template_dir("tpl-7").exists()
    assert not a.paths.template_dir("tpl-7").exists()  # its last capsule left: swept on a
