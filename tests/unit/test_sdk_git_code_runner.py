"""SDK: capsule.git command lines and parsing, and the code runner's Jupyter message handling
(without a capsule; the real ones: tests/e2e/test_git_code_runner.py)."""

from __future__ import annotations

import asyncio

import pytest

from wrenn._models import ExecResult
from wrenn.code_runner._jupyter import Collector, execute_request
from wrenn.git import AsyncGit, Git, GitAuthError, GitCommandError, parse_branches, parse_status


class FakeCommands:
    def __init__(self, answers=None):
        self.calls = []
        self.answers = list(answers or [])

    def run(self, cmd, timeout=30, envs=None, cwd=None):
        self.calls.append((cmd, cwd, envs, timeout))
        return self.answers.pop(0) if self.answers else ExecResult(stdout="", stderr="", exit_code=0)


class AsyncFakeCommands(FakeCommands):
    async def run(self, cmd, timeout=30, envs=None, cwd=None):  # type: ignore[override]
        return FakeCommands.run(self, cmd, timeout, envs, cwd)


def test_command_lines_and_env():
    cmds = FakeCommands()
    git = Git(cmds)
    git.init("repo", initial_branch="main", cwd="/tmp")
    git.add(all=True, cwd="/tmp/repo")
    git.commit("first 'quoted'", author_name="A", author_email="a@x", cwd="/tmp/repo")
    git.clone("/srv/origin.git", "copy", depth=1)
    lines = [c[0] for c in cmds.calls]
    assert lines == ["git init --initial-branch main repo", "git add -A",
                     "git commit -m 'first '\"'\"'quoted'\"'\"'' --author 'A <a@x>'",
                     "git clone --depth 1 /srv/origin.git copy"]
    assert all(c[2]["GIT_TERMINAL_PROMPT"] == "0" for c in cmds.calls)
    assert cmds.calls[3][3] == 300  # clone's default timeout


def test_errors():
    git = Git(FakeCommands([ExecResult(stdout="", stderr="fatal: Authentication failed for x", exit_code=128)]))
    with pytest.raises(GitAuthError) as e:
        git.pull()
    assert e.value.exit_code == 128
    git = Git(FakeCommands([ExecResult(stdout="", stderr="fatal: not a git repository", exit_code=128)]))
    with pytest.raises(GitCommandError, match="not a git repository"):
        git.status(cwd="/tmp")
    with pytest.raises(ValueError):
        Git(FakeCommands()).reset(mode="sideways")


def test_push_with_credentials_restores_the_remote_even_on_failure():
    cmds = FakeCommands([ExecResult(stdout="https://git.example/r.git\n", exit_code=0),
                         ExecResult(exit_code=0), ExecResult(stderr="rejected", exit_code=1), ExecResult(exit_code=0)])
    with pytest.raises(GitCommandError):
        Git(cmds).push(username="u", password="p", cwd="/r")
    lines = [c[0] for c in cmds.calls]
    assert lines[1] == "git remote set-url origin https://u:p@git.example/r.git"
    assert lines[-1] == "git remote set-url origin https://git.example/r.git"


def test_parsers():
    st = parse_status("## main...origin/main [ahead 2, behind 1]\n M a.txt\nA  b.txt\nR  old -> new\n?? c.txt\n")
    assert (st.branch, st.upstream, st.ahead, st.behind) == ("main", "origin/main", 2, 1)
    assert [(f.path, f.status, f.staged) for f in st.files] == [
        ("a.txt", "modified", False), ("b.txt", "added", True), ("new", "renamed", True), ("c.txt", "untracked", False)]
    assert st.has_untracked and st.has_staged and not st.is_clean
    assert parse_status("## No commits yet on main\n").branch == "main"
    assert parse_status("## HEAD (detached at abc123)\n").detached
    assert [(b.name, b.is_current) for b in parse_branches("main\t*\nfeature\t \n")] == [("main", True), ("feature", False)]


def test_async_git():
    cmds = AsyncFakeCommands([ExecResult(stdout="## main\n", exit_code=0)])
    st = asyncio.run(AsyncGit(cmds).status(cwd="/r"))
    assert st.branch == "main" and cmds.calls[0][1] == "/r"


def test_collector():
    msg = execute_request("x + 1")
    mid = msg["header"]["msg_id"]
    out, results = [], []
    col = Collector(mid, on_result=results.append, on_stdout=out.append)
    assert not col.feed({"parent_header": {"msg_id": "other"}, "msg_type": "stream", "content": {"text": "no"}})
    col.feed({"parent_header": {"msg_id": mid}, "msg_type": "stream", "content": {"name": "stdout", "text": "hi\n"}})
    col.feed({"parent_header": {"msg_id": mid}, "msg_type": "display_data",
              "content": {"data": {"image/png": "iVBOR", "text/plain": "<Figure>"}}})
    col.feed({"parent_header": {"msg_id": mid}, "msg_type": "execute_result",
              "content": {"data": {"text/plain": "42"}, "execution_count": 3}})
    assert col.feed({"parent_header": {"msg_id": mid}, "msg_type": "status", "content": {"execution_state": "idle"}})
    ex = col.execution
    assert ex.text == "42" and ex.execution_count == 3 and ex.logs.stdout == ["hi\n"] == out
    assert results[0].png == "iVBOR" and results[0].formats() == ["text", "png"]
    errors = []
    col = Collector(mid, on_error=errors.append)
    col.feed({"parent_header": {"msg_id": mid}, "msg_type": "error",
              "content": {"ename": "ValueError", "evalue": "boom", "traceback": ["a", "b"]}})
    assert col.execution.error.name == "ValueError" and errors[0].traceback == "a\nb"
