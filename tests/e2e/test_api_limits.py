"""Limits with real VMs (issue 11): a 300 MB exec output, `//` and NUL reaching a real guest, and
a 400 MB body without a key against a real `wrenn server` (its RSS must stay flat)."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.e2e.test_api_capsules import Api, assert_error

pytestmark = pytest.mark.vm

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def api(wrenn_server) -> Iterator[Api]:
    a = Api(wrenn_server)
    yield a
    a.cleanup()


@pytest.fixture(scope="module")
def cid(api: Api) -> str:
    return api.running()["id"]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_exec_printing_300_mb_answers_with_the_flag(api: Api, cid: str) -> None:
    started = time.monotonic()
    body = api.exec(cid, "/bin/sh", "-c", "head -c 300000000 /dev/zero | tr '\\0' x; echo tail >&2",
                    timeout_sec=240)
    took = time.monotonic() - started
    print(f"300 MB exec answered in {took:.1f} s")
    assert body["exit_code"] == 0 and body["timed_out"] is False
    assert body["stdout_truncated"] is True and body["truncated"] is True and body["stderr_truncated"] is False
    assert len(body["stdout"]) == 16 * MIB and set(body["stdout"]) == {"x"} and body["stderr"] == "tail\n"
    assert api.exec(cid, "/bin/echo", "alive")["stdout"] == "alive\n"  # the guest agent survived


def test_remove_of_slash_slash_leaves_the_guest_root(api: Api, cid: str) -> None:
    for path in ("//", "///", "/./", "//tmp/.."):
        err = assert_error(api.post(f"/v1/capsules/{cid}/files/remove", json={"path": path}), 400,
                           "invalid_request")
        assert "refusing" in err["message"]
    api.exec(cid, "/bin/sh", "-c", "mkdir -p /tmp/keep/sub && echo x > /tmp/keep/sub/f")
    assert api.post(f"/v1/capsules/{cid}/files/remove", json={"path": "//tmp//keep/./sub/"}).status_code == 204
    out = api.exec(cid, "/bin/sh", "-c", "ls /tmp/keep; ls /bin/sh /etc/hostname")["stdout"]
    assert out == "/bin/sh\n/etc/hostname\n"


def test_nul_and_bad_env_names_are_400(api: Api, cid: str) -> None:
    for body in ({"cmd": "/bin/echo", "args": ["a\x00b"]}, {"cmd": "/bin/ec\x00ho"},
                 {"cmd": "/usr/bin/env", "envs": {"A=B": "1"}}, {"cmd": "/usr/bin/env", "envs": {"A": "\x00"}},
                 {"cmd": "/bin/pwd", "cwd": "/tmp\x00"}):
        assert_error(api.post(f"/v1/capsules/{cid}/exec", json=body), 400, "invalid_request")
    assert_error(api.post(f"/v1/capsules/{cid}/files/read", json={"path": "/etc/\x00passwd"}), 400,
                 "invalid_request")
    assert api.get_capsule(cid)["status"] == "running"


def test_400_mb_body_without_a_key_is_refused_with_a_flat_rss(wrenn_server) -> None:
    assert wrenn_server.proc is not None
    before = rss_mb(wrenn_server.proc.pid)
    url = urlsplit(wrenn_server.base_url)
    sent = 0
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(b"POST /api/v1/capsules HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 400000000\r\n\r\n")
        chunk = b"{" + b" " * (MIB - 1)
        try:
            while sent < 400 * MIB:  # until the server answers and closes
                sock.sendall(chunk)
                sent += len(chunk)
                sock.settimeout(0.001)
                try:
                    if sock.recv(1, socket.MSG_PEEK):
                        break
                except (TimeoutError, BlockingIOError):
                    pass
                finally:
                    sock.settimeout(30)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        with contextlib.suppress(ConnectionResetError):  # the answer's head and body may come apart
            while b"}}" not in answer and (data := sock.recv(65536)):
                answer += data
    after = rss_mb(wrenn_server.proc.pid)
    print(f"server RSS {before:.0f} -> {after:.0f} MB, {sent // MIB} MiB sent before the answer")
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"X-API-Key" in answer
    assert after - before < 50
    assert sent < 100 * MIB


def test_a_pause_during_a_3_s_exec_waits_for_it(api: Api, wrenn_server) -> None:
    import threading

    cid = api.running()["id"]
    result: dict = {}

    def run() -> None:
        with wrenn_server.client() as own:  # its own connection, from this thread
            result["resp"] = own.post(f"/v1/capsules/{cid}/exec",
                                      json={"cmd": "/bin/sh", "args": ["-c", "sleep 3; echo done"]})

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(1)
    pause = api.post(f"/v1/capsules/{cid}/pause")
    worker.join(60)
    assert pause.status_code == 200, pause.text
    assert result["resp"].status_code == 200, result["resp"].text
    assert result["resp"].json()["stdout"] == "done\n"
    assert api.post(f"/v1/capsules/{cid}/resume").status_code == 200
    assert api.exec(cid, "/bin/echo", "back")["stdout"] == "back\n"
