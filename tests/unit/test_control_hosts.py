"""A fleet's control plane: hosts (register, heartbeat, drain, remove), placement, `missing`
capsules of offline hosts, and background work shared by two replicas on one database.

Runs on SQLite and on a real PostgreSQL (conftest.py); the hosts are fake host agents."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from sqlalchemy import update

from wrenn_control.clock import utcnow
from wrenn_control.db.models import Capsule, Host
from wrenn_host.api import HostAgentError
from wrenn_host.service import tls

from .fake_host_agent import assert_error, make_settings, running_app
from .fleet_harness import FakeFleet, FleetHost, add_host, agent_client, beat, fleet_app


async def test_registration_token_is_spent_by_its_first_use(tmp_path):
    fleet = FakeFleet()
    async with fleet_app(make_settings(tmp_path), fleet) as h:
        made = await h.client.post("/v1/hosts", json={"name": "rack-1"})
        assert made.status_code == 201, made.text
        body = made.json()
        assert body["id"].startswith("host-") and body["token"]
        assert body["command"].startswith("wrenn host-agent --control-plane http://test ")
        assert f"--token {body['token']}" in body["command"]
        shown = (await h.client.get(f"/v1/hosts/{body['id']}")).json()
        assert shown["status"] == "pending" and shown["address"] is None and shown["name"] == "rack-1"

        reg = {"address": "http://10.0.0.7:8081", "name": "rack-1", "capacity": {"vcpus": 4, "memory_mb": 8192,
                                                                                  "disk_mb": 50_000},
               "accelerator": "kvm", "version": "0.1.0"}
        async with agent_client(h, body["token"]) as agent:
            first = await agent.post("/v1/hosts/register", json=reg)
            assert first.status_code == 200, first.text
            answer = first.json()
            assert answer["host_id"] == body["id"] and answer["heartbeat_interval_sec"] == 3.0
            assert answer["credential"] != answer["control_token"]
            assert_error(await agent.post("/v1/hosts/register", json=reg), 401, "unauthorized")
        async with agent_client(h, "wrnr_" + "0" * 48) as stranger:
            assert_error(await stranger.post("/v1/hosts/register", json=reg), 401, "unauthorized")
        async with agent_client(h) as nobody:
            assert_error(await nobody.post("/v1/hosts/register", json=reg), 401, "unauthorized")

        # registered, but not placed on before its first heartbeat: the agent sends that once it serves
        shown = (await h.client.get(f"/v1/hosts/{body['id']}")).json()
        assert shown["status"] == "pending" and shown["address"] == "http://10.0.0.7:8081"
        assert_error(await h.client.post("/v1/capsules", json={"template": "minimal"}), 503, "host_unavailable")
        assert fleet.agents["http://10.0.0.7:8081"].ops("create") == []
        host = FleetHost(body["id"], "http://10.0.0.7:8081", answer["credential"], fleet.agents["http://10.0.0.7:8081"])
        assert (await beat(h, host)).json() == {"status": "online"}
        shown = (await h.client.get(f"/v1/hosts/{body['id']}")).json()
        assert shown["status"] == "online"
        assert shown["capacity"] == {"vcpus": 4, "memory_mb": 8192, "disk_mb": 50_000}
        assert shown["accelerator"] == "kvm" and shown["version"] == "0.1.0" and shown["capsule_count"] == 0
        # the control plane reaches the agent with the control token it handed out
        await asyncio.to_thread(h.app.state.fleet.refresh)
        assert fleet.tokens["http://10.0.0.7:8081"] == answer["control_token"]


async def test_register_refuses_a_bad_body(tmp_path):
    async with fleet_app(make_settings(tmp_path), FakeFleet()) as h:
        token = (await h.client.post("/v1/hosts")).json()["token"]
        async with agent_client(h, token) as agent:
            bad = await agent.post("/v1/hosts/register", json={"address": "not a url", "capacity": {"vcpus": 1,
                                                                                                  "memory_mb": 1}})
            assert_error(bad, 400, "invalid_request")
            good = await agent.post("/v1/hosts/register", json={"address": "http://10.0.0.1:1",
                                                                "capacity": {"vcpus": 1, "memory_mb": 512}})
            assert good.status_code == 200  # the bad call did not spend the token


async def test_register_pins_the_agents_tls_certificate(tmp_path):
    cert, _key = tls.self_signed(tmp_path / "agent", ["10.0.0.9"])
    pem = cert.read_text()
    fleet = FakeFleet()
    async with fleet_app(make_settings(tmp_path), fleet) as h:
        token = (await h.client.post("/v1/hosts")).json()["token"]
        capacity = {"vcpus": 1, "memory_mb": 512}
        async with agent_client(h, token) as agent:
            for address, bad, why in (("https://10.0.0.9:1", "not a certificate", "not a usable PEM"),
                                      ("http://10.0.0.9:1", pem, "needs an https:// address")):
                resp = await agent.post("/v1/hosts/register", json={"address": address, "capacity": capacity,
                                                                     "tls_cert": bad})
                assert_error(resp, 400, "invalid_request")
                assert why in resp.json()["error"]["message"]
            good = await agent.post("/v1/hosts/register", json={"address": "https://10.0.0.9:1", "capacity": capacity,
                                                                "tls_cert": pem})
            assert good.status_code == 200, good.text  # the refused calls did not spend the token
        # the client made for this host trusts exactly the certificate it registered with
        await asyncio.to_thread(h.app.state.fleet.refresh)
        assert fleet.certs["https://10.0.0.9:1"] == pem


async def test_hosts_are_managed_by_the_operators_team_only(tmp_path):
    fleet = FakeFleet()
    async with fleet_app(make_settings(tmp_path), fleet) as h:
        host = await add_host(h, fleet, 1)
        async with h.new_team("customer") as other:
            for method, path in (("POST", "/v1/hosts"), ("GET", "/v1/hosts"), ("GET", f"/v1/hosts/{host.id}"),
                                 ("POST", f"/v1/hosts/{host.id}/drain"), ("DELETE", f"/v1/hosts/{host.id}")):
                assert_error(await other.request(method, path), 403, "forbidden")
        async with h.client_for(None) as anonymous:
            assert_error(await anonymous.get("/v1/hosts"), 401, "unauthorized")
        # the host agent's credential is not an operator's either
        async with agent_client(h, host.credential) as agent:
            assert_error(await agent.get("/v1/hosts"), 401, "unauthorized")
        assert [x["id"] for x in (await h.client.get("/v1/hosts")).json()] == [host.id]
        assert_error(await h.client.get("/v1/hosts/host-nope"), 404, "not_found")


async def test_heartbeat_records_usage_and_answers_drain(tmp_path):
    fleet = FakeFleet()
    async with fleet_app(make_settings(tmp_path), fleet) as h:
        host = await add_host(h, fleet, 1, templates=["minimal", "tpl-x"])
        shown = (await h.client.get(f"/v1/hosts/{host.id}")).json()
        assert shown["usage"]["free_memory_mb"] == 10_000 and shown["templates"] == ["minimal", "tpl-x"]
        assert shown["last_heartbeat_at"] is not None
        async with agent_client(h, "wrnh_wrong") as bad:
            assert_error(await bad.post(f"/v1/hosts/{host.id}/heartbeat", json={}), 401, "unauthorized")
        assert (await beat(h, host)).json() == {"status": "online"}

        drained = await h.client.post(f"/v1/hosts/{host.id}/drain")
        assert drained.status_code == 200 and drained.json()["status"] == "draining"
        assert (await beat(h, host)).json() == {"status": "draining"}
        # a draining host takes no new capsule
        assert_error(await h.client.post("/v1/capsules", json={}), 503, "host_unavailable")


async def test_capsules_spread_over_hosts_and_carry_their_host(tmp_path):
    fleet = FakeFleet()
    async with fleet_app(make_settings(tmp_path), fleet) as h:
        hosts = [await add_host(h, fleet, n) for n in (1, 2, 3)]
        placed = [(await h.running_capsule())["host_id"] for _ in range(6)]
        assert sorted(placed) == sorted([x.id for x in hosts] * 2)
        for host in hosts:  # each capsule's VM is on the host its row names
            assert len(host.agent.capsules) == 2
        listed = (await h.client.get("/v1/hosts")).json()
        assert [x["capsule_count"] for x in listed] == [2, 2, 2]
        # every capsule route reaches the capsule's own host
        cid = next(iter(hosts[1].agent.capsules))
        ran = await h.client.post(f"/v1/capsules/{cid}/exec", json={"cmd": "true"})
        assert ran.status_code == 200, ran.text
        assert hosts[1].agent.ops("exec") == [cid] and not hosts[0].agent.ops("exec")


async def test_no_host_no_room_is_503(tmp_path):
    fleet = FakeFleet()
    async with fleet_app(make_settings(tmp_path, overcommit_vcpu=1.0), fleet) as h:
        assert_error(await h.client.post("/v1/capsules", json={}), 503, "host_unavailable")
        await add_host(h, fleet, 1, vcpus=2)
        await h.running_capsule(vcpus=2)
        assert_error(await h.client.post("/v1/capsules", json={"vcpus": 1}), 503, "host_unavailable")


async def test_offline_host_shows_missing_then_real_state_again(tmp_path):
    fleet = FakeFleet()
    async with fleet_app(make_settings(tmp_path), fleet) as h:
        a, b = await add_host(h, fleet, 1), await add_host(h, fleet, 2)
        on_a = (await h.running_capsule())["id"]
        on_b = (await h.running_capsule())["id"]
        assert {on_a, on_b} == set(a.agent.capsules) | set(b.agent.capsules)
        if on_a not in a.agent.capsules:
            on_a, on_b = on_b, on_a
        await beat(h, b)
        # a misses its heartbeats: the watcher (as a pass after WRENN_HOST_OFFLINE_SEC would)
        went = await asyncio.to_thread(h.app.state.heartbeats.run_once, utcnow() + timedelta(seconds=16))
        assert set(went) == {a.id, b.id}  # both are stale at that clock; b beats again now
        await beat(h, b)
        assert (await h.client.get(f"/v1/hosts/{a.id}")).json()["status"] == "offline"
        assert (await h.client.get(f"/v1/capsules/{on_a}")).json()["status"] == "missing"
        assert (await h.client.get(f"/v1/capsules/{on_b}")).json()["status"] == "running"
        listed = {c["id"]: c["status"] for c in (await h.client.get("/v1/capsules")).json()}
        assert listed == {on_a: "missing", on_b: "running"}
        for status, ids in (("missing", [on_a]), ("running", [on_b])):  # the list filter sees it too
            found = (await h.client.get("/v1/capsules", params={"status": status})).json()
            assert [c["id"] for c in found] == ids
        assert_error(await h.client.post(f"/v1/capsules/{on_a}/exec", json={"cmd": "true"}), 503, "host_unavailable")
        assert (await h.client.post(f"/v1/capsules/{on_b}/exec", json={"cmd": "true"})).status_code == 200
        # the host comes back and reports its capsule: it shows its real state again
        assert (await beat(h, a)).json() == {"status": "online"}
        assert (await h.client.get(f"/v1/capsules/{on_a}")).json()["status"] == "running"
        assert (await h.client.post(f"/v1/capsules/{on_a}/exec", json={"cmd": "true"})).status_code == 200


async def test_a_host_back_through_one_replica_is_served_by_the_other_at_once(tmp_path):
    """A host's heartbeat lands on one replica; the other, which still read the host as offline,
    shows its capsules' real status and serves requests to them at once, not after its next pass."""
    fleet = FakeFleet()
    settings = make_settings(tmp_path)
    other = make_settings(tmp_path / "replica-2", database_url=settings.database_url,
                          bootstrap_api_key=settings.bootstrap_api_key)
    async with fleet_app(settings, fleet) as one, fleet_app(other, fleet) as two:
        host = await add_host(one, fleet, 1)
        cid = (await one.running_capsule())["id"]
        await asyncio.to_thread(one.app.state.heartbeats.run_once, utcnow() + timedelta(seconds=16))
        await asyncio.to_thread(two.app.state.fleet.refresh)
        assert (await two.client.get(f"/v1/capsules/{cid}")).json()["status"] == "missing"
        assert_error(await two.client.post(f"/v1/capsules/{cid}/exec", json={"cmd": "true"}), 503, "host_unavailable")
        assert (await beat(one, host)).json() == {"status": "online"}
        assert (await two.client.get(f"/v1/capsules/{cid}")).json()["status"] == "running"
        ran = await two.client.post(f"/v1/capsules/{cid}/exec", json={"cmd": "true"})
        assert ran.status_code == 200, ran.text
        # Offline and back once more, the heartbeat written by another process (both replicas
        # here share this process's reading of the hosts table): GET and the list show it.
        for read in ("one", "list"):
            await asyncio.to_thread(one.app.state.heartbeats.run_once, utcnow() + timedelta(seconds=16))
            await asyncio.to_thread(two.app.state.fleet.refresh)
            assert (await two.client.get(f"/v1/capsules/{cid}")).json()["status"] == "missing"
            with two.app.state.db.session() as s:
                s.execute(update(Host).where(Host.id == host.id).values(status="online", last_heartbeat_at=utcnow()))
                s.commit()
            if read == "one":
                assert (await two.client.get(f"/v1/capsules/{cid}")).json()["status"] == "running"
            else:
                assert [c["status"] for c in (await two.client.get("/v1/capsules")).json()] == ["running"]
                assert (await two.client.get("/v1/capsules", params={"status": "missing"})).json() == []


