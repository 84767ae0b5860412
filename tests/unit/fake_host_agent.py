"""An in-memory HostAgent for the control plane's unit tests (no VMs).

Knobs:
- `fail(op, exc, times=1)`: the next `times` calls of `op` raise `exc` (times=None: always).
- `delays[op] = seconds`: every call of `op` sleeps first (e.g. a slow create).
- `exec_handler(capsule_id, cmd, args, envs, cwd, timeout_sec) -> ExecResult`: what exec returns
  (default: echo of the command line on stdout).
- `crash(capsule_id)`: the VM vanishes (as if QEMU died).
- `survivors(...)`: a new fake holding what this one had, as a host agent after a restart.
- `calls`: every call made, as (op, capsule_id or template_id).
- `metrics_values[capsule_id] = {...}`: what `metrics` answers for it (over the defaults), or an
  exception it raises; `metrics_delays[capsule_id] = seconds` before it answers.
- `forwards[(capsule_id, port)] = local_port`: tcp_connect reaches that local port (a real TCP
  connection); `tunnels_open` counts the tunnels not closed yet.
- `archive_tamper(chunk) -> chunk`: read_archive's data passes through it (damage in flight);
  archives use the real format and checks (wrenn_host/archive.py), one pickled object each.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import pickle
import stat
from collections.abc import AsyncIterator, Callable
from typing import Any

from wrenn_host.network.policy import EgressPolicy
from wrenn_host import archive
from wrenn_host.api import (
    ArchiveManifest,
    CapsuleMetrics,
    CapsuleNotFound,
    CapsuleRuntime,
    ExecResult,
    FileInfo,
    GuestDefaults,
    GuestError,
    HostAgent,
    HostAgentError,
    HostLimits,
    InvalidShape,
    ProcessInfo,
    ReconcileReport,
    StreamEvent,
    TemplateNotFound,
    TemplateRuntime,
    Tunnel,
)

BUILTINS = [TemplateRuntime("minimal", 1, 512, 300_000_000), TemplateRuntime("base-python", 1, 512, 500_000_000)]
SYSTEM_METADATA = {"kernel_version": "6.1.0-fake", "vmm_version": "qemu 7.2 (fake)", "agent_version": "0.1"}


@dataclasses.dataclass
class FakeCapsule:
    capsule_id: str
    state: str
    template_id: str
    vcpus: int
    memory_mb: int
    files: dict[str, bytes] = dataclasses.field(default_factory=dict)
    dirs: set[str] = dataclasses.field(default_factory=lambda: {"/", "/root", "/tmp"})
    processes: dict[int, ProcessInfo] = dataclasses.field(default_factory=dict)
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    network: EgressPolicy = dataclasses.field(default_factory=EgressPolicy)

    def runtime(self) -> CapsuleRuntime:
        return CapsuleRuntime(self.capsule_id, self.state, self.template_id, self.vcpus, self.memory_mb,
                              dict(SYSTEM_METADATA))


@dataclasses.dataclass
class FakePty:
    info: ProcessInfo
    cols: int
    rows: int
    output: bytearray = dataclasses.field(default_factory=bytearray)
    inputs: list[bytes] = dataclasses.field(default_factory=list)
    changed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


def _parent(path: str) -> str:
    parent = path.rsplit("/", 1)[0]
    return parent or "/"


def _entry(path: str, kind: str, size: int = 0) -> FileInfo:
    mode = (stat.S_IFDIR | 0o755) if kind == "directory" else (stat.S_IFREG | 0o644)
    return FileInfo(name=path.rsplit("/", 1)[-1], path=path, type=kind, size=size, mode=mode,
                    permissions="rwxr-xr-x" if kind == "directory" else "rw-r--r--", owner="root",
                    group="root", modified_at="2024-11-01T10:00:05Z")


class FakeHostAgent(HostAgent):
    def __init__(self, *, max_vcpus: int = 8, max_memory_mb: int = 8192, min_memory_mb: int = 128,
                 lost_on_start: set[str] | None = None):
        self._limits = HostLimits(max_vcpus=max_vcpus, min_memory_mb=min_memory_mb, max_memory_mb=max_memory_mb)
        self.capsules: dict[str, FakeCapsule] = {}
        self.templates: dict[str, tuple[TemplateRuntime, FakeCapsule]] = {}
        self.failures: dict[str, tuple[HostAgentError, int | None]] = {}
        self.delays: dict[str, float] = {}
        self.calls: list[tuple[str, str]] = []
        self.exec_handler: Callable[..., ExecResult] | None = None
        self.lost_on_start = set(lost_on_start or ())
        self.errors_on_start: dict[str, str] = {}  # capsule id -> why the host kept it aside
        self.started_with: dict[str, str] | None = None
        self.cleaned_on_start: list[str] = []
        self.closed = False
        self.written: dict[str, int] = {}  # path -> bytes received, per write (for streaming checks)
        # attach(target) replays these (default: exit 0); kinds "sleep" and "hang" are knobs
        self.attach_events: dict[int | str, list[StreamEvent]] = {}
        self.kill_events: dict[tuple[str, int | str], asyncio.Event] = {}
        self.ptys: dict[tuple[str, str], FakePty] = {}
        self._next_pid = 100
        self.metrics_values: dict[str, dict[str, Any] | Exception] = {}
        # Disk figures a create gives, as the real agent does for a capsule served from a spare.
        self.create_disk: tuple[int, int] | None = None
        self.metrics_delays: dict[str, float] = {}
        # tcp_connect(capsule_id, port) reaches 127.0.0.1:forwards[(capsule_id, port)]; others: refused
        self.forwards: dict[tuple[str, int], int] = {}
        self.tunnels_open = 0
        # what capacity() answers (None: unknown), and the max_output_bytes each exec asked for
        self.free = {"free_memory_mb": 16384, "free_disk_mb": 100_000}
        self.exec_caps: list[int | None] = []
        self.paths_seen: list[tuple[str, str]] = []  # (op, path) as the file calls received them
        # read_archive passes its data chunks through this (a test damages them in flight)
        self.archive_tamper: Callable[[bytes], bytes] | None = None
        self.bytes_received = 0  # archive bytes write_archive took in

    # ---- knobs -----------------------------------------------------------------------------

    def fail(self, op: str, exc: HostAgentError, times: int | None = 1) -> None:
        self.failures[op] = (exc, times)

    def crash(self, capsule_id: str) -> None:
        self.capsules.pop(capsule_id, None)

    def survivors(self, *, drop: set[str] = frozenset(), lost: set[str] = frozenset()) -> "FakeHostAgent":
        """A fresh agent (as after a server restart) that finds this one's capsules on disk,
        minus `drop` (vanished) and with `lost` ones reported unrecoverable."""
        other = FakeHostAgent(max_vcpus=self._limits.max_vcpus, max_memory_mb=self._limits.max_memory_mb,
                              min_memory_mb=self._limits.min_memory_mb, lost_on_start=set(lost))
        other.capsules = {k: copy.deepcopy(v) for k, v in self.capsules.items() if k not in drop}
        other.templates = copy.deepcopy(self.templates)
        return other

    async def _hook(self, op: str, target: str = "") -> None:
        self.calls.append((op, target))
        delay = self.delays.get(op)
        if delay:
            await asyncio.sleep(delay)
        if op in self.failures:
            exc, times = self.failures[op]
            if times is not None:
                if times <= 1:
                    del self.failures[op]
                else:
                    self.failures[op] = (exc, times - 1)
            raise exc

    def _capsule(self, capsule_id: str, *, running: bool = True) -> FakeCapsule:
        cap = self.capsules.get(capsule_id)
        if cap is None:
            raise CapsuleNotFound(f"no capsule {capsule_id}")
        if running and cap.state != "running":
            raise HostAgentError(f"capsule {capsule_id} is {cap.state}")
        return cap

    def ops(self, name: str) -> list[str]:
        return [target for op, target in self.calls if op == name]

    # ---- HostAgent -------------------------------------------------------------------------

    async def start(self, known: dict[str, str]) -> ReconcileReport:
        await self._hook("start")
        self.started_with = dict(known)
        for cid in list(self.capsules):
            if cid not in known:
                self.cleaned_on_start.append(cid)
                del self.capsules[cid]
        lost = [cid for cid in self.lost_on_start if cid in self.capsules]
        for cid in lost:
            del self.capsules[cid]
        errors = {cid: why for cid, why in self.errors_on_start.items() if cid in self.capsules}
        for cid in errors:
            del self.capsules[cid]
        return ReconcileReport(
            running=[c for c, cap in self.capsules.items() if cap.state == "running"],
            paused=[c for c, cap in self.capsules.items() if cap.state == "paused"],
            lost=lost,
            errors=errors,
        )

    async def close(self) -> None:
        self.closed = True

    async def health(self) -> dict[str, Any]:
        if "health" in self.failures:
            raise self.failures["health"][0]
        return {"accelerator": "tcg", "vmm": "qemu 7.2 (fake)", "capsules": len(self.capsules)}

    async def limits(self) -> HostLimits:
        return self._limits

    async def create(self, capsule_id: str, template_id: str, vcpus: int | None, memory_mb: int | None,
                     network: EgressPolicy | None = None) -> CapsuleRuntime:
        await self._hook("create", capsule_id)
        builtin = {t.template_id: t for t in BUILTINS}
        if template_id in builtin:
            vcpus = vcpus or 1
            memory_mb = memory_mb or 512
            cap = FakeCapsule(capsule_id, "running", template_id, vcpus, memory_mb)
        elif template_id in self.templates:
            tpl, frozen = self.templates[template_id]
            if (vcpus not in (None, tpl.vcpus)) or (memory_mb not in (None, tpl.memory_mb)):
                raise InvalidShape("a snapshot template's shape is fixed")
            cap = copy.deepcopy(frozen)
            cap.capsule_id, cap.state, cap.template_id = capsule_id, "running", template_id
        else:
            raise TemplateNotFound(f"no template {template_id}")
        self._limits.check(cap.vcpus, cap.memory_mb)
        cap.network = network or EgressPolicy()
        self.capsules[capsule_id] = cap
        if self.create_disk is not None:
            return dataclasses.replace(cap.runtime(), disk_used_bytes=self.create_disk[0],
                                       disk_size_bytes=self.create_disk[1])
        return cap.runtime()

    async def update_network(self, capsule_id: str, policy: EgressPolicy) -> None:
        await self._hook("update_network", capsule_id)
        self._capsule(capsule_id, running=False).network = policy

    async def pause(self, capsule_id: str) -> None:
        await self._hook("pause", capsule_id)
        self._capsule(capsule_id).state = "paused"

    async def resume(self, capsule_id: str) -> CapsuleRuntime:
        await self._hook("resume", capsule_id)
        cap = self._capsule(capsule_id, running=False)
        if cap.state != "paused":
            raise HostAgentError(f"capsule {capsule_id} is not paused")
        cap.state = "running"
        return cap.runtime()

    async def destroy(self, capsule_id: str) -> None:
        await self._hook("destroy", capsule_id)
        self.capsules.pop(capsule_id, None)

    async def get(self, capsule_id: str) -> CapsuleRuntime:
        await self._hook("get", capsule_id)
        return self._capsule(capsule_id, running=False).runtime()

    async def snapshot(self, capsule_id: str, template_id: str) -> TemplateRuntime:
        await self._hook("snapshot", template_id)
        cap = self._capsule(capsule_id, running=False)
        cap.state = "paused"
        size = sum(len(v) for v in cap.files.values()) + cap.memory_mb * 1024 * 1024
        tpl = TemplateRuntime(template_id, cap.vcpus, cap.memory_mb, size)
        self.templates[template_id] = (tpl, copy.deepcopy(cap))
        return tpl

    async def template_info(self, template_id: str) -> TemplateRuntime:
        await self._hook("template_info", template_id)
        if template_id not in self.templates:
            raise TemplateNotFound(f"template {template_id} not found")
        return self.templates[template_id][0]

    async def delete_template(self, template_id: str) -> None:
        await self._hook("delete_template", template_id)
        if template_id not in self.templates:
            raise TemplateNotFound(f"no template {template_id}")
        del self.templates[template_id]

    async def builtin_templates(self) -> list[TemplateRuntime]:
        return list(BUILTINS)

    async def capacity(self) -> dict[str, int | None]:
        await self._hook("capacity")
        return dict(self.free)

    async def exec(self, capsule_id: str, cmd: str, args: list[str], *, envs: dict[str, str] | None = None,
                   cwd: str | None = None, timeout_sec: float = 30, max_output_bytes: int | None = None) -> ExecResult:
        await self._hook("exec", capsule_id)
        self.exec_caps.append(max_output_bytes)
        cap = self._capsule(capsule_id)
        if cwd is not None and cwd not in cap.dirs:
            raise GuestError(f"no such directory: {cwd}", code="not_found")
        if self.exec_handler is not None:
            return self.exec_handler(capsule_id, cmd, args, envs, cwd, timeout_sec)
        return ExecResult((" ".join([cmd, *args]) + "\n").encode(), b"", 0, 1)

    async def spawn(self, capsule_id: str, cmd: str, args: list[str], *, envs: dict[str, str] | None = None,
                    cwd: str | None = None, tag: str | None = None) -> ProcessInfo:
        await self._hook("spawn", capsule_id)
        cap = self._capsule(capsule_id)
        if tag is not None and any(p.tag == tag and p.running for p in cap.processes.values()):
            raise GuestError(f"tag {tag} is in use", code="exists")
        self._next_pid += 1
        info = ProcessInfo(self._next_pid, tag or f"proc-{self._next_pid:08x}", cmd, list(args), True, None)
        cap.processes[info.pid] = info
        return info

    async def set_defaults(self, capsule_id: str, *, user: str | None = None, cwd: str | None = None,
                           envs: dict[str, str] | None = None) -> GuestDefaults:
        await self._hook("set_defaults", capsule_id)
        cap = self._capsule(capsule_id)
        if cwd is not None and cwd not in cap.dirs:
            raise GuestError(f"cwd {cwd}: no such directory", code="not_found")
        d = cap.defaults or {"user": "root", "uid": 0, "cwd": "/root", "envs": {}}
        if user is not None:
            d["user"], d["uid"] = user, 0 if user == "root" else 1000
        d["cwd"] = cwd or d["cwd"]
        d["envs"] = {**d["envs"], **(envs or {})}
        cap.defaults = d
        return GuestDefaults(user=d["user"], uid=d["uid"], cwd=d["cwd"], envs=dict(d["envs"]))

    async def processes(self, capsule_id: str) -> list[ProcessInfo]:
        await self._hook("processes", capsule_id)
        return list(self._capsule(capsule_id).processes.values())

    async def kill(self, capsule_id: str, target: int | str, signal: str = "SIGKILL") -> None:
        await self._hook("kill", capsule_id)
        cap = self._capsule(capsule_id)
        self._killed(capsule_id, target).set()
        for pid, info in list(cap.processes.items()):
            if target in (pid, info.tag):
                del cap.processes[pid]
                return
        raise GuestError(f"no such process: {target}", code="no_such_process")

    async def attach(self, capsule_id: str, target: int | str) -> AsyncIterator[StreamEvent]:  # type: ignore[override]
        await self._hook("attach", capsule_id)
        for event in self.attach_events.get(target, [StreamEvent("exit", exit_code=0)]):
            if event.kind == "sleep":  # a pause in the output (seconds in exit_code)
                await asyncio.sleep(event.exit_code or 0)
                continue
            if event.kind == "hang":  # never exits (until killed)
                await self._killed(capsule_id, target).wait()
                yield StreamEvent("exit", exit_code=-9)
                return
            yield event

    def _killed(self, capsule_id: str, target: int | str) -> asyncio.Event:
        return self.kill_events.setdefault((capsule_id, target), asyncio.Event())

    # ---- terminals: a session echoes its input back as output ----------------------------

    async def pty_start(self, capsule_id: str, cmd: str = "/bin/bash", args: list[str] | None = None, *,
                        cols: int = 80, rows: int = 24, envs: dict[str, str] | None = None,
                        cwd: str | None = None, tag: str | None = None) -> ProcessInfo:
        await self._hook("pty_start", capsule_id)
        self._capsule(capsule_id)
        if cmd == "/no/such/program":
            raise GuestError(f"{cmd}: command not found", code="not_found")
        self._next_pid += 1
        session = FakePty(ProcessInfo(self._next_pid, tag or f"pty-{self._next_pid:08x}", cmd, list(args or []),
                                      True, None), cols, rows)
        session.output += f"started {cmd} {cols}x{rows}\r\n".encode()
        self.ptys[(capsule_id, session.info.tag)] = session
        return session.info

    async def pty_sessions(self, capsule_id: str) -> list[ProcessInfo]:
        await self._hook("pty_sessions", capsule_id)
        self._capsule(capsule_id)
        return [s.info for (cid, _), s in self.ptys.items() if cid == capsule_id]

    def _pty(self, capsule_id: str, target: int | str) -> FakePty:
        self._capsule(capsule_id)
        for (cid, tag), s in self.ptys.items():
            if cid == capsule_id and target in (tag, s.info.pid):
                return s
        raise GuestError(f"no terminal {target!r}", code="no_such_process")

    async def pty_attach(self, capsule_id: str, target: int | str) -> AsyncIterator[StreamEvent]:  # type: ignore[override]
        await self._hook("pty_attach", capsule_id)
        s = self._pty(capsule_id, target)
        pos = 0
        while True:
            if pos < len(s.output):
                data, pos = bytes(s.output[pos:]), len(s.output)
                yield StreamEvent("output", data)
                continue
            if s.info.exit_code is not None:
                yield StreamEvent("exit", exit_code=s.info.exit_code)
                return
            s.changed.clear()
            await s.changed.wait()

    async def pty_input(self, capsule_id: str, target: int | str, data: bytes) -> None:
        await self._hook("pty_input", capsule_id)
        s = self._pty(capsule_id, target)
        if s.info.exit_code is not None:
            raise GuestError("terminal has exited", code="no_such_process")
        s.inputs.append(data)
        s.output += b"echo:" + data
        s.changed.set()

    async def pty_resize(self, capsule_id: str, target: int | str, cols: int, rows: int) -> None:
        await self._hook("pty_resize", capsule_id)
        s = self._pty(capsule_id, target)
        s.cols, s.rows = cols, rows
        s.output += f"resized {cols}x{rows}\r\n".encode()
        s.changed.set()

    async def pty_kill(self, capsule_id: str, target: int | str, signal: str = "SIGKILL") -> None:
        await self._hook("pty_kill", capsule_id)
        s = self._pty(capsule_id, target)
        s.info = dataclasses.replace(s.info, running=False, exit_code=-9)
        s.changed.set()

    def _file(self, cap: FakeCapsule, path: str) -> bytes:
        if path in cap.dirs:
            raise GuestError(f"{path} is a directory", code="is_directory")
        if path not in cap.files:
            raise GuestError(f"{path} not found", code="not_found")
        return cap.files[path]

    async def read_file(self, capsule_id: str, path: str) -> bytes:
        await self._hook("read_file", capsule_id)
        return self._file(self._capsule(capsule_id), path)

    async def read_file_stream(self, capsule_id: str, path: str) -> AsyncIterator[bytes]:  # type: ignore[override]
        await self._hook("read_file_stream", capsule_id)
        data = self._file(self._capsule(capsule_id), path)
        for i in range(0, len(data), 64 * 1024):
            yield data[i:i + 64 * 1024]

    async def write_file(self, capsule_id: str, path: str, data: bytes | AsyncIterator[bytes]) -> int:
        await self._hook("write_file", capsule_id)
        cap = self._capsule(capsule_id)
        if path in cap.dirs:
            raise GuestError(f"{path} is a directory", code="is_directory")
        if path.startswith("/proc"):
            raise GuestError(f"{path}: permission denied", code="permission_denied")
        if isinstance(data, bytes):
            content = data
        else:
            parts = []
            async for chunk in data:
                parts.append(chunk)
            content = b"".join(parts)
        cap.files[path] = content
        parent = _parent(path)
        while parent not in cap.dirs:
            cap.dirs.add(parent)
            parent = _parent(parent)
        self.written[path] = len(content)
        return len(content)

    async def list_dir(self, capsule_id: str, path: str, depth: int = 1) -> list[FileInfo]:
        await self._hook("list_dir", capsule_id)
        cap = self._capsule(capsule_id)
        if path in cap.files:
            raise GuestError(f"{path} is not a directory", code="not_directory")
        if path not in cap.dirs:
            raise GuestError(f"{path} not found", code="not_found")
        prefix = path.rstrip("/") + "/"

        def within(p: str) -> bool:
            return p.startswith(prefix) and p != path and p[len(prefix):].count("/") < depth

        entries = [_entry(d, "directory") for d in cap.dirs if within(d)]
        entries += [_entry(f, "file", len(v)) for f, v in cap.files.items() if within(f)]
        return sorted(entries, key=lambda e: e.path)

    async def stat(self, capsule_id: str, path: str) -> FileInfo:
        await self._hook("stat", capsule_id)
        cap = self._capsule(capsule_id)
        if path in cap.dirs:
            return _entry(path, "directory")
        return _entry(path, "file", len(self._file(cap, path)))

    async def mkdir(self, capsule_id: str, path: str) -> FileInfo:
        await self._hook("mkdir", capsule_id)
        cap = self._capsule(capsule_id)
        if path in cap.files:
            raise GuestError(f"{path} exists and is not a directory", code="exists")
        current = path
        while current not in cap.dirs:
            cap.dirs.add(current)
            current = _parent(current)
        return _entry(path, "directory")

    async def remove(self, capsule_id: str, path: str) -> None:
        await self._hook("remove", capsule_id)
        self.paths_seen.append(("remove", path))
        cap = self._capsule(capsule_id)
        if path not in cap.files and path not in cap.dirs:
            raise GuestError(f"{path} not found", code="not_found")
        prefix = path.rstrip("/") + "/"
        cap.files = {p: v for p, v in cap.files.items() if p != path and not p.startswith(prefix)}
        cap.dirs = {d for d in cap.dirs if d != path and not d.startswith(prefix)}

    async def metrics(self, capsule_id: str) -> CapsuleMetrics:
        await self._hook("metrics", capsule_id)
        cap = self._capsule(capsule_id)
        override = self.metrics_values.get(capsule_id, {})
        if isinstance(override, Exception):
            raise override
        answer = {"cpu_pct": 1.5, "mem_bytes": cap.memory_mb * 1024 * 1024,
                  "disk_bytes": 3 * 1024 * 1024 + sum(len(v) for v in cap.files.values()),
                  "disk_size_bytes": 2048 * 1024 * 1024, **override}
        if capsule_id in self.metrics_delays:  # measured, then slow to arrive
            await asyncio.sleep(self.metrics_delays[capsule_id])
        return CapsuleMetrics(**answer)

    async def tcp_connect(self, capsule_id: str, port: int) -> Tunnel:
        await self._hook("tcp_connect", capsule_id)
        self._capsule(capsule_id)
        local = self.forwards.get((capsule_id, port))
        if local is None:
            raise GuestError(f"connection refused: nothing is listening on port {port}", code="refused")
        reader, writer = await asyncio.open_connection("127.0.0.1", local)
        return FakeTunnel(self, reader, writer)

    # ---- moving between hosts: the real archive format (wrenn_host/archive.py), one file each

    def _archive_blob(self, kind: str, object_id: str) -> bytes:
        if kind == "template":
            if object_id not in self.templates:
                raise TemplateNotFound(f"template {object_id} not found")
            return pickle.dumps(self.templates[object_id])
        if kind != "capsule":
            raise HostAgentError(f"kind must be template or capsule, got {kind!r}", code="invalid")
        cap = self._capsule(object_id, running=False)
        if cap.state != "paused":
            raise HostAgentError(f"capsule {object_id} is {cap.state}: pause it before moving it",
                                 code="invalid_state")
        return pickle.dumps(cap)

    async def archive_manifest(self, kind: str, object_id: str) -> ArchiveManifest:
        await self._hook("archive_manifest", object_id)
        blob = self._archive_blob(kind, object_id)
        return ArchiveManifest(kind, object_id, [archive.describe_blob(f"{kind}.pickle", blob)],
                               {"format": archive.FORMAT})

    async def read_archive(self, kind: str, object_id: str) -> AsyncIterator[bytes]:  # type: ignore[override]
        await self._hook("read_archive", object_id)
        blob = self._archive_blob(kind, object_id)
        async for chunk in archive.stream_blobs([(f"{kind}.pickle", blob, 0o600)]):
            if self.archive_tamper is not None and len(chunk) > 64:
                chunk = self.archive_tamper(chunk)
            yield chunk

    async def write_archive(self, kind: str, object_id: str, data: AsyncIterator[bytes],
                            manifest: ArchiveManifest) -> None:
        await self._hook("write_archive", object_id)
        if kind == "template" and object_id in self.templates:
            return  # the cache
        if kind == "capsule" and object_id in self.capsules:
            raise HostAgentError(f"capsule {object_id} already exists on this host", code="exists")
        sinks: list[archive.MemorySink] = []

        def open_sink(f):
            sinks.append(archive.MemorySink(f.size))
            return sinks[-1]

        self.bytes_received += await archive.receive(data, manifest, open_sink)
        obj = pickle.loads(bytes(sinks[0].buf))
        if kind == "template":
            self.templates[object_id] = obj
        else:
            if obj.template_id not in self.templates and obj.template_id not in {t.template_id for t in BUILTINS}:
                raise TemplateNotFound(f"capsule {object_id} needs template {obj.template_id} here first")
            self.capsules[object_id] = obj


class FakeTunnel(Tunnel):
    """A tunnel that is a real TCP connection to a local port (see `FakeHostAgent.forwards`)."""

    def __init__(self, fake: FakeHostAgent, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.fake = fake
        self.reader = reader
        self.writer = writer
        self.closed = False
        fake.tunnels_open += 1

    async def read(self) -> bytes:
        if self.closed:
            return b""
        try:
            return await self.reader.read(65536)
        except (ConnectionError, OSError) as exc:
            raise HostAgentError(f"tunnel broke: {exc}") from exc

    async def write(self, data: bytes) -> None:
        if self.closed:
            raise HostAgentError("the connection is closed")
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise HostAgentError(f"tunnel broke: {exc}") from exc

    async def write_eof(self) -> None:
        if not self.closed and self.writer.can_write_eof():
            self.writer.write_eof()

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.fake.tunnels_open -= 1
            self.writer.close()


# ---- harness: a control plane app on a temp SQLite DB, driven in-process over ASGI ---------

import contextlib  # noqa: E402
import secrets  # noqa: E402
import time  # noqa: E402
from collections.abc import AsyncIterator as _AsyncIterator  # noqa: E402
from pathlib import Path  # noqa: E402

import re  # noqa: E402

import httpx  # noqa: E402

TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def assert_error(resp: httpx.Response, status: int, code: str) -> dict[str, str]:
    """The response is the error shape {"error": {"code", "message"}} with this status and code."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body["error"]


