"""Files inside a capsule: write (multipart, capped), read (streamed), list, mkdir, remove, and
the unbuffered stream/write and stream/read for any size."""

from __future__ import annotations

import contextlib
import posixpath
import tempfile
from collections.abc import AsyncIterator
from typing import IO, Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from wrenn_control.api.deps import GatewayDep, SettingsDep, TeamCapsule
from wrenn_control.api.multipart import PartData, PartEnd, PartStart, is_multipart, iter_multipart
from wrenn_control.db.models import Capsule
from wrenn_control.errors import APIError, invalid
from wrenn_control.gateway import Guest, GuestGateway
from wrenn_control.schemas import ErrorBody, FileEntry, ListDirRequest, ListDirResponse, MkdirResponse, PathRequest

router = APIRouter(tags=["files"], responses={
    401: {"model": ErrorBody}, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}, 502: {"model": ErrorBody}})

MIB = 1024 * 1024
MAX_FIELD_BYTES = 64 * 1024  # the `path` form field
MULTIPART_SLACK = 64 * 1024
NAME_MAX = 255  # bytes in one path component (Linux); longer ones cannot exist  # boundaries and part headers around the file in a Content-Length

_MULTIPART_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {"path": {"type": "string", "description": "destination (or ?path=); before the file part"},
                   "file": {"type": "string", "format": "binary"}}}}}}}
