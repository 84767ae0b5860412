"""Time in one place: the DB stores naive UTC, the API shows ISO 8601 with Z."""

from __future__ import annotations

from datetime import datetime, timezone


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def iso_z(value: datetime) -> str:
    """Whole seconds, as the spec's examples ("2024-11-01T10:00:05Z")."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
