"""`wrenn` command: runs the platform (server, images) and drives it (capsule, snapshot)."""

from __future__ import annotations

import typer

from wrenn_cli.client import capsule_app, snapshot_app
from wrenn_cli.fleet import control_plane
from wrenn_cli.host_agent import host_agent
from wrenn_cli.hosts import hosts_app
from wrenn_cli.platform import images_app, server
from wrenn_cli.templates import template_app

app = typer.Typer(help="Wrenn: self-hosted microVM sandboxes (capsules).", no_args_is_help=True)
app.command("server")(server)
app.command("host-agent")(host_agent)
app.add_typer(images_app, name="images")
app.add_typer(capsule_app, name="capsule")
app.add_typer(snapshot_app, name="snapshot")
app.add_typer(template_app, name="template")
app.command("control-plane")(control_plane)
app.add_typer(hosts_app, name="hosts")

if __name__ == "__main__":
    app()
