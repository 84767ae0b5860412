"""Streaming and interactive use against a real server and real capsules: streamed exec, attaching
to background processes, PTY sessions (REPL, resize, re-attach after a dropped socket), 200 MB
file streams with the server's memory watched, and the WebSocket routes' refusals."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import socket
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.sync.client import connect as ws_connect

from wrenn import (
    Capsule,
    PtyEventType,
    PtySession,
    StreamErrorEvent,
    StreamExitEvent,
    StreamStartEvent,
    StreamStdoutEvent,
    WrennClient,
    WrennError,
)

pytestmark = pytest.mark.vm

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def env(wrenn_server):
    return {"api_key": wrenn_server.api_key, "base_url": wrenn_server.base_url}


@pytest.fixture(scope="module")
def cap(env) -> Iterator[Capsule]:
    capsule = Capsule(timeout=0, wait=True, **env)
    yield capsule
    capsule.destroy()
    capsule.close()


def ws_url(wrenn_server, path: str) -> str:
    return wrenn_server.base_url.replace("http://", "ws://") + path


def read_until(term: PtySession, pattern: str, timeout: float = 60) -> str:
    """Terminal output (decoded) up to the first match of `pattern`; fails after `timeout`."""
    out = b""
    deadline = time.monotonic() + timeout
    while True:
        text = out.decode("utf-8", "replace")
        if re.search(pattern, text):
            return text
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no {pattern!r} within {timeout}s; got {text[-2000:]!r}")
        try:
            event = term.receive(timeout=remaining)
        except TimeoutError:
            continue
        if event is None:
            raise AssertionError(f"session ended before {pattern!r}; got {text[-2000:]!r}")
        if event.type == PtyEventType.output:
            out += event.data
        elif event.type == PtyEventType.exit:
            raise AssertionError(f"session exited ({event.exit_code}) before {pattern!r}; got {text!r}")


# ---- commands ------------------------------------------------------------------------------


def test_stream_delivers_each_line_as_it_is_printed(cap: Capsule) -> None:
    before = cap.get_info().last_active_at
    timed = []
    for event in cap.commands.stream("for i in 1 2 3; do echo $i; sleep 1; done; echo done >&2"):
        timed.append((time.monotonic(), event))
    events = [e for _, e in timed]
    assert isinstance(events[0], StreamStartEvent) and events[0].pid > 0
    stdout = [(t, e) for t, e in timed if e.type == "stdout"]
    assert [e.data for _, e in stdout] == ["1\n", "2\n", "3\n"]  # three separate events
    gaps = [b[0] - a[0] for a, b in zip(stdout, stdout[1:])]
    print(f"\nstdout event gaps: {[round(g, 2) for g in gaps]} s")
    assert all(g >= 0.5 for g in gaps), gaps  # each arrived when printed, not all at the exit
    assert [e.data for e in events if e.type == "stderr"] == ["done\n"]
    assert events[-1] == StreamExitEvent(0)
    assert timed[-1][0] - stdout[-1][0] >= 0.5  # the exit came a second after the last line
    after = cap.get_info().last_active_at  # streaming counts as activity
    assert after is not None and (before is None or after > before)
    # The finished command is gone from the process table.
    assert events[0].pid not in [p.pid for p in cap.commands.list()]


def test_stream_program_with_args_exit_code_and_early_leave(cap: Capsule) -> None:
    events = list(cap.commands.stream("/bin/sh", ["-c", "echo $0-$1; exit 7", "a", "b"]))
    assert [e.data for e in events if e.type == "stdout"] == ["a-b\n"]
    assert events[-1] == StreamExitEvent(7)
    # Leaving the loop early kills the command.
    stream = cap.commands.stream("echo started; sleep 300; echo never")
    first = [next(stream), next(stream)]
    assert first[1] == StreamStdoutEvent("started\n")
    stream.close()
    deadline = time.monotonic() + 30
    while any(p.pid == first[0].pid for p in cap.commands.list()):
        assert time.monotonic() < deadline, "the abandoned command still runs"
        time.sleep(0.2)
    assert "sleep 300" not in cap.commands.run("ps -eo args").stdout


def test_connect_to_a_background_process(cap: Capsule) -> None:
    bg = cap.commands.run("echo early; sleep 2; echo late; exit 3", background=True, tag="ticker")
    events = list(cap.commands.connect("ticker"))
    assert events[0] == StreamStartEvent(bg.pid)
    assert "".join(e.data for e in events if e.type == "stdout") == "early\nlate\n"  # replay, then live
    assert events[-1] == StreamExitEvent(3)
    assert list(cap.commands.connect("no-such-tag")) == [StreamErrorEvent("no process 'no-such-tag'")]


# ---- terminals -----------------------------------------------------------------------------


def test_python_repl_on_a_pty(cap: Capsule) -> None:
    with cap.pty("/usr/bin/python3", ["-q"]) as term:
        assert term.tag.startswith("pty-") and term.pid > 0
        read_until(term, r">>> ")  # a REPL: python3 saw a terminal on stdin, not a pipe
        term.write(b"1+1\r")
        read_until(term, r"\r\n2\r\n>>> ")
        term.write(b"import os, sys; print(os.isatty(0), sys.stdin.isatty())\r")
        read_until(term, r"True True")
        term.write(b"exit()\r")
        rest = []
        for event in term:
            rest.append(event)
        assert rest[-1].type == PtyEventType.exit and rest[-1].exit_code == 0


def test_resize_changes_stty_size(cap: Capsule) -> None:
    with cap.pty("/bin/bash", cols=100, rows=30) as term:
        term.write(b"stty size\r")
        read_until(term, r"30 100\r\n")
        term.resize(132, 43)
        term.write(b"stty size; echo cols=$COLUMNS\r")
        # one read: both lines often come in one chunk (bash saw the SIGWINCH too)
        read_until(term, r"43 132\r\n(?s:.)*cols=132")
        term.kill()
        assert [e for e in term][-1].exit_code == -9


def test_pty_survives_a_dropped_socket(cap: Capsule) -> None:
    term = cap.pty("/bin/bash", tag="survivor")
    term.write(b"MARK=swordfish-$((6*7)); echo first:$MARK\r")
    read_until(term, r"first:swordfish-42")
    pid = term.pid
    # The network goes away: no close handshake, the server just sees the connection die.
    term._ws.socket.shutdown(socket.SHUT_RDWR)
    time.sleep(1)
    with cap.pty_connect("survivor") as again:
        assert (again.tag, again.pid) == ("survivor", pid)
        replay = read_until(again, r"first:swordfish-42")  # earlier output, from the scrollback
        assert "MARK=swordfish" in replay
        again.write(b"echo again:$MARK\r")
        read_until(again, r"again:swordfish-42")  # the shell's state is intact
        again.write(b"exit 5\r")
        assert [e for e in again][-1].exit_code == 5
    with pytest.raises(WrennError, match="no PTY session"):
        cap.pty_connect("never-started")


# ---- files ---------------------------------------------------------------------------------


class RssSampler:
    """Peak resident memory of a process while it runs a transfer (VmRSS sampled every 20 ms)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.base = self.rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def hwm(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.02)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def test_200mb_streams_up_and_down_without_buffering(cap: Capsule, wrenn_server) -> None:
    size, chunk = 200 * MIB, MIB
    sent = hashlib.sha256()

    def generate() -> Iterator[bytes]:  # made as it is sent: the test never holds the file either
        rng = random.Random(20241122)
        for _ in range(size // chunk):
            block = rng.randbytes(chunk)
            sent.update(block)
            yield block

    server_pid = wrenn_server.proc.pid
    with RssSampler(server_pid) as up:
        started = time.monotonic()
        cap.files.upload_stream("/root/big.bin", generate())
        up_sec = time.monotonic() - started
    in_guest = cap.commands.run("sha256sum /root/big.bin; stat -c %s /root/big.bin", timeout=600).stdout.split()
    assert in_guest[0] == sent.hexdigest() and int(in_guest[2]) == size

    got = hashlib.sha256()
    received = 0
    with RssSampler(server_pid) as down:
        started = time.monotonic()
        for piece in cap.files.download_stream("/root/big.bin"):
            got.update(piece)
            received += len(piece)
        down_sec = time.monotonic() - started
    assert received == size and got.hexdigest() == sent.hexdigest()

    growth_up, growth_down = up.peak - up.base, down.peak - down.base
    print(f"\n200 MiB upload: {size / MIB / up_sec:.1f} MiB/s ({up_sec:.1f} s), server RSS "
          f"{up.base / MIB:.0f} -> peak {up.peak / MIB:.0f} MiB (+{growth_up / MIB:.0f})")
    print(f"200 MiB download: {size / MIB / down_sec:.1f} MiB/s ({down_sec:.1f} s), server RSS "
          f"{down.base / MIB:.0f} -> peak {down.peak / MIB:.0f} MiB (+{growth_down / MIB:.0f}); "
          f"VmHWM {up.hwm() / MIB:.0f} MiB")
    assert growth_up < 150 * MIB and growth_down < 150 * MIB
    cap.files.remove("/root/big.bin")


# ---- refusals ------------------------------------------------------------------------------


def test_not_running_capsule_gets_an_error_and_a_close(env, wrenn_server) -> None:
    with Capsule(timeout=0, wait=True, **env) as other:
        other.pause()
        assert list(other.commands.stream("echo hi")) == [
            StreamErrorEvent("capsule is paused; it must be running")]
        with pytest.raises(WrennError, match="must be running"):
            other.pty()
        with ws_connect(ws_url(wrenn_server, f"/v1/capsules/{other.id}/pty"),
                        additional_headers={"X-API-Key": wrenn_server.api_key}) as ws:
            assert json.loads(ws.recv(timeout=30)) == {
                "type": "error", "data": "capsule is paused; it must be running", "fatal": True}
            with pytest.raises(Exception):
                ws.recv(timeout=30)
            assert ws.close_code == 1008


def test_bad_api_key_is_rejected(cap: Capsule, wrenn_server) -> None:
    for path in ("exec/stream", "pty", "processes/1/stream"):
        with ws_connect(ws_url(wrenn_server, f"/v1/capsules/{cap.id}/{path}"),
                        additional_headers={"X-API-Key": "wrn_" + "0" * 32}) as ws:
            msg = json.loads(ws.recv(timeout=30))
            assert msg["type"] == "error" and msg["data"] == "invalid API key"
            with pytest.raises(Exception):
                ws.recv(timeout=30)
            assert ws.close_code == 1008
    with WrennClient(api_key="wrn_" + "1" * 32, base_url=wrenn_server.base_url) as stranger:
        intruder = Capsule(_capsule_id=cap.id, _client=stranger)
        assert list(intruder.commands.stream("id")) == [StreamErrorEvent("invalid API key")]
        with pytest.raises(WrennError, match="invalid API key"):
            intruder.pty()


# ---- the published SDK ---------------------------------------------------------------------

PUBLISHED_SCRIPT = textwrap.dedent(r'''
    import json, os, sys, time
    from wrenn import Capsule

    out = {}
    cap = Capsule.connect(sys.argv[1])
    events = [(e.type, getattr(e, "data", None), getattr(e, "exit_code", None))
              for e in cap.commands.stream("echo one; sleep 1; echo two >&2; exit 2")]
    out["stream"] = events
    with cap.pty(cmd="/bin/sh") as term:
        term.write(b"echo $((40+2))\n")
        seen = b""
        for ev in term:
            if ev.type == "started":
                out["started"] = [ev.tag, ev.pid]
            if ev.type == "output":
                seen += ev.data
            if b"42\r\n" in seen.replace(b"$((40+2))", b""):
                break
        out["pty_output"] = seen.decode(errors="replace")
    print("RESULT " + json.dumps(out))
''')


def test_published_sdk_streams_and_pty(cap: Capsule, wrenn_server, tmp_path) -> None:
    candidates = [Path("/tmp/wrenn-pub/bin/python"),
                  Path("~/.cache/wrenn/published-sdk-venv/bin/python").expanduser()]
    python = next((p for p in candidates if p.is_file()), None)
    if python is None:
        pytest.skip("no venv with the published wrenn SDK (see tests/e2e/test_published_sdk.py)")
    script = tmp_path / "published.py"
    script.write_text(PUBLISHED_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WRENN_", "PYTHON"))}
    env.update(WRENN_API_KEY=wrenn_server.api_key, WRENN_BASE_URL=wrenn_server.base_url)
    proc = subprocess.run([str(python), str(script), cap.id], env=env, capture_output=True, text=True,
                          timeout=300)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, proc.stderr[-3000:]
    out = json.loads(line[len("RESULT "):])
    assert [e[0] for e in out["stream"]] == ["start", "stdout", "stderr", "exit"]
    assert out["stream"][1][1] == "one\n" and out["stream"][2][1] == "two\n" and out["stream"][3][2] == 2
    assert out["started"][0].startswith("pty-") and out["started"][1] > 0
    assert "42" in out["pty_output"]