async def test_a_create_no_host_answers_says_which_hosts_failed(tmp_path):
    """Hosts online but none answering: the 503 names them and why, not "no host is online"."""
    fleet = FakeFleet()
    async with fleet_app(make_settings(tmp_path), fleet) as h:
        a, b = await add_host(h, fleet, 1), await add_host(h, fleet, 2)
        answers = {a.address: a.agent.builtin_templates, b.address: b.agent.builtin_templates}

        async def restarting() -> list:
            raise HostAgentError("agent is restarting")
        for host in (a, b):
            host.agent.builtin_templates = restarting  # type: ignore[method-assign]
        refused = await h.client.post("/v1/capsules", json={"template": "minimal"})
        assert_error(refused, 503, "host_unavailable")
        message = refused.json()["error"]["message"]
        assert "no host answered" in message and a.id in message and b.id in message
        assert "agent is restarting" in message
        assert not a.agent.capsules and not b.agent.capsules
        for host in (a, b):  # the hosts answer again: the next create is placed
            host.agent.builtin_templates = answers[host.address]  # type: ignore[method-assign]
        assert (await h.client.post("/v1/capsules", json={"template": "minimal"})).status_code == 201


async def test_capsule_its_host_no_longer_has_becomes_error(tmp_path):
    fleet = FakeFleet()
    async with fleet_app(make_settings(tmp_path), fleet) as h:
        host = await add_host(h, fleet, 1)
        kept, lost = (await h.running_capsule())["id"], (await h.running_capsule())["id"]
        paused = (await h.running_capsule())["id"]
        assert (await h.client.post(f"/v1/capsules/{paused}/pause")).status_code == 200
        # a heartbeat taken before a change may arrive after it: fresh changes are left alone
        await beat(h, host, capsules={kept: "running"})
        assert (await h.client.get(f"/v1/capsules/{lost}")).json()["status"] == "running"
        with h.app.state.db.session() as s:  # ... but not changes older than the grace
            s.execute(update(Capsule).values(last_updated=utcnow() - timedelta(minutes=1)))
            s.commit()
        await beat(h, host, capsules={kept: "running", paused: "running"})
        gone = (await h.client.get(f"/v1/capsules/{lost}")).json()
        assert gone["status"] == "error" and host.id in gone["metadata"]["error"]
        assert (await h.client.get(f"/v1/capsules/{kept}")).json()["status"] == "running"
        assert (await h.client.get(f"/v1/capsules/{paused}")).json()["status"] == "running"  # the host's word


