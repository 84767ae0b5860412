"""The client half of the ``wrenn`` command: ``wrenn capsule ...`` and ``wrenn snapshot ...``.

Every command talks to the server through the ``wrenn`` SDK, configured by the
``WRENN_API_KEY`` and ``WRENN_BASE_URL`` environment variables. SDK errors become a one-line
message on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any, NoReturn

import typer
from pydantic import BaseModel
from rich import box
from rich.console import Console
from rich.table import Table

from wrenn import CapsuleInfo, Commands, Template, WrennClient, WrennError

__all__ = ["capsule_app", "snapshot_app"]

_ENV_HELP = (
    "Needs WRENN_API_KEY (a wrn_... key); WRENN_BASE_URL selects the server "
    "(default https://app.wrenn.dev/api)."
)

capsule_app = typer.Typer(
    help=f"Create, inspect and drive capsules (microVM sandboxes). {_ENV_HELP}",
    no_args_is_help=True,
)
snapshot_app = typer.Typer(
    help=f"Create, list and delete snapshot templates of capsules. {_ENV_HELP}",
    no_args_is_help=True,
)

# Piped output is not cut to 80 columns: ids and timestamps must survive `| grep`.
out = Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of human output.")]
CapsuleId = Annotated[str, typer.Argument(help="Capsule ID, e.g. cl-abc123.", show_default=False)]


def _fail(message: str) -> NoReturn:
    err.print(f"Error: {message}", markup=False, soft_wrap=True)
    raise typer.Exit(1)


@contextmanager
def _api() -> Iterator[WrennClient]:
    """A client from the environment; SDK errors become one line on stderr and exit 1."""
    if not os.environ.get("WRENN_API_KEY"):
        _fail(
            "no API key. Set WRENN_API_KEY, e.g. `export WRENN_API_KEY=wrn_...` "
            "(and WRENN_BASE_URL=http://HOST:PORT/api for a self-hosted server)."
        )
    try:
        with WrennClient() as client:
            yield client
    except WrennError as exc:
        _fail(f"{exc.code}: {exc.message}")


def _print_json(value: Any) -> None:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    elif isinstance(value, list):
        value = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
    typer.echo(json.dumps(value, indent=2))


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _text(value: Any) -> str:
    return "-" if value is None else str(value)


def _capsule_table(capsules: list[CapsuleInfo]) -> Table:
    table = Table(box=box.SIMPLE, header_style="bold")
    table.add_column("ID", no_wrap=True)
    table.add_column("STATUS", no_wrap=True)
    table.add_column("TEMPLATE")
    table.add_column("VCPUS", justify="right")
    table.add_column("MEM MiB", justify="right")
    table.add_column("CREATED (UTC)", no_wrap=True)
    for c in capsules:
        table.add_row(
            c.id,
            _text(c.status),
            _text(c.template),
            _text(c.vcpus),
            _text(c.memory_mb),
            _when(c.created_at),
        )
    return table


def _capsule_detail(info: CapsuleInfo) -> Table:
    table = Table(box=box.SIMPLE, show_header=False)
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value")
    for name, value in info:
        if name == "metadata" and value:
            value = ", ".join(f"{k}={v}" for k, v in sorted(value.items()))
        elif name == "network" and value is not None:
            value = f"allow_out={value.allow_out} deny_out={value.deny_out}"
        elif isinstance(value, datetime):
            value = value.isoformat()
        table.add_row(name, _text(value))
    return table


def _show_capsule(info: CapsuleInfo, as_json: bool, verb: str) -> None:
    if as_json:
        _print_json(info)
    else:
        out.print(f"{verb} {info.id} (status: {info.status})", markup=False)


# --- wrenn capsule ---------------------------------------------------------------------------

AllowOut = Annotated[
    list[str] | None,
    typer.Option("--allow-out", help="Allow an IPv4 address, CIDR or domain (*.example.com); repeatable."),
]
DenyOut = Annotated[
    list[str] | None,
    typer.Option("--deny-out", help="Deny an IPv4 address, CIDR or domain; repeatable."),
]


@capsule_app.command("create")
def capsule_create(
    template: Annotated[
        str | None,
        typer.Option(help="Template or snapshot to boot from (server default: minimal)."),
    ] = None,
    vcpus: Annotated[int | None, typer.Option(help="Virtual CPUs (server default: 1).")] = None,
    memory_mb: Annotated[
        int | None, typer.Option("--memory-mb", help="Memory in MiB (server default: 512).")
    ] = None,
    timeout: Annotated[
        int | None,
        typer.Option(help="Inactivity TTL in seconds before auto-pause; 0 disables it."),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Wait until the capsule is running.")
    ] = True,
    internet: Annotated[
        bool, typer.Option("--internet/--no-internet", help="Outbound internet (allow-out entries still apply).")
    ] = True,
    allow_out: AllowOut = None,
    deny_out: DenyOut = None,
    as_json: JsonFlag = False,
) -> None:
    """Create a capsule and print its ID."""
    network = _rules(allow_out, deny_out)
    with _api() as client:
        info = client.capsules.create(template, vcpus, memory_mb, timeout,
                                      allow_internet_access=None if internet else False, network=network)
        if wait:
            try:
                info = client.capsules.wait(info.id)
            except WrennError as exc:
                _fail(f"{exc.code}: {exc.message} (capsule {info.id})")
    if as_json:
        _print_json(info)
    else:
        # Only the id on stdout, so `ID=$(wrenn capsule create)` works; the rest is for people.
        err.print(f"Created {info.id} (status: {info.status})", markup=False)
        out.print(info.id, markup=False)


@capsule_app.command("network")
def capsule_network(
    capsule_id: CapsuleId,
    internet: Annotated[
        bool | None, typer.Option("--internet/--no-internet", help="Open or close outbound internet.")
    ] = None,
    allow_out: AllowOut = None,
    deny_out: DenyOut = None,
    as_json: JsonFlag = False,
) -> None:
    """Change a running or paused capsule's egress rules (given lists replace the old ones)."""
    with _api() as client:
        info = client.capsules.update_network(capsule_id, allow_internet_access=internet,
                                              network=_rules(allow_out, deny_out))
    if as_json:
        _print_json(info)
    else:
        rules = info.network
        out.print(f"{info.id}: internet {'on' if info.allow_internet_access else 'off'}; "
                  f"allow_out {rules.allow_out if rules else []}; deny_out {rules.deny_out if rules else []}",
                  markup=False)