@dataclasses.dataclass
class Harness:
    app: Any
    fake: FakeHostAgent
    settings: Any
    key: str
    client: httpx.AsyncClient

    def client_for(self, key: str | None) -> httpx.AsyncClient:
        headers = {"X-API-Key": key} if key is not None else {}
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://test/api",
                                 headers=headers, timeout=30)

    def new_team(self, name: str = "other") -> httpx.AsyncClient:
        from wrenn_control.bootstrap import create_team

        _, key = create_team(self.app.state.db, name)
        return self.client_for(key)

    async def wait_status(self, capsule_id: str, *statuses: str, timeout: float = 5.0,
                          client: httpx.AsyncClient | None = None) -> dict[str, Any]:
        """Poll GET until the status is one of `statuses` (bounded)."""
        client = client or self.client
        deadline = time.monotonic() + timeout
        while True:
            body = (await client.get(f"/v1/capsules/{capsule_id}")).json()
            if body.get("status") in statuses:
                return body
            if time.monotonic() > deadline:
                raise AssertionError(f"{capsule_id} still {body.get('status')}, wanted {statuses}: {body}")
            await asyncio.sleep(0.01)

    async def running_capsule(self, client: httpx.AsyncClient | None = None, **body: Any) -> dict[str, Any]:
        client = client or self.client
        resp = await client.post("/v1/capsules", json=body)
        assert resp.status_code == 201, resp.text
        return await self.wait_status(resp.json()["id"], "running", client=client)


