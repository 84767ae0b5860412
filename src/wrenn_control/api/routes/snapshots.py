"""Snapshot templates: make one from a capsule, list (built-in + the team's), delete.

Users name templates; the host agent knows them by an opaque id (tpl-...) kept beside the name
in the `templates` table, so names are per team and can be reused after a delete.
"""

from __future__ import annotations

import logging
import re
import secrets
from typing import Literal

from fastapi import APIRouter, Request, Response
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from wrenn_control import ids
from wrenn_control.api.deps import CurrentTeam, DatabaseDep, EventsDep, HostDep, OpsDep
from wrenn_control.builds.builtin import BUILTIN_BUILDS
from wrenn_control.clock import utcnow
from wrenn_control.db.models import Template
from wrenn_control.errors import APIError, agent_error, invalid, not_found, short
from wrenn_control.events import TEMPLATE_SNAPSHOT_CREATE, TEMPLATE_SNAPSHOT_DELETE, payload
from wrenn_control.schemas import ErrorBody, SnapshotCreate, TemplateOut
from wrenn_host.api import HostAgentError, TemplateNotFound

log = logging.getLogger(__name__)
router = APIRouter(tags=["snapshots"], responses={401: {"model": ErrorBody}})

# Lowercase so that two names never differ by case only; 1-63 characters.
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


async def _builtin_names(request: Request, host: HostDep) -> set[str]:
    """Built-in templates: the host's images and those made by a build (code-runner-beta)."""
    return {t.template_id for t in await host.builtin_templates()} | set(BUILTIN_BUILDS)


def _out(row: Template) -> TemplateOut:
    return TemplateOut(name=row.name, type="snapshot", vcpus=row.vcpus, memory_mb=row.memory_mb,
                       size_bytes=row.size_bytes, created_at=row.created_at)


def _taken(name: str) -> APIError:
    return APIError(409, "template_name_taken", f"a template named {short(name)} already exists; "
                    "pass overwrite=true to replace it")


@router.post("/snapshots", status_code=201, response_model=TemplateOut, responses={
    400: {"model": ErrorBody}, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}, 502: {"model": ErrorBody}})
async def create_snapshot(request: Request, body: SnapshotCreate, team: CurrentTeam, ops: OpsDep, host: HostDep,
                          db: DatabaseDep, events: EventsDep, overwrite: bool = False) -> TemplateOut:
    """The capsule must be running or paused; it is left paused."""
    name = body.name if body.name is not None else f"template-{secrets.token_hex(4)}"
    if not NAME_RE.fullmatch(name):
        raise invalid(f"invalid template name {short(name)}: use 1-63 of a-z, 0-9, '.', '_', '-', "
                      "starting with a letter or digit")
    if name in await _builtin_names(request, host):
        raise APIError(409, "name_reserved", f"{name!r} is the name of a built-in template")
    capsule = await ops.get_for_team(team.id, body.sandbox_id)
    existing = await db.run(_named, team.id, name)
    if existing is not None and not overwrite:
        raise _taken(name)

    template_id = ids.template_id()
    try:
        runtime = await ops.snapshot(capsule.id, template_id)
    except APIError as exc:
        if exc.status >= 500:  # the host failed to make it (a refused request is no event)
            events.publish(TEMPLATE_SNAPSHOT_CREATE, team.id, payload(
                name, "template", outcome="error", error=exc.message, metadata={"sandbox_id": capsule.id}))
        raise
    row = Template(id=template_id, team_id=team.id, name=name, vcpus=runtime.vcpus, memory_mb=runtime.memory_mb,
                   size_bytes=runtime.size_bytes, source_capsule_id=capsule.id, created_at=utcnow())
    replaced: str | None = None
    try:
        replaced = await db.run(_record, row, overwrite)
    except IntegrityError:
        # Another request took the name while this snapshot was being made: drop ours.
        await _delete_host_template(host, template_id)
        raise _taken(name) from None
    if replaced is not None:
        await _delete_host_template(host, replaced)
    events.publish(TEMPLATE_SNAPSHOT_CREATE, team.id, payload(
        name, "template", outcome="success", metadata={"sandbox_id": capsule.id}))
    return _out(row)


def _named(s: Session, team_id: str, name: str) -> Template | None:
    return s.scalar(select(Template).where(Template.team_id == team_id, Template.name == name))


def _record(s: Session, row: Template, overwrite: bool) -> str | None:
    """Write the new template's row (in place of the one of that name, if `overwrite`): the id it
    replaced, if any."""
    replaced = None
    if overwrite:
        old = _named(s, row.team_id, row.name)
        if old is not None:
            replaced = old.id
            s.delete(old)
            s.flush()
    s.add(row)
    s.commit()
    return replaced


def _delete_row(s: Session, template_id: str) -> None:
    s.execute(delete(Template).where(Template.id == template_id))
    s.commit()


async def _delete_host_template(host: HostDep, template_id: str) -> None:
    try:
        await host.delete_template(template_id)
    except HostAgentError as exc:  # the record is gone either way; the files are the host's to sweep
        log.warning("could not delete host template %s: %s", template_id, exc)


@router.get("/snapshots", response_model=list[TemplateOut], responses={400: {"model": ErrorBody}})
async def list_snapshots(request: Request, team: CurrentTeam, db: DatabaseDep, host: HostDep,
                         type: Literal["base", "snapshot"] | None = None) -> list[TemplateOut]:
    """Built-in templates (type base) first, then the team's snapshots, newest first."""
    out: list[TemplateOut] = []
    if type in (None, "base"):
        out += [TemplateOut(name=t.template_id, type="base", vcpus=t.vcpus, memory_mb=t.memory_mb,
                            size_bytes=t.size_bytes, created_at=None) for t in await host.builtin_templates()]
        out += [TemplateOut(name=name, type="base", vcpus=b.vcpus, memory_mb=b.memory_mb, size_bytes=0, created_at=None)
                for name, b in BUILTIN_BUILDS.items()]
    if type in (None, "snapshot"):
        rows = await db.run(lambda s: s.scalars(select(Template).where(Template.team_id == team.id)
                                                .order_by(Template.created_at.desc(), Template.name)).all())
        out += [_out(r) for r in rows]
    return out


@router.delete("/snapshots/{name}", status_code=204, response_class=Response, responses={
    403: {"model": ErrorBody}, 404: {"model": ErrorBody}, 502: {"model": ErrorBody}})
async def delete_snapshot(request: Request, name: str, team: CurrentTeam, host: HostDep, db: DatabaseDep,
                          events: EventsDep) -> Response:
    if name in await _builtin_names(request, host):
        raise APIError(403, "forbidden", f"{name!r} is a built-in template and cannot be deleted")
    row = await db.run(_named, team.id, name)
    if row is None:
        raise not_found("template")
    try:
        await host.delete_template(row.id)
    except TemplateNotFound:
        pass  # already gone from the host: finish forgetting it
    except HostAgentError as exc:
        events.publish(TEMPLATE_SNAPSHOT_DELETE, team.id, payload(name, "template", outcome="error",
                                                                  error=exc.message))
        raise agent_error(exc) from exc
    await db.run(_delete_row, row.id)
    events.publish(TEMPLATE_SNAPSHOT_DELETE, team.id, payload(name, "template", outcome="success"))
    return Response(status_code=204)
