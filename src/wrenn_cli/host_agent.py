"""`wrenn host-agent`: this machine's host agent as a service for a control plane elsewhere."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console(stderr=True)


def host_agent(
    control_plane: Annotated[str, typer.Option("--control-plane", help="The control plane's URL, e.g. https://wrenn.example.com.")],
    token: Annotated[str | None, typer.Option(
        "--token", envvar="WRENN_HOST_TOKEN",
        help="One-time registration token (`wrenn hosts add`); not needed once registered.")] = None,
    listen: Annotated[str, typer.Option("--listen", help="ADDR:PORT the control plane calls this agent on.")] = "0.0.0.0:9090",
    data_dir: Annotated[Path | None, typer.Option(
        "--data-dir", help="Capsules, templates and registration.json [default: $WRENN_DATA_DIR or ~/.local/share/wrenn].")] = None,
    advertise: Annotated[str | None, typer.Option(
        "--advertise", help="URL the control plane should use for this agent [default: https://<listen address> "
                            "(http:// with --no-tls); listening on 0.0.0.0, the address of the route to the "
                            "control plane].")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Host name shown in /v1/hosts [default: hostname].")] = None,
    log_format: Annotated[str, typer.Option(
        "--log-format", envvar="WRENN_LOG_FORMAT", help="text, or json (one JSON object per line).")] = "text",
    tls: Annotated[bool, typer.Option(
        "--tls/--no-tls", help="Serve HTTPS. Without --tls-cert, a self-signed certificate is made once in the "
                               "data directory and sent with the registration: the control plane trusts it alone.")] = True,
    tls_cert: Annotated[Path | None, typer.Option("--tls-cert", help="PEM certificate (chain) to serve with.")] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="Its PEM private key.")] = None,
) -> None:
    """Run the host agent as a service: register with the control plane (once; the registration is
    kept in the data directory), serve its calls on --listen and heartbeat every few seconds.

    Capsules found on disk at start are kept and reported; the control plane decides about them."""
    from wrenn_cli.platform import _build_images, default_data_dir
    from wrenn_host import perms
    from wrenn_host.service import logs
    from wrenn_host.service.run import ServiceConfig, parse_listen
    from wrenn_images.builder import cache_dir

    try:
        host, port = parse_listen(listen)
    except ValueError as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(2) from e
    data_dir = (data_dir or default_data_dir()).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    cfg = ServiceConfig(data_dir, control_plane, host, port, token, advertise, name, tls=tls,
                        tls_cert=tls_cert.resolve() if tls_cert else None, tls_key=tls_key.resolve() if tls_key else None)
    if not tls and (tls_cert or tls_key):
        console.print("[red]--tls-cert/--tls-key and --no-tls do not go together[/]")
        raise typer.Exit(2)
    if not (data_dir / "registration.json").exists() and not token:
        console.print("[red]not registered yet:[/] give --token (from `POST /v1/hosts` or `wrenn hosts add`)")
        raise typer.Exit(2)
    if log_format not in ("text", "json"):
        console.print(f"[red]--log-format must be text or json, got {log_format!r}[/]")
        raise typer.Exit(2)
    logs.setup(log_format)
    _build_images(force=False)
    perms.private_umask()
    perms.lock_down(data_dir)
    perms.lock_down_cache(cache_dir())
    try:
        asyncio.run(_run(cfg))
    except KeyboardInterrupt:
        pass


async def _run(cfg) -> None:  # type: ignore[no-untyped-def]
    from wrenn_host.agent import LocalHostAgent
    from wrenn_host.service.book import Book, on_disk
    from wrenn_host.service.enroll import EnrollError
    from wrenn_host.service.run import HostService, registration

    agent = LocalHostAgent(cfg.data_dir)
    try:
        console.print("preparing template snapshots (the first start boots each template once)")
        await agent.prepare()
        # Everything on disk is kept (the control plane, told in the heartbeat, decides).
        capsules, templates = on_disk(agent.paths.root)
        report = await agent.start({cid: "unknown" for cid in capsules})
        book = Book(agent, set(report.running) | set(report.paused), templates)
        try:
            reg = await registration(cfg, agent, agent.paths.root)
        except EnrollError as e:
            console.print(f"[red]{e}[/]")
            raise SystemExit(1) from e
        service = HostService(cfg, agent, book, reg)
        await service.start()
        console.print(f"host {reg.host_id} serving on {cfg.listen_host}:{cfg.listen_port} "
                      f"(accelerator {agent.accel}; {len(report.running)} running, {len(report.paused)} paused)")
        try:
            await service.wait()
        finally:
            await service.stop()
    finally:
        await agent.close()
