"""Typed dependencies for the routes (`DatabaseDep`, `CurrentTeam`, `TeamCapsule`, ...).

Database work goes through `await db.run(...)` (db/session.py): a worker thread, never the event
loop's. There is no request-wide session: each job is its own short transaction."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session

from wrenn_control.api import key_lookup
from wrenn_control.config import Settings
from wrenn_control.auth import InvalidToken, decode_jwt
from wrenn_control.db.models import Capsule, Team, TeamMember, User
from wrenn_control.db.session import Database
from wrenn_control.errors import APIError
from wrenn_control.events import EventBus, current_actor
from wrenn_control.gateway import GuestGateway
from wrenn_control.operations import CapsuleOps
from wrenn_host.api import HostAgent

# Dependencies are `async def`: the plain ones are cheap (FastAPI would run `def` ones in its
# thread pool), the ones that ask the database await `db.run`.


async def _db(request: Request) -> Database:
    return request.app.state.db


async def _ops(request: Request) -> CapsuleOps:
    return request.app.state.ops


async def _host(request: Request) -> HostAgent:
    return request.app.state.host


async def _gateway(request: Request) -> GuestGateway:
    return request.app.state.gateway


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _events(request: Request) -> EventBus:
    return request.app.state.events


DatabaseDep = Annotated[Database, Depends(_db)]
OpsDep = Annotated[CapsuleOps, Depends(_ops)]
HostDep = Annotated[HostAgent, Depends(_host)]
# Into a capsule's guest (exec, files, processes): `async with gateway.open(capsule) as guest`.
GatewayDep = Annotated[GuestGateway, Depends(_gateway)]
SettingsDep = Annotated[Settings, Depends(_settings)]
EventsDep = Annotated[EventBus, Depends(_events)]

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="wrn_ followed by 32 hex digits")


@dataclasses.dataclass(frozen=True)
class TeamInfo:
    id: str
    name: str


async def team_for_api_key(db: Database, key: str | None, scope: dict[str, Any] | None = None) -> TeamInfo:
    """The team of an X-API-Key (401 if missing or unknown); also used outside the routes (the
    WebSocket routes and the port proxy read the header themselves). `scope`: the request's,
    where the request guard may have left the answer already."""
    if not key:
        raise APIError(401, "unauthorized", "missing X-API-Key header")
    found = key_lookup.remembered(scope, key) or await db.run(key_lookup.key_owner, key)
    if found is None:
        raise APIError(401, "unauthorized", "invalid API key")
    team, key_id, key_name = found
    current_actor.set({"type": "api_key", "id": key_id, "name": key_name})  # for the events it causes
    return TeamInfo(team.id, team.name)


# ---- accounts: a user's JWT (Authorization: Bearer) --------------------------------------------

bearer_scheme = HTTPBearer(auto_error=False, description="a JWT from /v1/auth/login or /v1/auth/signup")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)]


@dataclasses.dataclass(frozen=True)
class UserInfo:
    id: str
    email: str
    # The token's current team, None if the user is no longer a member of it (checked each request).
    team_id: str | None
    role: str | None


async def _user_from_token(db: Database, secret: str, token: str) -> UserInfo:
    try:
        claims = decode_jwt(secret, token)
    except InvalidToken as exc:
        raise APIError(401, "unauthorized", f"invalid token: {exc}") from None
    user, role = await db.run(_user_and_role, claims["sub"], claims.get("team"))
    if user is None:
        raise APIError(401, "unauthorized", "invalid token: no such user")
    team_id: str | None = claims.get("team") if role is not None else None
    current_actor.set({"type": "user", "id": user.id, "name": user.email})
    return UserInfo(user.id, user.email, team_id, role)


def _user_and_role(session: Session, user_id: str, team_id: str | None) -> tuple[User | None, str | None]:
    """The token's user, and its role in the token's team (None if it is no longer a member)."""
    user = session.get(User, user_id)
    if user is None or team_id is None:
        return user, None
    return user, session.scalar(select(TeamMember.role).where(TeamMember.team_id == team_id,
                                                              TeamMember.user_id == user.id))


async def _current_user(request: Request, db: DatabaseDep, creds: BearerDep) -> UserInfo:
    if creds is None:
        raise APIError(401, "unauthorized", "missing Authorization: Bearer token")
    return await _user_from_token(db, request.app.state.jwt_secret, creds.credentials)


CurrentUser = Annotated[UserInfo, Depends(_current_user)]


async def _key_manager(request: Request, db: DatabaseDep, creds: BearerDep,
                       key: Annotated[str | None, Security(api_key_header)]) -> TeamInfo:
    """The team whose API keys are managed: the Bearer token's current team, or the X-API-Key's."""
    if creds is not None:
        user = await _user_from_token(db, request.app.state.jwt_secret, creds.credentials)
        if user.team_id is None:
            raise APIError(403, "forbidden", "the token has no current team; log in again")
        team = await db.run(lambda s: s.get(Team, user.team_id))
        assert team is not None  # a membership row implies the team
        return TeamInfo(team.id, team.name)
    if key:
        return await team_for_api_key(db, key, request.scope)
    raise APIError(401, "unauthorized", "missing Authorization: Bearer token or X-API-Key header")


KeyManagerTeam = Annotated[TeamInfo, Depends(_key_manager)]


async def team_from_key_or_token(request: Request, db: DatabaseDep, creds: BearerDep,
                                  key: Annotated[str | None, Security(api_key_header)]) -> TeamInfo:
    """X-API-Key, as Wrenn; a user's Bearer token (its current team) is accepted too."""
    if not key and creds is not None:
        return await _key_manager(request, db, creds, None)
    return await team_for_api_key(db, key, request.scope)


CurrentTeam = Annotated[TeamInfo, Depends(team_from_key_or_token)]


async def _team_capsule(capsule_id: str, team: CurrentTeam, ops: OpsDep) -> Capsule:
    return await ops.get_for_team(team.id, capsule_id)


# The capsule named by the `{capsule_id}` path parameter, if it belongs to the caller's team.
TeamCapsule = Annotated[Capsule, Depends(_team_capsule)]
