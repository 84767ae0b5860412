"""Accounts: signup / login (JWT), the caller, API keys, teams and their members.

Users act through a JWT (`Authorization: Bearer`) carrying their current team; API keys belong
to a team. `/v1/api-keys` also takes a team's X-API-Key, so a self-hoster with only the
bootstrap key can manage keys.
"""

from __future__ import annotations

import asyncio
import re

from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from wrenn_control import ids
from wrenn_control.api.deps import CurrentUser, DatabaseDep, KeyManagerTeam, SettingsDep
from wrenn_control.auth import burn_password_check, encode_jwt, hash_password, verify_password
from wrenn_control.bootstrap import add_team
from wrenn_control.clock import utcnow
from wrenn_control.db.models import ApiKey, Team, TeamMember, User
from wrenn_control.db.session import add_committed
from wrenn_control.errors import APIError, invalid, not_found
from wrenn_control.schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyOut,
    ErrorBody,
    LoginRequest,
    MeOut,
    MemberAdd,
    MemberOut,
    SignupOut,
    SignupRequest,
    TeamCreate,
    TeamOut,
    TokenOut,
    UserOut,
)

router = APIRouter(tags=["accounts"], responses={401: {"model": ErrorBody}})

_EMAIL_RE = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_BAD_LOGIN = "invalid email or password"
MANAGERS = ("owner", "admin")


def _email(raw: str) -> str:
    return raw.strip().lower()


def _forbidden(message: str) -> APIError:
    return APIError(403, "forbidden", message)


def _user_out(user: User) -> UserOut:
    return UserOut(id=user.id, email=user.email, created_at=user.created_at)


def _team_out(team: Team, role: str) -> TeamOut:
    return TeamOut(id=team.id, name=team.name, role=role, created_at=team.created_at)  # type: ignore[arg-type]


def _key_out(row: ApiKey) -> ApiKeyOut:
    return ApiKeyOut(id=row.id, name=row.name, prefix=row.prefix, created_at=row.created_at)


def _role(session: Session, team_id: str, user_id: str) -> str:
    """The user's role in the team; a team they are not in is not found."""
    role = session.scalar(select(TeamMember.role).where(TeamMember.team_id == team_id,
                                                        TeamMember.user_id == user_id))
    if role is None:
        raise not_found("team")
    return role


# ---- signup / login / me -----------------------------------------------------------------


async def _signup_open(settings: SettingsDep) -> None:
    # A dependency: refused before the body is even validated.
    if not settings.allow_signup:
        raise _forbidden("signup is turned off on this server (WRENN_ALLOW_SIGNUP)")


@router.post("/auth/signup", status_code=201, response_model=SignupOut, dependencies=[Depends(_signup_open)],
             responses={400: {"model": ErrorBody}, 403: {"model": ErrorBody}, 409: {"model": ErrorBody}})
async def signup(body: SignupRequest, db: DatabaseDep, request: Request) -> SignupOut:
    """Create a user and their personal team (they are its owner); returns a token for it.
    403 when the server has signup turned off (WRENN_ALLOW_SIGNUP=0)."""
    email = _email(body.email)
    if not _EMAIL_RE.fullmatch(email):
        raise invalid("email: not a valid email address")
    password_hash = await asyncio.to_thread(hash_password, body.password)
    taken = APIError(409, "conflict", "an account with this email already exists")
    now = utcnow()

    def job(s: Session) -> SignupOut:
        if s.scalar(select(User.id).where(User.email == email)) is not None:
            raise taken
        user = User(id=ids.user_id(), email=email, password_hash=password_hash, created_at=now)
        s.add(user)
        try:
            s.flush()
        except IntegrityError:  # signed up concurrently
            s.rollback()
            raise taken from None
        team = add_team(s, body.team_name or email)
        s.add(TeamMember(team_id=team.id, user_id=user.id, role="owner", created_at=now))
        s.commit()
        token = encode_jwt(request.app.state.jwt_secret, user.id, team.id)
        return SignupOut(token=token, user=_user_out(user), team=_team_out(team, "owner"))

    return await db.run(job)


