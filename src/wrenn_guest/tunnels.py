"""`tcp_connect`: a TCP connection to a port inside the guest, as a byte stream over the channel.

The request stays open for as long as the connection does. Host `data` frames are written to the
socket, what the socket sends comes back as `data` frames (stream "tcp"). Flow control both ways is
by acknowledged frames (see PROTOCOL.md), so neither side ever holds more than a few frames of one
connection and a slow reader never stalls the other requests on the channel.
"""

from __future__ import annotations

import errno
import socket
import threading

from .protocol import AgentError, error_from_oserror
from .server import Cancelled, Request

# Guest -> host: data frames sent but not yet acknowledged before the socket reader waits. The
# host's per-request queue (64 frames) is larger, so an honest guest never fills it.
WINDOW_FRAMES = 8
READ_SIZE = 512 * 1024  # one recv, one frame: at most 4 MiB of one connection in flight
CONNECT_TIMEOUT_SEC = 10.0
DEFAULT_HOSTS = ("127.0.0.1", "::1")  # a service bound to IPv6 loopback only is reachable too


def tcp_connect(req: Request) -> dict:
    port = req.params.get("port")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise AgentError("invalid", f"port must be an integer between 1 and 65535, not {port!r}")
    host = req.params.get("host")
    if host is not None and (not isinstance(host, str) or not host):
        raise AgentError("invalid", "host must be a non-empty string")
    sock = _connect((host,) if host else DEFAULT_HOSTS, port)
    return _Tunnel(req, sock).run()


def _connect(hosts: tuple[str, ...], port: int) -> socket.socket:
    last: OSError | None = None
    for host in hosts:
        try:
            sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_SEC)
        except ConnectionRefusedError as exc:
            last = exc
            continue
        except TimeoutError:
            raise AgentError("refused", f"connecting to port {port} timed out") from None
        except OSError as exc:
            if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.ENETUNREACH) and (
                    host != hosts[-1] or last is not None):
                last = exc
                continue  # e.g. no IPv6 in this guest: try the next address (or report the refusal)
            if isinstance(exc, socket.gaierror):
                raise AgentError("invalid", f"unknown host {host!r}: {exc}") from None
            raise error_from_oserror(exc) from None
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    where = " or ".join(hosts)
    raise AgentError("refused", f"connection refused: nothing is listening on port {port} ({where})") from last


class _Tunnel:
    def __init__(self, req: Request, sock: socket.socket):
        self.req = req
        self.sock = sock
        self._cond = threading.Condition()
        self._in_flight = 0  # data frames sent to the host and not acknowledged yet
        self._aborted = False
        self._reader_done = threading.Event()
        req.on_ack = self._ack
        req.on_cancel(self._abort)

    def run(self) -> dict:
        try:
            self.req.send({"type": "connected"})
            self.req.server._workers.submit(self._pump_to_host, None)
            writable = True
            try:
                for chunk in self.req.upload_chunks():  # until the host's `end`
                    if writable:
                        try:
                            self.sock.sendall(chunk)
                        except OSError:
                            writable = False  # the service stopped reading: drop the rest
                    self.req.send({"type": "ack", "frames": 1})
                # The host has nothing more to send: half-close, let the service answer to the end.
                _shutdown(self.sock, socket.SHUT_WR)
                self._reader_done.wait()
            except Cancelled:
                self._abort()
                self._reader_done.wait()
                raise
            if self.req.cancelled.is_set():
                raise Cancelled()
            return {}
        finally:
            self._abort()
            self.sock.close()

    def _ack(self, frames: int) -> None:
        with self._cond:
            self._in_flight = max(0, self._in_flight - frames)
            self._cond.notify_all()

    def _abort(self) -> None:
        with self._cond:
            self._aborted = True
            self._cond.notify_all()
        _shutdown(self.sock, socket.SHUT_RDWR)  # wakes a recv or sendall blocked in another thread

    def _pump_to_host(self, _arg: object) -> None:
        """Socket -> host `data` frames, then `end` when the service closes its side."""
        try:
            while True:
                with self._cond:
                    while self._in_flight >= WINDOW_FRAMES and not self._aborted:
                        self._cond.wait()
                    if self._aborted:
                        return
                try:
                    data = self.sock.recv(READ_SIZE)
                except OSError:
                    data = b""  # reset by the service, or shut down by _abort
                if not data:
                    break
                with self._cond:
                    self._in_flight += 1
                self.req.send({"type": "data", "stream": "tcp"}, data)
            if not self._aborted:
                self.req.send({"type": "end"})
        except OSError:
            pass  # the channel failed: the read loop cancels everything
        finally:
            self._reader_done.set()


def _shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass  # not connected any more, or closed
