"""Built-in templates made by a build (the same mechanism as users' builds) on first use, or by
`wrenn images build --with NAME`.

code-runner-beta: what `wrenn.code_runner.Capsule` uses. A Jupyter server on port 8888 without a
token (it is reached only through the port proxy, whose URL holds the capsule id) and one kernel of
the `wrenn` kernelspec already started when the template is snapshotted, so the first `run_code`
does not pay for a kernel start.
"""

from __future__ import annotations

import dataclasses

JUPYTER = "/opt/wrenn/jupyter"  # a venv: pip may not install into Debian's own python


@dataclasses.dataclass(frozen=True)
class BuiltinBuild:
    base: str
    recipe: tuple[str, ...]
    healthcheck: str | None
    vcpus: int = 1
    memory_mb: int = 1024


_START_KERNEL = (
    "import json, time, urllib.request\n"
    "url = 'http://127.0.0.1:8888/api/kernels'\n"
    "for _ in range(600):\n"
    "    try:\n"
    "        kernels = json.load(urllib.request.urlopen(url, timeout=5))\n"
    "        break\n"
    "    except OSError:\n"
    "        time.sleep(0.5)\n"
    "else:\n"
    "    raise SystemExit('jupyter server did not come up')\n"
    "if not any(k['name'] == 'wrenn' for k in kernels):\n"
    "    req = urllib.request.Request(url, data=json.dumps({'name': 'wrenn'}).encode(), method='POST',\n"
    "                                 headers={'Content-Type': 'application/json'})\n"
    "    print(json.load(urllib.request.urlopen(req, timeout=120)))\n"
)

BUILTIN_BUILDS: dict[str, BuiltinBuild] = {
    "code-runner-beta": BuiltinBuild(
        base="base-python",
        recipe=(
            f"RUN --timeout=30m python3 -m venv {JUPYTER} && {JUPYTER}/bin/pip install --no-cache-dir "
            "--disable-pip-version-check jupyter-server==2.14.2 ipykernel==6.29.5",
            # kernelspec `wrenn` in a system path every Jupyter looks in
            f"RUN {JUPYTER}/bin/python -m ipykernel install --prefix /usr/local --name wrenn "
            "--display-name 'Python 3 (Wrenn)'",
            "WORKDIR /root",
            f"START {JUPYTER}/bin/jupyter server --no-browser --allow-root --ip=127.0.0.1 --port=8888 "
            "--ServerApp.token= --ServerApp.password= --ServerApp.disable_check_xsrf=True "
            # the port proxy keeps the client's Host (8888-<id>.<domain>): not a local name to Jupyter
            "--ServerApp.allow_origin=* --ServerApp.allow_remote_access=True --ServerApp.root_dir=/root",
            "RUN python3 -c " + __import__("shlex").quote(_START_KERNEL),
        ),
        healthcheck="--interval=1s --timeout=10s --start-period=120s --retries=10 "
                    "curl -sf http://127.0.0.1:8888/api/kernels | grep -q '\"wrenn\"'",
    ),
}


async def builtin_build_shape(builds, name: str, body) -> tuple[str, int, int]:
    """(template id, vcpus, memory_mb) of a capsule made from built-in build `name`: a snapshot, so
    its shape is fixed (a different one asked for is refused)."""
    from wrenn_control.errors import invalid

    b = BUILTIN_BUILDS[name]
    for field, fixed in (("vcpus", b.vcpus), ("memory_mb", b.memory_mb)):
        asked = getattr(body, field, None)
        if asked is not None and asked != fixed:
            raise invalid(f"template {name!r} is a snapshot with {field}={fixed}; it cannot be changed "
                          f"(got {asked}); omit {field}")
    return await builds.builtin_template_id(name), b.vcpus, b.memory_mb
