"""The guest gateway (wrenn_control/gateway.py) and the host directory, against the fake host agent:
what every capsule route relies on when it reaches a guest."""

from __future__ import annotations

import asyncio

import pytest

from wrenn_control.errors import APIError
from wrenn_control.hosts import HostDirectory, HostUnavailable
from wrenn_host.api import CapsuleNotFound, GuestError, VMMError

from .fake_host_agent import FakeHostAgent, make_settings, running_app


@pytest.fixture
async def h(tmp_path):
    async with running_app(make_settings(tmp_path)) as harness:
        yield harness


@pytest.fixture
async def cap(h):
    return await h.running_capsule()


def _gateway(h):
    return h.app.state.gateway


async def _team(h, cap):
    return (await h.app.state.ops.get(cap["id"])).team_id


async def _status(h, cid):
    return (await h.client.get(f"/v1/capsules/{cid}")).json()


async def test_directory_holds_the_local_host():
    host = FakeHostAgent()
    hosts = HostDirectory(host)
    assert await hosts.for_capsule(None) is host and await hosts.for_capsule("local") is host
    assert hosts.local() is host and hosts.all() == [("local", host)]
    with pytest.raises(HostUnavailable) as e:
        await hosts.for_capsule("h-elsewhere")
    assert (e.value.status, e.value.code) == (503, "host_unavailable")
    assert HostDirectory().local() is None and HostDirectory().all() == []


async def test_app_wires_one_directory(h):
    state = h.app.state
    assert state.ops.hosts is state.hosts and state.gateway.hosts is state.hosts
    assert state.hosts.local() is h.fake and state.ops.host is h.fake


async def test_unknown_and_other_teams_capsules_are_404(h, cap):
    gateway = _gateway(h)
    team = await _team(h, cap)
    assert (await gateway.capsule(cap["id"], team)).id == cap["id"]
    assert (await gateway.capsule(cap["id"], None)).id == cap["id"]  # the port proxy's view: any team
    for cid, team_id in (("cl-doesnotexist", team), (cap["id"], "tm-other"), ("cl-doesnotexist", None)):
        with pytest.raises(APIError) as e:
            await gateway.capsule(cid, team_id)
        assert (e.value.status, e.value.code, e.value.message) == (404, "not_found", "capsule not found")


@pytest.mark.parametrize("activity", [False, True])
async def test_not_running_is_409_and_no_activity(h, cap, activity):
    await h.client.post(f"/v1/capsules/{cap['id']}/pause")
    row = (await h.app.state.ops.get(cap["id"]))
    with pytest.raises(APIError) as e:
        async with _gateway(h).open(row, activity=activity):
            raise AssertionError("opened a paused capsule")
    assert (e.value.status, e.value.code, e.value.message) == (409, "invalid_state",
                                                               "capsule is paused; it must be running")
    with pytest.raises(APIError) as e:
        async with _gateway(h).open(row, purpose="to reach its ports"):
            pass
    assert e.value.message == f"capsule {cap['id']} is paused; it must be running to reach its ports"
    assert (await _status(h, cap["id"]))["last_active_at"] is None
    assert not h.app.state.ops.is_busy(cap["id"])


async def test_a_row_read_before_a_pause_is_checked_again_when_recording_activity(h, cap):
    row = (await h.app.state.ops.get(cap["id"]))  # still says running
    await h.client.post(f"/v1/capsules/{cap['id']}/pause")
    with pytest.raises(APIError) as e:
        async with _gateway(h).open(row, activity=True):
            pass
    assert e.value.message == "capsule is paused; it must be running"


async def test_activity_recorded_and_busy_while_open(h, cap):
    ops = h.app.state.ops
    row = (await ops.get(cap["id"]))
    async with _gateway(h).open(row) as guest:
        assert ops.is_busy(cap["id"]) and guest.id == cap["id"] and guest.host is h.fake
        assert (await guest.exec("echo", ["hi"])).stdout == b"echo hi\n"
    assert not ops.is_busy(cap["id"])
    assert (await _status(h, cap["id"]))["last_active_at"] is None  # file and process calls: no activity
    async with _gateway(h).open(row, activity=True):
        pass
    assert (await _status(h, cap["id"]))["last_active_at"] is not None


async def test_unknown_host_is_503(h, cap):
    row = (await h.app.state.ops.get(cap["id"]))
    row.host_id = "h-gone"  # as a fleet's row of a host this control plane does not know
    with pytest.raises(APIError) as e:
        async with _gateway(h).open(row):
            pass
    assert (e.value.status, e.value.code) == (503, "host_unavailable")
    assert not h.app.state.ops.is_busy(cap["id"])


