"""The host agent's interface, as the control plane sees it.

The control plane never touches a VM: it calls these methods. In single-machine mode the
implementation is `wrenn_host.agent.LocalHostAgent`, in the same process; a remote agent
implements the same class over the network. So every method is async and every result is a plain
dataclass of this module that `to_wire` / `from_wire` carry as JSON.

Capsule and template records (teams, names, statuses) belong to the control plane; the host agent
only knows ids and the files/processes behind them. Template ids are opaque strings chosen by the
control plane (built-in templates use their name: ``minimal``, ``base-python``).

Errors: every method raises a subclass of `HostAgentError`.
"""

from __future__ import annotations

import abc
import base64
import dataclasses
import types
import typing
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from wrenn_host.network.policy import EgressPolicy


class HostAgentError(Exception):
    """Base of every host agent failure. `code` follows the guest protocol's codes where it can."""

    code = "agent_error"

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class CapsuleNotFound(HostAgentError):
    code = "not_found"


class TemplateNotFound(HostAgentError):
    code = "not_found"


class InvalidShape(HostAgentError):
    """vcpus/memory_mb outside what this host can give."""

    code = "invalid"


class GuestError(HostAgentError):
    """The guest agent answered with an error (code as in the guest protocol: not_found,
    is_directory, not_directory, exists, permission_denied, invalid, no_such_process, ...)."""


class VMMError(HostAgentError):
    """The VMM failed (start, restore, pause): the capsule may be unusable."""

    code = "vmm_error"


@dataclasses.dataclass(frozen=True)
class CapsuleRuntime:
    """What the host agent knows of one capsule."""

    capsule_id: str
    state: str  # "running" | "paused" | "error" (the VM died without a pause to go back to)
    template_id: str
    vcpus: int
    memory_mb: int
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)  # kernel_version, vmm_version, agent_version
    # The guest's root filesystem, when the host knows it without asking the guest: a create
    # served from a spare VM (measured as the spare was warmed; a fresh clone's disk is the
    # template's). Saves the control plane a guest call on the first GET.
    disk_used_bytes: int | None = None
    disk_size_bytes: int | None = None


@dataclasses.dataclass(frozen=True)
class TemplateRuntime:
    template_id: str
    vcpus: int
    memory_mb: int
    size_bytes: int
    # Built-in templates: changes whenever what they are made of does (recipe, guest agent), so
    # caches keyed by a template (the build step cache) notice a rebuilt image.
    version: str = ""


@dataclasses.dataclass(frozen=True)
class ExecResult:
    stdout: bytes
    stderr: bytes
    exit_code: int
    duration_ms: int
    timed_out: bool = False
    # Output past the exec's max_output_bytes was dropped by the guest.
    stdout_truncated: bool = False
    stderr_truncated: bool = False


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    pid: int
    tag: str
    cmd: str
    args: list[str]
    running: bool
    exit_code: int | None


@dataclasses.dataclass(frozen=True)
class FileInfo:
    """A file, directory or symlink in the guest (`stat`, `mkdir`, `list_dir`)."""

    name: str
    path: str
    type: str  # "file" | "directory" | "symlink"
    size: int
    mode: int
    permissions: str  # "rwxr-xr-x"
    owner: str
    group: str
    modified_at: str  # RFC 3339, UTC
    symlink_target: str | None = None


@dataclasses.dataclass(frozen=True)
class CapsuleMetrics:
    """One sample of the guest's usage; a field the guest could not read is None."""

    cpu_pct: float | None = None
    mem_bytes: int | None = None
    disk_bytes: int | None = None
    disk_size_bytes: int | None = None


@dataclasses.dataclass(frozen=True)
class GuestDefaults:
    """The user, working directory and environment exec, spawn, PTYs and file ops use by default."""

    user: str
    uid: int
    cwd: str
    envs: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class HostLimits:
    """The capsule shapes this host can give."""

    max_vcpus: int
    min_memory_mb: int
    max_memory_mb: int

    def check(self, vcpus: int, memory_mb: int) -> None:
        """The one shape check: InvalidShape, with the bounds, when a capsule does not fit."""
        if not 1 <= vcpus <= self.max_vcpus:
            raise InvalidShape(f"vcpus must be between 1 and {self.max_vcpus}, got {vcpus}")
        if not self.min_memory_mb <= memory_mb <= self.max_memory_mb:
            raise InvalidShape(f"memory_mb must be between {self.min_memory_mb} and {self.max_memory_mb}, "
                               f"got {memory_mb}")


