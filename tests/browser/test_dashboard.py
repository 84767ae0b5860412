"""The web dashboard in a real browser against a real server with real capsules: what a person
does with it, checked the way they would see it."""

from __future__ import annotations

import re
import pytest

pytestmark = pytest.mark.vm

CAPSULE_ID = re.compile(r"/capsules/(cl-[0-9a-z]+)$")


@pytest.fixture(scope="module")
def capsule(wrenn_server):
    """A running capsule made through the API, shared by the capsule-page tests."""
    with wrenn_server.client() as c:
        resp = c.post("/v1/capsules", json={"template": "minimal"})
        assert resp.status_code == 201, resp.text
        cid = resp.json()["id"]
        yield cid
        c.delete(f"/v1/capsules/{cid}")


@pytest.fixture
def destroy_later(wrenn_server):
    """Capsule ids to destroy after the test (and after its screenshot: ask for this before `browser`)."""
    ids: list[str] = []
    yield ids
    with wrenn_server.client() as c:
        for cid in ids:
            c.delete(f"/v1/capsules/{cid}")


def terminal_lines(page) -> list[str]:
    return page.evaluate("""() => [...document.querySelectorAll('[data-testid=terminal] .xterm-rows > div')]
                              .map(r => r.textContent.replace(/\\u00a0/g, ' ').trimEnd())""")


def wait_terminal_line(page, text: str, timeout_ms: int = 30_000) -> None:
    try:
        page.wait_for_function(
            """(want) => [...document.querySelectorAll('[data-testid=terminal] .xterm-rows > div')]
                  .some(r => r.textContent.replace(/\\u00a0/g, ' ').trim() === want)""", arg=text, timeout=timeout_ms)
    except Exception:
        raise AssertionError(f"no line {text!r} in the terminal: {terminal_lines(page)}") from None


def status_badge(page):
    return page.locator(".page-head .badge").first


def open_capsule(browser, cid: str) -> None:
    browser.goto(f"/capsules/{cid}")
    browser.page.get_by_role("heading", name=cid).wait_for()


def test_sign_in_with_a_key_and_see_a_capsule_made_through_the_api_appear(destroy_later, browser, wrenn_server):
    page = browser.page
    browser.shot("signin")
    page.fill("input[name=api_key]", "wrn_" + "0" * 32)
    page.click("button[type=submit]")
    page.get_by_role("alert").filter(has_text="not valid").wait_for()  # a message a person understands
    browser.shot("bad-key")
    browser.sign_in()
    page.get_by_text("● Live").wait_for()  # the event stream is connected (with a ticket)
    with wrenn_server.client() as c:
        cid = c.post("/v1/capsules", json={}).json()["id"]
        destroy_later.append(cid)
        row = page.locator(f"tr[data-capsule='{cid}']")
        row.wait_for(timeout=60_000)  # no reload: it came over the event stream
        row.locator(".badge", has_text="running").wait_for(timeout=60_000)
        page.locator(".chip", has_text="running").click()
        assert row.is_visible()
        page.locator(".chip", has_text="paused").click()
        assert not row.is_visible()  # the filter by status hides it
        page.locator(".chip", has_text="all").click()
        browser.shot("capsules")
        assert c.delete(f"/v1/capsules/{cid}").status_code == 204
        row.locator(".badge", has_text="stopped").wait_for(timeout=60_000)  # and its end, live too


