"""Hosts of a fleet.

Operators (the operators' team: the one made at first start; others get 403): POST /v1/hosts
makes a host record and a one-time registration token, GET lists and shows hosts, drain stops
new placements on one, DELETE removes one that holds no capsule (else 409 host_has_capsules).
Host agents: POST /v1/hosts/register (Bearer registration token, spent by the call) and POST
/v1/hosts/{id}/heartbeat (Bearer credential). The wire protocol is in COMMON2.md / deploy/README.md.

Database work runs in a worker thread (sync `def` routes, `asyncio.to_thread`, `db.run`), never
on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shlex
import ssl
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Request, Response, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import delete, func, or_, select, update

from wrenn_control import ids
from wrenn_control.api.deps import CurrentTeam, DatabaseDep, OpsDep, SettingsDep, TeamInfo
from wrenn_control.bootstrap import operators_team_id
from wrenn_control.clock import utcnow
from wrenn_control.builds.manager import BuildStatus as B
from wrenn_control.db.models import Build, Capsule, Host
from wrenn_control.db.session import Database
from wrenn_control.errors import APIError, invalid, not_found
from wrenn_control.hosts.schemas import (
    HeartbeatAck,
    Heartbeat,
    HostCreate,
    HostCreated,
    HostOut,
    HostRegister,
    HostRegistered,
)
from wrenn_control.lifecycle import Status
from wrenn_control.schemas import ErrorBody
from wrenn_host.api import HostAgentError
from wrenn_host.service.tls import pinned_context

log = logging.getLogger(__name__)
router = APIRouter(tags=["hosts"], responses={401: {"model": ErrorBody}})
S = Status
PENDING, ONLINE, OFFLINE, DRAINING = "pending", "online", "offline", "draining"
# A capsule changed this recently may not be in the heartbeat yet (it was taken before).
_SETTLED = (S.RUNNING, S.PAUSED)
_TRANSITIONAL = (S.PENDING, S.STARTING, S.PAUSING, S.RESUMING, S.SNAPSHOTTING)
# A create, pause, ... whose replica died: longer than any of them takes (a create may wait for
# a built-in template's first build), and only with no replica's lease on it.
_TRANSITIONAL_GRACE = timedelta(minutes=30)
_GONE = frozenset({"error", "stopped", "lost", "missing"})

_LEFTOVERS: set[asyncio.Task[None]] = set()

host_bearer = HTTPBearer(auto_error=False, scheme_name="HostToken",
                         description="a host agent's registration token or credential")
HostBearer = Annotated[HTTPAuthorizationCredentials | None, Security(host_bearer)]


async def _operators(request: Request, team: CurrentTeam, db: DatabaseDep) -> TeamInfo:
    state = request.app.state
    if getattr(state, "operators_team_id", None) is None:
        state.operators_team_id = await asyncio.to_thread(operators_team_id, db)
    if team.id != state.operators_team_id:
        raise APIError(403, "forbidden", "host management is for the operators' team (the team made at first start)")
    return team


Operators = Annotated[TeamInfo, Depends(_operators)]


def _token(creds: HTTPAuthorizationCredentials | None) -> str:
    if creds is None or not creds.credentials.strip():
        raise APIError(401, "unauthorized", "missing Authorization: Bearer token")
    return creds.credentials.strip()


def _capsule_counts(s, host_ids: list[str]) -> dict[str, int]:  # type: ignore[no-untyped-def]
    rows = s.execute(select(Capsule.host_id, func.count()).where(
        Capsule.host_id.in_(host_ids), Capsule.status != S.STOPPED.value).group_by(Capsule.host_id)).all()
    return {hid: int(n) for hid, n in rows}


def _one(db: Database, host_id: str) -> HostOut:
    with db.session() as s:
        row = s.get(Host, host_id)
        if row is None:
            raise not_found("host")
        return HostOut.of(row, _capsule_counts(s, [host_id]).get(host_id, 0))


# ---- operators ----------------------------------------------------------------------------


@router.post("/hosts", status_code=201, response_model=HostCreated,
             responses={403: {"model": ErrorBody}})
def create_host(request: Request, _: Operators, db: DatabaseDep, settings: SettingsDep,
                body: Annotated[HostCreate | None, Body()] = None) -> HostCreated:
    """A host record and its one-time registration token; `command` is the line to run on the
    host (`wrenn host-agent ...`), which registers it."""
    host_id = "host-" + secrets.token_hex(8)
    token = "wrnr_" + secrets.token_hex(24)
    with db.session() as s:
        s.add(Host(id=host_id, name=(body.name if body and body.name else host_id), status=PENDING,
                   draining=False, token_hash=ids.hash_api_key(token), created_at=utcnow()))
        s.commit()
    base = (settings.public_url or str(request.base_url)).rstrip("/")
    command = (f"wrenn host-agent --control-plane {shlex.quote(base)} --token {token} "
               "--listen 0.0.0.0:8081 --data-dir /var/lib/wrenn")
    return HostCreated(id=host_id, token=token, command=command)


@router.get("/hosts", response_model=list[HostOut], responses={403: {"model": ErrorBody}})
def list_hosts(_: Operators, db: DatabaseDep) -> list[HostOut]:
    with db.session() as s:
        rows = s.scalars(select(Host).order_by(Host.created_at, Host.id)).all()
        counts = _capsule_counts(s, [r.id for r in rows])
        return [HostOut.of(r, counts.get(r.id, 0)) for r in rows]


@router.get("/hosts/{host_id}", response_model=HostOut,
            responses={403: {"model": ErrorBody}, 404: {"model": ErrorBody}})
def get_host(host_id: str, _: Operators, db: DatabaseDep) -> HostOut:
    return _one(db, host_id)


@router.post("/hosts/{host_id}/drain", response_model=HostOut,
             responses={403: {"model": ErrorBody}, 404: {"model": ErrorBody}})
def drain_host(request: Request, host_id: str, _: Operators, db: DatabaseDep) -> HostOut:
    """No new capsule is placed on the host from now on (its capsules stay where they are)."""
    with db.session() as s:
        found = s.execute(update(Host).where(Host.id == host_id).values(draining=True)
                          .execution_options(synchronize_session=False)).rowcount
        s.execute(update(Host).where(Host.id == host_id, Host.status == ONLINE).values(status=DRAINING)
                  .execution_options(synchronize_session=False))
        s.commit()
    if not found:
        raise not_found("host")
    _mark(request, host_id, _one(db, host_id).status)
    return _one(db, host_id)


@router.delete("/hosts/{host_id}", status_code=204, response_class=Response,
               responses={403: {"model": ErrorBody}, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}})
def delete_host(host_id: str, _: Operators, db: DatabaseDep) -> Response:
    """Only a host with no capsule left (stopped ones do not count): else 409 host_has_capsules,
    with their ids in `capsule_ids`."""
    with db.session() as s:
        query = select(Host).where(Host.id == host_id)
        if s.get_bind().dialect.name == "postgresql":
            query = query.with_for_update()  # placement locks it too: no capsule lands meanwhile
        if s.scalar(query) is None:
            raise not_found("host")
        held = s.scalars(select(Capsule.id).where(Capsule.host_id == host_id, Capsule.status != S.STOPPED.value)
                         .order_by(Capsule.seq).limit(1000)).all()
        if held:
            raise APIError(409, "host_has_capsules", f"host {host_id} still has {len(held)} capsule(s); "
                           "destroy them first", extra={"capsule_ids": list(held)})
        s.execute(delete(Host).where(Host.id == host_id))
        s.commit()
    return Response(status_code=204)


# ---- host agents --------------------------------------------------------------------------


@router.post("/hosts/register", response_model=HostRegistered)
def register_host(request: Request, body: HostRegister, creds: HostBearer, db: DatabaseDep,
                  settings: SettingsDep) -> HostRegistered:
    """Spends the registration token (a second use: 401) and hands out the agent's credential
    and the control token the control plane will present to it. The host stays `pending` until
    its first heartbeat, which the agent sends once it serves: only then is it placed on."""
    token = _token(creds)
    tls_cert = _tls_cert(body)
    credential = "wrnh_" + secrets.token_hex(32)
    control = "wrnc_" + secrets.token_hex(32)
    now = utcnow()
    with db.session() as s:
        host_id = s.scalar(select(Host.id).where(Host.token_hash == ids.hash_api_key(token)))
        # Conditional on the token still being there: of two calls with one token, one wins.
        won = host_id is not None and s.execute(
            update(Host).where(Host.id == host_id, Host.token_hash == ids.hash_api_key(token)).values(
                token_hash=None, credential_hash=ids.hash_api_key(credential), control_token=control,
                address=body.address.rstrip("/"), name=body.name or Host.name,
                vcpus=body.capacity.vcpus, memory_mb=body.capacity.memory_mb, disk_mb=body.capacity.disk_mb,
                accelerator=body.accelerator, version=body.version, tls_cert=tls_cert, last_heartbeat_at=now)
            .execution_options(synchronize_session=False)).rowcount == 1
        s.commit()
    if not won:
        raise APIError(401, "unauthorized", "invalid or already used registration token")
    _refresh(request)
    return HostRegistered(host_id=host_id, credential=credential, control_token=control,
                          heartbeat_interval_sec=settings.heartbeat_interval_sec)


def _tls_cert(body: HostRegister) -> str | None:
    """400 for a certificate that would make the host unreachable: one that does not parse, or
    one given with a plain http address (it would never be used)."""
    if body.tls_cert is None:
        return None
    if not body.address.startswith("https://"):
        raise invalid("tls_cert needs an https:// address")
    try:
        pinned_context(body.tls_cert)
    except (ValueError, ssl.SSLError) as exc:
        raise invalid(f"tls_cert is not a usable PEM certificate: {exc}") from None
    return body.tls_cert


def _record_heartbeat(db: Database, host_id: str, credential: str, beat: Heartbeat, grace: timedelta
                      ) -> tuple[str, bool, list[tuple[str, Status, Status | None, datetime]], list[str]]:
    """Store the heartbeat; returns (status, was offline, [(capsule, its status, what the host
    says: None if gone, the cutoff)] for the capsules whose row disagrees with their host, and
    the capsules the host still has that were destroyed here meanwhile or whose build ended)."""
    now = utcnow()
    with db.session() as s:
        host = s.get(Host, host_id)
        if host is None or host.credential_hash != ids.hash_api_key(credential):
            raise APIError(401, "unauthorized", "invalid host credential")
        was_offline = host.status == OFFLINE
        host.status = DRAINING if host.draining else ONLINE
        host.usage = beat.usage.model_dump(exclude_none=True)
        host.templates = sorted(set(beat.templates))
        host.last_heartbeat_at = now
        status = host.status
        s.commit()
        rows = s.execute(select(Capsule.id, Capsule.status, Capsule.last_updated).where(
            Capsule.host_id == host_id, Capsule.status.in_([x.value for x in _SETTLED + _TRANSITIONAL]),
            or_(Capsule.claimed_until.is_(None), Capsule.claimed_until < now))).all()
        # (ids without a row are left alone: a build's capsule has none)
        stopped = list(s.scalars(select(Capsule.id).where(
            Capsule.id.in_(list(beat.capsules)[:10_000]), Capsule.host_id == host_id,
            Capsule.status == S.STOPPED.value)))
        # A build's capsule (its id is the build's) whose build ended: its replica stopped
        # before removing it (a build ended by another replica, builds/manager.py).
        stopped += list(s.scalars(select(Build.id).where(
            Build.id.in_([c for c in beat.capsules if c.startswith("bld-")][:1000]),
            Build.status.in_([B.SUCCESS.value, B.FAILED.value, B.CANCELLED.value]))))
    wrong = []
    for cid, st, last_updated in rows:
        was = S(st)
        cutoff = now - (grace if was in _SETTLED else _TRANSITIONAL_GRACE)
        if last_updated > cutoff:
            continue
        said = beat.capsules.get(cid)
        if said is None or said in _GONE:
            wrong.append((cid, was, None, cutoff))
        elif said in ("running", "paused") and said != st:
            wrong.append((cid, was, S(said), cutoff))
    return status, was_offline, wrong, stopped


@router.post("/hosts/{host_id}/heartbeat", response_model=HeartbeatAck)
async def heartbeat(request: Request, host_id: str, body: Heartbeat, creds: HostBearer, ops: OpsDep,
                    db: DatabaseDep, settings: SettingsDep) -> HeartbeatAck:
    """Usage, the capsules the host has (id -> state) and the templates it holds. A capsule the
    host no longer has becomes `error`; one it reports in another state (running, paused) takes
    that state: a settled one changed longer ago than a few heartbeats, a transitional one (its
    replica died mid-call) after half an hour, and none while a replica holds its lease."""
    grace = timedelta(seconds=max(10.0, 3 * settings.heartbeat_interval_sec))
    status, was_offline, wrong, stopped = await asyncio.to_thread(
        _record_heartbeat, db, host_id, _token(creds), body, grace)
    _mark(request, host_id, status)
    await _destroy_leftovers(request, host_id, stopped)
    for cid, was, said, cutoff in wrong:
        where = [Capsule.host_id == host_id, Capsule.last_updated <= cutoff,
                 or_(Capsule.claimed_until.is_(None), Capsule.claimed_until < utcnow())]
        if said is None:
            await ops.transition(cid, S.ERROR, from_={was}, where=where, values={
                "error": f"VM lost: its host {host_id} no longer has it" + (" (after being offline)" if was_offline else "")})
        else:
            await ops.transition(cid, said, from_={was}, where=where, force=True)
    return HeartbeatAck(status=status)


async def _destroy_leftovers(request: Request, host_id: str, capsule_ids: list[str]) -> None:
    """Capsules destroyed while their host was offline, and build capsules left by a replica
    that stopped: the host removes them now (in the background; destroy is idempotent, so a
    second replica doing the same is harmless)."""
    directory = getattr(request.app.state, "fleet", None)
    if directory is None or not capsule_ids:
        return
    try:
        agent = await directory.for_capsule(host_id)
    except APIError as exc:  # (not yet in this replica's directory: the next heartbeat will do)
        log.info("host %s: leftover capsules wait: %s", host_id, exc.message)
        return

    async def destroy(cid: str) -> None:
        try:
            await agent.destroy(cid)
            log.info("host %s: destroyed leftover capsule %s", host_id, cid)
        except HostAgentError as exc:
            log.warning("host %s: leftover capsule %s: %s", host_id, cid, exc.message)

    for cid in capsule_ids:
        task = asyncio.create_task(destroy(cid), name=f"leftover {cid}")
        _LEFTOVERS.add(task)  # (a reference, so that the task is not collected midway)
        task.add_done_callback(_LEFTOVERS.discard)


def _mark(request: Request, host_id: str, status: str) -> None:
    directory = getattr(request.app.state, "fleet", None)
    if directory is not None:
        directory.mark(host_id, status)


def _refresh(request: Request) -> None:
    directory = getattr(request.app.state, "fleet", None)
    if directory is not None:
        directory.refresh()