@dataclasses.dataclass(frozen=True)
class StreamEvent:
    """One event of an attached process: kind is "stdout", "stderr" or "exit" (a PTY: "output"
    or "exit")."""

    kind: str
    data: bytes = b""
    exit_code: int | None = None


@dataclasses.dataclass(frozen=True)
class ReconcileReport:
    running: list[str]  # capsule ids whose VM is alive and answering
    paused: list[str]  # capsule ids with a complete paused state on disk
    lost: list[str]  # capsule ids found on disk that could not be recovered (files removed)
    # capsule id -> why its files could not be made sense of (they are kept aside, not deleted)
    errors: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ArchiveFile:
    """One file of an archive: its name inside the object's directory (flat, no "/"), size in
    bytes, sha256 (hex, over the whole content with holes as zeros) and permission bits."""

    path: str
    size: int
    sha256: str
    mode: int


@dataclasses.dataclass(frozen=True)
class ArchiveManifest:
    """What `read_archive` will send for one object, and what `write_archive` checks it against.

    kind: "template" (a snapshot template) or "capsule" (a paused capsule); object_id: its id.
    meta: what the receiving host needs besides the files (its metadata as JSON strings, the
    archive format); opaque to the control plane."""

    kind: str
    object_id: str
    files: list[ArchiveFile]
    meta: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def size(self) -> int:
        """Bytes of file content (holes included): what a transfer moves at most."""
        return sum(f.size for f in self.files)


