"""WrennClient / AsyncWrennClient against httpx.MockTransport: configuration, requests sent,
models parsed, errors translated, retries."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime

import httpx
import pytest

import wrenn
from wrenn import (
    AsyncWrennClient,
    CapsuleInfo,
    Status,
    Template,
    WrennAgentError,
    WrennAPIError,
    WrennAuthenticationError,
    WrennClient,
    WrennConflictError,
    WrennConnectionError,
    WrennError,
    WrennForbiddenError,
    WrennHostHasCapsulesError,
    WrennHostUnavailableError,
    WrennInternalError,
    WrennNotFoundError,
    WrennTimeoutError,
    WrennTooLargeError,
    WrennValidationError,
)

BASE = "http://wrenn.test/api"
KEY = "wrn_" + "0" * 32

CAPSULE = {
    "id": "cl-abc123",
    "status": "running",
    "template": "base-python",
    "vcpus": 2,
    "memory_mb": 1024,
    "timeout_sec": 300,
    "created_at": "2024-11-01T10:00:00Z",
    "started_at": "2024-11-01T10:00:05Z",
    "last_active_at": "2024-11-01T10:04:30Z",
    "last_updated": "2024-11-01T10:00:05Z",
}
TEMPLATE = {
    "name": "my-snapshot",
    "type": "snapshot",
    "vcpus": 1,
    "memory_mb": 512,
    "size_bytes": 123456,
    "created_at": "2024-11-01T10:00:00Z",
}

Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """A MockTransport handler that records requests and answers from a function."""

    def __init__(self, answer: Handler) -> None:
        self.answer = answer
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        return self.answer(request)

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]

    def body(self, i: int = -1) -> object:
        return json.loads(self.requests[i].content or b"null")


def client_for(answer: Handler) -> tuple[WrennClient, Recorder]:
    rec = Recorder(answer)
    return WrennClient(api_key=KEY, base_url=BASE, transport=httpx.MockTransport(rec)), rec


def aclient_for(answer: Handler) -> tuple[AsyncWrennClient, Recorder]:
    rec = Recorder(answer)
    return AsyncWrennClient(api_key=KEY, base_url=BASE, transport=httpx.MockTransport(rec)), rec


def reply(status: int = 200, body: object = None) -> Handler:
    def answer(request: httpx.Request) -> httpx.Response:
        if body is None:
            return httpx.Response(status)
        return httpx.Response(status, json=body)

    return answer


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WRENN_API_KEY", "WRENN_BASE_URL", "WRENN_PROXY_DOMAIN"):
        monkeypatch.delenv(name, raising=False)
    # Retries sleep between attempts; tests must not.
    monkeypatch.setattr(wrenn._base_client._BaseClient, "_RETRY_BACKOFF", 0.0)


# --- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [WrennClient, AsyncWrennClient])
def test_missing_api_key_raises_value_error(cls: type) -> None:
    with pytest.raises(ValueError, match="WRENN_API_KEY"):
        cls()


def test_api_key_and_base_url_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WRENN_API_KEY", KEY)
    monkeypatch.setenv("WRENN_BASE_URL", "http://127.0.0.1:8765/api")
    rec = Recorder(reply(200, []))
    with WrennClient(transport=httpx.MockTransport(rec)) as client:
        assert client.capsules.list() == []
    assert str(rec.last.url) == "http://127.0.0.1:8765/api/v1/capsules"
    assert rec.last.headers["X-API-Key"] == KEY


def test_explicit_arguments_win_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WRENN_API_KEY", "wrn_env")
    monkeypatch.setenv("WRENN_BASE_URL", "http://env.invalid/api")
    rec = Recorder(reply(200, []))
    WrennClient(
        api_key="wrn_arg", base_url="http://arg.test/api/", transport=httpx.MockTransport(rec)
    ).capsules.list()
    assert str(rec.last.url) == "http://arg.test/api/v1/capsules"
    assert rec.last.headers["X-API-Key"] == "wrn_arg"


def test_default_base_url_is_production() -> None:
    client = WrennClient(api_key=KEY)
    assert client.base_url == "https://app.wrenn.dev/api"
    client.close()


def test_context_managers_close_the_pool() -> None:
    with WrennClient(api_key=KEY, base_url=BASE) as client:
        pass
    assert client.http.is_closed
    other = WrennClient(api_key=KEY, base_url=BASE)
    other.close()
    assert other.http.is_closed


async def test_async_context_manager_and_aclose() -> None:
    async with AsyncWrennClient(api_key=KEY, base_url=BASE) as client:
        pass
    assert client.http.is_closed
    other = AsyncWrennClient(api_key=KEY, base_url=BASE)
    await other.aclose()
    assert other.http.is_closed


# --- capsules ------------------------------------------------------------------------------


def test_create_sends_only_given_fields() -> None:
    client, rec = client_for(reply(201, {**CAPSULE, "status": "pending"}))
    info = client.capsules.create(template="base-python", vcpus=2, memory_mb=1024, timeout_sec=300)
    assert (rec.last.method, rec.last.url.path) == ("POST", "/api/v1/capsules")
    assert rec.body() == {
        "template": "base-python",
        "vcpus": 2,
        "memory_mb": 1024,
        "timeout_sec": 300,
    }
    assert rec.last.headers["Content-Type"] == "application/json"
    assert info.id == "cl-abc123" and info.status == "pending"

    client.capsules.create()
    assert rec.body() == {}
    client.capsules.create(template="minimal", metadata={"team": "a"})
    assert rec.body() == {"template": "minimal", "metadata": {"team": "a"}}


@pytest.mark.parametrize(
    ("call", "method", "path", "status", "body"),
    [
        (lambda c: c.capsules.get("cl-abc123"), "GET", "/api/v1/capsules/cl-abc123", 200, CAPSULE),
        (
            lambda c: c.capsules.pause("cl-abc123"),
            "POST",
            "/api/v1/capsules/cl-abc123/pause",
            200,
            CAPSULE,
        ),
        (
            lambda c: c.capsules.resume("cl-abc123"),
            "POST",
            "/api/v1/capsules/cl-abc123/resume",
            200,
            CAPSULE,
        ),
        (
            lambda c: c.capsules.ping("cl-abc123"),
            "POST",
            "/api/v1/capsules/cl-abc123/ping",
            204,
            None,
        ),
        (
            lambda c: c.capsules.destroy("cl-abc123"),
            "DELETE",
            "/api/v1/capsules/cl-abc123",
            204,
            None,
        ),
        (lambda c: c.capsules.list(), "GET", "/api/v1/capsules", 200, [CAPSULE]),
    ],
)
def test_capsule_routes(call, method: str, path: str, status: int, body: object) -> None:
    client, rec = client_for(reply(status, body))
    result = call(client)
    assert (rec.last.method, rec.last.url.path) == (method, path)
    assert rec.last.headers["X-API-Key"] == KEY
    if body is None:
        assert result is None
    elif isinstance(body, list):
        assert [c.id for c in result] == ["cl-abc123"]
    else:
        assert isinstance(result, CapsuleInfo)


def test_path_parameters_are_escaped() -> None:
    client, rec = client_for(reply(404, {"error": {"code": "not_found", "message": "x"}}))
    with pytest.raises(WrennNotFoundError):
        client.capsules.get("../v1/snapshots")
    assert rec.last.url.raw_path == b"/api/v1/capsules/..%2Fv1%2Fsnapshots"


def test_capsule_model_parses_datetimes_and_optional_fields() -> None:
    client, _ = client_for(
        reply(
            200,
            {
                **CAPSULE,
                "metadata": {"kernel_version": "6.1"},
                "disk_size_mb": 2048,
                "disk_used_mb": 12,
                "future_field": True,
            },
        )
    )
    info = client.capsules.get("cl-abc123")
    assert info.status is Status.running and str(info.status) == "running"
    assert info.created_at == datetime(2024, 11, 1, 10, 0, tzinfo=UTC)
    assert info.started_at is not None and info.started_at.tzinfo is not None
    assert info.metadata == {"kernel_version": "6.1"}
    assert (info.disk_size_mb, info.disk_used_mb) == (2048, 12)

    bare = CapsuleInfo.model_validate({**CAPSULE, "started_at": None, "last_active_at": None})
    assert bare.started_at is None and bare.metadata is None and bare.disk_used_mb is None
    # A status this SDK does not know yet is kept, not rejected.
    assert CapsuleInfo.model_validate({**CAPSULE, "status": "migrating"}).status == "migrating"


def test_list_returns_models_in_server_order() -> None:
    second = {**CAPSULE, "id": "cl-def456", "status": "paused"}
    client, _ = client_for(reply(200, [CAPSULE, second]))
    capsules = client.capsules.list()
    assert [(c.id, c.status) for c in capsules] == [
        ("cl-abc123", "running"),
        ("cl-def456", "paused"),
    ]


# --- snapshots -----------------------------------------------------------------------------


def test_snapshot_create() -> None:
    client, rec = client_for(reply(201, TEMPLATE))
    template = client.snapshots.create(capsule_id="cl-abc123", name="my-snapshot")
    assert (rec.last.method, rec.last.url.path) == ("POST", "/api/v1/snapshots")
    assert rec.body() == {"sandbox_id": "cl-abc123", "name": "my-snapshot"}
    assert "overwrite" not in rec.last.url.params
    assert isinstance(template, Template) and template.type == "snapshot"
    assert template.created_at == datetime(2024, 11, 1, 10, 0, tzinfo=UTC)

    client.snapshots.create("cl-abc123", overwrite=True)
    assert rec.body() == {"sandbox_id": "cl-abc123"}
    assert rec.last.url.params["overwrite"] == "true"


def test_snapshot_list_and_delete() -> None:
    client, rec = client_for(reply(200, [TEMPLATE, {"name": "minimal", "type": "base"}]))
    names = [t.name for t in client.snapshots.list()]
    assert names == ["my-snapshot", "minimal"]
    assert rec.last.url.path == "/api/v1/snapshots" and not rec.last.url.params
    client.snapshots.list(type="snapshot")
    assert rec.last.url.params["type"] == "snapshot"

    client, rec = client_for(reply(204))
    assert client.snapshots.delete("my-snapshot") is None
    assert (rec.last.method, rec.last.url.path) == ("DELETE", "/api/v1/snapshots/my-snapshot")


# --- errors --------------------------------------------------------------------------------

ERROR_CASES = [
    (400, "invalid_request", WrennValidationError),
    (401, "unauthorized", WrennAuthenticationError),
    (403, "forbidden", WrennForbiddenError),
    (404, "not_found", WrennNotFoundError),
    (409, "invalid_state", WrennConflictError),
    (409, "conflict", WrennConflictError),
    (409, "template_name_taken", WrennConflictError),
    (409, "name_reserved", WrennConflictError),
    (413, "too_large", WrennTooLargeError),
    (500, "internal_error", WrennInternalError),
    (502, "agent_error", WrennAgentError),
    (503, "host_unavailable", WrennHostUnavailableError),
]


@pytest.mark.parametrize(("status", "code", "cls"), ERROR_CASES)
def test_error_body_maps_to_exception_class(status: int, code: str, cls: type) -> None:
    client, _ = client_for(reply(status, {"error": {"code": code, "message": f"boom {code}"}}))
    with pytest.raises(cls) as info:
        client.capsules.get("cl-abc123")
    exc = info.value
    assert isinstance(exc, WrennAPIError) and isinstance(exc, WrennError)
    assert (exc.code, exc.message, exc.status_code) == (code, f"boom {code}", status)
    assert str(exc) == f"{code}: boom {code}"


@pytest.mark.parametrize(("status", "code", "cls"), ERROR_CASES)
async def test_async_error_body_maps_to_exception_class(status: int, code: str, cls: type) -> None:
    client, _ = aclient_for(reply(status, {"error": {"code": code, "message": "boom"}}))
    async with client:
        with pytest.raises(cls) as info:
            await client.capsules.create()
    assert info.value.status_code == status and info.value.code == code


def test_host_has_capsules_carries_ids() -> None:
    body = {"error": {"code": "host_has_capsules", "message": "busy"}, "capsule_ids": ["cl-1"]}
    client, _ = client_for(reply(409, body))
    with pytest.raises(WrennHostHasCapsulesError) as info:
        client.capsules.get("x")
    assert info.value.capsule_ids == ["cl-1"]
    assert isinstance(info.value, WrennConflictError)


def test_error_without_our_shape_falls_back_on_status() -> None:
    client, _ = client_for(lambda r: httpx.Response(502, text="<html>Bad Gateway</html>"))
    with pytest.raises(WrennAgentError) as info:
        client.capsules.list()
    assert info.value.code == "agent_error" and "Bad Gateway" in info.value.message

    client, _ = client_for(reply(422, {"detail": [{"msg": "field required"}]}))
    with pytest.raises(WrennValidationError):
        client.capsules.create()

    client, _ = client_for(reply(418, {"error": {"code": "teapot", "message": "short and stout"}}))
    with pytest.raises(WrennAPIError) as info2:
        client.capsules.list()
    assert type(info2.value) is WrennAPIError and info2.value.code == "teapot"

    # An unknown code on a known status still gets the status's class.
    client, _ = client_for(reply(404, {"error": {"code": "no_such_process", "message": "gone"}}))
    with pytest.raises(WrennNotFoundError):
        client.capsules.list()


# --- transport failures and retries --------------------------------------------------------


def flaky(failures: int, exc: type[httpx.TransportError], then: Handler) -> Handler:
    """Raise ``exc`` for the first ``failures`` requests, then answer normally."""
    count = {"n": 0}

    def answer(request: httpx.Request) -> httpx.Response:
        count["n"] += 1
        if count["n"] <= failures:
            raise exc("connection refused", request=request)
        return then(request)

    return answer


def test_get_is_retried_on_connection_error() -> None:
    client, rec = client_for(flaky(2, httpx.ConnectError, reply(200, CAPSULE)))
    assert client.capsules.get("cl-abc123").id == "cl-abc123"
    assert len(rec.requests) == 3


def test_delete_is_retried_on_read_error() -> None:
    client, rec = client_for(flaky(1, httpx.ReadError, reply(204)))
    client.capsules.destroy("cl-abc123")
    assert [r.method for r in rec.requests] == ["DELETE", "DELETE"]


def test_retries_give_up_with_connection_error() -> None:
    client, rec = client_for(flaky(10, httpx.ConnectError, reply(200, [])))
    with pytest.raises(WrennConnectionError) as info:
        client.capsules.list()
    assert len(rec.requests) == 3
    assert info.value.status_code is None and info.value.code == "connection_error"
    assert isinstance(info.value.__cause__, httpx.ConnectError)


@pytest.mark.parametrize("exc", [httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError])
def test_post_is_never_retried(exc: type[httpx.TransportError]) -> None:
    client, rec = client_for(flaky(1, exc, reply(201, CAPSULE)))
    with pytest.raises(WrennConnectionError):
        client.capsules.create(template="minimal")
    assert len(rec.requests) == 1


def test_timeout_becomes_wrenn_timeout_error() -> None:
    client, rec = client_for(flaky(1, httpx.ReadTimeout, reply(200, CAPSULE)))
    with pytest.raises(WrennTimeoutError) as info:
        client.capsules.pause("cl-abc123")
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, WrennConnectionError)
    assert len(rec.requests) == 1


async def test_async_get_is_retried_and_post_is_not() -> None:
    client, rec = aclient_for(flaky(2, httpx.ConnectError, reply(200, [CAPSULE])))
    async with client:
        assert len(await client.capsules.list()) == 1
    assert len(rec.requests) == 3

    client, rec = aclient_for(flaky(1, httpx.ConnectError, reply(201, CAPSULE)))
    async with client:
        with pytest.raises(WrennConnectionError):
            await client.capsules.create()
    assert len(rec.requests) == 1


async def test_async_capsule_and_snapshot_routes() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/api/v1/snapshots" and request.method == "GET":
            return httpx.Response(200, json=[TEMPLATE])
        if path == "/api/v1/snapshots":
            return httpx.Response(201, json=TEMPLATE)
        if request.method == "DELETE" or path.endswith("/ping"):
            return httpx.Response(204)
        if path == "/api/v1/capsules" and request.method == "GET":
            return httpx.Response(200, json=[CAPSULE])
        return httpx.Response(200, json=CAPSULE)

    client, rec = aclient_for(answer)
    async with client:
        assert (await client.capsules.create(template="minimal")).id == "cl-abc123"
        assert (await client.capsules.get("cl-abc123")).status == "running"
        assert len(await client.capsules.list()) == 1
        await client.capsules.pause("cl-abc123")
        await client.capsules.resume("cl-abc123")
        await client.capsules.ping("cl-abc123")
        await client.capsules.destroy("cl-abc123")
        assert (
            await client.snapshots.create("cl-abc123", name="s", overwrite=True)
        ).name == "my-snapshot"
        assert [t.name for t in await client.snapshots.list(type="snapshot")] == ["my-snapshot"]
        await client.snapshots.delete("my-snapshot")
    assert [(r.method, r.url.path) for r in rec.requests] == [
        ("POST", "/api/v1/capsules"),
        ("GET", "/api/v1/capsules/cl-abc123"),
        ("GET", "/api/v1/capsules"),
        ("POST", "/api/v1/capsules/cl-abc123/pause"),
        ("POST", "/api/v1/capsules/cl-abc123/resume"),
        ("POST", "/api/v1/capsules/cl-abc123/ping"),
        ("DELETE", "/api/v1/capsules/cl-abc123"),
        ("POST", "/api/v1/snapshots"),
        ("GET", "/api/v1/snapshots"),
        ("DELETE", "/api/v1/snapshots/my-snapshot"),
    ]
    assert json.loads(rec.requests[7].content) == {"sandbox_id": "cl-abc123", "name": "s"}
    assert rec.requests[7].url.params["overwrite"] == "true"


def test_public_names() -> None:
    for name in wrenn.__all__:
        assert hasattr(wrenn, name), name
    # Names and import paths code written for the published SDK uses.
    from wrenn.exceptions import WrennNotFoundError as E
    from wrenn.models import Capsule as CapsuleModel

    assert E is WrennNotFoundError and CapsuleModel is CapsuleInfo
    assert (
        wrenn.CommandResult is wrenn.ExecResult and wrenn.CommandHandle is wrenn.BackgroundProcess
    )


# --- networking ----------------------------------------------------------------------------


def test_create_sends_network_fields_only_when_given() -> None:
    client, rec = client_for(reply(201, {**CAPSULE, "allow_internet_access": False,
                                         "network": {"allow_out": ["pypi.org"], "deny_out": []}}))
    with client:
        client.capsules.create("minimal")
        assert rec.body() == {"template": "minimal"}
        info = client.capsules.create(allow_internet_access=False, network={"allow_out": ["pypi.org"]})
    assert rec.body() == {"allow_internet_access": False, "network": {"allow_out": ["pypi.org"]}}
    assert info.allow_internet_access is False and info.network.allow_out == ["pypi.org"]


async def test_update_network_patches_sync_and_async() -> None:
    client, rec = client_for(reply(200, CAPSULE))
    with client:
        client.capsules.update_network("cl-abc123", network={"deny_out": ["10.0.0.0/8"]})
    assert (rec.last.method, rec.last.url.path) == ("PATCH", "/api/v1/capsules/cl-abc123/network")
    assert rec.body() == {"network": {"deny_out": ["10.0.0.0/8"]}}
    aclient, arec = aclient_for(reply(200, CAPSULE))
    async with aclient:
        await aclient.capsules.update_network("cl-abc123", allow_internet_access=True)
    assert arec.last.method == "PATCH" and arec.body() == {"allow_internet_access": True}


def test_update_network_bad_entry_is_validation_error() -> None:
    client, _ = client_for(reply(400, {"error": {"code": "invalid_request", "message": "allow_out: 'x y' is not"}}))
    with client, pytest.raises(WrennValidationError, match="x y"):
        client.capsules.update_network("cl-abc123", network={"allow_out": ["x y"]})
