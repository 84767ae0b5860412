"""Which capsule and port a request is for (its Host), and the connection there."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

from wrenn_control.api.deps import team_for_api_key
from wrenn_control.errors import invalid, not_found
from wrenn_control.gateway import Guest, GuestGateway
from wrenn_control.proxy.headers import header
from wrenn_host.api import Tunnel

# `{port}-{capsule id}.` then any domain (and maybe `:port`): 8000-cl-abc...xyz.localhost:8080
_TARGET = re.compile(r"(\d{1,5})-(cl-[0-9a-z]{1,64})\.[^\s/]+", re.ASCII)


def parse_target(host: str | None) -> tuple[int, str] | None:
    """(port, capsule id) from a Host header `{port}-{capsule_id}.{domain}[:port]`, else None.
    Host names are case-insensitive; capsule ids are lowercase."""
    if not host:
        return None
    m = _TARGET.fullmatch(host.strip().lower())
    if m is None:
        return None
    return int(m.group(1)), m.group(2)


@contextlib.asynccontextmanager
async def open_tunnel(scope: dict[str, Any], port: int, capsule_id: str) -> AsyncIterator[tuple[Guest, Tunnel]]:
    """Check the port, the capsule (and the key, if required) and connect; raises APIError before
    it yields. While it is open the capsule is busy; the tunnel is closed at the end."""
    state = scope["app"].state
    gateway: GuestGateway = state.gateway
    if not 1 <= port <= 65535:
        raise invalid(f"port must be between 1 and 65535, not {port}")
    row = await gateway.capsule(capsule_id, None)
    if getattr(state.settings, "proxy_require_api_key", False):
        key = header(scope, b"x-api-key")
        team = await team_for_api_key(state.db, key.decode("latin-1") if key else None)
        if team.id != row.team_id:
            raise not_found("capsule")
    async with gateway.open(row, purpose="to reach its ports") as guest:
        tunnel = await guest.tcp_connect(port)
        try:
            await guest.record_activity()
            yield guest, tunnel
        finally:
            await tunnel.close()
