"""Pure pieces of streaming: message parsing, incremental text, frame gathering, the CLI shell's
terminal handling (on a real pseudo-terminal of this machine)."""

from __future__ import annotations

import asyncio
import os
import queue
import random
import termios
import threading
import time

import pytest

from wrenn.pty import PtyEvent, PtyEventType
from wrenn_cli.shell import DETACH_KEY, exit_status, raw_mode, run_shell, terminal_size
from wrenn_control.api.streams import (
    BadMessage,
    Ignored,
    PtyConnect,
    PtyInput,
    PtyKill,
    PtyResize,
    PtyStart,
    TextStream,
    parse_exec_start,
    parse_pty_command,
    parse_pty_open,
    split_bytes,
    split_text,
)
from wrenn_host.guest import MAX_PAYLOAD, _pieces


def test_exec_start_parsing():
    start = parse_exec_start({"type": "start", "cmd": "ls", "args": ["-l"], "envs": {"A": "1"}, "cwd": "/tmp",
                              "timeout_sec": 5})
    assert (start.cmd, start.args, start.envs, start.cwd, start.timeout_sec) == ("ls", ["-l"], {"A": "1"}, "/tmp", 5)
    minimal = parse_exec_start({"type": "start", "cmd": "ls"})
    assert (minimal.args, minimal.envs, minimal.cwd, minimal.tag, minimal.timeout_sec) == ([], {}, None, None, None)
    for bad in ({"cmd": "ls"}, {"type": "start", "cmd": ""}, {"type": "start", "cmd": "ls", "envs": {"A": 1}},
                {"type": "start", "cmd": "ls", "timeout_sec": True}, [1, 2]):
        with pytest.raises(BadMessage):
            parse_exec_start(bad)


def test_pty_open_and_commands():
    assert parse_pty_open({"type": "start"}) == PtyStart("/bin/bash", [], 80, 24, {}, None, None)
    assert parse_pty_open({"type": "start", "cmd": "python3", "args": ["-q"], "cols": 100, "rows": 30,
                           "tag": "t"}) == PtyStart("python3", ["-q"], 100, 30, {}, None, "t")
    assert parse_pty_open({"type": "connect", "tag": "t"}) == PtyConnect("t")
    for bad in ({"type": "connect"}, {"type": "input"}, {"type": "start", "cols": 0},
                {"type": "start", "rows": 10001}, {"type": "start", "cols": "80"}):
        with pytest.raises(BadMessage):
            parse_pty_open(bad)
    assert parse_pty_command(b"ls\r") == PtyInput(b"ls\r")
    assert parse_pty_command({"type": "input", "data": "AwQ="}) == PtyInput(b"\x03\x04")
    assert parse_pty_command({"type": "resize", "cols": 10, "rows": 5}) == PtyResize(10, 5)
    assert parse_pty_command({"type": "kill"}) == PtyKill()
    assert parse_pty_command({"type": "pong"}) == Ignored("pong")
    for bad in ({"type": "input", "data": "%%%"}, {"type": "input"}, {"type": "resize", "cols": 10}):
        with pytest.raises(BadMessage):
            parse_pty_command(bad)


def test_text_stream_keeps_split_characters_whole():
    data = "héllo wörld €𝄞".encode()
    for cut in range(len(data) + 1):
        t = TextStream()
        assert t.feed(data[:cut]) + t.feed(data[cut:]) + t.flush() == "héllo wörld €𝄞"
    t = TextStream()
    assert t.feed(b"ok\xff") + t.flush() == "ok\ufffd"
    t = TextStream()
    assert t.feed(b"\xe2\x82") == "" and t.flush() == "\ufffd"  # a truncated character at the end


def test_splitting():
    assert list(split_text("abcde", 2)) == ["ab", "cd", "e"]
    assert list(split_text("", 2)) == []
    assert list(split_bytes(b"abcde", 5)) == [b"abcde"]


