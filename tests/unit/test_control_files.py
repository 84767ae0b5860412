"""Control plane: file routes (write, read, list, mkdir, remove, stream/write, stream/read)."""

from __future__ import annotations

import os

import pytest

from .fake_host_agent import assert_error, make_settings, running_app

MIB = 1024 * 1024


@pytest.fixture
async def h(tmp_path):
    async with running_app(make_settings(tmp_path)) as harness:
        yield harness


@pytest.fixture
async def cap(h):
    return await h.running_capsule()


def sdk_stream_body(path: str, chunks, boundary: bytes = b"b0undary"):
    """The multipart stream the published SDK's upload_stream sends: path first, then file."""
    async def gen():
        yield b"--" + boundary + b"\r\n"
        yield b'Content-Disposition: form-data; name="path"\r\n\r\n'
        yield path.encode() + b"\r\n"
        yield b"--" + boundary + b"\r\n"
        yield b'Content-Disposition: form-data; name="file"; filename="upload.bin"\r\n'
        yield b"Content-Type: application/octet-stream\r\n\r\n"
        for chunk in chunks:
            yield chunk
        yield b"\r\n--" + boundary + b"--\r\n"
    return gen(), {"Content-Type": f"multipart/form-data; boundary={boundary.decode()}"}


async def test_write_then_read_binary(h, cap):
    data = os.urandom(200_000) + b"\r\n--not-a-boundary\r\n"
    url = f"/v1/capsules/{cap['id']}/files"
    resp = await h.client.post(f"{url}/write", files={"file": ("upload", data)}, data={"path": "/root/blob.bin"})
    assert resp.status_code == 204 and resp.content == b"", resp.text
    assert h.fake.capsules[cap["id"]].files["/root/blob.bin"] == data

    resp = await h.client.post(f"{url}/read", json={"path": "/root/blob.bin"})
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/octet-stream"
    assert resp.content == data
    resp = await h.client.post(f"{url}/stream/read", json={"path": "/root/blob.bin"})
    assert resp.status_code == 200 and resp.content == data


async def test_empty_file(h, cap):
    url = f"/v1/capsules/{cap['id']}/files"
    assert (await h.client.post(f"{url}/write", files={"file": ("f", b"")}, data={"path": "/tmp/empty"})).status_code == 204
    resp = await h.client.post(f"{url}/read", json={"path": "/tmp/empty"})
    assert resp.status_code == 200 and resp.content == b""


async def test_write_request_errors(h, cap):
    url = f"/v1/capsules/{cap['id']}/files/write"
    err = assert_error(await h.client.post(url, files={"file": ("f", b"x")}), 400, "invalid_request")
    assert "path" in err["message"]
    err = assert_error(await h.client.post(url, files={"other": ("f", b"x")}, data={"path": "/tmp/a"}),
                       400, "invalid_request")
    assert "file" in err["message"]
    assert_error(await h.client.post(url, json={"path": "/tmp/a"}), 400, "invalid_request")
    truncated = b'--xyz\r\nContent-Disposition: form-data; name="path"\r\n\r\n/tmp/a\r\n--xyz\r\nContent-Disp'
    assert_error(await h.client.post(url, content=truncated, headers={"content-type": "multipart/form-data; boundary=xyz"}),
                 400, "invalid_request")
    assert h.fake.ops("write_file") == []


async def test_size_cap_boundary(tmp_path):
    async with running_app(make_settings(tmp_path, max_upload_bytes=1000)) as h:
        cap = await h.running_capsule()
        url = f"/v1/capsules/{cap['id']}/files/write"
        ok = await h.client.post(url, files={"file": ("f", b"a" * 1000)}, data={"path": "/tmp/ok"})
        assert ok.status_code == 204, ok.text
        err = assert_error(await h.client.post(url, files={"file": ("f", b"a" * 1001)}, data={"path": "/tmp/big"}),
                           413, "too_large")
        assert "1000" in err["message"]
        assert "/tmp/big" not in h.fake.capsules[cap["id"]].files


async def test_declared_length_over_cap_is_refused_before_reading(h, cap):
    url = f"/v1/capsules/{cap['id']}/files/write"
    consumed = []

    async def body():
        consumed.append(1)
        yield b"--x\r\n"

    resp = await h.client.post(url, content=body(), headers={
        "content-type": "multipart/form-data; boundary=x", "content-length": str(200 * MIB)})
    assert_error(resp, 413, "too_large")
    assert h.fake.ops("write_file") == []


async def test_real_streamed_upload_over_100_mib_is_413(h, cap):
    # Chunked (no Content-Length): the server must count while it receives, and stop.
    chunk = b"\0" * MIB
    sent = []

    def chunks():
        for _ in range(101):
            sent.append(1)
            yield chunk
        yield b"x"

    body, headers = sdk_stream_body("/tmp/huge", chunks())
    resp = await h.client.post(f"/v1/capsules/{cap['id']}/files/write", content=body, headers=headers)
    assert_error(resp, 413, "too_large")
    assert "content-length" not in {k.lower() for k in resp.request.headers}
    assert 100 <= len(sent) <= 101  # read up to the cap, then refused without reading the rest
    assert "/tmp/huge" not in h.fake.capsules[cap["id"]].files
    assert h.fake.ops("write_file") == []


