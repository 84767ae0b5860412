"""What :class:`~wrenn.Capsule` and :class:`~wrenn.AsyncCapsule` share: the status sets they
wait for, the class-or-instance method descriptor :class:`_dual`, the port-proxy URL helpers,
and the read-only views of :class:`_CapsuleState`.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import httpx

from wrenn._models import CapsuleInfo, Status

_RUNNING = frozenset({Status.running})
_PAUSED = frozenset({Status.paused})
_GONE = frozenset({Status.stopped, Status.missing})  # missing: the server forgot it (404)


class _dual:
    """A method that works on an instance (acting on that capsule) and on the class (given a
    capsule id): the spec calls both ``Capsule.get_info("cl-...")`` and ``capsule.get_info()``.
    """

    def __init__(self, on_instance: Callable[..., Any], on_class: Callable[..., Any]) -> None:
        self._on_instance = on_instance
        self._on_class = on_class
        self.__doc__ = f"{on_instance.__doc__}\n\nOn the class: {on_class.__doc__}"

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        if obj is None:
            return types.MethodType(self._on_class, owner)
        return types.MethodType(self._on_instance, obj)


def _proxy_url(base_url: str, proxy_domain: str, capsule_id: str, port: int) -> str:
    scheme = "http" if httpx.URL(base_url).scheme == "http" else "https"
    return f"{scheme}://{_proxy_host(proxy_domain, capsule_id, port)}"


def _proxy_host(proxy_domain: str, capsule_id: str, port: int) -> str:
    return f"{port}-{capsule_id}.{proxy_domain}"


def _marked_stopped(info: CapsuleInfo | None, capsule_id: str) -> CapsuleInfo:
    # DELETE answers 204 with no body; record what the server now reports.
    if info is None:
        return CapsuleInfo(id=capsule_id, status=Status.stopped)
    return info.model_copy(update={"status": Status.stopped})


class _CapsuleState:
    """Read-only views shared by both capsule classes."""

    _id: str
    _info: CapsuleInfo | None

    @property
    def id(self) -> str:
        """The capsule ID (``cl-...``)."""
        return self._id

    @property
    def capsule_id(self) -> str:
        """The capsule ID; same as :attr:`id`."""
        return self._id

    @property
    def info(self) -> CapsuleInfo | None:
        """The capsule as last seen by any call on this object."""
        return self._info

    @property
    def status(self) -> Status | str | None:
        """Status as last seen; refreshed by every call that changes or reads it."""
        return self._info.status if self._info is not None else None

    def __repr__(self) -> str:
        status = str(self.status) if self.status is not None else None
        return f"{type(self).__name__}(id={getattr(self, '_id', None)!r}, status={status!r})"
