"""Template builds on real VMs, through `wrenn server`: a Dockerfile and a recipe each give a
template whose capsules have the package, the file, the env, the cwd, the user and the server
already answering through the port proxy; a failing step, a bad instruction and a cancel give the
documented result and leave no VM behind; a rebuild takes its first steps from the step cache."""

from __future__ import annotations

import io
import json
import tarfile
import time
from typing import Any

import pytest

from tests.conftest import qemu_pids
from tests.e2e.test_api_capsules import Api, assert_error

pytestmark = pytest.mark.vm

APT = "RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends jq"
DOCKERFILE = f"""\
FROM minimal
{APT}
RUN useradd --create-home --shell /bin/sh app
COPY hello.txt /srv/site/
ENV GREETING=hello-from-env
WORKDIR /srv/site
USER app
EXPOSE 8000
HEALTHCHECK --interval=1s --timeout=5s --start-period=30s --retries=3 CMD curl -sf http://127.0.0.1:8000/hello.txt
CMD ["python3", "-m", "http.server", "8000"]
"""
RECIPE = [APT, "RUN useradd --create-home --shell /bin/sh app", "COPY hello.txt /srv/site/",
          "ENV GREETING=hello-from-env", "WORKDIR /srv/site", "USER app", "START python3 -m http.server 8000"]
HEALTHCHECK = "--interval=1s --timeout=5s --start-period=30s --retries=3 curl -sf http://127.0.0.1:8000/hello.txt"


