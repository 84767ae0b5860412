"""The fleet's directory: one host agent client per registered host, from the hosts table.

`wrenn control-plane` has no in-process host: every capsule row names its host, and its calls go
to that host's `RemoteHostAgent` (wrenn_control/hosts/remote.py), which sends the host's control
token. The table is re-read by the heartbeat watcher every pass (and when a capsule names a host
not seen yet), so hosts registered through another replica are found within a pass.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from wrenn_control.db.models import Host
from wrenn_control.db.session import Database
from wrenn_control.hosts import liveness
from wrenn_control.hosts.directory import HostDirectory, HostUnavailable
from wrenn_host.api import HostAgent, HostAgentError

log = logging.getLogger(__name__)
AgentFactory = Callable[[str, str, "str | None"], HostAgent]  # (address, control_token, tls_cert) -> a client
OFFLINE = liveness.OFFLINE
SERVING = ("online", "draining")


class HostNotServing(HostUnavailable):
    """503 host_unavailable, saying why (offline, not registered, no in-process host)."""

    def __init__(self, host_id: str, why: str):
        super().__init__(host_id)
        self.message = f"host {host_id} is not available: {why}"


class NoRemoteClient(HostAgentError):
    code = "host_unavailable"


def remote_agent(address: str, control_token: str, tls_cert: str | None = None) -> HostAgent:
    try:
        module = importlib.import_module("wrenn_control.hosts.remote")
    except ImportError as exc:
        raise NoRemoteClient("this build has no network host agent client "
                             f"(wrenn_control.hosts.remote is missing: {exc})") from exc
    return module.RemoteHostAgent(address, control_token, tls_cert=tls_cert)


def _host_rows(s: Session) -> list[tuple[str, str | None, str | None, str, str | None]]:
    return [tuple(r) for r in s.execute(
        select(Host.id, Host.address, Host.control_token, Host.status, Host.tls_cert)).all()]


class FleetDirectory(HostDirectory):
    def __init__(self, db: Database, agent_factory: AgentFactory | None = None):
        super().__init__(None)
        self.db = db
        self._factory = agent_factory or remote_agent
        self._agents: dict[str, tuple[tuple[str, str, str | None], HostAgent]] = {}
        self._status: dict[str, str] = {}
        self._retired: list[HostAgent] = []  # replaced or removed, closed at `close()`

    def refresh(self) -> None:
        """Re-read the hosts table, blocking (for threads: sync routes, the watcher's pass);
        on the event loop, `await reload()`."""
        with self.db.session() as s:
            self._apply(_host_rows(s))

    async def reload(self) -> None:
        """Re-read the hosts table (the query in a database worker thread)."""
        self._apply(await self.db.run(_host_rows))

    def _apply(self, rows: list[tuple[str, str | None, str | None, str, str | None]]) -> None:
        """The maps are built aside and swapped in whole, so readers on the event loop never see
        them half done."""
        agents: dict[str, tuple[tuple[str, str, str | None], HostAgent]] = {}
        for host_id, address, token, _status, tls_cert in rows:
            if not address or not token:
                continue  # not registered yet
            known = self._agents.get(host_id)
            if known is not None and known[0] == (address, token, tls_cert):
                agents[host_id] = known
                continue
            try:
                agents[host_id] = ((address, token, tls_cert), self._factory(address, token, tls_cert))
            except NoRemoteClient as exc:
                log.error("host %s: %s", host_id, exc.message)
        self._retired += [a for hid, (key, a) in self._agents.items() if agents.get(hid, (None,))[0] != key]
        self._agents = agents
        self._status = {host_id: status for host_id, _, _, status, _ in rows}
        liveness.set_offline(h for h, st in self._status.items() if st == OFFLINE)

    def mark(self, host_id: str, status: str) -> None:
        """A status this process just wrote (a heartbeat, the watcher), before the next refresh."""
        self._status = {**self._status, host_id: status}
        liveness.mark(host_id, status == OFFLINE)

    def status(self, host_id: str) -> str | None:
        return self._status.get(host_id)

    async def for_capsule(self, host_id: str | None) -> HostAgent:
        if host_id is None:
            raise HostNotServing("local", "this control plane has no in-process host (wrenn control-plane)")
        if host_id not in self._agents:
            await self.reload()  # registered through another replica since the last pass
        entry = self._agents.get(host_id)
        if entry is None:
            raise HostNotServing(host_id, "it is not registered")
        if self._status.get(host_id) == OFFLINE and await self._still_offline(host_id):
            raise HostNotServing(host_id, "it is offline (it missed its heartbeats)")
        return entry[1]

    async def _still_offline(self, host_id: str) -> bool:
        """Asks the database, one primary-key read: a host back through another replica's
        heartbeat is served at once, not refused until this replica's next refresh. (Background
        passes skip capsules of hosts read as offline, so only requests pay it.)"""
        for hid, status in (await self.db.run(liveness.back_online, [host_id])).items():
            self.mark(hid, status)
        return self._status.get(host_id) == OFFLINE

    def all(self) -> list[tuple[str, HostAgent]]:
        """Every host heard from and not offline (online or draining; a `pending` one has
        registered but not beaten yet: it may not serve yet)."""
        return [(hid, agent) for hid, (_, agent) in sorted(self._agents.items())
                if self._status.get(hid) in SERVING]

    async def close(self) -> None:
        for agent in [a for _, a in self._agents.values()] + self._retired:
            try:
                await agent.close()
            except Exception:  # one client's failure must not keep the others open
                log.exception("closing a host agent client")
        self._agents.clear()
        self._retired.clear()
