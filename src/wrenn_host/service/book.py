"""What a served host agent holds: capsule and template ids, and their usage.

`HostAgent` has no "list everything" call (in one process the control plane's database is the
list). A host agent serving a fleet has to report its capsules in every heartbeat, so the service
keeps the ids it has seen (found on disk at start, then every create, resume, snapshot and
destroy that went through it) and asks the agent for their state when it reports.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from wrenn_host import api


@dataclasses.dataclass
class Inventory:
    capsules: dict[str, api.CapsuleRuntime]
    templates: list[str]

    def by_state(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for rt in self.capsules.values():
            out[rt.state] = out.get(rt.state, 0) + 1
        return out


class Book:
    def __init__(self, agent: api.HostAgent, capsules: set[str] | None = None, templates: set[str] | None = None):
        self.agent = agent
        self.capsule_ids: set[str] = set(capsules or ())
        self.template_ids: set[str] = set(templates or ())

    def saw_capsule(self, capsule_id: str) -> None:
        self.capsule_ids.add(capsule_id)

    def dropped_capsule(self, capsule_id: str) -> None:
        self.capsule_ids.discard(capsule_id)

    async def inventory(self) -> Inventory:
        """Every capsule's runtime now (ones the agent no longer knows are forgotten)."""
        capsules: dict[str, api.CapsuleRuntime] = {}
        for cid in sorted(self.capsule_ids):
            try:
                capsules[cid] = await self.agent.get(cid)
            except api.CapsuleNotFound:
                self.capsule_ids.discard(cid)
        builtin = await self.agent.builtin_templates()
        templates = sorted({t.template_id for t in builtin} | self.template_ids)
        return Inventory(capsules, templates)

    async def usage(self, inv: Inventory) -> dict[str, Any]:
        """The heartbeat's `usage`: what running capsules reserve and what the machine has left."""
        running = [rt for rt in inv.capsules.values() if rt.state == "running"]
        free = await self.agent.capacity()
        return {"capsules_running": len(running),
                "reserved_vcpus": sum(rt.vcpus for rt in running),
                "reserved_memory_mb": sum(rt.memory_mb for rt in running),
                "free_memory_mb": free.get("free_memory_mb"),
                "free_disk_mb": free.get("free_disk_mb")}


def on_disk(data_root: Path) -> tuple[set[str], set[str]]:
    """Capsule and snapshot template ids a LocalHostAgent's data directory holds (`<data>/host`).
    Spare VMs and interrupted snapshots are the agent's own business: not listed."""
    from wrenn_host.paths import check_id
    from wrenn_host.spares import SPARE_PREFIX

    def ids(d: Path) -> set[str]:
        if not d.is_dir():
            return set()
        out = set()
        for p in d.iterdir():
            try:
                check_id(p.name)
            except ValueError:
                continue
            if not p.name.startswith((".", SPARE_PREFIX)):
                out.add(p.name)
        return out

    templates = {t for t in ids(data_root / "templates") if (data_root / "templates" / t / "meta.json").exists()
                 and not (data_root / "templates" / t / "deleted").exists()}
    return ids(data_root / "capsules"), templates