async def test_host_with_capsules_cannot_be_removed(tmp_path):
    fleet = FakeFleet()
    async with fleet_app(make_settings(tmp_path), fleet) as h:
        host = await add_host(h, fleet, 1)
        cid = (await h.running_capsule())["id"]
        refused = await h.client.delete(f"/v1/hosts/{host.id}")
        assert refused.status_code == 409
        body = refused.json()
        assert body["error"]["code"] == "host_has_capsules" and body["error"]["capsule_ids"] == [cid]
        assert body["capsule_ids"] == [cid]  # where the published SDK reads them
        assert (await h.client.delete(f"/v1/capsules/{cid}")).status_code == 204
        assert (await h.client.delete(f"/v1/hosts/{host.id}")).status_code == 204
        assert_error(await h.client.get(f"/v1/hosts/{host.id}"), 404, "not_found")
        assert (await h.client.get("/v1/hosts")).json() == []


async def test_two_replicas_share_the_reapers_work(tmp_path):
    """Two control planes on one database, both running their reaper: an idle capsule is
    paused once, by one of them."""
    fleet = FakeFleet()
    settings = make_settings(tmp_path)
    other = make_settings(tmp_path / "replica-2", database_url=settings.database_url,
                          bootstrap_api_key=settings.bootstrap_api_key)
    async with fleet_app(settings, fleet) as one, fleet_app(other, fleet) as two:
        host = await add_host(one, fleet, 1)
        cids = [(await one.running_capsule(timeout_sec=1))["id"] for _ in range(3)]
        # the second replica serves them too
        assert {c["id"] for c in (await two.client.get("/v1/capsules")).json()} == set(cids)
        later = utcnow() + timedelta(seconds=5)
        done = await asyncio.gather(*(r.app.state.reaper.run_once(later) for r in (one, two, one, two)))
        assert sorted(c for d in done for c in d) == sorted(cids)  # each paused by exactly one
        for cid in cids:
            await one.wait_status(cid, "paused")
        assert sorted(host.agent.ops("pause")) == sorted(cids)  # one host call each, no more