# (an empty raw body with ?path= is an empty file, so the body is not required)
_RAW_OR_MULTIPART_BODY: dict[str, Any] = {"requestBody": {"required": False, "content": {
    **_MULTIPART_BODY["requestBody"]["content"],
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}
QueryPath = Annotated[str | None, Query(min_length=1, description="Destination (alternative to the path field)")]


def guest_path(path: str) -> str:
    """The path as every guard below and the guest see it: no `.`/`..` parts, no repeated or
    trailing slashes (normpath keeps a leading `//`: `//` must not get past a guard for `/`).
    Relative paths stay relative: the guest takes them from its home directory."""
    if "\x00" in path:
        raise invalid("path must not contain NUL characters")
    if any(len(part.encode("utf-8", "surrogatepass")) > NAME_MAX for part in path.split("/")):
        raise invalid(f"a path component is longer than {NAME_MAX} bytes")
    norm = posixpath.normpath(path)
    return "/" + norm.lstrip("/") if norm.startswith("/") else norm


def _too_large(limit: int) -> APIError:
    return APIError(413, "too_large", f"file is larger than {limit} bytes; use files/stream/write")


async def _spooled(spool: IO[bytes]) -> AsyncIterator[bytes]:
    spool.seek(0)
    while chunk := spool.read(MIB):
        yield chunk


@router.post("/capsules/{capsule_id}/files/write", status_code=204, response_class=Response,
             openapi_extra=_MULTIPART_BODY, responses={400: {"model": ErrorBody}, 413: {"model": ErrorBody}})
async def write_file(capsule: TeamCapsule, request: Request, gateway: GatewayDep,
                     settings: SettingsDep, path: QueryPath = None) -> Response:
    """Multipart fields `path` and `file`. The upload is received whole (spooled to disk past
    1 MiB) before it is written, so a file over the cap (100 MiB) is refused with 413 and nothing
    is written."""
    async with gateway.open(capsule) as guest:
        await _write_whole(guest, request, settings.max_upload_bytes, path)
    return Response(status_code=204)


async def _write_whole(guest: Guest, request: Request, limit: int, path: str | None) -> None:
    """Receive the multipart upload whole (or refuse it), then write it."""
    content_type = request.headers.get("content-type")
    if not is_multipart(content_type):
        raise invalid("files/write expects multipart/form-data with fields path and file")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + MULTIPART_SLACK:
        raise _too_large(limit)  # refuse before reading anything
    with tempfile.SpooledTemporaryFile(max_size=MIB) as spool:
        fields: dict[str, bytearray] = {}
        part: str | None = None
        got_file = False
        size = 0
        async for event in iter_multipart(content_type, request.stream()):
            if isinstance(event, PartStart):
                part = event.name
                if part == "file":
                    if got_file:
                        raise invalid("only one file per request")
                    got_file = True
                elif part == "path":
                    fields[part] = bytearray()
            elif isinstance(event, PartData):
                if part == "file":
                    size += len(event.data)
                    if size > limit:
                        raise _too_large(limit)
                    spool.write(event.data)
                elif part == "path":
                    fields[part].extend(event.data)
                    if len(fields[part]) > MAX_FIELD_BYTES:
                        raise invalid("path field too long")
            elif isinstance(event, PartEnd):
                part = None
        target = fields["path"].decode("utf-8", "replace") if "path" in fields else path
        if not target:
            raise invalid("missing form field: path")
        target = guest_path(target)
        if not got_file:
            raise invalid("missing form field: file")
        await guest.write_file(target, _spooled(spool))


@router.post("/capsules/{capsule_id}/files/stream/write", status_code=204, response_class=Response,
             openapi_extra=_RAW_OR_MULTIPART_BODY, responses={400: {"model": ErrorBody}})
async def stream_write_file(capsule: TeamCapsule, request: Request, gateway: GatewayDep,
                            path: QueryPath = None) -> Response:
    """Unbuffered upload of any size, forwarded to the guest as it arrives. Either multipart (the
    `path` field must come before `file`, as the SDK sends it) or a raw body with `?path=`."""
    async with gateway.open(capsule) as guest:
        content_type = request.headers.get("content-type")
        if not is_multipart(content_type):
            if not path:
                raise invalid("a raw upload needs the destination as ?path=")
            await guest.write_file(guest_path(path), request.stream())
            return Response(status_code=204)

        events = iter_multipart(content_type, request.stream())
        field = bytearray()
        part: str | None = None
        async for event in events:
            if isinstance(event, PartStart):
                part = event.name
                if part == "file":
                    break
            elif isinstance(event, PartData) and part == "path":
                field.extend(event.data)
                if len(field) > MAX_FIELD_BYTES:
                    raise invalid("path field too long")
        if part != "file":
            raise invalid("missing form field: file")
        target = field.decode("utf-8", "replace") if field else path
        if not target:
            raise invalid("missing form field: path (it must come before the file part)")
        target = guest_path(target)

        async def file_bytes() -> AsyncIterator[bytes]:
            async for item in events:
                if isinstance(item, PartData):
                    yield item.data
                elif isinstance(item, PartEnd):
                    return

        await guest.write_file(target, file_bytes())
        async for _ in events:  # the rest of the body (and the check of its closing boundary)
            pass
    return Response(status_code=204)


async def _read(capsule: Capsule, path: str, gateway: GuestGateway) -> StreamingResponse:
    async with gateway.open(capsule) as guest:
        # (the stream keeps the capsule busy until the response body has been sent)
        stream = guest.read_file(guest_path(path))
        # Pull the first chunk before answering, so that a missing file is a 404, not a broken 200.
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            first = b""

    async def body() -> AsyncIterator[bytes]:
        async with contextlib.aclosing(stream):  # a client that leaves ends the guest's read too
            if first:
                yield first
            async for chunk in stream:
                yield chunk

    return StreamingResponse(body(), media_type="application/octet-stream")


_BYTES = {200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


@router.post("/capsules/{capsule_id}/files/read", response_class=StreamingResponse, responses=_BYTES)
async def read_file(capsule: TeamCapsule, body: PathRequest, gateway: GatewayDep) -> StreamingResponse:
    return await _read(capsule, body.path, gateway)


@router.post("/capsules/{capsule_id}/files/stream/read", response_class=StreamingResponse, responses=_BYTES)
async def stream_read_file(capsule: TeamCapsule, body: PathRequest, gateway: GatewayDep) -> StreamingResponse:
    return await _read(capsule, body.path, gateway)


@router.post("/capsules/{capsule_id}/files/list", response_model=ListDirResponse)
async def list_dir(capsule: TeamCapsule, body: ListDirRequest, gateway: GatewayDep) -> ListDirResponse:
    depth = max(body.depth or 1, 1)
    async with gateway.open(capsule) as guest:
        entries = await guest.list_dir(guest_path(body.path), depth)
    return ListDirResponse(entries=[FileEntry.of(e) for e in entries])


@router.post("/capsules/{capsule_id}/files/mkdir", response_model=MkdirResponse)
async def make_dir(capsule: TeamCapsule, body: PathRequest, gateway: GatewayDep) -> MkdirResponse:
    """Creates parents too; an existing directory is fine."""
    async with gateway.open(capsule) as guest:
        entry = await guest.mkdir(guest_path(body.path))
    return MkdirResponse(entry=FileEntry.of(entry))


@router.post("/capsules/{capsule_id}/files/remove", status_code=204, response_class=Response)
async def remove(capsule: TeamCapsule, body: PathRequest, gateway: GatewayDep) -> Response:
    """A file, a symlink, or a directory with everything in it."""
    async with gateway.open(capsule) as guest:
        path = guest_path(body.path)
        if path == "/":
            raise invalid("refusing to remove /")
        await guest.remove(path)
    return Response(status_code=204)
