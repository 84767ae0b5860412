"""A capsule's egress policy (E2B's semantics and names) and the one place it is decided.

`allow_internet_access=False` means "deny 0.0.0.0/0". Entries are IPv4 addresses, CIDRs or domain
names (`example.com` matches that name only, `*.example.com` any name below it). An `allow_out`
entry wins over a `deny_out` entry. Private ranges are denied unless an `allow_out` entry names
them; what no rule may open (the host, other capsules, link-local) is enforced below this, by the
host firewall, whatever a policy says.

The namespace firewall (`firewall.capsule_ruleset`) decides by address; the egress proxy decides
HTTP (Host) and TLS (SNI) connections of capsules that have domain entries, with `decide` below,
so both use the same order of rules.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Iterable
from typing import Any

MAX_ENTRIES = 256  # per list: each becomes a set element or a name to match
PRIVATE_RANGES = tuple(ipaddress.IPv4Network(n) for n in
                       ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"))
# Never reachable from a guest: "this network", loopback, link-local (cloud metadata), multicast
# and reserved. The host's own addresses and other capsules are closed by the host firewall.
NEVER_RANGES = tuple(ipaddress.IPv4Network(n) for n in
                     ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/3"))

# One entry, as the OpenAPI states it too: an IPv4 address or CIDR, or a domain whose last label
# starts with a letter (so a mistyped address such as 10.0.0.256 is refused, not taken as a name).
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
IPV4_PATTERN = rf"{_OCTET}(\.{_OCTET}){{3}}(/([0-9]|[12][0-9]|3[0-2]))?"
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_TLD = r"[A-Za-z]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
DOMAIN_PATTERN = rf"(\*\.)?({_LABEL}\.)*{_TLD}\.?"
ENTRY_PATTERN = rf"^({IPV4_PATTERN}|{DOMAIN_PATTERN})$"
ENTRY_MAX_LENGTH = 254
_IPV4 = re.compile(IPV4_PATTERN)
_DOMAIN = re.compile(DOMAIN_PATTERN)


class InvalidPolicy(ValueError):
    """A policy entry that is neither an IPv4 address/CIDR nor a domain name (message names it)."""


def _quote(entry: str, limit: int = 80) -> str:
    return repr(entry if len(entry) <= limit else entry[:limit] + "...")


@dataclasses.dataclass(frozen=True)
class Rules:
    """One list (allow_out or deny_out), split by kind."""

    nets: tuple[ipaddress.IPv4Network, ...] = ()
    names: tuple[str, ...] = ()  # exact names
    suffixes: tuple[str, ...] = ()  # from "*.example.com": ".example.com"

    @classmethod
    def parse(cls, entries: Iterable[Any], field: str) -> Rules:
        entries = list(entries)
        if len(entries) > MAX_ENTRIES:
            raise InvalidPolicy(f"{field}: at most {MAX_ENTRIES} entries")
        nets, names, suffixes = [], [], []
        for entry in entries:
            if not isinstance(entry, str) or not entry.strip():
                raise InvalidPolicy(f"{field}: entry {_quote(str(entry))} is not an address, CIDR or domain")
            text = entry.lower()
            if _IPV4.fullmatch(text):
                nets.append(ipaddress.IPv4Network(text, strict=False))
            elif ":" in text:
                raise InvalidPolicy(f"{field}: {_quote(entry)}: IPv6 is not supported (capsules have IPv4 only)")
            elif len(text) <= ENTRY_MAX_LENGTH and _DOMAIN.fullmatch(text):
                text = text.rstrip(".")
                if text.startswith("*."):
                    suffixes.append(text[1:])
                else:
                    names.append(text)
            else:
                raise InvalidPolicy(f"{field}: {_quote(entry)} is not an IPv4 address, CIDR or domain name")
        return cls(tuple(dict.fromkeys(nets)), tuple(dict.fromkeys(names)), tuple(dict.fromkeys(suffixes)))

    def has_net(self, ip: ipaddress.IPv4Address) -> bool:
        return any(ip in net for net in self.nets)

    def has_name(self, name: str | None) -> bool:
        if not name:
            return False
        name = name.lower().rstrip(".")
        return name in self.names or any(name.endswith(s) for s in self.suffixes)

    @property
    def has_domains(self) -> bool:
        return bool(self.names or self.suffixes)

    def entries(self) -> list[str]:
        out = [str(n) if n.prefixlen < 32 else str(n.network_address) for n in self.nets]
        return out + list(self.names) + ["*" + s for s in self.suffixes]


@dataclasses.dataclass(frozen=True)
class EgressPolicy:
    allow_internet_access: bool = True
    allow: Rules = Rules()
    deny: Rules = Rules()

    @classmethod
    def parse(cls, allow_internet_access: bool | None = True, allow_out: Iterable[Any] | None = None,
              deny_out: Iterable[Any] | None = None) -> EgressPolicy:
        return cls(True if allow_internet_access is None else bool(allow_internet_access),
                   Rules.parse(allow_out or (), "allow_out"), Rules.parse(deny_out or (), "deny_out"))

    @property
    def is_default(self) -> bool:
        return self == EgressPolicy()

    @property
    def uses_domains(self) -> bool:
        return self.allow.has_domains or self.deny.has_domains

    def decide(self, ip: ipaddress.IPv4Address | str, name: str | None = None) -> bool:
        """May a new connection to `ip` (asked for as `name`, when known) leave the capsule?"""
        ip = ipaddress.IPv4Address(ip)
        if any(ip in net for net in NEVER_RANGES):
            return False
        if self.allow.has_name(name) or self.allow.has_net(ip):
            return True
        if self.deny.has_name(name) or self.deny.has_net(ip):
            return False
        if any(ip in net for net in PRIVATE_RANGES):
            return False
        return self.allow_internet_access

    def may_resolve(self, name: str) -> bool:
        """DNS: a denied name gets no answer; with the internet closed only allowed names resolve."""
        if self.allow.has_name(name):
            return True
        if self.deny.has_name(name):
            return False
        return self.allow_internet_access or not self.allow.has_domains

    # persisted in the capsule's meta.json and in the control plane's database
    def to_dict(self) -> dict[str, Any]:
        return {"allow_internet_access": self.allow_internet_access,
                "allow_out": self.allow.entries(), "deny_out": self.deny.entries()}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> EgressPolicy:
        data = data or {}
        return cls.parse(data.get("allow_internet_access", True), data.get("allow_out"), data.get("deny_out"))
