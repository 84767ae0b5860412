"""Commands, background processes and files through the REST API, in one shared running capsule."""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.test_api_capsules import Api, assert_error, parse_ts

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


# ---- foreground exec ------------------------------------------------------------------------


def test_exec_foreground_fields(api: Api, cid: str) -> None:
    before = api.get_capsule(cid)["last_active_at"]
    resp = api.post(f"/v1/capsules/{cid}/exec",
                    json={"cmd": "/bin/sh", "args": ["-c", "echo out; echo err >&2; exit 3"]})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert {"sandbox_id", "cmd", "stdout", "stderr", "exit_code", "duration_ms", "encoding"} <= set(body)
    assert (body["sandbox_id"], body["cmd"]) == (cid, "/bin/sh")
    assert (body["stdout"], body["stderr"], body["exit_code"], body["encoding"]) == ("out\n", "err\n", 3, "utf-8")
    assert type(body["duration_ms"]) is int and body["duration_ms"] >= 0
    after = api.get_capsule(cid)["last_active_at"]
    assert after is not None and (before is None or parse_ts(after) >= parse_ts(before))


def test_exec_args_env_cwd_and_unicode(api: Api, cid: str) -> None:
    body = api.exec(cid, "/bin/sh", "-c", 'printf "%s|%s|%s" "$GREETING" "$(pwd)" "$1"', "sh", "a b  c",
                    envs={"GREETING": "héllo wörld ✓"}, cwd="/tmp")
    assert body["stdout"] == "héllo wörld ✓|/tmp|a b  c" and body["encoding"] == "utf-8"
    # A command without a shell, args passed verbatim.
    assert api.exec(cid, "/bin/echo", "$HOME", "*")["stdout"] == "$HOME *\n"
    # The exit code of a missing binary, and of a signal.
    assert api.exec(cid, "/no/such/binary")["exit_code"] == 127
    assert api.sh(cid, "kill -9 $$")["exit_code"] in (-9, 137)


def test_exec_binary_output_is_base64(api: Api, cid: str) -> None:
    body = api.sh(cid, r"printf '\000\001\377\376binary'; printf '\377' >&2")
    assert body["encoding"] == "base64"
    assert base64.b64decode(body["stdout"]) == b"\x00\x01\xff\xfebinary"
    assert base64.b64decode(body["stderr"]) == b"\xff"
    # Large output comes back whole.
    body = api.sh(cid, "head -c 3000000 /dev/zero | tr '\\0' 'x'")
    assert body["stdout"] == "x" * 3_000_000


def test_exec_timeout(api: Api, cid: str) -> None:
    started = time.monotonic()
    body = api.exec(cid, "/bin/sh", "-c", "echo before; sleep 30", timeout_sec=1)
    assert time.monotonic() - started < 15
    assert body["exit_code"] != 0 and body.get("timed_out") is True
    assert body["stdout"] == "before\n"
    assert api.sh(cid, "echo after")["stdout"] == "after\n"  # the capsule is fine


# ---- background processes -------------------------------------------------------------------


def _processes(api: Api, cid: str) -> dict[int, dict[str, Any]]:
    resp = api.get(f"/v1/capsules/{cid}/processes")
    assert resp.status_code == 200, resp.text
    procs = resp.json()["processes"]
    for p in procs:
        assert {"pid", "tag", "cmd", "args"} <= set(p), p
    return {p["pid"]: p for p in procs}


def _alive(api: Api, cid: str) -> set[int]:
    return {pid for pid, p in _processes(api, cid).items() if p.get("running", True)}