def test_create_from_the_page_and_run_echo_in_its_terminal(destroy_later, browser, wrenn_server):
    page = browser.page
    browser.sign_in()
    page.get_by_role("button", name="New capsule").click()
    form = page.get_by_role("form", name="New capsule")
    form.locator("select[name=template]").select_option("minimal")
    form.locator("select[name=timeout_sec]").select_option("900")
    browser.shot("create-form")
    form.get_by_role("button", name="Create capsule").click()
    page.wait_for_url(CAPSULE_ID, timeout=120_000)
    cid = CAPSULE_ID.search(page.url).group(1)
    destroy_later.append(cid)
    with wrenn_server.client() as c:
        info = c.get(f"/v1/capsules/{cid}").json()
    assert info["template"] == "minimal" and info["timeout_sec"] == 900
    assert info["allow_internet_access"] is True  # untouched network fields: the server's default
    page.get_by_test_id("terminal-state").filter(has_text="Connected").wait_for(timeout=60_000)
    page.get_by_test_id("terminal").click()
    page.keyboard.type("echo hi")
    page.keyboard.press("Enter")
    wait_terminal_line(page, "hi")
    browser.shot("terminal")
    # A reload re-attaches to the same shell: its output is replayed, its state kept.
    page.keyboard.type("export MARK=kept; echo marked")
    page.keyboard.press("Enter")
    wait_terminal_line(page, "marked")
    page.reload()
    page.get_by_test_id("terminal-state").filter(has_text="Connected").wait_for(timeout=60_000)
    wait_terminal_line(page, "hi")
    page.get_by_test_id("terminal").click()
    page.keyboard.type("echo mark=$MARK")
    page.keyboard.press("Enter")
    wait_terminal_line(page, "mark=kept")
    browser.shot("terminal-reattached")


def test_upload_by_drop_see_it_listed_and_download_it(browser, capsule, tmp_path):
    page = browser.page
    browser.sign_in()
    open_capsule(browser, capsule)
    page.get_by_role("tab", name="Files").click()
    page.locator(".crumbs").filter(has_text="root").wait_for()
    content = "hello from the browser\n" * 50
    drop = page.evaluate_handle("""(text) => { const dt = new DataTransfer();
        dt.items.add(new File([text], 'dropped.txt', {type: 'text/plain'})); return dt; }""", content)
    page.get_by_test_id("dropzone").dispatch_event("dragover", {"dataTransfer": drop})
    page.get_by_test_id("dropzone").dispatch_event("drop", {"dataTransfer": drop})
    row = page.locator("tr[data-file='dropped.txt']")
    row.wait_for()
    assert "1.1 KiB" in row.inner_text()
    browser.shot("files")
    with page.expect_download() as info:
        row.get_by_role("button", name="Download").click()
    saved = tmp_path / "dropped.txt"
    info.value.save_as(saved)
    assert info.value.suggested_filename == "dropped.txt" and saved.read_text() == content
    # mkdir and delete
    page.get_by_role("button", name="New folder").click()
    page.get_by_placeholder("Folder name").fill("made-here")
    page.get_by_role("button", name="Create", exact=True).click()
    page.locator("tr[data-file='made-here']").wait_for()
    page.locator("tr[data-file='dropped.txt']").get_by_role("button", name="Delete").click()
    page.get_by_role("dialog").get_by_role("button", name="Delete").click()
    page.locator("tr[data-file='dropped.txt']").wait_for(state="detached")


def test_pause_and_resume_from_the_capsule_page(browser, capsule):
    page = browser.page
    browser.sign_in()
    open_capsule(browser, capsule)
    page.get_by_role("button", name="Pause").click()
    status_badge(page).filter(has_text="paused").wait_for(timeout=60_000)
    page.get_by_text("The capsule is paused").wait_for()
    browser.shot("paused")
    page.get_by_role("button", name="Resume").click()
    status_badge(page).filter(has_text="running").wait_for(timeout=60_000)
    page.get_by_role("tab", name="Terminal").wait_for()


def test_metrics_chart_draws(browser, capsule):
    page = browser.page
    browser.sign_in()
    open_capsule(browser, capsule)
    # The test server samples every 2 s; the page polls every 5 s.
    page.wait_for_function("""() => { const c = document.querySelector('[data-testid=chart-mem]');
        return c && Number(c.dataset.points) >= 2 && /L/.test(c.querySelector('path.line')?.getAttribute('d') || ''); }""",
                           timeout=90_000)
    assert page.get_by_test_id("chart-mem").locator("strong").inner_text().endswith("MiB")
    page.get_by_test_id("chart-cpu").locator("path.line").wait_for()
    browser.shot("metrics")


