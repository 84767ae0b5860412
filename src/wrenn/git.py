"""Git inside a capsule: ``capsule.git`` runs the real ``git`` binary there through exec.

The published SDK's methods, names and arguments: clone, init, add, commit, push, pull, status,
branches, create_branch, checkout_branch, delete_branch, remote_add, remote_get, reset, restore,
set_config, get_config, configure_user, dangerously_authenticate. A failing git command raises
:class:`GitCommandError`, a rejected login :class:`GitAuthError` (both :class:`GitError`, with
``stderr`` and ``exit_code``).

Each operation is written once, as a generator that yields the command lines to run and receives
their results; :class:`Git` drives it with the sync client, :class:`AsyncGit` with the async one.
"""

from __future__ import annotations

import dataclasses
import functools
import posixpath
import re
import shlex
from collections.abc import Callable, Generator
from typing import Any
from urllib.parse import urlparse, urlunparse

from wrenn._models import ExecResult

__all__ = ["AsyncGit", "FileStatus", "Git", "GitAuthError", "GitBranch", "GitCommandError", "GitError", "GitStatus"]

_GIT_ENV = {"GIT_TERMINAL_PROMPT": "0"}  # never wait for a password nobody can type
_AUTH_PATTERNS = ("authentication failed", "terminal prompts disabled", "could not read username",
                  "invalid username or password", "access denied", "permission denied", "not authorized")
_RESET_MODES = {"soft", "mixed", "hard", "merge", "keep"}


class GitError(Exception):
    """A git command failed in the capsule (not an HTTP error: see ``exit_code`` and ``stderr``)."""

    def __init__(self, message: str, *, stderr: str = "", exit_code: int = -1) -> None:
        super().__init__(message)
        self.message = message
        self.stderr = stderr
        self.exit_code = exit_code


class GitCommandError(GitError):
    """A git command exited with a non-zero code."""


class GitAuthError(GitError):
    """The remote rejected the credentials (or wanted some)."""


@dataclasses.dataclass
class FileStatus:
    """One line of ``git status --porcelain=v1``."""

    path: str
    index_status: str
    work_tree_status: str
    renamed_from: str | None = None

    @property
    def staged(self) -> bool:
        return self.index_status not in (" ", "?")

    @property
    def status(self) -> str:
        """conflict, renamed, copied, deleted, added, modified, typechange, untracked or unknown."""
        xy = {self.index_status, self.work_tree_status}
        for char, label in (("U", "conflict"), ("R", "renamed"), ("C", "copied"), ("D", "deleted"),
                            ("A", "added"), ("M", "modified"), ("T", "typechange"), ("?", "untracked")):
            if char in xy:
                return label
        return "unknown"


@dataclasses.dataclass
class GitStatus:
    branch: str | None = None
    upstream: str | None = None
    ahead: int = 0
    behind: int = 0
    detached: bool = False
    files: list[FileStatus] = dataclasses.field(default_factory=list)

    @property
    def is_clean(self) -> bool:
        return not self.files

    @property
    def has_staged(self) -> bool:
        return any(f.staged for f in self.files)

    @property
    def has_untracked(self) -> bool:
        return any(f.status == "untracked" for f in self.files)

    @property
    def has_conflicts(self) -> bool:
        return any(f.status == "conflict" for f in self.files)


@dataclasses.dataclass
class GitBranch:
    name: str
    is_current: bool = False


# ---- parsing and helpers (no I/O) ----------------------------------------------------------------

def parse_status(stdout: str) -> GitStatus:
    """``git status --porcelain=v1 --branch`` output."""
    lines = [ln for ln in stdout.split("\n") if ln.rstrip()]
    status = GitStatus()
    if lines and lines[0].startswith("## "):
        _branch_line(lines.pop(0)[3:], status)
    for line in lines:
        if line.startswith("?? "):
            status.files.append(FileStatus(line[3:], "?", "?"))
        elif len(line) >= 4:
            path, renamed_from = line[3:], None
            if " -> " in path:
                renamed_from, path = path.split(" -> ", 1)
            status.files.append(FileStatus(path, line[0], line[1], renamed_from))
    return status


