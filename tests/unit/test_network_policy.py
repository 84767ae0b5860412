"""Egress policy: parsing, the order of decisions, the nftables text it becomes, what the egress
proxy reads from a connection (Host, SNI), and the API's network fields (fake host agent)."""

from __future__ import annotations

import shutil
import ssl
import subprocess

import pytest

from wrenn_host.api import HostAgentError
from wrenn_host.network import firewall
from wrenn_host.network.egress import http_host, tls_sni
from wrenn_host.network.policy import EgressPolicy, InvalidPolicy

from .fake_host_agent import assert_error, make_settings, running_app


def test_default_allows_public_and_denies_private_and_never_ranges():
    p = EgressPolicy()
    assert p.is_default and not p.uses_domains
    assert p.decide("198.51.100.7")
    for ip in ("10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1"):  # private
        assert not p.decide(ip)
    for ip in ("169.254.169.254", "127.0.0.1", "0.0.0.0", "224.0.0.1"):  # never
        assert not p.decide(ip)


def test_allow_wins_over_deny_and_names_private_ranges():
    p = EgressPolicy.parse(True, ["10.5.0.0/16", "ok.example.com"], ["0.0.0.0/0", "*.example.com"])
    assert p.decide("10.5.1.1")  # private, but named by allow_out
    assert not p.decide("10.6.1.1")
    assert not p.decide("198.51.100.7")  # deny 0.0.0.0/0
    assert p.decide("198.51.100.7", "ok.example.com")  # allowed name wins over the denied wildcard
    assert not p.decide("198.51.100.7", "bad.example.com")
    assert not p.decide("169.254.169.254", "ok.example.com")  # never, whatever the rules say


def test_no_internet_with_allowed_domain():
    p = EgressPolicy.parse(False, ["pypi.org", "*.pythonhosted.org"], [])
    assert not p.decide("198.51.100.7")
    assert p.decide("198.51.100.7", "pypi.org")
    assert p.decide("198.51.100.7", "files.pythonhosted.org")
    assert not p.decide("198.51.100.7", "pythonhosted.org")  # a wildcard is for names below it
    assert p.may_resolve("pypi.org") and not p.may_resolve("example.com")


def test_deny_domain_blocks_resolution_only_for_that_name():
    p = EgressPolicy.parse(True, [], ["blocked.test"])
    assert not p.may_resolve("blocked.test") and not p.may_resolve("BLOCKED.test.")
    assert p.may_resolve("other.test")
    assert p.decide("198.51.100.7", "other.test") and not p.decide("198.51.100.7", "blocked.test")


@pytest.mark.parametrize("entry", ["", "not a domain", "300.1.1.1", "10.0.0.0/33", "::1", "2001:db8::/32",
                                   "-bad.com", "a..b", "*.*.com", 5])
def test_bad_entries_are_named(entry):
    with pytest.raises(InvalidPolicy) as e:
        EgressPolicy.parse(True, [entry], [])
    assert "allow_out" in str(e.value)


def test_long_bad_entry_is_quoted_short():
    with pytest.raises(InvalidPolicy) as e:
        EgressPolicy.parse(True, [], ["x" * 5000 + "!"])
    assert len(str(e.value)) < 200 and "deny_out" in str(e.value)


def test_round_trip_through_dict():
    p = EgressPolicy.parse(False, ["1.2.3.4", "10.0.0.0/8", "a.test", "*.b.test"], ["5.6.7.0/24"])
    d = p.to_dict()
    assert d == {"allow_internet_access": False, "allow_out": ["1.2.3.4", "10.0.0.0/8", "a.test", "*.b.test"],
                 "deny_out": ["5.6.7.0/24"]}
    assert EgressPolicy.from_dict(d) == p


nft = pytest.mark.skipif(shutil.which("nft") is None, reason="nftables not installed")


@nft
@pytest.mark.parametrize("policy", [EgressPolicy(), EgressPolicy.parse(False, ["10.0.0.0/8", "x.test"], ["1.2.3.4"]),
                                    EgressPolicy.parse(True, [], ["0.0.0.0/0"])])