@router.post("/auth/login", response_model=TokenOut, responses={400: {"model": ErrorBody}, 404: {"model": ErrorBody}})
async def login(body: LoginRequest, db: DatabaseDep, request: Request) -> TokenOut:
    """A token (valid 24 h) for the user's oldest team, or for `team_id` if given."""
    found = await db.run(lambda s: s.execute(select(User.id, User.password_hash)
                                             .where(User.email == _email(body.email))).first())
    if found is None:
        await asyncio.to_thread(burn_password_check, body.password)
        raise APIError(401, "unauthorized", _BAD_LOGIN)
    user_id, password_hash = found
    if not await asyncio.to_thread(verify_password, body.password, password_hash):
        raise APIError(401, "unauthorized", _BAD_LOGIN)
    query = select(TeamMember.team_id).where(TeamMember.user_id == user_id)
    if body.team_id is not None:
        team_id = await db.run(lambda s: s.scalar(query.where(TeamMember.team_id == body.team_id)))
        if team_id is None:
            raise not_found("team")
    else:
        team_id = await db.run(lambda s: s.scalar(query.order_by(TeamMember.created_at, TeamMember.team_id).limit(1)))
    return TokenOut(token=encode_jwt(request.app.state.jwt_secret, user_id, team_id))


@router.get("/me", response_model=MeOut)
async def me(user: CurrentUser, db: DatabaseDep) -> MeOut:
    """The caller and the token's current team (null if they are no longer in it)."""
    def job(s: Session) -> MeOut:
        row = s.get(User, user.id)
        assert row is not None
        team = s.get(Team, user.team_id) if user.team_id else None
        return MeOut(user=_user_out(row), team=_team_out(team, user.role or "member") if team else None)

    return await db.run(job)


# ---- API keys ------------------------------------------------------------------------------


@router.post("/api-keys", status_code=201, response_model=ApiKeyCreated, responses={400: {"model": ErrorBody}})
async def create_api_key(team: KeyManagerTeam, db: DatabaseDep, body: ApiKeyCreate | None = None) -> ApiKeyCreated:
    """A new key for the team. The full key is in this answer only; only its hash is stored."""
    key = ids.new_api_key()
    row = ApiKey(id=ids.api_key_id(), team_id=team.id, name=(body.name if body and body.name else "default"),
                 key_hash=ids.hash_api_key(key), prefix=ids.key_prefix(key), created_at=utcnow())
    await db.run(add_committed, row)
    return ApiKeyCreated(**_key_out(row).model_dump(), key=key)


@router.get("/api-keys", response_model=list[ApiKeyOut])
async def list_api_keys(team: KeyManagerTeam, db: DatabaseDep) -> list[ApiKeyOut]:
    rows = await db.run(lambda s: s.scalars(select(ApiKey).where(ApiKey.team_id == team.id)
                                            .order_by(ApiKey.created_at, ApiKey.id)).all())
    return [_key_out(r) for r in rows]


@router.delete("/api-keys/{key_id}", status_code=204, response_class=Response,
               responses={404: {"model": ErrorBody}})
async def delete_api_key(key_id: str, team: KeyManagerTeam, db: DatabaseDep) -> Response:
    """Revoke a key of the team: it stops working at once."""
    def job(s: Session) -> int:
        gone = s.execute(delete(ApiKey).where(ApiKey.id == key_id, ApiKey.team_id == team.id)).rowcount
        s.commit()
        return gone

    if not await db.run(job):
        raise not_found("api key")
    return Response(status_code=204)


# ---- teams and members ---------------------------------------------------------------------


@router.get("/teams", response_model=list[TeamOut])
async def list_teams(user: CurrentUser, db: DatabaseDep) -> list[TeamOut]:
    """The caller's teams, with their role in each."""
    rows = await db.run(lambda s: s.execute(select(Team, TeamMember.role).join(TeamMember, TeamMember.team_id == Team.id)
                                            .where(TeamMember.user_id == user.id)
                                            .order_by(TeamMember.created_at, Team.id)).all())
    return [_team_out(team, role) for team, role in rows]