async def test_guest_error_codes(h, cap):
    url = f"/v1/capsules/{cap['id']}/files"
    assert_error(await h.client.post(f"{url}/read", json={"path": "/nope"}), 404, "not_found")
    assert_error(await h.client.post(f"{url}/read", json={"path": "/tmp"}), 400, "invalid_request")
    assert_error(await h.client.post(f"{url}/write", files={"file": ("f", b"x")}, data={"path": "/proc/x"}),
                 403, "forbidden")
    assert_error(await h.client.post(f"{url}/write", files={"file": ("f", b"x")}, data={"path": "/tmp"}),
                 400, "invalid_request")
    assert_error(await h.client.post(f"{url}/list", json={"path": "/nope"}), 404, "not_found")
    assert_error(await h.client.post(f"{url}/remove", json={"path": "/nope"}), 404, "not_found")
    assert_error(await h.client.post(f"{url}/read", json={}), 400, "invalid_request")
    assert_error(await h.client.post(f"{url}/read", json={"path": ""}), 400, "invalid_request")


async def test_list_mkdir_remove(h, cap):
    url = f"/v1/capsules/{cap['id']}/files"
    resp = await h.client.post(f"{url}/mkdir", json={"path": "/work/a/b"})
    assert resp.status_code == 200, resp.text
    entry = resp.json()["entry"]
    assert (entry["path"], entry["name"], entry["type"]) == ("/work/a/b", "b", "directory")
    assert entry["permissions"] == "drwxr-xr-x"  # ls-style, as the SDK documents
    assert isinstance(entry["modified_at"], int) and entry["modified_at"] == 1730455205
    await h.client.post(f"{url}/write", files={"file": ("f", b"12345")}, data={"path": "/work/a/f.txt"})

    entries = (await h.client.post(f"{url}/list", json={"path": "/work/a"})).json()["entries"]
    assert [(e["name"], e["type"], e["size"]) for e in entries] == [("b", "directory", 0), ("f.txt", "file", 5)]
    assert entries[1]["permissions"] == "-rw-r--r--"
    deep = (await h.client.post(f"{url}/list", json={"path": "/work", "depth": 3})).json()["entries"]
    assert [e["path"] for e in deep] == ["/work/a", "/work/a/b", "/work/a/f.txt"]
    assert_error(await h.client.post(f"{url}/list", json={"path": "/work/a/f.txt"}), 400, "invalid_request")
    assert_error(await h.client.post(f"{url}/list", json={"path": "/work", "depth": -1}), 400, "invalid_request")
    assert_error(await h.client.post(f"{url}/mkdir", json={"path": "/work/a/f.txt"}), 400, "invalid_request")

    resp = await h.client.post(f"{url}/remove", json={"path": "/work/a"})
    assert resp.status_code == 204 and resp.content == b""
    assert_error(await h.client.post(f"{url}/read", json={"path": "/work/a/f.txt"}), 404, "not_found")


async def test_files_require_running(h, cap):
    url = f"/v1/capsules/{cap['id']}/files"
    await h.client.post(f"/v1/capsules/{cap['id']}/pause")
    for path, kwargs in [("read", {"json": {"path": "/a"}}), ("list", {"json": {"path": "/"}}),
                         ("mkdir", {"json": {"path": "/a"}}), ("remove", {"json": {"path": "/a"}}),
                         ("write", {"files": {"file": ("f", b"x")}, "data": {"path": "/a"}}),
                         ("stream/write", {"content": b"x", "params": {"path": "/a"}}),
                         ("stream/read", {"json": {"path": "/a"}})]:
        assert_error(await h.client.post(f"{url}/{path}", **kwargs), 409, "invalid_state")


async def test_stream_write_multipart_like_the_sdk(h, cap):
    pieces = [os.urandom(700_000) for _ in range(8)]  # ~5.6 MB in pieces
    body, headers = sdk_stream_body("/root/stream.bin", pieces)
    resp = await h.client.post(f"/v1/capsules/{cap['id']}/files/stream/write", content=body, headers=headers)
    assert resp.status_code == 204, resp.text
    assert h.fake.capsules[cap["id"]].files["/root/stream.bin"] == b"".join(pieces)
    resp = await h.client.post(f"/v1/capsules/{cap['id']}/files/stream/read", json={"path": "/root/stream.bin"})
    assert resp.content == b"".join(pieces)


async def test_stream_write_has_no_size_cap(tmp_path):
    async with running_app(make_settings(tmp_path, max_upload_bytes=1000)) as h:
        cap = await h.running_capsule()
        body, headers = sdk_stream_body("/tmp/big", [b"z" * 5000])
        resp = await h.client.post(f"/v1/capsules/{cap['id']}/files/stream/write", content=body, headers=headers)
        assert resp.status_code == 204, resp.text
        assert h.fake.written["/tmp/big"] == 5000


async def test_stream_write_raw_body_with_query_path(h, cap):
    async def raw():
        for i in range(5):
            yield bytes([i]) * 100_000

    resp = await h.client.post(f"/v1/capsules/{cap['id']}/files/stream/write", params={"path": "/tmp/raw"},
                               content=raw(), headers={"content-type": "application/octet-stream"})
    assert resp.status_code == 204, resp.text
    assert h.fake.capsules[cap["id"]].files["/tmp/raw"] == b"".join(bytes([i]) * 100_000 for i in range(5))
    assert_error(await h.client.post(f"/v1/capsules/{cap['id']}/files/stream/write", content=b"x"),
                 400, "invalid_request")


async def test_stream_write_needs_path_before_file(h, cap):
    boundary = b"bb"
    body = (b"--bb\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n\r\nDATA\r\n"
            b"--bb\r\nContent-Disposition: form-data; name=\"path\"\r\n\r\n/tmp/late\r\n--bb--\r\n")
    err = assert_error(await h.client.post(f"/v1/capsules/{cap['id']}/files/stream/write", content=body,
                                           headers={"content-type": f"multipart/form-data; boundary={boundary.decode()}"}),
                       400, "invalid_request")
    assert "before" in err["message"]
    assert "/tmp/late" not in h.fake.capsules[cap["id"]].files
