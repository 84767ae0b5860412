"""Network slots: one namespace per capsule holding its tap, a veth pair to the host.

Every guest sees the same address, MAC and gateway (the template snapshot was taken with them),
so a restored clone needs no re-addressing: what differs per capsule is the slot's host-side /30
from the address pool. Names are derived from the slot index in one place (`Slot`), and a slot is
claimed host-wide with an O_EXCL file under /run/wrenn/net/, so two servers on one host never use
the same addresses, and start-up reclaims exactly the slots this server left behind.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import ipaddress
import os
import struct
import subprocess
import threading
from pathlib import Path

from wrenn_host.network import firewall
from wrenn_host.network.policy import EgressPolicy

GUEST_IP = "169.254.0.21"  # eth0 in every guest (set by its init)
GATEWAY_IP = "169.254.0.22"  # tap0 in every namespace
GUEST_MAC = "02:57:52:4e:00:01"
# The tap's MAC is fixed too: a guest restored from a snapshot keeps its ARP entry for the gateway.
GATEWAY_MAC = "02:57:52:4e:00:02"
REGISTRY = Path("/run/wrenn/net")

_CLONE_NEWNET = 0x40000000
_TUNSETIFF = 0x400454CA
_IFF_TAP, _IFF_NO_PI, _IFF_VNET_HDR = 0x0002, 0x1000, 0x4000


class NetworkError(RuntimeError):
    pass


def run(argv: list[str], stdin: str | None = None, *, background: bool = False) -> None:
    # Background work (the pool's refill) yields the CPU to the VMs: it must not slow a create.
    proc = subprocess.run((["nice", "-n", "19"] if background else []) + argv, input=stdin,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise NetworkError(f"{' '.join(argv[:4])}: {(proc.stderr or proc.stdout).strip()[-500:]}")


@dataclasses.dataclass(frozen=True)
class Slot:
    tag: str  # the owning server (HostPaths tag)
    index: int
    pool: ipaddress.IPv4Network

    @property
    def netns(self) -> str:
        return f"wrenn-{self.tag}-{self.index}"

    @property
    def host_veth(self) -> str:  # at most 15 characters: w + 6 + - + 5
        return f"w{self.tag}-{self.index}"

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network((int(self.pool.network_address) + 4 * self.index, 30))

    @property
    def host_ip(self) -> str:
        return str(self.subnet.network_address + 1)

    @property
    def ns_ip(self) -> str:
        """The address the slot's traffic has on the host (after the namespace's masquerade)."""
        return str(self.subnet.network_address + 2)

    # ---------------------------------------------------------------- set-up and tear-down

    def create(self, policy: EgressPolicy, *, background: bool = False) -> None:
        """Namespace, veth pair, tap and firewall (tens of ms: done ahead, by the pool)."""
        bg = {"background": background}
        try:
            run(["ip", "netns", "add", self.netns], **bg)
            run(["ip", "link", "add", self.host_veth, "type", "veth", "peer", "name", firewall.NS_VETH,
                 "netns", self.netns], **bg)
            run(["ip", "-b", "-"], stdin=f"addr add {self.host_ip}/30 dev {self.host_veth}\n"
                                         f"link set {self.host_veth} up\n", **bg)
            run(["ip", "-n", self.netns, "-b", "-"], **bg, stdin="\n".join([
                "link set lo up",
                f"addr add {self.ns_ip}/30 dev {firewall.NS_VETH}",
                f"link set {firewall.NS_VETH} up",
                f"tuntap add dev {firewall.TAP} mode tap vnet_hdr",
                f"link set {firewall.TAP} address {GATEWAY_MAC}",
                f"addr add {GATEWAY_IP}/30 dev {firewall.TAP}",
                f"link set {firewall.TAP} up",
                f"route add default via {self.host_ip}",
            ]) + "\n")
            run(["ip", "netns", "exec", self.netns, "sysctl", "-qw", "net.ipv4.ip_forward=1",
                 "net.ipv6.conf.all.disable_ipv6=1"], **bg)
            self.apply(policy, background=background)
        except BaseException:
            self.destroy()
            raise

    def apply(self, policy: EgressPolicy, *, background: bool = False) -> None:
        run(["ip", "netns", "exec", self.netns, "nft", "-f", "-"], stdin=firewall.capsule_ruleset(policy),
            background=background)

    def destroy(self) -> None:
        """Idempotent: the namespace takes its tap, its veth end (and so the pair) and its rules."""
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.host_veth], capture_output=True)

    def exists(self) -> bool:
        return Path("/run/netns", self.netns).exists()

    def open_tap(self) -> int:
        """An fd on the namespace's tap for QEMU (`-netdev tap,fd=`): QEMU itself stays out of the
        namespace and needs no privilege to open devices."""
        result: list[int | BaseException] = []
        thread = threading.Thread(target=self._open_tap_in_ns, args=(result,), name=f"tap {self.netns}")
        thread.start()
        thread.join()
        if isinstance(result[0], BaseException):
            raise NetworkError(f"cannot open the tap of {self.netns}: {result[0]}")
        return result[0]

    def _open_tap_in_ns(self, result: list) -> None:
        # setns changes only this thread, which ends right after (it never runs other work).
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            with open(f"/run/netns/{self.netns}") as ns:
                if libc.setns(ns.fileno(), _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            try:
                ifr = struct.pack("16sH", firewall.TAP.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR)
                fcntl.ioctl(fd, _TUNSETIFF, ifr)
            except BaseException:
                os.close(fd)
                raise
            result.append(fd)
        except BaseException as e:
            result.append(e)

    # ---------------------------------------------------------------- host-wide claim

    @property
    def _claim(self) -> Path:
        return REGISTRY / str(self.pool).replace("/", "_") / str(self.index)

    def claim(self) -> bool:
        self._claim.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self._claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self.tag)
        return True

    def unclaim(self) -> None:
        self._claim.unlink(missing_ok=True)

    @classmethod
    def claimed_by(cls, tag: str, pool: ipaddress.IPv4Network) -> list[Slot]:
        d = REGISTRY / str(pool).replace("/", "_")
        slots = []
        for f in d.glob("*") if d.exists() else ():
            try:
                if f.name.isdigit() and f.read_text().strip() == tag:
                    slots.append(cls(tag, int(f.name), pool))
            except OSError:
                continue
        return slots