def test_create_and_delete_an_api_key(browser, wrenn_server):
    page = browser.page
    browser.sign_in()
    page.get_by_role("link", name="API keys").click()
    form = page.get_by_role("form", name="New API key")
    form.locator("input[name=key_name]").fill("from-the-browser")
    form.get_by_role("button", name="Create key").click()
    shown = page.get_by_test_id("new-key").locator("code.key")
    key = shown.inner_text().strip()
    assert re.fullmatch(r"wrn_[0-9a-f]{32}", key)
    page.get_by_role("button", name="Copy").click()
    page.get_by_role("button", name="Copied").wait_for()
    browser.shot("keys")
    with wrenn_server.client(key) as c:
        assert c.get("/v1/capsules").status_code == 200  # the key works
    row = page.locator("tr[data-key='from-the-browser']")
    row.get_by_role("button", name="Delete").click()
    page.get_by_role("dialog").get_by_role("button", name="Delete").click()
    row.wait_for(state="detached")
    with wrenn_server.client(key) as c:
        assert c.get("/v1/capsules").status_code == 401  # revoked at once


def test_other_pages_and_a_narrow_window(browser, capsule):
    page = browser.page
    browser.sign_in()
    for link, shows in (("Templates", "tr[data-template='minimal']"), ("Usage", ".stat"),
                        ("Team", "text=signed in with an API key")):
        page.get_by_role("link", name=link, exact=True).click()
        page.locator(shows).first.wait_for()
        browser.shot(link.lower())
    page.set_viewport_size({"width": 400, "height": 800})
    page.get_by_role("link", name="Capsules", exact=True).click()
    page.get_by_role("heading", name="Capsules").wait_for()
    width = page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= 400, f"the page scrolls sideways at 400 px ({width} px wide)"
    browser.shot("narrow")
    open_capsule(browser, capsule)
    page.get_by_test_id("terminal-state").filter(has_text="Connected").wait_for(timeout=60_000)
    page.get_by_test_id("terminal").scroll_into_view_if_needed()  # xterm.js draws only what is on screen
    page.wait_for_function("""() => [...document.querySelectorAll('[data-testid=terminal] .xterm-rows > div')]
        .some(r => r.textContent.includes('#'))""")  # the shell's prompt
    width = page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= 400, f"the capsule page scrolls sideways at 400 px ({width} px wide)"
    browser.shot("narrow-capsule")


def test_sign_out(browser):
    page = browser.page
    browser.sign_in()
    page.get_by_role("button", name="Sign out").click()
    page.locator("input[name=api_key]").wait_for()
    assert page.evaluate("() => localStorage.getItem('wrenn.auth')") is None
    page.reload()
    page.locator("input[name=api_key]").wait_for()  # still signed out after a reload
    browser.shot("signed-out")


def test_sign_in_with_email_and_see_the_team(browser, wrenn_server):
    import httpx

    email = "ada@example.com"
    resp = httpx.post(f"{wrenn_server.base_url}/v1/auth/signup", json={"email": email, "password": "correct horse",
                                                                      "team_name": "analytical"})
    assert resp.status_code in (201, 409), resp.text  # 409: made by an earlier run of this test
    page = browser.page
    page.get_by_role("tab", name="Email").click()
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", "wrong password")
    page.click("button[type=submit]")
    page.get_by_role("alert").filter(has_text="do not match").wait_for()
    page.fill("input[name=password]", "correct horse")
    page.click("button[type=submit]")
    page.get_by_role("heading", name="Capsules").wait_for()
    page.get_by_text(email).first.wait_for()  # who is signed in
    page.get_by_role("link", name="Team", exact=True).click()
    page.get_by_role("heading", name="Team “analytical”").wait_for()
    page.locator("td", has_text=email).wait_for()
    page.locator(".badge.role-owner").wait_for()
    browser.shot("team")


