"""`defaults`: the user, working directory and environment every exec, spawn, PTY and file op
gets unless the request says otherwise.

A template build sets them (its USER, WORKDIR and ENV steps). They live in this agent's memory, so
every capsule restored from the template's snapshot has them without being told again.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import threading

from .protocol import AgentError
from .server import Request


@dataclasses.dataclass(frozen=True)
class Defaults:
    user: str = "root"
    uid: int = 0
    gid: int = 0
    groups: tuple[int, ...] = ()
    home: str = "/root"
    cwd: str | None = None  # None: the user's home (or / if it has none)
    envs: tuple[tuple[str, str], ...] = ()

    def workdir(self) -> str:
        if self.cwd is not None:
            return self.cwd
        return self.home if os.path.isdir(self.home) else "/"

    def popen_kwargs(self) -> dict:
        """What subprocess.Popen needs to run as the default user (nothing when it is us)."""
        if self.uid == os.getuid():
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}

    def chown(self, path: str) -> None:
        """Give a file the host just created to the default user."""
        if self.uid != os.getuid():
            os.chown(path, self.uid, self.gid, follow_symlinks=False)


_lock = threading.Lock()
_current = Defaults()


def current() -> Defaults:
    return _current


def _lookup(user: str) -> Defaults:
    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, OverflowError):
        raise AgentError("not_found", f"user {user!r} does not exist") from None
    groups = tuple(g for g in os.getgrouplist(pw.pw_name, pw.pw_gid) if g != pw.pw_gid)
    return Defaults(user=pw.pw_name, uid=pw.pw_uid, gid=pw.pw_gid, groups=groups, home=pw.pw_dir or "/")


def set_defaults(req: Request) -> dict:
    """Change the defaults; what the request leaves out is kept. `user` (name or uid: HOME follows
    it), `cwd` (an existing absolute directory; "" = the user's home), `envs` (merged over the
    current ones; a null value removes a name), `reset: true` starts from root's defaults."""
    global _current
    p = req.params
    user, cwd, envs = p.get("user"), p.get("cwd"), p.get("envs") or {}
    if user is not None and (not isinstance(user, str) or not user):
        raise AgentError("invalid", "user must be a non-empty string")
    if cwd is not None and (not isinstance(cwd, str) or (cwd and not cwd.startswith("/"))):
        raise AgentError("invalid", "cwd must be an absolute path")
    if cwd and not os.path.isdir(cwd):
        raise AgentError("not_found", f"cwd {cwd}: no such directory")
    if not isinstance(envs, dict) or not all(isinstance(k, str) and k and "=" not in k and "\0" not in k
                                             and (v is None or isinstance(v, str)) for k, v in envs.items()):
        raise AgentError("invalid", "envs must be an object of strings (names without '=')")
    with _lock:
        base = Defaults() if p.get("reset") else _current
        new = _lookup(user) if user is not None else base
        merged = dict(base.envs)
        for k, v in envs.items():
            if v is None:
                merged.pop(k, None)
            else:
                merged[k] = v
        workdir = base.cwd if cwd is None else (os.path.normpath(cwd) if cwd else None)
        _current = dataclasses.replace(new, cwd=workdir, envs=tuple(sorted(merged.items())))
        return describe(_current)


def get_defaults(req: Request) -> dict:
    return describe(_current)


def describe(d: Defaults) -> dict:
    return {"user": d.user, "uid": d.uid, "cwd": d.workdir(), "envs": dict(d.envs)}
