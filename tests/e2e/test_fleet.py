"""A fleet, end to end: PostgreSQL, three host agents each in its own network namespace with its
own address, two control-plane replicas behind one URL (tests/fleet.py). What an operator and a
user of a fleet check:

- creates spread over the hosts, and every route works on a capsule of each host (exec, streamed
  exec, files in and out, PTY, port proxy, pause and resume);
- `kill -9` of a host agent: its capsules show `missing` while the others keep working; its restart
  brings them back, running;
- `kill -9` of one control-plane replica loses nothing: the other serves every request;
- drain moves a paused capsule to another host (a /tmp file and a running process survive);
- a snapshot made on one host starts a capsule on another.

The tests run in order on one fleet (module scope): each leaves the fleet as a user would find it.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.fleet import Fleet
from wrenn import Capsule

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    with Fleet(hosts=3, replicas=2) as f:
        yield f


@pytest.fixture(scope="module")
def api(fleet: Fleet) -> Iterator[httpx.Client]:
    with fleet.client() as c:
        yield c


def create(api: httpx.Client, **body) -> dict:
    """A running capsule (a host's first create of a shape may answer `starting`: then polled)."""
    r = api.post("/v1/capsules", json={"template": "minimal", **body})
    assert r.status_code == 201, r.text
    cap = r.json()
    deadline = time.monotonic() + 300
    while cap["status"] != "running":
        assert cap["status"] in ("pending", "starting") and time.monotonic() < deadline, cap
        time.sleep(0.5)
        cap = api.get(f"/v1/capsules/{cap['id']}").json()
    assert cap["host_id"], cap
    return cap


def run(api: httpx.Client, capsule_id: str, cmd: str) -> dict:
    r = api.post(f"/v1/capsules/{capsule_id}/exec", json={"cmd": "/bin/sh", "args": ["-c", cmd]})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def spread(fleet: Fleet, api: httpx.Client) -> dict[str, dict]:
    """Six creates: host id -> one capsule on it."""
    caps = [create(api) for _ in range(6)]
    by_host: dict[str, dict] = {}
    for cap in caps:
        by_host.setdefault(cap["host_id"], cap)
    return by_host


def test_hosts_are_listed_online_with_their_capacity(fleet: Fleet, api: httpx.Client):
    hosts = api.get("/v1/hosts").json()
    assert sorted(h["id"] for h in hosts) == sorted(n.host_id for n in fleet.hosts)
    for h in hosts:
        assert h["status"] == "online"
        assert h["address"] == f"https://{fleet.host(h['id']).address}:7070"  # TLS by default
        assert h["capacity"]["vcpus"] >= 1 and h["capacity"]["memory_mb"] > 0
        one = api.get(f"/v1/hosts/{h['id']}").json()
        assert one["id"] == h["id"] and "usage" in one and "capsule_count" in one


def test_creates_spread_over_the_hosts(fleet: Fleet, api: httpx.Client, spread: dict[str, dict]):
    caps = api.get("/v1/capsules").json()
    counts = collections.Counter(c["host_id"] for c in caps if c["status"] == "running")
    assert set(counts) == {n.host_id for n in fleet.hosts}, counts
    assert max(counts.values()) - min(counts.values()) <= 1, counts  # least loaded first
    counted = {h["id"]: h["capsule_count"] for h in api.get("/v1/hosts").json()}
    assert counted == dict(counts)


def test_every_route_works_on_a_capsule_of_each_host(fleet: Fleet, api: httpx.Client, spread: dict[str, dict]):
    for host_id, cap in spread.items():
        cid = cap["id"]
        # exec, and the host really is the one named: the guest's gateway answers from its namespace
        res = run(api, cid, "echo hello $((6*7))")
        assert res["stdout"] == "hello 42\n" and res["exit_code"] == 0
        # files in and out, large enough to be streamed (not held whole)
        blob = bytes(range(256)) * 8192  # 2 MiB
        r = api.post(f"/v1/capsules/{cid}/files/write", files={"file": ("b.bin", blob)},
                     data={"path": "/root/b.bin"})
        assert r.status_code == 204, r.text
        r = api.post(f"/v1/capsules/{cid}/files/read", json={"path": "/root/b.bin"})
        assert r.status_code == 200 and r.content == blob
        names = [e["name"] for e in api.post(f"/v1/capsules/{cid}/files/list", json={"path": "/root"}).json()["entries"]]
        assert "b.bin" in names
        # streamed exec and a PTY (WebSockets through the control plane to the capsule's host)
        sdk = Capsule.connect(cid, api_key=fleet.api_key, base_url=fleet.url)  # (`with` would destroy it)
        try:
            events = list(sdk.commands.stream("/bin/sh", ["-c", "for i in 1 2 3; do echo line$i; done"]))
            assert "".join(e.data for e in events if e.type == "stdout") == "line1\nline2\nline3\n"
            with sdk.pty("/bin/sh") as term:
                term.write(b"echo pty-$((40+2))\r")
                out = b""
                deadline = time.monotonic() + 60
                while b"pty-42" not in out and time.monotonic() < deadline:
                    data = next(term).data or b""
                    out += data if isinstance(data, bytes) else data.encode()
                assert b"pty-42" in out
                term.kill()
        finally:
            sdk.close()
        # the port proxy: a server in the capsule, reached through `{port}-{id}.{domain}`
        r = api.post(f"/v1/capsules/{cid}/exec", json={
            "cmd": "/bin/sh", "args": ["-c", "cd /root && (python3 -m http.server 8000 >/dev/null 2>&1 &) ; "
                                             "for i in $(seq 50); do nc -z 127.0.0.1 8000 && break; sleep 0.2; done"]})
        assert r.status_code == 200, r.text
        proxied = api.get(f"{fleet.url.removesuffix('/api')}/b.bin", headers={"Host": f"8000-{cid}.localhost"})
        assert proxied.status_code == 200 and proxied.content == blob
        # pause and resume keep memory
        run(api, cid, "echo kept > /dev/shm/mark")
        assert api.post(f"/v1/capsules/{cid}/pause").status_code == 200
        assert api.get(f"/v1/capsules/{cid}").json()["status"] == "paused"
        r = api.post(f"/v1/capsules/{cid}/resume")
        assert r.status_code == 200 and r.json()["status"] == "running" and r.json()["host_id"] == host_id
        assert run(api, cid, "cat /dev/shm/mark")["stdout"] == "kept\n"


def test_a_killed_host_agent_shows_missing_and_comes_back(fleet: Fleet, api: httpx.Client, spread: dict[str, dict]):
    victim = fleet.hosts[0]
    mine = spread[victim.host_id]["id"]
    other = next(c["id"] for h, c in spread.items() if h != victim.host_id)
    victim.kill9()
    fleet.wait_hosts("offline", [victim.host_id], timeout=60)
    fleet.wait_capsule(mine, "missing", timeout=10)
    # each replica re-reads the hosts table every second: both say so within a moment
    assert fleet.agreed(f"/v1/capsules/{mine}", lambda b: b["status"], timeout=5) == "missing"
    assert all(api.get(f"/v1/capsules/{mine}").json()["status"] == "missing" for _ in range(4))
    # the rest of the fleet keeps working
    assert run(api, other, "echo still here")["stdout"] == "still here\n"
    r = api.post(f"/v1/capsules/{mine}/exec", json={"cmd": "true"})
    assert r.status_code in (409, 503) and r.json()["error"]["code"] in ("host_unavailable", "invalid_state")
    created = create(api)
    assert created["host_id"] != victim.host_id  # never placed on an offline host
    # its restart (the saved registration, no token) brings its capsules back as they were
    victim.start()
    fleet.wait_hosts("online", [victim.host_id], timeout=120)
    fleet.wait_capsule(mine, "running", timeout=60)
    assert run(api, mine, "echo back")["stdout"] == "back\n"


def test_a_killed_replica_loses_nothing(fleet: Fleet, api: httpx.Client):
    listing = lambda body: sorted((c["id"], c["status"]) for c in body)  # noqa: E731
    before = fleet.agreed("/v1/capsules", listing)  # (a host back a moment ago: both replicas know)
    fleet.replicas[0].kill9()
    try:
        time.sleep(0.5)  # (requests in flight at the crash may fail; the load balancer drops its connections)
        # every request now lands on the other replica, through the same URL
        assert listing(api.get("/v1/capsules").json()) == before
        cap = create(api)
        assert run(api, cap["id"], "echo ok")["stdout"] == "ok\n"
        assert api.delete(f"/v1/capsules/{cap['id']}").status_code == 204
        fleet.wait_hosts("online", [n.host_id for n in fleet.hosts], timeout=30)  # heartbeats still land
    finally:  # (the next tests need both replicas)
        fleet.replicas[0].start()
        fleet.replicas[0].wait_healthy()


def test_drain_moves_a_paused_capsule_with_its_memory(fleet: Fleet, api: httpx.Client):
    host = fleet.hosts[2]
    cap = None
    for _ in range(6):  # place one on the host to drain (placement spreads: a few creates suffice)
        c = create(api)
        if c["host_id"] == host.host_id:
            cap = c
            break
    assert cap is not None, "no create was placed on the third host"
    cid = cap["id"]
    run(api, cid, "echo survived > /tmp/note; (sh -c 'while :; do sleep 1; done' &) ; sleep 0.2")
    pid = run(api, cid, "pgrep -f 'while :' | head -1")["stdout"].strip()
    assert pid.isdigit()
    assert api.post(f"/v1/capsules/{cid}/pause").status_code == 200
    r = api.post(f"/v1/hosts/{host.host_id}/drain")
    assert r.status_code in (200, 202), r.text
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        moved = api.get(f"/v1/capsules/{cid}").json()
        if moved["host_id"] != host.host_id and moved["status"] == "paused":
            break
        time.sleep(1)
    else:
        pytest.fail(f"the paused capsule did not move off the drained host: {moved}")
    assert api.get(f"/v1/hosts/{host.host_id}").json()["status"] == "draining"
    r = api.post(f"/v1/capsules/{cid}/resume")
    assert r.status_code == 200, r.text
    assert run(api, cid, "cat /tmp/note")["stdout"] == "survived\n"
    assert run(api, cid, f"kill -0 {pid} && echo alive")["stdout"] == "alive\n"
    # nothing new lands on a draining host
    assert create(api)["host_id"] != host.host_id


def test_a_snapshot_made_on_one_host_starts_a_capsule_on_another(fleet: Fleet, api: httpx.Client):
    source = create(api)
    run(api, source["id"], "echo from-the-snapshot > /root/origin")
    name = f"fleet-snap-{int(time.time())}"
    r = api.post("/v1/snapshots", json={"sandbox_id": source["id"], "name": name})
    assert r.status_code in (200, 201), r.text
    # the host holding it is drained, so the next create must go elsewhere and fetch the template
    api.post(f"/v1/hosts/{source['host_id']}/drain")
    made = create(api, template=name)
    assert made["host_id"] != source["host_id"]
    assert run(api, made["id"], "cat /root/origin")["stdout"] == "from-the-snapshot\n"


def test_host_management_is_for_operators_only(fleet: Fleet, api: httpx.Client):
    busy = next(h for h in api.get("/v1/hosts").json() if h["capsule_count"] > 0)
    r = api.delete(f"/v1/hosts/{busy['id']}")
    assert r.status_code == 409
    err = r.json()["error"]
    assert err["code"] == "host_has_capsules" and err["capsule_ids"]
    metrics = httpx.get(f"{fleet.url.removesuffix('/api')}/metrics", timeout=10)
    assert metrics.status_code == 200
    assert "wrenn_capsules" in metrics.text and "wrenn_host_heartbeat_age_seconds" in metrics.text
    json.loads(json.dumps(busy))  # the host object is plain JSON