async def test_guest_errors_are_the_users(h, cap):
    row = (await h.app.state.ops.get(cap["id"]))
    async with _gateway(h).open(row) as guest:
        with pytest.raises(APIError) as e:
            await guest.exec("ls", [], cwd="/nowhere")
        assert (e.value.status, e.value.code, e.value.message) == (404, "not_found", "no such directory: /nowhere")
        await guest.spawn("sleep", ["9"], tag="web")
        with pytest.raises(APIError) as e:
            await guest.spawn("sleep", ["9"], tag="web")
        assert (e.value.status, e.value.code) == (409, "conflict")  # the tag is held by a live process
        with pytest.raises(APIError) as e:
            await guest.tcp_connect(8123)
        assert (e.value.status, e.value.code) == (502, "agent_error")
        assert e.value.message == f"nothing is listening on port 8123 in capsule {cap['id']}"
    assert (await _status(h, cap["id"]))["status"] == "running"


async def test_a_vanished_vm_is_502_and_marks_the_capsule_error(h, cap):
    row = (await h.app.state.ops.get(cap["id"]))
    h.fake.crash(cap["id"])
    async with _gateway(h).open(row) as guest:
        with pytest.raises(APIError) as e:
            await guest.processes()
    assert (e.value.status, e.value.code) == (502, "agent_error")
    assert isinstance(e.value.__cause__, CapsuleNotFound)
    got = await _status(h, cap["id"])
    assert got["status"] == "error"


async def test_a_vmm_failure_with_the_vm_still_running_leaves_it_running(h, cap):
    row = (await h.app.state.ops.get(cap["id"]))
    h.fake.fail("list_dir", VMMError("guest connection reset"))
    async with _gateway(h).open(row) as guest:
        with pytest.raises(APIError) as e:
            await guest.list_dir("/tmp")
    assert (e.value.status, e.value.code, e.value.message) == (502, "agent_error", "guest connection reset")
    assert (await _status(h, cap["id"]))["status"] == "running"


async def test_a_call_cut_short_by_a_pause_is_409(h, cap):
    ops = h.app.state.ops
    ops.drain_sec = 0.05  # the pause does not wait for the slow call
    row = (await ops.get(cap["id"]))
    h.fake.delays["exec"] = 0.5
    h.fake.fail("exec", CapsuleNotFound("the VM is paused"))  # what the call meets once it is

    async def slow_exec():
        async with _gateway(h).open(row) as guest:
            await guest.exec("sleep", ["1"])

    call = asyncio.ensure_future(slow_exec())
    await asyncio.sleep(0.05)
    assert await ops.pause(cap["id"])
    with pytest.raises(APIError) as e:
        await call
    assert (e.value.status, e.value.code) == (409, "invalid_state")
    assert e.value.message == "capsule became paused during the call"
    assert (await _status(h, cap["id"]))["status"] == "paused"


async def test_a_pause_waits_for_calls_in_flight(h, cap):
    ops = h.app.state.ops
    row = (await ops.get(cap["id"]))
    h.fake.delays["exec"] = 0.3

    async def slow_exec():
        async with _gateway(h).open(row) as guest:
            return await guest.exec("sleep", ["0.3"])

    call = asyncio.ensure_future(slow_exec())
    await asyncio.sleep(0.05)
    assert await ops.pause(cap["id"])
    assert call.done() and (await call).exit_code == 0  # it ended before the VM stopped


async def test_a_read_stream_keeps_the_capsule_busy_until_read(h, cap):
    ops = h.app.state.ops
    h.fake.capsules[cap["id"]].files["/tmp/big"] = b"x" * (200 * 1024)
    async with _gateway(h).open((await ops.get(cap["id"]))) as guest:
        stream = guest.read_file("/tmp/big")
        first = await anext(stream)
    assert ops.is_busy(cap["id"])  # the response body is still to be sent
    rest = b"".join([chunk async for chunk in stream])
    assert len(first + rest) == 200 * 1024
    assert not ops.is_busy(cap["id"])


async def test_a_missing_file_fails_the_first_read(h, cap):
    async with _gateway(h).open((await h.app.state.ops.get(cap["id"]))) as guest:
        with pytest.raises(APIError) as e:
            await anext(guest.read_file("/tmp/nothing"))
    assert (e.value.status, e.value.code) == (404, "not_found")
    assert not h.app.state.ops.is_busy(cap["id"])


async def test_an_unexpected_guest_error_code_is_502(h, cap):
    h.fake.fail("remove", GuestError("the disk is on fire", code="io_error"))
    async with _gateway(h).open((await h.app.state.ops.get(cap["id"]))) as guest:
        with pytest.raises(APIError) as e:
            await guest.remove("/tmp/x")
    assert (e.value.status, e.value.code, e.value.message) == (502, "agent_error", "the disk is on fire")
    assert (await _status(h, cap["id"]))["status"] == "running"
