"""Every SDK method, sync and async, against a real server and real capsules."""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import typer
from typer.testing import CliRunner

from wrenn import (
    AsyncCapsule,
    AsyncWrennClient,
    BackgroundProcess,
    Capsule,
    CapsuleInfo,
    ExecResult,
    Template,
    WrennAuthenticationError,
    WrennClient,
    WrennConflictError,
    WrennError,
    WrennForbiddenError,
    WrennNotFoundError,
    WrennValidationError,
)

pytestmark = pytest.mark.vm


@pytest.fixture
def env(wrenn_server, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WRENN_API_KEY", wrenn_server.api_key)
    monkeypatch.setenv("WRENN_BASE_URL", wrenn_server.base_url)
    monkeypatch.delenv("WRENN_PROXY_DOMAIN", raising=False)
    return wrenn_server


@pytest.fixture
def client(env) -> Iterator[WrennClient]:
    """A client that destroys, at the end, every capsule created during the test."""
    with WrennClient() as c:
        before = {cap.id for cap in c.capsules.list()}
        yield c
        for cap in c.capsules.list():
            if cap.id not in before and cap.status != "stopped":
                with contextlib.suppress(WrennError):
                    c.capsules.destroy(cap.id)


@pytest.fixture
async def aclient(env) -> AsyncIterator[AsyncWrennClient]:
    async with AsyncWrennClient() as c:
        before = {cap.id for cap in await c.capsules.list()}
        yield c
        for cap in await c.capsules.list():
            if cap.id not in before and cap.status != "stopped":
                with contextlib.suppress(WrennError):
                    await c.capsules.destroy(cap.id)


def _name(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


# --- low-level clients ---------------------------------------------------------------------


def test_client_capsule_lifecycle(client: WrennClient) -> None:
    created = client.capsules.create(
        template="minimal", vcpus=1, memory_mb=512, timeout_sec=0, metadata={"suite": "sdk"}
    )
    assert created.id.startswith("cl-") and created.status in ("pending", "starting", "running")
    assert created.created_at is not None and created.created_at.tzinfo is not None
    running = client.capsules.wait(created.id)
    assert running.status == "running" and running.started_at is not None

    info = client.capsules.get(created.id)
    assert (info.template, info.vcpus, info.memory_mb, info.timeout_sec) == ("minimal", 1, 512, 0)
    assert info.metadata is not None and info.metadata.get("suite") == "sdk"
    listed = client.capsules.list()
    assert created.id in [c.id for c in listed]
    assert listed[0].created_at >= listed[-1].created_at  # newest first

    assert client.capsules.pause(created.id).status == "paused"
    with pytest.raises(WrennConflictError) as conflict:
        client.capsules.pause(created.id)
    assert conflict.value.code == "invalid_state" and conflict.value.status_code == 409
    with pytest.raises(WrennConflictError):
        client.capsules.ping(created.id)  # only a running capsule can be pinged
    resumed = client.capsules.resume(created.id)
    assert client.capsules.wait(resumed.id).status == "running"
    assert client.capsules.ping(created.id) is None

    assert client.capsules.destroy(created.id) is None
    assert client.capsules.get(created.id).status == "stopped"


def test_client_errors(client: WrennClient, env) -> None:
    with pytest.raises(WrennNotFoundError) as missing:
        client.capsules.get("cl-doesnotexist0000000000000")
    assert (missing.value.code, missing.value.status_code) == ("not_found", 404)
    with pytest.raises(WrennValidationError):
        client.capsules.create(vcpus=0)
    with pytest.raises(WrennValidationError):
        client.capsules.create(template="no-such-template")
    with (
        WrennClient(api_key="wrn_" + "0" * 32) as stranger,
        pytest.raises(WrennAuthenticationError) as denied,
    ):
        stranger.capsules.list()
    assert denied.value.status_code == 401
    with pytest.raises(WrennForbiddenError):
        client.snapshots.delete("minimal")
    with pytest.raises(WrennNotFoundError):
        client.snapshots.delete(_name("never-made"))


async def test_async_client_capsule_lifecycle(aclient: AsyncWrennClient) -> None:
    created = await aclient.capsules.create(template="minimal")
    assert (await aclient.capsules.wait(created.id)).status == "running"
    assert (await aclient.capsules.get(created.id)).id == created.id
    assert created.id in [c.id for c in await aclient.capsules.list()]
    assert (await aclient.capsules.pause(created.id)).status == "paused"
    await aclient.capsules.resume(created.id)
    assert (await aclient.capsules.wait(created.id)).status == "running"
    await aclient.capsules.ping(created.id)
    await aclient.capsules.destroy(created.id)
    assert (await aclient.capsules.get(created.id)).status == "stopped"
    with pytest.raises(WrennNotFoundError):
        await aclient.capsules.get("cl-doesnotexist0000000000000")


def test_client_snapshots(client: WrennClient) -> None:
    source = client.capsules.create(template="minimal")
    client.capsules.wait(source.id)
    name = _name("sdk-snap")
    template = client.snapshots.create(capsule_id=source.id, name=name)
    assert isinstance(template, Template)
    assert (template.name, template.type) == (name, "snapshot")
    assert client.capsules.get(source.id).status == "paused"

    with pytest.raises(WrennConflictError) as taken:
        client.snapshots.create(source.id, name=name)
    assert taken.value.code == "template_name_taken"
    assert client.snapshots.create(source.id, name=name, overwrite=True).name == name
    with pytest.raises(WrennConflictError) as reserved:
        client.snapshots.create(source.id, name="minimal")
    assert reserved.value.code == "name_reserved"

    assert name in [t.name for t in client.snapshots.list(type="snapshot")]
    assert all(t.type == "base" for t in client.snapshots.list(type="base"))
    assert "minimal" in [t.name for t in client.snapshots.list()]

    generated = client.snapshots.create(source.id)
    assert generated.name.startswith("template-")
    client.snapshots.delete(generated.name)
    client.snapshots.delete(name)
    assert name not in [t.name for t in client.snapshots.list()]


async def test_async_client_snapshots(aclient: AsyncWrennClient) -> None:
    source = await aclient.capsules.create(template="minimal")
    await aclient.capsules.wait(source.id)
    name = _name("sdk-asnap")
    assert (await aclient.snapshots.create(source.id, name=name)).name == name
    assert name in [t.name for t in await aclient.snapshots.list(type="snapshot")]
    await aclient.snapshots.delete(name)
    assert name not in [t.name for t in await aclient.snapshots.list()]


# --- Capsule -------------------------------------------------------------------------------


def test_capsule_lifecycle(client: WrennClient) -> None:
    with Capsule(template="minimal", timeout=600, wait=True) as capsule:
        assert capsule.status == "running" and capsule.id == capsule.capsule_id
        assert capsule.is_running()
        info = capsule.get_info()
        assert isinstance(info, CapsuleInfo) and info.timeout_sec == 600
        assert Capsule.get_info(capsule.id).id == capsule.id
        assert capsule.id in [c.id for c in Capsule.list()]

        capsule.pause()
        assert capsule.status == "paused" and not capsule.is_running()
        capsule.resume(wait=True)
        assert capsule.status == "running"
        capsule.ping()

        capsule.pause()
        again = Capsule.connect(capsule.id)  # resumes a paused capsule
        assert again.status == "running" and capsule.is_running()
        again.close()
    assert client.capsules.get(capsule.id).status == "stopped"  # the with block destroyed it


def test_capsule_class_level_calls(client: WrennClient) -> None:
    capsule = Capsule.create(template="minimal", wait=True)
    cid = capsule.id
    assert Capsule.pause(cid).status == "paused"
    assert Capsule.resume(cid, wait=True).status == "running"
    Capsule.ping(cid)
    Capsule.destroy(cid, wait=True)
    assert Capsule.get_info(cid).status == "stopped"
    capsule.close()


def test_capsule_commands(client: WrennClient) -> None:
    with Capsule(wait=True) as capsule:
        result = capsule.commands.run("echo hello; echo oops >&2; exit 3")
        assert isinstance(result, ExecResult)
        assert (result.stdout, result.stderr, result.exit_code) == ("hello\n", "oops\n", 3)
        assert result.duration_ms is not None and result.duration_ms >= 0

        env_cwd = capsule.commands.run(
            "echo $GREETING; pwd", envs={"GREETING": "hi there"}, cwd="/tmp"
        )
        assert env_cwd.stdout == "hi there\n/tmp\n"

        binary = capsule.commands.run(r"printf '\377\376ok'")
        assert binary.stdout_bytes == b"\xff\xfeok" and binary.stdout.endswith("ok")

        started = time.monotonic()
        slow = capsule.commands.run("sleep 30", timeout=2)
        assert time.monotonic() - started < 25 and slow.exit_code != 0

        handle = capsule.commands.run("sleep 300", background=True, tag="sleeper")
        assert isinstance(handle, BackgroundProcess) and handle.tag == "sleeper" and handle.pid > 0
        other = capsule.commands.run("sleep 300", background=True)
        assert other.tag and other.pid != handle.pid
        running = {p.pid: p for p in capsule.commands.list() if p.running is not False}
        assert {handle.pid, other.pid} <= set(running)
        assert running[handle.pid].tag == "sleeper"

        capsule.commands.kill(handle.pid)
        capsule.commands.kill(other.tag, signal="SIGTERM")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            alive = {p.pid for p in capsule.commands.list() if p.running is not False}
            if not alive & {handle.pid, other.pid}:
                break
            time.sleep(0.2)
        assert not alive & {handle.pid, other.pid}


def test_capsule_files(client: WrennClient) -> None:
    with Capsule(wait=True) as capsule:
        files = capsule.files
        files.make_dir("/tmp/sdk/nested")
        assert files.make_dir("/tmp/sdk/nested").is_dir  # existing directory: fine
        files.write("/tmp/sdk/hello.txt", "héllo\n")
        files.write("/tmp/sdk/blob.bin", bytes(range(256)))
        assert files.read("/tmp/sdk/hello.txt") == "héllo\n"
        assert files.read_bytes("/tmp/sdk/blob.bin") == bytes(range(256))
        assert capsule.commands.run("cat /tmp/sdk/hello.txt").stdout == "héllo\n"

        entries = {e.name: e for e in files.list("/tmp/sdk")}
        assert set(entries) == {"hello.txt", "blob.bin", "nested"}
        assert entries["blob.bin"].size == 256 and entries["blob.bin"].type == "file"
        assert entries["nested"].is_dir and entries["hello.txt"].path == "/tmp/sdk/hello.txt"
        assert "/tmp/sdk/nested" in {e.path for e in files.list("/tmp", depth=2)}

        assert files.exists("/tmp/sdk/hello.txt") and files.exists("/tmp/sdk/nested")
        assert not files.exists("/tmp/sdk/missing") and not files.exists("/nope/nope")

        big = [secrets.token_bytes(64 * 1024) for _ in range(16)]  # 1 MiB in chunks
        files.upload_stream("/tmp/sdk/big.bin", iter(big))
        assert b"".join(files.download_stream("/tmp/sdk/big.bin")) == b"".join(big)

        files.remove("/tmp/sdk/hello.txt")
        assert not files.exists("/tmp/sdk/hello.txt")
        with pytest.raises(WrennNotFoundError):
            files.read("/tmp/sdk/hello.txt")
        files.remove("/tmp/sdk")
        assert not files.exists("/tmp/sdk")


def test_capsule_state_survives_pause_and_snapshot(client: WrennClient) -> None:
    name = _name("sdk-clone")
    with Capsule(wait=True) as capsule:
        capsule.files.write("/tmp/state.txt", "kept")
        capsule.pause()
        capsule.resume(wait=True)
        assert capsule.files.read("/tmp/state.txt") == "kept"
        template = capsule.create_snapshot(name=name)
        assert template.name == name and capsule.status == "paused"
    try:
        with Capsule(template=name, wait=True) as clone:
            assert clone.files.read("/tmp/state.txt") == "kept"
            info = clone.get_info()
            assert (info.vcpus, info.memory_mb) == (template.vcpus, template.memory_mb)
    finally:
        client.snapshots.delete(name)


def test_get_url(env) -> None:
    capsule = Capsule(wait=True)
    try:
        host = env.base_url.split("://", 1)[1].split("/", 1)[0]
        assert capsule.get_url(8080) == f"http://8080-{capsule.id}.{host}"
    finally:
        capsule.destroy()
        capsule.close()


# --- AsyncCapsule --------------------------------------------------------------------------


async def test_async_capsule_lifecycle(aclient: AsyncWrennClient) -> None:
    async with AsyncCapsule(template="minimal", wait=True) as capsule:
        assert capsule.status == "running"
        assert await capsule.is_running()
        assert (await capsule.get_info()).id == capsule.id
        assert (await AsyncCapsule.get_info(capsule.id)).status == "running"
        assert capsule.id in [c.id for c in await AsyncCapsule.list()]
        await capsule.pause()
        assert capsule.status == "paused"
        await capsule.resume(wait=True)
        assert capsule.status == "running"
        await capsule.ping()
        await capsule.pause()
        again = await AsyncCapsule.connect(capsule.id)
        assert again.status == "running"
        await again.aclose()
    assert (await aclient.capsules.get(capsule.id)).status == "stopped"

    other = await AsyncCapsule.create(wait=True)
    await AsyncCapsule.pause(other.id)
    assert (await AsyncCapsule.resume(other.id, wait=True)).status == "running"
    await AsyncCapsule.ping(other.id)
    await AsyncCapsule.destroy(other.id, wait=True)
    assert (await AsyncCapsule.get_info(other.id)).status == "stopped"
    await other.aclose()


async def test_async_capsule_commands_and_files(aclient: AsyncWrennClient) -> None:
    capsule = await AsyncCapsule(wait=True)
    try:
        result = await capsule.commands.run("echo $X; exit 2", envs={"X": "async"})
        assert (result.stdout, result.exit_code) == ("async\n", 2)
        handle = await capsule.commands.run("sleep 300", background=True)
        assert handle.pid in [p.pid for p in await capsule.commands.list()]
        await capsule.commands.kill(handle.tag)

        await capsule.files.make_dir("/tmp/asdk")
        await capsule.files.write("/tmp/asdk/a.txt", "alpha")
        assert await capsule.files.read("/tmp/asdk/a.txt") == "alpha"
        assert await capsule.files.read_bytes("/tmp/asdk/a.txt") == b"alpha"
        assert [e.name for e in await capsule.files.list("/tmp/asdk")] == ["a.txt"]
        assert await capsule.files.exists("/tmp/asdk/a.txt")

        async def chunks():
            for _ in range(4):
                yield b"z" * 1000

        await capsule.files.upload_stream("/tmp/asdk/z", chunks())
        assert (
            b"".join([c async for c in capsule.files.download_stream("/tmp/asdk/z")]) == b"z" * 4000
        )
        await capsule.files.remove("/tmp/asdk")
        assert not await capsule.files.exists("/tmp/asdk")

        name = _name("sdk-async-snap")
        template = await capsule.create_snapshot(name=name)
        assert template.name == name and capsule.status == "paused"
        await aclient.snapshots.delete(name)
    finally:
        await capsule.destroy()
        await capsule.aclose()


# --- the CLI, end to end -------------------------------------------------------------------


def test_cli_against_the_server(client: WrennClient) -> None:
    from wrenn_cli.client import capsule_app, snapshot_app

    app = typer.Typer()
    app.add_typer(capsule_app, name="capsule")
    app.add_typer(snapshot_app, name="snapshot")
    runner = CliRunner()

    created = runner.invoke(app, ["capsule", "create", "--json"])
    assert created.exit_code == 0, created.output
    cid = json.loads(created.stdout)["id"]
    assert json.loads(created.stdout)["status"] == "running"

    result = runner.invoke(app, ["capsule", "exec", cid, "--", "echo hi; exit 4"])
    assert (result.exit_code, result.stdout) == (4, "hi\n")
    listed = runner.invoke(app, ["capsule", "list", "--json"])
    assert cid in [c["id"] for c in json.loads(listed.stdout)]
    assert runner.invoke(app, ["capsule", "destroy", cid]).exit_code == 0
    missing = runner.invoke(app, ["capsule", "get", "cl-doesnotexist0000000000000"])
    assert missing.exit_code == 1 and missing.stderr.startswith("Error: not_found")