async def test_replicas_hold_a_capsule_one_at_a_time(tmp_path):
    """A lifecycle call holds a lease in the capsule's row: a destroy through one replica waits
    for a pause through the other to finish, then removes the VM."""
    fleet = FakeFleet()
    settings = make_settings(tmp_path)
    other = make_settings(tmp_path / "replica-2", database_url=settings.database_url,
                          bootstrap_api_key=settings.bootstrap_api_key)
    async with fleet_app(settings, fleet) as one, fleet_app(other, fleet) as two:
        host = await add_host(one, fleet, 1)
        cid = (await one.running_capsule())["id"]
        host.agent.delays["pause"] = 0.5
        events = []
        pause, destroy = host.agent.pause, host.agent.destroy

        async def logged_pause(capsule_id):
            events.append("pause begins")
            await pause(capsule_id)
            events.append("pause ends")

        async def logged_destroy(capsule_id):
            events.append("destroy begins")
            await destroy(capsule_id)

        host.agent.pause, host.agent.destroy = logged_pause, logged_destroy
        pausing = asyncio.create_task(one.client.post(f"/v1/capsules/{cid}/pause"))
        while "pause" not in [op for op, _ in host.agent.calls]:
            await asyncio.sleep(0.01)
        assert (await two.client.delete(f"/v1/capsules/{cid}")).status_code == 204
        await pausing
        assert events == ["pause begins", "pause ends", "destroy begins"]
        assert (await one.client.get(f"/v1/capsules/{cid}")).json()["status"] == "stopped"
        with one.app.state.db.session() as s:
            assert s.get(Capsule, (s.query(Capsule.seq).filter(Capsule.id == cid).scalar())).claimed_by is None


