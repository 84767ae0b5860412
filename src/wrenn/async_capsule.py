"""The asynchronous capsule object: :class:`AsyncCapsule`, the twin of :class:`~wrenn.Capsule`.

Requests come from :class:`~wrenn.AsyncWrennClient`, waits from :mod:`wrenn._wait`, the parts
shared with :class:`~wrenn.Capsule` from :mod:`wrenn._capsule_state`.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Generator
from typing import Any

from wrenn._async_client import AsyncWrennClient
from wrenn._capsule_state import (
    _GONE,
    _PAUSED,
    _RUNNING,
    _CapsuleState,
    _dual,
    _marked_stopped,
    _proxy_host,
    _proxy_url,
)
from wrenn._models import CapsuleInfo, Status, Template
from wrenn._wait import DEFAULT_WAIT_TIMEOUT, adrive, connect_flow
from wrenn.commands import AsyncCommands
from wrenn.files import AsyncFiles
from wrenn.git import AsyncGit
from wrenn.pty import _AsyncPtyOpener
from wrenn.pty import _connect_message as _pty_connect_message
from wrenn.pty import _start_message as _pty_start_message

__all__ = ["AsyncCapsule"]

log = logging.getLogger("wrenn")


class AsyncCapsule(_CapsuleState):
    """Async twin of :class:`Capsule`.

    The constructor only records the arguments; the capsule is created when the object is
    awaited or entered::

        capsule = await AsyncCapsule(template="minimal", wait=True)
        capsule = await AsyncCapsule.create(template="minimal")
        async with AsyncCapsule(template="minimal") as capsule:
            result = await capsule.commands.run("echo hello")
    """

    def __init__(
        self,
        template: str | None = None,
        vcpus: int | None = None,
        memory_mb: int | None = None,
        timeout: int | None = None,
        *,
        wait: bool = False,
        api_key: str | None = None,
        base_url: str | None = None,
        metadata: dict[str, str] | None = None,
        allow_internet_access: bool | None = None,
        network: dict[str, Any] | None = None,
        _capsule_id: str | None = None,
        _client: AsyncWrennClient | None = None,
        _info: CapsuleInfo | None = None,
    ) -> None:
        self._commands: AsyncCommands | None = None
        self._files: AsyncFiles | None = None
        self._info = _info
        if _client is not None and _capsule_id is not None:
            self._client = _client
            self._bind(_capsule_id)
        else:
            # Built now so a missing API key fails here, as with Capsule; no I/O yet.
            self._client = AsyncWrennClient(api_key=api_key, base_url=base_url)
        self._create_args = (template, vcpus, memory_mb, timeout, metadata)
        self._network_args = (allow_internet_access, network)
        self._wait = wait

    def _bind(self, capsule_id: str) -> None:
        self._id = capsule_id
        self._commands = AsyncCommands(capsule_id, self._client)
        self._files = AsyncFiles(capsule_id, self._client)

    def _require_created(self) -> None:
        if self._commands is None:
            raise RuntimeError(
                "AsyncCapsule not created yet: use `await AsyncCapsule(...)`, "
                "`await AsyncCapsule.create(...)` or `async with AsyncCapsule(...)`"
            )

    @property
    def id(self) -> str:
        """The capsule ID (``cl-...``)."""
        self._require_created()
        return self._id

    @property
    def capsule_id(self) -> str:
        """The capsule ID; same as :attr:`id`."""
        return self.id

    @property
    def commands(self) -> AsyncCommands:
        """:class:`~wrenn.commands.AsyncCommands` for this capsule."""
        self._require_created()
        assert self._commands is not None
        return self._commands

    @property
    def git(self) -> AsyncGit:
        """Git inside the capsule (runs its ``git`` binary)."""
        self._require_created()
        assert self._commands is not None
        return AsyncGit(self._commands)

    @property
    def files(self) -> AsyncFiles:
        """:class:`~wrenn.files.AsyncFiles` for this capsule."""
        self._require_created()
        assert self._files is not None
        return self._files

    async def _ensure_created(self) -> AsyncCapsule:
        if self._commands is not None:
            return self
        template, vcpus, memory_mb, timeout, metadata = self._create_args
        try:
            allow_internet_access, network = self._network_args
            self._info = await self._client.capsules.create(
                template, vcpus, memory_mb, timeout, metadata=metadata,
                allow_internet_access=allow_internet_access, network=network,
            )
        except BaseException:
            await self._client.aclose()
            raise
        self._bind(self._info.id)
        if self._wait and self._info.status != Status.running:
            try:
                await self.wait_ready()
            except BaseException:
                await self._discard()  # the caller gets no object to clean up with
                raise
        return self

    def __await__(self) -> Generator[Any, None, AsyncCapsule]:
        return self._ensure_created().__await__()

    # --- creating and finding ----------------------------------------------------------

    @classmethod
    async def create(
        cls,
        template: str | None = None,
        vcpus: int | None = None,
        memory_mb: int | None = None,
        timeout: int | None = None,
        *,
        wait: bool = False,
        api_key: str | None = None,
        base_url: str | None = None,
        metadata: dict[str, str] | None = None,
        allow_internet_access: bool | None = None,
        network: dict[str, Any] | None = None,
    ) -> AsyncCapsule:
        """Create a capsule; the same as ``await AsyncCapsule(...)``."""
        return await cls(
            template,
            vcpus,
            memory_mb,
            timeout,
            wait=wait,
            api_key=api_key,
            base_url=base_url,
            metadata=metadata,
            allow_internet_access=allow_internet_access,
            network=network,
        )

    @classmethod
    async def connect(
        cls,
        capsule_id: str,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float = DEFAULT_WAIT_TIMEOUT,
    ) -> AsyncCapsule:
        """Attach to an existing capsule and make sure it is running, resuming it if paused."""
        client = AsyncWrennClient(api_key=api_key, base_url=base_url)
        try:
            info = await adrive(connect_flow(capsule_id, timeout), client, capsule_id)
        except BaseException:
            await client.aclose()
            raise
        return cls(_capsule_id=capsule_id, _client=client, _info=info)

    @classmethod
    async def list(
        cls, *, api_key: str | None = None, base_url: str | None = None
    ) -> builtins.list[CapsuleInfo]:
        """List the team's capsules (every status, newest first)."""
        async with AsyncWrennClient(api_key=api_key, base_url=base_url) as client:
            return await client.capsules.list()

    # --- lifecycle: on an instance, or on the class with an id -------------------------

    async def _get_info_here(self) -> CapsuleInfo:
        """Fetch this capsule's current state (and refresh :attr:`status`)."""
        self._info = await self._client.capsules.get(self.id)
        return self._info

    async def _get_info_by_id(
        cls, capsule_id: str, *, api_key: str | None = None, base_url: str | None = None
    ) -> CapsuleInfo:
        """Fetch a capsule's state by ID, without attaching to it."""
        async with AsyncWrennClient(api_key=api_key, base_url=base_url) as client:
            return await client.capsules.get(capsule_id)

    async def _pause_here(self, wait: bool = False) -> CapsuleInfo:
        """Pause this running capsule; ``wait=True`` polls until it is ``paused``."""
        self._info = await self._client.capsules.pause(self.id)
        if wait:
            self._info = await self._wait_for(_PAUSED)
        return self._info

    async def _pause_by_id(
        cls,
        capsule_id: str,
        *,
        wait: bool = False,
        api_key: str | None = None,
        base_url: str | None = None,
    ) -> CapsuleInfo:
        """Pause a capsule by ID."""
        async with AsyncWrennClient(api_key=api_key, base_url=base_url) as client:
            info = await client.capsules.pause(capsule_id)
            if wait:
                info = await client.capsules.wait(capsule_id, _PAUSED)
            return info

    async def _resume_here(self, wait: bool = False) -> CapsuleInfo:
        """Resume this paused capsule; ``wait=True`` polls until it is ``running``."""
        self._info = await self._client.capsules.resume(self.id)
        if wait and self._info.status != Status.running:
            self._info = await self._wait_for(_RUNNING)
        return self._info

    async def _resume_by_id(
        cls,
        capsule_id: str,
        *,
        wait: bool = False,
        api_key: str | None = None,
        base_url: str | None = None,
    ) -> CapsuleInfo:
        """Resume a capsule by ID."""
        async with AsyncWrennClient(api_key=api_key, base_url=base_url) as client:
            info = await client.capsules.resume(capsule_id)
            if wait and info.status != Status.running:
                info = await client.capsules.wait(capsule_id, _RUNNING)
            return info

    async def _ping_here(self) -> None:
        """Reset this capsule's inactivity timer so it is not auto-paused."""
        await self._client.capsules.ping(self.id)

    async def _ping_by_id(
        cls, capsule_id: str, *, api_key: str | None = None, base_url: str | None = None
    ) -> None:
        """Reset a capsule's inactivity timer by ID."""
        async with AsyncWrennClient(api_key=api_key, base_url=base_url) as client:
            await client.capsules.ping(capsule_id)

    async def _destroy_here(self, wait: bool = False) -> None:
        """Destroy this capsule permanently; ``wait=True`` polls until it is gone."""
        await self._client.capsules.destroy(self.id)
        self._info = _marked_stopped(self._info, self.id)
        if wait:
            self._info = await self._wait_for(_GONE)

    async def _destroy_by_id(
        cls,
        capsule_id: str,
        *,
        wait: bool = False,
        api_key: str | None = None,
        base_url: str | None = None,
    ) -> None:
        """Destroy a capsule by ID."""
        async with AsyncWrennClient(api_key=api_key, base_url=base_url) as client:
            await client.capsules.destroy(capsule_id)
            if wait:
                await client.capsules.wait(capsule_id, _GONE)

    # The spec calls these both on an instance and on the class with an id.
    get_info = _dual(_get_info_here, _get_info_by_id)
    pause = _dual(_pause_here, _pause_by_id)
    resume = _dual(_resume_here, _resume_by_id)
    ping = _dual(_ping_here, _ping_by_id)
    destroy = _dual(_destroy_here, _destroy_by_id)

    # --- instance-only ------------------------------------------------------------------

    async def wait_ready(self, timeout: float = DEFAULT_WAIT_TIMEOUT) -> CapsuleInfo:
        """Wait until the capsule is ``running``. Raises like :meth:`Capsule.wait_ready`."""
        self._info = await self._wait_for(_RUNNING, timeout)
        return self._info

    async def is_running(self) -> bool:
        """Fetch the status now and tell whether it is ``running``."""
        return bool((await self.get_info()).status == Status.running)

    async def update_network(
        self, *, allow_internet_access: bool | None = None, network: dict[str, Any] | None = None
    ) -> CapsuleInfo:
        """Change this capsule's egress rules; see :meth:`Capsule.update_network`."""
        self._info = await self._client.capsules.update_network(
            self.id, allow_internet_access=allow_internet_access, network=network
        )
        return self._info

    async def create_snapshot(self, name: str | None = None, overwrite: bool = False) -> Template:
        """Snapshot this capsule into a reusable template (the capsule is left paused)."""
        template = await self._client.snapshots.create(self.id, name=name, overwrite=overwrite)
        await self.get_info()
        return template

    def pty(
        self,
        cmd: str = "/bin/bash",
        args: builtins.list[str] | None = None,
        cols: int = 80,
        rows: int = 24,
        envs: dict[str, str] | None = None,
        cwd: str | None = None,
        *,
        tag: str | None = None,
    ) -> _AsyncPtyOpener:
        """Start an interactive program on a terminal: ``async with capsule.pty() as term``
        (or ``term = await capsule.pty()``). See :meth:`Capsule.pty`."""
        return _AsyncPtyOpener(
            self._client, self.id, _pty_start_message(cmd, args, cols, rows, envs, cwd, tag)
        )

    def pty_connect(self, tag: str) -> _AsyncPtyOpener:
        """Attach to a running PTY session by tag: its recent output is replayed first."""
        return _AsyncPtyOpener(self._client, self.id, _pty_connect_message(tag))

    def get_url(self, port: int) -> str:
        """URL that reaches ``port`` inside the capsule through the Wrenn proxy:
        ``http(s)://{port}-{capsule_id}.{domain}`` (scheme of the API base URL; see get_host)."""
        return _proxy_url(self._client.base_url, self._client._proxy_domain, self.id, port)

    def get_host(self, port: int) -> str:
        """``{port}-{capsule_id}.{domain}`` (the host, and the API's port if it has one) that the
        proxy routes to ``port`` inside the capsule. ``domain`` is ``WRENN_PROXY_DOMAIN`` if set,
        else the API base URL's host and port. Where that name does not resolve, send it as the
        ``Host`` header to the API's address: ``curl -H "Host: <host>" http://127.0.0.1:8080/``."""
        return _proxy_host(self._client._proxy_domain, self.id, port)

    async def _wait_for(
        self, targets: frozenset[Status], timeout: float = DEFAULT_WAIT_TIMEOUT
    ) -> CapsuleInfo:
        return await self._client.capsules.wait(self.id, targets, timeout)

    async def aclose(self) -> None:
        """Close the HTTP connections, leaving the capsule as it is."""
        await self._client.aclose()

    async def _discard(self) -> None:
        try:
            await self._client.capsules.destroy(self._id)
            self._info = _marked_stopped(self._info, self._id)
        except Exception as exc:
            log.warning("could not destroy capsule %s: %s", self._id, exc)
        finally:
            await self._client.aclose()

    async def __aenter__(self) -> AsyncCapsule:
        return await self._ensure_created()

    async def __aexit__(self, *exc_info: object) -> None:
        if self._commands is not None:
            await self._discard()
        else:
            await self._client.aclose()
