"""Typed dependencies for the routes (`SessionDep`, `CurrentTeam`, `TeamCapsule`, ...)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader
from sqlalchemy import select
from sqlalchemy.orm import Session

from wrenn_control import ids
from wrenn_control.config import Settings
from wrenn_control.db.models import ApiKey, Capsule, Team
from wrenn_control.db.session import Database
from wrenn_control.errors import APIError
from wrenn_control.events import EventBus, current_actor
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
SettingsDep = Annotated[Settings, Depends(_settings)]
EventsDep = Annotated[EventBus, Depends(_events)]

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="wrn_ followed by 32 hex digits")


@dataclasses.dataclass(frozen=True)
class TeamInfo:
    id: str
    name: str


async def _current_team(db: DatabaseDep, key: Annotated[str | None, Security(api_key_header)]) -> TeamInfo:
    if not key:
        raise APIError(401, "unauthorized", "missing X-API-Key header")
    with db.session() as session:  # its own short session: released before the route runs
        found = session.execute(select(Team, ApiKey.id, ApiKey.name).join(ApiKey, ApiKey.team_id == Team.id)
                                .where(ApiKey.key_hash == ids.hash_api_key(key))).first()
    if found is None:
        raise APIError(401, "unauthorized", "invalid API key")
    team, key_id, key_name = found
    current_actor.set({"type": "api_key", "id": key_id, "name": key_name})  # for the events it causes
    return TeamInfo(team.id, team.name)


CurrentTeam = Annotated[TeamInfo, Depends(_current_team)]


async def _team_capsule(capsule_id: str, team: CurrentTeam, ops: OpsDep) -> Capsule:
    return ops.get_for_team(team.id, capsule_id)


# The capsule named by the `{capsule_id}` path parameter, if it belongs to the caller's team.
TeamCapsule = Annotated[Capsule, Depends(_team_capsule)]
