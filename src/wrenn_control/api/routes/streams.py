"""WebSocket routes: streamed commands, attaching to background processes, interactive terminals.

Auth is the `X-API-Key` header of the upgrade request, as for every other route, or (browsers,
which cannot set it) `?ticket=` from `POST /v1/auth/ticket` (single use, 30 s). The socket is
accepted first, so that every failure can be told in the protocol's own terms: a bad key, an
unknown capsule, a capsule that is not running or a malformed request gets
`{"type": "error", "data": <message>}` (PTY: plus `"fatal": true`) and a close with 1008 (policy
violation); a failure of the agent, the same message and 1011.

`GET /v1/capsules/{id}/exec/stream`
    client: `{"type": "start", "cmd", "args"?, "envs"?, "cwd"?, "tag"?, "timeout_sec"?}`, later
    maybe `{"type": "stop"}` (kills the command).
    server: `{"type": "start", "pid"}`, `{"type": "stdout"|"stderr", "data": <text>}` as output
    arrives, `{"type": "exit", "exit_code"}`, then close (1000). A client that goes away kills the
    command. Output is UTF-8 text (invalid bytes replaced), split into messages of at most 8192
    characters.

`GET /v1/capsules/{id}/processes/{pid or tag}/stream`
    Attach to a background process: `start` (with its pid), its buffered output, live output,
    `exit`. `{"type": "stop"}` (or leaving) detaches; the process keeps running.

`GET /v1/capsules/{id}/pty[?encoding=base64]`
    client, first: `{"type": "start", cmd="/bin/bash", args, cols=80, rows=24, envs, cwd, tag?}` or
    `{"type": "connect", "tag"}`; then input as binary frames (raw bytes, as the published SDK
    sends it) or `{"type": "input", "data": <base64>}`, `{"type": "resize", "cols", "rows"}`,
    `{"type": "kill"}`, `{"type": "pong"}`.
    server: `{"type": "started", "tag", "pid"}`, output as binary frames (what the published SDK
    reads) or, with `?encoding=base64`, `{"type": "output", "data": <base64>}`; `{"type": "exit",
    "exit_code"}` then close; `{"type": "error", "data", "fatal"}`; `{"type": "ping"}` every 30 s.
    The session lives in the capsule: a dropped socket leaves it running, and `connect` replays
    its recent output (up to 64 KiB) before the live output.

While a stream is open the capsule counts as busy (the reaper does not auto-pause it), and
client input records activity (`last_active_at`), as exec does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, WebSocket

from wrenn_control.api.deps import TeamInfo, team_for_api_key
from wrenn_control.api.routes.tickets import team_from_ticket
from wrenn_control.api.streams import (
    INTERNAL_ERROR,
    POLICY_VIOLATION,
    BadMessage,
    Ignored,
    PtyConnect,
    PtyInput,
    PtyKill,
    PtyResize,
    Socket,
    TextStream,
    parse_exec_start,
    parse_pty_command,
    parse_pty_open,
    split_bytes,
    split_text,
)
from wrenn_control.errors import APIError
from wrenn_control.gateway import Guest, GuestGateway
from wrenn_host.api import StreamEvent

log = logging.getLogger(__name__)
router = APIRouter(tags=["streams"])

FIRST_MESSAGE_TIMEOUT_SEC = 60
PING_INTERVAL_SEC = 30


class _Stream:
    """One accepted WebSocket on a running capsule: the socket and the capsule's guest."""

    def __init__(self, sock: Socket, guest: Guest):
        self.sock = sock
        self.guest = guest

    @staticmethod
    @contextlib.asynccontextmanager
    async def open(ws: WebSocket, capsule_id: str, *, fatal_errors: bool) -> AsyncIterator[_Stream | None]:
        """Accept, check the key and the capsule and open its guest for the time of the `async
        with`; None (the client told, the socket closed) if any of that fails."""
        sock = Socket(ws, fatal_errors=fatal_errors)
        gateway: GuestGateway = ws.app.state.gateway
        await ws.accept()
        async with contextlib.AsyncExitStack() as stack:
            stream = None
            try:
                ticket = ws.query_params.get("ticket")
                team: TeamInfo = (await team_from_ticket(ws.app, ws.app.state.db, ticket) if ticket
                                  else await team_for_api_key(ws.app.state.db, ws.headers.get("x-api-key")))
                capsule = await gateway.capsule(capsule_id, team.id)
                stream = _Stream(sock, await stack.enter_async_context(gateway.open(capsule, activity=True)))
            except APIError as exc:
                await _fail(sock, exc)
            yield stream

    async def first_message(self) -> Any:
        """The client's first message, or None (told and closed) if it never comes or is not JSON."""
        try:
            msg = await asyncio.wait_for(self.sock.receive(), FIRST_MESSAGE_TIMEOUT_SEC)
        except asyncio.TimeoutError:
            await self.sock.fail(f"no start message within {FIRST_MESSAGE_TIMEOUT_SEC} s")
            return None
        except BadMessage as exc:
            await self.sock.fail(str(exc))
            return None
        if msg is None:
            return None
        if isinstance(msg, bytes):
            await self.sock.fail("the first message must be a JSON object")
            return None
        return msg

    async def fail(self, exc: APIError) -> None:
        await _fail(self.sock, exc)


