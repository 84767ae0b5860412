"""Browser tests of the web dashboard: Debian's chromium, headless, driven by Playwright for Python
(its wheel brings the driver; Playwright's own browser download is never used) against a real
`wrenn server` (the `wrenn_server` fixture). Every test saves a screenshot to
tests/browser/screenshots/ (gitignored)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from wrenn_control.web import dashboard_dir

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = Path(__file__).parent / "screenshots"
VIEWPORT = {"width": 1280, "height": 800}


# Module scope, not session: Playwright's sync API keeps an asyncio loop running on the main thread
# while it is open, and pytest-asyncio cannot run any later async test or fixture until it closes.
@pytest.fixture(scope="module")
def browser_context(tmp_path_factory) -> Iterator:
    if not (dashboard_dir() / "index.html").is_file():
        pytest.fail("the dashboard is not built: run scripts/setup.sh (npm ci && npm run build in web/)")
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: run scripts/setup.sh (apt package chromium)")
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, args=CHROMIUM_ARGS,
            headless=True, viewport=VIEWPORT, accept_downloads=True)
        context.set_default_timeout(30_000)
        yield context
        context.close()


class Browser:
    """One page of the dashboard, with the server it talks to."""

    def __init__(self, page, server, name: str):
        self.page = page
        self.server = server
        self.origin = server.base_url.removesuffix("/api")
        self.name = name
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def goto(self, path: str = "/") -> None:
        self.page.goto(self.origin + path)

    def sign_in(self, key: str | None = None) -> None:
        self.goto("/")
        self.page.fill("input[name=api_key]", key or self.server.api_key)
        self.page.click("button[type=submit]")
        self.page.get_by_role("heading", name="Capsules").wait_for()

    def shot(self, label: str = "", *, full_page: bool = True) -> Path:
        path = SCREENSHOTS / f"{self.name}{'-' + label if label else ''}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        return path


@pytest.fixture
def browser(browser_context, wrenn_server, request) -> Iterator[Browser]:
    page = browser_context.new_page()
    b = Browser(page, wrenn_server, request.node.name.removeprefix("test_"))
    b.goto("/")
    page.evaluate("() => { localStorage.clear(); sessionStorage.clear(); }")  # each test signs in itself
    try:
        yield b
        assert b.errors == [], f"uncaught errors in the page: {b.errors}"
    finally:
        try:
            b.shot("end")
        finally:
            page.close()
