"""Control plane accounts: signup / login (JWT), /me, API keys, teams and members."""

from __future__ import annotations

import os
import re
import stat
import time

import pytest

from wrenn_control.auth import decode_jwt, encode_jwt, hash_password, verify_password

from .fake_host_agent import assert_error, make_settings, running_app

KEY_RE = re.compile(r"^wrn_[0-9a-f]{32}$")


@pytest.fixture
async def h(tmp_path):
    async with running_app(make_settings(tmp_path)) as harness:
        yield harness


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def signup(h, email: str, password: str = "correct horse", **extra) -> dict:
    async with h.client_for(None) as anon:
        resp = await anon.post("/v1/auth/signup", json={"email": email, "password": password, **extra})
    assert resp.status_code == 201, resp.text
    return resp.json()


async def login(h, email: str, password: str = "correct horse", **extra) -> str:
    async with h.client_for(None) as anon:
        resp = await anon.post("/v1/auth/login", json={"email": email, "password": password, **extra})
    assert resp.status_code == 200, resp.text
    return resp.json()["token"]


def test_password_hash_and_jwt_roundtrip():
    stored = hash_password("s3cret-pass")
    assert stored.startswith("scrypt$") and "s3cret" not in stored
    assert stored != hash_password("s3cret-pass")  # per-user salt
    assert verify_password("s3cret-pass", stored) and not verify_password("other", stored)
    token = encode_jwt("k", "user-1", "team-1")
    claims = decode_jwt("k", token)
    assert claims["sub"] == "user-1" and claims["team"] == "team-1"
    assert claims["exp"] - claims["iat"] == 24 * 3600


async def test_signup_login_me(h):
    out = await signup(h, "Alice@Example.com", team_name="alice's")
    assert set(out) == {"token", "user", "team"}
    assert out["user"]["email"] == "alice@example.com" and out["user"]["id"].startswith("user-")
    assert out["team"]["name"] == "alice's" and out["team"]["role"] == "owner"
    for token in (out["token"], await login(h, "ALICE@example.com ")):
        resp = await h.client.get("/v1/me", headers=bearer(token))
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["user"] == out["user"] and body["team"] == out["team"]
    assert "password" not in str(body) and "hash" not in str(body)
    # the secret was made once, private
    secret = h.settings.data_dir / "jwt.secret"
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600


async def test_bad_credentials_and_duplicates(h):
    await signup(h, "bob@example.com")
    async with h.client_for(None) as anon:
        wrong = assert_error(await anon.post("/v1/auth/login", json={"email": "bob@example.com", "password": "nope nope"}),
                             401, "unauthorized")
        unknown = assert_error(await anon.post("/v1/auth/login", json={"email": "who@example.com", "password": "x"}),
                               401, "unauthorized")
        assert wrong["message"] == unknown["message"]
        assert_error(await anon.post("/v1/auth/signup", json={"email": "BOB@example.com", "password": "another one"}),
                     409, "conflict")
        assert_error(await anon.post("/v1/auth/signup", json={"email": "not-an-email", "password": "long enough"}),
                     400, "invalid_request")
        assert_error(await anon.post("/v1/auth/signup", json={"email": "c@example.com", "password": "short"}),
                     400, "invalid_request")
        assert_error(await anon.get("/v1/me"), 401, "unauthorized")
        assert_error(await anon.get("/v1/teams"), 401, "unauthorized")


async def test_tampered_and_expired_tokens(h):
    out = await signup(h, "carol@example.com")
    token = out["token"]
    header, payload, sig = token.split(".")
    secret = h.app.state.jwt_secret
    other = await signup(h, "dave@example.com")
    forged_payload = other["token"].split(".")[1]  # dave's claims under carol's signature
    expired = encode_jwt(secret, out["user"]["id"], out["team"]["id"], now=time.time() - 25 * 3600)
    wrong_key = encode_jwt("not-the-secret", out["user"]["id"], out["team"]["id"])
    flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    for bad in (f"{header}.{forged_payload}.{sig}", f"{header}.{payload}.{flipped}", expired, wrong_key,
                f"{header}.{payload}.", "garbage", token + ".x"):
        assert_error(await h.client.get("/v1/me", headers=bearer(bad)), 401, "unauthorized")
    assert "expired" in assert_error(await h.client.get("/v1/me", headers=bearer(expired)), 401, "unauthorized")["message"]
    # alg none is refused
    import base64
    import json
    none_header = base64.urlsafe_b64encode(json.dumps({"alg": "none"}).encode()).rstrip(b"=").decode()
    assert_error(await h.client.get("/v1/me", headers=bearer(f"{none_header}.{payload}.")), 401, "unauthorized")
    assert (await h.client.get("/v1/me", headers=bearer(token))).status_code == 200


