"""Which host agent holds a capsule.

`wrenn server` has one in-process host, whose id is `"local"`; a capsule row's `host_id` (NULL
for the local host) names the host that runs it. Everything that calls a host about a capsule
asks here, so that a fleet can put more hosts behind the same calls.
"""

from __future__ import annotations

from wrenn_control.errors import APIError
from wrenn_host.api import HostAgent

LOCAL = "local"


class HostUnavailable(APIError):
    """The capsule's host is not known here (or not reachable): 503 host_unavailable."""

    def __init__(self, host_id: str):
        super().__init__(503, "host_unavailable", f"host {host_id} is not available")
        self.host_id = host_id


class HostDirectory:
    def __init__(self, local: HostAgent | None = None):
        self._hosts: dict[str, HostAgent] = {}
        if local is not None:
            self._hosts[LOCAL] = local

    async def for_capsule(self, host_id: str | None) -> HostAgent:
        """The host agent of a capsule whose row says `host_id` (None: the local host). Async: a
        fleet's directory may ask the database (registry.py)."""
        host = self._hosts.get(host_id or LOCAL)
        if host is None:
            raise HostUnavailable(host_id or LOCAL)
        return host

    def local(self) -> HostAgent | None:
        """The in-process host of `wrenn server` (None when there is none)."""
        return self._hosts.get(LOCAL)

    def all(self) -> list[tuple[str, HostAgent]]:
        return list(self._hosts.items())
