"""First start: a default team and an API key. Also the helpers to make more teams and keys."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from wrenn_control import ids
from wrenn_control.clock import utcnow
from wrenn_control.config import Settings
from wrenn_control.db.models import ApiKey, Team
from wrenn_control.db.session import Database

DEFAULT_TEAM_NAME = "default"


def add_team(session: Session, name: str) -> Team:
    team = Team(id=ids.team_id(), name=name, created_at=utcnow())
    session.add(team)
    session.flush()
    return team


def add_api_key(session: Session, team_id: str, name: str = "default", key: str | None = None) -> str:
    """Register `key` (or a fresh one) for the team; returns the plaintext, which is not stored."""
    key = key or ids.new_api_key()
    session.add(ApiKey(id=ids.api_key_id(), team_id=team_id, name=name, key_hash=ids.hash_api_key(key),
                       prefix=ids.key_prefix(key), created_at=utcnow()))
    session.flush()
    return key


def create_team(db: Database, name: str) -> tuple[str, str]:
    """A new team with one key: (team_id, plaintext key)."""
    with db.session() as s:
        team = add_team(s, name)
        key = add_api_key(s, team.id)
        s.commit()
        return team.id, key


def bootstrap(db: Database, settings: Settings) -> str | None:
    """Make sure a team and a key exist. Returns a newly generated plaintext key (to be shown
    once), or None when nothing new was generated (a key already existed, or the operator gave
    WRENN_BOOTSTRAP_API_KEY, which is registered if it is not yet)."""
    with db.session() as s:
        team = s.scalar(select(Team).order_by(Team.created_at, Team.id).limit(1))
        if team is None:
            team = add_team(s, DEFAULT_TEAM_NAME)
        generated: str | None = None
        if settings.bootstrap_api_key:
            known = s.scalar(select(ApiKey.id).where(ApiKey.key_hash == ids.hash_api_key(settings.bootstrap_api_key)))
            if known is None:
                add_api_key(s, team.id, name="bootstrap", key=settings.bootstrap_api_key)
        elif not s.scalar(select(func.count()).select_from(ApiKey)):
            generated = add_api_key(s, team.id, name="bootstrap")
        s.commit()
        return generated


def operators_team_id(db: Database) -> str | None:
    """The operators' team: the first team, made at first start (above). It alone manages hosts."""
    with db.session() as s:
        return s.scalar(select(Team.id).order_by(Team.created_at, Team.id).limit(1))