async def test_server_mode_capsules_have_no_host(tmp_path):
    async with running_app(make_settings(tmp_path)) as h:
        body = await h.running_capsule()
        assert body["host_id"] is None and body["status"] == "running"
        assert (await h.client.get("/v1/hosts")).json() == []


async def test_metrics_endpoint(tmp_path):
    fleet = FakeFleet()
    async with fleet_app(make_settings(tmp_path), fleet) as h:
        host = await add_host(h, fleet, 1, vcpus=4)
        cid = (await h.running_capsule())["id"]
        assert (await h.client.post(f"/v1/capsules/{cid}/pause")).status_code == 200
        text = (await h.client.get("http://test/metrics")).text
        assert f'wrenn_capsules{{host="{host.id}",status="paused"}} 1.0' in text
        assert f'wrenn_host_capacity{{host="{host.id}",resource="vcpus"}} 4.0' in text
        assert f'wrenn_host_up{{host="{host.id}",status="online"}} 1.0' in text
        assert f'wrenn_host_heartbeat_age_seconds{{host="{host.id}"}}' in text
        assert 'wrenn_capsule_operation_seconds_count{op="create"} 1.0' in text
        assert 'wrenn_capsule_operation_seconds_count{op="pause"} 1.0' in text


async def test_offline_host_capsules_refuse_lifecycle_calls_but_can_be_destroyed(tmp_path):
    fleet = FakeFleet()
    async with fleet_app(make_settings(tmp_path), fleet) as h:
        host = await add_host(h, fleet, 1)
        kept, doomed = (await h.running_capsule())["id"], (await h.running_capsule())["id"]
        paused = (await h.running_capsule())["id"]
        assert (await h.client.post(f"/v1/capsules/{paused}/pause")).status_code == 200
        await asyncio.to_thread(h.app.state.heartbeats.run_once, utcnow() + timedelta(seconds=16))
        for path in (f"{kept}/pause", f"{paused}/resume"):
            assert_error(await h.client.post(f"/v1/capsules/{path}"), 503, "host_unavailable")
        # the reaper leaves them alone too (it would pause `kept`, idle past its timeout)
        with h.app.state.db.session() as s:
            s.execute(update(Capsule).where(Capsule.id == kept).values(timeout_sec=1))
            s.commit()
        assert await h.app.state.reaper.run_once(utcnow() + timedelta(seconds=5)) == []
        # nothing changed under the `missing` they show
        assert (await h.client.get(f"/v1/capsules/{paused}")).json()["status"] == "missing"
        # a destroy is taken now; the host removes the VM once it is back
        assert (await h.client.delete(f"/v1/capsules/{doomed}")).status_code == 204
        assert (await h.client.get(f"/v1/capsules/{doomed}")).json()["status"] == "stopped"
        assert doomed in host.agent.capsules
        await beat(h, host)
        for _ in range(100):
            if doomed not in host.agent.capsules:
                break
            await asyncio.sleep(0.01)
        assert doomed not in host.agent.capsules and kept in host.agent.capsules
        assert (await h.client.get(f"/v1/capsules/{kept}")).json()["status"] == "running"
        assert (await h.client.get(f"/v1/capsules/{paused}")).json()["status"] == "paused"
        assert (await h.client.post(f"/v1/capsules/{paused}/resume")).status_code == 200


