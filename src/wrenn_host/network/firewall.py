"""nftables rulesets: the host's own table and the one inside each slot's namespace.

Both are rendered as text and loaded with `nft -f` in one transaction (`table X {}` + `delete
table X` + the new table), so a change is atomic and never touches any other table on the host.

Packet path: guest eth0 -> tap0 (namespace: per-capsule policy, masquerade to the slot address)
-> veth -> host (this table: DNS and proxied HTTP/TLS redirected to the egress proxy, nothing else
may reach the host, no slot may reach another, masquerade out of the host's routes).
"""

from __future__ import annotations

import ipaddress

from wrenn_host.network.policy import NEVER_RANGES, PRIVATE_RANGES, EgressPolicy

NS_TABLE = "wrenn"  # inside a slot's namespace: `inet wrenn`
TAP = "tap0"
NS_VETH = "veth0"


def _set(items: list[str]) -> str:
    return "{ " + ", ".join(items) + " }"


def capsule_ruleset(policy: EgressPolicy) -> str:
    """The namespace's table for one policy, in the order of `EgressPolicy.decide`."""
    never = _set([str(n) for n in NEVER_RANGES])
    private = _set([str(n) for n in PRIVATE_RANGES])
    sets, forward = [], [
        "ct state established,related accept",
        f'iifname "{NS_VETH}" drop',  # nothing may open a connection into the guest
        # DNS goes to the host's resolver, which applies the domain rules (redirected there).
        f'iifname "{TAP}" meta l4proto {{ tcp, udp }} th dport 53 accept',
    ]
    if policy.uses_domains:  # HTTP Host / TLS SNI are decided by the egress proxy on the host
        forward.append(f'iifname "{TAP}" tcp dport {{ 80, 443 }} accept')
    # Refused at once (a TCP reset, an ICMP error), so a guest's client fails fast instead of hanging.
    forward.append(f'iifname "{TAP}" ip daddr {never} goto refuse')
    for name, rules, verdict in (("allow_out", policy.allow, "accept"), ("deny_out", policy.deny, "goto refuse")):
        if rules.nets:
            sets.append(f"set {name} {{ type ipv4_addr; flags interval; auto-merge; "
                        f"elements = {_set([str(n) for n in rules.nets])} }}")
            forward.append(f'iifname "{TAP}" ip daddr @{name} {verdict}')
    forward.append(f'iifname "{TAP}" ip daddr {private} goto refuse')
    if not policy.allow_internet_access:
        forward.append(f'iifname "{TAP}" goto refuse')
    body = "\n".join(f"  {s}" for s in sets)
    return f"""table inet {NS_TABLE} {{}}
delete table inet {NS_TABLE}
table inet {NS_TABLE} {{
{body}
  chain refuse {{
    meta l4proto tcp reject with tcp reset
    reject with icmpx type admin-prohibited
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
{chr(10).join("    " + r for r in forward)}
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "{TAP}" ct state established,related accept
    iifname "{TAP}" icmp type echo-request accept
    iifname "{TAP}" drop
    iifname "{NS_VETH}" ct state established,related accept
    iifname "{NS_VETH}" drop
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "{NS_VETH}" masquerade
  }}
}}
"""


def host_ruleset(table: str, ifprefix: str, pool: ipaddress.IPv4Network, dns_port: int, proxy_port: int,
                 proxied: list[str]) -> str:
    """The host's table for this server's slots (interfaces `{ifprefix}*`)."""
    slots = f'"{ifprefix}*"'
    proxied_elems = f"elements = {_set([chr(34) + p + chr(34) for p in proxied])}; " if proxied else ""
    return f"""table ip {table} {{}}
delete table ip {table}
table ip {table} {{
  set proxied {{ type ifname; {proxied_elems}}}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname {slots} meta l4proto {{ tcp, udp }} th dport 53 redirect to :{dns_port}
    iifname @proxied tcp dport {{ 80, 443 }} redirect to :{proxy_port}
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname {slots} ct state established,related accept
    iifname {slots} ct status dnat meta l4proto {{ tcp, udp }} th dport {{ {dns_port}, {proxy_port} }} accept
    iifname {slots} icmp type echo-request accept
    iifname {slots} drop
    meta l4proto {{ tcp, udp }} th dport {{ {dns_port}, {proxy_port} }} drop
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname {slots} oifname {slots} drop
    oifname {slots} ct state established,related tcp flags syn tcp option maxseg size set rt mtu
    iifname {slots} tcp flags syn tcp option maxseg size set rt mtu
    oifname {slots} ct state established,related accept
    oifname {slots} drop
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {pool} oifname != {slots} masquerade
  }}
}}
"""
