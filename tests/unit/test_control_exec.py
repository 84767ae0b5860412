"""Control plane: exec (foreground/background) and processes."""

from __future__ import annotations

import base64

import pytest

from wrenn_host.api import ExecResult, HostAgentError

from .fake_host_agent import TS_RE, assert_error, make_settings, running_app


@pytest.fixture
async def h(tmp_path):
    async with running_app(make_settings(tmp_path)) as harness:
        yield harness


@pytest.fixture
async def cap(h):
    return await h.running_capsule()


async def test_foreground_exec_shape_and_activity(h, cap):
    seen = {}

    def handler(capsule_id, cmd, args, envs, cwd, timeout_sec):
        seen.update(capsule_id=capsule_id, cmd=cmd, args=args, envs=envs, cwd=cwd, timeout_sec=timeout_sec)
        return ExecResult(b"hello\n", b"warn\n", 3, 12)

    h.fake.exec_handler = handler
    resp = await h.client.post(f"/v1/capsules/{cap['id']}/exec",
                               json={"cmd": "/bin/sh", "args": ["-c", "echo hello"], "envs": {"A": "1"}, "cwd": "/tmp"})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"sandbox_id": cap["id"], "cmd": "/bin/sh", "stdout": "hello\n", "stderr": "warn\n",
                           "exit_code": 3, "duration_ms": 12, "encoding": "utf-8", "timed_out": False,
                           "truncated": False, "stdout_truncated": False, "stderr_truncated": False}
    assert seen == {"capsule_id": cap["id"], "cmd": "/bin/sh", "args": ["-c", "echo hello"], "envs": {"A": "1"},
                    "cwd": "/tmp", "timeout_sec": 30}
    got = (await h.client.get(f"/v1/capsules/{cap['id']}")).json()
    assert TS_RE.match(got["last_active_at"])


async def test_exec_defaults_args_and_custom_timeout(h, cap):
    seen = {}
    h.fake.exec_handler = lambda cid, cmd, args, envs, cwd, t: seen.update(args=args, t=t) or ExecResult(b"", b"", 0, 1)
    resp = await h.client.post(f"/v1/capsules/{cap['id']}/exec", json={"cmd": "true", "timeout_sec": 5})
    assert resp.status_code == 200, resp.text
    assert seen == {"args": [], "t": 5}


async def test_binary_output_is_base64_for_both_streams(h, cap):
    out, err = b"\xff\xfe\x00binary", b"plain text"
    h.fake.exec_handler = lambda *a: ExecResult(out, err, 0, 5)
    body = (await h.client.post(f"/v1/capsules/{cap['id']}/exec", json={"cmd": "cat"})).json()
    assert body["encoding"] == "base64"
    assert base64.b64decode(body["stdout"]) == out
    assert base64.b64decode(body["stderr"]) == err


async def test_utf8_non_ascii_stays_text(h, cap):
    h.fake.exec_handler = lambda *a: ExecResult("héllo ✓\n".encode(), b"", 0, 5)
    body = (await h.client.post(f"/v1/capsules/{cap['id']}/exec", json={"cmd": "echo"})).json()
    assert body["encoding"] == "utf-8" and body["stdout"] == "héllo ✓\n"


async def test_timed_out_command_is_200_with_flag(h, cap):
    h.fake.exec_handler = lambda *a: ExecResult(b"partial", b"", -9, 1000, timed_out=True)
    resp = await h.client.post(f"/v1/capsules/{cap['id']}/exec", json={"cmd": "sleep", "args": ["99"], "timeout_sec": 1})
    assert resp.status_code == 200, resp.text
    assert resp.json()["exit_code"] == -9 and resp.json()["timed_out"] is True
    assert resp.json()["stdout"] == "partial"


async def test_guest_error_maps_to_4xx(h, cap):
    err = assert_error(await h.client.post(f"/v1/capsules/{cap['id']}/exec", json={"cmd": "ls", "cwd": "/nope"}),
                       404, "not_found")
    assert "/nope" in err["message"]


