"""The web dashboard: the static files built from `web/` (by scripts/setup.sh), served at `/`.

It is the router's fallback, so it never shadows an API route: a GET or HEAD that no route
matched, outside `/api`, gets the file at that path, or `index.html` for any other path (the
dashboard routes in the browser: /capsules/cl-..., /keys, ...). Port-proxy Hosts
(`{port}-{id}.{domain}`) never get here: that middleware sits in front of everything.
Without a build the dashboard answers a short page that says how to make one; the API is
unaffected.
"""

from __future__ import annotations

import os
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

DEFAULT_DIR = Path(__file__).resolve().parent / "dashboard"

# The app's own files only; inline styles because xterm.js sets them on its elements.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Content-Security-Policy": CSP}

NOT_BUILT = """<!doctype html><html><head><meta charset="utf-8"><title>Wrenn</title></head>
<body style="font-family:sans-serif;max-width:40em;margin:4em auto">
<h1>Wrenn dashboard not built</h1>
<p>The API is running at <a href="/api/docs">/api</a>, but the dashboard's files are missing.
Build them with <code>bash scripts/setup.sh</code> (or <code>cd web &amp;&amp; npm ci &amp;&amp; npm run build</code>)
and reload this page.</p></body></html>"""


def dashboard_dir() -> Path:
    return Path(os.environ.get("WRENN_DASHBOARD_DIR") or DEFAULT_DIR)


class DashboardFallback:
    """ASGI app for requests no route matched: the dashboard for GET/HEAD outside /api, else
    `not_found` (the router's own 404, which the API's error handlers shape)."""

    def __init__(self, not_found: ASGIApp, directory: Path | None = None):
        self.not_found = not_found
        self.directory = directory or dashboard_dir()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "/")
        if (scope["type"] != "http" or scope.get("method") not in ("GET", "HEAD")
                or path == "/api" or path.startswith("/api/")):
            await self.not_found(scope, receive, send)
            return
        response = self.respond(Request(scope).url.path)
        if response is None:
            await self.not_found(scope, receive, send)
            return
        await response(scope, receive, send)

    def respond(self, path: str) -> Response | None:
        root = self.directory.resolve()
        index = root / "index.html"
        if not index.is_file():
            return HTMLResponse(NOT_BUILT, status_code=503, headers={"Cache-Control": "no-store"})
        rel = path.lstrip("/")
        if rel:
            target = (root / rel).resolve()
            if target.is_relative_to(root) and target.is_file():
                # Vite names built assets by content hash: they never change under one name.
                cache = "public, max-age=31536000, immutable" if rel.startswith("assets/") else "no-cache"
                return FileResponse(target, headers={**_HEADERS, "Cache-Control": cache})
            if rel.startswith("assets/"):
                return None  # a missing asset is a 404, not the page
        return FileResponse(index, headers={**_HEADERS, "Cache-Control": "no-cache"})
