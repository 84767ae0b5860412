"""Every curl example of the spec pages, run with curl exactly as written: only the base URL, the key
and the example capsule id are replaced. The answers are checked against the page: status code,
and the fields (and types) of the page's example response. The pages' error tables are checked
the same way, with the same command and a wrong key or an unknown id."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_api_capsules import Api, assert_error, check_capsule, other_team  # noqa: F401 (fixture)

pytestmark = pytest.mark.vm

SPEC_DIR = next((d for d in (Path(__file__).resolve().parents[2] / "docs" / "spec", Path("/work/shared/spec"))
                 if d.is_dir()), Path("/work/shared/spec"))
SPEC_BASE = "https://app.wrenn.dev/api"
SPEC_KEY = "wrn_your_key"
SPEC_ID = "cl-abc123"
UNKNOWN_ID = "cl-" + "0" * 25


def page(prefix: str) -> str:
    return next(SPEC_DIR.glob(f"{prefix}_*.txt")).read_text()


def curl_examples(text: str) -> list[str]:
    """The curl commands of a page: from a line starting with `curl` for as long as lines end in a
    backslash or a single quote is still open."""
    lines = text.splitlines()
    out = []
    i = 0
    while i < len(lines):
        if not lines[i].startswith("curl "):
            i += 1
            continue
        block = [lines[i]]
        while block[-1].endswith("\\") or "\n".join(block).count("'") % 2:
            i += 1
            block.append(lines[i])
        out.append("\n".join(block))
        i += 1
    return out


def example_response(text: str) -> Any:
    """The JSON after "Example response" on a page."""
    start = text.index("Example response")
    body = text[start:].split("\n", 1)[1].lstrip()
    value, _ = json.JSONDecoder().raw_decode(body)
    return value


def run_curl(command: str, base_url: str, key: str, capsule_id: str = SPEC_ID) -> tuple[int, Any]:
    assert SPEC_BASE in command and SPEC_KEY in command
    command = command.replace(SPEC_BASE, base_url).replace(SPEC_KEY, key).replace(SPEC_ID, capsule_id)
    # Only output options are added: the status code on a last line of its own.
    full = f"{command} --silent --show-error --write-out {shlex.quote(chr(10) + '%{http_code}')}"
    proc = subprocess.run(["bash", "-c", full], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    body, _, status = proc.stdout.rpartition("\n")
    return int(status), json.loads(body) if body.strip() else None


def same_shape(example: dict[str, Any], actual: dict[str, Any], nullable: set[str] = frozenset()) -> None:
    """Every field of the page's example is in the answer, with the same JSON type."""
    missing = set(example) - set(actual)
    assert not missing, f"fields of the spec example missing from the answer: {missing}"
    for key, value in example.items():
        if actual[key] is None and (value is None or key in nullable):
            continue
        if value is None:
            continue
        assert type(actual[key]) is type(value), (key, actual[key], value)


@pytest.fixture(scope="module")
def api(wrenn_server) -> Iterator[Api]:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    a = Api(wrenn_server)
    yield a
    a.cleanup()


@pytest.fixture(scope="module")
def running(api: Api) -> dict[str, Any]:
    return api.running()


def test_every_page_with_a_curl_example_is_covered() -> None:
    found = {p.name[:3]: len(curl_examples(p.read_text())) for p in sorted(SPEC_DIR.glob("*.txt"))}
    assert found == {"000": 1, "001": 1, "002": 1, "003": 1, "004": 0}, found


def test_list_capsules_example(api: Api, other_team: Api, running: dict[str, Any], wrenn_server) -> None:  # noqa: F811
    text = page("000")
    (command,) = curl_examples(text)
    status, body = run_curl(command, wrenn_server.base_url, wrenn_server.api_key)
    assert status == 200 and isinstance(body, list)
    example = example_response(text)
    for item in body:
        check_capsule(item)
        same_shape(example[0], item, nullable={"started_at", "last_active_at"})
    assert running["id"] in [c["id"] for c in body]
    # "An empty team returns []."
    assert run_curl(command, wrenn_server.base_url, other_team.http.headers["X-API-Key"]) == (200, [])
    status, body = run_curl(command, wrenn_server.base_url, "wrn_" + "f" * 32)
    assert status == 401 and body["error"]["code"] == "unauthorized"


