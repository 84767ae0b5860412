"""Capsules: create, list, get, destroy, pause, resume, ping."""

from __future__ import annotations

from typing import Annotated

import functools

from fastapi import APIRouter, Body, Request, Response
from sqlalchemy import select

from wrenn_control.api import listing
from wrenn_control.api.deps import CurrentTeam, DatabaseDep, HostDep, OpsDep, SettingsDep, TeamCapsule
from wrenn_control.builds.builtin import builtin_build_shape
from wrenn_control.db.models import Template
from wrenn_control.errors import invalid, invalid_state, short
from wrenn_control.hosts import liveness
from wrenn_control.limits import host_room
from wrenn_control.schemas import CapsuleCreate, CapsuleDetail, CapsuleOut, ErrorBody, NetworkUpdate
from wrenn_host.api import InvalidShape
from wrenn_host.network.policy import EgressPolicy, InvalidPolicy

router = APIRouter(tags=["capsules"], responses={401: {"model": ErrorBody}})

DEFAULT_TEMPLATE = "minimal"
DEFAULT_VCPUS = 1
DEFAULT_MEMORY_MB = 512


@router.post("/capsules", status_code=201, response_model=CapsuleOut,
             responses={400: {"model": ErrorBody}, 403: {"model": ErrorBody}, 502: {"model": ErrorBody},
                        503: {"model": ErrorBody}})
async def create_capsule(request: Request, team: CurrentTeam, ops: OpsDep, host: HostDep, db: DatabaseDep,
                         settings: SettingsDep,
                         body: Annotated[CapsuleCreate | None, Body()] = None) -> CapsuleOut:
    """Answers once the VM is running (201 `running`), or 502 if the host agent failed; a boot
    longer than the create wait setting answers 201 `starting` and goes on (poll GET).
    403 `forbidden` past a team quota; 503 `host_unavailable` when the host lacks the memory or
    disk for it."""
    body = body or CapsuleCreate()
    network = egress_policy(body.allow_internet_access, body.network.allow_out if body.network else None,
                            body.network.deny_out if body.network else None)
    name = body.template if body.template is not None else DEFAULT_TEMPLATE
    builtin = {t.template_id: t for t in await host.builtin_templates()}
    builds = request.app.state.builds
    prepare = None
    if name in builds.builtin_names():  # built by a build on first use (code-runner-beta)
        template_id, vcpus, memory_mb = await builtin_build_shape(builds, name, body)
        prepare = functools.partial(builds.ensure_builtin, name)
    elif name in builtin:
        template_id = name
        vcpus = body.vcpus if body.vcpus is not None else DEFAULT_VCPUS
        memory_mb = body.memory_mb if body.memory_mb is not None else DEFAULT_MEMORY_MB
        try:  # the host's own check, asked before a row exists so a bad shape is a plain 400
            (await host.limits()).check(vcpus, memory_mb)
        except InvalidShape as exc:
            raise invalid(str(exc)) from None
    else:
        snap = await db.run(lambda s: s.scalar(select(Template).where(Template.team_id == team.id,
                                                                      Template.name == name)))
        if snap is None:
            raise invalid(f"template {short(name)} does not exist")
        # A snapshot holds a running VM's memory: its shape is fixed.
        for field, fixed in (("vcpus", snap.vcpus), ("memory_mb", snap.memory_mb)):
            asked = getattr(body, field)
            if asked is not None and asked != fixed:
                raise invalid(f"template {short(name)} is a snapshot with {field}={fixed}; it cannot be changed "
                              f"(got {asked}); omit {field}")
        template_id, vcpus, memory_mb = snap.id, snap.vcpus, snap.memory_mb
    await host_room(host, settings, memory_mb)
    # the team's quotas: checked in the transaction that writes the row (limits.py)
    row = await ops.create(team.id, template=name, template_id=template_id, vcpus=vcpus, memory_mb=memory_mb,
                           timeout_sec=body.timeout_sec or 0, labels=body.metadata or {}, network=network,
                           prepare=prepare, quotas=settings)
    return CapsuleOut.of(row)


@router.get("/capsules", response_model=list[CapsuleOut], responses={400: {"model": ErrorBody}},
            openapi_extra=listing.OPENAPI)
