"""The real guest agent, run as a subprocess over a socketpair, driven through GuestClient."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import pwd
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import wrenn_guest
from wrenn_guest.protocol import MAGIC, MAX_PAYLOAD, PREFIX, FrameDecoder, encode_frame
from wrenn_host.api import GuestError, HostAgentError
from wrenn_host.guest import GuestClient

SRC = str(Path(wrenn_guest.__file__).resolve().parent.parent)


def start_agent_process() -> tuple[subprocess.Popen, socket.socket]:
    host_end, guest_end = socket.socketpair()
    env = {**os.environ, "WRENN_GUEST_TEST": "1", "PYTHONPATH": SRC}
    proc = subprocess.Popen([sys.executable, "-m", "wrenn_guest", "--fd", str(guest_end.fileno())],
                            pass_fds=[guest_end.fileno()], env=env)
    guest_end.close()
    return proc, host_end


def stop(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=5)  # --fd mode: the agent exits at EOF
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("agent did not exit at EOF")


class Agent:
    def __init__(self, proc: subprocess.Popen, client: GuestClient):
        self.proc = proc
        self.client = client


@pytest.fixture
async def agent():
    proc, sock = start_agent_process()
    reader, writer = await asyncio.open_connection(sock=sock, limit=4 << 20)
    client = GuestClient.from_streams(reader, writer)
    yield Agent(proc, client)
    await client.close()
    stop(proc)


@pytest.fixture
async def c(agent):
    return agent.client


@pytest.fixture
def raw():
    """A bare socket to the agent, for frames GuestClient would never send."""
    proc, sock = start_agent_process()
    sock.settimeout(10)
    yield sock
    sock.close()
    stop(proc)


def recv_frames(sock: socket.socket, count: int) -> list[tuple[dict, bytes]]:
    decoder, frames = FrameDecoder(), []
    while len(frames) < count:
        data = sock.recv(1 << 20)
        assert data, "agent closed the connection"
        frames += decoder.feed(data)
    return frames


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # our PID 1 may never reap orphans: a zombie is dead


async def eventually(check, timeout: float = 3.0):
    """Poll `check` (a function, sync or async) until it returns something true."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.05)


async def run(c: GuestClient, cmd: str, *args: str, **params):
    header, payload = await c.call("exec", cmd=cmd, args=list(args), **params)
    n = header["stdout_len"]
    assert len(payload) == n + header["stderr_len"]
    return header, payload[:n], payload[n:]


# ping / system


async def test_ping(c):
    header, payload = await c.call("ping")
    assert header["type"] == "result"
    assert header["version"] == wrenn_guest.__version__
    assert header["uptime_s"] > 0
    assert payload == b""


async def test_wait_ready(c):
    assert (await c.wait_ready(5))["version"] == wrenn_guest.__version__


async def test_unknown_op_and_bad_params(c):
    with pytest.raises(GuestError) as err:
        await c.call("no_such_op")
    assert err.value.code == "unknown_op"
    with pytest.raises(GuestError) as err:
        await c.call("exec", args=["x"])  # no cmd
    assert err.value.code == "invalid"


async def test_metrics(c):
    m, _ = await c.call("metrics")
    assert isinstance(m["cpu_pct"], float) and 0 <= m["cpu_pct"] <= 100
    assert m["mem_bytes"] > 0 and m["disk_bytes"] > 0


async def test_identity_validates_and_leaves_test_host_alone(c):
    before = socket.gethostname()
    seed = base64.b64encode(os.urandom(32)).decode()
    header, _ = await c.call("identity", capsule_id="cap-1", hostname="cap-1", seed=seed, time_ns=time.time_ns())
    assert {k: v for k, v in header.items() if k not in ("id", "type")} == {"version": wrenn_guest.__version__}
    assert socket.gethostname() == before
    with pytest.raises(GuestError) as err:
        await c.call("identity", capsule_id="cap-1", hostname="cap-1",
                     seed=base64.b64encode(b"short").decode(), time_ns=time.time_ns())
    assert err.value.code == "invalid"