def _rules(allow_out: list[str] | None, deny_out: list[str] | None) -> dict[str, list[str]] | None:
    rules = {k: v for k, v in (("allow_out", allow_out), ("deny_out", deny_out)) if v is not None}
    return rules or None


@capsule_app.command("list")
def capsule_list(as_json: JsonFlag = False) -> None:
    """List the team's capsules, newest first."""
    with _api() as client:
        capsules = client.capsules.list()
    if as_json:
        _print_json(capsules)
    elif not capsules:
        out.print("No capsules.")
    else:
        out.print(_capsule_table(capsules))


@capsule_app.command("get")
def capsule_get(capsule_id: CapsuleId, as_json: JsonFlag = False) -> None:
    """Show one capsule's details."""
    with _api() as client:
        info = client.capsules.get(capsule_id)
    if as_json:
        _print_json(info)
    else:
        out.print(_capsule_detail(info))


@capsule_app.command("exec")
def capsule_exec(
    capsule_id: CapsuleId,
    command: Annotated[
        list[str],
        typer.Argument(
            help="Command to run, after `--`. One argument is a shell command line "
            "(pipes work); several are quoted and joined.",
            show_default=False,
        ),
    ],
    timeout: Annotated[int, typer.Option(help="Seconds before the command is killed.")] = 30,
    cwd: Annotated[str | None, typer.Option(help="Working directory.")] = None,
    env: Annotated[
        list[str] | None,
        typer.Option("--env", "-e", help="Environment variable KEY=VALUE; repeatable."),
    ] = None,
    as_json: JsonFlag = False,
    stream: Annotated[
        bool,
        typer.Option(
            "--stream",
            help="Print output as it is produced (over a WebSocket) instead of at the end; "
            "with --json, one JSON event per line. --timeout 0 lets it run until it ends.",
        ),
    ] = False,
) -> None:
    """Run a command in a running capsule, e.g. `wrenn capsule exec cl-abc123 -- ls -l /`.

    Prints the command's stdout and stderr and exits with its exit code.
    """
    envs: dict[str, str] = {}
    for item in env or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"--env expects KEY=VALUE, got {item!r}")
        envs[key] = value
    line = command[0] if len(command) == 1 else shlex.join(command)
    if stream:
        _exec_streamed(capsule_id, line, timeout, cwd, envs, as_json)
        return
    with _api() as client:
        result = Commands(capsule_id, client).run(line, timeout=timeout, envs=envs or None, cwd=cwd)
    if as_json:
        _print_json(result.model_dump(mode="json", exclude={"stdout_bytes", "stderr_bytes"}))
    else:
        # Write the exact bytes: the output may not be text.
        for stream, data in ((sys.stdout, result.stdout_bytes), (sys.stderr, result.stderr_bytes)):
            stream.flush()
            stream.buffer.write(data)
            stream.buffer.flush()
    code = result.exit_code
    raise typer.Exit(code if 0 <= code <= 255 else 1)


