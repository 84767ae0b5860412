"""``wrenn capsule shell``: this terminal wired to a PTY session in a capsule.

The local terminal is put in raw mode (every key, ^C included, goes to the capsule) and restored
on the way out, whatever happens. The remote terminal follows the local size (SIGWINCH). Keys go
out from the main thread; output is written by a second thread as it arrives.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import sys
import termios
import threading
import tty
from collections.abc import Iterator

from wrenn import PtySession, WrennError

DETACH_KEY = b"\x1d"  # ^] detaches (the session keeps running), as telnet's escape does


def exit_status(code: int | None) -> int:
    """A shell-style status for the remote program's exit code (killed by signal n: 128 + n)."""
    if code is None:
        return 1
    if code < 0:
        return min(128 - code, 255)
    return code if code <= 255 else 1


def terminal_size(fd: int) -> tuple[int, int]:
    """(cols, rows) of the terminal on `fd`, else of the environment (COLUMNS/LINES), else 80x24."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        size = shutil.get_terminal_size((80, 24))
    return max(size.columns, 1), max(size.lines, 1)


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """Raw input on a terminal `fd` (no-op when it is not a terminal); always restored."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, saved)


class ShellResult:
    def __init__(self) -> None:
        self.exit_code: int | None = None
        self.error: str | None = None
        self.detached = False
        self.lost = False  # the connection ended without an exit


def run_shell(session: PtySession, stdin_fd: int | None = None, stdout_fd: int | None = None) -> ShellResult:
    """Relay keys and output until the program exits, ^] detaches, or the connection ends."""
    stdin_fd = sys.stdin.fileno() if stdin_fd is None else stdin_fd
    stdout_fd = sys.stdout.fileno() if stdout_fd is None else stdout_fd
    result = ShellResult()
    wake_r, wake_w = os.pipe()
    done = threading.Event()
    resized = threading.Event()

    def wake() -> None:
        with contextlib.suppress(OSError):
            os.write(wake_w, b"x")

    def pump_output() -> None:
        try:
            for event in session:
                if event.type == "output" and isinstance(event.data, bytes):
                    _write_all(stdout_fd, event.data)
                elif event.type == "exit":
                    result.exit_code = event.exit_code
                    return
                elif event.type == "error":
                    if event.fatal:
                        result.error = str(event.data)
                        return
                    _write_all(stdout_fd, f"\r\n[wrenn: {event.data}]\r\n".encode())
            result.lost = True
        except Exception as exc:  # the connection broke under us
            result.error = str(exc) or type(exc).__name__
        finally:
            done.set()
            wake()

    def on_winch(signum: int, frame: object) -> None:
        resized.set()
        wake()

    old_winch = signal.signal(signal.SIGWINCH, on_winch) if _main_thread() else None
    reader = threading.Thread(target=pump_output, name="pty-output", daemon=True)
    reader.start()
    stdin_open = True
    try:
        with raw_mode(stdin_fd):
            while not done.is_set():
                watch = [wake_r] + ([stdin_fd] if stdin_open else [])
                try:
                    ready, _, _ = select.select(watch, [], [])
                except InterruptedError:
                    continue
                if wake_r in ready:
                    os.read(wake_r, 512)
                    if resized.is_set():
                        resized.clear()
                        with contextlib.suppress(WrennError, ValueError):
                            session.resize(*terminal_size(stdout_fd))
                if stdin_open and stdin_fd in ready:
                    data = os.read(stdin_fd, 4096)
                    if not data:  # input ended (a pipe): keep showing output until the program exits
                        stdin_open = False
                        continue
                    if DETACH_KEY in data and os.isatty(stdin_fd):
                        before = data.split(DETACH_KEY, 1)[0]
                        if before:
                            session.write(before)
                        result.detached = True
                        break
                    try:
                        session.write(data)
                    except WrennError:
                        break  # the output thread reports why
    finally:
        if old_winch is not None:
            signal.signal(signal.SIGWINCH, old_winch)
        if result.detached or not done.is_set():
            session.detach()
        reader.join(5)
        os.close(wake_r)
        os.close(wake_w)
    return result


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