@router.post("/teams", status_code=201, response_model=TeamOut, responses={400: {"model": ErrorBody}})
async def create_team(body: TeamCreate, user: CurrentUser, db: DatabaseDep) -> TeamOut:
    """A new team with the caller as its owner (log in with its `team_id` to act for it)."""
    def job(s: Session) -> TeamOut:
        team = add_team(s, body.name)
        s.add(TeamMember(team_id=team.id, user_id=user.id, role="owner", created_at=utcnow()))
        s.commit()
        return _team_out(team, "owner")

    return await db.run(job)


@router.get("/teams/{team_id}/members", response_model=list[MemberOut], responses={404: {"model": ErrorBody}})
async def list_members(team_id: str, user: CurrentUser, db: DatabaseDep) -> list[MemberOut]:
    def job(s: Session) -> list[MemberOut]:
        _role(s, team_id, user.id)
        rows = s.execute(select(TeamMember, User.email).join(User, User.id == TeamMember.user_id)
                         .where(TeamMember.team_id == team_id)
                         .order_by(TeamMember.created_at, TeamMember.user_id)).all()
        return [MemberOut(user_id=m.user_id, email=email, role=m.role, created_at=m.created_at)  # type: ignore[arg-type]
                for m, email in rows]

    return await db.run(job)


@router.post("/teams/{team_id}/members", status_code=201, response_model=MemberOut,
             responses={403: {"model": ErrorBody}, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}})
async def add_member(team_id: str, body: MemberAdd, user: CurrentUser, db: DatabaseDep) -> MemberOut:
    """Add an existing user by email (owners and admins; only owners may add owners)."""
    def job(s: Session) -> MemberOut:
        role = _role(s, team_id, user.id)
        if role not in MANAGERS:
            raise _forbidden("only a team's owners and admins may add members")
        if body.role == "owner" and role != "owner":
            raise _forbidden("only an owner may add an owner")
        target = s.scalar(select(User).where(User.email == _email(body.email)))
        if target is None:
            raise not_found("user")
        member = TeamMember(team_id=team_id, user_id=target.id, role=body.role, created_at=utcnow())
        s.add(member)
        try:
            s.commit()
        except IntegrityError:
            s.rollback()
            raise APIError(409, "conflict", "this user is already a member of the team") from None
        return MemberOut(user_id=target.id, email=target.email, role=body.role, created_at=member.created_at)

    return await db.run(job)


@router.delete("/teams/{team_id}/members/{user_id}", status_code=204, response_class=Response,
               responses={403: {"model": ErrorBody}, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}})
async def remove_member(team_id: str, user_id: str, user: CurrentUser, db: DatabaseDep) -> Response:
    """Remove a member (owners and admins; anyone may leave). Only owners remove owners, and a
    team always keeps at least one owner."""
    def job(s: Session) -> None:
        # The team's row locked first: two owners removing each other at once take turns, and
        # the second finds the last owner (PostgreSQL; SQLite's one worker serializes them).
        s.execute(select(Team.id).where(Team.id == team_id).with_for_update())
        role = _role(s, team_id, user.id)
        target = s.scalar(select(TeamMember).where(TeamMember.team_id == team_id, TeamMember.user_id == user_id))
        if target is None:
            raise not_found("member")
        if user_id != user.id and (role not in MANAGERS or (target.role == "owner" and role != "owner")):
            raise _forbidden("only owners may remove owners, and only owners and admins may remove members")
        if target.role == "owner":
            owners = s.scalar(select(func.count()).select_from(TeamMember)
                              .where(TeamMember.team_id == team_id, TeamMember.role == "owner"))
            if owners <= 1:
                raise APIError(409, "conflict", "a team must keep at least one owner")
        s.delete(target)
        s.commit()

    await db.run(job)
    return Response(status_code=204)