@pytest.mark.parametrize("body", [{}, {"cmd": ""}, {"cmd": 5}, {"cmd": "ls", "args": "-l"},
                                  {"cmd": "ls", "args": [1]}, {"cmd": "ls", "timeout_sec": 0},
                                  {"cmd": "ls", "envs": {"A": 1}}, {"cmd": "ls", "background": "yes"}])
async def test_exec_validation(h, cap, body):
    assert_error(await h.client.post(f"/v1/capsules/{cap['id']}/exec", json=body), 400, "invalid_request")
    assert h.fake.ops("exec") == []


async def test_exec_requires_running(h, cap):
    await h.client.post(f"/v1/capsules/{cap['id']}/pause")
    err = assert_error(await h.client.post(f"/v1/capsules/{cap['id']}/exec", json={"cmd": "ls"}), 409, "invalid_state")
    assert "paused" in err["message"]
    assert_error(await h.client.get(f"/v1/capsules/{cap['id']}/processes"), 409, "invalid_state")
    assert_error(await h.client.delete(f"/v1/capsules/{cap['id']}/processes/1"), 409, "invalid_state")
    assert (await h.client.get(f"/v1/capsules/{cap['id']}")).json()["last_active_at"] is None


async def test_exec_on_a_vanished_vm_is_502_and_error(h, cap):
    await h.app.state.reaper.stop()  # (its dead-VM check would find it first: 409, tested in test_control_reaper)
    h.fake.crash(cap["id"])
    assert_error(await h.client.post(f"/v1/capsules/{cap['id']}/exec", json={"cmd": "ls"}), 502, "agent_error")
    got = (await h.client.get(f"/v1/capsules/{cap['id']}")).json()
    assert got["status"] == "error" and "VM lost" in got["metadata"]["error"]


async def test_exec_agent_failure_is_502_but_capsule_stays(h, cap):
    h.fake.fail("exec", HostAgentError("guest channel reset"))
    err = assert_error(await h.client.post(f"/v1/capsules/{cap['id']}/exec", json={"cmd": "ls"}), 502, "agent_error")
    assert "channel reset" in err["message"]
    assert (await h.client.get(f"/v1/capsules/{cap['id']}")).json()["status"] == "running"


async def test_background_processes_list_and_kill(h, cap):
    url = f"/v1/capsules/{cap['id']}"
    resp = await h.client.post(f"{url}/exec", json={"cmd": "sleep", "args": ["100"], "background": True, "tag": "sleeper"})
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert body == {"sandbox_id": cap["id"], "cmd": "sleep", "pid": body["pid"], "tag": "sleeper"}
    assert isinstance(body["pid"], int)
    other = (await h.client.post(f"{url}/exec", json={"cmd": "top", "background": True})).json()
    assert other["tag"].startswith("proc-")

    err = assert_error(await h.client.post(f"{url}/exec", json={"cmd": "x", "background": True, "tag": "sleeper"}),
                       409, "conflict")
    assert "sleeper" in err["message"]

    procs = (await h.client.get(f"{url}/processes")).json()["processes"]
    assert {(p["pid"], p["tag"], p["cmd"]) for p in procs} == {(body["pid"], "sleeper", "sleep"),
                                                                 (other["pid"], other["tag"], "top")}
    assert next(p for p in procs if p["tag"] == "sleeper")["args"] == ["100"]

    assert (await h.client.delete(f"{url}/processes/sleeper?signal=SIGTERM")).status_code == 204
    assert (await h.client.delete(f"{url}/processes/{other['pid']}")).status_code == 204
    assert (await h.client.get(f"{url}/processes")).json() == {"processes": []}
    assert_error(await h.client.delete(f"{url}/processes/sleeper"), 404, "not_found")
    assert_error(await h.client.delete(f"{url}/processes/424242"), 404, "not_found")
    err = assert_error(await h.client.delete(f"{url}/processes/1?signal=SIGHUP"), 400, "invalid_request")
    assert "signal" in err["message"]
