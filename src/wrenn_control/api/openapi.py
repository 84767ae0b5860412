"""The OpenAPI document, made to say what the server does (schemathesis checks it):
- validation errors are 400 `invalid_request` with the error body, never FastAPI's 422;
- every operation that takes parameters or a body documents 400, every authenticated one 401,
  every one with a body 413 (RequestGuard's cap), all with the error body;
- create's vcpus / memory_mb bounds are this host's (`HostAgent.limits()`).
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from wrenn_host.api import HostAgent

_ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
_DESCRIPTIONS = {"400": "Invalid request", "401": "Missing or invalid credentials",
                 "413": "Request body too large"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR_REF}}}


def _bound(schema: dict[str, Any], prop: str, **bounds: int) -> None:
    """Set bounds on an (optional) integer property: `anyOf [{integer}, {null}]` or plain."""
    field = schema.get("properties", {}).get(prop)
    if field is None:
        return
    for choice in field.get("anyOf", [field]):
        if choice.get("type") == "integer":
            choice.update(bounds)


def build(app: FastAPI, host: HostAgent) -> dict[str, Any]:
    spec = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    for ops in spec.get("paths", {}).values():
        for op in ops.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            wanted = []
            if op.get("parameters") or op.get("requestBody"):
                wanted.append("400")
            if op.get("security"):
                wanted.append("401")
            if op.get("requestBody"):
                wanted.append("413")
            for status in wanted:
                responses.setdefault(status, _error(_DESCRIPTIONS[status]))
    schemas = spec.get("components", {}).get("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    # Asked of the host at start-up (the contract is async; this document is built synchronously);
    # None when the host did not answer: the document must not depend on a healthy host.
    limits = getattr(app.state, "host_limits", None)
    create = schemas.get("CapsuleCreate")
    if create is not None and limits is not None:
        _bound(create, "vcpus", minimum=1, maximum=limits.max_vcpus)
        _bound(create, "memory_mb", minimum=limits.min_memory_mb, maximum=limits.max_memory_mb)
    return spec


_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")


def _path_table(app: Any) -> list[tuple[re.Pattern[str], int, frozenset[str]]]:
    table = getattr(app.state, "_path_methods", None)
    if table is None:
        table = []
        for path, ops in app.openapi().get("paths", {}).items():
            params = path.count("{")
            regex = re.compile("^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(path)) + "/?$")
            table.append((regex, params, frozenset(m.upper() for m in ops if m in _METHODS)))
        app.state._path_methods = table
    return table


def allowed_methods(app: Any, path: str) -> list[str]:
    """The methods the OpenAPI gives this path (its most specific template: /capsules/stats, not
    /capsules/{capsule_id}), plus HEAD with GET and OPTIONS; [] for a path it does not have."""
    matches = [(params, methods) for regex, params, methods in _path_table(app) if regex.match(path)]
    if not matches:
        return []
    fewest = min(params for params, _ in matches)
    found = set().union(*(methods for params, methods in matches if params == fewest))
    if "GET" in found:
        found.add("HEAD")
    return sorted(found | {"OPTIONS"})


def install(app: FastAPI, host: HostAgent) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app, host)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
