"""Background processes: `spawn`, `ps`, `kill`, `attach`."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import threading

from .commands import NotRunnable, command_line, kill_group, popen
from .protocol import MAX_PAYLOAD, AgentError
from .server import Request

RING_BYTES = 4 << 20  # output kept per stream for late attachers
STREAMS = ("stdout", "stderr")
READER_GRACE_SEC = 1  # after exit, how long to wait for output still in the pipes


class Ring:
    """The last `cap` bytes of a stream, addressed by absolute offset so readers can follow it."""

    def __init__(self, cap: int = RING_BYTES):
        self.cap = cap
        self.buf = bytearray()
        self.start = 0  # absolute offset of buf[0]

    def append(self, data: bytes) -> None:
        self.buf += data
        extra = len(self.buf) - self.cap
        if extra > 0:
            del self.buf[:extra]
            self.start += extra

    def read_from(self, pos: int, limit: int) -> tuple[bytes, int]:
        """Bytes from `pos` on (from the oldest kept byte if `pos` fell out); returns (data, new pos)."""
        pos = max(pos, self.start)
        data = bytes(self.buf[pos - self.start:pos - self.start + limit])
        return data, pos + len(data)


class Process:
    def __init__(self, proc: subprocess.Popen, tag: str, cmd: str, args: list[str]):
        self.popen = proc
        self.pid = proc.pid
        self.tag = tag
        self.cmd = cmd
        self.args = args
        self.rings = {s: Ring() for s in STREAMS}
        self.cond = threading.Condition()  # guards rings/exit state; notified on output and exit
        self.exit_code: int | None = None
        self.done = False  # exited and its output collected
        self.forget = False  # killed by the host: drop from the table once it has exited

    def info(self) -> dict:
        return {"pid": self.pid, "tag": self.tag, "cmd": self.cmd, "args": self.args,
                "running": not self.done, "exit_code": self.exit_code}


class Table:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.procs: dict[int, Process] = {}

    def spawn(self, req: Request) -> dict:
        cmd, args, env, cwd = command_line(req.params)
        tag = req.params.get("tag")
        if tag is not None and (not isinstance(tag, str) or not tag):
            raise AgentError("invalid", "tag must be a non-empty string")
        with self.lock:  # held across start so two spawns cannot take the same tag
            if tag is None:
                tag = f"proc-{secrets.token_hex(4)}"
            elif any(p.tag == tag and not p.done for p in self.procs.values()):
                raise AgentError("exists", f"tag {tag!r} is used by a running process")
            try:
                proc = popen(cmd, args, env, cwd, subprocess.DEVNULL)
            except NotRunnable as exc:
                raise AgentError("permission_denied" if exc.permission else "not_found", exc.message) from None
            # A finished process with the same tag is replaced, so tags stay unambiguous.
            for old in [p for p in self.procs.values() if p.tag == tag]:
                del self.procs[old.pid]
            p = Process(proc, tag, cmd, args)
            self.procs[p.pid] = p
        readers = [threading.Thread(target=_pump, args=(p, s, getattr(proc, s)), daemon=True) for s in STREAMS]
        for t in readers:
            t.start()
        threading.Thread(target=self._reap, args=(p, readers), daemon=True).start()
        return {"pid": p.pid, "tag": tag}

    def _reap(self, p: Process, readers: list[threading.Thread]) -> None:
        code = p.popen.wait()  # waitpid on this child only: tini reaps everything else
        for t in readers:
            t.join(READER_GRACE_SEC)  # a grandchild may keep the pipes open: don't wait for it
        with p.cond:
            p.exit_code = code
            p.done = True
            p.cond.notify_all()
        with self.lock:
            if p.forget and self.procs.get(p.pid) is p:
                del self.procs[p.pid]

    def ps(self, req: Request) -> dict:
        with self.lock:
            return {"processes": [p.info() for p in self.procs.values()]}

    def find(self, target) -> Process:
        with self.lock:
            if isinstance(target, int) and not isinstance(target, bool):
                p = self.procs.get(target)
            elif isinstance(target, str):
                by_tag = [p for p in self.procs.values() if p.tag == target]
                p = by_tag[-1] if by_tag else None
                if p is None and target.isdigit():
                    p = self.procs.get(int(target))
            else:
                raise AgentError("invalid", "target must be a pid or a tag")
        if p is None:
            raise AgentError("no_such_process", f"no process {target!r}")
        return p

    def kill(self, req: Request) -> dict:
        sig = _signal(req.params.get("signal", "SIGKILL"))
        p = self.find(req.params.get("target"))
        with self.lock:
            if p.done:  # already exited: "kill" just removes it from the list
                self.procs.pop(p.pid, None)
                return {}
            p.forget = True
        kill_group(p.pid, sig)
        return {}

    def attach(self, req: Request) -> dict:
        p = self.find(req.params.get("target"))

        def wake() -> None:
            with p.cond:
                p.cond.notify_all()

        req.on_cancel(wake)
        pos = {s: p.rings[s].start for s in STREAMS}  # replay everything still buffered
        while True:
            with p.cond:
                while True:
                    chunks = []
                    for s in STREAMS:
                        data, pos[s] = p.rings[s].read_from(pos[s], MAX_PAYLOAD)
                        if data:
                            chunks.append((s, data))
                    if chunks or p.done or req.cancelled.is_set():
                        break
                    p.cond.wait()
                done, code = p.done, p.exit_code
            if req.cancelled.is_set():
                return {"exit_code": None}
            for s, data in chunks:  # sent without holding the lock: a slow host must not stall the pumps
                req.send_data(data, s)
            if not chunks and done:
                return {"exit_code": code}

    def shutdown(self) -> None:
        """Kill every running process (the agent is exiting for good)."""
        with self.lock:
            running = [p for p in self.procs.values() if not p.done]
        for p in running:
            kill_group(p.pid)


def _pump(p: Process, stream: str, pipe) -> None:
    fd = pipe.fileno()
    try:
        while True:
            data = os.read(fd, 65536)
            if not data:
                break
            with p.cond:
                p.rings[stream].append(data)
                p.cond.notify_all()
    finally:
        pipe.close()


def _signal(value) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return signal.Signals(value)
        except ValueError:
            pass
    elif isinstance(value, str):
        name = value.upper()
        try:
            return signal.Signals[name if name.startswith("SIG") else "SIG" + name]
        except KeyError:
            pass
    raise AgentError("invalid", f"unknown signal {value!r}")
