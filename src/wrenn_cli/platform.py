"""`wrenn server` and `wrenn images`: run the platform on this machine."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console(stderr=True)
images_app = typer.Typer(help="Build the guest kernel and template images.", no_args_is_help=True)

REQUIRED_TOOLS = ("qemu-system-x86_64", "qemu-img", "debootstrap", "mkfs.ext4", "lz4", "cpio", "busybox")


def default_data_dir() -> Path:
    return Path(os.environ.get("WRENN_DATA_DIR") or Path.home() / ".local" / "share" / "wrenn")


def _check_tools() -> None:
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        console.print(f"[red]missing host tools:[/] {', '.join(missing)}\n"
                      "install them with: apt-get install -y qemu-system-x86 qemu-utils debootstrap "
                      "e2fsprogs lz4 cpio busybox-static file")
        raise typer.Exit(1)


def _build_images(force: bool) -> None:
    from wrenn_images import builder

    _check_tools()
    if not force and builder.is_built():
        console.print(f"images are up to date in {builder.cache_dir()} (nothing to do)")
        return
    with console.status("building images") as status:
        def progress(msg: str) -> None:
            status.update(msg)
            console.log(msg)

        try:
            kernel, roots = builder.build_all(force=force, progress=progress)
        except builder.BuildError as e:
            console.print(f"[red]image build failed:[/] {e}")
            raise typer.Exit(1) from e
    console.print(f"kernel {kernel.version}; templates: {', '.join(roots)} in {builder.cache_dir()}")


@images_app.command("build")
def images_build(
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if the cache is up to date.")] = False,
    with_: Annotated[list[str] | None, typer.Option(
        "--with", help="Also build this built-in template made by a build (code-runner-beta); repeatable.")] = None,
    data_dir: Annotated[Path | None, typer.Option(
        help="The server's data directory [default: $WRENN_DATA_DIR or ~/.local/share/wrenn].")] = None,
) -> None:
    """Build the guest kernel and the `minimal` and `base-python` root filesystems.

    Artifacts go to $WRENN_CACHE_DIR (default ~/.cache/wrenn), keyed by a hash of their recipe:
    a second run is a no-op. Template snapshots are made from them when the server starts.
    `--with code-runner-beta` also runs that template's build (in a capsule, with network) into the
    data directory, so the first code runner capsule does not wait for it."""
    _build_images(force)
    if with_:
        _build_builtins(with_, (data_dir or default_data_dir()).resolve())


def check_vmm_setting() -> None:
    """A bad WRENN_VMM is a one-line error before anything starts, not a traceback."""
    from wrenn_host.vmm import driver

    try:
        driver()
    except ValueError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None


def _build_builtins(names: list[str], data_dir: Path) -> None:
    from wrenn_control.builds.builtin import BUILTIN_BUILDS
    from wrenn_control.builds.manager import build_builtin, builtin_template_id
    from wrenn_host.agent import LocalHostAgent
    from wrenn_host.api import HostAgentError, TemplateNotFound

    unknown = [n for n in names if n not in BUILTIN_BUILDS]
    if unknown:
        console.print(f"[red]unknown built-in template(s):[/] {', '.join(unknown)} (known: {', '.join(BUILTIN_BUILDS)})")
        raise typer.Exit(1)

    async def run() -> None:
        agent = LocalHostAgent(data_dir)
        try:
            await agent.prepare([(BUILTIN_BUILDS[n].base, BUILTIN_BUILDS[n].vcpus, BUILTIN_BUILDS[n].memory_mb)
                                 for n in names])
            for name in names:
                template_id = await builtin_template_id(agent, name)
                try:
                    await agent.template_info(template_id)
                    console.print(f"{name} is up to date ({template_id})")
                    continue
                except TemplateNotFound:
                    pass
                console.print(f"building {name} (a build capsule installs its packages: a few minutes)")
                await build_builtin(agent, name, template_id, on_log=lambda t: console.print(t, end="", markup=False))
                console.print(f"{name} built ({template_id})")
        except HostAgentError as e:
            console.print(f"[red]{e}[/]")
            raise typer.Exit(1) from e
        finally:
            await agent.close()

    data_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(run())


async def _prepare(agent) -> None:
    try:
        await agent.prepare()
    finally:
        await agent.close()


def server(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    data_dir: Annotated[Path | None, typer.Option(
        help="Where the database, capsules and snapshots live [default: $WRENN_DATA_DIR or ~/.local/share/wrenn].")] = None,
) -> None:
    """Run the whole platform on this machine: REST API + host agent, SQLite in the data directory.

    On first start it creates a default team and prints an API key once (or registers
    $WRENN_BOOTSTRAP_API_KEY). Missing images are built first."""
    from wrenn_control.config import Settings
    from wrenn_control.server import run
    from wrenn_host.agent import LocalHostAgent

    from wrenn_host import perms
    from wrenn_images.builder import cache_dir

    check_vmm_setting()
    data_dir = (data_dir or default_data_dir()).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    _build_images(force=False)
    # From here on every file (database, JWT secret, memory files, disks, logs) is 0600 in 0700
    # directories; what an older version left is closed too. (Images are built world-readable
    # first: their modes are the guests' own.)
    perms.private_umask()
    perms.lock_down(data_dir)
    perms.lock_down_cache(cache_dir())
    with console.status("preparing template snapshots (the first start boots each template once)"):
        # A throwaway agent on its own event loop: the serving one must live on uvicorn's loop.
        asyncio.run(_prepare(LocalHostAgent(data_dir)))
    agent = LocalHostAgent(data_dir)
    console.print(f"accelerator: {agent.accel}; data: {data_dir}")
    run(host, port, Settings(data_dir=data_dir), agent)