def _exec_streamed(
    capsule_id: str, line: str, timeout: int, cwd: str | None, envs: dict[str, str], as_json: bool
) -> NoReturn:
    code: int | None = None
    with _api() as client:
        events = Commands(capsule_id, client).stream(
            line, envs=envs or None, cwd=cwd, timeout=timeout if timeout > 0 else None
        )
        try:
            for event in events:
                if as_json:
                    typer.echo(json.dumps({"type": event.type, **_event_fields(event)}))
                elif event.type in ("stdout", "stderr"):
                    target = sys.stdout if event.type == "stdout" else sys.stderr
                    target.buffer.write(event.data.encode("utf-8"))  # type: ignore[attr-defined]
                    target.buffer.flush()
                if event.type == "exit":
                    code = event.exit_code  # type: ignore[attr-defined]
                elif event.type == "error" and not as_json:
                    _fail(event.data)  # type: ignore[attr-defined]
        except KeyboardInterrupt:  # leaving the stream kills the command
            events.close()
            raise typer.Exit(130) from None
    if code is None:
        raise typer.Exit(1)
    raise typer.Exit(code if 0 <= code <= 255 else 1)


def _event_fields(event: object) -> dict[str, Any]:
    return {k: getattr(event, k) for k in ("pid", "data", "exit_code") if hasattr(event, k)}


@capsule_app.command("shell")
def capsule_shell(
    capsule_id: CapsuleId,
    cmd: Annotated[str, typer.Option("--cmd", help="Program to run on the terminal.")] = "/bin/bash",
    attach: Annotated[
        str | None,
        typer.Option("--attach", help="Attach to a running PTY session by its tag instead."),
    ] = None,
    tag: Annotated[
        str | None, typer.Option("--tag", help="Name for the new session (default: generated).")
    ] = None,
    cwd: Annotated[str | None, typer.Option(help="Working directory.")] = None,
) -> None:
    """Open an interactive terminal in a running capsule (exit the shell to leave).

    Ctrl-] detaches and leaves the session running; `--attach TAG` comes back to it.
    """
    from wrenn import Capsule
    from wrenn_cli.shell import exit_status, run_shell, terminal_size

    cols, rows = terminal_size(sys.stdout.fileno())
    with _api() as client:
        capsule = Capsule(_capsule_id=capsule_id, _client=client)
        if attach:
            session = capsule.pty_connect(attach)
        else:
            session = capsule.pty(cmd, cols=cols, rows=rows, cwd=cwd, tag=tag)
        with session:
            if attach:  # the size may differ from the last client's
                session.resize(cols, rows)
            result = run_shell(session)
    how = f"wrenn capsule shell {capsule_id} --attach {session.tag}"
    if result.detached:
        err.print(f"\nDetached; the session keeps running. Back with: {how}", markup=False)
        raise typer.Exit(0)
    if result.error is not None:
        _fail(f"{result.error} (if the session still runs: {how})")
    if result.exit_code is None:
        _fail(f"connection lost; the session may still run: {how}")
    raise typer.Exit(exit_status(result.exit_code))


