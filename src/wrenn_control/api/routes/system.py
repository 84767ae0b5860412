"""Unauthenticated system routes (mounted at /api, outside /v1)."""

from __future__ import annotations

import logging

from fastapi import APIRouter

from wrenn_control.api.deps import HostDep
from wrenn_control.errors import APIError
from wrenn_control.schemas import ErrorBody, Health

log = logging.getLogger(__name__)
router = APIRouter(tags=["system"])


@router.get("/health", response_model=Health, responses={503: {"model": ErrorBody}})
async def health(host: HostDep) -> Health:
    """{status, accelerator, ...what the host agent reports (vmm, capsules, ...)}."""
    try:
        info = dict(await host.health())
    except Exception as exc:  # any failure here means: this host cannot serve capsules now
        log.warning("host health failed: %s", exc)
        raise APIError(503, "host_unavailable", f"host agent unavailable: {exc}") from exc
    info.pop("status", None)
    return Health(status="ok", **info)
