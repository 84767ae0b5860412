"""`exec`: run a command to completion and return its output."""

from __future__ import annotations

import base64
import binascii
import os
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
    d = defaults.current()
    env = {**DEFAULT_ENV, "HOME": d.home, **({"USER": d.user, "LOGNAME": d.user} if d.uid else {}),
           **dict(d.envs), **{str(k): str(v) for k, v in envs.items()}}
    cwd = params.get("cwd")
    if cwd is None:
        cwd = d.workdir()
    elif not isinstance(cwd, str) or not cwd:
        raise AgentError("invalid", "cwd must be a string")
    elif not os.path.isdir(cwd):
        code = "not_directory" if os.path.exists(cwd) else "not_found"
        raise AgentError(code, f"cwd {cwd}: no such directory")
    return cmd, [str(a) for a in args], env, cwd


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
    stdin_data = None
    if req.params.get("stdin") is not None:
        try:
            stdin_data = base64.b64decode(req.params["stdin"], validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise AgentError("invalid", "stdin must be base64") from None

    started = time.monotonic()
    timed_out = False
    try:
        proc = popen(cmd, args, env, cwd, subprocess.DEVNULL if stdin_data is None else subprocess.PIPE)
    except NotRunnable as exc:
        exit_code, stdout, stderr = exc.exit_code, b"", f"{exc.message}\n".encode()
    else:
        # the host gave up: kill, unless already reaped (its pid could be someone else's by now)
        req.on_cancel(lambda: proc.returncode is None and kill_group(proc.pid))
        try:
            stdout, stderr = proc.communicate(stdin_data, timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc.pid)
            stdout, stderr = _collect_after_kill(proc)
        exit_code = -9 if timed_out else proc.returncode
        if req.cancelled.is_set():
            raise Cancelled()
    fields = {
        "exit_code": exit_code,
        "duration_ms": int((time.monotonic() - started) * 1000),
        "timed_out": timed_out,
        "stdout_len": len(stdout),
        "stderr_len": len(stderr),
    }
    if len(stdout) + len(stderr) <= MAX_PAYLOAD:
        return fields, stdout + stderr
    # Too big for one frame: send it ahead as data frames; the result then has no payload.
    req.send_data(stdout, "stdout")
    req.send_data(stderr, "stderr")
    return fields, b""


def _collect_after_kill(proc: subprocess.Popen) -> tuple[bytes, bytes]:
    try:
        return proc.communicate(timeout=KILL_GRACE_SEC)
    except subprocess.TimeoutExpired:
        # Something outside the group (it called setsid) still holds the pipes: stop waiting.
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe:
                pipe.close()
        proc.wait()
        return b"", b""
