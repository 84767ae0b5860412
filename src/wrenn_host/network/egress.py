"""The host side of capsule egress that needs names: a DNS forwarder and an HTTP/TLS proxy.

The host firewall redirects every capsule's DNS here, and the ports 80/443 of capsules whose policy
has domain entries. A connection is identified by its source address (the slot's, after the
namespace's masquerade); anything else is closed at once. The proxy reads the HTTP `Host` header or
the TLS ClientHello's SNI, decides with the capsule's policy, then connects to the address the guest
asked for (SO_ORIGINAL_DST) and relays bytes both ways; TLS is never terminated.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable
from pathlib import Path

from dnslib import QTYPE, RCODE, DNSRecord

from wrenn_host.network.policy import EgressPolicy

log = logging.getLogger(__name__)

SO_ORIGINAL_DST = 80
PEEK_LIMIT = 16 * 1024  # a ClientHello or request head bigger than this is refused
PEEK_TIMEOUT_S = 10.0
DNS_TIMEOUT_S = 5.0

PolicyLookup = Callable[[str], "EgressPolicy | None"]  # slot source address -> policy


def upstream_resolvers(resolv_conf: Path = Path("/etc/resolv.conf")) -> list[str]:
    servers = []
    with contextlib.suppress(OSError):
        for line in resolv_conf.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    servers.append(str(ipaddress.IPv4Address(parts[1])))
    return servers or ["127.0.0.1"]


# ---------------------------------------------------------------- parsing what the guest sends


def http_host(head: bytes) -> str | None:
    """The Host of an HTTP/1.x request head (None if there is none)."""
    for line in head.split(b"\r\n")[1:]:
        if not line:
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"host":
            host = value.strip().decode("latin-1")
            if host.startswith("["):
                return None
            return host.rsplit(":", 1)[0] if ":" in host else host
    return None


def tls_sni(data: bytes) -> str | None:
    """The server_name of a TLS ClientHello (one record), or None."""
    try:
        if data[0] != 0x16 or data[5] != 0x01:  # handshake record, ClientHello
            return None
        pos = 9 + 2 + 32  # record header 5 + handshake header 4, version, random
        pos += 1 + data[pos]  # session id
        pos += 2 + struct.unpack_from("!H", data, pos)[0]  # cipher suites
        pos += 1 + data[pos]  # compression methods
        end = pos + 2 + struct.unpack_from("!H", data, pos)[0]
        pos += 2
        while pos + 4 <= end:
            ext_type, ext_len = struct.unpack_from("!HH", data, pos)
            pos += 4
            if ext_type == 0:  # server_name: list length, type 0 (host_name), name length, name
                name_len = struct.unpack_from("!H", data, pos + 3)[0]
                return data[pos + 5:pos + 5 + name_len].decode("ascii")
            pos += ext_len
    except (IndexError, struct.error, UnicodeDecodeError):
        return None
    return None


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    """Enough of the stream to know the name: a whole TLS record or an HTTP request head."""
    data = b""
    while len(data) < PEEK_LIMIT:
        chunk = await reader.read(PEEK_LIMIT - len(data))
        if not chunk:
            break
        data += chunk
        if data[0] == 0x16:
            if len(data) >= 5 and len(data) >= 5 + struct.unpack_from("!H", data, 3)[0]:
                break
        elif b"\r\n\r\n" in data:
            break
    return data


# ---------------------------------------------------------------- the servers


class EgressProxy:
    def __init__(self, lookup: PolicyLookup, is_forbidden: Callable[[str], bool]):
        self.lookup = lookup
        self.is_forbidden = is_forbidden  # host addresses, slots: never, whatever a policy says
        self.upstream = upstream_resolvers()
        self.dns_port = 0
        self.proxy_port = 0
        self._servers: list[asyncio.AbstractServer] = []
        self._udp: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        tcp_proxy = await asyncio.start_server(self._relay, "0.0.0.0", 0)
        self.proxy_port = tcp_proxy.sockets[0].getsockname()[1]
        # DNS over UDP and TCP on one port number (the firewall redirects both to it).
        for _ in range(20):
            udp, _proto = await loop.create_datagram_endpoint(lambda: _DnsUdp(self), local_addr=("0.0.0.0", 0))
            port = udp.get_extra_info("sockname")[1]
            try:
                tcp_dns = await asyncio.start_server(self._dns_tcp, "0.0.0.0", port)
                break
            except OSError:
                udp.close()
        else:
            raise OSError("no port free for the DNS forwarder")
        self._udp, self.dns_port = udp, port
        self._servers = [tcp_proxy, tcp_dns]

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        if self._udp is not None:
            self._udp.close()
        for task in list(self._tasks):
            task.cancel()

    # ---- DNS

    async def answer(self, peer: str, query: bytes, tcp: bool = False) -> bytes | None:
        policy = self.lookup(peer)
        if policy is None:
            return None
        try:
            request = DNSRecord.parse(query)
        except Exception:
            return None
        name = str(request.q.qname).rstrip(".")
        if not policy.may_resolve(name):
            reply = request.reply()
            reply.header.rcode = RCODE.NXDOMAIN
            return reply.pack()
        if request.q.qtype == QTYPE.AAAA:  # capsules have IPv4 only: do not send them elsewhere
            return request.reply().pack()
        try:
            return await self._forward(query, tcp)
        except (OSError, asyncio.TimeoutError) as e:
            log.info("DNS %s for %s failed upstream: %s", name, peer, e)
            reply = request.reply()
            reply.header.rcode = RCODE.SERVFAIL
            return reply.pack()

    async def _forward(self, query: bytes, tcp: bool) -> bytes:
        server = self.upstream[0]
        if tcp:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(server, 53), DNS_TIMEOUT_S)
            try:
                writer.write(struct.pack("!H", len(query)) + query)
                n = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), DNS_TIMEOUT_S))[0]
                return await asyncio.wait_for(reader.readexactly(n), DNS_TIMEOUT_S)
            finally:
                writer.close()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Once(fut), remote_addr=(server, 53))
        try:
            transport.sendto(query)
            return await asyncio.wait_for(fut, DNS_TIMEOUT_S)
        finally:
            transport.close()

    async def _dns_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[0]
        try:
            while True:
                n = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 30))[0]
                answer = await self.answer(peer, await reader.readexactly(n), tcp=True)
                if answer is None:
                    break
                writer.write(struct.pack("!H", len(answer)) + answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, OSError):
            pass
        finally:
            writer.close()

    # ---- HTTP / TLS

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_writer = None
        try:
            peer = writer.get_extra_info("peername")[0]
            policy = self.lookup(peer)
            if policy is None:
                return
            sock = writer.get_extra_info("socket")
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port, packed = struct.unpack_from("!2xH4s", raw)
            dst = socket.inet_ntoa(packed)
            head = await asyncio.wait_for(_read_head(reader), PEEK_TIMEOUT_S)
            if not head:
                return
            name = tls_sni(head) if head[0] == 0x16 else http_host(head)
            if self.is_forbidden(dst) or not policy.decide(dst, name):
                log.info("egress %s -> %s:%s (%s) denied", peer, dst, port, name)
                if head[0] != 0x16:
                    writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                                 b"Content-Length: 32\r\n\r\nblocked by the egress policy\r\n\r\n")
                    await writer.drain()
                return
            up_reader, upstream_writer = await asyncio.wait_for(asyncio.open_connection(dst, port), 30)
            upstream_writer.write(head)
            await asyncio.gather(_pipe(reader, upstream_writer), _pipe(up_reader, writer))
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            log.debug("egress relay ended: %s", e)
        finally:
            for w in (writer, upstream_writer):
                if w is not None:
                    w.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(256 * 1024):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.close()


class _DnsUdp(asyncio.DatagramProtocol):
    def __init__(self, proxy: EgressProxy):
        self.proxy = proxy
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport):  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[override]
        task = asyncio.ensure_future(self._reply(data, addr))
        self.proxy._tasks.add(task)
        task.add_done_callback(self.proxy._tasks.discard)

    async def _reply(self, data: bytes, addr) -> None:
        answer = await self.proxy.answer(addr[0], data)
        if answer is not None and self.transport is not None:
            self.transport.sendto(answer, addr)


class _Once(asyncio.DatagramProtocol):
    def __init__(self, fut: asyncio.Future):
        self.fut = fut

    def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[override]
        if not self.fut.done():
            self.fut.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.fut.done():
            self.fut.set_exception(exc)
