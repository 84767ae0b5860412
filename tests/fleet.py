"""A fleet on one machine, for the fleet tests and benchmark. Every part is a real process:

- PostgreSQL (tests/pg.py), the shared state;
- host agents (`wrenn host-agent`), each in a network namespace of its own with its own address
  (198.18.<i>.2, the test's own test hosts; 198.18/15 is the benchmarking range, routed nowhere);
- control-plane replicas (`wrenn control-plane`) on the loopback, behind a small TCP load balancer
  (what an operator puts in front of replicas: one URL, dead replicas skipped). The host agents
  reach it at 198.18.<i>.1, the root end of their namespace's veth pair.

`with Fleet(hosts=3, replicas=2) as fleet:` starts it all and tears it all down (processes,
namespaces, veths, VMs, the database) however the test ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import _free_port, kill_qemus
from tests.pg import start_postgres

AGENT_PORT = 7070
NET_PREFIX = "198.18"


class LoadBalancer:
    """TCP round robin over the replicas that accept a connection, in a thread of its own."""

    def __init__(self, backends: list[int], addresses: list[str]):
        self.backends = backends
        self.addresses = addresses
        self.port = _free_port()
        self._next = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._servers: list[asyncio.AbstractServer] = []
        self._thread = threading.Thread(target=self._run, name="fleet-lb", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("load balancer did not start")

    def add_address(self, address: str) -> None:
        asyncio.run_coroutine_threadsafe(self._listen(address), self._loop).result(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            for address in self.addresses:
                await self._listen(address)
            self._ready.set()

        self._loop.run_until_complete(main())
        self._loop.run_forever()

    async def _listen(self, address: str) -> None:
        self._servers.append(await asyncio.start_server(self._serve, address, self.port))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        start = next(self._next)
        for i in range(len(self.backends)):
            port = self.backends[(start + i) % len(self.backends)]
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                continue
        else:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                if dst.can_write_eof():
                    dst.write_eof()
            except (OSError, RuntimeError):
                pass

        # When the replica's side ends (it answered and closed, or it died), the client's side is
        # closed too, as a load balancer does, so no client keeps a connection to a dead replica.
        down = asyncio.ensure_future(pipe(up_reader, writer))
        up = asyncio.ensure_future(pipe(reader, up_writer))
        await asyncio.wait({down, up}, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.wait({down}, timeout=5)
        for w in (writer, up_writer):
            w.close()
        up.cancel()

    def close(self) -> None:
        def stop() -> None:
            for s in self._servers:
                s.close()
            self._loop.stop()

        if self._loop.is_running():
            self._loop.call_soon_threadsafe(stop)
            self._thread.join(10)


class Process:
    """A child process with its log file; `kill9` is what a crash looks like."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path):
        self.argv, self.env, self.log = argv, env, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 30) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill9()

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


class ControlPlane(Process):
    def __init__(self, index: int, database_url: str, env: dict[str, str], work: Path):
        self.index = index
        self.port = _free_port()
        data = work / f"cp{index}"
        data.mkdir()
        super().__init__([sys.executable, "-m", "wrenn_cli.main", "control-plane", "--database-url", database_url,
                          "--host", "127.0.0.1", "--port", str(self.port), "--data-dir", str(data)],
                         env, work / f"cp{index}.log")
        self.url = f"http://127.0.0.1:{self.port}/api"

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"control plane {self.index} exited:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code in (200, 503):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"control plane {self.index} did not come up:\n{self.tail()}")


class HostNode(Process):
    """A host: its own network namespace, address and data dir, running `wrenn host-agent`."""

    def __init__(self, index: int, suffix: str, control_plane_port: int, env: dict[str, str], work: Path):
        self.index = index
        self.netns = f"wfleet-{suffix}-{index}"
        self.veth = f"wfl{suffix}{index}"
        self.gateway = f"{NET_PREFIX}.{index}.1"
        self.address = f"{NET_PREFIX}.{index}.2"
        self.data_dir = work / f"host{index}"
        self.data_dir.mkdir()
        self.control_plane_url = f"http://{self.gateway}:{control_plane_port}"
        self.host_id: str | None = None
        self.token: str | None = None
        super().__init__([], env, work / f"host{index}.log")

    def make_namespace(self) -> None:
        run = lambda *argv: subprocess.run(argv, check=True, capture_output=True)  # noqa: E731
        run("ip", "netns", "add", self.netns)
        run("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.netns)
        run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.veth)
        run("ip", "link", "set", self.veth, "up")
        for cmd in (["addr", "add", f"{self.address}/24", "dev", "eth0"], ["link", "set", "eth0", "up"],
                    ["link", "set", "lo", "up"], ["route", "add", "default", "via", self.gateway]):
            run("ip", "-n", self.netns, *cmd)

    def start(self, token: str | None = None) -> None:
        """First start registers with `token`; later starts re-use the saved registration."""
        self.argv = ["ip", "netns", "exec", self.netns, sys.executable, "-m", "wrenn_cli.main", "host-agent",
                     "--control-plane", self.control_plane_url, "--listen", f"{self.address}:{AGENT_PORT}",
                     "--data-dir", str(self.data_dir)]
        if token:
            self.argv += ["--token", token]
        super().start()

    def close(self) -> None:
        self.kill9()
        kill_qemus(self.data_dir)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True)