async def list_capsules(team: CurrentTeam, db: DatabaseDep, response: Response,
                        status: listing.StatusFilter = None, metadata: listing.MetadataFilter = None,
                        limit: listing.Limit = None, next: listing.Cursor = None) -> list[CapsuleOut]:  # noqa: A002
    """The team's capsules, stopped ones included (until purged, WRENN_STOPPED_RETENTION_SEC),
    newest first. Optional filters: `status` and `metadata=key=value` (each repeatable: any of
    the statuses, all of the labels). With `limit`, one page: the `X-Next-Token` response header
    then holds the cursor of the next page (pass it as `next`); absent on the last page."""
    rows, cursor = await db.run(listing.page, team.id, status, metadata, limit, next)
    if cursor is not None:
        response.headers[listing.NEXT_HEADER] = cursor
    return rows


@router.get("/capsules/{capsule_id}", response_model=CapsuleDetail, responses={404: {"model": ErrorBody}})
async def get_capsule(capsule: TeamCapsule, ops: OpsDep, db: DatabaseDep) -> CapsuleDetail:
    if liveness.is_offline(capsule.host_id):  # (shown `missing`: is its host still offline?)
        await db.run(liveness.confirm, [capsule.host_id])
    disk = await ops.disk.of(capsule)
    return CapsuleDetail.of(capsule, **disk)  # type: ignore[return-value]


@router.delete("/capsules/{capsule_id}", status_code=204, response_class=Response,
               responses={404: {"model": ErrorBody}, 502: {"model": ErrorBody}})
async def destroy_capsule(capsule: TeamCapsule, ops: OpsDep) -> Response:
    """Any state; the row stays, listed as `stopped`."""
    await ops.destroy(capsule.id)
    return Response(status_code=204)


@router.post("/capsules/{capsule_id}/pause", response_model=CapsuleOut,
             responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}, 502: {"model": ErrorBody}})
async def pause_capsule(capsule: TeamCapsule, ops: OpsDep) -> CapsuleOut:
    if not await ops.pause(capsule.id):
        raise invalid_state(f"capsule is {await ops.status(capsule.id)}; only running capsules can be paused")
    return CapsuleOut.of(await ops.get_for_team(capsule.team_id, capsule.id))


@router.post("/capsules/{capsule_id}/resume", response_model=CapsuleOut,
             responses={403: {"model": ErrorBody}, 404: {"model": ErrorBody}, 409: {"model": ErrorBody},
                        502: {"model": ErrorBody}, 503: {"model": ErrorBody}})
async def resume_capsule(capsule: TeamCapsule, ops: OpsDep, host: HostDep, settings: SettingsDep) -> CapsuleOut:
    if capsule.status == "paused":  # (else the resume below answers 409)
        await host_room(host, settings, capsule.memory_mb)
    # the team's quotas: checked in the transaction of the transition (limits.py)
    if not await ops.resume(capsule.id, quotas=settings):
        raise invalid_state(f"capsule is {await ops.status(capsule.id)}; only paused capsules can be resumed")
    return CapsuleOut.of(await ops.get_for_team(capsule.team_id, capsule.id))


@router.post("/capsules/{capsule_id}/ping", status_code=204, response_class=Response,
             responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}})
async def ping_capsule(capsule: TeamCapsule, ops: OpsDep) -> Response:
    """Resets the inactivity timer."""
    if not await ops.touch(capsule.id):
        raise invalid_state(f"capsule is {await ops.status(capsule.id)}; only running capsules can be pinged")
    return Response(status_code=204)


@router.patch("/capsules/{capsule_id}/network", response_model=CapsuleOut,
              responses={400: {"model": ErrorBody}, 404: {"model": ErrorBody}, 409: {"model": ErrorBody},
                         502: {"model": ErrorBody}})
async def update_network(capsule: TeamCapsule, ops: OpsDep, body: NetworkUpdate) -> CapsuleOut:
    """Change the egress rules of a running or paused capsule, without a restart. Omitted fields
    keep their value; new connections follow the new rules at once."""
    current = (capsule.egress or {})
    rules = body.network
    policy = egress_policy(
        body.allow_internet_access if body.allow_internet_access is not None else capsule.allow_internet_access,
        rules.allow_out if rules is not None and rules.allow_out is not None else current.get("allow_out"),
        rules.deny_out if rules is not None and rules.deny_out is not None else current.get("deny_out"))
    return CapsuleOut.of(await ops.update_network(capsule, policy))


def egress_policy(allow_internet_access: bool | None, allow_out: list[str] | None,
                  deny_out: list[str] | None) -> EgressPolicy:
    try:
        return EgressPolicy.parse(allow_internet_access, allow_out, deny_out)
    except InvalidPolicy as exc:
        raise invalid(str(exc)) from exc