def test_background_process_its_port_link_and_kill(browser, capsule, wrenn_server):
    page = browser.page
    browser.sign_in()
    open_capsule(browser, capsule)
    page.get_by_role("tab", name="Processes & ports").click()
    page.get_by_placeholder("Run in the background", exact=False).fill("python3 -m http.server 8000 --bind 127.0.0.1")
    page.get_by_role("button", name="Start").click()
    proc = page.locator("tr[data-pid]", has_text="http.server")
    proc.wait_for()
    link = page.locator(".port-list a", has_text=f"8000-{capsule}.localhost:{wrenn_server.port}")
    for _ in range(30):  # the server needs a moment to listen; Refresh reads the guest's sockets again
        if link.count():
            break
        page.get_by_role("button", name="Refresh").last.click()
        page.wait_for_timeout(500)
    assert link.get_attribute("href") == f"http://8000-{capsule}.localhost:{wrenn_server.port}/"
    browser.shot("processes")
    proc.get_by_role("button", name="Kill").click()
    page.locator("tr[data-pid]", has_text="http.server").filter(has_text="running").wait_for(state="detached")


def test_snapshot_from_the_page_then_delete_it_on_templates(destroy_later, browser, wrenn_server):
    page = browser.page
    with wrenn_server.client() as c:
        cid = c.post("/v1/capsules", json={}).json()["id"]
    destroy_later.append(cid)
    browser.sign_in()
    open_capsule(browser, cid)
    status_badge(page).filter(has_text="running").wait_for(timeout=60_000)
    page.get_by_role("button", name="Snapshot").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Template name").fill("browser-snap")
    dialog.get_by_label("Replace a template of that name").check()
    dialog.get_by_role("button", name="Save snapshot").click()
    dialog.wait_for(state="detached", timeout=120_000)
    status_badge(page).filter(has_text="paused").wait_for(timeout=60_000)  # a snapshot leaves it paused
    page.get_by_role("link", name="Templates", exact=True).click()
    row = page.locator("tr[data-template='browser-snap']")
    row.locator(".badge", has_text="snapshot").wait_for()
    browser.shot("templates")
    row.get_by_role("button", name="Delete").click()
    page.get_by_role("dialog").get_by_role("button", name="Delete").click()
    row.wait_for(state="detached")
    with wrenn_server.client() as c:
        assert "browser-snap" not in [t["name"] for t in c.get("/v1/snapshots").json()]


def test_build_from_a_dockerfile_see_its_live_log_then_delete_the_template(browser, wrenn_server):
    page = browser.page
    name = "browser-build"
    with wrenn_server.client() as c:
        c.delete(f"/v1/snapshots/{name}")  # a leftover of an earlier run
    browser.sign_in()
    page.get_by_role("link", name="Templates", exact=True).click()
    form = page.get_by_role("form", name="New build")
    form.get_by_label("Template name").fill(name)
    form.get_by_label("Dockerfile").fill("FROM minimal\nRUN echo built-by-dashboard > /tmp/marker\nRUN cat /tmp/marker")
    form.get_by_role("button", name="Start build").click()
    log = page.get_by_test_id("build-log")
    # the output of `cat` (a line of its own), not just the step's command line echoed
    page.wait_for_function("""() => (document.querySelector('[data-testid=build-log-text]')?.textContent || '')
                                  .split('\\n').some(l => l.trim() === 'built-by-dashboard')""", timeout=300_000)
    log.locator(".badge", has_text="success").wait_for(timeout=300_000)
    assert log.get_by_test_id("build-step").inner_text() == "step 2/2"
    page.locator("tr[data-build]", has_text=name).locator(".badge", has_text="success").wait_for()
    row = page.locator(f"tr[data-template='{name}']")
    row.locator(".badge", has_text="snapshot").wait_for()
    browser.shot("builds")
    row.get_by_role("button", name="Delete").click()
    page.get_by_role("dialog").get_by_role("button", name="Delete").click()
    row.wait_for(state="detached")
    with wrenn_server.client() as c:
        assert name not in [t["name"] for t in c.get("/v1/snapshots").json()]