class Fleet:
    def __init__(self, hosts: int = 3, replicas: int = 2, env: dict[str, str] | None = None):
        self.n_hosts, self.n_replicas = hosts, replicas
        self.suffix = secrets.token_hex(2)
        self.api_key = "wrn_" + secrets.token_hex(16)
        self._work = tempfile.TemporaryDirectory(prefix="wrenn-fleet-")
        self.work = Path(self._work.name)
        self.env = dict(os.environ, WRENN_BOOTSTRAP_API_KEY=self.api_key,
                        WRENN_JWT_SECRET=secrets.token_hex(32),  # replicas must share it (tickets)
                        # quick to notice a dead host, few idle VMs: this machine holds the whole fleet
                        # (offline after ten missed beats: an agent busy on two TCG cores may skip a few)
                        WRENN_HOST_OFFLINE_SEC="10", WRENN_HEARTBEAT_INTERVAL_SEC="1", WRENN_SPARE_VMS="0",
                        WRENN_NET_READY_SLOTS="1", WRENN_SAMPLER_INTERVAL_SEC="5", **(env or {}))
        self.replicas: list[ControlPlane] = []
        self.hosts: list[HostNode] = []
        self.lb: LoadBalancer | None = None
        self._stack = contextlib.ExitStack()

    # ---- set-up and tear-down ----------------------------------------------------------------

    def __enter__(self) -> Fleet:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        pg = self._stack.enter_context(start_postgres())
        with pg.connect() as conn:
            conn.execute('CREATE DATABASE "fleet"')
        self.database_url = pg.url("fleet")
        self.replicas = [ControlPlane(i, self.database_url, self.env, self.work) for i in range(self.n_replicas)]
        # One at a time: the first migrates the database and makes the operators' team.
        for cp in self.replicas:
            cp.start()
            cp.wait_healthy()
        self.lb = LoadBalancer([cp.port for cp in self.replicas], ["127.0.0.1"])
        self.lb.start()
        self.url = f"http://127.0.0.1:{self.lb.port}/api"
        for i in range(1, self.n_hosts + 1):
            node = HostNode(i, self.suffix, self.lb.port, self.env, self.work)
            self.hosts.append(node)
            node.make_namespace()
            self.lb.add_address(node.gateway)
        with self.client() as c:
            for node in self.hosts:
                r = c.post("/v1/hosts", json={"name": f"host{node.index}"})
                if r.status_code != 201:
                    raise RuntimeError(f"POST /v1/hosts: {r.status_code} {r.text}")
                node.host_id, node.token = r.json()["id"], r.json()["token"]
        for node in self.hosts:
            node.start(node.token)
        self.wait_hosts("online", [n.host_id for n in self.hosts], timeout=900)  # first start builds templates

    def close(self) -> None:
        for node in self.hosts:
            with contextlib.suppress(Exception):
                node.close()
        for cp in self.replicas:
            with contextlib.suppress(Exception):
                cp.kill9()
        if self.lb is not None:
            self.lb.close()
        self._stack.close()
        self._work.cleanup()

    # ---- driving it --------------------------------------------------------------------------

    def client(self, timeout: float = 180) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-API-Key": self.api_key}, timeout=timeout)

    def agreed(self, path: str, key=lambda body: body, timeout: float = 10) -> Any:  # type: ignore[no-untyped-def]
        """GET `path` from each live replica directly until they all answer the same (`key` of
        the body): replicas learn what another one wrote (a host gone offline or back) at their
        watcher's next pass, about a second."""
        deadline = time.monotonic() + timeout
        seen: list = []
        while time.monotonic() < deadline:
            seen = []
            for cp in self.replicas:
                if cp.alive():
                    with contextlib.suppress(httpx.HTTPError, ValueError):
                        r = httpx.get(cp.url + path, headers={"X-API-Key": self.api_key}, timeout=30)
                        seen.append(key(r.json()) if r.status_code == 200 else ("status", r.status_code))
            if seen and all(s == seen[0] for s in seen):
                return seen[0]
            time.sleep(0.1)
        raise RuntimeError(f"replicas disagree on {path} after {timeout}s: {seen}")

    def host(self, host_id: str) -> HostNode:
        return next(n for n in self.hosts if n.host_id == host_id)

    def hosts_status(self) -> dict[str, dict]:
        with self.client() as c:
            r = c.get("/v1/hosts")
            r.raise_for_status()
            return {h["id"]: h for h in r.json()}

    def wait_hosts(self, status: str, host_ids: list[str], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        seen: dict = {}
        while time.monotonic() < deadline:
            for node in self.hosts:
                if node.host_id in host_ids and node.argv and not node.alive() and status == "online":
                    raise RuntimeError(f"host agent {node.index} exited:\n{node.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                seen = self.hosts_status()
                if all(seen.get(h, {}).get("status") == status for h in host_ids):
                    return
            time.sleep(0.5)
        raise RuntimeError(f"hosts {host_ids} not {status} after {timeout}s: "
                           f"{ {h: s.get('status') for h, s in seen.items()} }")

    def wait_capsule(self, capsule_id: str, status: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        body: dict = {}
        with self.client() as c:
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    r = c.get(f"/v1/capsules/{capsule_id}")
                    body = r.json()
                    if r.status_code == 200 and body.get("status") == status:
                        return body
                time.sleep(0.5)
        raise RuntimeError(f"capsule {capsule_id} not {status} after {timeout}s: {body}")