class Tunnel(abc.ABC):
    """A TCP connection to a port inside a capsule (`HostAgent.tcp_connect`). Use it as an async
    context manager, or call `close()`: that ends the connection in the guest too."""

    @abc.abstractmethod
    async def read(self) -> bytes:
        """The next bytes the service sent; b"" once it has closed its side (or the tunnel was
        closed). Raises HostAgentError if the connection to the guest broke."""

    @abc.abstractmethod
    async def write(self, data: bytes) -> None:
        """Send bytes to the service; waits while the service is not reading them (only a few
        frames are ever in flight). Raises HostAgentError once the tunnel is over."""

    @abc.abstractmethod
    async def write_eof(self) -> None:
        """Half-close: the service reads EOF, and may still answer."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the connection (idempotent)."""

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        while data := await self.read():
            yield data

    async def __aenter__(self) -> Tunnel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class HostAgent(abc.ABC):
    @abc.abstractmethod
    async def start(self, known: dict[str, str]) -> ReconcileReport:
        """Start the agent and reconcile. `known` maps capsule id -> status the control plane
        believes. Capsules on disk that `known` does not list are cleaned up."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop background work. Running capsules keep running (they survive a server restart)."""

    @abc.abstractmethod
    async def health(self) -> dict[str, Any]:
        """A free-form report for /api/health: {"accelerator": "kvm"|"tcg", "vmm": "qemu 7.2", ...}"""

    @abc.abstractmethod
    async def limits(self) -> HostLimits:
        """The shapes `create` accepts; outside them it raises InvalidShape (the one shape check)."""

    async def capacity(self) -> dict[str, int | None]:
        """What the host has left now: {"free_memory_mb", "free_disk_mb"} (None: unknown)."""
        return {"free_memory_mb": None, "free_disk_mb": None}

    # lifecycle
    @abc.abstractmethod
    async def create(self, capsule_id: str, template_id: str, vcpus: int | None, memory_mb: int | None,
                     network: EgressPolicy | None = None) -> CapsuleRuntime:
        """Create and start a capsule from a template; returns once the guest agent answers.
        For a snapshot template, vcpus/memory_mb must be None or equal to the template's.
        `network`: its egress policy (default: internet allowed, private ranges denied)."""

    @abc.abstractmethod
    async def update_network(self, capsule_id: str, policy: EgressPolicy) -> None:
        """Replace a capsule's egress policy: at once if it runs, from its next resume if paused."""

    @abc.abstractmethod
    async def pause(self, capsule_id: str) -> None: ...

    @abc.abstractmethod
    async def resume(self, capsule_id: str) -> CapsuleRuntime: ...

    @abc.abstractmethod
    async def destroy(self, capsule_id: str) -> None:
        """Remove everything the capsule owns. Unknown id: no error (idempotent)."""

    @abc.abstractmethod
    async def get(self, capsule_id: str) -> CapsuleRuntime: ...

    # templates
    @abc.abstractmethod
    async def snapshot(self, capsule_id: str, template_id: str) -> TemplateRuntime:
        """Make a template from a running or paused capsule; the capsule is left paused."""

    @abc.abstractmethod
    async def delete_template(self, template_id: str) -> None: ...

    @abc.abstractmethod
    async def template_info(self, template_id: str) -> TemplateRuntime:
        """A snapshot template's shape and size; TemplateNotFound if this host has none by that id."""

    @abc.abstractmethod
    async def builtin_templates(self) -> list[TemplateRuntime]: ...

    # commands and processes
    @abc.abstractmethod
    async def exec(self, capsule_id: str, cmd: str, args: list[str], *, envs: dict[str, str] | None = None,
                   cwd: str | None = None, timeout_sec: float = 30,
                   max_output_bytes: int | None = None) -> ExecResult:
        """`max_output_bytes`: bytes kept of each of stdout and stderr (None: the guest's default)."""

    @abc.abstractmethod
    async def spawn(self, capsule_id: str, cmd: str, args: list[str], *, envs: dict[str, str] | None = None,
                    cwd: str | None = None, tag: str | None = None) -> ProcessInfo: ...

    @abc.abstractmethod
    async def processes(self, capsule_id: str) -> list[ProcessInfo]: ...

    @abc.abstractmethod
    async def set_defaults(self, capsule_id: str, *, user: str | None = None, cwd: str | None = None,
                           envs: dict[str, str] | None = None) -> GuestDefaults:
        """Change the user, working directory and environment that exec, spawn, PTYs and file
        ops use when the call gives none (a template's USER, WORKDIR, ENV). None keeps a field;
        `envs` merge over the current ones. They are part of the guest's memory, so a snapshot
        template keeps them. Returns the defaults now in force."""

    @abc.abstractmethod
    async def kill(self, capsule_id: str, target: int | str, signal: str = "SIGKILL") -> None: ...

    @abc.abstractmethod
    def attach(self, capsule_id: str, target: int | str) -> AsyncIterator[StreamEvent]: ...

    # interactive terminals: a PTY session lives in the guest whether or not anyone is attached
    @abc.abstractmethod
    async def pty_start(self, capsule_id: str, cmd: str = "/bin/bash", args: list[str] | None = None, *,
                        cols: int = 80, rows: int = 24, envs: dict[str, str] | None = None,
                        cwd: str | None = None, tag: str | None = None) -> ProcessInfo:
        """Start `cmd` on a new pseudo-terminal of `cols` x `rows`; tag defaults to `pty-<8 hex>`."""

    @abc.abstractmethod
    async def pty_sessions(self, capsule_id: str) -> list[ProcessInfo]:
        """The capsule's PTY sessions (finished ones for a while, with running=False)."""

    @abc.abstractmethod
    def pty_attach(self, capsule_id: str, target: int | str) -> AsyncIterator[StreamEvent]:
        """Recent output (bounded scrollback), then live output, as kind "output" events; then one
        "exit" event when the session's process ends. Leaving early detaches only."""

    @abc.abstractmethod
    async def pty_input(self, capsule_id: str, target: int | str, data: bytes) -> None: ...

    @abc.abstractmethod
    async def pty_resize(self, capsule_id: str, target: int | str, cols: int, rows: int) -> None: ...

    @abc.abstractmethod
    async def pty_kill(self, capsule_id: str, target: int | str, signal: str = "SIGKILL") -> None:
        """Signal the session's process group; on a finished session, forget it."""

    # files
    @abc.abstractmethod
    async def read_file(self, capsule_id: str, path: str) -> bytes: ...

    @abc.abstractmethod
    def read_file_stream(self, capsule_id: str, path: str) -> AsyncIterator[bytes]: ...

    @abc.abstractmethod
    async def write_file(self, capsule_id: str, path: str, data: bytes | AsyncIterator[bytes]) -> int: ...

    @abc.abstractmethod
    async def list_dir(self, capsule_id: str, path: str, depth: int = 1) -> list[FileInfo]: ...

    @abc.abstractmethod
    async def stat(self, capsule_id: str, path: str) -> FileInfo: ...

    @abc.abstractmethod
    async def mkdir(self, capsule_id: str, path: str) -> FileInfo:
        """Create the directory and its parents; an existing directory is no error."""

    @abc.abstractmethod
    async def remove(self, capsule_id: str, path: str) -> None: ...

    @abc.abstractmethod
    async def metrics(self, capsule_id: str) -> CapsuleMetrics: ...

    # ports
    @abc.abstractmethod
    async def tcp_connect(self, capsule_id: str, port: int) -> Tunnel:
        """Connect to `port` on the capsule's loopback. Nothing listening: GuestError with code
        "refused"."""


    # moving templates and paused capsules between hosts (see wrenn_control/hosts/transfer.py)
    async def archive_manifest(self, kind: str, object_id: str) -> ArchiveManifest:
        """The files (names, sizes, sha256) `read_archive(kind, object_id)` sends. kind "template":
        a snapshot template (TemplateNotFound if this host has none; built-in templates are built
        by every host and never move). kind "capsule": a paused capsule (CapsuleNotFound; a running
        one: HostAgentError code "invalid_state"). The object must not change until it is read."""
        raise HostAgentError("this host agent cannot move templates or capsules", code="unsupported")

    def read_archive(self, kind: str, object_id: str) -> AsyncIterator[bytes]:
        """The object's files as one archive stream (wrenn_host/archive.py), read chunk by chunk,
        never whole in memory. Same errors as `archive_manifest`."""
        raise HostAgentError("this host agent cannot move templates or capsules", code="unsupported")

    async def write_archive(self, kind: str, object_id: str, data: AsyncIterator[bytes],
                            manifest: ArchiveManifest) -> None:
        """Receive an object another host's `read_archive` sends: staged, every file checked
        against `manifest` (a different size or sha256: HostAgentError code "checksum_mismatch",
        nothing installed, nothing left behind), then installed at once. A template is then usable
        by `create` and `template_info` (one this host already holds: no-op, the stream is not
        read). A capsule is then known here as paused, ready for `resume` with its memory and
        files (its template must be here first: TemplateNotFound; an id this host already has:
        code "exists"). It gets a fresh network slot when it resumes and keeps its egress policy."""
        raise HostAgentError("this host agent cannot move templates or capsules", code="unsupported")


