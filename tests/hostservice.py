"""The host agent service on a loopback port, inside the test's event loop (uvicorn, as
`wrenn host-agent` runs it): for the contract suite, the service tests and the fake harness."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn

from wrenn_host.api import HostAgent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def serving(agent: HostAgent, token: str | None = None, *, tls_files: tuple[Path, Path] | None = None,
                  **kwargs: Any) -> AsyncIterator[tuple[str, str, Any]]:
    """The host agent service for `agent` on a loopback port, in this event loop: (url, token, app)."""
    from wrenn_host.service.app import create_app

    token = token or secrets.token_urlsafe(24)
    app = create_app(agent, token, **kwargs)
    async with serving_app(app, tls_files=tls_files) as url:
        yield url, token, app


@contextlib.asynccontextmanager
async def serving_app(app: Any, tls_files: tuple[Path, Path] | None = None) -> AsyncIterator[str]:
    """An ASGI app on a loopback port, in this event loop (uvicorn, as in production); HTTPS
    with `tls_files` (certificate, key)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(
        app, host="127.0.0.1", port=port, lifespan="off", log_level="warning", ws_max_size=32 * 1024 * 1024,
        ssl_certfile=str(tls_files[0]) if tls_files else None, ssl_keyfile=str(tls_files[1]) if tls_files else None))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"{'https' if tls_files else 'http'}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
