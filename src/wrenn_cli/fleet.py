"""``wrenn control-plane``: the API of a fleet, with no host of its own, on PostgreSQL.

Run several behind one URL (same --database-url, same WRENN_JWT_SECRET); host agents register
with it (``wrenn hosts add`` prints their command). See deploy/README.md."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console(stderr=True)


def control_plane(
    database_url: Annotated[str, typer.Option(
        envvar="WRENN_DATABASE_URL", show_default=False,
        help="postgresql://USER:PASSWORD@HOST/DB, shared by every replica.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    data_dir: Annotated[Path | None, typer.Option(
        help="Local state (the JWT secret when WRENN_JWT_SECRET is not set) (default: $WRENN_DATA_DIR "
             "or ~/.local/share/wrenn).")] = None,
) -> None:
    """Run the control plane of a fleet: the REST API, capsules on the registered hosts.

    Migrates the database and makes the operators' team and its key on first start (printed once,
    or $WRENN_BOOTSTRAP_API_KEY registered). Background work runs on every replica; each capsule
    is handled once (conditional updates and leases in the database)."""
    from wrenn_control.config import Settings
    from wrenn_control.db.session import normalize_url
    from wrenn_control.server import run

    try:
        backend = normalize_url(database_url).get_backend_name()
    except Exception as exc:  # sqlalchemy's ArgumentError: not a URL
        console.print(f"[red]--database-url is not a database URL:[/] {exc}")
        raise typer.Exit(2) from exc
    if backend != "postgresql":
        console.print(f"[yellow]warning:[/] {backend} cannot be shared by replicas; use PostgreSQL for a fleet")
    settings = Settings(database_url=database_url, **({"data_dir": data_dir.resolve()} if data_dir else {}))
    if not settings.jwt_secret:
        console.print("[yellow]warning:[/] WRENN_JWT_SECRET is not set: account logins made by one replica "
                      "are refused by another (each keeps its own secret in its data dir)")
    run(host, port, settings, None)
