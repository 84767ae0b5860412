"""The host contract's subjects: one fixture, four ways of reaching a host agent.

- ``fake``: tests/unit/fake_host_agent.py's FakeHostAgent, in-process.
- ``remote-fake``: a RemoteHostAgent over loopback HTTP to the host agent service wrapping a fake
  (the wire protocol without VMs).
- ``local`` (vm): the session's LocalHostAgent (tests/conftest.py), in-process.
- ``remote`` (vm): a RemoteHostAgent over loopback HTTP to the service wrapping that same agent.

Per-subject set-up (what a fake cannot do by itself, e.g. run a TCP service in a capsule) lives
here; the tests in this directory assert the same things of every subject.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from tests.hostservice import serving
from tests.unit.fake_host_agent import FakeHostAgent
from wrenn_host.api import HostAgent, StreamEvent


@dataclasses.dataclass
class Subject:
    kind: str
    agent: HostAgent  # what the tests call
    backend: HostAgent  # what runs the capsules (the fake or the LocalHostAgent)
    _servers: list[asyncio.base_events.Server] = dataclasses.field(default_factory=list)

    @property
    def fake(self) -> FakeHostAgent | None:
        return self.backend if isinstance(self.backend, FakeHostAgent) else None

    def script_attach(self, tag: str, events: list[StreamEvent]) -> None:
        """What a process started with this tag prints (a fake has no processes to run)."""
        if self.fake is not None:
            self.fake.attach_events[tag] = events

    async def echo_service(self, capsule_id: str, port: int) -> None:
        """A TCP echo service on `port` in the capsule (until EOF, then it closes)."""
        if self.fake is not None:
            async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
                writer.close()

            server = await asyncio.start_server(echo, "127.0.0.1", 0)
            self._servers.append(server)
            self.fake.forwards[(capsule_id, port)] = server.sockets[0].getsockname()[1]
            return
        script = ("import socket,threading\n"
                  "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                  f"s.bind(('127.0.0.1',{port})); s.listen(8)\n"
                  "def serve(c):\n"
                  "    while True:\n"
                  "        d=c.recv(65536)\n"
                  "        if not d: break\n"
                  "        c.sendall(d)\n"
                  "    c.close()\n"
                  "while True:\n"
                  "    c,_=s.accept(); threading.Thread(target=serve,args=(c,),daemon=True).start()\n")
        await self.backend.write_file(capsule_id, "/tmp/echo.py", script.encode())
        await self.backend.spawn(capsule_id, "python3", ["/tmp/echo.py"], tag=f"echo-{port}")

    async def settled(self, capsule_id: str) -> int:
        """Streams and tunnels still open on the host for this capsule, once they had time to
        end (what a detach or close left behind: should be 0)."""
        def count() -> int:
            if self.fake is not None:
                return self.fake.tunnels_open
            return self.backend.open_requests(capsule_id)  # type: ignore[attr-defined]

        for _ in range(100):
            if count() == 0:
                break
            await asyncio.sleep(0.05)
        return count()

    def close(self) -> None:
        for server in self._servers:
            server.close()


def _params() -> list[Any]:
    return [pytest.param("fake"), pytest.param("remote-fake"),
            pytest.param("local", marks=pytest.mark.vm), pytest.param("remote", marks=pytest.mark.vm)]


@pytest.fixture(scope="module", params=_params())
def backend(request: pytest.FixtureRequest) -> tuple[str, HostAgent]:
    # (sync: the session's async host_agent fixture can only be asked for outside the event loop)
    kind = request.param
    return kind, (FakeHostAgent() if "fake" in kind else request.getfixturevalue("host_agent"))


@pytest_asyncio.fixture(scope="module")
async def subject(backend: tuple[str, HostAgent]) -> AsyncIterator[Subject]:
    kind, backend = backend
    if kind in ("fake", "local"):
        s = Subject(kind, backend, backend)
        yield s
        s.close()
        return
    from wrenn_control.hosts.remote import RemoteHostAgent

    async with serving(backend) as (url, token, _app):
        remote = RemoteHostAgent(url, token)
        s = Subject(kind, remote, backend)
        try:
            yield s
        finally:
            s.close()
            await remote.close()
