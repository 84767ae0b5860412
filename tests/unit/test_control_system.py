"""Control plane: health, auth, error shapes, OpenAPI, bootstrap, server entry point, migrations."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from wrenn_control import ids
from wrenn_control.bootstrap import bootstrap, create_team
from wrenn_control.db.models import ApiKey, Base, Team
from wrenn_host.api import HostAgentError

from .fake_host_agent import FakeHostAgent, assert_error, make_settings, running_app

KEY_RE = re.compile(r"^wrn_[0-9a-f]{32}$")


@pytest.fixture
async def h(tmp_path):
    async with running_app(make_settings(tmp_path)) as harness:
        yield harness


async def test_health_is_unauthenticated(h):
    async with h.client_for(None) as anon:
        resp = await anon.get("/health")
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "ok" and body["accelerator"] == "tcg" and body["vmm"] == "qemu 7.2 (fake)"


async def test_health_when_host_fails(h):
    h.fake.fail("health", HostAgentError("agent gone"))
    err = assert_error(await h.client.get("/health"), 503, "host_unavailable")
    assert "agent gone" in err["message"]


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/capsules"), ("POST", "/v1/capsules"), ("GET", "/v1/capsules/cl-x"),
    ("DELETE", "/v1/capsules/cl-x"), ("POST", "/v1/capsules/cl-x/pause"), ("POST", "/v1/capsules/cl-x/exec"),
    ("POST", "/v1/capsules/cl-x/files/read"), ("GET", "/v1/snapshots"), ("POST", "/v1/snapshots"),
    ("DELETE", "/v1/snapshots/x"), ("GET", "/v1/events/stream"),
])
async def test_every_v1_route_needs_a_valid_key(h, method, path):
    async with h.client_for(None) as anon:
        err = assert_error(await anon.request(method, path), 401, "unauthorized")
        assert "X-API-Key" in err["message"]
    async with h.client_for("wrn_" + "0" * 32) as bad:
        assert_error(await bad.request(method, path), 401, "unauthorized")
    assert h.fake.ops("create") == []


async def test_error_shapes_for_framework_errors(h):
    err = assert_error(await h.client.get("/v1/nothing-here"), 404, "not_found")
    assert "/api/v1/nothing-here" in err["message"]
    assert_error(await h.client.get("/elsewhere"), 404, "not_found")
    resp = await h.client.put("/v1/capsules")
    assert_error(resp, 405, "method_not_allowed")
    assert resp.headers["allow"]
    assert_error(await h.client.post("/v1/capsules", content=b"{", headers={"content-type": "application/json"}),
                 400, "invalid_request")


async def test_openapi_and_docs(h):
    spec = (await h.client.get("/openapi.json")).json()
    assert "/api/v1/capsules" in spec["paths"] and "/api/health" in spec["paths"]
    assert "/api/v1/capsules/{capsule_id}/files/write" in spec["paths"]
    assert "X-API-Key" in str(spec["components"]["securitySchemes"])
    docs = await h.client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


async def test_only_the_key_hash_is_stored(h):
    with h.app.state.db.session() as s:
        rows = s.scalars(select(ApiKey)).all()
    assert [r.key_hash for r in rows] == [ids.hash_api_key(h.key)]
    assert all(h.key not in (r.key_hash, r.prefix, r.name) for r in rows)
    assert rows[0].prefix == h.key[:12]


async def test_generated_bootstrap_key_is_shown_once(tmp_path):
    settings = make_settings(tmp_path, bootstrap_api_key=None)
    async with running_app(settings) as h:
        key = h.app.state.bootstrap_key
        assert KEY_RE.match(key)
        assert (await h.client.get("/v1/capsules")).status_code == 200
    async with running_app(settings) as h2:  # restart: no new key; the old one still works
        assert h2.app.state.bootstrap_key is None
        async with h2.client_for(key) as c:
            assert (await c.get("/v1/capsules")).status_code == 200


async def test_operator_key_is_registered_not_printed(tmp_path):
    settings = make_settings(tmp_path, bootstrap_api_key="wrn_" + "ab" * 16)
    async with running_app(settings) as h:
        assert h.app.state.bootstrap_key is None
        assert (await h.client.get("/v1/capsules")).status_code == 200
    # a second operator key on an existing DB is added to the same (default) team
    settings2 = make_settings(tmp_path, bootstrap_api_key="wrn_" + "cd" * 16)
    async with running_app(settings2) as h:
        with h.app.state.db.session() as s:
            assert len(s.scalars(select(Team)).all()) == 1
            assert len(s.scalars(select(ApiKey)).all()) == 2


def test_bootstrap_from_env(tmp_path, monkeypatch, database_url):
    from wrenn_control.config import Settings

    monkeypatch.setenv("WRENN_BOOTSTRAP_API_KEY", "wrn_" + "12" * 16)
    settings = Settings(data_dir=tmp_path)
    assert settings.bootstrap_api_key == "wrn_" + "12" * 16
    # SQLite in the data dir by default, else WRENN_DATABASE_URL (see conftest.py)
    assert settings.database_url == database_url


async def test_create_team_helper_and_isolated_keys(h):
    team_id, key = create_team(h.app.state.db, "acme")
    assert KEY_RE.match(key) and team_id.startswith("team-")
    assert bootstrap(h.app.state.db, h.settings) is None  # idempotent


def test_server_run_prints_the_new_key_once(tmp_path, monkeypatch, capsys):
    import uvicorn

    from wrenn_control import server

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append((app, kw)))
    settings = make_settings(tmp_path, bootstrap_api_key=None)
    server.run("127.0.0.1", 18080, settings, FakeHostAgent())
    out = capsys.readouterr().out
    (line,) = [x for x in out.splitlines() if "API key" in x]
    assert re.fullmatch(r"API key \(shown once\): wrn_[0-9a-f]{32}", line)
    assert served and served[0][1]["port"] == 18080 and served[0][1]["host"] == "127.0.0.1"
    server.run("127.0.0.1", 18080, settings, FakeHostAgent())  # second start: nothing new to show
    assert "API key" not in capsys.readouterr().out


def test_migrations_match_the_models(database_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from wrenn_control.db.migrate import run_migrations
    from wrenn_control.db.session import Database

    db = Database(database_url)
    run_migrations(db)
    run_migrations(db)  # idempotent
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    db.dispose()
    assert diff == []
