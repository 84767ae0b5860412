"""Moving a snapshot template or a paused capsule to another host: the local host agent's side.

What moves (archive.py carries the files):
- a template: `memory`, `state`, `disk.qcow2` (a snapshot's disk is flattened: no backing file).
  Its `meta.json` travels in the manifest's meta; the receiver rewrites its host paths (kernel,
  initrd) and makes its own overlay seed. Templates never change, so the manifest is computed once
  and cached in the template directory (`manifest.json`).
- a paused capsule: `memory`, `state`, `disk.qcow2` and `serial.log`; its meta.json (egress policy
  included) in the manifest's meta. Its disk is a qcow2 overlay:
  - made from a snapshot template ("disk": "overlay"): its backing file is that template's disk.
    The receiver must hold the template (the control plane moves it first) and points the
    overlay at its own copy with `qemu-img rebase -u` (the bytes are the same, only the path
    recorded in the header changes).
  - made from a built-in template, or from a snapshot template deleted since ("disk": "flat"):
    built-in snapshots are built by every host on its own, so their disks are not the same bytes
    on two hosts (and a deleted template no longer moves). The source flattens the disk
    (`qemu-img convert`, into `.export-<id>` beside the templates) and the receiver keeps the
    template's meta (the machine shape) in the capsule's own `template/` directory.
  The network slot is not moved: a pause released it, the receiver's resume takes a fresh one.

Crash safety: the receiver stages everything in `templates/.in-<kind>-<id>-<random>` and installs
with one rename; start-up reconcile removes every dot entry of the templates directory, so a
half-written staging (or a flattened export) never outlives a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from wrenn_host import archive
from wrenn_host.api import (
    ArchiveManifest,
    CapsuleNotFound,
    HostAgentError,
    TemplateNotFound,
    from_wire,
    to_wire,
)
from wrenn_host.capsule import CapsuleMeta, LocalCapsule
from wrenn_host.durable import fsync_dir, write_durable
from wrenn_host.paths import check_id
from wrenn_host.templates import TemplateSnapshot, make_overlay_seed, qemu_img
from wrenn_images import builder

if TYPE_CHECKING:
    from wrenn_host.agent import LocalHostAgent

log = logging.getLogger(__name__)

TEMPLATE_FILES = ("memory", "state", "disk.qcow2")
CAPSULE_FILES = ("memory", "state", "disk.qcow2", "serial.log")
MANIFEST_CACHE = "manifest.json"
KINDS = ("template", "capsule")


def _check(kind: str, object_id: str) -> None:
    if kind not in KINDS:
        raise HostAgentError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}", code="invalid")
    try:
        check_id(object_id)
    except ValueError as e:
        raise HostAgentError(str(e), code="invalid") from e


# ---------------------------------------------------------------------- sending

def _template_dir(agent: LocalHostAgent, template_id: str) -> Path:
    if template_id in agent.builtin.names:
        raise TemplateNotFound(f"{template_id} is a built-in template: every host builds its own")
    d = agent.paths.template_dir(template_id)
    if not (d / "meta.json").exists() or (d / "deleted").exists():
        raise TemplateNotFound(f"template {template_id} not found")
    return d


def _paused_capsule(agent: LocalHostAgent, capsule_id: str):
    cap = agent._capsules.get(capsule_id)
    if cap is None:
        raise CapsuleNotFound(f"capsule {capsule_id} not found on this host")
    if cap.machine is not None and cap.machine.is_alive():
        raise HostAgentError(f"capsule {capsule_id} is running: pause it before moving it", code="invalid_state")
    if not agent.paths.capsule_state(capsule_id).exists():
        raise HostAgentError(f"capsule {capsule_id} has no paused state to move", code="invalid_state")
    return cap


def _moves_flat(agent: LocalHostAgent, cap) -> bool:
    """Its disk moves flattened: it backs onto a built-in snapshot, onto none (a capsule that
    moved in flat), or onto a snapshot template deleted since (it no longer moves on its own)."""
    d = Path(cap.meta.template_dir)
    return d.parent != agent.paths.templates or (d / "deleted").exists()


def _export_dir(agent: LocalHostAgent, capsule_id: str) -> Path:
    return agent.paths.templates / f".export-{capsule_id}"


def _capsule_sources(agent: LocalHostAgent, cap) -> list[tuple[str, Path]]:
    files = agent.paths.machine_files(cap.id)
    disk = _export_dir(agent, cap.id) / "disk.qcow2" if _moves_flat(agent, cap) else files.disk
    paths = {"memory": files.memory, "state": agent.paths.capsule_state(cap.id), "disk.qcow2": disk,
             "serial.log": files.serial_log}
    return [(name, paths[name]) for name in CAPSULE_FILES if paths[name].exists()]


async def manifest(agent: LocalHostAgent, kind: str, object_id: str) -> ArchiveManifest:
    _check(kind, object_id)
    if kind == "template":
        d = _template_dir(agent, object_id)
        cached = d / MANIFEST_CACHE
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            return from_wire(ArchiveManifest, json.loads(cached.read_text()))
        files = [await asyncio.to_thread(archive.describe, d / name) for name in TEMPLATE_FILES]
        m = ArchiveManifest("template", object_id, files,
                            {"format": archive.FORMAT, "template_meta": (d / "meta.json").read_text()})
        await asyncio.to_thread(write_durable, cached, json.dumps(to_wire(m)).encode())
        return m
    cap = _paused_capsule(agent, object_id)
    async with cap.lock:
        cap = _paused_capsule(agent, object_id)  # a resume may have run while we waited
        flat = _moves_flat(agent, cap)
        if flat:
            await _flatten(agent, cap)
        sources = _capsule_sources(agent, cap)
        files = [await asyncio.to_thread(archive.describe, path, name) for name, path in sources]
    meta = {"format": archive.FORMAT, "capsule_meta": json.dumps(dataclasses.asdict(cap.meta)),
            "disk": "flat" if flat else "overlay"}
    if flat:
        meta["template_meta"] = (Path(cap.meta.template_dir) / "meta.json").read_text()
    return ArchiveManifest("capsule", object_id, files, meta)


async def _flatten(agent: LocalHostAgent, cap) -> None:
    """The capsule's whole disk as one standalone qcow2 (the built-in chain is this host's own).
    One made since the capsule's last pause is still exact: kept (a manifest, then the read)."""
    _sweep_exports(agent)
    out_dir = _export_dir(agent, cap.id)
    out = out_dir / "disk.qcow2"
    with contextlib.suppress(OSError):
        if out.stat().st_mtime_ns >= agent.paths.capsule_state(cap.id).stat().st_mtime_ns \
                and (out_dir / "done").exists():
            return
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(mode=0o700)
    disk = agent.paths.machine_files(cap.id).disk
    await asyncio.to_thread(qemu_img, "convert", "-O", "qcow2", str(disk), str(out))
    (out_dir / "done").touch()


