"""`wrenn capsule ...` / `wrenn snapshot ...` through typer's CliRunner, with the SDK talking to
an httpx.MockTransport."""

from __future__ import annotations

import base64
import functools
import json

import httpx
import pytest
import typer
from typer.testing import CliRunner

import wrenn._wait
import wrenn_cli.client as cli
from wrenn import WrennClient
from wrenn_cli.client import capsule_app, snapshot_app

KEY = "wrn_" + "2" * 32
BASE = "http://wrenn.test/api"

app = typer.Typer()
app.add_typer(capsule_app, name="capsule")
app.add_typer(snapshot_app, name="snapshot")


def capsule(cid: str = "cl-abc123", status: str = "running", **extra: object) -> dict:
    return {
        "id": cid,
        "status": status,
        "template": "minimal",
        "vcpus": 1,
        "memory_mb": 512,
        "timeout_sec": 0,
        "created_at": "2024-11-01T10:00:00Z",
        "last_updated": "2024-11-01T10:00:05Z",
        "started_at": None,
        "last_active_at": None,
        **extra,
    }


def err(status: int, code: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message}})


class Api:
    """Routes keyed by (method, path); a value is a response or a list served in turn."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], object] = {}
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        answer = self.routes.get((request.method, request.url.path.removeprefix("/api")))
        if isinstance(answer, list):
            answer = answer.pop(0) if len(answer) > 1 else answer[0]
        if isinstance(answer, Exception):
            raise answer
        return answer or err(404, "not_found", "capsule not found")

    def body(self, i: int = -1) -> object:
        return json.loads(self.requests[i].content)


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Api:
    fake = Api()
    monkeypatch.setenv("WRENN_API_KEY", KEY)
    monkeypatch.setenv("WRENN_BASE_URL", BASE)
    monkeypatch.setattr(
        cli, "WrennClient", functools.partial(WrennClient, transport=httpx.MockTransport(fake))
    )
    monkeypatch.setattr(wrenn._wait, "_FIRST_POLL", 0.0)
    monkeypatch.setattr(wrenn._wait, "_MAX_POLL", 0.0)
    monkeypatch.setattr(wrenn._base_client._BaseClient, "_RETRY_BACKOFF", 0.0)
    return fake


runner = CliRunner()


def run(*args: str) -> object:
    return runner.invoke(app, list(args))


# --- help ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["capsule", "--help"],
            [
                "create",
                "list",
                "get",
                "exec",
                "pause",
                "resume",
                "ping",
                "destroy",
                "WRENN_API_KEY",
            ],
        ),
        (["snapshot", "--help"], ["create", "list", "delete"]),
        (
            ["capsule", "create", "--help"],
            ["--template", "--vcpus", "--memory-mb", "--timeout", "--no-wait", "--json"],
        ),
        (["capsule", "list", "--help"], ["List the team's capsules", "--json"]),
        (["capsule", "get", "--help"], ["Show one capsule"]),
        (["capsule", "exec", "--help"], ["exit code", "--timeout", "--cwd", "--env"]),
        (["capsule", "pause", "--help"], ["Pause a running capsule"]),
        (["capsule", "resume", "--help"], ["Resume a paused capsule"]),
        (["capsule", "ping", "--help"], ["inactivity timer"]),
        (["capsule", "destroy", "--help"], ["Destroy a capsule"]),
        (["snapshot", "create", "--help"], ["--name", "--overwrite", "left paused"]),
        (["snapshot", "list", "--help"], ["--type"]),
        (["snapshot", "delete", "--help"], ["Delete a snapshot template"]),
    ],
)
def test_help_texts(args: list[str], expected: list[str]) -> None:
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for text in expected:
        assert text in result.output


# --- errors --------------------------------------------------------------------------------


def test_missing_api_key_says_how_to_set_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WRENN_API_KEY", raising=False)
    result = run("capsule", "list")
    assert result.exit_code == 1
    assert "WRENN_API_KEY" in result.stderr and "export" in result.stderr
    assert "Traceback" not in result.output


def test_api_error_is_one_line_without_traceback(api: Api) -> None:
    result = run("capsule", "get", "cl-missing")
    assert result.exit_code == 1
    assert result.stderr.strip() == "Error: not_found: capsule not found"
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


def test_conflict_and_connection_errors(api: Api) -> None:
    api.routes[("POST", "/v1/capsules/cl-abc123/pause")] = err(
        409, "invalid_state", "capsule is paused"
    )
    result = run("capsule", "pause", "cl-abc123")
    assert result.exit_code == 1
    assert "invalid_state: capsule is paused" in result.stderr

    api.routes[("GET", "/v1/capsules")] = httpx.ConnectError("refused")
    result = run("capsule", "list")
    assert result.exit_code == 1
    assert "connection_error" in result.stderr and "Traceback" not in result.output


# --- capsule commands ----------------------------------------------------------------------


def test_list_table_and_json(api: Api) -> None:
    api.routes[("GET", "/v1/capsules")] = httpx.Response(
        200, json=[capsule(), capsule("cl-def456", "paused", template="base-python")]
    )
    result = runner.invoke(app, ["capsule", "list"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = next(line for line in lines if "STATUS" in line)
    assert "ID" in header and "TEMPLATE" in header
    assert any("cl-abc123" in line and "running" in line for line in lines)
    assert any("cl-def456" in line and "paused" in line and "base-python" in line for line in lines)

    result = run("capsule", "list", "--json")
    data = json.loads(result.stdout)
    assert [c["id"] for c in data] == ["cl-abc123", "cl-def456"]
    assert data[0]["created_at"] == "2024-11-01T10:00:00Z"


def test_list_empty(api: Api) -> None:
    api.routes[("GET", "/v1/capsules")] = httpx.Response(200, json=[])
    result = run("capsule", "list")
    assert result.exit_code == 0 and "No capsules" in result.stdout
    assert json.loads(run("capsule", "list", "--json").stdout) == []


def test_get(api: Api) -> None:
    api.routes[("GET", "/v1/capsules/cl-abc123")] = httpx.Response(
        200, json=capsule(metadata={"kernel_version": "6.1"}, disk_used_mb=7)
    )
    result = runner.invoke(app, ["capsule", "get", "cl-abc123"], env={"COLUMNS": "160"})
    assert result.exit_code == 0
    assert "cl-abc123" in result.stdout and "kernel_version=6.1" in result.stdout
    assert json.loads(run("capsule", "get", "cl-abc123", "--json").stdout)["disk_used_mb"] == 7


def test_create_waits_until_running(api: Api) -> None:
    api.routes[("POST", "/v1/capsules")] = httpx.Response(201, json=capsule(status="pending"))
    api.routes[("GET", "/v1/capsules/cl-abc123")] = [
        httpx.Response(200, json=capsule(status="starting")),
        httpx.Response(200, json=capsule(status="running")),
    ]
    result = run(
        "capsule",
        "create",
        "--template",
        "minimal",
        "--vcpus",
        "2",
        "--memory-mb",
        "1024",
        "--timeout",
        "60",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == "cl-abc123\n"  # only the id on stdout, for scripts
    assert "Created cl-abc123" in result.stderr and "running" in result.stderr
    assert api.body(0) == {"template": "minimal", "vcpus": 2, "memory_mb": 1024, "timeout_sec": 60}
    assert [r.method for r in api.requests] == ["POST", "GET", "GET"]


def test_create_no_wait_json(api: Api) -> None:
    api.routes[("POST", "/v1/capsules")] = httpx.Response(201, json=capsule(status="pending"))
    result = run("capsule", "create", "--no-wait", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["status"] == "pending"
    assert api.body() == {} and len(api.requests) == 1


def test_create_reports_a_failed_boot(api: Api) -> None:
    api.routes[("POST", "/v1/capsules")] = httpx.Response(201, json=capsule(status="pending"))
    api.routes[("GET", "/v1/capsules/cl-abc123")] = httpx.Response(
        200, json=capsule(status="error")
    )
    result = run("capsule", "create")
    assert result.exit_code == 1
    assert "capsule_failed" in result.stderr and "cl-abc123" in result.stderr
    assert "Traceback" not in result.output


def exec_reply(
    stdout: bytes = b"", stderr: bytes = b"", code: int = 0, encoding: str = "utf-8"
) -> httpx.Response:
    enc = (
        (lambda b: base64.b64encode(b).decode()) if encoding == "base64" else (lambda b: b.decode())
    )
    return httpx.Response(
        200,
        json={
            "sandbox_id": "cl-abc123",
            "cmd": "/bin/sh",
            "stdout": enc(stdout),
            "stderr": enc(stderr),
            "exit_code": code,
            "duration_ms": 4,
            "encoding": encoding,
        },
    )


def test_exec_prints_output_and_exits_with_its_code(api: Api) -> None:
    api.routes[("POST", "/v1/capsules/cl-abc123/exec")] = exec_reply(b"out\n", b"oops\n", 3)
    result = run("capsule", "exec", "cl-abc123", "--", "ls", "-l", "/my dir")
    assert result.exit_code == 3
    assert result.stdout == "out\n" and result.stderr == "oops\n"
    assert api.body() == {
        "cmd": "/bin/sh",
        "args": ["-c", "ls -l '/my dir'"],
        "background": False,
        "timeout_sec": 30,
    }


def test_exec_single_argument_is_a_shell_line_and_options(api: Api) -> None:
    api.routes[("POST", "/v1/capsules/cl-abc123/exec")] = exec_reply(b"\xff\x00", encoding="base64")
    result = run(
        "capsule",
        "exec",
        "--timeout",
        "5",
        "--cwd",
        "/tmp",
        "-e",
        "A=1",
        "-e",
        "B=x=y",
        "cl-abc123",
        "--",
        "echo $A | wc -c",
    )
    assert result.exit_code == 0
    assert result.stdout_bytes == b"\xff\x00"  # binary output written as is
    body = api.body()
    assert body["args"] == ["-c", "echo $A | wc -c"]
    assert (body["timeout_sec"], body["cwd"], body["envs"]) == (5, "/tmp", {"A": "1", "B": "x=y"})


def test_exec_json_and_bad_env(api: Api) -> None:
    api.routes[("POST", "/v1/capsules/cl-abc123/exec")] = exec_reply(b"hi\n", code=1)
    result = run("capsule", "exec", "--json", "cl-abc123", "--", "false")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["stdout"] == "hi\n"

    result = run("capsule", "exec", "-e", "NOEQUALS", "cl-abc123", "--", "true")
    assert result.exit_code == 1 and "KEY=VALUE" in result.stderr


def test_exec_on_paused_capsule(api: Api) -> None:
    api.routes[("POST", "/v1/capsules/cl-abc123/exec")] = err(
        409, "invalid_state", "capsule is paused; it must be running"
    )
    result = run("capsule", "exec", "cl-abc123", "--", "true")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: invalid_state: capsule is paused")


def test_pause_resume_ping_destroy(api: Api) -> None:
    api.routes[("POST", "/v1/capsules/cl-abc123/pause")] = httpx.Response(
        200, json=capsule(status="paused")
    )
    api.routes[("POST", "/v1/capsules/cl-abc123/resume")] = httpx.Response(
        200, json=capsule(status="running")
    )
    api.routes[("POST", "/v1/capsules/cl-abc123/ping")] = httpx.Response(204)
    api.routes[("DELETE", "/v1/capsules/cl-abc123")] = httpx.Response(204)

    result = run("capsule", "pause", "cl-abc123")
    assert result.exit_code == 0 and "Paused cl-abc123 (status: paused)" in result.stdout
    assert json.loads(run("capsule", "resume", "cl-abc123", "--json").stdout)["status"] == "running"
    assert "Pinged cl-abc123" in run("capsule", "ping", "cl-abc123").stdout
    result = run("capsule", "destroy", "cl-abc123")
    assert result.exit_code == 0 and "Destroyed cl-abc123" in result.stdout
    assert [(r.method, r.url.path) for r in api.requests] == [
        ("POST", "/api/v1/capsules/cl-abc123/pause"),
        ("POST", "/api/v1/capsules/cl-abc123/resume"),
        ("POST", "/api/v1/capsules/cl-abc123/ping"),
        ("DELETE", "/api/v1/capsules/cl-abc123"),
    ]


# --- snapshot commands ---------------------------------------------------------------------


def test_snapshot_create_list_delete(api: Api) -> None:
    template = {
        "name": "my-snap",
        "type": "snapshot",
        "vcpus": 1,
        "memory_mb": 512,
        "size_bytes": 3 * 1024 * 1024,
        "created_at": "2024-11-01T10:00:00Z",
    }
    api.routes[("POST", "/v1/snapshots")] = httpx.Response(201, json=template)
    api.routes[("GET", "/v1/snapshots")] = httpx.Response(
        200,
        json=[
            {
                "name": "minimal",
                "type": "base",
                "vcpus": 1,
                "memory_mb": 512,
                "size_bytes": 10,
                "created_at": None,
            },
            template,
        ],
    )
    api.routes[("DELETE", "/v1/snapshots/my-snap")] = httpx.Response(204)

    result = run("snapshot", "create", "cl-abc123", "--name", "my-snap", "--overwrite")
    assert result.exit_code == 0 and "Created snapshot my-snap from cl-abc123" in result.stdout
    assert api.body() == {"sandbox_id": "cl-abc123", "name": "my-snap"}
    assert api.requests[-1].url.params["overwrite"] == "true"

    result = runner.invoke(app, ["snapshot", "list", "--type", "snapshot"], env={"COLUMNS": "160"})
    assert result.exit_code == 0
    assert api.requests[-1].url.params["type"] == "snapshot"
    assert any("my-snap" in line and "3.0 MiB" in line for line in result.stdout.splitlines())
    assert [t["name"] for t in json.loads(run("snapshot", "list", "--json").stdout)] == [
        "minimal",
        "my-snap",
    ]

    result = run("snapshot", "delete", "my-snap")
    assert result.exit_code == 0 and "Deleted snapshot my-snap" in result.stdout


def test_snapshot_name_taken(api: Api) -> None:
    api.routes[("POST", "/v1/snapshots")] = err(
        409, "template_name_taken", "a template named 'x' already exists"
    )
    result = run("snapshot", "create", "cl-abc123", "--name", "x")
    assert result.exit_code == 1
    assert "template_name_taken" in result.stderr and "Traceback" not in result.output


# --- networking ----------------------------------------------------------------------------


def test_create_with_egress_flags(api: Api) -> None:
    api.routes[("POST", "/v1/capsules")] = httpx.Response(201, json=capsule())
    api.routes[("GET", "/v1/capsules/cl-abc123")] = httpx.Response(200, json=capsule())
    result = run("capsule", "create", "--no-internet", "--allow-out", "pypi.org", "--allow-out", "10.0.0.0/8",
                 "--deny-out", "10.0.0.5")
    assert result.exit_code == 0, result.output
    assert api.body(0) == {"allow_internet_access": False,
                           "network": {"allow_out": ["pypi.org", "10.0.0.0/8"], "deny_out": ["10.0.0.5"]}}


def test_network_command_patches(api: Api) -> None:
    api.routes[("PATCH", "/v1/capsules/cl-abc123/network")] = httpx.Response(
        200, json=capsule(allow_internet_access=True, network={"allow_out": [], "deny_out": ["1.2.3.4"]}))
    result = run("capsule", "network", "cl-abc123", "--internet", "--deny-out", "1.2.3.4")
    assert result.exit_code == 0, result.output
    assert api.body() == {"allow_internet_access": True, "network": {"deny_out": ["1.2.3.4"]}}
    assert "internet on" in result.output and "1.2.3.4" in result.output
