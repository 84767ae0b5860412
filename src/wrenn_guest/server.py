"""Read loop and request dispatch: requests run on reusable worker threads, one lock around writes."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Callable

from .protocol import MAX_PAYLOAD, AgentError, FrameDecoder, encode_frame, error_from_oserror

log = logging.getLogger("wrenn_guest")

READ_SIZE = 1 << 20
EOF_RETRY_SEC = 0.05
# Upload chunks queued per request before the read loop waits for the handler (disk slower than
# the channel): bounds the agent's memory during a big upload instead of buffering it whole.
INBOX_FRAMES = 8
INBOX_POLL_SEC = 0.2
# Quick, never-blocking ops answered on the reader thread: no hand-off to a worker, which matters
# for the first request after a restore, when every code path of an emulated guest is cold.
INLINE_OPS = frozenset({"ping", "identity"})
_END = object()  # inbox marker: the host finished an upload (or cancelled it)


class Workers:
    """Reusable threads. Starting a thread is slow in a guest whose CPU is emulated, and threads
    that already exist in a template snapshot cost nothing after a restore. Grows when all are busy
    (requests may block for long: exec, attach, uploads)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = 0
        self._lock = threading.Lock()

    def submit(self, fn: Callable, arg) -> None:
        with self._lock:
            grow = self._idle == 0
            if not grow:
                self._idle -= 1
        self._jobs.put((fn, arg))
        if grow:
            threading.Thread(target=self._loop, name="worker", daemon=True).start()

    def _loop(self) -> None:
        while True:
            fn, arg = self._jobs.get()
            try:
                fn(arg)
            except Exception:
                log.exception("worker job failed")
            with self._lock:
                self._idle += 1


class Cancelled(AgentError):
    """The host sent `cancel`. The spec has no code for it; the host has stopped listening anyway."""

    def __init__(self) -> None:
        super().__init__("invalid", "cancelled")


class Request:
    """One running request, as seen by its handler."""

    def __init__(self, server: "Server", rid, op: str, params: dict, payload: bytes):
        self.server = server
        self.id = rid
        self.op = op
        self.params = params
        self.payload = payload
        self.cancelled = threading.Event()
        self.finished = False  # the handler returned: nobody consumes the inbox any more
        self._inbox: queue.Queue = queue.Queue(INBOX_FRAMES)
        self._cancel_hooks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        # Called by the read loop with the frame count of each host `ack` (flow control of
        # streams that need it, e.g. tcp_connect); acks for other requests are ignored.
        self.on_ack: Callable[[int], None] | None = None

    def send_data(self, data: bytes, stream: str) -> None:
        for i in range(0, len(data), MAX_PAYLOAD):
            self.server.send({"id": self.id, "type": "data", "stream": stream}, data[i:i + MAX_PAYLOAD])

    def send(self, fields: dict, payload: bytes = b"") -> None:
        """A frame of this request other than the final answer (e.g. `{"type": "end"}`)."""
        self.server.send({"id": self.id, **fields}, payload)

    def on_cancel(self, hook: Callable[[], None]) -> None:
        """Run `hook` when the host cancels (at once if it already has)."""
        with self._lock:
            if not self.cancelled.is_set():
                self._cancel_hooks.append(hook)
                return
        hook()

    def cancel(self) -> None:
        with self._lock:
            if self.cancelled.is_set():
                return
            self.cancelled.set()
            hooks, self._cancel_hooks = self._cancel_hooks, []
        try:
            self._inbox.put_nowait(_END)
        except queue.Full:
            pass  # the handler checks `cancelled` after every chunk it takes

        for hook in hooks:
            try:
                hook()
            except Exception:
                log.exception("cancel hook of request %s failed", self.id)

    def upload_chunks(self):
        """Yield the payloads of the host's `data` frames until `end`; raise Cancelled on cancel."""
        while True:
            item = self._inbox.get()
            if self.cancelled.is_set():
                raise Cancelled()
            if item is _END:
                return
            yield item

    # called by the read loop
    def _deliver(self, kind: str, payload: bytes, header: dict | None = None) -> None:
        if kind == "ack":
            hook = self.on_ack
            frames = (header or {}).get("frames", 1)
            if hook is not None and isinstance(frames, int) and not isinstance(frames, bool) and frames > 0:
                hook(frames)
        elif kind == "data":
            self._put(payload)
        elif kind == "end":
            self._put(_END)
        elif kind == "cancel":
            self.cancel()

    def _put(self, item) -> None:
        """Wait for room (backpressure on the whole channel), unless the handler is gone."""
        while True:
            try:
                self._inbox.put(item, timeout=INBOX_POLL_SEC)
                return
            except queue.Full:
                if self.finished or self.cancelled.is_set():
                    return


