"""Templates and paused capsules move between two hosts over the host agent service (the wire a
fleet uses): the archive is streamed out of one service and into the other, the receiver checks
it against the manifest, and the hosts' heartbeats then list what they received. Fake host
agents (with the real archive format) behind real services on loopback ports."""

from __future__ import annotations

import contextlib

import pytest

from tests.hostservice import serving
from tests.unit.fake_host_agent import FakeHostAgent
from wrenn_control.hosts.remote import RemoteHostAgent
from wrenn_control.hosts.transfer import move_paused_capsule, move_template
from wrenn_host.api import HostAgentError


@contextlib.asynccontextmanager
async def two_hosts():
    a, b = FakeHostAgent(), FakeHostAgent()
    async with serving(a) as (url_a, token_a, app_a), serving(b) as (url_b, token_b, app_b):
        remote_a, remote_b = RemoteHostAgent(url_a, token_a), RemoteHostAgent(url_b, token_b)
        try:
            yield a, b, remote_a, remote_b, app_b
        finally:
            await remote_a.close()
            await remote_b.close()


async def test_a_paused_capsule_and_its_template_move_over_the_wire() -> None:
    async with two_hosts() as (a, b, ra, rb, app_b):
        await ra.create("cl-src", "minimal", 1, 512)
        await ra.write_file("cl-src", "/root/kept.txt", b"made on a")
        await ra.snapshot("cl-src", "tpl-1")  # leaves it paused
        await ra.create("cl-moving", "tpl-1", None, None)
        await ra.write_file("cl-moving", "/tmp/state", b"in flight")
        await ra.pause("cl-moving")

        moved = await move_paused_capsule(ra, rb, "cl-moving", "tpl-1")
        assert moved.template.moved and moved.transfer.bytes > 0 and moved.source_removed
        assert "tpl-1" in b.templates and (await rb.get("cl-moving")).state == "paused"
        assert "cl-moving" not in a.capsules
        await rb.resume("cl-moving")
        assert await rb.read_file("cl-moving", "/tmp/state") == b"in flight"
        # a capsule made on b from the moved template has the snapshot's files
        await rb.create("cl-new", "tpl-1", None, None)
        assert await rb.read_file("cl-new", "/root/kept.txt") == b"made on a"
        # the receiving service's heartbeat lists both
        inventory = await app_b.app.state.book.inventory()  # (app_b: the token check around the app)
        assert "tpl-1" in inventory.templates and {"cl-moving", "cl-new"} <= set(inventory.capsules)
        # a template b holds is not sent again
        assert not (await move_template(ra, rb, "tpl-1")).moved


async def test_damage_in_flight_is_refused_and_nothing_is_installed() -> None:
    async with two_hosts() as (a, b, ra, rb, _):
        await ra.create("cl-x", "minimal", 1, 512)
        await ra.pause("cl-x")
        a.archive_tamper = lambda chunk: chunk[:-1] + bytes([chunk[-1] ^ 1])
        with pytest.raises(HostAgentError) as err:
            await move_paused_capsule(ra, rb, "cl-x", "minimal")
        assert err.value.code == "checksum_mismatch"
        assert "cl-x" not in b.capsules and a.capsules["cl-x"].state == "paused"
        with pytest.raises(HostAgentError) as err:  # a running capsule cannot be moved
            await ra.resume("cl-x")
            await ra.archive_manifest("capsule", "cl-x")
        assert err.value.code == "invalid_state"
