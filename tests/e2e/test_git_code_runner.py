"""capsule.git on a real capsule (a bare repository inside it as the remote), and the code runner:
`code-runner-beta` built on first use, then `run_code` through our SDK (sync and async) and the
published one (wrenn==0.3.0)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time

import pytest

from tests.conftest import qemu_pids
from tests.e2e.test_published_sdk import published_sdk_python  # noqa: F401  (fixture)

pytestmark = pytest.mark.vm

FIRST_BUILD_TIMEOUT = 1500  # code-runner-beta on first use: pip install jupyter-server + ipykernel under TCG


@pytest.fixture
def sdk_env(wrenn_server, monkeypatch):
    monkeypatch.setenv("WRENN_API_KEY", wrenn_server.api_key)
    monkeypatch.setenv("WRENN_BASE_URL", wrenn_server.base_url)
    monkeypatch.setenv("WRENN_PROXY_DOMAIN", f"localhost:{wrenn_server.port}")
    return wrenn_server


def test_git_in_a_capsule(sdk_env):
    from wrenn import Capsule
    from wrenn.git import GitCommandError

    with Capsule(template="minimal", wait=True) as capsule:
        git = capsule.git
        git.init("/srv/origin.git", bare=True, initial_branch="main")
        git.init("/work/repo", initial_branch="main")
        git.configure_user("Test User", "test@example.com")
        assert git.get_config("user.name", scope="global") == "Test User"
        capsule.files.write("/work/repo/hello.txt", "hello\n")
        status = git.status(cwd="/work/repo")
        assert status.branch == "main" and [f.path for f in status.files] == ["hello.txt"]
        assert status.has_untracked and not status.is_clean
        git.add(cwd="/work/repo")
        assert git.status(cwd="/work/repo").has_staged
        git.commit("first commit", cwd="/work/repo")
        assert git.status(cwd="/work/repo").is_clean
        git.remote_add("origin", "/srv/origin.git", cwd="/work/repo")
        assert git.remote_get("origin", cwd="/work/repo") == "/srv/origin.git"
        assert git.remote_get("nope", cwd="/work/repo") is None
        git.push("origin", "main", set_upstream=True, cwd="/work/repo")
        git.create_branch("feature", cwd="/work/repo")
        branches = git.branches(cwd="/work/repo")
        assert {(b.name, b.is_current) for b in branches} == {("main", False), ("feature", True)}
        git.checkout_branch("main", cwd="/work/repo")
        git.delete_branch("feature", cwd="/work/repo")
        assert [b.name for b in git.branches(cwd="/work/repo")] == ["main"]

        git.clone("/srv/origin.git", "/work/clone")
        assert capsule.files.read("/work/clone/hello.txt") == "hello\n"
        st = git.status(cwd="/work/clone")
        assert (st.branch, st.upstream, st.ahead, st.behind) == ("main", "origin/main", 0, 0)
        capsule.files.write("/work/clone/hello.txt", "changed\n")
        assert git.status(cwd="/work/clone").files[0].status == "modified"
        git.restore(["hello.txt"], cwd="/work/clone")
        assert git.status(cwd="/work/clone").is_clean
        capsule.files.write("/work/clone/new.txt", "n\n")
        git.add(["new.txt"], cwd="/work/clone")
        git.reset(cwd="/work/clone")  # unstage
        assert not git.status(cwd="/work/clone").has_staged
        git.commit("second", allow_empty=True, cwd="/work/clone")
        assert git.status(cwd="/work/clone").ahead == 1
        with pytest.raises(GitCommandError) as e:
            git.status(cwd="/tmp")
        assert e.value.exit_code != 0 and "not a git repository" in e.value.stderr


def test_code_runner_both_sdks(sdk_env, published_sdk_python):  # noqa: F811
    from wrenn.code_runner import AsyncCapsule, Capsule, ExecutionError

    started = time.monotonic()
    capsule = Capsule()  # the first create builds code-runner-beta (a build, as users' builds)
    try:
        capsule.wait_ready(timeout=FIRST_BUILD_TIMEOUT)
        print(f"code-runner-beta ready after {time.monotonic() - started:.0f}s")
        out: list[str] = []
        first = capsule.run_code("x = 41\nprint('hi')", on_stdout=out.append, timeout=120)
        assert first.error is None and first.logs.stdout == ["hi\n"] == out
        assert capsule.run_code("x + 1").text == "42"
        errors: list[ExecutionError] = []
        failed = capsule.run_code("raise ValueError('boom')", on_error=errors.append)
        assert failed.error is not None and failed.error.name == "ValueError" and failed.error.value == "boom"
        assert errors == [failed.error]
        shown = capsule.run_code("from IPython.display import display, HTML\ndisplay(HTML('<b>x</b>'))")
        assert shown.results and shown.results[0].html == "<b>x</b>" and not shown.results[0].is_main_result
        assert capsule.run_code("import sys; print('e', file=sys.stderr)").logs.stderr == ["e\n"]
        cid = capsule.id
    finally:
        capsule.destroy()
    assert qemu_pids(cid) == []

    async def async_run() -> str | None:
        async with AsyncCapsule(wait=True) as ac:
            await ac.run_code("y = 20")
            return (await ac.run_code("y * 2 + 2")).text

    assert asyncio.run(async_run()) == "42"

    # *.localhost is the loopback (RFC 6761; browsers and systemd-resolved answer so, glibc alone
    # does not): the published SDK's proxy URL 8888-<id>.localhost:<port> then reaches our server.
    script = (
        "import socket\n_gai = socket.getaddrinfo\n"
        "def _loopback(host, *a, **k):\n"
        "    return _gai('127.0.0.1' if str(host).endswith('.localhost') else host, *a, **k)\n"
        "socket.getaddrinfo = _loopback\n"
        "import json\nfrom wrenn.code_runner import Capsule\n"
        "c = Capsule()\nc.wait_ready(timeout=120)\n"
        "try:\n"
        "    c.run_code('x = 41')\n"
        "    r = c.run_code('x + 1')\n"
        "    e = c.run_code('raise KeyError(1)')\n"
        "    print('RESULT ' + json.dumps({'text': r.text, 'error': e.error.name if e.error else None}))\n"
        "finally:\n"
        "    c.destroy()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WRENN_", "PYTHON"))}
    env.update(WRENN_API_KEY=sdk_env.api_key, WRENN_BASE_URL=sdk_env.base_url,
               WRENN_PROXY_DOMAIN=f"localhost:{sdk_env.port}")
    proc = subprocess.run([str(published_sdk_python), "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, proc.stderr[-3000:]
    assert json.loads(line[7:]) == {"text": "42", "error": "KeyError"}
