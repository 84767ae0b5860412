"""``wrenn template build|list|delete``: build templates from a Dockerfile or a Wrenn recipe.

``build`` sends the file (and ``--context DIR`` as a tar) to ``POST /v1/builds``, then follows the
build's Server-Sent Events log: step i/n in a progress bar, the log as it comes. Ctrl-C cancels
the build. Exit status 1 when the build fails.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from wrenn_cli.client import JsonFlag, _fail, _print_json, err, out, snapshot_delete, snapshot_list

template_app = typer.Typer(help="Build templates from a Dockerfile or a Wrenn recipe; list and delete them.",
                           no_args_is_help=True)

DEFAULT_BASE_URL = "https://app.wrenn.dev/api"


def _http() -> httpx.Client:
    key = os.environ.get("WRENN_API_KEY")
    if not key:
        _fail("no API key. Set WRENN_API_KEY (and WRENN_BASE_URL=http://HOST:PORT/api for a self-hosted server).")
    base = (os.environ.get("WRENN_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
    return httpx.Client(base_url=base, headers={"X-API-Key": key}, timeout=httpx.Timeout(60, read=None))


def _check(resp: httpx.Response) -> Any:
    if resp.status_code >= 400:
        try:
            e = resp.json()["error"]
            _fail(f"{e['code']}: {e['message']}")
        except (ValueError, KeyError, TypeError):
            _fail(f"HTTP {resp.status_code}: {resp.text[:500]}")
    return resp.json() if resp.content else None


def is_dockerfile(path: Path, text: str) -> bool:
    """A Dockerfile starts (after comments and ARGs) with FROM; a recipe has one step per line."""
    if "dockerfile" in path.name.lower():
        return True
    for line in text.splitlines():
        word = line.strip().split(" ", 1)[0].upper()
        if word and not word.startswith("#") and word != "ARG":
            return word == "FROM"
    return False


def recipe_steps(text: str) -> list[str]:
    """One step per line; `#` comments and blank lines skipped; a trailing `\\` continues a line."""
    steps, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.strip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.strip()[:-1].strip() + " "
            continue
        steps.append((buf + line.strip()).strip())
        buf = ""
    if buf.strip():
        steps.append(buf.strip())
    return steps


def context_tar(directory: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for p in sorted(directory.rglob("*")):
            if p.is_file() or p.is_dir():
                tar.add(p, arcname=str(p.relative_to(directory)), recursive=False)
    return buf.getvalue()


def _events(resp: httpx.Response):
    kind, data = None, []
    for line in resp.iter_lines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif not line and kind:
            yield kind, json.loads("\n".join(data))
            kind, data = None, []


@template_app.command("build")
def template_build(
    name: Annotated[str, typer.Argument(help="Name of the template to make.", show_default=False)],
    file: Annotated[Path, typer.Option("-f", "--file", help="A Dockerfile, or a Wrenn recipe (one step a line).",
                                       exists=True, dir_okay=False)],
    context: Annotated[Path | None, typer.Option("--context", help="Directory whose files COPY can take.",
                                                 exists=True, file_okay=False)] = None,
    healthcheck: Annotated[str | None, typer.Option(
        help="'--interval=5s --timeout=5s --start-period=60s --retries=5 CMD...': must pass before the snapshot.")] = None,
    base: Annotated[str | None, typer.Option(help="Base template of a recipe (default minimal).")] = None,
    vcpus: Annotated[int | None, typer.Option(help="vCPUs of the build capsule and template.")] = None,
    memory_mb: Annotated[int | None, typer.Option(help="Memory (MiB) of the build capsule and template.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Build a template: steps run in a build capsule, then it is snapshotted with its START
    processes running. Unchanged leading steps come from the step cache."""
    text = file.read_text()
    body: dict[str, Any] = {"name": name}
    if is_dockerfile(file, text):
        body["dockerfile"] = text
    else:
        body["recipe"] = recipe_steps(text)
    for key, value in (("healthcheck", healthcheck), ("base_template", base), ("vcpus", vcpus),
                       ("memory_mb", memory_mb)):
        if value is not None:
            body[key] = value
    with _http() as http:
        if context is not None:
            resp = http.post("/v1/builds", files={"build": (None, json.dumps(body)),
                                                  "context": ("context.tar.gz", context_tar(context))})
        else:
            resp = http.post("/v1/builds", json=body)
        build = _check(resp)
        final = None
        try:
            final = _follow(http, build, quiet=as_json)
        except KeyboardInterrupt:
            err.print(f"cancelling build {build['id']}...")
            final = _check(http.post(f"/v1/builds/{build['id']}/cancel"))
        if final is None:  # the stream broke: ask for the outcome
            final = _check(http.get(f"/v1/builds/{build['id']}"))
    if as_json:
        _print_json(final)
    elif final["status"] == "success":
        cached = f" ({final['cached_steps']} step(s) from the cache)" if final.get("cached_steps") else ""
        out.print(f"Built template {name}{cached}: wrenn capsule create --template {name}", markup=False)
    if final["status"] != "success":
        _fail(f"build {final['id']} {final['status']}: {final.get('error') or ''}")


def _follow(http: httpx.Client, build: dict[str, Any], *, quiet: bool) -> dict[str, Any] | None:
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True, disable=quiet) as progress:
        task = progress.add_task(f"building {build['name']}", total=build["total_steps"])
        with http.stream("GET", f"/v1/builds/{build['id']}/logs") as resp:
            if resp.status_code >= 400:
                resp.read()
                _check(resp)
            for kind, data in _events(resp):
                if kind == "log" and not quiet:
                    progress.console.print(data["data"], end="", markup=False, highlight=False)
                elif kind == "step":
                    progress.update(task, completed=data["current_step"] - 1,
                                    description=f"step {data['current_step']}/{data['total_steps']}")
                elif kind == "end":
                    progress.update(task, completed=data["total_steps"] if data["status"] == "success" else None)
                    return data
    return None


@template_app.command("list")
def template_list(type: Annotated[str | None, typer.Option("--type", help="Only 'base' or 'snapshot'.")] = None,
                  as_json: JsonFlag = False) -> None:
    """List templates: built-in ones and the team's (built or snapshotted)."""
    snapshot_list(type=type, as_json=as_json)


@template_app.command("delete")
def template_delete(name: Annotated[str, typer.Argument(help="Template name.", show_default=False)],
                    as_json: JsonFlag = False) -> None:
    """Delete one of the team's templates."""
    snapshot_delete(name=name, as_json=as_json)


@template_app.command("builds")
def template_builds(as_json: JsonFlag = False) -> None:
    """The team's builds, newest first."""
    with _http() as http:
        builds = _check(http.get("/v1/builds"))
    if as_json:
        _print_json(builds)
        return
    for b in builds:
        out.print(f"{b['id']}  {b['name']:<24} {b['status']:<10} step {b['current_step']}/{b['total_steps']}  "
                  f"{b['created_at']}  {b.get('error') or ''}", markup=False)