def _sweep_exports(agent: LocalHostAgent) -> None:
    """Flattened disks of capsules that are gone or run again (a move that never read its
    archive leaves one; start-up removes them all too)."""
    for d in agent.paths.templates.glob(".export-*"):
        cap = agent._capsules.get(d.name.removeprefix(".export-"))
        if cap is None or (cap.machine is not None and cap.machine.is_alive()) \
                or not agent.paths.capsule_state(cap.id).exists():
            shutil.rmtree(d, ignore_errors=True)


async def read(agent: LocalHostAgent, kind: str, object_id: str) -> AsyncIterator[bytes]:
    _check(kind, object_id)
    if kind == "template":
        d = _template_dir(agent, object_id)
        sources = [(name, d / name) for name in TEMPLATE_FILES]
        async for chunk in archive.stream_files(sources):
            yield chunk
        return
    cap = _paused_capsule(agent, object_id)
    if _moves_flat(agent, cap):
        await _flatten(agent, cap)  # made by the manifest (kept), unless it was asked for first
    try:
        async for chunk in archive.stream_files(_capsule_sources(agent, cap)):
            yield chunk
    finally:
        shutil.rmtree(_export_dir(agent, object_id), ignore_errors=True)


# ---------------------------------------------------------------------- receiving

def _local_spec_meta(agent: LocalHostAgent, template_meta: str) -> dict:
    """A template's meta.json from another host, with this host's kernel paths; refuses a
    snapshot this host cannot restore (another accelerator, a NIC without networking, another
    kernel)."""
    try:
        meta = json.loads(template_meta)
        spec = meta["spec"]
    except (ValueError, KeyError, TypeError) as e:
        raise HostAgentError(f"template metadata unreadable: {e}", code="invalid_archive") from e
    if spec.get("accel") != agent.accel:
        raise HostAgentError(f"snapshot made under {spec.get('accel')}, this host runs {agent.accel}",
                             code="incompatible")
    if spec.get("nic") and not agent.net.enabled:
        raise HostAgentError("snapshot has a network device and this host has no networking", code="incompatible")
    if not (Path(spec["kernel"]).exists() and Path(spec["initrd"]).exists()):
        kernel = builder.build_kernel()
        if meta.get("kernel_version") and kernel.version != meta["kernel_version"]:
            raise HostAgentError(f"snapshot needs kernel {meta['kernel_version']}, this host has {kernel.version}",
                                 code="incompatible")
        spec["kernel"], spec["initrd"] = str(kernel.vmlinux), str(kernel.initrd)
    return meta


