"""The FastAPI application: `create_app(settings, host)`.

Start-up (lifespan): migrate the DB, bootstrap a team and key, start the host agent and reconcile
what it finds with the DB, start the reaper and the metrics sampler. Shutdown: stop them, let boots
finish (bounded), close the host agent (running capsules keep running and are found again at the
next start).
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from wrenn_control.api import openapi
from wrenn_control.api.guard import RequestGuard
from wrenn_control.api.routes import api_router, system
from wrenn_control.auth import load_jwt_secret
from wrenn_control.bootstrap import bootstrap
from wrenn_control.builds.manager import Builds
from wrenn_control.config import Settings
from wrenn_control.db.migrate import run_migrations
from wrenn_control.db.session import Database
from wrenn_control.errors import install_error_handlers
from wrenn_control.events import EventBus
from wrenn_control.gateway import GuestGateway
from wrenn_control.hosts import HostDirectory, placement
from wrenn_control.hosts.registry import AgentFactory, FleetDirectory
from wrenn_control.hosts.router import RoutingHostAgent
from wrenn_control.metrics import ControlMetrics
from wrenn_control.operations import CapsuleOps
from wrenn_control.proxy import PortProxy
from wrenn_control.tickets import TicketStore
from wrenn_control.web import DashboardFallback
from wrenn_control.workers.build_leases import BuildLeaseWatcher
from wrenn_control.workers.drainer import Drainer
from wrenn_control.workers.heartbeats import HeartbeatWatcher
from wrenn_control.workers.reaper import Reaper
from wrenn_control.workers.reconcile import reconcile
from wrenn_control.workers.retention import Retention
from wrenn_control.workers.sampler import Sampler
from wrenn_host.api import HostAgent, HostLimits

log = logging.getLogger(__name__)


class FormEncodedJSON:
    """`curl -d '{...}'` without `-H Content-Type` labels JSON as a form. No route here takes
    form-encoded bodies, so read those as JSON (a real form then gets a clear "not valid JSON")."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = [(k, b"application/json" if k == b"content-type"
                        and v.startswith(b"application/x-www-form-urlencoded") else v)
                       for k, v in scope["headers"]]
            scope = dict(scope, headers=headers)
        await self.app(scope, receive, send)


async def _host_limits(host: HostAgent) -> HostLimits | None:
    try:
        return await host.limits()
    except Exception as exc:  # a host that cannot say is not a reason to refuse to start
        log.warning("host limits unavailable: %s", exc)
        return None


def create_app(settings: Settings, host: HostAgent | None, *, agent_factory: AgentFactory | None = None) -> FastAPI:
    """`host`: the in-process host agent of `wrenn server`. None: a fleet's control plane
    (`wrenn control-plane`), whose capsules live on the registered hosts (hosts/), reached with
    `agent_factory(address, control_token, tls_cert)` (default: the network client, hosts/remote.py)."""
    db = Database(settings.db_url, threads=settings.db_threads)
    events = EventBus()
    fleet: FleetDirectory | None = None
    if host is None:
        fleet = FleetDirectory(db, agent_factory)
        host = RoutingHostAgent(db, fleet)
    # Guest calls find a capsule's host here; lifecycle calls go through `host` (in a fleet, the
    # router that sends each call to the capsule's host).
    hosts = fleet if fleet is not None else HostDirectory(host)
    ops = CapsuleOps(db, host, events, create_wait_sec=settings.create_wait_sec, hosts=hosts)
    ops.drain_sec = settings.pause_drain_sec
    metrics = ControlMetrics(db)
    ops.latency = metrics.latency
    if fleet is not None:
        ops.place = functools.partial(placement.place, overcommit_vcpu=settings.overcommit_vcpu,
                                      overcommit_memory=settings.overcommit_memory)
        host.place = ops.place  # type: ignore[attr-defined]
        ops.replica_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    watcher = HeartbeatWatcher(db, fleet, settings.host_offline_sec, settings.host_watch_interval_sec)
    drainer = Drainer(ops, fleet, settings.drain_interval_sec) if fleet is not None else None
    builds = Builds(db, host, events, work_dir=settings.data_dir / "builds")
    builds.replica_id = ops.replica_id
    build_leases = BuildLeaseWatcher(builds) if fleet is not None else None
    reaper = Reaper(db, ops, settings.reaper_interval_sec)
    retention = Retention(db, settings.stopped_retention_sec, settings.retention_interval_sec)
    sampler = Sampler(db, ops, settings.sampler_interval_sec,
                      metrics_timeout_sec=settings.sampler_metrics_timeout_sec,
                      metrics_retention_sec=settings.metrics_retention_sec,
                      stats_retention_sec=settings.stats_retention_sec)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        run_migrations(db)
        app.state.jwt_secret = load_jwt_secret(settings)
        # A freshly generated key, for the caller to show once (None if none was made).
        app.state.bootstrap_key = bootstrap(db, settings)
        if fleet is None:
            app.state.reconcile_report = await reconcile(ops)
        else:  # each host reconciles through its heartbeats (api/routes/hosts.py)
            await fleet.reload()
        app.state.host_limits = await _host_limits(host)
        if fleet is not None:  # (`wrenn server` places nothing on registered hosts)
            watcher.start()
            drainer.start()
        builds.work_dir.mkdir(parents=True, exist_ok=True)
        builds.recover()
        if build_leases is not None:
            build_leases.start()
        reaper.start()
        sampler.start()
        retention.start()
        try:
            yield
        finally:
            if drainer is not None:
                await drainer.stop()
            if build_leases is not None:
                await build_leases.stop()
            await watcher.stop()
            await retention.stop()
            await sampler.stop()
            await reaper.stop()
            await builds.shutdown()
            await ops.shutdown(settings.shutdown_grace_sec)
            await host.close()
            db.dispose()

    app = FastAPI(
        title="Wrenn",
        summary="Self-hosted microVM sandboxes (capsules), wire-compatible with the Wrenn API.",
        version="0.1.0",
        lifespan=lifespan,
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
        # JSON bodies sent without a Content-Type (plain `curl -d`) are still read as JSON.
        strict_content_type=False,
    )
    app.state.settings = settings
    app.state.db = db
    app.state.host = host
    app.state.events = events
    app.state.hosts = hosts
    app.state.ops = ops
    app.state.gateway = GuestGateway(ops, hosts)
    app.state.builds = builds
    app.state.reaper = reaper
    app.state.sampler = sampler
    app.state.retention = retention
    app.state.fleet = fleet  # the fleet's directory (None in `wrenn server` mode)
    app.state.heartbeats = watcher
    app.state.drainer = drainer
    app.state.metrics = metrics
    app.state.bootstrap_key = None
    app.state.host_limits = None  # asked of the host at start-up (lifespan)
    app.state.tickets = TicketStore()  # browsers' single-use stream tickets (api/routes/tickets.py)
    install_error_handlers(app)
    # Auth and size checks before any body is read (innermost of these, after the Host routing).
    app.add_middleware(RequestGuard)
    app.add_middleware(FormEncodedJSON)
    # Outermost: `{port}-{capsule_id}.{domain}` Hosts go to the capsule, untouched by the API's middleware.
    app.add_middleware(PortProxy)
    app.include_router(system.router, prefix="/api")
    app.add_api_route("/metrics", metrics.endpoint, methods=["GET"], include_in_schema=False)
    app.include_router(api_router, prefix="/api/v1")
    openapi.install(app, host)
    # What no route matched: the web dashboard at / (GET outside /api), else the JSON 404.
    app.router.default = DashboardFallback(app.router.default)
    return app
