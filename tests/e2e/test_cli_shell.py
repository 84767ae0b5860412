"""`wrenn capsule shell` in a real terminal (tmux) and `wrenn capsule exec --stream`, against a
real server and capsule."""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from wrenn import Capsule

pytestmark = pytest.mark.vm

WRENN = [sys.executable, "-m", "wrenn_cli.main"]


@pytest.fixture(scope="module")
def cap(wrenn_server) -> Iterator[Capsule]:
    capsule = Capsule(timeout=0, wait=True, api_key=wrenn_server.api_key, base_url=wrenn_server.base_url)
    yield capsule
    capsule.destroy()
    capsule.close()


@pytest.fixture
def cli_env(wrenn_server) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WRENN_")}
    env.update(WRENN_API_KEY=wrenn_server.api_key, WRENN_BASE_URL=wrenn_server.base_url)
    return env


class Tmux:
    """A detached tmux session on a private server socket."""

    def __init__(self, command: str, env: dict[str, str], cols: int = 120, rows: int = 30):
        if shutil.which("tmux") is None:
            pytest.skip("tmux is not installed")
        self.socket = f"wrenn-test-{secrets.token_hex(4)}"
        self.env = env
        self.run("new-session", "-d", "-s", "t", "-x", str(cols), "-y", str(rows), command)

    def run(self, *args: str) -> str:
        out = subprocess.run(["tmux", "-L", self.socket, *args], env=self.env, capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "t", *keys)

    def type(self, text: str) -> None:
        self.run("send-keys", "-t", "t", "-l", text)
        self.keys("Enter")

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "t", "-S", "-200")

    def wait_for(self, pattern: str, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if re.search(pattern, screen, re.MULTILINE):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} on screen within {timeout}s:\n{screen}")
            time.sleep(0.3)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


def test_shell_in_a_terminal(cap: Capsule, cli_env: dict[str, str]) -> None:
    # After the shell: the exit status, then whether the local terminal is back in cooked mode.
    command = (f"{shlex.join([*WRENN, 'capsule', 'shell', cap.id])}; echo EXIT=$?; "
               "stty -a | grep -o -- '-\\?icanon' | sed 's/^/LOCAL-/'; sleep 600")
    tmux = Tmux(command, cli_env, cols=120, rows=30)
    try:
        prompt = tmux.wait_for(r"root@[\w-]+:~# ?$")
        assert cap.id in prompt  # the capsule's hostname is its id
        tmux.type("echo $((6*7)) from $(hostname); tty")
        # (the two lines may reach the screen in two updates: wait for the last one)
        screen = tmux.wait_for(r"^/dev/pts/\d+$")
        assert re.search(r"^42 from cl-", screen, re.MULTILINE)
        tmux.type("stty size")
        tmux.wait_for(r"^30 120$")  # the remote terminal has the local size
        tmux.run("resize-window", "-t", "t", "-x", "100", "-y", "25")
        time.sleep(1)
        tmux.type("stty size")
        tmux.wait_for(r"^25 100$")  # ...and follows it (SIGWINCH)
        tmux.type("sleep 300")
        time.sleep(2)
        tmux.keys("C-c")  # raw mode: ^C goes to the capsule, not to the local client
        tmux.type("echo still-alive")
        tmux.wait_for(r"^still-alive$")
        tmux.type("exit 3")
        screen = tmux.wait_for(r"^LOCAL-")
        assert re.search(r"^EXIT=3$", screen, re.MULTILINE), screen
        assert re.search(r"^LOCAL-icanon$", screen, re.MULTILINE), screen  # terminal restored
    finally:
        tmux.close()


def test_shell_detach_and_attach(cap: Capsule, cli_env: dict[str, str]) -> None:
    tag = f"cli-{secrets.token_hex(3)}"
    tmux = Tmux(f"{shlex.join([*WRENN, 'capsule', 'shell', cap.id, '--tag', tag])}; echo EXIT=$?; sleep 600",
                cli_env)
    try:
        tmux.wait_for(r"root@[\w-]+:~# ?$")
        tmux.type("KEEP=kept-value; echo set")
        tmux.wait_for(r"^set$")
        tmux.keys("C-]")  # detach: the session keeps running
        screen = tmux.wait_for(r"^EXIT=0$")
        assert f"--attach {tag}" in screen.replace("\n", "")
    finally:
        tmux.close()
    tmux = Tmux(f"{shlex.join([*WRENN, 'capsule', 'shell', cap.id, '--attach', tag])}; echo EXIT=$?; sleep 600",
                cli_env)
    try:
        tmux.wait_for(r"^set$")  # the scrollback comes back
        tmux.type("echo value=$KEEP")
        tmux.wait_for(r"^value=kept-value$")
        tmux.type("exit")
        tmux.wait_for(r"^EXIT=0$")
    finally:
        tmux.close()


def test_exec_stream_prints_output_as_it_arrives(cap: Capsule, cli_env: dict[str, str]) -> None:
    proc = subprocess.Popen(
        [*WRENN, "capsule", "exec", "--stream", cap.id, "--",
         "for i in 1 2 3; do echo tick-$i; sleep 1; done; echo oops >&2; exit 4"],
        env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    arrivals = []
    for line in proc.stdout:
        arrivals.append((time.monotonic(), line.decode().rstrip("\n")))
    assert proc.wait(60) == 4
    assert [text for _, text in arrivals] == ["tick-1", "tick-2", "tick-3"]
    gaps = [b[0] - a[0] for a, b in zip(arrivals, arrivals[1:])]
    assert all(g >= 0.5 for g in gaps), gaps  # printed as produced, not at the end
    assert proc.stderr is not None and proc.stderr.read() == b"oops\n"
    # --json: one event per line.
    out = subprocess.run([*WRENN, "capsule", "exec", "--stream", "--json", cap.id, "--", "echo a; exit 2"],
                         env=cli_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    assert events[0]["type"] == "start" and events[0]["pid"] > 0
    assert events[1:] == [{"type": "stdout", "data": "a\n"}, {"type": "exit", "exit_code": 2}]