Handler = Callable[[Request], "dict | tuple[dict, bytes]"]


class Server:
    """Multiplexes requests over one byte stream given as `read(n)` / `write(bytes)` callables."""

    def __init__(self, handlers: dict[str, Handler], read: Callable[[int], bytes],
                 write: Callable[[bytes], int], *, sleep: Callable[[float], None] = time.sleep):
        self.handlers = handlers
        self._read = read
        self._write = write
        self._sleep = sleep
        self._write_lock = threading.Lock()
        self._requests: dict = {}
        self._requests_lock = threading.Lock()
        self._workers = Workers()

    def send(self, header: dict, payload: bytes = b"") -> None:
        frame = memoryview(encode_frame(header, payload))
        with self._write_lock:
            while frame:
                frame = frame[self._write(frame):]

    def serve(self, *, retry_on_eof: bool) -> None:
        """Read frames until EOF. A virtio port reads EOF while no host is connected: with
        `retry_on_eof` we wait and read again (dropping any half frame) instead of returning."""
        decoder = FrameDecoder()
        connected = False
        while True:
            try:
                data = self._read(READ_SIZE)
            except OSError as exc:
                if not retry_on_eof:
                    log.info("read failed (%s): exiting", exc)
                    break
                log.warning("read failed: %s", exc)
                data = b""
            if not data:
                if not retry_on_eof:
                    break
                if connected:
                    log.info("host disconnected")
                    connected = False
                    decoder.reset()
                    self.cancel_all()  # nobody is listening to their answers any more
                self._sleep(EOF_RETRY_SEC)
                continue
            connected = True
            for header, payload in decoder.feed(data):
                self._dispatch(header, payload)
        self.cancel_all()

    def cancel_all(self) -> None:
        with self._requests_lock:
            pending = list(self._requests.values())
        for req in pending:
            req.cancel()

    def _dispatch(self, header: dict, payload: bytes) -> None:
        rid = header.get("id")
        op = header.get("op")
        if not isinstance(rid, int) or isinstance(rid, bool):
            log.warning("dropping frame without an integer id: %.200r", header)
            return
        if op is None:
            # data / end / cancel for a running request; late frames for finished ones are dropped
            with self._requests_lock:
                req = self._requests.get(rid)
            if req is not None:
                req._deliver(header.get("type"), payload, header)
            return
        params = {k: v for k, v in header.items() if k not in ("id", "op")}
        req = Request(self, rid, op, params, payload)
        with self._requests_lock:
            duplicate = rid in self._requests
            if not duplicate:
                self._requests[rid] = req
        target = self._reject_duplicate if duplicate else self._run
        if op in INLINE_OPS and not duplicate:
            target(req)
        else:
            self._workers.submit(target, req)

    def _run(self, req: Request) -> None:
        try:
            reply, payload = self._handle(req)
        finally:
            req.finished = True
            with self._requests_lock:
                self._requests.pop(req.id, None)
        self._reply(reply, payload)

    def _reject_duplicate(self, req: Request) -> None:
        self._reply(_error(req.id, AgentError("invalid", f"request id {req.id!r} is already in use")), b"")

    def _handle(self, req: Request) -> tuple[dict, bytes]:
        try:
            handler = self.handlers.get(req.op)
            if handler is None:
                raise AgentError("unknown_op", f"unknown op {req.op!r}")
            out = handler(req)
            fields, payload = out if isinstance(out, tuple) else (out, b"")
            return {"id": req.id, "type": "result", **fields}, payload
        except AgentError as exc:
            return _error(req.id, exc), b""
        except OSError as exc:
            return _error(req.id, error_from_oserror(exc)), b""
        except Exception as exc:
            log.exception("request %s (%s) failed", req.id, req.op)
            return _error(req.id, AgentError("internal", repr(exc))), b""

    def _reply(self, header: dict, payload: bytes) -> None:
        try:
            self.send(header, payload)
        except OSError as exc:
            log.warning("could not answer request %s: %s", header.get("id"), exc)


def _error(rid, exc: AgentError) -> dict:
    return {"id": rid, "type": "error", "code": exc.code, "message": exc.message}


def fd_channel(fd: int) -> tuple[Callable[[int], bytes], Callable[[bytes], int]]:
    return (lambda n: os.read(fd, n)), (lambda b: os.write(fd, b))
