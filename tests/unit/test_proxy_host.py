"""Port proxy pieces without I/O: Host parsing and the headers sent each way."""

from __future__ import annotations

import pytest

from wrenn_control.proxy.headers import request_headers, request_target, response_headers
from wrenn_control.proxy.routing import parse_target

CID = "cl-" + "a1" * 12 + "z"


@pytest.mark.parametrize("host, expected", [
    (f"8000-{CID}.localhost", (8000, CID)),
    (f"8000-{CID}.localhost:8080", (8000, CID)),
    (f"80-{CID}.127.0.0.1:8080", (80, CID)),
    (f"3000-{CID}.wrenn.dev", (3000, CID)),
    (f"8000-{CID.upper()}.Example.COM", (8000, CID)),  # host names are case-insensitive
    (f"65535-{CID}.a.b.c.example", (65535, CID)),
    (f"99999-{CID}.x", (99999, CID)),  # parsed; the proxy answers 400 for it
])
def test_parse_target(host, expected):
    assert parse_target(host) == expected


@pytest.mark.parametrize("host", [
    None, "", "localhost", "127.0.0.1:8080", "app.wrenn.dev", f"{CID}.localhost", f"8000-{CID}",
    f"8000-{CID}:8080", f"abc-{CID}.localhost", "8000-tpl-abc.localhost", f"123456-{CID}.localhost",
    f"8000-{CID}.", f"8000-{CID}.local host", "[::1]:8080",
])
def test_parse_target_other_hosts(host):
    assert parse_target(host) is None


def scope(headers, **extra):
    return {"type": "http", "method": "GET", "path": "/a b", "raw_path": b"/a%20b", "query_string": b"x=1&y=%2F",
            "headers": headers, "client": ("10.1.2.3", 5555), "scheme": "http", **extra}


def test_request_headers():
    h = request_headers(scope([
        (b"host", b"8000-cl-x.localhost:8080"), (b"connection", b"keep-alive, X-Secret"),
        (b"keep-alive", b"timeout=5"), (b"x-secret", b"1"), (b"x-api-key", b"wrn_abc"), (b"te", b"trailers"),
        (b"accept", b"*/*"), (b"cookie", b"a=1"), (b"cookie", b"b=2"), (b"x-forwarded-for", b"1.1.1.1"),
        (b"x-forwarded-proto", b"https"), (b"content-length", b"5"), (b"expect", b"100-continue"),
        (b"authorization", b"Bearer app-token"),
    ]))
    names = [k for k, _ in h]
    for gone in (b"keep-alive", b"x-secret", b"x-api-key", b"te", b"expect"):
        assert gone not in names
    assert (b"host", b"8000-cl-x.localhost:8080") in h  # the service sees the Host the client used
    assert [v for k, v in h if k == b"cookie"] == [b"a=1", b"b=2"]
    assert (b"authorization", b"Bearer app-token") in h  # the app's own auth passes
    assert (b"content-length", b"5") in h
    assert (b"x-forwarded-for", b"1.1.1.1, 10.1.2.3") in h
    assert [v for k, v in h if k == b"x-forwarded-proto"] == [b"http"]
    assert (b"x-forwarded-host", b"8000-cl-x.localhost:8080") in h
    assert [v for k, v in h if k == b"connection"] == [b"close"]


def test_request_headers_chunked_body():
    h = request_headers(scope([(b"host", b"h"), (b"transfer-encoding", b"chunked")]))
    assert [v for k, v in h if k == b"transfer-encoding"] == [b"chunked"]
    h = request_headers(scope([(b"host", b"h")]))
    assert b"transfer-encoding" not in [k for k, _ in h] and b"content-length" not in [k for k, _ in h]


def test_request_target_keeps_raw_path_and_query():
    assert request_target(scope([])) == b"/a%20b?x=1&y=%2F"
    assert request_target(scope([], query_string=b"")) == b"/a%20b"


def test_response_headers():
    out = response_headers([(b"Content-Type", b"text/html"), (b"Transfer-Encoding", b"chunked"),
                            (b"Connection", b"close, X-Hop"), (b"X-Hop", b"1"), (b"Date", b"x"),
                            (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"), (b"Content-Length", b"10")])
    assert out == [(b"content-type", b"text/html"), (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2"),
                   (b"content-length", b"10")]
