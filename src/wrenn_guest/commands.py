"""`exec`: run a command to completion and return its output."""

from __future__ import annotations

import base64
import binascii
import os
import select
import selectors
import signal
import subprocess
import time

from . import defaults
from .protocol import MAX_PAYLOAD, AgentError
from .server import Cancelled, Request

DEFAULT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}
DEFAULT_TIMEOUT_SEC = 30
KILL_GRACE_SEC = 2  # after killing a group, how long to wait for its pipes to close
# Kept per output stream of a foreground exec (the host asks for its own cap, usually the same);
# the rest is dropped, so a command printing gigabytes cannot exhaust the agent's memory.
DEFAULT_MAX_OUTPUT = 16 * 1024 * 1024
READ_CHUNK = 256 * 1024


def command_line(params: dict) -> tuple[str, list[str], dict[str, str], str]:
    """Validate cmd/args/envs/cwd shared by exec, spawn and PTYs; returns (cmd, args, env, cwd).
    The defaults (`defaults.py`: a template's USER, WORKDIR, ENV) fill what the request leaves out."""
    cmd = params.get("cmd")
    if not isinstance(cmd, str) or not cmd:
        raise AgentError("invalid", "cmd must be a non-empty string")
    args = params.get("args") or []
    envs = params.get("envs") or {}
    if not isinstance(args, list) or not isinstance(envs, dict):
        raise AgentError("invalid", "args must be a list and envs an object")
    # The kernel takes C strings: a NUL would cut them (Python refuses them with a bare ValueError).
    if "\0" in cmd or any(not isinstance(a, str) or "\0" in a for a in args):
        raise AgentError("invalid", "cmd and args must be strings without NUL characters")
    for name, value in envs.items():
        if not isinstance(name, str) or not name or "=" in name or "\0" in name:
            raise AgentError("invalid", f"invalid environment variable name {name[:64]!r}: "
                             "it must be non-empty, without '=' or NUL")
        if not isinstance(value, str) or "\0" in value:
            raise AgentError("invalid", f"environment variable {name[:64]!r}: value must be a string without NUL")
    d = defaults.current()
    env = {**DEFAULT_ENV, "HOME": d.home, **({"USER": d.user, "LOGNAME": d.user} if d.uid else {}),
           **dict(d.envs), **envs}
    cwd = params.get("cwd")
    if cwd is None:
        cwd = d.workdir()
    elif not isinstance(cwd, str) or not cwd or "\0" in cwd:
        raise AgentError("invalid", "cwd must be a string without NUL characters")
    elif not os.path.isdir(cwd):
        code = "not_directory" if os.path.exists(cwd) else "not_found"
        raise AgentError(code, f"cwd {cwd}: no such directory")
    return cmd, list(args), env, cwd


class NotRunnable(Exception):
    """The executable cannot be run; carries what a shell would answer."""

    def __init__(self, cmd: str, exc: OSError):
        self.permission = isinstance(exc, PermissionError)
        self.exit_code = 126 if self.permission else 127
        self.message = f"{cmd}: permission denied" if self.permission else f"{cmd}: command not found"
        super().__init__(self.message)


