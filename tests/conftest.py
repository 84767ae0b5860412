"""Shared fixtures. VM fixtures boot real microVMs (TCG here); they are session-scoped because a
template snapshot is built once and every capsule restores from it."""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import pytest_asyncio


def _maps_mention(proc: Path, marker: bytes) -> bool:
    """A spare VM handed to a capsule has the spare's name on its command line; its memory
    file is mapped under the capsule's name."""
    try:
        return marker in (proc / "maps").read_bytes()
    except OSError:
        return False


def qemu_pids(marker: str | Path) -> list[int]:
    """QEMU processes whose command line or mapped files mention `marker` (a data dir or capsule id)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if not cmd.startswith(b"qemu-system") or ") Z" in stat:
            continue
        if str(marker).encode() in cmd or _maps_mention(d, str(marker).encode()):
            pids.append(int(d.name))
    return pids


def kill_qemus(marker: str | Path) -> None:
    for pid in qemu_pids(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if Path(marker).is_dir():
        reclaim_host_leftovers(Path(marker))


def reclaim_host_leftovers(data_dir: Path) -> None:
    """What a stopped server keeps for capsules that would run on (network slots, its firewall
    table, VMM cgroups), once the test has killed those VMs behind its back. A real restart of
    the server reclaims the same at start-up."""
    import hashlib
    import time as _time

    full_tag = hashlib.sha256(str((data_dir / "host").resolve()).encode()).hexdigest()
    tag = full_tag[:6]
    for base in ("/run", "/tmp"):  # its socket directory (wrenn_host/paths.py)
        shutil.rmtree(Path(base, "wrenn", full_tag[:10]), ignore_errors=True)
    for ns in Path("/run/netns").glob(f"wrenn-{tag}-*") if Path("/run/netns").is_dir() else ():
        subprocess.run(["ip", "netns", "del", ns.name], capture_output=True)
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(f"w{tag}-"):
            subprocess.run(["ip", "link", "del", name], capture_output=True)
    subprocess.run(["nft", "delete", "table", "ip", f"wrenn_{tag}"], capture_output=True)
    for claim in Path("/run/wrenn/net").glob("*/*"):
        try:
            if claim.read_text().strip() == tag[:6]:
                claim.unlink()
        except OSError:
            pass
    for root in Path("/sys/fs/cgroup").glob(f"*/wrenn/{tag}*"):
        for d in sorted(root.rglob("*"), reverse=True) + [root]:
            if d.is_dir():
                for _ in range(20):  # a killed QEMU leaves its cgroup once it is reaped
                    try:
                        d.rmdir()
                        break
                    except OSError:
                        _time.sleep(0.05)


@pytest_asyncio.fixture(scope="session")
async def host_agent(tmp_path_factory):
    from wrenn_host.agent import LocalHostAgent

    data_dir = tmp_path_factory.mktemp("host")
    agent = LocalHostAgent(data_dir)
    await agent.prepare([("minimal", 1, 512)])
    await agent.start({})
    yield agent
    for cid in list(agent._capsules):
        try:
            await agent.destroy(cid)
        except Exception:
            pass
    await agent.close()
    kill_qemus(data_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class ServerHandle:
    base_url: str
    api_key: str
    data_dir: Path
    port: int
    proc: subprocess.Popen | None = None
    log: Path | None = None

    def start(self) -> None:
        env = dict(os.environ, WRENN_BOOTSTRAP_API_KEY=self.api_key)
        # The metrics sampler, more often than its 10 s default: observability tests need points soon.
        env.setdefault("WRENN_SAMPLER_INTERVAL_SEC", "2")
        self.log = self.data_dir / "server.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wrenn_cli.main", "server", "--port", str(self.port),
             "--data-dir", str(self.data_dir)],
            env=env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 900  # a first start builds images and template snapshots
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"wrenn server exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("wrenn server did not come up")

    def stop(self) -> None:
        """Stop the server process only: capsules keep running, as after a real restart."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def client(self, api_key: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"X-API-Key": api_key or self.api_key}, timeout=120)


@pytest.fixture(scope="session")
def wrenn_server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("server")
    port = _free_port()
    handle = ServerHandle(f"http://127.0.0.1:{port}/api", "wrn_" + secrets.token_hex(16), data_dir, port)
    handle.start()
    yield handle
    handle.stop()
    kill_qemus(data_dir)