def _wait_gone(api: Api, cid: str, pids: set[int], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while _alive(api, cid) & pids:
        assert time.monotonic() < deadline, _processes(api, cid)
        time.sleep(0.1)


def test_background_processes_list_and_kill(api: Api, cid: str) -> None:
    resp = api.post(f"/v1/capsules/{cid}/exec",
                    json={"cmd": "/bin/sh", "args": ["-c", "sleep 600"], "background": True})
    assert resp.status_code == 202, resp.text
    first = resp.json()
    assert set(first) >= {"sandbox_id", "cmd", "pid", "tag"}
    assert first["sandbox_id"] == cid and first["cmd"] == "/bin/sh"
    assert type(first["pid"]) is int and first["pid"] > 0
    assert re.fullmatch(r"proc-[0-9a-f]{8}", first["tag"]), first["tag"]

    tag = f"worker-{secrets.token_hex(3)}"
    resp = api.post(f"/v1/capsules/{cid}/exec",
                    json={"cmd": "/bin/sleep", "args": ["600"], "background": True, "tag": tag,
                          "envs": {"A": "1"}, "cwd": "/tmp"})
    assert resp.status_code == 202, resp.text
    second = resp.json()
    assert second["tag"] == tag and second["pid"] != first["pid"]

    # A tag in use by a live process: 409 conflict.
    dup = api.post(f"/v1/capsules/{cid}/exec",
                   json={"cmd": "/bin/sleep", "args": ["1"], "background": True, "tag": tag})
    assert_error(dup, 409, "conflict")

    procs = _processes(api, cid)
    assert procs[first["pid"]]["tag"] == first["tag"]
    assert procs[first["pid"]]["args"] == ["-c", "sleep 600"]
    assert (procs[second["pid"]]["tag"], procs[second["pid"]]["cmd"]) == (tag, "/bin/sleep")
    # They really run in the guest.
    assert api.sh(cid, f"kill -0 {first['pid']} {second['pid']} && echo ok")["stdout"] == "ok\n"

    # Kill by pid (default SIGKILL) and by tag (SIGTERM).
    resp = api.delete(f"/v1/capsules/{cid}/processes/{first['pid']}")
    assert resp.status_code == 204 and resp.content == b""
    resp = api.delete(f"/v1/capsules/{cid}/processes/{tag}", params={"signal": "SIGTERM"})
    assert resp.status_code == 204
    _wait_gone(api, cid, {first["pid"], second["pid"]})

    # Unknown targets: 404.
    assert_error(api.delete(f"/v1/capsules/{cid}/processes/999999"), 404, "not_found")
    assert_error(api.delete(f"/v1/capsules/{cid}/processes/no-such-tag"), 404, "not_found")

    # The tag is free again once its process is gone.
    again = api.post(f"/v1/capsules/{cid}/exec",
                     json={"cmd": "/bin/sleep", "args": ["600"], "background": True, "tag": tag})
    assert again.status_code == 202, again.text
    assert api.delete(f"/v1/capsules/{cid}/processes/{tag}").status_code == 204
    _wait_gone(api, cid, {again.json()["pid"]})


def test_background_process_output_and_exit(api: Api, cid: str) -> None:
    resp = api.post(f"/v1/capsules/{cid}/exec",
                    json={"cmd": "/bin/sh", "args": ["-c", "echo done > /tmp/bg-out; exit 5"], "background": True})
    assert resp.status_code == 202
    pid = resp.json()["pid"]
    deadline = time.monotonic() + 15
    while (p := _processes(api, cid).get(pid)) and p.get("running", False):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    if p is not None and "exit_code" in p:  # finished ones stay listed with their exit code
        assert p["exit_code"] == 5
    assert api.sh(cid, "cat /tmp/bg-out")["stdout"] == "done\n"


# ---- files ----------------------------------------------------------------------------------


def _write(api: Api, cid: str, path: str, data: bytes) -> Any:
    return api.post(f"/v1/capsules/{cid}/files/write", data={"path": path},
                    files={"file": ("upload.bin", data, "application/octet-stream")})


def _entries(api: Api, cid: str, path: str, depth: int | None = None) -> dict[str, dict[str, Any]]:
    body = {"path": path} if depth is None else {"path": path, "depth": depth}
    resp = api.post(f"/v1/capsules/{cid}/files/list", json=body)
    assert resp.status_code == 200, resp.text
    return {e["path"]: e for e in resp.json()["entries"]}


def test_files_write_read_list_mkdir_remove(api: Api, cid: str) -> None:
    root = f"/tmp/files-{secrets.token_hex(3)}"
    resp = api.post(f"/v1/capsules/{cid}/files/mkdir", json={"path": f"{root}/sub/deeper"})
    assert resp.status_code == 200, resp.text
    entry = resp.json()["entry"]
    assert (entry["path"], entry["name"], entry["type"]) == (f"{root}/sub/deeper", "deeper", "directory")
    assert entry["permissions"].startswith("d")
    # An existing directory is fine.
    assert api.post(f"/v1/capsules/{cid}/files/mkdir", json={"path": f"{root}/sub"}).status_code == 200

    text = "héllo\nwörld\n".encode()
    blob = bytes(range(256)) * 40
    for path, data in ((f"{root}/hello.txt", text), (f"{root}/sub/blob.bin", blob), (f"{root}/empty", b"")):
        resp = _write(api, cid, path, data)
        assert resp.status_code == 204 and resp.content == b"", resp.text

    resp = api.post(f"/v1/capsules/{cid}/files/read", json={"path": f"{root}/hello.txt"})
    assert resp.status_code == 200 and resp.content == text
    assert resp.headers["content-type"] == "application/octet-stream"
    assert api.post(f"/v1/capsules/{cid}/files/read", json={"path": f"{root}/sub/blob.bin"}).content == blob
    assert api.post(f"/v1/capsules/{cid}/files/read", json={"path": f"{root}/empty"}).content == b""
    # The guest sees the same bytes.
    assert api.sh(cid, f"md5sum < {root}/sub/blob.bin")["stdout"].split()[0] == hashlib.md5(blob).hexdigest()
    # Overwrite.
    assert _write(api, cid, f"{root}/hello.txt", b"v2").status_code == 204
    assert api.post(f"/v1/capsules/{cid}/files/read", json={"path": f"{root}/hello.txt"}).content == b"v2"

    entries = _entries(api, cid, root)
    assert set(entries) == {f"{root}/hello.txt", f"{root}/sub", f"{root}/empty"}
    hello = entries[f"{root}/hello.txt"]
    assert {"name", "path", "type", "size", "mode", "permissions", "owner", "group", "modified_at",
            "symlink_target"} <= set(hello)
    assert (hello["name"], hello["type"], hello["size"]) == ("hello.txt", "file", 2)
    assert re.fullmatch(r"-[rwx-]{9}", hello["permissions"]) and type(hello["modified_at"]) is int
    assert abs(hello["modified_at"] - time.time()) < 600
    assert entries[f"{root}/sub"]["type"] == "directory"
    deep = _entries(api, cid, root, depth=3)
    assert {f"{root}/sub/blob.bin", f"{root}/sub/deeper"} <= set(deep)
    assert deep[f"{root}/sub/blob.bin"]["size"] == len(blob)

    api.sh(cid, f"ln -s {root}/hello.txt {root}/link")
    link = _entries(api, cid, root)[f"{root}/link"]
    assert link["type"] == "symlink" and link["symlink_target"] == f"{root}/hello.txt"

    # Remove a file, then a whole tree.
    resp = api.post(f"/v1/capsules/{cid}/files/remove", json={"path": f"{root}/hello.txt"})
    assert resp.status_code == 204 and resp.content == b""
    assert_error(api.post(f"/v1/capsules/{cid}/files/read", json={"path": f"{root}/hello.txt"}), 404, "not_found")
    assert api.post(f"/v1/capsules/{cid}/files/remove", json={"path": root}).status_code == 204
    assert api.sh(cid, f"test -e {root} || echo gone")["stdout"] == "gone\n"


def test_files_errors(api: Api, cid: str) -> None:
    missing = f"/tmp/missing-{secrets.token_hex(3)}"
    assert_error(api.post(f"/v1/capsules/{cid}/files/read", json={"path": missing}), 404, "not_found")
    assert_error(api.post(f"/v1/capsules/{cid}/files/stream/read", json={"path": missing}), 404, "not_found")
    assert_error(api.post(f"/v1/capsules/{cid}/files/list", json={"path": missing}), 404, "not_found")
    assert_error(api.post(f"/v1/capsules/{cid}/files/remove", json={"path": missing}), 404, "not_found")
    # A directory where a file is needed.
    assert_error(api.post(f"/v1/capsules/{cid}/files/read", json={"path": "/tmp"}), 400, "invalid_request")
    assert_error(_write(api, cid, "/tmp", b"x"), 400, "invalid_request")
    # Malformed uploads.
    assert_error(api.post(f"/v1/capsules/{cid}/files/write", json={"path": "/tmp/x"}), 400, "invalid_request")
    assert_error(api.post(f"/v1/capsules/{cid}/files/write", files={"file": ("f", b"x")}), 400, "invalid_request")
    assert_error(api.post(f"/v1/capsules/{cid}/files/write", data={"path": "/tmp/x"},
                          files={"other": ("f", b"x")}), 400, "invalid_request")


def test_stream_write_and_read(api: Api, cid: str) -> None:
    data = secrets.token_bytes(3 * MIB + 17)

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(data), 256 * 1024):
            yield data[i:i + 256 * 1024]

    # Raw body with ?path=, sent chunked.
    resp = api.post(f"/v1/capsules/{cid}/files/stream/write", params={"path": "/tmp/stream.bin"},
                    content=chunks(), headers={"Content-Type": "application/octet-stream"})
    assert resp.status_code == 204, resp.text
    with api.stream("POST", f"/v1/capsules/{cid}/files/stream/read", json={"path": "/tmp/stream.bin"}) as r:
        assert r.status_code == 200
        got = b"".join(r.iter_bytes())
    assert got == data
    # Multipart, the way the SDKs send it.
    resp = api.post(f"/v1/capsules/{cid}/files/stream/write", data={"path": "/tmp/stream2.bin"},
                    files={"file": ("upload.bin", data[:1000])})
    assert resp.status_code == 204, resp.text
    assert api.post(f"/v1/capsules/{cid}/files/read", json={"path": "/tmp/stream2.bin"}).content == data[:1000]
    api.post(f"/v1/capsules/{cid}/files/remove", json={"path": "/tmp/stream.bin"})
    api.post(f"/v1/capsules/{cid}/files/remove", json={"path": "/tmp/stream2.bin"})