def test_capsule_ruleset_is_valid_nft(policy):
    text = firewall.capsule_ruleset(policy)
    check = subprocess.run(["nft", "-c", "-f", "-"], input=text.replace("delete table inet wrenn\n", ""),
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr + text
    assert ("tcp dport { 80, 443 } accept" in text) == policy.uses_domains


@nft
def test_host_ruleset_is_valid_nft():
    import ipaddress

    text = firewall.host_ruleset("wrenn_test00", "wtest00-", ipaddress.IPv4Network("10.201.0.0/16"), 5353, 5354,
                                 ["wtest00-3"])
    check = subprocess.run(["nft", "-c", "-f", "-"], input=text.replace("delete table ip wrenn_test00\n", ""),
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr + text


def test_http_host_header():
    assert http_host(b"GET / HTTP/1.1\r\nUser-Agent: x\r\nhost: Example.COM:8080\r\n\r\n") == "Example.COM"
    assert http_host(b"GET / HTTP/1.1\r\nUser-Agent: x\r\n\r\nHost: late.test\r\n") is None


def test_tls_sni_from_a_real_client_hello():
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="sni.example.test")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert tls_sni(hello) == "sni.example.test"
    assert tls_sni(hello[:20]) is None and tls_sni(b"GET / HTTP/1.1\r\n") is None


# ---- the API ---------------------------------------------------------------------------------


@pytest.fixture
async def h(tmp_path):
    async with running_app(make_settings(tmp_path)) as harness:
        yield harness


async def test_create_defaults_and_rules_reach_the_host(h):
    c = await h.running_capsule()
    assert c["allow_internet_access"] is True and c["network"] == {"allow_out": [], "deny_out": []}
    assert h.fake.capsules[c["id"]].network == EgressPolicy()

    resp = await h.client.post("/v1/capsules", json={
        "allow_internet_access": False, "network": {"allow_out": ["Pypi.org", "198.51.100.0/24"], "deny_out": []}})
    assert resp.status_code == 201, resp.text
    c = resp.json()
    assert c["allow_internet_access"] is False
    assert c["network"] == {"allow_out": ["198.51.100.0/24", "pypi.org"], "deny_out": []}
    await h.wait_status(c["id"], "running")
    assert h.fake.capsules[c["id"]].network.decide("198.51.100.9")
    assert not h.fake.capsules[c["id"]].network.decide("203.0.113.9")


async def test_bad_entry_is_400_naming_it(h):
    resp = await h.client.post("/v1/capsules", json={"network": {"deny_out": ["10.0.0.0/8", "no way"]}})
    assert_error(resp, 400, "invalid_request")
    assert "'no way'" in resp.json()["error"]["message"] and "deny_out" in resp.json()["error"]["message"]
    assert len(h.fake.capsules) == 0


async def test_patch_changes_only_given_fields_on_running_and_paused(h):
    c = await h.running_capsule(network={"deny_out": ["1.2.3.4"]})
    resp = await h.client.patch(f"/v1/capsules/{c['id']}/network", json={"allow_internet_access": False})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["allow_internet_access"] is False and body["network"]["deny_out"] == ["1.2.3.4"]
    assert h.fake.capsules[c["id"]].network == EgressPolicy.parse(False, [], ["1.2.3.4"])

    assert (await h.client.post(f"/v1/capsules/{c['id']}/pause")).status_code == 200
    resp = await h.client.patch(f"/v1/capsules/{c['id']}/network", json={"network": {"allow_out": ["a.test"]}})
    assert resp.status_code == 200, resp.text
    assert resp.json()["network"] == {"allow_out": ["a.test"], "deny_out": ["1.2.3.4"]}
    got = (await h.client.get(f"/v1/capsules/{c['id']}")).json()
    assert got["network"] == {"allow_out": ["a.test"], "deny_out": ["1.2.3.4"]} and got["status"] == "paused"

    assert_error(await h.client.patch(f"/v1/capsules/{c['id']}/network", json={"network": {"allow_out": ["::"]}}),
                 400, "invalid_request")
    await h.client.delete(f"/v1/capsules/{c['id']}")
    assert_error(await h.client.patch(f"/v1/capsules/{c['id']}/network", json={}), 409, "invalid_state")
    assert_error(await h.client.patch("/v1/capsules/cl-nosuchcapsule0000000000000/network", json={}),
                 404, "not_found")


async def test_patch_host_failure_is_502_and_keeps_the_old_rules(h):
    c = await h.running_capsule()
    h.fake.failures["update_network"] = (HostAgentError("nft failed"), 1)
    assert_error(await h.client.patch(f"/v1/capsules/{c['id']}/network", json={"allow_internet_access": False}),
                 502, "agent_error")
    assert (await h.client.get(f"/v1/capsules/{c['id']}")).json()["allow_internet_access"] is True





async def test_network_off_where_the_host_cannot(monkeypatch):
    import wrenn_host.network as net

    monkeypatch.setattr(net, "_cap_net_admin", lambda: False)
    n = net.CapsuleNetwork("abcdef0123", enabled=True)
    await n.start()
    assert n.status() == {"enabled": False, "reason": "the server lacks CAP_NET_ADMIN (run it as root)"}
    with pytest.raises(net.NetworkError, match="CAP_NET_ADMIN"):
        await n.acquire(EgressPolicy())
    await n.close()
