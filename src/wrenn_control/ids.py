"""Identifiers and API keys: formats in one place."""

from __future__ import annotations

import hashlib
import secrets

_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def capsule_id() -> str:
    return "cl-" + "".join(secrets.choice(_BASE36) for _ in range(25))


def template_id() -> str:
    """Opaque host template id; user-facing names map to it per team."""
    return "tpl-" + secrets.token_hex(12)


def team_id() -> str:
    return "team-" + secrets.token_hex(8)


def api_key_id() -> str:
    return "key-" + secrets.token_hex(8)


def new_api_key() -> str:
    return "wrn_" + secrets.token_hex(16)


def hash_api_key(key: str) -> str:
    # Keys are 128 random bits, so a plain (unsalted) sha256 is enough and allows an indexed lookup.
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_prefix(key: str) -> str:
    """What may be shown of a key after creation (e.g. in a key list)."""
    return key[:12]


def user_id() -> str:
    return "user-" + secrets.token_hex(8)