async def test_openapi_documents_the_hosts_routes(tmp_path):
    async with fleet_app(make_settings(tmp_path), FakeFleet()) as h:
        spec = (await h.client.get("/openapi.json")).json()
    paths = spec["paths"]
    for path, method, statuses in (("/api/v1/hosts", "post", {"201", "401", "403"}),
                                   ("/api/v1/hosts", "get", {"200", "401", "403"}),
                                   ("/api/v1/hosts/{host_id}", "get", {"200", "403", "404"}),
                                   ("/api/v1/hosts/{host_id}", "delete", {"204", "403", "404", "409"}),
                                   ("/api/v1/hosts/{host_id}/drain", "post", {"200", "403", "404"}),
                                   ("/api/v1/hosts/register", "post", {"200", "400", "401"}),
                                   ("/api/v1/hosts/{host_id}/heartbeat", "post", {"200", "400", "401"})):
        assert statuses <= set(paths[path][method]["responses"]), (path, method)
    assert "host_id" in spec["components"]["schemas"]["CapsuleOut"]["properties"]


async def test_a_call_cut_short_is_settled_by_the_hosts_word(tmp_path):
    """A replica died during a pause (the row says `pausing`, its lease has lapsed): the host's
    heartbeat says what is true; while a lease is held, nothing is touched."""
    fleet = FakeFleet()
    async with fleet_app(make_settings(tmp_path), fleet) as h:
        host = await add_host(h, fleet, 1)
        cut, held = (await h.running_capsule())["id"], (await h.running_capsule())["id"]
        long_ago = utcnow() - timedelta(hours=1)
        with h.app.state.db.session() as s:
            s.execute(update(Capsule).values(status="pausing", last_updated=long_ago))
            s.execute(update(Capsule).where(Capsule.id == held).values(
                claimed_by="other-replica", claimed_until=utcnow() + timedelta(seconds=30)))
            s.commit()
        host.agent.capsules[cut].state = "paused"
        await beat(h, host)
        assert (await h.client.get(f"/v1/capsules/{cut}")).json()["status"] == "paused"
        assert (await h.client.get(f"/v1/capsules/{held}")).json()["status"] == "pausing"


async def test_each_sampler_pass_is_done_by_one_replica(tmp_path, monkeypatch):
    import time
    import types

    from wrenn_control.workers import sampler
    from wrenn_control.workers.passes import claim_pass

    fleet = FakeFleet()
    settings = make_settings(tmp_path)
    other = make_settings(tmp_path / "replica-2", database_url=settings.database_url,
                          bootstrap_api_key=settings.bootstrap_api_key)
    async with fleet_app(settings, fleet) as one, fleet_app(other, fleet) as two:
        host = await add_host(one, fleet, 1)
        await one.running_capsule()
        before = len(host.agent.ops("metrics"))
        # both in one time slot, one no pass has had yet
        monkeypatch.setattr(sampler, "time", types.SimpleNamespace(time=lambda: 4e9, monotonic=time.monotonic))
        await asyncio.gather(one.app.state.sampler.tick(), two.app.state.sampler.tick())
        assert len(host.agent.ops("metrics")) == before + 1  # one replica asked, once
        db = one.app.state.db
        wins = [await db.run(claim_pass, "x", 7, r) for r in ("a", "b", "a")]
        assert wins == [True, False, False]
