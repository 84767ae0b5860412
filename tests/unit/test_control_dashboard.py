"""The dashboard's server side: stream tickets (`POST /v1/auth/ticket`, `?ticket=`) and the static
files served at `/` (with the SPA fallback, and a page saying how to build them when missing)."""

from __future__ import annotations

import warnings

import pytest

from starlette.requests import Request

from wrenn_control.api.deps import team_for_api_key
from wrenn_control.api.routes.tickets import _stream_team
from wrenn_control.tickets import TICKET_TTL_SEC, InvalidTicket, TicketStore
from wrenn_control.web import NOT_BUILT

from .fake_host_agent import FakeHostAgent, assert_error, make_settings, running_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_ticket_store_single_use_and_expiry():
    clock = Clock()
    store = TicketStore(clock=clock)
    ticket = store.issue("team-a", {"type": "api_key", "id": "k1", "name": "default"})
    assert ticket.startswith("wrt_") and len(ticket) > 30
    assert ticket not in store._tickets
    grant = store.redeem(ticket)
    assert grant.team_id == "team-a" and grant.actor["id"] == "k1"
    with pytest.raises(InvalidTicket, match="already used"):
        store.redeem(ticket)
    late = store.issue("team-a")
    clock.now += TICKET_TTL_SEC - 1
    assert store.redeem(late).team_id == "team-a"  # still good just before the end
    late = store.issue("team-a")
    clock.now += TICKET_TTL_SEC
    with pytest.raises(InvalidTicket):
        store.redeem(late)
    with pytest.raises(InvalidTicket):
        store.redeem("wrt_made-up")
    assert len(store) == 0  # expired ones are swept


@pytest.fixture
async def h(tmp_path):
    async with running_app(make_settings(tmp_path)) as harness:
        yield harness


async def test_ticket_route_needs_auth_and_opens_the_event_stream_once(h):
    async with h.client_for(None) as anon:
        assert_error(await anon.post("/v1/auth/ticket"), 401, "unauthorized")
        resp = await h.client.post("/v1/auth/ticket")
        assert resp.status_code == 201, resp.text
        body = resp.json()
        assert set(body) == {"ticket", "expires_in"} and body["expires_in"] == TICKET_TTL_SEC
        # (the stream itself never ends, which the in-process transport cannot show: call its auth)
        request = Request({"type": "http", "app": h.app, "headers": []})
        team = await _stream_team(request, h.app.state.db, None, None, ticket=body["ticket"])
        assert team == await team_for_api_key(h.app.state.db, h.key)
        err = assert_error(await anon.get("/v1/events/stream", params={"ticket": body["ticket"]}), 401, "unauthorized")
        assert "already used" in err["message"]
        # A ticket is for streams only: the other routes still want a key or a token.
        other = (await h.client.post("/v1/auth/ticket")).json()["ticket"]
        assert_error(await anon.get("/v1/capsules", params={"ticket": other}), 401, "unauthorized")


def test_ticket_opens_a_pty_of_its_own_team_only(tmp_path):
    from wrenn_control.app import create_app
    from wrenn_control.bootstrap import create_team

    settings = make_settings(tmp_path)
    with TestClient(create_app(settings, FakeHostAgent())) as client:
        key = {"X-API-Key": settings.bootstrap_api_key}
        cid = client.post("/api/v1/capsules", json={}, headers=key).json()["id"]
        while client.get(f"/api/v1/capsules/{cid}", headers=key).json()["status"] != "running":
            pass
        ticket = client.post("/api/v1/auth/ticket", headers=key).json()["ticket"]
        with client.websocket_connect(f"/api/v1/capsules/{cid}/pty?ticket={ticket}") as ws:
            ws.send_json({"type": "start", "cols": 80, "rows": 24})
            assert ws.receive_json()["type"] == "started"
        # Used once: the same ticket is refused.
        with client.websocket_connect(f"/api/v1/capsules/{cid}/pty?ticket={ticket}") as ws:
            msg = ws.receive_json()
            assert msg["type"] == "error" and "already used" in msg["data"]
        # Another team's ticket does not reach this team's capsule.
        _, other_key = create_team(client.app.state.db, "other")
        theirs = client.post("/api/v1/auth/ticket", headers={"X-API-Key": other_key}).json()["ticket"]
        with client.websocket_connect(f"/api/v1/capsules/{cid}/exec/stream?ticket={theirs}") as ws:
            assert ws.receive_json() == {"type": "error", "data": "capsule not found"}


