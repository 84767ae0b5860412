"""`wrenn host-agent`'s body: a started host agent, registered, served, heartbeating.

The agent given is started already (the caller reconciled it with what is on disk) and is closed
by the caller; this runs the rest: registration (or the saved one), the HTTP service and the
heartbeat loop, until stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import uvicorn

from wrenn_host import api
from wrenn_host.service import tls
from wrenn_host.service.app import create_app
from wrenn_host.service.book import Book
from wrenn_host.service.enroll import EnrollError, Heartbeat, Registration, capacity_of, default_name, register

log = logging.getLogger("wrenn.host.service")


@dataclasses.dataclass
class ServiceConfig:
    data_dir: Path
    control_plane: str
    listen_host: str = "0.0.0.0"
    listen_port: int = 9090
    token: str | None = None  # one-time registration token (not needed once registered)
    advertise: str | None = None  # the URL the control plane reaches us at
    name: str | None = None
    tls: bool = True  # serve HTTPS (a self-signed certificate, pinned by the control plane, unless given)
    tls_cert: Path | None = None
    tls_key: Path | None = None


def tls_files(cfg: ServiceConfig) -> tuple[Path, Path] | None:
    """(certificate, key) to serve with, or None without TLS. The operator's pair if given,
    else this agent's self-signed one (made once, kept in the data directory)."""
    if not cfg.tls:
        return None
    if cfg.tls_cert is not None or cfg.tls_key is not None:
        if cfg.tls_cert is None or cfg.tls_key is None:
            raise EnrollError("--tls-cert and --tls-key go together")
        for path in (cfg.tls_cert, cfg.tls_key):
            if not path.is_file():
                raise EnrollError(f"{path} does not exist")
        return cfg.tls_cert, cfg.tls_key
    host = urlsplit(advertised_address(cfg)).hostname or ""
    return tls.self_signed(cfg.data_dir, [host, socket.gethostname(), "localhost", "127.0.0.1"])


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not (0 < int(port) < 65536):
        raise ValueError(f"--listen must be ADDR:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def advertised_address(cfg: ServiceConfig) -> str:
    """https://IP:PORT (http:// without TLS) as the control plane should dial it. Listening on every address, that is
    the address of this machine's route towards the control plane (a UDP connect sends nothing)."""
    if cfg.advertise:
        return cfg.advertise.rstrip("/")
    host = cfg.listen_host
    if host in ("0.0.0.0", "::", ""):
        target = urlsplit(cfg.control_plane).hostname or "127.0.0.1"
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((socket.gethostbyname(target), 9))
                host = s.getsockname()[0]
        except OSError:
            host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if cfg.tls else 'http'}://{host}:{cfg.listen_port}"


async def registration(cfg: ServiceConfig, agent: api.HostAgent, data_root: Path,
                       transport: httpx.AsyncBaseTransport | None = None) -> Registration:
    """The saved registration, or a new one made with the one-time token (then saved)."""
    files = tls_files(cfg)
    cert = files[0].read_text() if files is not None else None
    saved = Registration.load(cfg.data_dir)
    if saved is not None:
        if saved.control_plane.rstrip("/") != cfg.control_plane.rstrip("/"):
            log.warning("registered with %s, not %s: keeping that registration (remove %s to register anew)",
                        saved.control_plane, cfg.control_plane, cfg.data_dir / "registration.json")
        _check_same_tls(saved, cert, cfg.data_dir)
        return saved
    if not cfg.token:
        raise EnrollError("not registered yet: give the one-time --token from `POST /v1/hosts`")
    limits, health = await agent.limits(), await agent.health()
    reg = await register(cfg.control_plane, cfg.token, address=advertised_address(cfg),
                         name=cfg.name or default_name(), capacity=capacity_of(limits, data_root),
                         accelerator=health.get("accelerator", "tcg"), tls_cert=cert, transport=transport)
    reg.save(cfg.data_dir)
    log.info("registered with %s as host %s", reg.control_plane, reg.host_id)
    return reg


def _check_same_tls(saved: Registration, cert: str | None, data_dir: Path) -> None:
    """The control plane dials the address and trusts the certificate this agent registered
    with: serving otherwise would only make every call fail, so say so at start."""
    again = f"start it as it registered, or register again (remove {data_dir / 'registration.json'}, new --token)"
    if cert is None and saved.address.startswith("https://"):
        raise EnrollError(f"this agent registered with TLS; --no-tls would make it unreachable: {again}")
    if cert is not None and not saved.address.startswith("https://"):
        raise EnrollError(f"this agent registered without TLS (--no-tls): {again}")
    if cert is not None and saved.tls_cert_sha256 and tls.fingerprint(cert) != saved.tls_cert_sha256:
        raise EnrollError(f"the TLS certificate changed since this agent registered: {again}")


class HostService:
    """The served agent: `await start()`, then `await stop()` (or `serve()` until a signal)."""

    def __init__(self, cfg: ServiceConfig, agent: api.HostAgent, book: Book, reg: Registration,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.cfg, self.agent, self.book, self.reg = cfg, agent, book, reg
        self.app = create_app(agent, reg.control_token, book=book)
        self.heartbeat = Heartbeat(reg, book, transport=transport)
        files = tls_files(cfg)
        self.server = uvicorn.Server(uvicorn.Config(
            self.app, host=cfg.listen_host, port=cfg.listen_port, lifespan="off", log_level="warning",
            log_config=None,  # logging is set up by the caller (wrenn_host.service.logs)
            ws_max_size=32 * 1024 * 1024, timeout_graceful_shutdown=10,
            ssl_certfile=str(files[0]) if files else None, ssl_keyfile=str(files[1]) if files else None))
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        serving = asyncio.create_task(self.server.serve(), name="host-agent http")
        self._tasks.append(serving)
        while not self.server.started:
            if serving.done():  # could not bind, for one
                serving.result()
                raise RuntimeError("the host agent service stopped while starting")
            await asyncio.sleep(0.02)
        self._tasks.append(asyncio.create_task(self.heartbeat.run(), name="host-agent heartbeat"))

    async def wait(self) -> None:
        """Until the HTTP server ends (SIGINT/SIGTERM: uvicorn's handlers)."""
        await self._tasks[0]

    async def stop(self) -> None:
        self.server.should_exit = True
        for task in self._tasks[1:]:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.heartbeat.close()