# exec


async def test_exec_stdout_stderr_exit_code(c):
    header, out, err = await run(c, "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (out, err, header["exit_code"], header["timed_out"]) == (b"out\n", b"err\n", 3, False)
    assert header["duration_ms"] >= 0


async def test_exec_env_and_cwd(c, tmp_path):
    _, out, _ = await run(c, "sh", "-c", 'echo "$FOO|$PATH|$HOME|$LANG"; pwd', envs={"FOO": "bar baz"}, cwd=str(tmp_path))
    env_line, cwd_line = out.decode().splitlines()
    assert env_line == "bar baz|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin|/root|C.UTF-8"
    assert cwd_line == str(tmp_path)
    _, out, _ = await run(c, "sh", "-c", 'echo "$PATH"', envs={"PATH": "/bin"})
    assert out == b"/bin\n"


async def test_exec_binary_output(c):
    code = "import sys; sys.stdout.buffer.write(bytes(range(256))*4); sys.stderr.buffer.write(bytes(range(255,-1,-1)))"
    header, out, err = await run(c, sys.executable, "-c", code)
    assert header["exit_code"] == 0
    assert out == bytes(range(256)) * 4
    assert err == bytes(range(255, -1, -1))


async def test_exec_stdin(c):
    data = bytes(range(256)) * 10
    _, out, _ = await run(c, "cat", stdin=base64.b64encode(data).decode())
    assert out == data
    _, out, _ = await run(c, "cat")  # no stdin: /dev/null, not our socket
    assert out == b""


async def test_exec_output_bigger_than_a_frame(c):
    code = "import sys; sys.stdout.buffer.write(bytes(range(256))*12288); sys.stderr.buffer.write(b'E'*1500000)"
    header, out, err = await run(c, sys.executable, "-c", code)
    assert out == bytes(range(256)) * 12288  # 3 MiB
    assert err == b"E" * 1500000


async def test_exec_timeout_kills_process_group(c, tmp_path):
    pidfile = tmp_path / "grandchild"
    started = time.monotonic()
    header, _, _ = await run(c, "sh", "-c", f"sleep 100 & echo $! > {pidfile}; sleep 100", timeout_sec=1)
    assert time.monotonic() - started < 4
    assert header["timed_out"] is True and header["exit_code"] == -9
    assert 900 <= header["duration_ms"] < 4000
    grandchild = int(pidfile.read_text())
    assert await eventually(lambda: not pid_alive(grandchild))


async def test_exec_missing_executable(c, tmp_path):
    header, out, err = await run(c, "no-such-command-xyz")
    assert header["exit_code"] == 127
    assert (out, err) == (b"", b"no-such-command-xyz: command not found\n")
    script = tmp_path / "script"
    script.write_text("#!/no/such/interpreter\n")
    script.chmod(0o755)
    assert (await run(c, str(script)))[0]["exit_code"] == 127
    script.chmod(0o644)  # not executable (even root needs an x bit to exec)
    header, _, err = await run(c, str(script))
    assert (header["exit_code"], err) == (126, f"{script}: permission denied\n".encode())


async def test_exec_bad_cwd(c, tmp_path):
    with pytest.raises(GuestError) as err:
        await c.call("exec", cmd="pwd", cwd=str(tmp_path / "missing"))
    assert err.value.code == "not_found"
    (tmp_path / "f").write_text("x")
    with pytest.raises(GuestError) as err:
        await c.call("exec", cmd="pwd", cwd=str(tmp_path / "f"))
    assert err.value.code == "not_directory"


async def test_concurrent_execs_are_multiplexed(c):
    started = time.monotonic()
    results = await asyncio.gather(*(run(c, "sh", "-c", f"sleep 0.5; echo {i}; echo e{i} >&2") for i in range(10)))
    assert time.monotonic() - started < 2.5  # 5 s if they ran one after another
    for i, (header, out, err) in enumerate(results):
        assert (header["exit_code"], out, err) == (0, f"{i}\n".encode(), f"e{i}\n".encode())


async def test_exec_given_up_by_host_is_killed(c, tmp_path):
    pidfile = tmp_path / "pid"
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(c.call("exec", cmd="sh", args=["-c", f"echo $$ > {pidfile}; exec sleep 100"]), 0.5)
    pid = int(pidfile.read_text())
    assert await eventually(lambda: not pid_alive(pid))  # the cancel frame killed it
    assert (await c.call("ping"))[0]["version"]  # and the channel is still fine


# background processes


async def ps(c) -> dict:
    header, _ = await c.call("ps")
    return {p["tag"]: p for p in header["processes"]}


async def test_spawn_ps_kill(c):
    a, _ = await c.call("spawn", cmd="sleep", args=["100"], tag="sleeper")
    b, _ = await c.call("spawn", cmd="sleep", args=["100"])
    assert re.fullmatch(r"proc-[0-9a-f]{8}", b["tag"])
    with pytest.raises(GuestError) as err:
        await c.call("spawn", cmd="sleep", args=["1"], tag="sleeper")
    assert err.value.code == "exists"

    procs = await ps(c)
    assert procs["sleeper"] == {"pid": a["pid"], "tag": "sleeper", "cmd": "sleep", "args": ["100"],
                                "running": True, "exit_code": None}
    assert procs[b["tag"]]["running"] is True and pid_alive(b["pid"])

    await c.call("kill", target="sleeper")  # by tag
    await c.call("kill", target=b["pid"], signal="SIGTERM")  # by pid
    assert await eventually(lambda: _empty_ps(c))
    assert not pid_alive(a["pid"]) and not pid_alive(b["pid"])

    for target in ("sleeper", 999999):
        with pytest.raises(GuestError) as err:
            await c.call("kill", target=target)
        assert err.value.code == "no_such_process"


async def _empty_ps(c):
    return await ps(c) == {}


async def test_finished_process_stays_listed_until_killed(c):
    await c.call("spawn", cmd="sh", args=["-c", "exit 5"], tag="quick")

    async def finished():
        p = (await ps(c)).get("quick")
        return p if p and not p["running"] else None

    assert (await eventually(finished))["exit_code"] == 5
    await c.call("spawn", cmd="sleep", args=["100"], tag="quick")  # tag free again: it has exited
    assert (await ps(c))["quick"]["running"] is True
    await c.call("kill", target="quick")
    assert await eventually(lambda: _empty_ps(c))


async def test_spawn_missing_executable(c):
    with pytest.raises(GuestError) as err:
        await c.call("spawn", cmd="no-such-command-xyz")
    assert err.value.code == "not_found"


async def test_attach_replays_then_streams_live(c, tmp_path):
    go = tmp_path / "go"
    script = f"echo first; echo err1 >&2; while [ ! -e {go} ]; do sleep 0.02; done; echo second; exit 7"
    await c.call("spawn", cmd="sh", args=["-c", script], tag="att")
    await asyncio.sleep(0.3)  # let the first lines land in the buffer before anyone attaches
    out = {"stdout": b"", "stderr": b""}
    result = None
    async with asyncio.timeout(10):
        async for header, data in c.stream("attach", target="att"):
            if header["type"] == "result":
                result = header
                break
            out[header["stream"]] += data
            if out == {"stdout": b"first\n", "stderr": b"err1\n"}:
                assert not go.exists()  # so far everything came from the replay buffer
                go.touch()
    assert out == {"stdout": b"first\nsecond\n", "stderr": b"err1\n"}
    assert result["exit_code"] == 7

    # attaching to the finished process replays everything and ends at once
    frames = [f async for f in c.stream("attach", target="att")]
    assert b"".join(d for h, d in frames if h.get("stream") == "stdout") == b"first\nsecond\n"
    assert frames[-1][0]["exit_code"] == 7

    with pytest.raises(GuestError) as err:
        async for _ in c.stream("attach", target="nobody"):
            pass
    assert err.value.code == "no_such_process"


async def test_attach_cancel(raw):
    raw.sendall(encode_frame({"id": 1, "op": "spawn", "cmd": "sh", "args": ["-c", "while :; do echo tick; sleep 0.05; done"]}))
    (spawned, _), = recv_frames(raw, 1)
    raw.sendall(encode_frame({"id": 2, "op": "attach", "target": spawned["pid"]}))
    header, data = recv_frames(raw, 1)[0]
    assert header["type"] == "data" and data.startswith(b"tick")
    raw.sendall(encode_frame({"id": 2, "type": "cancel"}))
    decoder = FrameDecoder()
    while True:  # a few more ticks may be in flight; then the attach ends
        frames = decoder.feed(raw.recv(65536))
        ends = [h for h, _ in frames if h["type"] != "data"]
        if ends:
            assert ends[0] == {"id": 2, "type": "result", "exit_code": None}
            break
    assert pid_alive(spawned["pid"])  # cancelling an attach leaves the process alone
    raw.sendall(encode_frame({"id": 3, "op": "kill", "target": spawned["pid"]}))
    assert recv_frames(raw, 1)[0][0] == {"id": 3, "type": "result"}


# files


async def test_file_round_trip_10mb(c, tmp_path):
    data = os.urandom(10 * 1024 * 1024 + 123)

    async def chunks():  # odd sizes, some bigger than a frame
        for i in range(0, len(data), 3_000_001):
            yield data[i:i + 3_000_001]

    path = tmp_path / "sub" / "big.bin"
    result = await c.upload("file_write", chunks(), path=str(path))
    assert result["size"] == len(data)
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert path.stat().st_mode & 0o777 == 0o644

    header, payload = await c.call("file_read", path=str(path))
    assert header["size"] == len(data)
    assert hashlib.sha256(payload).digest() == hashlib.sha256(data).digest()

    sizes = []
    async for header, chunk in c.stream("file_read", path=str(path)):
        if header["type"] == "data":
            assert header["stream"] == "file"
            sizes.append(len(chunk))
    assert sum(sizes) == len(data) and max(sizes) <= MAX_PAYLOAD and len(sizes) == 11


async def test_file_write_mode_overwrite_and_errors(c, tmp_path):
    path = tmp_path / "a" / "b" / "c.txt"
    assert (await c.upload("file_write", b"hello", path=str(path), mode=0o600))["size"] == 5
    entry = (await c.call("stat", path=str(path)))[0]["entry"]
    assert (entry["mode"], entry["permissions"], entry["size"]) == (0o600, "rw-------", 5)
    await c.upload("file_write", [b"bye"], path=str(path))  # no mode: keeps the file's
    assert path.read_bytes() == b"bye" and path.stat().st_mode & 0o777 == 0o600
    await c.upload("file_write", b"", path=str(tmp_path / "empty"))
    assert (tmp_path / "empty").read_bytes() == b""

    with pytest.raises(GuestError) as err:
        await c.upload("file_write", b"x" * (3 << 20), path=str(tmp_path))
    assert err.value.code == "is_directory"
    with pytest.raises(GuestError) as err:
        await c.upload("file_write", b"x", path=str(path / "under-a-file"))
    assert err.value.code == "not_directory"
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == ["c.txt"]  # no temp files left


async def test_file_write_cancelled_leaves_nothing(c, tmp_path):
    class Boom(Exception):
        pass

    async def chunks():
        yield b"x" * 1000
        await asyncio.sleep(0.2)
        raise Boom

    with pytest.raises(Boom):
        await c.upload("file_write", chunks(), path=str(tmp_path / "f"))

    async def clean():
        return list(tmp_path.iterdir()) == []

    assert await eventually(clean)


async def test_file_read_errors(c, tmp_path):
    for path, code in ((tmp_path / "missing", "not_found"), (tmp_path, "is_directory")):
        with pytest.raises(GuestError) as err:
            await c.call("file_read", path=str(path))
        assert err.value.code == code
    with pytest.raises(GuestError) as err:
        await c.call("stat", path=str(tmp_path / "missing"))
    assert err.value.code == "not_found"


async def test_list_depth(c, tmp_path):
    root = tmp_path / "t"
    (root / "a" / "sub").mkdir(parents=True)
    (root / "a" / "b.txt").write_text("hello")
    (root / "a" / "sub" / "deep.txt").write_text("deep")
    (root / "z.txt").write_text("zz")
    (root / "link").symlink_to(root / "a" / "b.txt")

    entries = (await c.call("list", path=str(root)))[0]["entries"]
    assert [(e["name"], e["type"]) for e in entries] == [("a", "directory"), ("link", "symlink"), ("z.txt", "file")]
    a, link, z = entries
    assert link["symlink_target"] == str(root / "a" / "b.txt")
    assert a["symlink_target"] is None and z["symlink_target"] is None
    assert (z["path"], z["size"], z["permissions"]) == (str(root / "z.txt"), 2, "rw-r--r--")
    assert z["owner"] == pwd.getpwuid(os.getuid()).pw_name
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", z["modified_at"])
    assert set(z) == {"name", "path", "type", "size", "mode", "permissions", "owner", "group",
                      "modified_at", "symlink_target"}

    entries = (await c.call("list", path=str(root), depth=2))[0]["entries"]
    paths = [e["path"] for e in entries]
    assert paths == sorted(paths)
    assert [os.path.relpath(p, root) for p in paths] == ["a", "a/b.txt", "a/sub", "link", "z.txt"]

    with pytest.raises(GuestError) as err:
        await c.call("list", path=str(root / "z.txt"))
    assert err.value.code == "not_directory"


async def test_mkdir_p(c, tmp_path):
    path = tmp_path / "x" / "y" / "z"
    entry = (await c.call("mkdir", path=str(path)))[0]["entry"]
    assert (entry["type"], entry["path"], entry["name"]) == ("directory", str(path), "z")
    assert path.is_dir()
    await c.call("mkdir", path=str(path))  # already there: fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(GuestError) as err:
        await c.call("mkdir", path=str(tmp_path / "file"))
    assert err.value.code == "exists"


async def test_remove(c, tmp_path):
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "f").write_text("x")
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "k").write_text("k")
    (tmp_path / "link").symlink_to(tmp_path / "keep")

    await c.call("remove", path=str(tree))
    assert not tree.exists()
    await c.call("remove", path=str(tmp_path / "link"))  # the link, not what it points to
    assert not (tmp_path / "link").is_symlink() and (tmp_path / "keep" / "k").exists()
    for path in (tree, tmp_path / "keep" / "k"):
        if path.exists():
            await c.call("remove", path=str(path))
    assert not (tmp_path / "keep" / "k").exists()
    with pytest.raises(GuestError) as err:
        await c.call("remove", path=str(tree))
    assert err.value.code == "not_found"


# channel


async def test_connection_loss_fails_pending_calls(agent):
    c = agent.client
    pending = [asyncio.create_task(c.call("exec", cmd="sleep", args=["2"])) for _ in range(3)]
    await asyncio.sleep(0.3)
    agent.proc.kill()
    for task in pending:
        with pytest.raises(HostAgentError, match="guest agent connection lost"):
            await asyncio.wait_for(task, 5)
    with pytest.raises(HostAgentError, match="guest agent connection lost"):
        await c.call("ping")


async def test_guest_resyncs_after_garbage(raw):
    bad_json = PREFIX.pack(MAGIC, 5, 0) + b"{nope"
    absurd = PREFIX.pack(MAGIC, 0xFFFFFFFF, 0)  # a header length no frame has
    raw.sendall(b"\x00\xffgarbage WRN" + bad_json + absurd + b"WR" + encode_frame({"id": 7, "op": "ping"}))
    header, _ = recv_frames(raw, 1)[0]
    assert header["id"] == 7 and header["version"] == wrenn_guest.__version__
