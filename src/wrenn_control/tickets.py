"""Short-lived, single-use tickets for the browser's streaming connections.

A browser cannot set `X-API-Key` on a WebSocket or an EventSource, and a long-lived key must not
end up in a URL (URLs are logged). So the dashboard asks `POST /v1/auth/ticket` (with its key or
JWT) for a ticket and opens the stream with `?ticket=...`. A ticket:
- names the team (and the actor) it was issued for, nothing more;
- lives `TICKET_TTL_SEC` seconds and is good for one connection;
- is kept in memory only, by its SHA-256 (a process restart forgets them all, which is fine for
  something that lives 30 s).
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
import threading
import time
from collections.abc import Callable

TICKET_TTL_SEC = 30
TICKET_PREFIX = "wrt_"
MAX_TICKETS = 10_000  # outstanding at once; beyond that the oldest are dropped


class InvalidTicket(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class Ticket:
    team_id: str
    actor: dict[str, str]
    expires_at: float


def _digest(ticket: str) -> str:
    return hashlib.sha256(ticket.encode("utf-8")).hexdigest()


class TicketStore:
    def __init__(self, ttl_sec: float = TICKET_TTL_SEC, clock: Callable[[], float] = time.monotonic):
        self.ttl_sec = ttl_sec
        self._clock = clock
        self._tickets: dict[str, Ticket] = {}  # digest -> ticket, in issue order
        self._lock = threading.Lock()

    def issue(self, team_id: str, actor: dict[str, str] | None = None) -> str:
        ticket = TICKET_PREFIX + secrets.token_urlsafe(24)
        now = self._clock()
        with self._lock:
            self._sweep(now)
            while len(self._tickets) >= MAX_TICKETS:
                self._tickets.pop(next(iter(self._tickets)))
            self._tickets[_digest(ticket)] = Ticket(team_id, dict(actor or {"type": "system"}), now + self.ttl_sec)
        return ticket

    def redeem(self, ticket: str) -> Ticket:
        """The ticket's grant, once; raises InvalidTicket if unknown, already used or expired."""
        with self._lock:
            found = self._tickets.pop(_digest(ticket), None)
            self._sweep(self._clock())
        if found is None:
            raise InvalidTicket("invalid or already used ticket")
        if found.expires_at <= self._clock():
            raise InvalidTicket("ticket expired")
        return found

    def __len__(self) -> int:
        return len(self._tickets)

    def _sweep(self, now: float) -> None:
        # Issue order is expiry order (one TTL), so the expired ones are at the front.
        while self._tickets:
            digest, first = next(iter(self._tickets.items()))
            if first.expires_at > now:
                break
            del self._tickets[digest]
