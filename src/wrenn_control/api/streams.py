"""Pieces of the WebSocket routes (exec/stream, processes/{pid}/stream, pty) that hold no I/O
policy: message parsing and validation, incremental UTF-8 text, message splitting, and a small
wrapper around a Starlette WebSocket that never raises on a peer that has gone away.

Wire shapes (see docs in routes/streams.py): every control message is a JSON object with a
"type". Output is split so that no message exceeds `MAX_MESSAGE_BYTES` on the wire: the published
SDK's WebSocket client refuses messages over 64 KiB.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import codecs
import dataclasses
import json
import logging
from collections.abc import Iterator
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

log = logging.getLogger(__name__)

# Close codes.
NORMAL = 1000
POLICY_VIOLATION = 1008  # bad key, unknown capsule, capsule not running, bad request
INTERNAL_ERROR = 1011  # the agent or the server failed

MAX_TEXT_CHARS = 8192  # per stdout/stderr message: <= 48 KiB of JSON even if every char is escaped
MAX_BINARY_BYTES = 32 * 1024  # per PTY output message (base64: ~43 KiB)
MAX_DIMENSION = 10000


class BadMessage(Exception):
    """A client message that does not follow the protocol."""


# ---- client messages ------------------------------------------------------------------------


def _str_list(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadMessage(f"{name} must be a list of strings")
    return value


def _str_map(value: Any, name: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise BadMessage(f"{name} must be an object of strings")
    return value


def _opt_str(value: Any, name: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadMessage(f"{name} must be a string")
    return value


def _dimension(value: Any, name: str, default: int) -> int:
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_DIMENSION:
        raise BadMessage(f"{name} must be an integer between 1 and {MAX_DIMENSION}")
    return value


@dataclasses.dataclass(frozen=True)
class ExecStart:
    cmd: str
    args: list[str]
    envs: dict[str, str]
    cwd: str | None
    tag: str | None
    timeout_sec: float | None


def parse_exec_start(msg: Any) -> ExecStart:
    """`{"type": "start", "cmd", "args"?, "envs"?, "cwd"?, "tag"?, "timeout_sec"?}`."""
    if not isinstance(msg, dict) or msg.get("type") != "start":
        raise BadMessage('the first message must be {"type": "start", "cmd": ...}')
    cmd = msg.get("cmd")
    if not isinstance(cmd, str) or not cmd:
        raise BadMessage("cmd must be a non-empty string")
    timeout = msg.get("timeout_sec")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise BadMessage("timeout_sec must be a positive number")
    return ExecStart(cmd, _str_list(msg.get("args"), "args"), _str_map(msg.get("envs"), "envs"),
                     _opt_str(msg.get("cwd"), "cwd"), _opt_str(msg.get("tag"), "tag"), timeout)


@dataclasses.dataclass(frozen=True)
class PtyStart:
    cmd: str
    args: list[str]
    cols: int
    rows: int
    envs: dict[str, str]
    cwd: str | None
    tag: str | None


@dataclasses.dataclass(frozen=True)
class PtyConnect:
    tag: str


def parse_pty_open(msg: Any) -> PtyStart | PtyConnect:
    """`{"type": "start", cmd="/bin/bash", args, cols=80, rows=24, envs, cwd, tag?}` or
    `{"type": "connect", "tag"}`."""
    kind = msg.get("type") if isinstance(msg, dict) else None
    if kind == "connect":
        tag = msg.get("tag")
        if not isinstance(tag, str) or not tag:
            raise BadMessage("connect needs the session's tag")
        return PtyConnect(tag)
    if kind != "start":
        raise BadMessage('the first message must be {"type": "start", ...} or {"type": "connect", "tag": ...}')
    cmd = msg.get("cmd")
    if cmd is None or cmd == "":
        cmd = "/bin/bash"
    if not isinstance(cmd, str):
        raise BadMessage("cmd must be a string")
    return PtyStart(cmd, _str_list(msg.get("args"), "args"), _dimension(msg.get("cols"), "cols", 80),
                    _dimension(msg.get("rows"), "rows", 24), _str_map(msg.get("envs"), "envs"),
                    _opt_str(msg.get("cwd"), "cwd"), _opt_str(msg.get("tag"), "tag"))


@dataclasses.dataclass(frozen=True)
class PtyInput:
    data: bytes


@dataclasses.dataclass(frozen=True)
class PtyResize:
    cols: int
    rows: int


@dataclasses.dataclass(frozen=True)
class PtyKill:
    pass


@dataclasses.dataclass(frozen=True)
class Ignored:
    """pong, and message types this server does not know (a newer client's)."""

    type: str


PtyCommand = PtyInput | PtyResize | PtyKill | Ignored


def parse_pty_command(msg: dict[str, Any] | bytes) -> PtyCommand:
    """A message after the first: a binary frame is raw input (as the published SDK sends it);
    `{"type": "input", "data": <base64>}`, `{"type": "resize", "cols", "rows"}`, `{"type": "kill"}`."""
    if isinstance(msg, (bytes, bytearray)):
        return PtyInput(bytes(msg))
    kind = msg.get("type")
    if kind == "input":
        data = msg.get("data")
        if not isinstance(data, str):
            raise BadMessage("input data must be a base64 string")
        try:
            return PtyInput(base64.b64decode(data, validate=True))
        except (binascii.Error, ValueError):
            raise BadMessage("input data must be base64") from None
    if kind == "resize":
        if msg.get("cols") is None or msg.get("rows") is None:
            raise BadMessage("resize needs cols and rows")
        return PtyResize(_dimension(msg.get("cols"), "cols", 0), _dimension(msg.get("rows"), "rows", 0))
    if kind == "kill":
        return PtyKill()
    return Ignored(str(kind))


# ---- output ---------------------------------------------------------------------------------


class TextStream:
    """Bytes of one output stream -> text, without breaking a character split across chunks
    (invalid bytes become U+FFFD)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        return self._decoder.decode(data)

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


def split_text(text: str, limit: int = MAX_TEXT_CHARS) -> Iterator[str]:
    for i in range(0, len(text), limit):
        yield text[i:i + limit]


def split_bytes(data: bytes, limit: int = MAX_BINARY_BYTES) -> Iterator[bytes]:
    for i in range(0, len(data), limit):
        yield data[i:i + limit]


# ---- the socket -----------------------------------------------------------------------------


SLOW_CLIENT_SEC = 15.0


class Socket:
    """A WebSocket whose sends are serialised and become no-ops once the peer is gone.

    A send that the client does not take within `send_timeout` seconds (it stopped reading) gives
    up on the client: everything behind it, up to the capsule's guest channel, would wait too."""

    def __init__(self, ws: WebSocket, *, fatal_errors: bool = False, send_timeout: float = SLOW_CLIENT_SEC):
        self.ws = ws
        self.fatal_errors = fatal_errors  # PTY error messages carry "fatal"
        self.send_timeout = send_timeout
        self.gone = False  # the client disconnected (or we closed, or gave up on it)
        self.too_slow = False
        self._lock = asyncio.Lock()

    async def send_json(self, message: dict[str, Any]) -> bool:
        return await self._send(text=json.dumps(message, separators=(",", ":"), ensure_ascii=False))

    async def send_bytes(self, data: bytes) -> bool:
        return await self._send(data=data)

    async def _send(self, *, text: str | None = None, data: bytes | None = None) -> bool:
        if self.gone:
            return False
        async with self._lock:
            try:
                if text is not None:
                    await asyncio.wait_for(self.ws.send_text(text), self.send_timeout)
                else:
                    await asyncio.wait_for(self.ws.send_bytes(data or b""), self.send_timeout)
                return True
            except asyncio.TimeoutError:
                log.info("WebSocket client not reading for %.0f s: dropping it", self.send_timeout)
                self.too_slow = True
                self.gone = True
                return False
            except (WebSocketDisconnect, RuntimeError, OSError):
                self.gone = True
                return False

    async def error(self, message: str, *, fatal: bool = True) -> None:
        body: dict[str, Any] = {"type": "error", "data": message}
        if self.fatal_errors:
            body["fatal"] = fatal
        await self.send_json(body)

    async def fail(self, message: str, code: int = POLICY_VIOLATION) -> None:
        """An error message, then close."""
        await self.error(message, fatal=True)
        await self.close(code, message)

    async def close(self, code: int = NORMAL, reason: str = "") -> None:
        if self.gone and not self.too_slow:
            return
        if self.too_slow:
            code, reason = POLICY_VIOLATION, "client not reading"
            self.too_slow = False
        self.gone = True
        async with self._lock:
            try:
                if self.ws.application_state != WebSocketState.DISCONNECTED:
                    # a close reason is at most 123 bytes; a client that reads nothing gets no wait
                    await asyncio.wait_for(self.ws.close(code, reason[:120]), self.send_timeout)
            except (WebSocketDisconnect, RuntimeError, OSError, asyncio.TimeoutError):
                pass

    async def receive(self) -> dict[str, Any] | bytes | None:
        """The next message: a JSON object, or bytes for a binary frame; None once the client
        has disconnected. Raises BadMessage for text that is not a JSON object."""
        if self.ws.application_state == WebSocketState.DISCONNECTED:
            return None
        try:
            msg = await self.ws.receive()
        except (WebSocketDisconnect, RuntimeError, OSError):
            self.gone = True
            return None
        if msg["type"] == "websocket.disconnect":
            self.gone = True
            return None
        if msg.get("bytes") is not None:
            return msg["bytes"]
        try:
            body = json.loads(msg.get("text") or "")
        except ValueError:
            raise BadMessage("messages must be JSON objects") from None
        if not isinstance(body, dict):
            raise BadMessage("messages must be JSON objects")
        return body