@capsule_app.command("pause")
def capsule_pause(capsule_id: CapsuleId, as_json: JsonFlag = False) -> None:
    """Pause a running capsule: memory and disk are saved, compute is freed."""
    with _api() as client:
        info = client.capsules.pause(capsule_id)
    _show_capsule(info, as_json, "Paused")


@capsule_app.command("resume")
def capsule_resume(capsule_id: CapsuleId, as_json: JsonFlag = False) -> None:
    """Resume a paused capsule exactly where it was paused."""
    with _api() as client:
        info = client.capsules.resume(capsule_id)
    _show_capsule(info, as_json, "Resumed")


@capsule_app.command("ping")
def capsule_ping(capsule_id: CapsuleId, as_json: JsonFlag = False) -> None:
    """Reset a capsule's inactivity timer so it is not auto-paused."""
    with _api() as client:
        client.capsules.ping(capsule_id)
    if as_json:
        _print_json({"id": capsule_id, "pinged": True})
    else:
        out.print(f"Pinged {capsule_id}", markup=False)


@capsule_app.command("destroy")
def capsule_destroy(capsule_id: CapsuleId, as_json: JsonFlag = False) -> None:
    """Destroy a capsule permanently."""
    with _api() as client:
        client.capsules.destroy(capsule_id)
    if as_json:
        _print_json({"id": capsule_id, "destroyed": True})
    else:
        out.print(f"Destroyed {capsule_id}", markup=False)


# --- wrenn snapshot --------------------------------------------------------------------------


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


@snapshot_app.command("create")
def snapshot_create(
    capsule_id: CapsuleId,
    name: Annotated[
        str | None, typer.Option(help="Template name (default: generated, template-xxxxxxxx).")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing snapshot of that name.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Snapshot a running or paused capsule into a template (the capsule is left paused).

    Boot copies with `wrenn capsule create --template NAME`.
    """
    with _api() as client:
        template = client.snapshots.create(capsule_id, name=name, overwrite=overwrite)
    if as_json:
        _print_json(template)
    else:
        out.print(f"Created snapshot {template.name} from {capsule_id}", markup=False)


@snapshot_app.command("list")
def snapshot_list(
    type: Annotated[
        str | None, typer.Option("--type", help="Only 'base' or only 'snapshot' templates.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """List templates: the built-in ones and the team's snapshots."""
    with _api() as client:
        templates = client.snapshots.list(type=type)
    if as_json:
        _print_json(templates)
        return
    if not templates:
        out.print("No templates.")
        return
    out.print(_template_table(templates))


def _template_table(templates: list[Template]) -> Table:
    table = Table(box=box.SIMPLE, header_style="bold")
    table.add_column("NAME", no_wrap=True)
    table.add_column("TYPE", no_wrap=True)
    table.add_column("VCPUS", justify="right")
    table.add_column("MEM MiB", justify="right")
    table.add_column("SIZE", justify="right", no_wrap=True)
    table.add_column("CREATED (UTC)", no_wrap=True)
    for t in templates:
        table.add_row(
            t.name,
            _text(t.type),
            _text(t.vcpus),
            _text(t.memory_mb),
            _size(t.size_bytes),
            _when(t.created_at),
        )
    return table


@snapshot_app.command("delete")
def snapshot_delete(
    name: Annotated[str, typer.Argument(help="Snapshot template name.", show_default=False)],
    as_json: JsonFlag = False,
) -> None:
    """Delete a snapshot template (built-in templates cannot be deleted)."""
    with _api() as client:
        client.snapshots.delete(name)
    if as_json:
        _print_json({"name": name, "deleted": True})
    else:
        out.print(f"Deleted snapshot {name}", markup=False)