def _staging(agent: LocalHostAgent, kind: str, object_id: str) -> Path:
    d = agent.paths.templates / f".in-{kind}-{object_id}-{secrets.token_hex(4)}"
    d.mkdir(mode=0o700)
    return d


async def _drain(data: AsyncIterator[bytes]) -> None:
    """Close a stream we will not read (a local generator runs its cleanup, a remote one hangs up)."""
    aclose = getattr(data, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


async def install(agent: LocalHostAgent, kind: str, object_id: str, data: AsyncIterator[bytes],
                  manifest: ArchiveManifest) -> None:
    _check(kind, object_id)
    if manifest.kind != kind or manifest.object_id != object_id:
        await _drain(data)
        raise HostAgentError(f"manifest is for {manifest.kind} {manifest.object_id}, not {kind} {object_id}",
                             code="invalid")
    if manifest.meta.get("format") != archive.FORMAT:
        await _drain(data)
        raise HostAgentError(f"archive format {manifest.meta.get('format')!r} not understood", code="invalid_archive")
    if kind == "template":
        await _install_template(agent, object_id, data, manifest)
    else:
        await _install_capsule(agent, object_id, data, manifest)


def _template_present(agent: LocalHostAgent, template_id: str) -> bool:
    d = agent.paths.template_dir(template_id)
    if (d / "deleted").exists():
        agent.templates.sweep(d)  # deleted and no capsule uses it: gone now, so it can come back
        if d.exists():
            raise HostAgentError(f"template {template_id} was deleted here and capsules still use it",
                                 code="exists")
    return (d / "meta.json").exists()


async def _install_template(agent: LocalHostAgent, template_id: str, data: AsyncIterator[bytes],
                            manifest: ArchiveManifest) -> None:
    if template_id in agent.builtin.names:
        await _drain(data)
        raise HostAgentError(f"{template_id} is a built-in template", code="invalid")
    if _template_present(agent, template_id):
        await _drain(data)  # templates never change: the copy here is the cache
        return
    try:
        meta = await asyncio.to_thread(_local_spec_meta, agent, manifest.meta.get("template_meta", ""))
    except BaseException:
        await _drain(data)
        raise
    final = agent.paths.template_dir(template_id)
    work = _staging(agent, "template", template_id)
    try:
        await archive.receive_into(work, data, manifest)
        if meta.get("template_id") != template_id:
            meta["template_id"] = template_id
        write_durable(work / "meta.json", json.dumps(meta, indent=1).encode())
        await asyncio.to_thread(make_overlay_seed, work / "disk.qcow2", final / "disk.qcow2", work / "overlay.qcow2")
        write_durable(work / MANIFEST_CACHE, json.dumps(to_wire(manifest)).encode())
        TemplateSnapshot.load(work)  # it must load before it is published
        fsync_dir(work)
        try:
            work.rename(final)
        except OSError:
            if not _template_present(agent, template_id):
                raise
            shutil.rmtree(work, ignore_errors=True)  # another transfer of it finished first
            return
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("template %s received (%d files)", template_id, len(manifest.files))


async def _install_capsule(agent: LocalHostAgent, capsule_id: str, data: AsyncIterator[bytes],
                           manifest: ArchiveManifest) -> None:
    if capsule_id in agent._capsules or agent.paths.capsule_dir(capsule_id).exists():
        await _drain(data)
        raise HostAgentError(f"capsule {capsule_id} already exists on this host", code="exists")
    try:
        fields = json.loads(manifest.meta["capsule_meta"])
        known = {f.name for f in dataclasses.fields(CapsuleMeta)}
        meta = CapsuleMeta(**{k: v for k, v in fields.items() if k in known})
    except (KeyError, ValueError, TypeError) as e:
        await _drain(data)
        raise HostAgentError(f"capsule metadata unreadable: {e}", code="invalid_archive") from e
    names = {f.path for f in manifest.files}
    if not {"memory", "state", "disk.qcow2"} <= names or not names <= set(CAPSULE_FILES):
        await _drain(data)
        raise HostAgentError(f"a capsule archive has {', '.join(CAPSULE_FILES[:3])}; got {sorted(names)}",
                             code="invalid_archive")
    flat = manifest.meta.get("disk") == "flat"
    final = agent.paths.capsule_dir(capsule_id)
    if flat:
        try:
            tmeta = await asyncio.to_thread(_local_spec_meta, agent, manifest.meta.get("template_meta", ""))
        except BaseException:
            await _drain(data)
            raise
        template_dir = final / "template"
    else:
        if not _template_present(agent, meta.template_id):
            await _drain(data)
            raise TemplateNotFound(f"capsule {capsule_id} needs template {meta.template_id} on this host first")
        template_dir = agent.paths.template_dir(meta.template_id)
    work = _staging(agent, "capsule", capsule_id)
    try:
        await archive.receive_into(work, data, manifest)
        if flat:
            (work / "template").mkdir(mode=0o700)
            write_durable(work / "template" / "meta.json", json.dumps(tmeta, indent=1).encode())
        else:
            # Same template bytes, another path: only the name in the overlay's header changes.
            await asyncio.to_thread(qemu_img, "rebase", "-u", "-f", "qcow2", "-b", str(template_dir / "disk.qcow2"),
                                    "-F", "qcow2", str(work / "disk.qcow2"))
        meta.capsule_id, meta.template_dir = capsule_id, str(template_dir)
        meta.slot, meta.spawned_as = None, ""  # a resume takes a fresh slot; no spare link here
        meta.save(work / "meta.json")
        snap = TemplateSnapshot.load(work / "template" if flat else template_dir)
        if snap.spec.vcpus != meta.vcpus or snap.spec.memory_mb != meta.memory_mb:
            raise HostAgentError(f"capsule {capsule_id} has {meta.vcpus} vCPU/{meta.memory_mb} MiB, its template "
                                 f"{snap.spec.vcpus}/{snap.spec.memory_mb}", code="invalid_archive")
        if flat:
            snap = dataclasses.replace(snap, dir=template_dir)
        fsync_dir(work)
        if capsule_id in agent._capsules or final.exists():
            raise HostAgentError(f"capsule {capsule_id} already exists on this host", code="exists")
        work.rename(final)
        fsync_dir(final.parent)
        agent._register(LocalCapsule(capsule_id, agent.host, meta, snap))
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("capsule %s received, paused (%s disk)", capsule_id, "flat" if flat else "overlay")
