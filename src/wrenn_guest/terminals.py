"""Interactive terminals: `pty_start`, `pty_list`, `pty_attach`, `pty_input`, `pty_resize`, `pty_kill`.

A session is a process on the slave side of a pseudo-terminal, owned by the agent: it lives on
whether or not anyone is attached, so a host that lost its connection can attach again and get the
recent output (a bounded scrollback) followed by the live output.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import select
import struct
import subprocess
import termios
import threading

from . import defaults
from .commands import command_line, kill_group
from .processes import READER_GRACE_SEC, Ring, _signal
from .protocol import MAX_PAYLOAD, AgentError
from .server import Request

SCROLLBACK_BYTES = 64 << 10  # replayed to a (re)attaching host
KEEP_FINISHED = 16  # finished sessions kept (for a late attach to see the end) before the oldest go
DEFAULT_TERM = "xterm-256color"
MAX_DIMENSION = 10000


def set_size(fd: int, cols: int, rows: int) -> None:
    """TIOCSWINSZ; the kernel sends SIGWINCH to the terminal's foreground process group."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def get_size(fd: int) -> tuple[int, int]:
    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    return cols, rows


def _dimension(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_DIMENSION:
        raise AgentError("invalid", f"{name} must be an integer between 1 and {MAX_DIMENSION}")
    return value


def _take_controlling_tty() -> None:
    # Runs in the child between fork and exec, after setsid (start_new_session): the terminal on
    # fd 0 becomes the new session's controlling terminal (job control, ^C, SIGWINCH).
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _popen(cmd: str, args: list[str], env: dict, cwd: str, slave: int) -> subprocess.Popen:
    try:
        return subprocess.Popen([cmd, *args], env=env, cwd=cwd, stdin=slave, stdout=slave, stderr=slave,
                                start_new_session=True, preexec_fn=_take_controlling_tty,
                                **defaults.current().popen_kwargs())
    except (FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        if exc.filename == cwd:  # cwd vanished between the check and the exec
            raise
        if isinstance(exc, PermissionError):
            raise AgentError("permission_denied", f"{cmd}: permission denied") from None
        raise AgentError("not_found", f"{cmd}: command not found") from None


class Session:
    def __init__(self, proc: subprocess.Popen, master: int, tag: str, cmd: str, args: list[str]):
        self.popen = proc
        self.pid = proc.pid
        self.master = master  # non-blocking
        self.tag = tag
        self.cmd = cmd
        self.args = args
        self.ring = Ring(SCROLLBACK_BYTES)
        self.cond = threading.Condition()  # guards ring / exit state; notified on output and exit
        self.write_lock = threading.Lock()  # one input at a time, so keystrokes keep their order
        self.exit_code: int | None = None
        self.done = False  # exited and its output collected
        self.closed = False  # master fd closed (after done)
        self._wake_r, self._wake_w = os.pipe()  # tells the reader to stop waiting for output

    def info(self) -> dict:
        cols = rows = None
        with self.cond:
            if not self.closed:
                try:
                    cols, rows = get_size(self.master)
                except OSError:
                    pass
        return {"pid": self.pid, "tag": self.tag, "cmd": self.cmd, "args": self.args,
                "running": not self.done, "exit_code": self.exit_code, "cols": cols, "rows": rows}

    def pump(self) -> None:
        """Terminal output -> scrollback, until every holder of the slave side is gone (EIO) or
        `stop_pump` (a background child keeps the terminal open after the session's process ended)."""
        stopping = False
        while True:
            if not stopping:
                ready, _, _ = select.select([self.master, self._wake_r], [], [])
                stopping = self._wake_r in ready
            try:
                data = os.read(self.master, 65536)
            except BlockingIOError:
                if stopping:
                    return  # drained what was there
                continue
            except OSError:  # EIO: the slave side is closed for good
                return
            if not data:
                return
            with self.cond:
                self.ring.append(data)
                self.cond.notify_all()

    def stop_pump(self) -> None:
        os.write(self._wake_w, b"x")

    def close(self) -> None:
        with self.write_lock, self.cond:
            if self.closed:
                return
            self.closed = True
            os.close(self.master)
        os.close(self._wake_r)
        os.close(self._wake_w)


class Terminals:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sessions: dict[int, Session] = {}
        self._finished: list[Session] = []  # oldest first

    def start(self, req: Request) -> dict:
        params = dict(req.params)
        if params.get("cmd") is None:
            params["cmd"] = "/bin/bash"
        cmd, args, env, cwd = command_line(params)
        env.setdefault("TERM", DEFAULT_TERM)
        cols = _dimension(params.get("cols", 80), "cols")
        rows = _dimension(params.get("rows", 24), "rows")
        tag = params.get("tag")
        if tag is not None and (not isinstance(tag, str) or not tag):
            raise AgentError("invalid", "tag must be a non-empty string")
        with self.lock:  # held across start so two starts cannot take the same tag
            if tag is None:
                tag = f"pty-{secrets.token_hex(4)}"
            elif any(s.tag == tag and not s.done for s in self.sessions.values()):
                raise AgentError("exists", f"tag {tag!r} is used by a running terminal")
            master, slave = os.openpty()
            try:
                set_size(master, cols, rows)
                proc = _popen(cmd, args, env, cwd, slave)
            except BaseException:
                os.close(master)
                raise
            finally:
                os.close(slave)  # the child has its own: the master reads EIO once the last holder is gone
            os.set_blocking(master, False)
            for old in [s for s in self.sessions.values() if s.tag == tag]:  # a finished namesake
                self._forget(old)
            s = Session(proc, master, tag, cmd, args)
            self.sessions[s.pid] = s
        reader = threading.Thread(target=s.pump, name=f"pty-{s.pid}", daemon=True)
        reader.start()
        threading.Thread(target=self._reap, args=(s, reader), daemon=True).start()
        return {"pid": s.pid, "tag": tag}

    def _reap(self, s: Session, reader: threading.Thread) -> None:
        code = s.popen.wait()  # this child only: tini reaps everything else
        reader.join(READER_GRACE_SEC)
        if reader.is_alive():  # a background child holds the terminal: take what is there, stop
            s.stop_pump()
            reader.join()
        with s.cond:
            s.exit_code = code
            s.done = True
            s.cond.notify_all()
        s.close()
        with self.lock:
            if self.sessions.get(s.pid) is s:
                self._finished.append(s)
                while len(self._finished) > KEEP_FINISHED:
                    self._forget(self._finished[0])

    def _forget(self, s: Session) -> None:  # with self.lock held
        if self.sessions.get(s.pid) is s:
            del self.sessions[s.pid]
        if s in self._finished:
            self._finished.remove(s)

    def find(self, target) -> Session:
        with self.lock:
            if isinstance(target, int) and not isinstance(target, bool):
                s = self.sessions.get(target)
            elif isinstance(target, str):
                by_tag = [s for s in self.sessions.values() if s.tag == target]
                s = by_tag[-1] if by_tag else None
                if s is None and target.isdigit():
                    s = self.sessions.get(int(target))
            else:
                raise AgentError("invalid", "target must be a pid or a tag")
        if s is None:
            raise AgentError("no_such_process", f"no terminal {target!r}")
        return s

    def list(self, req: Request) -> dict:
        with self.lock:
            sessions = list(self.sessions.values())
        return {"sessions": [s.info() for s in sessions]}

    def attach(self, req: Request) -> dict:
        s = self.find(req.params.get("target"))

        def wake() -> None:
            with s.cond:
                s.cond.notify_all()

        req.on_cancel(wake)
        pos = s.ring.start  # replay the scrollback, then follow
        while True:
            with s.cond:
                while True:
                    data, pos = s.ring.read_from(pos, MAX_PAYLOAD)
                    if data or s.done or req.cancelled.is_set():
                        break
                    s.cond.wait()
                done, code = s.done, s.exit_code
            if req.cancelled.is_set():
                return {"exit_code": None}
            if data:  # sent without the lock: a slow host must not stall the reader
                req.send_data(data, "pty")
            elif done:
                return {"exit_code": code}

    def input(self, req: Request) -> dict:
        s = self.find(req.params.get("target"))
        data = memoryview(req.payload)
        gone = AgentError("no_such_process", f"terminal {s.tag!r} has exited")
        with s.write_lock:
            while data:
                if s.done or s.closed or req.cancelled.is_set():
                    raise gone
                try:
                    data = data[os.write(s.master, data):]
                except BlockingIOError:  # the program is not reading its input: wait, bounded
                    select.select([], [s.master], [], 0.5)
                except OSError as exc:
                    if exc.errno == errno.EIO:
                        raise gone from None
                    raise
        return {}

    def resize(self, req: Request) -> dict:
        s = self.find(req.params.get("target"))
        cols = _dimension(req.params.get("cols"), "cols")
        rows = _dimension(req.params.get("rows"), "rows")
        with s.cond:
            if s.closed:
                raise AgentError("no_such_process", f"terminal {s.tag!r} has exited")
            set_size(s.master, cols, rows)
        return {}

    def kill(self, req: Request) -> dict:
        sig = _signal(req.params.get("signal", "SIGKILL"))
        s = self.find(req.params.get("target"))
        if s.done:  # already exited: "kill" removes it from the table
            with self.lock:
                self._forget(s)
            return {}
        kill_group(s.pid, sig)
        return {}

    def shutdown(self) -> None:
        with self.lock:
            running = [s for s in self.sessions.values() if not s.done]
        for s in running:
            kill_group(s.pid)
