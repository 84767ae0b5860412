"""Accounts: password hashing (scrypt) and HS256 JWTs, with the standard library only."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from wrenn_control.config import Settings

TOKEN_TTL_SEC = 24 * 3600
JWT_SECRET_FILE = "jwt.secret"

# scrypt cost: n=2**14, r=8, p=1 (16 MiB, tens of milliseconds).
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
_SCRYPT_MAXMEM = 64 * 1024 * 1024


class InvalidToken(Exception):
    pass


# ---- passwords -------------------------------------------------------------------------------


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=_SCRYPT_MAXMEM, dklen=32)


def hash_password(password: str) -> str:
    """`scrypt$n$r$p$salt$hash` (hex), with a fresh per-user salt."""
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, _SCRYPT_N, _SCRYPT_R, _SCRYPT_P)
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        computed = _scrypt(password, bytes.fromhex(salt), int(n), int(r), int(p))
        return hmac.compare_digest(computed, bytes.fromhex(digest))
    except ValueError:
        return False


@functools.cache
def _dummy_hash() -> str:
    return hash_password(secrets.token_hex(16))


def burn_password_check(password: str) -> None:
    """Checked when the email is unknown, so that both failures take about as long."""
    verify_password(password, _dummy_hash())


# ---- JWT (HS256) -----------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not text or not all(c.isalnum() or c in "-_" for c in text):
        raise InvalidToken("malformed token")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError as exc:
        raise InvalidToken("malformed token") from exc


def _sign(secret: str, signing_input: str) -> bytes:
    return hmac.new(secret.encode("utf-8"), signing_input.encode("ascii"), hashlib.sha256).digest()


def encode_jwt(secret: str, user_id: str, team_id: str | None, now: float | None = None,
               ttl_sec: int = TOKEN_TTL_SEC) -> str:
    iat = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"sub": user_id, "team": team_id, "iat": iat, "exp": iat + ttl_sec}
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{header}.{payload}"
    return f"{signing_input}.{_b64(_sign(secret, signing_input))}"


def decode_jwt(secret: str, token: str, now: float | None = None) -> dict[str, Any]:
    """The claims of a valid, unexpired token signed with `secret`; else InvalidToken."""
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidToken("malformed token")
    header_b64, payload_b64, sig_b64 = parts
    if not hmac.compare_digest(_unb64(sig_b64), _sign(secret, f"{header_b64}.{payload_b64}")):
        raise InvalidToken("invalid token signature")
    try:
        header = json.loads(_unb64(header_b64))
        claims = json.loads(_unb64(payload_b64))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidToken("malformed token") from exc
    if not isinstance(header, dict) or header.get("alg") != "HS256" or not isinstance(claims, dict):
        raise InvalidToken("unsupported token")
    exp = claims.get("exp")
    if not isinstance(exp, int) or isinstance(exp, bool) or not isinstance(claims.get("sub"), str):
        raise InvalidToken("malformed token")
    if not (claims.get("team") is None or isinstance(claims["team"], str)):
        raise InvalidToken("malformed token")
    if exp <= (time.time() if now is None else now):
        raise InvalidToken("token expired")
    return claims


def load_jwt_secret(settings: Settings) -> str:
    """WRENN_JWT_SECRET if given; else `jwt.secret` in the data dir, made (0600) on first use."""
    if settings.jwt_secret:
        return settings.jwt_secret
    path = Path(settings.data_dir) / JWT_SECRET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        secret = path.read_text().strip()
        if not secret:
            raise RuntimeError(f"{path} is empty; delete it to make a new JWT secret") from None
        return secret
    secret = secrets.token_hex(32)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret
