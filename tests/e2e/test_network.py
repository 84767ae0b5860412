"""Capsule networking with real VMs: internet access through NAT, the egress policy, what a guest
can never reach, networking across pause/resume, snapshots and restarts, and cleanup.

Traffic goes only to the test's own host (a namespace on 198.51.100.10 made here), to the server
itself (to show it is unreachable), and to the package registries through pip/apt-get.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_api_capsules import Api
from tests.nethost import TestHost

pytestmark = [pytest.mark.vm,
              pytest.mark.skipif(os.geteuid() != 0, reason="capsule networking needs root")]

HOST_IP = "198.51.100.10"


@pytest.fixture(scope="module")
def testhost() -> Iterator[TestHost]:
    with TestHost(HOST_IP) as host:
        yield host


@pytest.fixture
def api(wrenn_server) -> Iterator[Api]:
    a = Api(wrenn_server)
    yield a
    a.cleanup()


def curl(api: Api, cid: str, url: str, *extra: str, timeout: int = 10) -> tuple[int, str]:
    """curl inside the capsule: (exit code, body). 0 = fetched, 7 = refused, 22 = HTTP error."""
    args = " ".join(extra)
    out = api.sh(cid, f"curl -sS -f -k -m {timeout} {args} {url}", timeout_sec=timeout + 10)
    return out["exit_code"], out["stdout"]


def tag_of(data_dir: Path) -> str:
    return hashlib.sha256(str((data_dir / "host").resolve()).encode()).hexdigest()[:6]


def slot_of(server, cid: str) -> int | None:
    meta = json.loads((server.data_dir / "host" / "capsules" / cid / "meta.json").read_text())
    return meta.get("slot")


def namespaces(tag: str) -> set[str]:
    return {line.split()[0] for line in subprocess.run(["ip", "netns"], capture_output=True, text=True)
            .stdout.splitlines() if line.startswith(f"wrenn-{tag}-")}


def links(tag: str) -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()
            if line.split(":")[1].strip().startswith(f"w{tag}-")}


def host_table(tag: str) -> str:
    return subprocess.run(["nft", "list", "table", "ip", f"wrenn_{tag}"], capture_output=True, text=True).stdout


def test_health_reports_networking(api: Api) -> None:
    net = api.get("/health").json()["network"]
    assert net["enabled"] is True and net["pool"] == "10.201.0.0/16"


def test_default_reaches_the_internet_host_and_not_private_ranges(api: Api, testhost) -> None:
    cid = api.running()["id"]
    assert curl(api, cid, f"http://{HOST_IP}/") == (0, f"hello {HOST_IP}")
    code, body = curl(api, cid, f"https://{HOST_IP}/")
    assert (code, body) == (0, "secure None")  # no SNI for an address
    out = api.sh(cid, "ip -4 -o addr show eth0; ip route show default; cat /etc/resolv.conf")
    assert "169.254.0.21/30" in out["stdout"] and "default via 169.254.0.22" in out["stdout"]
    # The metadata range and the private ranges are closed by default, refused at once.
    started = time.monotonic()
    assert curl(api, cid, "http://169.254.169.254/", timeout=5)[0] == 7
    assert curl(api, cid, "http://10.201.0.1/", timeout=5)[0] == 7
    assert time.monotonic() - started < 8


def test_no_internet_then_allow_out_then_patch(api: Api, testhost) -> None:
    closed = api.running(allow_internet_access=False)
    assert closed["allow_internet_access"] is False
    assert curl(api, closed["id"], f"http://{HOST_IP}/", timeout=5)[0] == 7

    allowed = api.running(allow_internet_access=False, network={"allow_out": [f"{HOST_IP}/32"]})
    assert curl(api, allowed["id"], f"http://{HOST_IP}/") == (0, f"hello {HOST_IP}")

    denied = api.running(network={"deny_out": ["198.51.100.0/24"]})
    assert curl(api, denied["id"], f"http://{HOST_IP}/", timeout=5)[0] == 7

    # PATCH on the running capsule: in force at once, no restart.
    cid = closed["id"]
    resp = api.patch(f"/v1/capsules/{cid}/network", json={"allow_internet_access": True})
    assert resp.status_code == 200 and resp.json()["allow_internet_access"] is True, resp.text
    assert curl(api, cid, f"http://{HOST_IP}/") == (0, f"hello {HOST_IP}")
    resp = api.patch(f"/v1/capsules/{cid}/network", json={"network": {"deny_out": [HOST_IP]}})
    assert resp.json()["network"]["deny_out"] == [HOST_IP]
    assert curl(api, cid, f"http://{HOST_IP}/", timeout=5)[0] == 7
    bad = api.patch(f"/v1/capsules/{cid}/network", json={"network": {"allow_out": ["no such thing"]}})
    assert bad.status_code == 400 and "no such thing" in bad.json()["error"]["message"]


def test_domain_rules_by_host_header_and_sni(api: Api, testhost) -> None:
    cid = api.running(allow_internet_access=False,
                      network={"allow_out": ["allowed.test", "*.wild.test"], "deny_out": ["blocked.test"]})["id"]
    res = f"--resolve allowed.test:80:{HOST_IP} --resolve allowed.test:443:{HOST_IP}"
    assert curl(api, cid, "http://allowed.test/", res) == (0, "hello allowed.test")
    assert curl(api, cid, "https://allowed.test/", res) == (0, "secure allowed.test")
    assert curl(api, cid, "https://a.wild.test/", f"--resolve a.wild.test:443:{HOST_IP}") == (0, "secure a.wild.test")
    # The same address asked for by another name: the name decides.
    code, _ = curl(api, cid, "http://other.test/", f"--resolve other.test:80:{HOST_IP}", timeout=5)
    assert code == 22  # the proxy answers 403
    assert curl(api, cid, "https://other.test/", f"--resolve other.test:443:{HOST_IP}", timeout=5)[0] != 0
    # By address only (no name): the internet is closed.
    assert curl(api, cid, f"http://{HOST_IP}/", timeout=5)[0] != 0
    # A denied name does not resolve.
    assert api.sh(cid, "getent hosts blocked.test")["exit_code"] != 0


def test_denied_domain_with_open_internet(api: Api, testhost) -> None:
    cid = api.running(network={"deny_out": ["blocked.test"]})["id"]
    assert curl(api, cid, "http://fine.test/", f"--resolve fine.test:80:{HOST_IP}") == (0, "hello fine.test")
    assert curl(api, cid, "http://blocked.test/", f"--resolve blocked.test:80:{HOST_IP}", timeout=5)[0] == 22
    assert curl(api, cid, f"http://{HOST_IP}/") == (0, f"hello {HOST_IP}")


def host_addresses() -> list[str]:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout
    return [line.split()[3].split("/")[0] for line in out.splitlines()
            if not line.split()[3].startswith("127.")]


def test_host_and_other_capsules_are_never_reachable(api: Api, wrenn_server, testhost) -> None:
    addrs = host_addresses()
    port = wrenn_server.port
    other = api.running()["id"]
    api.sh(other, "cd /tmp && nohup python3 -m http.server 8000 >/dev/null 2>&1 &")
    other_slot = slot_of(wrenn_server, other)
    other_ns_ip = f"10.201.{(other_slot * 4) // 256}.{(other_slot * 4) % 256 + 2}"
    # Even with every one of them named in allow_out.
    cid = api.running(network={"allow_out": addrs + ["10.201.0.0/16"]})["id"]
    for addr in addrs:
        assert curl(api, cid, f"http://{addr}:{port}/api/health", timeout=3)[0] != 0, addr
    assert curl(api, cid, f"http://{other_ns_ip}:8000/", timeout=3)[0] != 0
    # ...and the same service is there for its own capsule.
    assert api.sh(other, "curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8000/")["stdout"] == "200"


def test_networking_survives_pause_resume_and_snapshot(api: Api, testhost) -> None:
    cid = api.running(network={"deny_out": ["203.0.113.0/24"]})["id"]
    assert curl(api, cid, f"http://{HOST_IP}/")[0] == 0
    assert api.post(f"/v1/capsules/{cid}/pause").status_code == 200
    assert api.post(f"/v1/capsules/{cid}/resume").status_code == 200
    api.wait(cid)
    assert curl(api, cid, f"http://{HOST_IP}/") == (0, f"hello {HOST_IP}")
    name = f"net-{os.urandom(3).hex()}"
    resp = api.post("/v1/snapshots", json={"sandbox_id": cid, "name": name})
    assert resp.status_code == 201, resp.text
    try:
        clone = api.running(template=name)["id"]  # destroyed by api.cleanup
        assert curl(api, clone, f"http://{HOST_IP}/") == (0, f"hello {HOST_IP}")
        assert api.post(f"/v1/capsules/{cid}/resume").status_code == 200
        api.wait(cid)
        # Both run at once with the same guest address; each has its own way out.
        assert curl(api, cid, f"http://{HOST_IP}/")[0] == 0 and curl(api, clone, f"http://{HOST_IP}/")[0] == 0
    finally:
        api.delete(f"/v1/snapshots/{name}")


def test_destroy_and_failed_create_leave_nothing(api: Api, wrenn_server) -> None:
    tag = tag_of(wrenn_server.data_dir)
    cid = api.running(network={"allow_out": ["x.test"]})["id"]  # a domain rule: also in the host table
    slot = slot_of(wrenn_server, cid)
    assert f"wrenn-{tag}-{slot}" in namespaces(tag) and f"w{tag}-{slot}" in links(tag)
    assert f'"w{tag}-{slot}"' in host_table(tag)
    api.destroy(cid)
    assert f"wrenn-{tag}-{slot}" not in namespaces(tag) and f"w{tag}-{slot}" not in links(tag)
    assert f'"w{tag}-{slot}"' not in host_table(tag)
    # A create that fails after its slot was taken: a snapshot whose device state is damaged.
    src = api.running()["id"]
    name = f"broken-{os.urandom(3).hex()}"
    assert api.post("/v1/snapshots", json={"sandbox_id": src, "name": name}).status_code == 201
    try:
        tpl = json.loads(api.get("/v1/snapshots").text)
        assert any(t["name"] == name for t in tpl)
        states = list((wrenn_server.data_dir / "host" / "templates").glob("*/state"))
        newest = max(states, key=lambda p: p.stat().st_mtime)
        newest.write_bytes(b"garbage")
        before_ns, before_links = namespaces(tag), links(tag)
        resp = api.post("/v1/capsules", json={"template": name})
        assert resp.status_code in (201, 502), resp.text  # 502 once create answers after the boot
        bad = resp.json()["id"] if resp.status_code == 201 else api.get("/v1/capsules").json()[0]["id"]
        api.created.append(bad)
        deadline = time.monotonic() + 60
        while api.get_capsule(bad)["status"] not in ("error", "running") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert api.get_capsule(bad)["status"] == "error"
        time.sleep(1)  # the pool refills what the failed create took
        used = [n for n in namespaces(tag) - before_ns]
        assert len(namespaces(tag)) <= len(before_ns), used
        assert len(links(tag)) <= len(before_links)
    finally:
        api.delete(f"/v1/snapshots/{name}")


def test_kill_9_and_restart_reclaims_and_keeps_running_networking(tmp_path, testhost) -> None:
    import secrets as _secrets

    from tests.conftest import ServerHandle, _free_port, kill_qemus

    port = _free_port()
    server = ServerHandle(f"http://127.0.0.1:{port}/api", "wrn_" + _secrets.token_hex(16), tmp_path, port)
    tag = tag_of(tmp_path)
    server.start()
    api = Api(server)
    try:
        cid = api.running(network={"allow_out": ["kept.test"]})["id"]
        assert curl(api, cid, "http://kept.test/", f"--resolve kept.test:80:{HOST_IP}") == (0, "hello kept.test")
        slot = slot_of(server, cid)
        api.http.close()
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        server.start()
        api.http = server.client()
        api.wait(cid)
        # The running capsule kept its slot and its rules; DNS and the proxy answer again.
        assert slot_of(server, cid) == slot
        assert curl(api, cid, "http://kept.test/", f"--resolve kept.test:80:{HOST_IP}") == (0, "hello kept.test")
        assert api.sh(cid, "getent hosts deb.debian.org")["exit_code"] == 0
        # What the killed process had ready was reclaimed: in use + the new ready pool only.
        net = api.get("/health").json()["network"]
        assert len(namespaces(tag)) == net["slots_in_use"] + net["ready_slots"] == 1 + net["ready_slots"]
        api.destroy(cid)
    finally:
        api.cleanup()
        server.stop()
        kill_qemus(tmp_path)
    assert namespaces(tag) == set() and links(tag) == set()
    assert host_table(tag) == ""


def test_real_fetch_from_the_package_registry(api: Api) -> None:
    cid = api.running(template="base-python", timeout_sec=0)["id"]
    out = api.sh(cid, "cd /tmp && pip download --no-deps --no-cache-dir -q six && ls six-*.whl", timeout_sec=180)
    assert out["exit_code"] == 0, out
    assert out["stdout"].startswith("six-")


def test_without_networking_capsules_start_without_a_nic(tmp_path, monkeypatch, testhost) -> None:
    import secrets as _secrets

    from tests.conftest import ServerHandle, _free_port, kill_qemus

    monkeypatch.setenv("WRENN_NETWORK", "off")
    port = _free_port()
    server = ServerHandle(f"http://127.0.0.1:{port}/api", "wrn_" + _secrets.token_hex(16), tmp_path, port)
    server.start()
    api = Api(server)
    try:
        assert api.get("/health").json()["network"] == {"enabled": False, "reason": "disabled by WRENN_NETWORK=off"}
        cid = api.running()["id"]
        assert api.sh(cid, "echo ok")["stdout"] == "ok\n"
        assert api.sh(cid, "ip link show eth0")["exit_code"] != 0
        assert curl(api, cid, f"http://{HOST_IP}/", timeout=3)[0] != 0
        assert namespaces(tag_of(tmp_path)) == set()
    finally:
        api.cleanup()
        server.stop()
        kill_qemus(tmp_path)


def test_port_proxy_uses_the_nic_and_falls_back_for_loopback_services(api: Api, wrenn_server) -> None:
    import httpx

    cid = api.running()["id"]
    api.sh(cid, "mkdir -p /srv/a /srv/b && echo on-nic > /srv/a/index.html && echo on-lo > /srv/b/index.html && "
                "(cd /srv/a && nohup python3 -m http.server 8001 >/tmp/a.log 2>&1 &) && "
                "(cd /srv/b && nohup python3 -m http.server 8002 --bind 127.0.0.1 >/tmp/b.log 2>&1 &) && "
                "for i in $(seq 100); do curl -sf 127.0.0.1:8001 >/dev/null && curl -sf 127.0.0.1:8002 >/dev/null "
                "&& break; sleep 0.2; done")
    base = f"http://127.0.0.1:{wrenn_server.port}/"
    for port, body in ((8001, "on-nic\n"), (8002, "on-lo\n")):
        resp = httpx.get(base, headers={"Host": f"{port}-{cid}.localhost"}, timeout=30)
        assert (resp.status_code, resp.text) == (200, body)
    logs = api.sh(cid, "cat /tmp/a.log; echo ---; cat /tmp/b.log")["stdout"]
    nic_log, lo_log = logs.split("---")
    assert "169.254.0.22" in nic_log  # came in over the NIC, from the namespace's side
    assert "127.0.0.1" in lo_log  # through the guest agent, on the loopback
