"""The host agent's calls as JSON: values, arguments, results and errors.

Shared by the service (`wrenn_host.service.app`) and its client (`wrenn_control.hosts.remote`),
so both ends read the same `HostAgent` signatures: a method's parameters are the request body's
keys, its return annotation says how the client decodes the answer.

Values: dataclasses of `wrenn_host.api` as objects of their fields (`api.to_wire`/`api.from_wire`),
bytes as base64 strings, `EgressPolicy` as its `to_dict()`.
Errors: ``{"error": {"code", "message", "kind"}}``, kind the `HostAgentError` subclass's name.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from typing import Any

from wrenn_host import api
from wrenn_host.network.policy import EgressPolicy

# Methods whose answer is a stream, or whose input is: they have routes of their own.
STREAMS = {"attach", "pty_attach", "read_file_stream", "write_file", "tcp_connect", "read_archive", "write_archive"}
# Not calls on the host: `close` ends the client only; `start` is the service's own (app.py).
LOCAL_ONLY = {"close"}


def rpc_methods() -> list[str]:
    """Every HostAgent method a client can call as ``POST /host/v1/<name>`` with a JSON body."""
    names = [n for n, f in inspect.getmembers(api.HostAgent, inspect.isfunction) if not n.startswith("_")]
    return sorted(n for n in names if n not in STREAMS and n not in LOCAL_ONLY)


@functools.cache
def signature(method: str) -> tuple[inspect.Signature, dict[str, Any]]:
    fn = getattr(api.HostAgent, method)
    return inspect.signature(fn), typing.get_type_hints(fn)


# ---- values -----------------------------------------------------------------------------------
# api.to_wire / api.from_wire carry the contract's dataclasses; an EgressPolicy (an argument,
# never a result) goes as its own dict form.


def encode(value: Any) -> Any:
    """A value of the contract as plain JSON types."""
    if isinstance(value, EgressPolicy):
        return value.to_dict()
    return api.to_wire(value)


def decode(hint: Any, value: Any) -> Any:
    """The inverse of `encode`, guided by a type annotation."""
    if hint is EgressPolicy or (typing.get_origin(hint) in (typing.Union, types.UnionType)
                                and EgressPolicy in typing.get_args(hint)):
        return None if value is None else EgressPolicy.from_dict(value)
    return api.from_wire(hint, value)


# ---- calls ------------------------------------------------------------------------------------


def encode_args(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """A call's arguments (as the caller gave them) as a request body keyed by parameter name."""
    sig, _ = signature(method)
    bound = sig.bind(None, *args, **kwargs)  # None: self
    return {name: encode(value) for name, value in list(bound.arguments.items())[1:]}


def decode_args(method: str, body: dict[str, Any]) -> dict[str, Any]:
    """A request body as keyword arguments; unknown or missing parameters raise InvalidCall."""
    sig, hints = signature(method)
    params = list(sig.parameters.values())[1:]
    unknown = set(body) - {p.name for p in params}
    if unknown:
        raise InvalidCall(f"{method}: unknown argument(s) {', '.join(sorted(unknown))}")
    out = {}
    for p in params:
        if p.name in body:
            out[p.name] = decode(hints.get(p.name, Any), body[p.name])
        elif p.default is inspect.Parameter.empty:
            raise InvalidCall(f"{method}: missing argument {p.name}")
    return out


def decode_result(method: str, value: Any) -> Any:
    _, hints = signature(method)
    return decode(hints.get("return", Any), value)


class InvalidCall(api.HostAgentError):
    """A request the service cannot map onto a HostAgent method (a client of another version)."""

    code = "invalid"


# ---- errors -----------------------------------------------------------------------------------


def _error_classes() -> dict[str, type[api.HostAgentError]]:
    found: dict[str, type[api.HostAgentError]] = {}
    todo = [api.HostAgentError]
    while todo:
        cls = todo.pop()
        found.setdefault(cls.__name__, cls)
        todo.extend(cls.__subclasses__())
    return found


# Where the error classes both ends know live (the remote client adds HostUnavailable).
PUBLIC_ERROR_MODULES = {api.__name__, __name__, "wrenn_control.hosts.remote"}

STATUS = {"CapsuleNotFound": 404, "TemplateNotFound": 404, "InvalidShape": 400, "InvalidCall": 400,
          "GuestError": 422, "VMMError": 502, "HostUnavailable": 503}


def error_status(exc: api.HostAgentError) -> int:
    for cls in type(exc).__mro__:
        if cls.__name__ in STATUS:
            return STATUS[cls.__name__]
    return 409  # a HostAgentError of no finer kind: the capsule's state does not allow the call


def error_to_wire(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, api.HostAgentError):
        # the nearest class a client knows (a subclass private to the host is sent as its base)
        kind = next(c.__name__ for c in type(exc).__mro__ if c.__module__ in PUBLIC_ERROR_MODULES)
        return {"error": {"code": exc.code, "message": exc.message, "kind": kind}}
    return {"error": {"code": "agent_error", "message": f"host agent failure: {type(exc).__name__}: {exc}",
                      "kind": "HostAgentError"}}


def error_from_wire(body: Any, fallback: str = "") -> api.HostAgentError:
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return api.HostAgentError(fallback or "host agent sent an unreadable answer")
    cls = _error_classes().get(str(err.get("kind")), api.HostAgentError)
    return cls(str(err.get("message") or fallback or "host agent error"), code=err.get("code") or None)