async def test_ticket_from_a_user_token(h):
    async with h.client_for(None) as anon:
        signup = await anon.post("/v1/auth/signup", json={"email": "a@example.com", "password": "correct horse"})
        token = signup.json()["token"]
        resp = await anon.post("/v1/auth/ticket", headers={"Authorization": f"Bearer {token}"})
        assert resp.status_code == 201, resp.text
        grant = h.app.state.tickets.redeem(resp.json()["ticket"])
        assert grant.team_id == signup.json()["team"]["id"] and grant.actor["type"] == "user"


# ---- static files --------------------------------------------------------------------------


async def test_dashboard_missing_build_says_how_to_build(h, tmp_path):
    h.app.router.default.directory = tmp_path / "nothing"
    async with h.client_for(None) as anon:
        resp = await anon.get("http://test/")
        assert resp.status_code == 503 and "scripts/setup.sh" in resp.text and resp.text == NOT_BUILT
        assert (await anon.get("/health")).status_code == 200  # the API does not care


async def test_dashboard_files_spa_fallback_and_api_404s(h, tmp_path):
    site = tmp_path / "site"
    (site / "assets").mkdir(parents=True)
    (site / "index.html").write_text("<!doctype html><title>Wrenn</title>")
    (site / "assets" / "app-1234.js").write_text("console.log(1)")
    (tmp_path / "secret.txt").write_text("no")
    h.app.router.default.directory = site
    async with h.client_for(None) as anon:
        root = await anon.get("http://test/")
        assert root.status_code == 200 and "<title>Wrenn</title>" in root.text
        assert root.headers["cache-control"] == "no-cache" and "default-src 'self'" in root.headers["content-security-policy"]
        for path in ("/capsules", "/capsules/cl-abc", "/keys"):  # the page routes in the browser
            resp = await anon.get(f"http://test{path}")
            assert resp.status_code == 200 and resp.text == root.text
        js = await anon.get("http://test/assets/app-1234.js")
        assert js.status_code == 200 and "javascript" in js.headers["content-type"]
        assert "immutable" in js.headers["cache-control"]
        assert_error(await anon.get("http://test/assets/gone-0000.js"), 404, "not_found")
        traversal = await anon.get("http://test/%2e%2e/secret.txt")
        assert "no" != traversal.text
        # The API keeps its own answers: unknown routes are JSON 404s, wrong methods 405s.
        assert_error(await anon.get("/v1/nothing-here"), 404, "not_found")
        assert_error(await anon.post("/v1/nothing-here"), 404, "not_found")
        assert_error(await anon.post("http://test/"), 404, "not_found")
        assert (await h.client.get("/v1/capsules")).status_code == 200


async def test_ticket_opens_a_build_log_stream_once(h):
    b = (await h.client.post("/v1/builds", json={"name": "tlog", "recipe": ["RUN echo hi"]})).json()
    async with h.client_for(None) as anon:
        assert_error(await anon.get(f"/v1/builds/{b['id']}/logs"), 401, "unauthorized")
        ticket = (await h.client.post("/v1/auth/ticket")).json()["ticket"]
        text = ""
        async with anon.stream("GET", f"/v1/builds/{b['id']}/logs", params={"ticket": ticket}) as resp:
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
            async for chunk in resp.aiter_text():
                text += chunk
        assert "event: log" in text and "event: end" in text and '"status": "success"' in text
        err = assert_error(await anon.get(f"/v1/builds/{b['id']}/logs", params={"ticket": ticket}), 401, "unauthorized")
        assert "already used" in err["message"]
        # A ticket gives no more than the stream: not the build itself.
        other = (await h.client.post("/v1/auth/ticket")).json()["ticket"]
        assert_error(await anon.get(f"/v1/builds/{b['id']}", params={"ticket": other}), 401, "unauthorized")
