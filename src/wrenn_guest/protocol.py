"""Frame encoding/decoding for the host <-> guest channel (see PROTOCOL.md).

Shared by the guest agent and the host client (`wrenn_host.guest`); standard library only.
"""

from __future__ import annotations

import errno
import json
import struct

MAGIC = b"WRNF"
PREFIX = struct.Struct(">4sII")  # magic, header length, payload length
MAX_PAYLOAD = 1 << 20
# The spec bounds payloads only; a big `list` result travels in the header, so allow a lot, but
# keep a bound so that garbage that happens to contain the magic is skipped instead of awaited.
MAX_HEADER = 64 << 20

ERROR_CODES = frozenset({
    "not_found", "is_directory", "not_directory", "exists", "permission_denied",
    "invalid", "no_such_process", "unknown_op", "internal",
    "refused",  # tcp_connect: nothing listens on that port
})

_ERRNO_CODES = {
    errno.ENOENT: "not_found",
    errno.EISDIR: "is_directory",
    errno.ENOTDIR: "not_directory",
    errno.EEXIST: "exists",
    errno.EACCES: "permission_denied",
    errno.EPERM: "permission_denied",
    errno.EROFS: "permission_denied",
    # the caller's path is at fault, not the agent
    errno.ENAMETOOLONG: "invalid",
    errno.ELOOP: "invalid",
    errno.EINVAL: "invalid",
    errno.ENOTEMPTY: "exists",
}


class AgentError(Exception):
    """A failure answered to the host as an `error` frame."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code if code in ERROR_CODES else "internal"
        self.message = message


def error_from_oserror(exc: OSError) -> AgentError:
    code = _ERRNO_CODES.get(exc.errno, "internal")
    text = exc.strerror or str(exc)
    if exc.filename is not None:
        text = f"{exc.filename}: {text}"
    return AgentError(code, text)


def encode_frame(header: dict, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return PREFIX.pack(MAGIC, len(head), len(payload)) + head + payload


class FrameDecoder:
    """Incremental decoder. Anything that is not a well-formed frame is skipped byte by byte
    until the next magic, so a reader joining mid-stream (or after garbage) resynchronises."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.skipped = 0  # bytes discarded while resynchronising (for logs/tests)

    def reset(self) -> None:
        """Drop any half-read frame (the peer went away)."""
        self._buf.clear()

    def feed(self, data: bytes) -> list[tuple[dict, bytes]]:
        buf = self._buf
        buf += data
        frames = []
        while True:
            start = buf.find(MAGIC)
            if start < 0:
                # Keep a tail that could be the beginning of a magic split across reads.
                keep = next((n for n in (3, 2, 1) if buf.endswith(MAGIC[:n])), 0)
                self._skip(len(buf) - keep)
                return frames
            self._skip(start)
            if len(buf) < PREFIX.size:
                return frames
            _, jlen, plen = PREFIX.unpack_from(buf)
            if jlen > MAX_HEADER or plen > MAX_PAYLOAD:
                self._skip(1)
                continue
            end = PREFIX.size + jlen + plen
            if len(buf) < end:
                return frames
            try:
                header = json.loads(bytes(buf[PREFIX.size:PREFIX.size + jlen]))
            except ValueError:
                header = None
            if not isinstance(header, dict):
                self._skip(1)
                continue
            frames.append((header, bytes(buf[PREFIX.size + jlen:end])))
            del buf[:end]

    def _skip(self, n: int) -> None:
        if n:
            del self._buf[:n]
            self.skipped += n
