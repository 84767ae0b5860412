"""GET /v1/capsules filters and pages (E2B's list does the same): `status` and `metadata`
(key=value) filters, each repeatable, and keyset pages of `limit` rows, the next page's cursor in
the `X-Next-Token` response header. Without any of them the answer is the spec's: every capsule,
newest first, as a plain array.

The cursor is the (created_at, seq) of the last row given, so a page never repeats or skips a
row when capsules are created or purged meanwhile. Metadata is matched in Python (a JSON column
is not portably queryable); rows are read in batches and the scan stops once the page is full.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Query
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from wrenn_control.db.models import Capsule
from wrenn_control.errors import invalid, short
from wrenn_control.lifecycle import Status
from wrenn_control.schemas import METADATA_KEY_PATTERN, CapsuleOut

NEXT_HEADER = "X-Next-Token"
MAX_LIMIT = 1000
_BATCH = 200

StatusName = Literal[tuple(s.value for s in Status)]  # type: ignore[valid-type]
StatusFilter = Annotated[list[StatusName] | None, Query(description="Only capsules in one of these statuses.")]
MetadataFilter = Annotated[list[Annotated[str, Query(pattern=METADATA_KEY_PATTERN[:-1] + "=.{0,64}$")]] | None, Query(
    description="key=value: only capsules whose metadata has that label (all of those given).")]
Limit = Annotated[int | None, Query(ge=1, le=MAX_LIMIT, description=f"Page size (1-{MAX_LIMIT}).")]
Cursor = Annotated[str | None, Query(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_-]+=*$",
                                     description=f"The {NEXT_HEADER} header of the previous page.")]

OPENAPI: dict[str, Any] = {"responses": {"200": {"headers": {NEXT_HEADER: {
    "description": "Cursor of the next page (pass it as `next`); only with `limit`, absent on the last page.",
    "schema": {"type": "string"}}}}}}


def encode_cursor(row: Capsule) -> str:
    raw = json.dumps([row.created_at.isoformat(), row.seq]).encode()
    return base64.urlsafe_b64encode(raw).decode()


def decode_cursor(token: str) -> tuple[datetime, int]:
    try:
        created, seq = json.loads(base64.urlsafe_b64decode(token.encode()))
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise ValueError
        return datetime.fromisoformat(created), seq
    except (ValueError, TypeError, binascii.Error):
        raise invalid(f"next: not a cursor from {NEXT_HEADER}: {short(token)}") from None


def _labels(pairs: list[str] | None) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise invalid(f"metadata: expected key=value, got {short(pair)}")
        labels[key] = value
    return labels


def page(session: Session, team_id: str, statuses: list[str] | None, metadata: list[str] | None,
         limit: int | None, cursor: str | None) -> tuple[list[CapsuleOut], str | None]:
    """One page (every match when `limit` is None) and the next page's cursor (None: no more)."""
    labels = _labels(metadata)
    query = select(Capsule).where(Capsule.team_id == team_id)
    if statuses:
        query = query.where(Capsule.status.in_(statuses))
    if cursor is not None:
        created, seq = decode_cursor(cursor)
        query = query.where(or_(Capsule.created_at < created,
                                and_(Capsule.created_at == created, Capsule.seq < seq)))
    query = query.order_by(Capsule.created_at.desc(), Capsule.seq.desc())
    out: list[CapsuleOut] = []
    last: Capsule | None = None
    for row in session.scalars(query.execution_options(yield_per=_BATCH)):
        item = CapsuleOut.of(row)
        if any(item.metadata.get(k) != v for k, v in labels.items()):
            continue
        if limit is not None and len(out) == limit:
            return out, encode_cursor(last) if last is not None else None
        out.append(item)
        last = row
    return out, None
