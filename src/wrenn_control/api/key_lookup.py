"""The team an API key belongs to: one query per request. The request guard asks first (to
refuse a bad key before reading a body) and leaves the answer in the request's scope, where the
route's dependency finds it."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from wrenn_control import ids
from wrenn_control.db.models import ApiKey, Team

Owner = tuple[Team, str, str]  # the team, the key's id, the key's name
_SCOPE_KEY = "wrenn_key_owner"


def key_owner(session: Session, key: str) -> Owner | None:
    row = session.execute(select(Team, ApiKey.id, ApiKey.name).join(ApiKey, ApiKey.team_id == Team.id)
                          .where(ApiKey.key_hash == ids.hash_api_key(key))).first()
    return None if row is None else (row[0], row[1], row[2])


def remember(scope: dict[str, Any], key: str, owner: Owner) -> None:
    scope.setdefault("state", {})[_SCOPE_KEY] = (key, owner)


def remembered(scope: dict[str, Any] | None, key: str) -> Owner | None:
    """The owner the guard found for this very key in this request, if it looked."""
    known = ((scope or {}).get("state") or {}).get(_SCOPE_KEY)
    return known[1] if known is not None and known[0] == key else None
