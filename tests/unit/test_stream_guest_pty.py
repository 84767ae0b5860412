"""The guest agent's PTY ops (real pseudo-terminals on this machine), driven through GuestClient."""

from __future__ import annotations

import asyncio
import contextlib
import re

import pytest

from tests.unit.test_guest_agent import start_agent_process, stop
from wrenn_guest.terminals import SCROLLBACK_BYTES
from wrenn_host.api import GuestError, HostAgentError
from wrenn_host.guest import GuestClient

SH = ["/bin/sh"]


@pytest.fixture
async def client():
    proc, sock = start_agent_process()
    reader, writer = await asyncio.open_connection(sock=sock, limit=4 << 20)
    c = GuestClient.from_streams(reader, writer)
    yield c
    await c.close()
    stop(proc)


class Attached:
    """Collects one `pty_attach` stream in the background."""

    def __init__(self, client: GuestClient, target):
        self.out = bytearray()
        self.frames = 0
        self.result: dict | None = None
        self.changed = asyncio.Event()
        self._task = asyncio.create_task(self._run(client, target))

    async def _run(self, client: GuestClient, target) -> None:
        try:
            async for header, payload in client.stream("pty_attach", target=target):
                if header["type"] == "data":
                    assert header["stream"] == "pty"
                    self.out += payload
                    self.frames += 1
                else:
                    self.result = header
                self.changed.set()
        except HostAgentError:
            if not client.closed:  # else: the test is over and the agent went away under us
                raise

    def text(self) -> str:
        return self.out.decode("utf-8", "replace")

    async def wait_for(self, pattern: str, timeout: float = 10) -> re.Match:
        async def loop() -> re.Match:
            while True:
                m = re.search(pattern, self.text())
                if m:
                    return m
                if self._task.done():
                    self._task.result()
                    raise AssertionError(f"stream ended without {pattern!r}: {self.text()!r}")
                self.changed.clear()
                await self.changed.wait()

        try:
            return await asyncio.wait_for(loop(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"no {pattern!r} within {timeout}s in {self.text()!r}") from None

    async def finished(self, timeout: float = 10) -> dict:
        await asyncio.wait_for(asyncio.shield(self._task), timeout)
        assert self.result is not None
        return self.result

    async def detach(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def start(client: GuestClient, cmd="/bin/sh", args=None, **params):
    res, _ = await client.call("pty_start", cmd=cmd, args=args or [], **params)
    return res


async def type_(client: GuestClient, target, text: str) -> None:
    await client.call("pty_input", text.encode(), target=target)


async def test_a_shell_on_a_terminal_runs_typed_commands(client):
    res = await start(client, envs={"PS1": "$ "}, cols=100, rows=30)
    assert res["tag"].startswith("pty-") and res["pid"] > 0
    term = Attached(client, res["tag"])
    await term.wait_for(r"\$ $")  # the prompt: typed-ahead input would come before it
    await type_(client, res["tag"], "echo $((6*7)); test -t 0 && echo IS-A-TTY; stty size; echo $TERM\n")
    await term.wait_for(r"\n42\r?\n")
    await term.wait_for(r"IS-A-TTY")
    await term.wait_for(r"\n30 100\r?\n")
    await term.wait_for(r"xterm-256color")
    # The terminal echoes what is typed, as a real one does.
    assert "echo $((6*7))" in term.text()
    await type_(client, res["pid"], "exit 3\n")  # by pid works too
    assert (await term.finished())["exit_code"] == 3
    sessions = (await client.call("pty_list"))[0]["sessions"]
    assert [(s["tag"], s["running"], s["exit_code"]) for s in sessions] == [(res["tag"], False, 3)]


async def test_resize_reaches_the_program(client):
    res = await start(client, envs={"PS1": "$ "})
    term = Attached(client, res["tag"])
    await term.wait_for(r"\$ $")  # the prompt: typed-ahead input would come before it
    await type_(client, res["tag"], "stty size\n")
    await term.wait_for(r"\n24 80\r?\n")
    await client.call("pty_resize", target=res["tag"], cols=132, rows=43)
    await type_(client, res["tag"], "stty size\n")
    await term.wait_for(r"\n43 132\r?\n")
    info = (await client.call("pty_list"))[0]["sessions"][0]
    assert (info["cols"], info["rows"]) == (132, 43)
    await client.call("pty_kill", target=res["tag"])
    assert (await term.finished())["exit_code"] == -9


async def test_ctrl_c_interrupts_the_foreground_job_only(client):
    """The terminal is the session's controlling terminal: ^C signals the foreground job."""
    res = await start(client, envs={"PS1": "$ "})
    term = Attached(client, res["tag"])
    await term.wait_for(r"\$ $")  # the prompt: typed-ahead input would come before it
    await type_(client, res["tag"], "sleep 100; echo slept\n")
    await asyncio.sleep(0.5)
    await type_(client, res["tag"], "\x03")
    await type_(client, res["tag"], "echo still-here\n")
    await term.wait_for(r"(?<!echo )still-here\r?\n", timeout=10)
    assert "slept" not in term.text().replace("echo slept", "")
    await client.call("pty_kill", target=res["tag"])
    await term.finished()


async def test_session_outlives_its_attachment_and_replays_scrollback(client):
    res = await start(client, envs={"PS1": "$ "}, tag="keep")
    assert res["tag"] == "keep"
    first = Attached(client, "keep")
    await first.wait_for(r"\$ $")  # the prompt: typed-ahead input would come before it
    await type_(client, "keep", "SECRET=swordfish; echo before-drop\n")
    await first.wait_for(r"(?<!echo )before-drop\r?\n")
    await first.detach()  # the host goes away: the session stays
    await type_(client, "keep", "echo while-away\n")
    await asyncio.sleep(0.3)
    second = Attached(client, "keep")
    await second.wait_for(r"(?<!echo )while-away\r?\n")  # written while nobody was attached
    assert "before-drop" in second.text()  # earlier output, from the scrollback
    await type_(client, "keep", "echo secret=$SECRET\n")
    await second.wait_for(r"secret=swordfish")  # and the shell's state is intact
    # A running tag cannot be taken twice.
    with pytest.raises(GuestError) as e:
        await start(client, tag="keep")
    assert e.value.code == "exists"
    await type_(client, "keep", "exit\n")
    assert (await second.finished())["exit_code"] == 0
    # Finished: its tag can be reused, and kill forgets it.
    again = await start(client, tag="keep")
    assert again["pid"] != res["pid"]
    sessions = (await client.call("pty_list"))[0]["sessions"]
    assert [(s["pid"], s["running"]) for s in sessions] == [(again["pid"], True)]
    watcher = Attached(client, "keep")
    await client.call("pty_kill", target="keep")
    assert (await watcher.finished())["exit_code"] == -9
    await client.call("pty_kill", target="keep")  # finished: this forgets it
    assert (await client.call("pty_list"))[0]["sessions"] == []


async def test_scrollback_is_bounded(client):
    res = await start(client, "/bin/sh", ["-c", "head -c 300000 /dev/zero | tr '\\0' x; echo; echo END"])
    first = Attached(client, res["tag"])
    assert (await first.finished())["exit_code"] == 0
    late = Attached(client, res["tag"])
    assert (await late.finished())["exit_code"] == 0
    assert late.text().rstrip().endswith("END")
    assert SCROLLBACK_BYTES - 100 <= len(late.out) <= SCROLLBACK_BYTES


async def test_errors(client):
    with pytest.raises(GuestError) as e:
        await client.call("pty_input", b"x", target="nope")
    assert e.value.code == "no_such_process"
    with pytest.raises(GuestError) as e:
        await start(client, "/no/such/program")
    assert e.value.code == "not_found"
    with pytest.raises(GuestError) as e:
        await start(client, cols=0)
    assert e.value.code == "invalid"
    with pytest.raises(GuestError) as e:
        await start(client, cwd="/no/such/dir")
    assert e.value.code == "not_found"
    res = await start(client, "/bin/sh", ["-c", "exit 0"])
    term = Attached(client, res["tag"])
    await term.finished()
    with pytest.raises(GuestError) as e:
        await client.call("pty_input", b"late\n", target=res["tag"])
    assert e.value.code == "no_such_process"
    with pytest.raises(GuestError) as e:
        await client.call("pty_resize", target=res["tag"], cols=10, rows=10)
    assert e.value.code == "no_such_process"


async def test_output_arrives_while_the_program_runs(client):
    res = await start(client, "/bin/sh", ["-c", "echo one; sleep 1; echo two"])
    term = Attached(client, res["tag"])
    await term.wait_for(r"one")
    assert "two" not in term.text()
    await term.wait_for(r"two", timeout=5)
    await term.finished()