async def test_upload_pieces_are_gathered_into_full_frames():
    rng = random.Random(7)
    sizes = [0, 1, 5, 1000, 65536, MAX_PAYLOAD - 1, MAX_PAYLOAD, MAX_PAYLOAD + 1, 3 * MAX_PAYLOAD + 7]
    for _ in range(200):
        chunks = [bytes([rng.randrange(256)]) * rng.choice(sizes) for _ in range(rng.randrange(8))]
        out = [p async for p in _pieces(chunks)]
        assert b"".join(out) == b"".join(chunks)
        assert all(out) and all(len(p) == MAX_PAYLOAD for p in out[:-1])
    # 64 KiB HTTP pieces become 1 MiB frames.
    out = [p async for p in _pieces([b"x" * 65536] * 40)]
    assert [len(p) for p in out] == [MAX_PAYLOAD, MAX_PAYLOAD, 40 * 65536 - 2 * MAX_PAYLOAD]
    assert [len(p) async for p in _pieces(b"y" * 10)] == [10]
    await asyncio.sleep(0)


def test_exit_status():
    assert [exit_status(c) for c in (0, 3, 255, -9, -15, None, 300)] == [0, 3, 255, 137, 143, 1, 1]


def test_raw_mode_is_restored_and_size_is_read():
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        with raw_mode(slave):
            assert not termios.tcgetattr(slave)[3] & termios.ICANON
        assert termios.tcgetattr(slave) == before
        with pytest.raises(RuntimeError), raw_mode(slave):
            raise RuntimeError("restored even so")
        assert termios.tcgetattr(slave) == before
        from wrenn_guest.terminals import set_size
        set_size(master, 132, 43)
        assert terminal_size(slave) == (132, 43)
    finally:
        os.close(master)
        os.close(slave)
    r, w = os.pipe()
    with raw_mode(r):  # not a terminal: nothing to do
        pass
    os.close(r)
    os.close(w)


class FakeSession:
    """Stands in for a PtySession: scripted events, recorded writes."""

    def __init__(self):
        self.events: queue.Queue = queue.Queue()
        self.written: list[bytes] = []
        self.resized: list[tuple[int, int]] = []
        self.detached = False

    def __iter__(self):
        while True:
            event = self.events.get()
            if event is None:
                return
            yield event

    def write(self, data):
        self.written.append(data)
        if b"exit\r" in data:
            self.events.put(PtyEvent(type=PtyEventType.exit, exit_code=3))

    def resize(self, cols, rows):
        self.resized.append((cols, rows))

    def detach(self):
        self.detached = True
        self.events.put(None)


def _in_thread(fn):
    box = {}
    t = threading.Thread(target=lambda: box.update(result=fn()), daemon=True)
    t.start()
    return t, box


def test_run_shell_relays_keys_and_output_until_exit():
    master, slave = os.openpty()  # the user's terminal: we type into master, read the screen from it
    session = FakeSession()
    try:
        t, box = _in_thread(lambda: run_shell(session, slave, slave))
        session.events.put(PtyEvent(type=PtyEventType.output, data=b"hello from the capsule\r\n"))
        time.sleep(0.3)
        os.write(master, b"ls\r")
        os.write(master, b"exit\r")
        t.join(10)
        assert not t.is_alive()
        assert box["result"].exit_code == 3 and not box["result"].detached
        assert b"".join(session.written) == b"ls\rexit\r"  # raw: \r not turned into \n, no local echo
        assert b"hello from the capsule" in os.read(master, 4096)
        assert termios.tcgetattr(slave)[3] & termios.ICANON  # cooked again
    finally:
        os.close(master)
        os.close(slave)


def test_run_shell_detach_key():
    master, slave = os.openpty()
    session = FakeSession()
    try:
        t, box = _in_thread(lambda: run_shell(session, slave, slave))
        time.sleep(0.3)
        os.write(master, b"pwd\r" + DETACH_KEY)
        t.join(10)
        assert box["result"].detached and session.detached
        assert b"".join(session.written) == b"pwd\r"
    finally:
        os.close(master)
        os.close(slave)
