"""GET /v1/capsules filters and pages (E2B's list does the same): `status` and `metadata`
(key=value) filters, each repeatable, and keyset pages of `limit` rows, the next page's cursor in
the `X-Next-Token` response header. Without any of them the answer is the spec's: every capsule,
newest first, as a plain array.

Rows are ordered by `seq` (insertion order, never reused: newest first is creation order) and
the cursor is the seq of the last row given, so a page never repeats or skips a row when
capsules are created or purged meanwhile; any number is a valid cursor ("older than that"). Metadata is matched in Python (a JSON column
is not portably queryable); rows are read in batches and the scan stops once the page is full.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Query
from sqlalchemy import select
from sqlalchemy.orm import Session

from wrenn_control.db.models import Capsule
from wrenn_control.errors import invalid, short
from wrenn_control.hosts import liveness
from wrenn_control.lifecycle import Status
from wrenn_control.schemas import METADATA_KEY_PATTERN, CapsuleOut

NEXT_HEADER = "X-Next-Token"
MAX_LIMIT = 1000
_BATCH = 200

# (`missing`: a capsule of an offline host, hosts/liveness.py; its row keeps its own status)
StatusName = Literal[tuple(s.value for s in Status) + (liveness.MISSING,)]  # type: ignore[valid-type]
StatusFilter = Annotated[list[StatusName] | None, Query(description="Only capsules in one of these statuses.")]
MetadataFilter = Annotated[list[Annotated[str, Query(pattern=METADATA_KEY_PATTERN[:-1] + "=.{0,64}$")]] | None, Query(
    description="key=value: only capsules whose metadata has that label (all of those given).")]
Limit = Annotated[int | None, Query(ge=1, le=MAX_LIMIT, description=f"Page size (1-{MAX_LIMIT}).")]
Cursor = Annotated[str | None, Query(pattern=r"^[0-9]{1,18}$",
                                     description=f"The {NEXT_HEADER} header of the previous page.")]

OPENAPI: dict[str, Any] = {"responses": {"200": {"headers": {NEXT_HEADER: {
    "description": "Cursor of the next page (pass it as `next`); only with `limit`, absent on the last page.",
    "schema": {"type": "string"}}}}}}


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
    liveness.confirm(session)  # (so `missing` is what the hosts table says now)
    query = select(Capsule).where(Capsule.team_id == team_id)
    if statuses:
        stored = set(statuses) | (set(liveness.ON_HOST) if liveness.MISSING in statuses else set())
        query = query.where(Capsule.status.in_(sorted(stored)))
    if cursor is not None:
        query = query.where(Capsule.seq < int(cursor))
    query = query.order_by(Capsule.seq.desc())
    out: list[CapsuleOut] = []
    last: Capsule | None = None
    for row in session.scalars(query.execution_options(yield_per=_BATCH)):
        item = CapsuleOut.of(row)
        if any(item.metadata.get(k) != v for k, v in labels.items()) or (statuses and item.status not in statuses):
            continue
        if limit is not None and len(out) == limit:
            return out, str(last.seq) if last is not None else None
        out.append(item)
        last = row
    return out, None