def _branch_line(info: str, status: GitStatus) -> None:
    head, _, tracking = info.partition(" [")
    if head.startswith("HEAD (detached at "):
        status.detached, status.branch = True, head[len("HEAD (detached at "):].rstrip(")")
    elif head.startswith("HEAD") or "detached" in head:
        status.detached = True
    elif "..." in head:
        local, remote = head.split("...", 1)
        status.branch, status.upstream = local or None, remote or None
    else:
        status.branch = head.replace("No commits yet on ", "").replace("Initial commit on ", "") or None
    if tracking:
        for word in ("ahead", "behind"):
            m = re.search(rf"{word} (\d+)", tracking)
            if m:
                setattr(status, word, int(m.group(1)))


def parse_branches(stdout: str) -> list[GitBranch]:
    """``git branch --format=%(refname:short)\\t%(HEAD)`` output."""
    out = []
    for line in stdout.split("\n"):
        if line.strip():
            name, _, head = line.strip().partition("\t")
            out.append(GitBranch(name, head == "*"))
    return out


def _embed_credentials(url: str, username: str, password: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https"):
        raise ValueError("Only http(s) URLs support embedded credentials.")
    netloc = f"{username}:{password}@{parsed.hostname}" + (f":{parsed.port}" if parsed.port else "")
    return urlunparse(parsed._replace(netloc=netloc))


def _strip_credentials(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not (parsed.username or parsed.password):
        return url
    return urlunparse(parsed._replace(netloc=(parsed.hostname or "") + (f":{parsed.port}" if parsed.port else "")))


def _repo_dir(url: str) -> str | None:
    parsed = urlparse(url)
    last = parsed.path.rstrip("/").split("/")[-1] if parsed.scheme in ("http", "https") else ""
    return (last[:-4] if last.endswith(".git") else last) or None


def _scope(scope: str) -> str:
    flag = {"local": "--local", "global": "--global", "system": "--system"}.get(scope.strip().lower())
    if flag is None:
        raise ValueError("Git config scope must be one of: local, global, system.")
    return flag


def _check(result: ExecResult, op: str) -> ExecResult:
    if result.exit_code == 0:
        return result
    if any(p in result.stderr.lower() for p in _AUTH_PATTERNS):
        raise GitAuthError(f"git {op}: authentication failed", stderr=result.stderr, exit_code=result.exit_code)
    message = result.stderr.strip() or result.stdout.strip() or f"git {op} failed (exit {result.exit_code})"
    raise GitCommandError(message, stderr=result.stderr, exit_code=result.exit_code)


@dataclasses.dataclass(frozen=True)
class _Cmd:
    """A command line to run in the capsule (what a flow yields)."""

    line: str
    cwd: str | None
    envs: dict[str, str] | None
    timeout: int | None


_Flow = Generator[_Cmd, ExecResult, Any]


def _git(argv: list[str], cwd: str | None, envs: dict[str, str] | None, timeout: int | None) -> _Cmd:
    return _Cmd(shlex.join(argv), cwd, {**_GIT_ENV, **(envs or {})}, timeout)


# ---- the operations, once -------------------------------------------------------------------------

class _Ops:
    """Each method is a flow; its signature and docstring are the public method's."""

    @staticmethod
    def clone(url: str, dest: str | None = None, *, branch: str | None = None, depth: int | None = None,
              username: str | None = None, password: str | None = None, dangerously_store_credentials: bool = False,
              cwd: str | None = None, envs: dict[str, str] | None = None, timeout: int | None = 300) -> _Flow:
        """Clone a repository into the capsule (``dest`` defaults to the name in the URL). With
        username/password (HTTP(S)), the credentials are removed from the remote URL afterwards
        unless ``dangerously_store_credentials``."""
        if password and not username:
            raise ValueError("Username is required when using a password for git clone.")
        clone_url = _embed_credentials(url, username, password) if username and password else url
        argv = ["git", "clone"]
        if branch:
            argv += ["--branch", branch, "--single-branch"]
        if depth is not None:
            argv += ["--depth", str(depth)]
        argv += [clone_url] + ([dest] if dest else [])
        result = _check((yield _git(argv, cwd, envs, timeout)), "clone")
        if username and password and not dangerously_store_credentials:
            repo = dest or _repo_dir(url)
            if repo:
                repo_cwd = posixpath.join(cwd, repo) if cwd else repo
                _check((yield _git(["git", "remote", "set-url", "origin", _strip_credentials(clone_url)],
                                   repo_cwd, envs, 30)), "clone (strip credentials)")
        return result

    @staticmethod
    def init(path: str = ".", *, bare: bool = False, initial_branch: str | None = None, cwd: str | None = None,
             envs: dict[str, str] | None = None, timeout: int | None = 30) -> _Flow:
        """Create a repository (``git init``)."""
        argv = ["git", "init"] + (["--bare"] if bare else []) + (["--initial-branch", initial_branch]
                                                                  if initial_branch else []) + [path]
        return _check((yield _git(argv, cwd, envs, timeout)), "init")

    @staticmethod
    def add(paths: list[str] | None = None, *, all: bool = False, cwd: str | None = None,
            envs: dict[str, str] | None = None, timeout: int | None = 30) -> _Flow:
        """Stage files: the given paths, else ``.`` (``all=True``: ``-A``)."""
        argv = ["git", "add"] + (["-A"] if all else []) + (["--", *paths] if paths else ([] if all else ["."]))
        return _check((yield _git(argv, cwd, envs, timeout)), "add")

    @staticmethod
    def commit(message: str, *, allow_empty: bool = False, author_name: str | None = None,
               author_email: str | None = None, cwd: str | None = None, envs: dict[str, str] | None = None,
               timeout: int | None = 30) -> _Flow:
        """Commit what is staged."""
        argv = ["git", "commit", "-m", message] + (["--allow-empty"] if allow_empty else [])
        if author_name and author_email:
            argv += ["--author", f"{author_name} <{author_email}>"]
        return _check((yield _git(argv, cwd, envs, timeout)), "commit")

    @staticmethod
    def _with_credentials(remote: str, username: str, password: str, argv: list[str], op: str,
                          cwd: str | None, envs: dict[str, str] | None, timeout: int | None) -> _Flow:
        """Put the credentials in the remote's URL for one command, then restore it."""
        got = yield _git(["git", "remote", "get-url", remote], cwd, envs, timeout)
        original = got.stdout.strip() if got.exit_code == 0 else ""
        if not original:
            raise GitCommandError(f"Remote '{remote}' not found.", exit_code=1)
        yield _git(["git", "remote", "set-url", remote, _embed_credentials(original, username, password)],
                   cwd, envs, timeout)
        try:
            result = _check((yield _git(argv, cwd, envs, timeout)), op)
        finally:
            yield _git(["git", "remote", "set-url", remote, original], cwd, envs, timeout)
        return result

    @staticmethod
    def push(remote: str = "origin", branch: str | None = None, *, force: bool = False, set_upstream: bool = False,
             username: str | None = None, password: str | None = None, cwd: str | None = None,
             envs: dict[str, str] | None = None, timeout: int | None = 60) -> _Flow:
        """Push to a remote (``branch`` defaults to the current one)."""
        argv = ["git", "push"] + (["--force"] if force else []) + (["--set-upstream"] if set_upstream else [])
        argv += [remote] + ([branch] if branch else [])
        if username and password:
            return (yield from _Ops._with_credentials(remote, username, password, argv, "push", cwd, envs, timeout))
        return _check((yield _git(argv, cwd, envs, timeout)), "push")

    @staticmethod
    def pull(remote: str = "origin", branch: str | None = None, *, rebase: bool = False, ff_only: bool = False,
             username: str | None = None, password: str | None = None, cwd: str | None = None,
             envs: dict[str, str] | None = None, timeout: int | None = 60) -> _Flow:
        """Pull from a remote."""
        argv = ["git", "pull"] + (["--rebase"] if rebase else []) + (["--ff-only"] if ff_only else [])
        argv += [remote] + ([branch] if branch else [])
        if username and password:
            return (yield from _Ops._with_credentials(remote, username, password, argv, "pull", cwd, envs, timeout))
        return _check((yield _git(argv, cwd, envs, timeout)), "pull")

    @staticmethod
    def status(*, cwd: str | None = None, envs: dict[str, str] | None = None, timeout: int | None = 30) -> _Flow:
        """Branch, upstream, ahead/behind and changed files, parsed into a :class:`GitStatus`."""
        result = _check((yield _git(["git", "status", "--porcelain=v1", "--branch"], cwd, envs, timeout)), "status")
        return parse_status(result.stdout)

    @staticmethod
    def branches(*, cwd: str | None = None, envs: dict[str, str] | None = None, timeout: int | None = 30) -> _Flow:
        """Local branches as :class:`GitBranch` (name, is_current)."""
        result = _check((yield _git(["git", "branch", "--format=%(refname:short)\t%(HEAD)"], cwd, envs, timeout)),
                        "branches")
        return parse_branches(result.stdout)

    @staticmethod
    def create_branch(name: str, *, start_point: str | None = None, cwd: str | None = None,
                      envs: dict[str, str] | None = None, timeout: int | None = 30) -> _Flow:
        """Create a branch and check it out (``git checkout -b``)."""
        argv = ["git", "checkout", "-b", name] + ([start_point] if start_point else [])
        return _check((yield _git(argv, cwd, envs, timeout)), "create_branch")

    @staticmethod
    def checkout_branch(name: str, *, cwd: str | None = None, envs: dict[str, str] | None = None,
                        timeout: int | None = 30) -> _Flow:
        """Check out a branch."""
        return _check((yield _git(["git", "checkout", name], cwd, envs, timeout)), "checkout_branch")

    @staticmethod
    def delete_branch(name: str, *, force: bool = False, cwd: str | None = None, envs: dict[str, str] | None = None,
                      timeout: int | None = 30) -> _Flow:
        """Delete a branch (``force``: even if not merged)."""
        return _check((yield _git(["git", "branch", "-D" if force else "-d", name], cwd, envs, timeout)),
                      "delete_branch")

    @staticmethod
    def remote_add(name: str, url: str, *, fetch: bool = False, cwd: str | None = None,
                   envs: dict[str, str] | None = None, timeout: int | None = 30) -> _Flow:
        """Add a remote (``fetch``: and fetch it)."""
        argv = ["git", "remote", "add"] + (["-f"] if fetch else []) + [name, url]
        return _check((yield _git(argv, cwd, envs, timeout)), "remote_add")

    @staticmethod
    def remote_get(name: str = "origin", *, cwd: str | None = None, envs: dict[str, str] | None = None,
                   timeout: int | None = 30) -> _Flow:
        """A remote's URL, or None if there is no such remote."""
        result = yield _git(["git", "remote", "get-url", name], cwd, envs, timeout)
        return (result.stdout.strip() or None) if result.exit_code == 0 else None

    @staticmethod
    def reset(*, mode: str | None = None, ref: str | None = None, paths: list[str] | None = None,
              cwd: str | None = None, envs: dict[str, str] | None = None, timeout: int | None = 30) -> _Flow:
        """``git reset [--mode] [ref] [-- paths]``; mode is soft, mixed, hard, merge or keep."""
        if mode and mode not in _RESET_MODES:
            raise ValueError(f"Reset mode must be one of {', '.join(sorted(_RESET_MODES))}.")
        argv = ["git", "reset"] + ([f"--{mode}"] if mode else []) + ([ref] if ref else [])
        argv += ["--", *paths] if paths else []
        return _check((yield _git(argv, cwd, envs, timeout)), "reset")

    @staticmethod
    def restore(paths: list[str], *, staged: bool = False, worktree: bool = False, source: str | None = None,
                cwd: str | None = None, envs: dict[str, str] | None = None, timeout: int | None = 30) -> _Flow:
        """``git restore`` (the working tree unless ``staged`` alone is asked)."""
        if not paths:
            raise ValueError("At least one path is required.")
        worktree = worktree or not staged
        argv = ["git", "restore"] + (["--worktree"] if worktree else []) + (["--staged"] if staged else [])
        argv += (["--source", source] if source else []) + ["--", *paths]
        return _check((yield _git(argv, cwd, envs, timeout)), "restore")

    @staticmethod
    def set_config(key: str, value: str, *, scope: str = "local", cwd: str | None = None,
                   envs: dict[str, str] | None = None, timeout: int | None = 30) -> _Flow:
        """``git config --<scope> key value`` (local scope: the repository at ``cwd``)."""
        flag = _scope(scope)
        argv = ["git"] + (["-C", cwd] if scope == "local" and cwd else []) + ["config", flag, key, value]
        return _check((yield _git(argv, cwd, envs, timeout)), "set_config")

    @staticmethod
    def get_config(key: str, *, scope: str = "local", cwd: str | None = None, envs: dict[str, str] | None = None,
                   timeout: int | None = 30) -> _Flow:
        """A config value, or None if unset."""
        flag = _scope(scope)
        argv = ["git"] + (["-C", cwd] if scope == "local" and cwd else []) + ["config", flag, "--get", key]
        result = yield _git(argv, cwd, envs, timeout)
        return (result.stdout.strip() or None) if result.exit_code == 0 else None

    @staticmethod
    def configure_user(name: str, email: str, *, scope: str = "global", cwd: str | None = None,
                       envs: dict[str, str] | None = None, timeout: int | None = 30) -> _Flow:
        """Set user.name and user.email."""
        if not name or not email:
            raise ValueError("Both name and email are required.")
        yield from _Ops.set_config("user.name", name, scope=scope, cwd=cwd, envs=envs, timeout=timeout)
        yield from _Ops.set_config("user.email", email, scope=scope, cwd=cwd, envs=envs, timeout=timeout)

    @staticmethod
    def dangerously_authenticate(username: str, password: str, host: str = "github.com", protocol: str = "https", *,
                                 cwd: str | None = None, envs: dict[str, str] | None = None,
                                 timeout: int | None = 30) -> _Flow:
        """Store credentials in the capsule (git's `store` helper: plain text on its disk)."""
        if not username or not password:
            raise ValueError("Both username and password are required.")
        if "\n" in username or "\n" in password:
            raise ValueError("Credentials must not contain newline characters.")
        yield from _Ops.set_config("credential.helper", "store", scope="global", cwd=cwd, envs=envs, timeout=timeout)
        creds = f"protocol={protocol.strip() or 'https'}\nhost={host.strip() or 'github.com'}\n" \
                f"username={username}\npassword={password}\n\n"
        line = f"printf %s {shlex.quote(creds)} | git credential approve"
        _check((yield _Cmd(line, cwd, {**_GIT_ENV, **(envs or {})}, timeout)), "dangerously_authenticate")


_PUBLIC = [n for n in vars(_Ops) if not n.startswith("_")]


def _sync_method(flow_fn: Callable[..., _Flow]) -> Callable[..., Any]:
    @functools.wraps(flow_fn)
    def method(self: Git, *args: Any, **kwargs: Any) -> Any:
        flow = flow_fn(*args, **kwargs)
        result: Any = None
        while True:
            try:
                cmd = flow.send(result)
            except StopIteration as stop:
                return stop.value
            result = self._commands.run(cmd.line, timeout=cmd.timeout, envs=cmd.envs, cwd=cmd.cwd)
    return method


def _async_method(flow_fn: Callable[..., _Flow]) -> Callable[..., Any]:
    @functools.wraps(flow_fn)
    async def method(self: AsyncGit, *args: Any, **kwargs: Any) -> Any:
        flow = flow_fn(*args, **kwargs)
        result: Any = None
        while True:
            try:
                cmd = flow.send(result)
            except StopIteration as stop:
                return stop.value
            result = await self._commands.run(cmd.line, timeout=cmd.timeout, envs=cmd.envs, cwd=cmd.cwd)
    return method


class Git:
    """``capsule.git``: git in the capsule (sync). Every method raises :class:`GitCommandError` or
    :class:`GitAuthError` when git fails."""

    def __init__(self, commands: Any) -> None:
        self._commands = commands


class AsyncGit:
    """``capsule.git`` of an :class:`~wrenn.AsyncCapsule`: the same methods, awaitable."""

    def __init__(self, commands: Any) -> None:
        self._commands = commands


for _name in _PUBLIC:
    setattr(Git, _name, _sync_method(getattr(_Ops, _name)))
    setattr(AsyncGit, _name, _async_method(getattr(_Ops, _name)))
