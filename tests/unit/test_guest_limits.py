"""The real guest agent (a subprocess, as in test_guest_agent.py): exec output cap, NUL bytes
and bad env names, and paths normalised before the root guard."""

from __future__ import annotations

import sys

import pytest

from wrenn_guest.files import normalise
from wrenn_host.api import GuestError

from .test_guest_agent import agent, run  # noqa: F401  (fixtures)

MIB = 1024 * 1024


@pytest.fixture
def c(agent):  # noqa: F811
    return agent.client


async def test_exec_output_past_the_cap_is_dropped_and_flagged(c):
    code = "import sys; sys.stdout.buffer.write(b'o' * 3_000_000); sys.stderr.buffer.write(b'e' * 10)"
    header, out, err = await run(c, sys.executable, "-c", code, max_output_bytes=MIB)
    assert header["exit_code"] == 0 and not header["timed_out"]
    assert out == b"o" * MIB and err == b"e" * 10
    assert header["stdout_truncated"] is True and header["stderr_truncated"] is False


async def test_a_command_printing_300_mb_runs_to_its_end(c):
    header, out, err = await run(c, "sh", "-c", "head -c 300000000 /dev/zero; echo done >&2; exit 4",
                                 max_output_bytes=16 * MIB, timeout_sec=120)
    assert header["exit_code"] == 4 and header["stdout_truncated"] and len(out) == 16 * MIB
    assert err == b"done\n"


async def test_exec_under_the_cap_and_with_stdin_is_whole(c):
    import base64

    data = b"x" * 200_000
    header, out, _ = await run(c, "cat", stdin=base64.b64encode(data).decode())
    assert out == data and header["stdout_truncated"] is False


async def test_timeout_still_kills_with_the_output_so_far(c):
    header, out, _ = await run(c, "sh", "-c", "echo before; exec sleep 30", timeout_sec=0.5)
    assert header["timed_out"] and header["exit_code"] == -9 and out == b"before\n"


@pytest.mark.parametrize("params", [
    {"cmd": "echo\x00"}, {"cmd": "echo", "args": ["a\x00"]}, {"cmd": "env", "envs": {"A": "\x00"}},
    {"cmd": "env", "envs": {"A=B": "1"}}, {"cmd": "env", "envs": {"": "1"}}, {"cmd": "pwd", "cwd": "/\x00"},
])
async def test_nul_and_bad_env_names_are_invalid(c, params):
    for op in ("exec", "spawn"):
        with pytest.raises(GuestError) as info:
            await c.call(op, **params)
        assert info.value.code == "invalid"


@pytest.mark.parametrize("path", ["/", "//", "///", "/./", "//tmp/..", "/root/../.."])
async def test_remove_refuses_the_root_in_every_spelling(c, path):
    with pytest.raises(GuestError) as info:
        await c.call("remove", path=path)
    assert info.value.code == "invalid" and "refusing" in info.value.message


def test_normalise():
    assert normalise("//") == "/" and normalise("//tmp//x/./y/") == "/tmp/x/y"
    assert normalise("a/../b") == "/root/b"


async def test_a_name_too_long_is_invalid_not_internal(c):
    for op in ("stat", "mkdir", "remove", "list"):
        with pytest.raises(GuestError) as info:
            await c.call(op, path="/tmp/" + "a" * 300)
        assert info.value.code == "invalid", (op, info.value.code)