def popen(cmd: str, args: list[str], env: dict, cwd: str, stdin) -> subprocess.Popen:
    """Start `cmd` in its own session, so that its whole process group can be killed."""
    try:
        return subprocess.Popen([cmd, *args], env=env, cwd=cwd, stdin=stdin, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, **defaults.current().popen_kwargs())
    except (FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        if exc.filename == cwd:  # cwd vanished (or is not ours) between the check and the exec
            raise
        raise NotRunnable(cmd, exc) from exc


def kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def exec_(req: Request):
    cmd, args, env, cwd = command_line(req.params)
    timeout = req.params.get("timeout_sec", DEFAULT_TIMEOUT_SEC)
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
        raise AgentError("invalid", "timeout_sec must be a positive number")
    cap = req.params.get("max_output_bytes") or DEFAULT_MAX_OUTPUT
    if not isinstance(cap, int) or isinstance(cap, bool) or cap <= 0:
        raise AgentError("invalid", "max_output_bytes must be a positive integer")
    stdin_data = None
    if req.params.get("stdin") is not None:
        try:
            stdin_data = base64.b64decode(req.params["stdin"], validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise AgentError("invalid", "stdin must be base64") from None

    started = time.monotonic()
    timed_out = False
    out = Output(cap)
    try:
        proc = popen(cmd, args, env, cwd, subprocess.DEVNULL if stdin_data is None else subprocess.PIPE)
    except NotRunnable as exc:
        exit_code = exc.exit_code
        out.add(2, f"{exc.message}\n".encode())
    else:
        # the host gave up: kill, unless already reaped (its pid could be someone else's by now)
        req.on_cancel(lambda: proc.returncode is None and kill_group(proc.pid))
        deadline = None if timeout is None else started + timeout
        if not out.gather(proc, stdin_data, deadline) or not _wait(proc, deadline):
            timed_out = True
            kill_group(proc.pid)
            if not out.gather(proc, None, time.monotonic() + KILL_GRACE_SEC):
                out.abandon(proc)  # something outside the group (it called setsid) holds the pipes
            proc.wait()
        exit_code = -9 if timed_out else proc.returncode
        if req.cancelled.is_set():
            raise Cancelled()
    stdout, stderr = bytes(out.data[1]), bytes(out.data[2])
    fields = {
        "exit_code": exit_code,
        "duration_ms": int((time.monotonic() - started) * 1000),
        "timed_out": timed_out,
        "stdout_len": len(stdout),
        "stderr_len": len(stderr),
        "stdout_truncated": out.truncated[1],
        "stderr_truncated": out.truncated[2],
    }
    if len(stdout) + len(stderr) <= MAX_PAYLOAD:
        return fields, stdout + stderr
    # Too big for one frame: send it ahead as data frames; the result then has no payload.
    req.send_data(stdout, "stdout")
    req.send_data(stderr, "stderr")
    return fields, b""


def _wait(proc: subprocess.Popen, deadline: float | None) -> bool:
    """Both pipes are closed: wait for the process itself (until the deadline)."""
    try:
        proc.wait(None if deadline is None else max(deadline - time.monotonic(), 0))
        return True
    except subprocess.TimeoutExpired:
        return False


class Output:
    """stdout (1) and stderr (2) of a command, each kept up to `cap` bytes; past that the pipe is
    still drained (so the command is not blocked and runs to its end) but the bytes are dropped,
    and `truncated` says so. Read in the request's own thread, like subprocess.communicate."""

    def __init__(self, cap: int):
        self.cap = cap
        self.data = {1: bytearray(), 2: bytearray()}
        self.truncated = {1: False, 2: False}
        self._stdin_offset = 0

    def add(self, stream: int, chunk: bytes) -> None:
        buf = self.data[stream]
        room = self.cap - len(buf)
        if room > 0:
            buf += chunk[:room]
        if len(chunk) > room:
            self.truncated[stream] = True

    def gather(self, proc: subprocess.Popen, stdin_data: bytes | None, deadline: float | None) -> bool:
        """Read both pipes (and feed stdin) until EOF: True, or until `deadline`: False."""
        with selectors.DefaultSelector() as sel:
            for pipe, stream in ((proc.stdout, 1), (proc.stderr, 2)):
                if pipe is not None and not pipe.closed:
                    sel.register(pipe.fileno(), selectors.EVENT_READ, stream)
            if proc.stdin is not None and not proc.stdin.closed:
                if stdin_data:
                    sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE, 0)
                else:  # nothing (more) to send: the command sees EOF
                    proc.stdin.close()
            while sel.get_map():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                for key, _ in sel.select(remaining):
                    if key.data == 0:
                        self._feed(sel, proc, stdin_data or b"")
                        continue
                    chunk = os.read(key.fd, READ_CHUNK)
                    if chunk:
                        self.add(key.data, chunk)
                    else:
                        sel.unregister(key.fd)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        return True

    def _feed(self, sel: selectors.BaseSelector, proc: subprocess.Popen, data: bytes) -> None:
        assert proc.stdin is not None
        piece = data[self._stdin_offset:self._stdin_offset + select.PIPE_BUF]
        try:
            self._stdin_offset += os.write(proc.stdin.fileno(), piece)
        except BrokenPipeError:
            self._stdin_offset = len(data)  # the command does not read its input: fine
        if self._stdin_offset >= len(data):
            sel.unregister(proc.stdin.fileno())
            proc.stdin.close()

    @staticmethod
    def abandon(proc: subprocess.Popen) -> None:
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe and not pipe.closed:
                pipe.close()