async def test_api_keys_create_list_delete_and_revoke(h):
    out = await signup(h, "erin@example.com")
    auth = bearer(out["token"])
    async with h.client_for(None) as c:
        resp = await c.post("/v1/api-keys", json={"name": "ci"}, headers=auth)
        assert resp.status_code == 201, resp.text
        created = resp.json()
        assert set(created) == {"id", "name", "key", "prefix", "created_at"}
        assert KEY_RE.match(created["key"]) and created["key"].startswith(created["prefix"]) and created["name"] == "ci"
        listed = (await c.get("/v1/api-keys", headers=auth)).json()
        assert [k["id"] for k in listed] == [created["id"]] and "key" not in listed[0]
    # the new key works on capsule routes, for erin's team only
    async with h.client_for(created["key"]) as erin_key:
        assert (await erin_key.get("/v1/capsules")).json() == []
        # a team key may manage its own team's keys
        second = (await erin_key.post("/v1/api-keys", json={})).json()
        assert second["name"] == "default"
        assert {k["id"] for k in (await erin_key.get("/v1/api-keys")).json()} == {created["id"], second["id"]}
        resp = await erin_key.delete(f"/v1/api-keys/{second['id']}")
        assert resp.status_code == 204
        assert_error(await erin_key.delete(f"/v1/api-keys/{second['id']}"), 404, "not_found")
    async with h.client_for(second["key"]) as revoked:
        assert_error(await revoked.get("/v1/capsules"), 401, "unauthorized")
    async with h.client_for(None) as c:
        assert (await c.delete(f"/v1/api-keys/{created['id']}", headers=auth)).status_code == 204
        assert (await c.get("/v1/api-keys", headers=auth)).json() == []
    async with h.client_for(created["key"]) as revoked:
        assert_error(await revoked.get("/v1/capsules"), 401, "unauthorized")
    async with h.client_for(None) as anon:
        assert_error(await anon.get("/v1/api-keys"), 401, "unauthorized")


async def test_api_keys_are_isolated_per_team(h):
    out = await signup(h, "frank@example.com")
    auth = bearer(out["token"])
    # the bootstrap key's team: its keys are not frank's, and the other way round
    boot_keys = (await h.client.get("/v1/api-keys")).json()
    assert len(boot_keys) == 1 and boot_keys[0]["name"] == "bootstrap"
    async with h.client_for(None) as c:
        assert (await c.get("/v1/api-keys", headers=auth)).json() == []
        assert_error(await c.delete(f"/v1/api-keys/{boot_keys[0]['id']}", headers=auth), 404, "not_found")
        mine = (await c.post("/v1/api-keys", json={"name": "x"}, headers=auth)).json()
    assert_error(await h.client.delete(f"/v1/api-keys/{mine['id']}"), 404, "not_found")
    capsule = (await h.client.post("/v1/capsules", json={})).json()
    async with h.client_for(mine["key"]) as frank:
        assert_error(await frank.get(f"/v1/capsules/{capsule['id']}"), 404, "not_found")