async def _fail(sock: Socket, exc: APIError) -> None:
    await sock.fail(exc.message, INTERNAL_ERROR if exc.status >= 500 else POLICY_VIOLATION)


async def _cancel(*tasks: asyncio.Task | None) -> None:
    for t in tasks:
        if t is not None and not t.done():
            t.cancel()
    for t in tasks:
        if t is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


# ---- commands and processes -----------------------------------------------------------------


GONE = "gone"  # the client went away (or was dropped for not reading) while we sent it output


async def _relay_output(st: _Stream, events: AsyncGenerator[StreamEvent, None]) -> int | str | None:
    """Forward stdout/stderr as text messages; returns the exit code, GONE, or None if the stream
    ended without an exit code. Raises APIError if the guest fails."""
    text = {"stdout": TextStream(), "stderr": TextStream()}
    async with contextlib.aclosing(events) as stream:
        async for event in stream:
            if event.kind in text:
                for piece in split_text(text[event.kind].feed(event.data)):
                    if not await st.sock.send_json({"type": event.kind, "data": piece}):
                        return GONE
            elif event.kind == "exit":
                for kind, decoder in text.items():
                    rest = decoder.flush()
                    if rest and not await st.sock.send_json({"type": kind, "data": rest}):
                        return GONE
                return event.exit_code
    return None


async def _client_commands(st: _Stream) -> str:
    """Wait for `stop` or the client leaving; returns "stop" or "gone". Other messages are ignored."""
    while True:
        try:
            msg = await st.sock.receive()
        except BadMessage as exc:
            await st.sock.error(str(exc), fatal=False)
            continue
        if msg is None:
            return "gone"
        if isinstance(msg, dict) and msg.get("type") == "stop":
            return "stop"