def context(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def api(wrenn_server):
    a = Api(wrenn_server)
    yield a
    for cid in a.created:
        a.delete(f"/v1/capsules/{cid}")
    a.http.close()


def submit(api: Api, body: dict[str, Any], files: dict[str, bytes] | None = None) -> dict[str, Any]:
    if files is None:
        resp = api.post("/v1/builds", json=body)
    else:
        resp = api.post("/v1/builds", files={"build": (None, json.dumps(body)),
                                             "context": ("context.tar.gz", context(files))})
    assert resp.status_code == 202, resp.text
    return resp.json()


def wait_build(api: Api, build_id: str, timeout: float = 480) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        b = api.get(f"/v1/builds/{build_id}").json()
        if b["status"] in ("success", "failed", "cancelled"):
            return b
        assert time.monotonic() < deadline, f"build not done after {timeout}s: {b['logs'][-20:]}"
        time.sleep(0.5)


def no_build_vm(build_id: str) -> None:
    assert qemu_pids("bld-" + build_id.removeprefix("bld-")) == []


def check_template(api: Api, name: str) -> None:
    """A new capsule of the template: jq, the file, env, cwd, user, and the server already up."""
    assert name in {t["name"] for t in api.get("/v1/snapshots").json()}
    cap = api.create(template=name)
    api.wait(cap["id"])
    cid = cap["id"]

    def sh(line: str, **extra: Any) -> str:
        r = api.post(f"/v1/capsules/{cid}/exec", json={"cmd": "/bin/sh", "args": ["-c", line], **extra})
        assert r.status_code == 200, r.text
        assert r.json()["exit_code"] == 0, r.json()
        return r.json()["stdout"]

    assert sh("echo '{\"a\": 41}' | jq .a") == "41\n"
    assert sh('id -un; pwd; echo "$GREETING"; cat hello.txt') == "app\n/srv/site\nhello-from-env\nhello build\n"
    assert sh("pwd", cwd="/tmp") == "/tmp\n"  # the exec's own cwd wins
    assert sh('echo "$GREETING"', envs={"GREETING": "mine"}) == "mine\n"
    # the server was started before the snapshot: it answers at once, through the port proxy
    resp = api.http.get(f"http://127.0.0.1:{api.server.port}/hello.txt",
                        headers={"Host": f"8000-{cid}.localhost:{api.server.port}"})
    assert resp.status_code == 200 and resp.text == "hello build\n", (resp.status_code, resp.text[:300])
    # files: relative paths from the WORKDIR, new files belong to the USER
    w = api.post(f"/v1/capsules/{cid}/files/write", files={"file": ("n.txt", b"x")}, data={"path": "/tmp/n.txt"})
    assert w.status_code == 204, w.text
    assert api.post(f"/v1/capsules/{cid}/files/read", json={"path": "hello.txt"}).content == b"hello build\n"
    assert sh("stat -c %U /tmp/n.txt") == "app\n"
    api.delete(f"/v1/capsules/{cid}")


def test_dockerfile_build_then_recipe_build_from_the_step_cache(api):
    first = submit(api, {"name": "web-docker", "dockerfile": DOCKERFILE}, {"hello.txt": b"hello build\n"})
    assert first["total_steps"] == 7 and first["base_template"] == "minimal"
    done = wait_build(api, first["id"])
    assert done["status"] == "success", (done["error"], done["logs"][-30:])
    assert done["cached_steps"] == 0 and done["current_step"] == 7
    no_build_vm(first["id"])
    check_template(api, "web-docker")

    # The same first steps as a recipe: they come from the Dockerfile build's cache layers.
    second = submit(api, {"name": "web-recipe", "recipe": RECIPE, "healthcheck": HEALTHCHECK},
                    {"hello.txt": b"hello build\n"})
    done = wait_build(api, second["id"])
    assert done["status"] == "success", (done["error"], done["logs"][-30:])
    assert done["cached_steps"] >= 3, done["logs"]
    no_build_vm(second["id"])
    check_template(api, "web-recipe")
    assert api.delete("/v1/snapshots/web-recipe").status_code == 204
    assert "web-recipe" not in {t["name"] for t in api.get("/v1/snapshots").json()}


def test_failing_step_bad_instruction_and_cancel(api):
    failing = submit(api, {"name": "fails", "recipe": ["RUN echo about to fail; echo boom >&2; exit 7",
                                                       "RUN echo never"]})
    done = wait_build(api, failing["id"])
    assert done["status"] == "failed"
    assert "exit code 7" in done["error"] and "boom" in done["error"], done["error"]
    no_build_vm(failing["id"])
    assert "fails" not in {t["name"] for t in api.get("/v1/snapshots").json()}

    bad = api.post("/v1/builds", json={"name": "bad", "dockerfile": "FROM minimal\nRUN true\nVOLUME /data\n"})
    assert "line 3 (VOLUME)" in assert_error(bad, 400, "invalid_request")["message"]

    slow = submit(api, {"name": "slow", "recipe": ["RUN sleep 300"]})
    deadline = time.monotonic() + 120
    while api.get(f"/v1/builds/{slow['id']}").json()["current_step"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    started = time.monotonic()
    resp = api.post(f"/v1/builds/{slow['id']}/cancel")
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled", resp.text
    print(f"cancel took {time.monotonic() - started:.2f}s")
    no_build_vm(slow["id"])
    assert_error(api.post(f"/v1/builds/{slow['id']}/cancel"), 409, "invalid_state")


def test_cli_template_build_list_delete(api, tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "a.txt").write_text("from the context\n")
    recipe = tmp_path / "recipe"
    recipe.write_text("# a recipe\nRUN echo building\nCOPY a.txt /opt/a.txt\nRUN cat /opt/a.txt\n")
    env = dict(os.environ, WRENN_API_KEY=api.server.api_key, WRENN_BASE_URL=api.server.base_url)

    def wrenn(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "wrenn_cli.main", *args], env=env, capture_output=True,
                              text=True, timeout=300)

    built = wrenn("template", "build", "cli-built", "-f", str(recipe), "--context", str(tmp_path / "ctx"))
    assert built.returncode == 0, built.stderr
    assert "Built template cli-built" in built.stdout
    assert "step 3/3: RUN cat /opt/a.txt" in built.stderr and "from the context" in built.stderr  # the live log
    assert "cli-built" in wrenn("template", "list").stdout
    failed = wrenn("template", "build", "cli-fails", "-f", str(recipe))  # COPY without a context
    assert failed.returncode == 1 and "build context" in failed.stderr
    assert wrenn("template", "delete", "cli-built").returncode == 0
    assert "cli-built" not in wrenn("template", "list").stdout