def _multipart_upload(path: str, size: int, boundary: str = "wrenn-test-boundary") -> tuple[Iterator[bytes], int, str]:
    """A generated multipart body (never held in memory) and its length."""
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="path"\r\n\r\n{path}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    chunk = b"\0" * MIB

    def body() -> Iterator[bytes]:
        yield head
        left = size
        while left > 0:
            yield chunk[:min(left, MIB)]
            left -= MIB
        yield tail

    return body(), len(head) + size + len(tail), f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize("declare_length", [True, False], ids=["content-length", "chunked"])
def test_upload_over_100_mb_is_413(api: Api, cid: str, declare_length: bool) -> None:
    path = "/tmp/too-big.bin"
    body, length, content_type = _multipart_upload(path, 100 * MIB + 1)
    headers = {"Content-Type": content_type}
    if declare_length:
        headers["Content-Length"] = str(length)
    resp = api.post(f"/v1/capsules/{cid}/files/write", content=body, headers=headers)
    assert_error(resp, 413, "too_large")
    assert api.sh(cid, f"test -e {path} || echo absent")["stdout"] == "absent\n"  # nothing written
    assert api.sh(cid, "echo alive")["stdout"] == "alive\n"


def test_upload_just_under_the_cap_is_accepted(api: Api, cid: str) -> None:
    size = 100 * MIB - 4096
    body, length, content_type = _multipart_upload("/tmp/near-cap.bin", size)
    resp = api.post(f"/v1/capsules/{cid}/files/write", content=body,
                    headers={"Content-Type": content_type, "Content-Length": str(length)}, timeout=300)
    assert resp.status_code == 204, resp.text
    assert api.sh(cid, "stat -c %s /tmp/near-cap.bin; rm /tmp/near-cap.bin")["stdout"] == f"{size}\n"
