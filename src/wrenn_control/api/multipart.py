"""Streaming multipart/form-data parsing: parts are yielded as they arrive, so an upload can be
forwarded to the guest (or counted against a limit) without first landing whole in memory."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

from python_multipart.multipart import MultipartParser, parse_options_header

from wrenn_control.errors import APIError, invalid


@dataclasses.dataclass
class PartStart:
    name: str
    filename: str | None  # None for a plain field


@dataclasses.dataclass
class PartData:
    data: bytes


@dataclasses.dataclass
class PartEnd:
    pass


Event = PartStart | PartData | PartEnd


def is_multipart(content_type: str | None) -> bool:
    kind, _ = parse_options_header(content_type or "")
    return kind == b"multipart/form-data"


async def iter_multipart(content_type: str | None, stream: AsyncIterator[bytes]) -> AsyncIterator[Event]:
    _, params = parse_options_header(content_type or "")
    boundary = params.get(b"boundary")
    if not boundary:
        raise invalid("multipart body without a boundary")

    events: list[Event] = []
    headers: dict[bytes, bytes] = {}
    field = bytearray()
    value = bytearray()
    finished = False

    def on_part_begin() -> None:
        headers.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        value.extend(data[start:end])

    def on_header_end() -> None:
        headers[bytes(field).lower()] = bytes(value)
        field.clear()
        value.clear()

    def on_headers_finished() -> None:
        _, options = parse_options_header(headers.get(b"content-disposition", b""))
        if b"name" not in options:
            raise invalid('multipart part without a Content-Disposition "name"')
        filename = options.get(b"filename")
        events.append(PartStart(options[b"name"].decode("utf-8", "replace"),
                                filename.decode("utf-8", "replace") if filename is not None else None))

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if end > start:
            events.append(PartData(bytes(data[start:end])))

    def on_part_end() -> None:
        events.append(PartEnd())

    def on_end() -> None:
        nonlocal finished
        finished = True

    parser = MultipartParser(boundary, {  # type: ignore[arg-type]
        "on_part_begin": on_part_begin, "on_header_field": on_header_field,
        "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
        "on_part_end": on_part_end, "on_end": on_end,
    })
    async for chunk in stream:
        try:
            parser.write(chunk)
        except APIError:
            raise
        except Exception as exc:  # python-multipart's parse errors
            raise invalid(f"malformed multipart body: {exc}") from exc
        batch, events[:] = list(events), []
        for event in batch:
            yield event
    parser.finalize()
    for event in events:
        yield event
    if not finished:
        raise invalid("multipart body ended before its closing boundary")
