"""`wrenn control-plane` as an operator runs it: a real process on a real PostgreSQL, driven
with `wrenn hosts ...` and plain HTTP as a host agent would, logging JSON lines."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def control_plane(postgres_url, tmp_path):
    port = _free_port()
    key = "wrn_" + secrets.token_hex(16)
    env = {**os.environ, "PYTHONPATH": SRC, "WRENN_BOOTSTRAP_API_KEY": key, "WRENN_LOG_FORMAT": "json",
           "WRENN_JWT_SECRET": secrets.token_hex(16), "WRENN_DATA_DIR": str(tmp_path / "data")}
    env.pop("WRENN_DATABASE_URL", None)
    log = tmp_path / "control-plane.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "wrenn_cli.main", "control-plane", "--database-url",
                                 postgres_url, "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=err, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield base, key, log
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wrenn(base: str, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC, "WRENN_API_KEY": key, "WRENN_BASE_URL": f"{base}/api"}
    return subprocess.run([sys.executable, "-m", "wrenn_cli.main", *args], env=env, capture_output=True,
                          text=True, timeout=60)


def test_control_plane_hosts_cli_and_json_logs(control_plane):
    base, key, log = control_plane
    health = httpx.get(f"{base}/api/health").json()
    assert health["status"] == "ok" and health["mode"] == "fleet"

    added = _wrenn(base, key, "hosts", "add", "--name", "rack-1")
    assert added.returncode == 0, added.stderr
    command = added.stdout.strip()
    assert command.startswith(f"wrenn host-agent --control-plane {base} --token wrnr_"), command
    token = command.split("--token ")[1].split()[0]

    listed = json.loads(_wrenn(base, key, "hosts", "list", "--json").stdout)
    assert [(h["name"], h["status"]) for h in listed] == [("rack-1", "pending")]
    host_id = listed[0]["id"]

    # register as the host agent would (its client module may be absent: the control plane says so)
    body = {"address": "http://127.0.0.1:9", "name": "rack-1", "capacity": {"vcpus": 2, "memory_mb": 2048,
                                                                            "disk_mb": 10_000}}
    reg = httpx.post(f"{base}/api/v1/hosts/register", json=body, headers={"Authorization": f"Bearer {token}"})
    assert reg.status_code == 200, reg.text
    again = httpx.post(f"{base}/api/v1/hosts/register", json=body, headers={"Authorization": f"Bearer {token}"})
    assert again.status_code == 401
    # registered: pending until its first heartbeat (which an agent sends once it serves)
    assert "pending" in _wrenn(base, key, "hosts", "show", host_id).stdout
    beat = httpx.post(f"{base}/api/v1/hosts/{host_id}/heartbeat", headers={
        "Authorization": f"Bearer {reg.json()['credential']}"}, json={
        "usage": {"capsules_running": 0, "free_memory_mb": 2000, "free_disk_mb": 9000}, "capsules": {},
        "templates": []})
    assert beat.status_code == 200 and beat.json() == {"status": "online"}, beat.text
    shown = _wrenn(base, key, "hosts", "show", host_id)
    assert shown.returncode == 0 and "online" in shown.stdout and "http://127.0.0.1:9" in shown.stdout
    table = _wrenn(base, key, "hosts", "list")
    assert host_id in table.stdout and "online" in table.stdout

    metrics = httpx.get(f"{base}/metrics").text
    assert f'wrenn_host_capacity{{host="{host_id}",resource="memory_mb"}} 2048.0' in metrics

    drained = _wrenn(base, key, "hosts", "drain", host_id)
    assert drained.returncode == 0 and "draining" in drained.stdout
    refused = httpx.post(f"{base}/api/v1/capsules", json={}, headers={"X-API-Key": key})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "host_unavailable"
    removed = _wrenn(base, key, "hosts", "remove", host_id)
    assert removed.returncode == 0 and f"removed {host_id}" in removed.stdout
    assert json.loads(_wrenn(base, key, "hosts", "list", "--json").stdout) == []
    gone = _wrenn(base, key, "hosts", "show", host_id)
    assert gone.returncode == 1 and "not_found" in gone.stderr

    lines = [line for line in log.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines if line.startswith("{")]
    # everything after uvicorn took over logging is JSON lines (the key banner comes before it)
    assert records and all({"ts", "level", "logger", "message"} <= set(r) for r in records)
    assert any(r["logger"] == "uvicorn.access" and "/api/v1/hosts" in r["message"] for r in records)
    first_json = next(i for i, line in enumerate(lines) if line.startswith("{"))
    assert all(line.startswith("{") for line in lines[first_json:]), lines[first_json:]
