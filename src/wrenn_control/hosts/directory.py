"""Which host agent a capsule's calls go to.

In `wrenn server` mode there is exactly one, the in-process host, whose id is "local"; a capsule
row's `host_id` is then NULL. A fleet's directory (hosts/registry.py) holds one agent per
registered host.
"""

from __future__ import annotations

from wrenn_host.api import HostAgent, HostAgentError

LOCAL_HOST_ID = "local"


class HostUnavailable(HostAgentError):
    """The capsule's host is offline, draining away or unknown: 503 host_unavailable."""

    code = "host_unavailable"


class HostDirectory:
    def __init__(self, local: HostAgent | None = None):
        self._local = local

    def for_capsule(self, host_id: str | None) -> HostAgent:
        if host_id in (None, LOCAL_HOST_ID) and self._local is not None:
            return self._local
        raise HostUnavailable(f"host {host_id or LOCAL_HOST_ID} is not available")

    def local(self) -> HostAgent | None:
        return self._local

    def all(self) -> list[tuple[str, HostAgent]]:
        return [(LOCAL_HOST_ID, self._local)] if self._local is not None else []
