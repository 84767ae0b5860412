"""Moving snapshot templates and paused capsules between host agents (the control plane's side).

Both functions stream `src.read_archive(...)` straight into `dst.write_archive(...)`: the bytes
pass through this process chunk by chunk (a remote agent's streams are async iterators too) and
are never held whole. The receiving host checks every file against the manifest the source gave
(size, sha256) and installs atomically, so a broken or cut transfer leaves nothing on `dst`.

Use from placement and drain (the fleet code):

    # a create placed on a host that lacks the snapshot template
    await move_template(src_host, dst_host, template_id)       # no-op if dst holds it already
    await dst_host.create(capsule_id, template_id, None, None, network)

    # drain: each paused capsule of the draining host
    async def record():                                        # the database says dst from now on
        await db.set_capsule_host(capsule_id, dst_id)
    await move_paused_capsule(src_host, dst_host, capsule_id, template_id, on_moved=record)

The capsule must stay paused, and nothing else may resume, snapshot or destroy it, for the whole
move (hold the capsule's lock or mark it busy/moving in the database): a resume on `src` while
the files are read makes the receiver refuse the archive (checksum), but a resume after the read
would be lost when the source copy is destroyed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from wrenn_host.api import (
    CapsuleNotFound,
    CapsuleRuntime,
    HostAgent,
    HostAgentError,
    TemplateNotFound,
    TemplateRuntime,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Transfer:
    """What one move did: whether it was needed at all (False: dst had it already), the bytes
    that crossed (holes and zero chunks are not sent), the files' full size, seconds."""

    kind: str
    object_id: str
    moved: bool
    bytes: int = 0
    seconds: float = 0.0
    file_bytes: int = 0

    @property
    def mib_per_s(self) -> float:
        return self.bytes / (1 << 20) / self.seconds if self.seconds > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class CapsuleMove:
    """The result of `move_paused_capsule`: the capsule as `dst` knows it now (paused), the
    template transfer (moved=False if dst had it or it is built-in), the capsule transfer, and
    whether the source copy was removed (False: destroying it on src failed after dst had it;
    the capsule is safe on dst and src's reconcile removes the leftover, as the control plane no
    longer lists it there)."""

    capsule: CapsuleRuntime
    template: Transfer
    transfer: Transfer
    source_removed: bool


class _Counted:
    """Counts the bytes of a stream as they pass (for the transfer's rate), and closes it."""

    def __init__(self, stream: AsyncIterator[bytes]):
        self.stream = stream
        self.bytes = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.stream:
            self.bytes += len(chunk)
            yield chunk

    async def aclose(self) -> None:
        aclose = getattr(self.stream, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


async def _stream(src: HostAgent, dst: HostAgent, kind: str, object_id: str) -> Transfer:
    t0 = time.monotonic()
    manifest = await src.archive_manifest(kind, object_id)
    counted = _Counted(src.read_archive(kind, object_id))
    try:
        await dst.write_archive(kind, object_id, counted.__aiter__(), manifest)
    finally:
        await counted.aclose()
    seconds = time.monotonic() - t0
    log.info("%s %s moved: %d bytes in %.2f s", kind, object_id, counted.bytes, seconds)
    return Transfer(kind, object_id, True, counted.bytes, seconds, manifest.size)


async def _is_builtin(host: HostAgent, template_id: str) -> bool:
    return any(t.template_id == template_id for t in await host.builtin_templates())


async def move_template(src: HostAgent, dst: HostAgent, template_id: str) -> Transfer:
    """Copy snapshot template `template_id` from `src` to `dst` so `dst.create(..., template_id)`
    works there. Templates never change, so a copy `dst` holds already is kept (the cache) and
    nothing is sent; built-in templates are built by each host and never move (moved=False).
    The template stays on `src`. Raises TemplateNotFound if `src` has no such snapshot;
    HostAgentError code "checksum_mismatch" if the files arrived damaged (dst keeps nothing),
    "incompatible" if dst cannot restore it (another accelerator or kernel)."""
    if await _is_builtin(src, template_id):
        return Transfer("template", template_id, False)
    with contextlib.suppress(TemplateNotFound):
        info: TemplateRuntime = await dst.template_info(template_id)
        if info.template_id == template_id:
            return Transfer("template", template_id, False)
    return await _stream(src, dst, "template", template_id)


async def move_paused_capsule(src: HostAgent, dst: HostAgent, capsule_id: str, template_id: str, *,
                              on_moved: Callable[[], Awaitable[None]] | None = None) -> CapsuleMove:
    """Move paused capsule `capsule_id` (made from `template_id`) from `src` to `dst`, where it
    is then paused with its memory and files; `dst.resume(capsule_id)` runs it on (same processes,
    same /tmp, a fresh network slot, its egress policy kept).

    Order, so the capsule is never lost: (1) its template to dst if dst lacks it (kept on dst
    even if a later step fails: a valid cache; a template deleted on src since is not needed:
    the capsule's disk then travels flattened); (2) the capsule's files to dst (checked, staged,
    installed at once); (3) `on_moved()`: record in the database that the capsule lives on dst;
    (4) destroy it on src. If any of (1)-(3) fails, the copy on dst (if any) is destroyed, the
    source stays as it was, and the error is raised. A failure of (4) is logged and reported as
    `source_removed=False`, never raised: the capsule already lives on dst.

    Raises HostAgentError code "invalid_state" if the capsule is not paused on src,
    CapsuleNotFound if src does not hold it, code "exists" if dst already holds that id (then
    neither copy is touched)."""
    runtime = await src.get(capsule_id)
    if runtime.state != "paused":
        raise HostAgentError(f"capsule {capsule_id} is {runtime.state}: only a paused capsule moves",
                             code="invalid_state")
    try:
        await dst.get(capsule_id)
    except CapsuleNotFound:
        pass
    else:
        raise HostAgentError(f"capsule {capsule_id} already exists on the destination host", code="exists")
    try:
        template = await move_template(src, dst, template_id)
    except TemplateNotFound:
        # deleted on src since the capsule was made: src then sends the capsule's disk flattened
        template = Transfer("template", template_id, False)
    try:
        moved = await _stream(src, dst, "capsule", capsule_id)
        now = await dst.get(capsule_id)
        if now.state != "paused":
            raise HostAgentError(f"capsule {capsule_id} arrived {now.state}, not paused", code="vmm_error")
        if on_moved is not None:
            await on_moved()
    except BaseException:
        try:
            await dst.destroy(capsule_id)  # only ever our copy: dst did not hold it before
        except Exception as e:  # keep the original error; dst's reconcile removes an unknown capsule
            log.warning("capsule %s: removing the partial copy on the destination failed: %s", capsule_id, e)
        raise
    removed = True
    try:
        await src.destroy(capsule_id)
    except Exception as e:
        removed = False
        log.warning("capsule %s moved, but removing it from the source host failed: %s", capsule_id, e)
    return CapsuleMove(now, template, moved, removed)
