"""Template builds: `POST /v1/builds` (JSON, or multipart with a build-context tar), list, get,
cancel, and the live log as Server-Sent Events (`GET /v1/builds/{id}/logs`).

The template a build makes is the team's: listed by `GET /v1/snapshots`, deleted by
`DELETE /v1/snapshots/{name}`, named by the same rules.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from sqlalchemy import select

from wrenn_control.api.deps import CurrentTeam, DatabaseDep, HostDep
from wrenn_control.api.multipart import PartData, PartEnd, PartStart, is_multipart, iter_multipart
from wrenn_control.api.routes.snapshots import NAME_RE
from wrenn_control.api.routes.tickets import StreamTeam
from wrenn_control.builds.builtin import BUILTIN_BUILDS
from wrenn_control.builds.context import BuildContext
from wrenn_control.builds.manager import FINISHED, BuildStatus, Builds
from wrenn_control.builds.schemas import LIST_LOG_LINES, BuildCreate, BuildOut
from wrenn_control.builds.spec import BuildSpec, SpecError, parse_dockerfile, parse_recipe
from wrenn_control.db.models import Template
from wrenn_control.errors import APIError, validation_message, invalid, not_found
from wrenn_control.schemas import ErrorBody
from wrenn_host.api import HostAgent, InvalidShape, TemplateNotFound

router = APIRouter(tags=["builds"], responses={401: {"model": ErrorBody}})

MAX_CONTEXT_BYTES = 512 * 1024 * 1024
MAX_FIELD_BYTES = 1024 * 1024
DEFAULT_BASE = "minimal"


async def _builds(request: Request) -> Builds:
    return request.app.state.builds


BuildsDep = Annotated[Builds, Depends(_builds)]


async def reserved_names(host: HostAgent, builds: Builds) -> set[str]:
    """Names no team template may take: the built-in templates, images and built ones."""
    return {t.template_id for t in await host.builtin_templates()} | set(builds.builtin_names())


async def _read_body(request: Request, work_dir: Path) -> tuple[dict[str, Any], Path | None]:
    """The build's fields, and the context tar saved to a file (multipart part `context`)."""
    content_type = request.headers.get("content-type")
    if not is_multipart(content_type):
        try:
            body = json.loads(await request.body() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise invalid(f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise invalid("request body must be a JSON object")
        return body, None
    fields: dict[str, bytearray] = {}
    part: str | None = None
    tar_path: Path | None = None
    tar = None
    size = 0
    try:
        async for event in iter_multipart(content_type, request.stream()):
            if isinstance(event, PartStart):
                part = event.name
                if part == "context":
                    if tar is not None:
                        raise invalid("only one `context` part")
                    fd, name = tempfile.mkstemp(dir=work_dir, prefix="ctx-", suffix=".tar")
                    tar_path, tar = Path(name), open(fd, "wb")
                else:
                    fields[part] = bytearray()
            elif isinstance(event, PartData):
                if part == "context":
                    size += len(event.data)
                    if size > MAX_CONTEXT_BYTES:
                        raise APIError(413, "too_large", f"build context over {MAX_CONTEXT_BYTES // (1 << 20)} MiB")
                    tar.write(event.data)
                elif part is not None:
                    fields[part].extend(event.data)
                    if len(fields[part]) > MAX_FIELD_BYTES:
                        raise APIError(413, "too_large", f"multipart field {part!r} over 1 MiB")
            elif isinstance(event, PartEnd):
                part = None
    except BaseException:
        if tar is not None:
            tar.close()
        if tar_path is not None:
            tar_path.unlink(missing_ok=True)
        raise
    if tar is not None:
        tar.close()
    body: dict[str, Any] = {}
    if "build" in fields:  # the whole JSON body as one field
        try:
            body = json.loads(fields.pop("build"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise invalid("multipart field `build` is not valid JSON") from None
    for key, raw in fields.items():
        text = raw.decode("utf-8", "replace")
        if key == "recipe":
            body[key] = json.loads(text) if text.lstrip().startswith("[") else [ln for ln in text.splitlines() if ln.strip()]
        elif key in ("vcpus", "memory_mb"):
            body[key] = int(text) if text.strip().isdigit() else text
        else:
            body[key] = text
    return body, tar_path


def _parse(body: BuildCreate) -> BuildSpec:
    if (body.recipe is None) == (body.dockerfile is None):
        raise invalid("give exactly one of `recipe` (a list of steps) or `dockerfile`")
    try:
        if body.recipe is not None:
            return parse_recipe(body.recipe, body.healthcheck)
        return parse_dockerfile(body.dockerfile or "", body.healthcheck)
    except SpecError as exc:
        raise invalid(str(exc)) from None


async def _base(team_id: str, name: str, body: BuildCreate, host: HostAgent, builds: Builds,
                db: DatabaseDep) -> tuple[str, str, int | None, int | None, tuple[int, int]]:
    """(host template id, version, vcpus, memory_mb to create with, the shape the template gets)."""
    builtin = {t.template_id: t for t in await host.builtin_templates()}
    if name in builtin:
        vcpus, mem = body.vcpus or 1, body.memory_mb or 512
        try:
            (await host.limits()).check(vcpus, mem)
        except InvalidShape as exc:
            raise invalid(str(exc)) from None
        return name, builtin[name].version, vcpus, mem, (vcpus, mem)
    if name in builds.builtin_names():
        template_id, vcpus, mem = await builds.builtin_template_id(name), None, None
        shape = (BUILTIN_BUILDS[name].vcpus, BUILTIN_BUILDS[name].memory_mb)
    else:
        row = await db.run(lambda s: s.scalar(select(Template).where(Template.team_id == team_id,
                                                                     Template.name == name)))
        if row is None:
            raise invalid(f"base template {name!r} does not exist")
        template_id, shape = row.id, (row.vcpus, row.memory_mb)
    for field, fixed in zip(("vcpus", "memory_mb"), shape):
        asked = getattr(body, field)
        if asked is not None and asked != fixed:
            raise invalid(f"base template {name!r} is a snapshot with {field}={fixed}; omit {field}")
    return template_id, "", None, None, shape


@router.post("/builds", status_code=202, response_model=BuildOut, responses={
    400: {"model": ErrorBody}, 409: {"model": ErrorBody}, 413: {"model": ErrorBody}})
async def create_build(request: Request, team: CurrentTeam, host: HostDep, db: DatabaseDep,
                       builds: BuildsDep) -> BuildOut:
    """Starts the build and answers at once (status `pending`); follow it with GET or the log stream."""
    raw, tar_path = await _read_body(request, builds.work_dir)
    context = BuildContext(None)
    try:
        try:
            body = BuildCreate.model_validate(raw)
        except ValidationError as exc:
            raise invalid(validation_message(list(exc.errors()))) from None
        spec = _parse(body)
        if not NAME_RE.fullmatch(body.name):
            raise invalid(f"invalid template name {body.name!r}: use 1-63 of a-z, 0-9, '.', '_', '-', "
                          "starting with a letter or digit")
        if body.name in await reserved_names(host, builds):
            raise APIError(409, "name_reserved", f"{body.name!r} is the name of a built-in template")
        if await builds.name_in_use(team.id, body.name):
            raise APIError(409, "template_name_taken", f"a template named {body.name!r} already exists "
                           "(or is being built); delete it first or choose another name")
        base_name = spec.base_template or body.base_template or DEFAULT_BASE
        if base_name in builds.builtin_names():
            try:
                await host.template_info(await builds.builtin_template_id(base_name))
            except TemplateNotFound:
                raise invalid(f"base template {base_name!r} is not built on this host yet: create a capsule from "
                              f"it once, or run `wrenn images build --with {base_name}`") from None
        base_id, version, vcpus, mem, shape = await _base(team.id, base_name, body, host, builds, db)
        if tar_path is not None:
            try:
                context = BuildContext.from_tar(tar_path, builds.work_dir)
            except SpecError as exc:
                raise invalid(str(exc)) from None
        for i, step in enumerate(spec.steps):  # refuse missing COPY sources now, not mid-build
            if step.kind == "COPY":
                try:
                    context.sources(step.srcs, f"step {i + 1} ({step.text})")
                except SpecError as exc:
                    raise invalid(str(exc)) from None
        row = await builds.submit(team.id, name=body.name, base_name=base_name, base_template_id=base_id,
                                  base_version=version, spec=spec, vcpus=vcpus, memory_mb=mem, shape=shape,
                                  context=context)
    except BaseException:
        context.close()
        raise
    finally:
        if tar_path is not None:
            tar_path.unlink(missing_ok=True)
    return BuildOut.of(row, "")


@router.get("/builds", response_model=list[BuildOut])
async def list_builds(team: CurrentTeam, builds: BuildsDep) -> list[BuildOut]:
    """The team's builds, newest first; each with only the last lines of its log."""
    return [BuildOut.of(r, builds.logs_of(r), tail=LIST_LOG_LINES) for r in await builds.list(team.id)]


async def _team_build(team_id: str, build_id: str, builds: Builds):
    row = await builds.get(team_id, build_id)
    if row is None:
        raise not_found("build")
    return row


@router.get("/builds/{build_id}", response_model=BuildOut, responses={404: {"model": ErrorBody}})
async def get_build(build_id: str, team: CurrentTeam, builds: BuildsDep) -> BuildOut:
    row = await _team_build(team.id, build_id, builds)
    return BuildOut.of(row, builds.logs_of(row))


@router.post("/builds/{build_id}/cancel", response_model=BuildOut,
             responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}})
async def cancel_build(build_id: str, team: CurrentTeam, builds: BuildsDep) -> BuildOut:
    """Stops the build and destroys its build capsule before answering."""
    row = await _team_build(team.id, build_id, builds)
    if not await builds.cancel(row.id):
        row = await _team_build(team.id, build_id, builds)
        raise APIError(409, "invalid_state", f"build is {row.status}; only pending or running builds can be cancelled")
    row = await _team_build(team.id, build_id, builds)
    return BuildOut.of(row, builds.logs_of(row))


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


@router.get("/builds/{build_id}/logs", responses={
    200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}, 404: {"model": ErrorBody}})
async def stream_build_logs(build_id: str, team: StreamTeam, builds: BuildsDep) -> StreamingResponse:
    """The log as Server-Sent Events: `log` {data: text} (everything so far, then as it comes),
    `step` {current_step, total_steps}, and a last `end` event carrying the finished build.
    Takes `?ticket=` (POST /v1/auth/ticket) as well, for the browser's EventSource."""
    row = await _team_build(team.id, build_id, builds)

    async def events() -> AsyncIterator[bytes]:
        live = builds.live_log(row.id)
        if live is None or BuildStatus(row.status) in FINISHED:
            text = builds.logs_of(row)
            if text:
                yield _sse("log", {"data": text})
            # a stream that joins late still says how far the build got
            yield _sse("step", {"current_step": row.current_step, "total_steps": row.total_steps})
        else:
            async for kind, value in live.follow():
                if kind == "log":
                    yield _sse("log", {"data": value})
                else:
                    yield _sse("step", {"current_step": value[0], "total_steps": value[1]})
        final = await _team_build(team.id, build_id, builds)
        yield _sse("end", BuildOut.of(final, "", tail=0).model_dump(mode="json"))

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
