"""Run the control plane with uvicorn (called by the `wrenn server` CLI)."""

from __future__ import annotations

import uvicorn

from wrenn_control.app import create_app
from wrenn_control.bootstrap import bootstrap
from wrenn_control.config import Settings
from wrenn_control.db.migrate import run_migrations
from wrenn_control.db.session import Database
from wrenn_control.logs import uvicorn_log_config
from wrenn_host.api import HostAgent


def prepare(settings: Settings) -> str | None:
    """Migrate and bootstrap now, before serving, so a new key can be printed first.
    (The app's start-up does the same again, which is then a no-op.)"""
    db = Database(settings.db_url)
    try:
        run_migrations(db)
        return bootstrap(db, settings)
    finally:
        db.dispose()


def run(host: str, port: int, settings: Settings, host_agent: HostAgent | None) -> None:
    """`host_agent` None: a fleet's control plane (`wrenn control-plane`), no in-process host."""
    key = prepare(settings)
    if key is not None:
        print(f"API key (shown once): {key}\n"
              f"  export WRENN_API_KEY={key}\n"
              f"  export WRENN_BASE_URL=http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/api",
              flush=True)
    app = create_app(settings, host_agent)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=15,
                    log_config=uvicorn_log_config())
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown has run
        pass