async def _follow(st: _Stream, target: int | str, *, owned: bool, timeout_sec: float | None = None) -> None:
    """Stream a process until it exits. `owned` (exec/stream): `stop`, a timeout or the client
    leaving kill it, and it is removed from the process table once it has exited; otherwise those
    only detach."""
    pump = asyncio.ensure_future(_relay_output(st, st.guest.attach(target)))
    listen: asyncio.Task | None = asyncio.ensure_future(_client_commands(st))
    deadline = None if timeout_sec is None else asyncio.get_running_loop().time() + timeout_sec
    killed = False

    async def kill() -> None:
        nonlocal killed
        if not killed:
            killed = True
            with contextlib.suppress(APIError):
                await st.guest.kill(target, "SIGKILL")

    try:
        while True:
            waiting = {pump} | ({listen} if listen is not None else set())
            remaining = None if deadline is None or killed else max(deadline - asyncio.get_running_loop().time(), 0)
            done, _ = await asyncio.wait(waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            if pump in done:
                break
            if not done:  # the timeout
                await kill()
                continue
            assert listen is not None
            why = listen.result()
            listen = None
            if why == "gone":  # owned: killed below; else the process runs on
                return
            if not owned:  # stop: detach
                await st.sock.close()
                return
            await kill()  # stop: its exit comes through the output stream
        try:
            code = pump.result()
        except APIError as exc:
            await st.fail(exc)
            return
        if code == GONE:
            await st.sock.close()  # tells a client that was dropped for not reading why
            return
        if code is None:
            await st.sock.fail("the output stream ended without an exit code", INTERNAL_ERROR)
            return
        await st.sock.send_json({"type": "exit", "exit_code": code})
        await st.sock.close()
    finally:
        await _cancel(pump, listen)
        if owned:
            await kill_quietly(st, target)
        await st.guest.record_activity(force=True)  # (last: bookkeeping after the kill)


async def kill_quietly(st: _Stream, target: int | str) -> None:
    """Kill a process this stream started (the guest forgets it once it has exited), or forget
    it if it has exited already; errors do not matter here."""
    with contextlib.suppress(Exception):
        await st.guest.kill(target, "SIGKILL")


@router.websocket("/capsules/{capsule_id}/exec/stream")
async def exec_stream(websocket: WebSocket, capsule_id: str) -> None:
    async with _Stream.open(websocket, capsule_id, fatal_errors=False) as st:
        if st is not None:
            await _exec(st)


async def _exec(st: _Stream) -> None:
    msg = await st.first_message()
    if msg is None:
        return
    try:
        start = parse_exec_start(msg)
    except BadMessage as exc:
        await st.sock.fail(str(exc))
        return
    try:
        info = await st.guest.spawn(start.cmd, start.args, envs=start.envs, cwd=start.cwd, tag=start.tag)
    except APIError as exc:
        await st.fail(exc)
        return
    if not await st.sock.send_json({"type": "start", "pid": info.pid}):
        await kill_quietly(st, info.pid)  # the client is gone already
        return
    await _follow(st, info.pid, owned=True, timeout_sec=start.timeout_sec)


@router.websocket("/capsules/{capsule_id}/processes/{target}/stream")
async def process_stream(websocket: WebSocket, capsule_id: str, target: str) -> None:
    async with _Stream.open(websocket, capsule_id, fatal_errors=False) as st:
        if st is not None:
            await _attach(st, target)


async def _attach(st: _Stream, target: str) -> None:
    selector: int | str = int(target) if target.isdigit() else target
    try:
        procs = await st.guest.processes()
    except APIError as exc:
        await st.fail(exc)
        return
    match = [p for p in procs if selector in (p.pid, p.tag)]
    if not match:
        await st.sock.fail(f"no process {target!r}")
        return
    await st.sock.send_json({"type": "start", "pid": match[-1].pid})
    await _follow(st, match[-1].pid, owned=False)


# ---- terminals ------------------------------------------------------------------------------


async def _pty_output(st: _Stream, tag: str, send: Callable[[bytes], Awaitable[bool]]) -> int | str | None:
    """Forward terminal output; returns the exit code, GONE, or None (ended without one)."""
    async with contextlib.aclosing(st.guest.pty_attach(tag)) as stream:
        async for event in stream:
            if event.kind == "output":
                for piece in split_bytes(event.data):
                    if not await send(piece):
                        return GONE
            elif event.kind == "exit":
                return event.exit_code
    return None


async def _pty_input(st: _Stream, tag: str) -> None:
    """Apply the client's messages until it leaves."""
    while True:
        try:
            msg = await st.sock.receive()
            if msg is None:
                return
            command = parse_pty_command(msg)
        except BadMessage as exc:
            await st.sock.error(str(exc), fatal=False)
            continue
        if isinstance(command, Ignored):
            continue
        await st.guest.record_activity()
        try:
            if isinstance(command, PtyInput):
                if command.data:
                    await st.guest.pty_input(tag, command.data)
            elif isinstance(command, PtyResize):
                await st.guest.pty_resize(tag, command.cols, command.rows)
            elif isinstance(command, PtyKill):
                await st.guest.pty_kill(tag, "SIGKILL")
        except APIError as exc:
            if exc.code == "not_found":  # the session has just exited: its exit event is on its way
                continue
            if exc.status >= 500:
                raise
            await st.sock.error(exc.message, fatal=False)


async def _pinger(st: _Stream) -> None:
    while True:
        await asyncio.sleep(PING_INTERVAL_SEC)
        if not await st.sock.send_json({"type": "ping"}):
            return


@router.websocket("/capsules/{capsule_id}/pty")
async def pty(websocket: WebSocket, capsule_id: str, encoding: str | None = None) -> None:
    async with _Stream.open(websocket, capsule_id, fatal_errors=True) as st:
        if st is not None:
            await _terminal(st, encoding)


async def _terminal(st: _Stream, encoding: str | None) -> None:
    msg = await st.first_message()
    if msg is None:
        return
    try:
        request = parse_pty_open(msg)
    except BadMessage as exc:
        await st.sock.fail(str(exc))
        return

    if encoding == "base64":
        async def send(data: bytes) -> bool:
            return await st.sock.send_json({"type": "output", "data": base64.b64encode(data).decode()})
    else:
        send = st.sock.send_bytes

    try:
        if isinstance(request, PtyConnect):
            sessions = await st.guest.pty_sessions()
            match = [s for s in sessions if s.tag == request.tag]
            if not match:
                await st.sock.fail(f"no PTY session with tag {request.tag!r}")
                return
            tag, pid = match[-1].tag, match[-1].pid
        else:
            info = await st.guest.pty_start(request.cmd, request.args, cols=request.cols, rows=request.rows,
                                            envs=request.envs, cwd=request.cwd, tag=request.tag)
            tag, pid = info.tag, info.pid
    except APIError as exc:
        await st.fail(exc)
        return
    if not await st.sock.send_json({"type": "started", "tag": tag, "pid": pid}):
        return  # gone already: the session stays, for a later connect

    output = asyncio.ensure_future(_pty_output(st, tag, send))
    listen = asyncio.ensure_future(_pty_input(st, tag))
    pinger = asyncio.ensure_future(_pinger(st))
    try:
        done, _ = await asyncio.wait({output, listen}, return_when=asyncio.FIRST_COMPLETED)
        if output in done:
            try:
                code = output.result()
            except APIError as exc:
                await st.fail(exc)
                return
            if code == GONE:  # the session lives on; a dropped slow client can connect again
                await st.sock.close()
                return
            if code is None:
                await st.sock.fail("the terminal stream ended without an exit code", INTERNAL_ERROR)
                return
            await st.sock.send_json({"type": "exit", "exit_code": code})
            await st.sock.close()
            return
        try:  # the client left (the session lives on) or the agent failed
            listen.result()
        except APIError as exc:
            await st.fail(exc)
    finally:
        await _cancel(output, listen, pinger)
        await st.guest.record_activity(force=True)
