"""``wrenn hosts add|list|show|drain|remove``: a fleet's hosts (for the operators' team key).

``add`` makes a host record and prints the ``wrenn host-agent ...`` command to run on the new
machine (it carries a one-time registration token)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

from wrenn_cli.client import JsonFlag, _print_json, err, out
from wrenn_cli.templates import _check, _http

hosts_app = typer.Typer(help="Manage a fleet's hosts (needs the operators' team API key in WRENN_API_KEY).",
                        no_args_is_help=True)
HostId = Annotated[str, typer.Argument(help="Host id (host-...).", show_default=False)]


def _mib(value: Any) -> str:
    return "-" if value is None else f"{int(value) / 1024:.1f} GiB"


@hosts_app.command("add")
def hosts_add(name: Annotated[str | None, typer.Option(help="A name to show for it.")] = None,
              as_json: JsonFlag = False) -> None:
    """Make a host record and print the command that registers the host agent (run it there)."""
    with _http() as http:
        made = _check(http.post("/v1/hosts", json={"name": name} if name else {}))
    if as_json:
        _print_json(made)
        return
    err.print(f"host {made['id']} made; run this on the host (the token works once):")
    out.print(made["command"], markup=False, soft_wrap=True)


@hosts_app.command("list")
def hosts_list(as_json: JsonFlag = False) -> None:
    """Every host: status, capacity, usage, capsules."""
    with _http() as http:
        hosts = _check(http.get("/v1/hosts"))
    if as_json:
        _print_json(hosts)
        return
    table = Table(box=box.SIMPLE)
    for col in ("ID", "NAME", "STATUS", "ADDRESS", "VCPUS", "MEMORY", "FREE MEMORY", "CAPSULES", "LAST HEARTBEAT"):
        table.add_column(col)
    for h in hosts:
        cap, usage = h["capacity"], h["usage"]
        table.add_row(h["id"], h["name"], h["status"], h["address"] or "-", str(cap.get("vcpus") or "-"),
                      _mib(cap.get("memory_mb")), _mib(usage.get("free_memory_mb")), str(h["capsule_count"]),
                      h["last_heartbeat_at"] or "-")
    out.print(table)


@hosts_app.command("show")
def hosts_show(host_id: HostId, as_json: JsonFlag = False) -> None:
    """One host in full."""
    with _http() as http:
        host = _check(http.get(f"/v1/hosts/{host_id}"))
    if as_json:
        _print_json(host)
        return
    for key in ("id", "name", "status", "address", "accelerator", "version", "capsule_count",
                "last_heartbeat_at", "created_at"):
        out.print(f"{key:<18} {host[key] if host[key] is not None else '-'}", markup=False)
    out.print(f"{'capacity':<18} " + ", ".join(f"{k}={v}" for k, v in host["capacity"].items()), markup=False)
    out.print(f"{'usage':<18} " + (", ".join(f"{k}={v}" for k, v in host["usage"].items()) or "-"), markup=False)
    out.print(f"{'templates':<18} " + (", ".join(host["templates"]) or "-"), markup=False)


@hosts_app.command("drain")
def hosts_drain(host_id: HostId, as_json: JsonFlag = False) -> None:
    """Place no new capsule on the host."""
    with _http() as http:
        host = _check(http.post(f"/v1/hosts/{host_id}/drain"))
    if as_json:
        _print_json(host)
    else:
        out.print(f"{host['id']} {host['status']} ({host['capsule_count']} capsules on it)", markup=False)


@hosts_app.command("remove")
def hosts_remove(host_id: HostId) -> None:
    """Forget a host that holds no capsule (else the capsules are listed and nothing is done)."""
    with _http() as http:
        resp = http.delete(f"/v1/hosts/{host_id}")
        if resp.status_code == 409:
            ids = resp.json().get("capsule_ids") or []
            err.print(f"host {host_id} still has {len(ids)} capsule(s): {' '.join(ids)}", markup=False)
            raise typer.Exit(1)
        _check(resp)
    out.print(f"removed {host_id}", markup=False)