# ---------------------------------------------------------------------- wire form
# A remote host agent sends these dataclasses as JSON: fields by name, bytes as base64, nested
# dataclasses as objects. Decoding follows the field types, so a newer peer's extra fields are
# ignored and a missing field with a default keeps it.

T = TypeVar("T")


def to_wire(obj: Any) -> Any:
    """A dataclass of this module (or a list/dict of them) as plain JSON types."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_wire(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(obj)).decode("ascii")
    if isinstance(obj, (list, tuple)):
        return [to_wire(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_wire(v) for k, v in obj.items()}
    return obj


def from_wire(cls: type[T], data: Any) -> T:
    """The inverse of `to_wire` for `cls` (a dataclass, or a type such as list[FileInfo])."""
    return _decode(cls, data)


def _decode(tp: Any, data: Any) -> Any:
    if data is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _decode(inner[0], data) if len(inner) == 1 else data
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_decode(item, v) for v in data]
    if origin is dict:
        _, value = typing.get_args(tp) or (Any, Any)
        return {k: _decode(value, v) for k, v in data.items()}
    if tp is bytes:
        return base64.b64decode(data)
    if dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise ValueError(f"{tp.__name__}: an object was expected, got {type(data).__name__}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: _decode(hints[f.name], data[f.name])
                  for f in dataclasses.fields(tp) if f.name in data}
        return tp(**fields)
    return data
