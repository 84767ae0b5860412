"""The guest agent's `defaults` op (a template's USER, WORKDIR, ENV), on the real agent."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile

import pytest

from tests.unit.test_guest_agent import agent, c, run  # noqa: F401  (fixtures)
from wrenn_host.api import GuestError

NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
def work():
    # not under pytest's tmp_path: its parents are root-only, and nobody must be able to enter it
    from pathlib import Path
    d = Path(tempfile.mkdtemp(prefix="wrenn-defaults-"))
    d.chmod(0o755)
    os.chown(d, NOBODY.pw_uid, NOBODY.pw_gid)
    yield d
    shutil.rmtree(d)


async def test_defaults_apply_to_exec_spawn_and_files(c, work):  # noqa: F811
    res, _ = await c.call("defaults", user="nobody", cwd=str(work), envs={"GREETING": "hi", "HOME": "/x"})
    assert {k: res[k] for k in ("user", "uid", "cwd", "envs")} == {
        "user": "nobody", "uid": NOBODY.pw_uid, "cwd": str(work), "envs": {"GREETING": "hi", "HOME": "/x"}}
    _, out, _ = await run(c, "sh", "-c", 'id -un; pwd; echo "$GREETING $HOME"')
    assert out.decode().splitlines() == ["nobody", str(work), "hi /x"]
    # the call's own envs and cwd still win
    _, out, _ = await run(c, "sh", "-c", 'pwd; echo "$GREETING"', envs={"GREETING": "yo"}, cwd="/")
    assert out.decode().splitlines() == ["/", "yo"]
    # relative file paths start at the default cwd; new files belong to the default user
    await c.upload("file_write", b"data", path="sub/new.txt")
    assert (work / "sub" / "new.txt").read_bytes() == b"data"
    assert (work / "sub").stat().st_uid == NOBODY.pw_uid
    assert (work / "sub" / "new.txt").stat().st_uid == NOBODY.pw_uid
    got, _ = await c.call("get_defaults")
    assert got["user"] == "nobody"
    # later calls change only what they name; envs merge (null removes)
    res, _ = await c.call("defaults", envs={"OTHER": "1", "HOME": None})
    assert res["user"] == "nobody" and res["cwd"] == str(work) and res["envs"] == {"GREETING": "hi", "OTHER": "1"}
    _, out, _ = await run(c, "sh", "-c", 'echo "$HOME"')
    assert out == f"{NOBODY.pw_dir}\n".encode()
    # back to root
    res, _ = await c.call("defaults", reset=True)
    assert res["envs"] == {} and res["user"] == "root"
    _, out, _ = await run(c, "id", "-u")
    assert out == b"0\n"


async def test_defaults_errors(c, tmp_path):  # noqa: F811
    with pytest.raises(GuestError) as e:
        await c.call("defaults", user="no-such-user-xyz")
    assert e.value.code == "not_found"
    with pytest.raises(GuestError) as e:
        await c.call("defaults", cwd=str(tmp_path / "missing"))
    assert e.value.code == "not_found"
    with pytest.raises(GuestError) as e:
        await c.call("defaults", envs={"A=B": "c"})
    assert e.value.code == "invalid"