async def test_teams_and_member_roles(h):
    owner = await signup(h, "olga@example.com")
    admin = await signup(h, "adam@example.com")
    member = await signup(h, "mia@example.com")
    o, a, m = (bearer(x["token"]) for x in (owner, admin, member))
    async with h.client_for(None) as c:
        resp = await c.post("/v1/teams", json={"name": "shared"}, headers=o)
        assert resp.status_code == 201, resp.text
        team = resp.json()
        assert team["role"] == "owner"
        tid = team["id"]
        assert [t["name"] for t in (await c.get("/v1/teams", headers=o)).json()] == ["olga@example.com", "shared"]
        url = f"/v1/teams/{tid}/members"
        # not a member: the team is not found
        assert_error(await c.get(url, headers=a), 404, "not_found")
        assert_error(await c.post(url, json={"email": "mia@example.com"}, headers=a), 404, "not_found")
        resp = await c.post(url, json={"email": "ADAM@example.com", "role": "admin"}, headers=o)
        assert resp.status_code == 201, resp.text
        assert resp.json()["role"] == "admin" and resp.json()["user_id"] == admin["user"]["id"]
        assert_error(await c.post(url, json={"email": "adam@example.com"}, headers=o), 409, "conflict")
        assert_error(await c.post(url, json={"email": "nobody@example.com"}, headers=o), 404, "not_found")
        # admins add members but not owners
        assert_error(await c.post(url, json={"email": "mia@example.com", "role": "owner"}, headers=a), 403, "forbidden")
        assert (await c.post(url, json={"email": "mia@example.com"}, headers=a)).status_code == 201
        members = {x["email"]: x["role"] for x in (await c.get(url, headers=m)).json()}
        assert members == {"olga@example.com": "owner", "adam@example.com": "admin", "mia@example.com": "member"}
        assert {t["id"]: t["role"] for t in (await c.get("/v1/teams", headers=m)).json()}[tid] == "member"
        # members may not add or remove others
        assert_error(await c.post(url, json={"email": "olga@example.com"}, headers=m), 403, "forbidden")
        assert_error(await c.delete(f"{url}/{admin['user']['id']}", headers=m), 403, "forbidden")
        assert_error(await c.delete(f"{url}/{owner['user']['id']}", headers=a), 403, "forbidden")
        # the last owner stays
        assert_error(await c.delete(f"{url}/{owner['user']['id']}", headers=o), 409, "conflict")
        assert (await c.delete(f"{url}/{member['user']['id']}", headers=a)).status_code == 204
        assert_error(await c.delete(f"{url}/{member['user']['id']}", headers=a), 404, "not_found")
        assert_error(await c.get(url, headers=m), 404, "not_found")
        # a token for the shared team: its keys are the team's; removal takes effect at once
        shared = await login(h, "adam@example.com", team_id=tid)
        key = (await c.post("/v1/api-keys", json={"name": "shared"}, headers=bearer(shared))).json()
        assert [k["id"] for k in (await c.get("/v1/api-keys", headers=bearer(owner["token"]))).json()] == []
        assert (await c.get("/v1/me", headers=bearer(shared))).json()["team"]["id"] == tid
        assert (await c.delete(f"{url}/{admin['user']['id']}", headers=o)).status_code == 204
        assert (await c.get("/v1/me", headers=bearer(shared))).json()["team"] is None
        assert_error(await c.get("/v1/api-keys", headers=bearer(shared)), 403, "forbidden")
        async with h.client_for(None) as anon:
            assert_error(await anon.post("/v1/auth/login", json={"email": "adam@example.com", "password": "correct horse",
                                                                 "team_id": tid}), 404, "not_found")
        # a second owner can be removed, then the last one cannot
        assert (await c.post(url, json={"email": "mia@example.com", "role": "owner"}, headers=o)).status_code == 201
        assert (await c.delete(f"{url}/{owner['user']['id']}", headers=o)).status_code == 204  # leaves
        assert_error(await c.delete(f"{url}/{member['user']['id']}", headers=m), 409, "conflict")
    async with h.client_for(key["key"]) as team_key:
        assert (await team_key.get("/v1/capsules")).status_code == 200


async def test_jwt_secret_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WRENN_JWT_SECRET", "from-env-secret")
    async with running_app(make_settings(tmp_path)) as h:
        out = await signup(h, "env@example.com")
        assert decode_jwt("from-env-secret", out["token"])["sub"] == out["user"]["id"]
        assert not (tmp_path / "jwt.secret").exists()


async def test_capsule_routes_take_a_bearer_token_too(h):
    out = await signup(h, "gina@example.com")
    async with h.client_for(None) as c:
        resp = await c.post("/v1/capsules", json={}, headers=bearer(out["token"]))
        assert resp.status_code == 201, resp.text
        cid = resp.json()["id"]
        assert [x["id"] for x in (await c.get("/v1/capsules", headers=bearer(out["token"]))).json()] == [cid]
        assert_error(await c.get("/v1/capsules", headers=bearer("garbage")), 401, "unauthorized")
    assert_error(await h.client.get(f"/v1/capsules/{cid}"), 404, "not_found")  # not the bootstrap team's
