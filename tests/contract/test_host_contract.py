"""One contract, every host agent: the same assertions on the fake, the in-process LocalHostAgent
and a RemoteHostAgent over HTTP (see conftest.py for the subjects). A control plane may hold any
of them, so what one does the others must do too."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets

import pytest
import pytest_asyncio

from wrenn_host.network.policy import EgressPolicy

from wrenn_host.api import (
    CapsuleMetrics,
    CapsuleNotFound,
    CapsuleRuntime,
    ExecResult,
    FileInfo,
    GuestError,
    GuestDefaults,
    HostAgentError,
    HostLimits,
    InvalidShape,
    ProcessInfo,
    StreamEvent,
    TemplateNotFound,
    TemplateRuntime,
)


def new_id(prefix: str = "cl-") -> str:
    return prefix + secrets.token_hex(10)


@pytest_asyncio.fixture(scope="module")
async def capsule(subject):
    cid = new_id()
    await subject.agent.create(cid, "minimal", None, None)
    yield cid
    await subject.agent.destroy(cid)


async def within(seconds: float, awaitable):
    """A bound on a wait (not a speed assertion): a hang fails instead of blocking the run."""
    async with asyncio.timeout(seconds):
        return await awaitable


# ---- the host ------------------------------------------------------------------------------


async def test_host_reports_itself(subject) -> None:
    health = await subject.agent.health()
    assert health["accelerator"] in ("kvm", "tcg")
    limits = await subject.agent.limits()
    assert isinstance(limits, HostLimits)
    assert limits.max_vcpus >= 1 and limits.min_memory_mb <= limits.max_memory_mb
    builtins = await subject.agent.builtin_templates()
    assert all(isinstance(t, TemplateRuntime) for t in builtins)
    assert "minimal" in {t.template_id for t in builtins}
    free = await subject.agent.capacity()
    assert set(free) >= {"free_memory_mb", "free_disk_mb"}


# ---- errors --------------------------------------------------------------------------------


async def test_errors_keep_their_class_and_code(subject, capsule) -> None:
    agent = subject.agent
    with pytest.raises(CapsuleNotFound):
        await agent.get("cl-" + "0" * 20)
    with pytest.raises(CapsuleNotFound):
        await agent.exec("cl-" + "0" * 20, "/bin/true", [])
    with pytest.raises(InvalidShape):
        await agent.create(new_id(), "minimal", 999, None)
    with pytest.raises(TemplateNotFound):
        await agent.create(new_id(), "no-such-template", None, None)
    with pytest.raises(TemplateNotFound):
        await agent.template_info("no-such-template")
    with pytest.raises(GuestError) as e:
        await agent.read_file(capsule, "/root/no-such-file")
    assert type(e.value) is GuestError and e.value.code == "not_found" and e.value.message
    with pytest.raises(GuestError) as e:
        await agent.exec(capsule, "/bin/true", [], cwd="/no/such/dir")
    assert e.value.code == "not_found"
    with pytest.raises(GuestError) as e:
        await agent.tcp_connect(capsule, 1)
    assert e.value.code == "refused"
    await agent.destroy("cl-" + "0" * 20)  # unknown: no error


# ---- commands and processes ----------------------------------------------------------------


async def test_exec(subject, capsule) -> None:
    r = await subject.agent.exec(capsule, "/bin/echo", ["contract-hello"], envs={"A": "1"}, cwd="/tmp",
                                 timeout_sec=20)
    assert isinstance(r, ExecResult)
    assert r.exit_code == 0 and not r.timed_out
    assert r.stdout.endswith(b"contract-hello\n") and isinstance(r.stderr, bytes)
    assert r.duration_ms >= 0


async def test_spawn_processes_kill(subject, capsule) -> None:
    agent = subject.agent
    tag = new_id("sleep-")
    info = await agent.spawn(capsule, "/bin/sleep", ["300"], tag=tag)
    assert isinstance(info, ProcessInfo) and info.tag == tag and info.pid > 0 and info.running
    listed = {p.tag: p for p in await agent.processes(capsule)}
    assert listed[tag].running and listed[tag].pid == info.pid
    with pytest.raises(GuestError) as e:
        await agent.spawn(capsule, "/bin/sleep", ["300"], tag=tag)
    assert e.value.code == "exists"
    await agent.kill(capsule, tag)
    for _ in range(100):  # the guest reaps it
        if not any(p.tag == tag and p.running for p in await agent.processes(capsule)):
            break
        await asyncio.sleep(0.1)
    assert not any(p.tag == tag and p.running for p in await agent.processes(capsule))


async def test_attach_streams_output_then_exit(subject, capsule) -> None:
    tag = new_id("attach-")
    subject.script_attach(tag, [StreamEvent("stdout", b"out\n"), StreamEvent("stderr", b"err\n"),
                                StreamEvent("exit", exit_code=3)])
    await subject.agent.spawn(capsule, "/bin/sh", ["-c", "sleep 1; echo out; echo err >&2; exit 3"], tag=tag)
    events = await within(60, _collect(subject.agent.attach(capsule, tag)))
    assert events[-1].kind == "exit" and events[-1].exit_code == 3
    assert all(isinstance(e.data, bytes) for e in events)
    assert b"".join(e.data for e in events if e.kind == "stdout") == b"out\n"
    assert b"".join(e.data for e in events if e.kind == "stderr") == b"err\n"


async def _collect(events) -> list[StreamEvent]:
    return [e async for e in events]


async def test_defaults_and_metrics(subject, capsule) -> None:
    d = await subject.agent.set_defaults(capsule, envs={"CONTRACT": "yes"})
    assert d.envs["CONTRACT"] == "yes" and d.user == "root"
    assert isinstance(d, GuestDefaults) and isinstance(d.uid, int) and d.cwd.startswith("/")
    m = await subject.agent.metrics(capsule)
    assert isinstance(m, CapsuleMetrics)
    assert m.mem_bytes and m.mem_bytes > 0 and m.disk_size_bytes and m.disk_size_bytes > 0


async def test_update_network(subject, capsule) -> None:
    await subject.agent.update_network(capsule, EgressPolicy.parse(True, ["192.0.2.10"], ["203.0.113.0/24"]))
    await subject.agent.update_network(capsule, EgressPolicy())
    with pytest.raises(CapsuleNotFound):
        await subject.agent.update_network("cl-" + "0" * 20, EgressPolicy())


# ---- files ---------------------------------------------------------------------------------


async def test_files_stream_in_and_out(subject, capsule) -> None:
    agent = subject.agent
    data = os.urandom(3 * 1024 * 1024 + 123)
    sent = []

    async def chunks():
        for i in range(0, len(data), 64 * 1024):
            sent.append(i)
            yield data[i:i + 64 * 1024]

    assert await agent.write_file(capsule, "/root/contract/big.bin", chunks()) == len(data)
    assert len(sent) > 40
    parts = [chunk async for chunk in agent.read_file_stream(capsule, "/root/contract/big.bin")]
    assert len(parts) > 1 and all(len(p) <= 4 * 1024 * 1024 for p in parts)
    assert hashlib.sha256(b"".join(parts)).digest() == hashlib.sha256(data).digest()
    assert await agent.read_file(capsule, "/root/contract/big.bin") == data

    assert await agent.write_file(capsule, "/root/contract/small.txt", b"hi\n") == 3
    entry = await agent.stat(capsule, "/root/contract/big.bin")
    assert isinstance(entry, FileInfo)
    assert (entry.type, entry.size, entry.name) == ("file", len(data), "big.bin")
    made = await agent.mkdir(capsule, "/root/contract/sub/dir")
    assert made.type == "directory" and made.path == "/root/contract/sub/dir"
    names = {e.name: e.type for e in await agent.list_dir(capsule, "/root/contract")}
    assert names == {"big.bin": "file", "small.txt": "file", "sub": "directory"}
    deep = {e.path for e in await agent.list_dir(capsule, "/root/contract", depth=2)}
    assert "/root/contract/sub/dir" in deep

    with pytest.raises(GuestError) as e:
        await agent.write_file(capsule, "/root/contract/sub", chunks())
    assert e.value.code == "is_directory"
    with pytest.raises(GuestError) as e:
        await agent.list_dir(capsule, "/root/contract/small.txt")
    assert e.value.code == "not_directory"
    await agent.remove(capsule, "/root/contract")
    with pytest.raises(GuestError) as e:
        await agent.stat(capsule, "/root/contract/big.bin")
    assert e.value.code == "not_found"


async def test_empty_file(subject, capsule) -> None:
    assert await subject.agent.write_file(capsule, "/tmp/empty", b"") == 0
    assert await subject.agent.read_file(capsule, "/tmp/empty") == b""


# ---- terminals -----------------------------------------------------------------------------


async def test_pty_session(subject, capsule) -> None:
    agent = subject.agent
    tag = new_id("pty-")
    info = await agent.pty_start(capsule, "/bin/sh", [], cols=100, rows=30, tag=tag)
    assert info.tag == tag and info.running
    assert tag in {s.tag for s in await agent.pty_sessions(capsule)}
    await agent.pty_resize(capsule, tag, 120, 40)
    await agent.pty_input(capsule, tag, b"echo contract-pty-marker\n")
    seen = b""
    stream = agent.pty_attach(capsule, tag)
    async with asyncio.timeout(60):
        async for event in stream:
            assert event.kind == "output"
            seen += event.data
            if b"contract-pty-marker" in seen:
                break
    await stream.aclose()  # leaving early detaches only: the session goes on
    assert tag in {s.tag for s in await agent.pty_sessions(capsule) if s.running}
    await agent.pty_kill(capsule, tag)
    events = await within(60, _collect(agent.pty_attach(capsule, tag)))
    assert events[-1].kind == "exit"
    assert await subject.settled(capsule) == 0
    with pytest.raises(GuestError) as e:
        await agent.pty_input(capsule, "no-such-pty", b"x")
    assert e.value.code == "no_such_process"


# ---- ports ---------------------------------------------------------------------------------


async def test_tcp_tunnel(subject, capsule) -> None:
    agent = subject.agent
    await subject.echo_service(capsule, 7007)
    tunnel = None
    for _ in range(200):  # until the service listens
        try:
            tunnel = await agent.tcp_connect(capsule, 7007)
            break
        except GuestError as e:
            assert e.code == "refused"
            await asyncio.sleep(0.1)
    assert tunnel is not None
    payload = os.urandom(512 * 1024)
    async with tunnel:
        await tunnel.write(payload)
        got = b""
        async with asyncio.timeout(60):
            while len(got) < len(payload):
                chunk = await tunnel.read()
                assert chunk, "the tunnel ended early"
                got += chunk
        assert got == payload
        await tunnel.write_eof()  # the echo service then closes its side
        async with asyncio.timeout(60):
            assert await tunnel.read() == b""
    await tunnel.close()  # idempotent
    assert await subject.settled(capsule) == 0
    with pytest.raises(HostAgentError):
        await tunnel.write(b"late")


# ---- lifecycle: pause, resume, snapshot, destroy -------------------------------------------


async def test_lifecycle(subject) -> None:
    agent = subject.agent
    cid, cid2, tid = new_id(), new_id(), new_id("tpl-")
    rt = await agent.create(cid, "minimal", 1, 512)
    assert isinstance(rt, CapsuleRuntime)
    assert (rt.capsule_id, rt.state, rt.template_id, rt.vcpus, rt.memory_mb) == (cid, "running", "minimal", 1, 512)
    assert rt.metadata.get("kernel_version")
    try:
        await agent.write_file(cid, "/root/keep.txt", b"kept\n")
        await agent.pause(cid)
        assert (await agent.get(cid)).state == "paused"
        rt = await agent.resume(cid)
        assert rt.state == "running"
        assert await agent.read_file(cid, "/root/keep.txt") == b"kept\n"

        tpl = await agent.snapshot(cid, tid)
        assert (tpl.template_id, tpl.vcpus, tpl.memory_mb) == (tid, 1, 512) and tpl.size_bytes > 0
        assert (await agent.get(cid)).state == "paused"
        assert (await agent.template_info(tid)).template_id == tid
        with pytest.raises(InvalidShape):
            await agent.create(new_id(), tid, 2, 1024)
        rt2 = await agent.create(cid2, tid, None, None)
        assert (rt2.template_id, rt2.state) == (tid, "running")
        assert await agent.read_file(cid2, "/root/keep.txt") == b"kept\n"
    finally:
        await agent.destroy(cid2)
        await agent.destroy(cid)
    with pytest.raises(CapsuleNotFound):
        await agent.get(cid)
    await agent.destroy(cid)  # idempotent
    await agent.delete_template(tid)
    with pytest.raises(TemplateNotFound):
        await agent.template_info(tid)
