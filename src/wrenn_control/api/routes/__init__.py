"""One router per resource; `api_router` gathers the /v1 ones."""

from __future__ import annotations

from fastapi import APIRouter

from wrenn_control.api.routes import (
    accounts, builds, capsules, events, exec, files, hosts, observability, snapshots, streams, tickets,
)

api_router = APIRouter()
# First: its /capsules/stats and /capsules/usage must be matched before /capsules/{capsule_id}.
api_router.include_router(observability.router)
for module in (capsules, exec, files, snapshots, events, streams, accounts, tickets, builds, hosts):
    api_router.include_router(module.router)
