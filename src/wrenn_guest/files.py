"""File operations: read, write, stat, list, mkdir, remove."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import tempfile
import time

from . import defaults
from .protocol import MAX_PAYLOAD, AgentError
from .server import Cancelled, Request

DEFAULT_FILE_MODE = 0o644


def _path(params: dict) -> str:
    path = params.get("path")
    if not isinstance(path, str) or not path or "\0" in path:
        raise AgentError("invalid", "path must be a non-empty string without NUL characters")
    return normalise(path)


def normalise(path: str) -> str:
    """Absolute, without `.`, `..`, repeated or trailing slashes; relative paths are taken from
    the default exec cwd (a template's WORKDIR, else home). normpath keeps a leading `//` (POSIX
    lets it mean something else), which would slip past a `== "/"` guard."""
    path = os.path.normpath(os.path.join(defaults.current().workdir(), path))
    return "/" + path.lstrip("/")


class _Names:
    """uid/gid -> name, cached for one request only (users may be added at any time)."""

    def __init__(self) -> None:
        self.users: dict[int, str] = {}
        self.groups: dict[int, str] = {}

    def user(self, uid: int) -> str:
        if uid not in self.users:
            try:
                self.users[uid] = pwd.getpwuid(uid).pw_name
            except KeyError:
                self.users[uid] = str(uid)
        return self.users[uid]

    def group(self, gid: int) -> str:
        if gid not in self.groups:
            try:
                self.groups[gid] = grp.getgrgid(gid).gr_name
            except KeyError:
                self.groups[gid] = str(gid)
        return self.groups[gid]


def entry(path: str, names: _Names | None = None) -> dict:
    names = names or _Names()
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        kind = "symlink"
    elif stat.S_ISDIR(st.st_mode):
        kind = "directory"
    else:
        kind = "file"  # devices, fifos and sockets too: the spec has three types
    return {
        "name": os.path.basename(path) or path,
        "path": path,
        "type": kind,
        "size": st.st_size,
        "mode": stat.S_IMODE(st.st_mode),
        "permissions": stat.filemode(st.st_mode)[1:],
        "owner": names.user(st.st_uid),
        "group": names.group(st.st_gid),
        "modified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(st.st_mtime)),
        "symlink_target": os.readlink(path) if kind == "symlink" else None,
    }


def file_read(req: Request) -> dict:
    path = _path(req.params)
    size = 0
    with open(path, "rb", buffering=0) as f:  # a directory fails here with EISDIR
        while True:
            if req.cancelled.is_set():
                raise Cancelled()
            chunk = f.read(MAX_PAYLOAD)
            if not chunk:
                break
            size += len(chunk)
            req.send_data(chunk, "file")
    return {"size": size}


def file_write(req: Request) -> dict:
    path = _path(req.params)
    mode = _mode(req.params.get("mode"))
    if os.path.islink(path):
        path = os.path.realpath(path)  # write through a symlink, as a shell redirection does
    if os.path.isdir(path):
        raise AgentError("is_directory", f"{path}: is a directory")
    parent = os.path.dirname(path)
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise AgentError("not_directory", f"{parent}: not a directory")
    _makedirs(parent)
    try:
        old = os.stat(path)
    except FileNotFoundError:
        old = None
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".wrenn-tmp")
    size = 0
    try:
        with os.fdopen(fd, "wb") as f:
            if req.payload:  # tolerated: a first chunk carried by the request frame itself
                f.write(req.payload)
                size += len(req.payload)
            for chunk in req.upload_chunks():
                f.write(chunk)
                size += len(chunk)
            # mkstemp made it 0600: give it the asked mode, else keep the replaced file's
            os.fchmod(f.fileno(), mode if mode is not None else
                      stat.S_IMODE(old.st_mode) if old else DEFAULT_FILE_MODE)
            try:
                if old is not None:
                    os.fchown(f.fileno(), old.st_uid, old.st_gid)
                else:  # a new file belongs to the default user (a template's USER)
                    defaults.current().chown(tmp)
            except OSError:
                pass
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return {"size": size}


def _makedirs(path: str) -> None:
    """os.makedirs, giving each directory it creates to the default user."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent != path:
        _makedirs(parent)
    try:
        os.mkdir(path)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return
    defaults.current().chown(path)


def _mode(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):  # "644" / "0o644": octal text
        try:
            value = int(value.removeprefix("0o"), 8)
        except ValueError:
            raise AgentError("invalid", f"bad mode {value!r}") from None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0o7777:
        raise AgentError("invalid", f"bad mode {value!r}")
    return value


def stat_(req: Request) -> dict:
    return {"entry": entry(_path(req.params))}


def list_(req: Request) -> dict:
    path = _path(req.params)
    depth = req.params.get("depth", 1)
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise AgentError("invalid", "depth must be an integer >= 1")
    out: list[dict] = []
    _walk(path, depth, out, _Names(), top=True)
    out.sort(key=lambda e: e["path"])
    return {"entries": out}


def _walk(path: str, depth: int, out: list, names: _Names, top: bool = False) -> None:
    try:
        with os.scandir(path) as it:
            children = [d.name for d in it]
    except OSError:
        if top:
            raise
        return  # an unreadable subdirectory is listed but not descended into
    for name in children:
        child = os.path.join(path, name)
        try:
            e = entry(child, names)
        except FileNotFoundError:
            continue  # removed while we were listing
        out.append(e)
        if depth > 1 and e["type"] == "directory":
            _walk(child, depth - 1, out, names)


def mkdir(req: Request) -> dict:
    path = _path(req.params)
    _makedirs(path)  # an existing non-directory raises EEXIST
    return {"entry": entry(path)}


def remove(req: Request) -> dict:
    path = _path(req.params)
    if path == "/":
        raise AgentError("invalid", "refusing to remove /")
    if stat.S_ISDIR(os.lstat(path).st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)
    return {}
