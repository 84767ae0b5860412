"""Capsule networking: a pool of ready slots, the host firewall, the egress proxy.

`CapsuleNetwork` is what the host agent uses: `acquire(policy)` hands out a ready slot (set up in
the background, so a create or resume pays only for applying a non-default policy), `release`
tears one down, `apply` changes a slot's rules in place. Where the host cannot do networking (no
CAP_NET_ADMIN, no /dev/net/tun, no nft), `enabled` is False, `reason` says why, and capsules
start without a NIC.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import shutil
import subprocess
from pathlib import Path

from wrenn_host.network import firewall
from wrenn_host.network.egress import EgressProxy
from wrenn_host.network.policy import EgressPolicy, InvalidPolicy
from wrenn_host.network.slots import NetworkError, Slot, run

log = logging.getLogger(__name__)

DEFAULT_POOL = "10.201.0.0/16"
DEFAULT_READY = 4


def _cap_net_admin() -> bool:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << 12))
    return False


def _host_addresses() -> set[str]:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout
    return {line.split()[3].split("/")[0] for line in out.splitlines() if len(line.split()) > 3}


class CapsuleNetwork:
    def __init__(self, tag: str, *, enabled: bool | None = None, pool: str | None = None,
                 ready: int | None = None):
        self.tag = tag[:6]
        self.table = f"wrenn_{self.tag}"
        self.ifprefix = f"w{self.tag}-"
        want = enabled if enabled is not None else os.environ.get("WRENN_NETWORK", "on").lower() not in (
            "0", "off", "false", "no")
        self.pool = ipaddress.IPv4Network(pool or os.environ.get("WRENN_NET_POOL") or DEFAULT_POOL)
        if self.pool.prefixlen > 30:
            raise ValueError(f"WRENN_NET_POOL {self.pool} is too small (at least a /30)")
        self.ready_target = ready if ready is not None else int(os.environ.get("WRENN_NET_READY_SLOTS") or DEFAULT_READY)
        self.enabled = False
        self.reason = "" if want else "disabled by WRENN_NETWORK=off"
        self._want = want
        self._started = False
        self._ready: list[Slot] = []
        self._owned: set[int] = set()  # slots this process created or adopted
        self._in_use: dict[str, tuple[Slot, EgressPolicy]] = {}  # slot ns_ip -> (slot, policy)
        self._proxied: set[str] = set()
        self._refill: asyncio.Task | None = None
        self._lock = asyncio.Lock()  # index allocation and the host table
        self._host_addrs: set[str] = set()
        self.proxy = EgressProxy(self._lookup, self._forbidden)

    # ---------------------------------------------------------------- start / stop

    async def start(self) -> None:
        """Check the host can do it, load the host table, start the proxy (idempotent)."""
        if self._started:
            return
        self._started = True
        if not self._want:
            return
        problem = self._missing()
        if problem:
            self.reason = problem
            log.warning("capsule networking off: %s", problem)
            return
        try:
            Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
            await self.proxy.start()
            self._host_addrs = await asyncio.to_thread(_host_addresses)
            await self._load_host_table()
        except (OSError, NetworkError) as e:
            await self.proxy.close()
            self.reason = f"host firewall could not be set up: {e}"
            log.warning("capsule networking off: %s", self.reason)
            return
        self.enabled = True

    def _missing(self) -> str:
        if not _cap_net_admin():
            return "the server lacks CAP_NET_ADMIN (run it as root)"
        if not os.path.exists("/dev/net/tun"):
            return "/dev/net/tun is missing"
        for tool in ("ip", "nft"):
            if shutil.which(tool) is None:
                return f"`{tool}` is not installed (apt-get install {'iproute2' if tool == 'ip' else 'nftables'})"
        return ""

    async def reclaim(self, in_use: dict[int, tuple[str, EgressPolicy]]) -> list[str]:
        """After a restart: adopt the slots of running capsules, remove every other slot this
        server left behind (namespace, veth, tap, rules, claim). Then keep the pool filled."""
        removed = []
        if self.enabled:
            for slot in Slot.claimed_by(self.tag, self.pool):
                if slot.index in in_use:
                    self.adopt(slot.index, in_use[slot.index][1])
                elif slot.index not in self._owned:
                    await asyncio.to_thread(slot.destroy)
                    slot.unclaim()
                    removed.append(slot.netns)
            await self._sync_proxied()
            self._start_refill()
        return removed

    async def close(self) -> None:
        """Ready slots go; slots of running capsules stay (the capsules keep running)."""
        if self._refill is not None:
            self._refill.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._refill
        for slot in self._ready:
            await asyncio.to_thread(slot.destroy)
            slot.unclaim()
        self._ready.clear()
        await self.proxy.close()
        if self.enabled and not self._in_use:
            await asyncio.to_thread(subprocess.run, ["nft", "delete", "table", "ip", self.table], capture_output=True)

    def status(self) -> dict[str, object]:
        info: dict[str, object] = {"enabled": self.enabled}
        if self.enabled:
            info.update(pool=str(self.pool), ready_slots=len(self._ready), slots_in_use=len(self._in_use))
        else:
            info["reason"] = self.reason
        return info

    # ---------------------------------------------------------------- slots

    async def acquire(self, policy: EgressPolicy) -> Slot:
        """A slot with `policy` in force: a ready one when there is one, else made now."""
        if not self.enabled:
            raise NetworkError(f"networking is unavailable: {self.reason}")
        if self._ready:
            slot = self._ready.pop(0)
            if not policy.is_default:
                try:
                    await asyncio.to_thread(slot.apply, policy)
                except BaseException:
                    await self.release(slot)
                    raise
        else:
            slot = await self._new_slot(policy)
        self._start_refill()
        self._in_use[slot.ns_ip] = (slot, policy)
        if policy.uses_domains:
            await self._sync_proxied()
        return slot

    def adopt(self, index: int, policy: EgressPolicy) -> Slot:
        """A slot a running capsule kept across a restart of the server."""
        slot = Slot(self.tag, index, self.pool)
        self._owned.add(index)
        self._in_use[slot.ns_ip] = (slot, policy)
        return slot

    async def apply(self, slot: Slot, policy: EgressPolicy) -> None:
        await asyncio.to_thread(slot.apply, policy)
        self._in_use[slot.ns_ip] = (slot, policy)
        await self._sync_proxied()

    async def release(self, slot: Slot) -> None:
        """Tear the slot down (its conntrack state and rules go with the namespace)."""
        was_proxied = slot.host_veth in self._proxied
        self._in_use.pop(slot.ns_ip, None)
        await asyncio.to_thread(slot.destroy)
        slot.unclaim()
        self._owned.discard(slot.index)
        if was_proxied:
            await self._sync_proxied()

    def open_tap(self, slot: Slot) -> int:
        return slot.open_tap()

    async def _new_slot(self, policy: EgressPolicy, *, background: bool = False) -> Slot:
        async with self._lock:
            slot = self._claim_index()
        try:
            await asyncio.to_thread(functools.partial(slot.create, policy, background=background))
        except BaseException:
            slot.unclaim()
            self._owned.discard(slot.index)
            raise
        return slot

    def _claim_index(self) -> Slot:
        for index in range(self.pool.num_addresses // 4):
            if index in self._owned:
                continue
            slot = Slot(self.tag, index, self.pool)
            if slot.claim():
                self._owned.add(index)
                return slot
        raise NetworkError(f"the address pool {self.pool} has no free slot left")

    def _start_refill(self) -> None:
        if self.enabled and (self._refill is None or self._refill.done()) and len(self._ready) < self.ready_target:
            self._refill = asyncio.create_task(self._fill(), name="network slot refill")

    async def _fill(self) -> None:
        while len(self._ready) < self.ready_target:
            try:
                self._ready.append(await self._new_slot(EgressPolicy(), background=True))
            except NetworkError as e:
                log.warning("network slot not made: %s", e)
                return

    # ---------------------------------------------------------------- host table and proxy

    async def _load_host_table(self) -> None:
        async with self._lock:
            text = firewall.host_ruleset(self.table, self.ifprefix, self.pool, self.proxy.dns_port,
                                         self.proxy.proxy_port, sorted(self._proxied))
            await asyncio.to_thread(run, ["nft", "-f", "-"], text)

    async def _sync_proxied(self) -> None:
        want = {slot.host_veth for slot, policy in self._in_use.values() if policy.uses_domains}
        if want != self._proxied:
            self._proxied = want
            await self._load_host_table()

    def _lookup(self, peer: str) -> EgressPolicy | None:
        entry = self._in_use.get(peer)
        return entry[1] if entry else None

    def _forbidden(self, address: str) -> bool:
        return address in self._host_addrs or ipaddress.IPv4Address(address) in self.pool


__all__ = ["CapsuleNetwork", "EgressPolicy", "InvalidPolicy", "NetworkError", "Slot"]