def make_settings(data_dir: Path, **overrides: Any) -> Any:
    from wrenn_control.config import Settings

    values: dict[str, Any] = {"data_dir": data_dir, "bootstrap_api_key": "wrn_" + secrets.token_hex(16),
                              "reaper_interval_sec": 0.05, "shutdown_grace_sec": 2.0,
                              # one pass at start; tests drive `app.state.sampler.run_once()` themselves
                              "sampler_interval_sec": 3600.0}
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def running_app(settings: Any, fake: FakeHostAgent | None = None) -> _AsyncIterator[Harness]:
    """create_app + its lifespan (migrations, bootstrap, reconcile, reaper) + a client with the key."""
    from wrenn_control.app import create_app

    fake = fake or FakeHostAgent()
    async with _host_for(fake) as host:
        app = create_app(settings, host)
        async with _lifespan(app, settings, fake) as harness:
            yield harness


@contextlib.asynccontextmanager
async def _host_for(fake: FakeHostAgent) -> _AsyncIterator[HostAgent]:
    """The fake itself, or (WRENN_TEST_HOST=remote) a RemoteHostAgent over loopback HTTP to the
    host agent service wrapping it: the control plane's tests then cross the wire protocol."""
    import os

    if os.environ.get("WRENN_TEST_HOST") != "remote":
        yield fake
        return
    from tests.hostservice import serving
    from wrenn_control.hosts.remote import RemoteHostAgent
    from wrenn_host.service.book import Book

    # The fake is started by the control plane's first `start`, as the in-process one is.
    async with serving(fake, book=Book(fake), on_start=fake.start) as (url, token, _):
        remote = RemoteHostAgent(url, token)
        try:
            yield remote
        finally:
            await remote.close()  # the client only; the host agent process stops with the test's server:
            await fake.close()


@contextlib.asynccontextmanager
async def _lifespan(app: Any, settings: Any, fake: FakeHostAgent) -> _AsyncIterator[Harness]:
    async with app.router.lifespan_context(app):
        key = settings.bootstrap_api_key or app.state.bootstrap_key
        harness = Harness(app, fake, settings, key, None)  # type: ignore[arg-type]
        async with harness.client_for(key) as client:
            harness.client = client
            yield harness
