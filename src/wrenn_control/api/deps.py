"""Typed dependencies for the routes (`SessionDep`, `CurrentTeam`, `TeamCapsule`, ...)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session

from wrenn_control import ids
from wrenn_control.config import Settings
from wrenn_control.auth import InvalidToken, decode_jwt
from wrenn_control.db.models import ApiKey, Capsule, Team, TeamMember, User
from wrenn_control.db.session import Database
from wrenn_control.errors import APIError
from wrenn_control.events import EventBus, current_actor
from wrenn_control.gateway import GuestGateway
from wrenn_control.operations import CapsuleOps
from wrenn_host.api import HostAgent

# Dependencies are `async def` so that they run on the event loop thread like everything else
# touching the DB (FastAPI would run plain `def` ones in a thread pool).


async def _db(request: Request) -> Database:
    return request.app.state.db


async def _session(db: Annotated[Database, Depends(_db)]) -> AsyncIterator[Session]:
    with db.session() as session:
        yield session


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
# A session for the whole request: only for routes that do not await anything while using it
# (see db/session.py); the others open short `db.session()` blocks.
SessionDep = Annotated[Session, Depends(_session)]
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


async def team_for_api_key(db: DatabaseDep, key: Annotated[str | None, Security(api_key_header)]) -> TeamInfo:
    """The team of an X-API-Key (401 if missing or unknown); also used outside the routes (the
    WebSocket routes and the port proxy read the header themselves)."""
    if not key:
        raise APIError(401, "unauthorized", "missing X-API-Key header")
    found = await asyncio.to_thread(_key_owner, db, key)  # every request asks: off the event loop
    if found is None:
        raise APIError(401, "unauthorized", "invalid API key")
    team, key_id, key_name = found
    current_actor.set({"type": "api_key", "id": key_id, "name": key_name})  # for the events it causes
    return TeamInfo(team.id, team.name)


def _key_owner(db: Database, key: str) -> tuple[Team, str, str] | None:
    with db.session() as session:  # its own short session: released before the route runs
        return session.execute(select(Team, ApiKey.id, ApiKey.name).join(ApiKey, ApiKey.team_id == Team.id)
                               .where(ApiKey.key_hash == ids.hash_api_key(key))).first()


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
    with db.session() as session:
        user = session.get(User, claims["sub"])
        if user is None:
            raise APIError(401, "unauthorized", "invalid token: no such user")
        team_id: str | None = claims.get("team")
        role = None
        if team_id is not None:
            role = session.scalar(select(TeamMember.role).where(TeamMember.team_id == team_id,
                                                                TeamMember.user_id == user.id))
            if role is None:
                team_id = None
    current_actor.set({"type": "user", "id": user.id, "name": user.email})
    return UserInfo(user.id, user.email, team_id, role)


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
        with db.session() as session:
            team = session.get(Team, user.team_id)
            assert team is not None  # a membership row implies the team
            return TeamInfo(team.id, team.name)
    if key:
        return await team_for_api_key(db, key)
    raise APIError(401, "unauthorized", "missing Authorization: Bearer token or X-API-Key header")


KeyManagerTeam = Annotated[TeamInfo, Depends(_key_manager)]


async def team_from_key_or_token(request: Request, db: DatabaseDep, creds: BearerDep,
                                  key: Annotated[str | None, Security(api_key_header)]) -> TeamInfo:
    """X-API-Key, as Wrenn; a user's Bearer token (its current team) is accepted too."""
    if not key and creds is not None:
        return await _key_manager(request, db, creds, None)
    return await team_for_api_key(db, key)


CurrentTeam = Annotated[TeamInfo, Depends(team_from_key_or_token)]


async def _team_capsule(capsule_id: str, team: CurrentTeam, ops: OpsDep) -> Capsule:
    return await asyncio.to_thread(ops.get_for_team, team.id, capsule_id)


# The capsule named by the `{capsule_id}` path parameter, if it belongs to the caller's team.
TeamCapsule = Annotated[Capsule, Depends(_team_capsule)]