def test_get_capsule_example(api: Api, running: dict[str, Any], wrenn_server) -> None:
    text = page("001")
    (command,) = curl_examples(text)
    status, body = run_curl(command, wrenn_server.base_url, wrenn_server.api_key, running["id"])
    assert status == 200
    check_capsule(body)
    same_shape(example_response(text), body, nullable={"last_active_at"})
    assert (body["id"], body["status"]) == (running["id"], "running")
    status, body = run_curl(command, wrenn_server.base_url, wrenn_server.api_key, UNKNOWN_ID)
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = run_curl(command, wrenn_server.base_url, "wrn_" + "f" * 32, running["id"])
    assert status == 401 and body["error"]["code"] == "unauthorized"


def test_create_capsule_example(api: Api, wrenn_server) -> None:
    text = page("002")
    (command,) = curl_examples(text)
    assert "--data" in command and '"base-python"' in command
    status, body = run_curl(command, wrenn_server.base_url, wrenn_server.api_key)
    assert status == 201, body
    api.created.append(body["id"])
    check_capsule(body)
    example = example_response(text)
    same_shape(example, body)
    assert (body["template"], body["vcpus"], body["memory_mb"], body["timeout_sec"]) == ("base-python", 2, 1024, 300)
    # `running` once booted; `starting` when this shape's first (cold) boot outlasts the server's wait
    assert body["status"] in ("running", "starting")
    assert (body["started_at"] is not None) == (body["status"] == "running")
    assert body["last_active_at"] is None
    ready = api.wait(body["id"], timeout=180)  # a new shape may need its template built once
    assert ready["started_at"] is not None
    assert api.sh(body["id"], "nproc; python3 -c 'print(6*7)'")["stdout"] == "2\n42\n"
    status, err = run_curl(command, wrenn_server.base_url, "wrn_" + "f" * 32)
    assert status == 401 and err["error"]["code"] == "unauthorized"
    api.destroy(body["id"])


def test_pause_capsule_example(api: Api, wrenn_server) -> None:
    text = page("003")
    (command,) = curl_examples(text)
    cid = api.running()["id"]
    status, body = run_curl(command, wrenn_server.base_url, wrenn_server.api_key, cid)
    assert status == 200
    check_capsule(body)
    same_shape(example_response(text), body, nullable={"last_active_at"})
    assert (body["id"], body["status"]) == (cid, "paused")
    # 409: only running capsules can be paused.
    status, err = run_curl(command, wrenn_server.base_url, wrenn_server.api_key, cid)
    assert status == 409 and err["error"]["code"] == "invalid_state"
    status, err = run_curl(command, wrenn_server.base_url, wrenn_server.api_key, UNKNOWN_ID)
    assert status == 404 and err["error"]["code"] == "not_found"
    status, err = run_curl(command, wrenn_server.base_url, "wrn_" + "f" * 32, cid)
    assert status == 401 and err["error"]["code"] == "unauthorized"
    api.destroy(cid)


def test_curl_errors_have_the_documented_shape(api: Api, wrenn_server) -> None:
    """Plain curl, as a user would type it, gets the same error bodies (and JSON without a
    Content-Type header is still read as JSON)."""
    base, key = wrenn_server.base_url, wrenn_server.api_key
    proc = subprocess.run(["curl", "-sS", "-X", "POST", f"{base}/v1/capsules", "-H", f"X-API-Key: {key}",
                           "-d", '{"vcpus": 0}'], capture_output=True, text=True, timeout=60)
    body = json.loads(proc.stdout)
    assert body["error"]["code"] == "invalid_request" and set(body["error"]) == {"code", "message"}
    resp = api.post("/v1/capsules", content=b'{"vcpus": 0}')
    assert_error(resp, 400, "invalid_request")
