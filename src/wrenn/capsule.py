"""The synchronous capsule object: :class:`Capsule`.

Thin: requests come from :class:`~wrenn.WrennClient`, waits from :mod:`wrenn._wait`, the parts
shared with the async twin from :mod:`wrenn._capsule_state`. :class:`AsyncCapsule` lives in
:mod:`wrenn.async_capsule` and is re-exported here.
"""

from __future__ import annotations

import builtins
import logging
from typing import Any

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
from wrenn._client import WrennClient
from wrenn._models import CapsuleInfo, Status, Template
from wrenn._wait import DEFAULT_WAIT_TIMEOUT, connect_flow, drive
from wrenn.async_capsule import AsyncCapsule
from wrenn.commands import Commands
from wrenn.files import Files
from wrenn.git import Git
from wrenn.pty import PtySession
from wrenn.pty import _connect_message as _pty_connect_message
from wrenn.pty import _start_message as _pty_start_message

__all__ = ["AsyncCapsule", "Capsule"]

log = logging.getLogger("wrenn")


class Capsule(_CapsuleState):
    """A Wrenn capsule (microVM sandbox).

    Creating the object creates the capsule; use it as a context manager to destroy it on
    exit::

        with Capsule(template="minimal", wait=True) as capsule:
            print(capsule.commands.run("echo hello").stdout)

    Args:
        template: Template to boot from (server default ``"minimal"``).
        vcpus: Virtual CPUs (server default 1).
        memory_mb: Memory in MiB (server default 512).
        timeout: Inactivity TTL in seconds before auto-pause; ``0`` disables it.
        wait: Block until the capsule is ``running``.
        api_key: API key; defaults to ``WRENN_API_KEY``.
        base_url: API base URL; defaults to ``WRENN_BASE_URL``, then production.
        metadata: User labels (string to string) attached at create time.

    Attributes:
        commands: :class:`~wrenn.commands.Commands` for this capsule.
        files: :class:`~wrenn.files.Files` for this capsule.
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
        _client: WrennClient | None = None,
        _info: CapsuleInfo | None = None,
    ) -> None:
        if _client is not None and _capsule_id is not None:  # connect(): bind, don't create
            self._client, self._id, self._info = _client, _capsule_id, _info
        else:
            self._client = WrennClient(api_key=api_key, base_url=base_url)
            try:
                self._info = self._client.capsules.create(
                    template, vcpus, memory_mb, timeout, metadata=metadata,
                    allow_internet_access=allow_internet_access, network=network,
                )
            except BaseException:
                self._client.close()
                raise
            self._id = self._info.id
        self.commands = Commands(self._id, self._client)
        self.files = Files(self._id, self._client)
        self.git = Git(self.commands)
        if wait and self._info.status != Status.running:  # the server may answer running
            try:
                self.wait_ready()
            except BaseException:
                # The caller gets no object to clean up with, so don't leave a VM behind.
                self._discard()
                raise

    # --- creating and finding ----------------------------------------------------------

    @classmethod
    def create(
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
    ) -> Capsule:
        """Create a capsule; the same as calling ``Capsule(...)``."""
        return cls(
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
    def connect(
        cls,
        capsule_id: str,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float = DEFAULT_WAIT_TIMEOUT,
    ) -> Capsule:
        """Attach to an existing capsule and make sure it is running, resuming it if paused.

        Raises:
            WrennNotFoundError: No such capsule.
            WrennCapsuleStateError: It is stopped or in ``error``.
        """
        client = WrennClient(api_key=api_key, base_url=base_url)
        try:
            info = drive(connect_flow(capsule_id, timeout), client, capsule_id)
        except BaseException:
            client.close()
            raise
        return cls(_capsule_id=capsule_id, _client=client, _info=info)

    @classmethod
    def list(
        cls, *, api_key: str | None = None, base_url: str | None = None
    ) -> builtins.list[CapsuleInfo]:
        """List the team's capsules (every status, newest first)."""
        with WrennClient(api_key=api_key, base_url=base_url) as client:
            return client.capsules.list()

    # --- lifecycle: on an instance, or on the class with an id -------------------------

    def _get_info_here(self) -> CapsuleInfo:
        """Fetch this capsule's current state (and refresh :attr:`status`)."""
        self._info = self._client.capsules.get(self._id)
        return self._info

    def _get_info_by_id(
        cls, capsule_id: str, *, api_key: str | None = None, base_url: str | None = None
    ) -> CapsuleInfo:
        """Fetch a capsule's state by ID, without attaching to it."""
        with WrennClient(api_key=api_key, base_url=base_url) as client:
            return client.capsules.get(capsule_id)

    def _pause_here(self, wait: bool = False) -> CapsuleInfo:
        """Pause this running capsule: memory and disk are saved, the VM is stopped.

        ``wait=True`` also polls until the status is ``paused``, for a server that answers
        before the pause is complete.
        """
        self._info = self._client.capsules.pause(self._id)
        if wait:
            self._info = self._wait_for(_PAUSED)
        return self._info

    def _pause_by_id(
        cls,
        capsule_id: str,
        *,
        wait: bool = False,
        api_key: str | None = None,
        base_url: str | None = None,
    ) -> CapsuleInfo:
        """Pause a capsule by ID."""
        with WrennClient(api_key=api_key, base_url=base_url) as client:
            info = client.capsules.pause(capsule_id)
            if wait:
                info = client.capsules.wait(capsule_id, _PAUSED)
            return info

    def _resume_here(self, wait: bool = False) -> CapsuleInfo:
        """Resume this paused capsule; ``wait=True`` polls until it is ``running``."""
        self._info = self._client.capsules.resume(self._id)
        if wait and self._info.status != Status.running:
            self._info = self._wait_for(_RUNNING)
        return self._info

    def _resume_by_id(
        cls,
        capsule_id: str,
        *,
        wait: bool = False,
        api_key: str | None = None,
        base_url: str | None = None,
    ) -> CapsuleInfo:
        """Resume a capsule by ID."""
        with WrennClient(api_key=api_key, base_url=base_url) as client:
            info = client.capsules.resume(capsule_id)
            if wait and info.status != Status.running:
                info = client.capsules.wait(capsule_id, _RUNNING)
            return info

    def _ping_here(self) -> None:
        """Reset this capsule's inactivity timer so it is not auto-paused."""
        self._client.capsules.ping(self._id)

    def _ping_by_id(
        cls, capsule_id: str, *, api_key: str | None = None, base_url: str | None = None
    ) -> None:
        """Reset a capsule's inactivity timer by ID."""
        with WrennClient(api_key=api_key, base_url=base_url) as client:
            client.capsules.ping(capsule_id)

    def _destroy_here(self, wait: bool = False) -> None:
        """Destroy this capsule permanently; ``wait=True`` polls until it is gone."""
        self._client.capsules.destroy(self._id)
        self._info = _marked_stopped(self._info, self._id)
        if wait:
            self._info = self._wait_for(_GONE)

    def _destroy_by_id(
        cls,
        capsule_id: str,
        *,
        wait: bool = False,
        api_key: str | None = None,
        base_url: str | None = None,
    ) -> None:
        """Destroy a capsule by ID."""
        with WrennClient(api_key=api_key, base_url=base_url) as client:
            client.capsules.destroy(capsule_id)
            if wait:
                client.capsules.wait(capsule_id, _GONE)

    # The spec calls these both on an instance and on the class with an id.
    get_info = _dual(_get_info_here, _get_info_by_id)
    pause = _dual(_pause_here, _pause_by_id)
    resume = _dual(_resume_here, _resume_by_id)
    ping = _dual(_ping_here, _ping_by_id)
    destroy = _dual(_destroy_here, _destroy_by_id)

    # --- instance-only ------------------------------------------------------------------

    def wait_ready(self, timeout: float = DEFAULT_WAIT_TIMEOUT) -> CapsuleInfo:
        """Block until the capsule is ``running``.

        Raises:
            WrennCapsuleStateError: It went to ``error`` or ``stopped`` instead
                (a ``RuntimeError``).
            WrennWaitTimeoutError: Not running within ``timeout`` seconds (a ``TimeoutError``).
        """
        self._info = self._wait_for(_RUNNING, timeout)
        return self._info

    def is_running(self) -> bool:
        """Fetch the status now and tell whether it is ``running``."""
        return bool(self.get_info().status == Status.running)

    def update_network(
        self, *, allow_internet_access: bool | None = None, network: dict[str, Any] | None = None
    ) -> CapsuleInfo:
        """Change this capsule's egress rules (running or paused), in force at once.

        Omitted fields keep their value, e.g.
        ``capsule.update_network(network={"allow_out": ["pypi.org"], "deny_out": ["0.0.0.0/0"]})``.
        """
        self._info = self._client.capsules.update_network(
            self._id, allow_internet_access=allow_internet_access, network=network
        )
        return self._info

    def create_snapshot(self, name: str | None = None, overwrite: bool = False) -> Template:
        """Snapshot this capsule into a reusable template (the capsule is left paused).

        Pass the template's name to ``Capsule(template=...)`` to boot copies of it.
        """
        template = self._client.snapshots.create(self._id, name=name, overwrite=overwrite)
        self.get_info()  # snapshotting changes the capsule's status
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
    ) -> PtySession:
        """Start an interactive program on a terminal in the capsule; use it as a context
        manager (leaving it kills the program unless :meth:`PtySession.detach` was called).

        Example::

            with capsule.pty() as term:
                term.write(b"echo hello\n")
                for event in term:
                    if event.type == "output":
                        print(event.data.decode(errors="replace"), end="")
        """
        return PtySession._open(
            self._client, self._id, _pty_start_message(cmd, args, cols, rows, envs, cwd, tag)
        )

    def pty_connect(self, tag: str) -> PtySession:
        """Attach to a running PTY session by tag: its recent output is replayed first."""
        return PtySession._open(self._client, self._id, _pty_connect_message(tag))

    def get_url(self, port: int) -> str:
        """URL that reaches ``port`` inside the capsule through the Wrenn proxy:
        ``http(s)://{port}-{capsule_id}.{domain}`` (scheme of the API base URL; see get_host)."""
        return _proxy_url(self._client.base_url, self._client._proxy_domain, self._id, port)

    def get_host(self, port: int) -> str:
        """``{port}-{capsule_id}.{domain}`` (the host, and the API's port if it has one) that the
        proxy routes to ``port`` inside the capsule. ``domain`` is ``WRENN_PROXY_DOMAIN`` if set,
        else the API base URL's host and port. Where that name does not resolve, send it as the
        ``Host`` header to the API's address: ``curl -H "Host: <host>" http://127.0.0.1:8080/``."""
        return _proxy_host(self._client._proxy_domain, self._id, port)

    def _wait_for(
        self, targets: frozenset[Status], timeout: float = DEFAULT_WAIT_TIMEOUT
    ) -> CapsuleInfo:
        return self._client.capsules.wait(self._id, targets, timeout)

    def close(self) -> None:
        """Close the HTTP connections, leaving the capsule as it is."""
        self._client.close()

    def _discard(self) -> None:
        try:
            self._client.capsules.destroy(self._id)
            self._info = _marked_stopped(self._info, self._id)
        except Exception as exc:
            log.warning("could not destroy capsule %s: %s", self._id, exc)
        finally:
            self._client.close()

    def __enter__(self) -> Capsule:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._discard()
