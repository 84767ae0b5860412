"""`POST /v1/auth/ticket`: a 30 s single-use ticket for one browser stream (see wrenn_control.tickets).

Only the streaming routes accept it, as `?ticket=`: the PTY and exec/process WebSockets, the
event stream and a build's log stream. Everything else still needs `X-API-Key` or `Authorization: Bearer`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Security
from pydantic import BaseModel

from wrenn_control.api.deps import BearerDep, DatabaseDep, TeamInfo, team_from_key_or_token, api_key_header
from wrenn_control.db.models import Team
from wrenn_control.errors import APIError
from wrenn_control.events import actor, current_actor
from wrenn_control.schemas import ErrorBody
from wrenn_control.tickets import InvalidTicket, TicketStore

router = APIRouter(tags=["accounts"], responses={401: {"model": ErrorBody}})


class TicketOut(BaseModel):
    ticket: str
    expires_in: int  # seconds


def ticket_store(app) -> TicketStore:  # type: ignore[no-untyped-def]
    store = getattr(app.state, "tickets", None)
    if store is None:
        store = app.state.tickets = TicketStore()
    return store


@router.post("/auth/ticket", status_code=201, response_model=TicketOut)
async def create_ticket(request: Request, team: Annotated[TeamInfo, Depends(team_from_key_or_token)]) -> TicketOut:
    """A ticket for the caller's team, to open one stream with `?ticket=` within `expires_in` s."""
    store = ticket_store(request.app)
    return TicketOut(ticket=store.issue(team.id, actor()), expires_in=int(store.ttl_sec))


async def team_from_ticket(app, db, ticket: str) -> TeamInfo:  # type: ignore[no-untyped-def]
    """Redeem a ticket (once) for its team; raises APIError 401."""
    try:
        grant = ticket_store(app).redeem(ticket)
    except InvalidTicket as exc:
        raise APIError(401, "unauthorized", str(exc)) from None
    team = await db.run(lambda s: s.get(Team, grant.team_id))
    if team is None:
        raise APIError(401, "unauthorized", "the ticket's team no longer exists")
    info = TeamInfo(team.id, team.name)
    current_actor.set(grant.actor)
    return info


async def _stream_team(request: Request, db: DatabaseDep, creds: BearerDep,
                       key: Annotated[str | None, Security(api_key_header)],
                       ticket: Annotated[str | None, Query(description="from POST /v1/auth/ticket")] = None) -> TeamInfo:
    if ticket:
        return await team_from_ticket(request.app, db, ticket)
    return await team_from_key_or_token(request, db, creds, key)


# The team of a streaming route's caller: `?ticket=`, else X-API-Key or a Bearer token.
StreamTeam = Annotated[TeamInfo, Depends(_stream_team)]
