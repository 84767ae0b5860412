"""Snapshot templates through the REST API: create, list, delete, and capsules made from them."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import qemu_pids
from tests.e2e.test_api_capsules import Api, assert_error, other_team, parse_ts  # noqa: F401 (fixture)

pytestmark = pytest.mark.vm

TEMPLATE_FIELDS = {"name", "type", "vcpus", "memory_mb", "size_bytes", "created_at"}


@pytest.fixture(scope="module")
def api(wrenn_server) -> Iterator[Api]:
    a = Api(wrenn_server)
    names: list[str] = []
    a.snapshot_names = names  # type: ignore[attr-defined]
    yield a
    for name in names:
        a.delete(f"/v1/snapshots/{name}")
    a.cleanup()


def _name(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def snapshot(api: Api, cid: str, name: str | None = None, expect: int = 201, **params: Any) -> dict[str, Any]:
    body = {"sandbox_id": cid} if name is None else {"sandbox_id": cid, "name": name}
    resp = api.post("/v1/snapshots", json=body, params=params)
    assert resp.status_code == expect, resp.text
    out = resp.json()
    if expect == 201:
        assert set(out) >= TEMPLATE_FIELDS, out
        api.snapshot_names.append(out["name"])  # type: ignore[attr-defined]
    return out


def templates(api: Api, **params: str) -> dict[str, dict[str, Any]]:
    resp = api.get("/v1/snapshots", params=params)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert isinstance(out, list)
    for t in out:
        assert set(t) >= TEMPLATE_FIELDS, t
    return {t["name"]: t for t in out}


@pytest.fixture(scope="module")
def source(api: Api) -> dict[str, Any]:
    """A 2-vCPU 1 GiB capsule with a file, a value in RAM and a running process, then snapshotted."""
    cap = api.running(template="base-python", vcpus=2, memory_mb=1024)
    cid = cap["id"]
    api.sh(cid, "echo on-disk > /root/state.txt; echo in-ram > /dev/shm/state.txt")
    started = api.post(f"/v1/capsules/{cid}/exec", json={
        "cmd": "/bin/sh", "args": ["-c", "while true; do date +%s%N > /tmp/tick.new; mv /tmp/tick.new /tmp/tick; sleep 0.2; done"],
        "background": True, "tag": "ticker"})
    assert started.status_code == 202, started.text
    name = _name("api-snap")
    template = snapshot(api, cid, name)
    return {"id": cid, "name": name, "template": template, "pid": started.json()["pid"]}


def test_snapshot_fields_and_source_left_paused(api: Api, source: dict[str, Any]) -> None:
    t = source["template"]
    assert (t["name"], t["type"], t["vcpus"], t["memory_mb"]) == (source["name"], "snapshot", 2, 1024)
    assert type(t["size_bytes"]) is int and t["size_bytes"] > 0
    assert parse_ts(t["created_at"])
    src = api.get_capsule(source["id"])
    assert src["status"] == "paused"
    assert qemu_pids(source["id"]) == []
    listed = templates(api)
    assert listed[source["name"]] == t


def test_list_filters_and_builtins(api: Api, source: dict[str, Any]) -> None:
    everything = templates(api)
    base = templates(api, type="base")
    snaps = templates(api, type="snapshot")
    assert set(base) == {"minimal", "base-python", "code-runner-beta"}
    assert all(t["type"] == "base" for t in base.values())
    assert source["name"] in snaps and all(t["type"] == "snapshot" for t in snaps.values())
    assert set(everything) == set(base) | set(snaps)
    assert set(list(everything)[:len(base)]) == set(base)  # built-in ones first


def test_capsule_from_snapshot_has_its_files_process_and_shape(api: Api, source: dict[str, Any]) -> None:
    clone = api.create(template=source["name"])
    assert (clone["template"], clone["vcpus"], clone["memory_mb"]) == (source["name"], 2, 1024)
    cid = api.wait(clone["id"])["id"]
    out = api.sh(cid, "cat /root/state.txt /dev/shm/state.txt; nproc")
    assert out["stdout"] == "on-disk\nin-ram\n2\n"
    mem_kb = int(api.sh(cid, "grep MemTotal /proc/meminfo")["stdout"].split()[1])
    assert 900_000 < mem_kb <= 1024 * 1024
    # The process that was running in the source runs on in the clone.
    procs = {p["tag"]: p for p in api.get(f"/v1/capsules/{cid}/processes").json()["processes"]}
    assert procs["ticker"]["pid"] == source["pid"] and procs["ticker"].get("running", True)
    first = api.sh(cid, "cat /tmp/tick")["stdout"]
    time.sleep(0.8)
    assert api.sh(cid, f"kill -0 {source['pid']} && cat /tmp/tick")["stdout"] != first  # still ticking
    # The clone is its own machine: changing it leaves the template alone.
    api.sh(cid, "echo changed > /root/state.txt")
    other = api.running(template=source["name"])
    assert api.sh(other["id"], "cat /root/state.txt")["stdout"] == "on-disk\n"
    for c in (cid, other["id"]):
        api.destroy(c)
    # And the source capsule resumes as it was.
    assert api.post(f"/v1/capsules/{source['id']}/resume").status_code == 200
    api.wait(source["id"])
    assert api.sh(source["id"], "cat /dev/shm/state.txt")["stdout"] == "in-ram\n"


def test_snapshot_shape_is_fixed(api: Api, source: dict[str, Any]) -> None:
    err = assert_error(api.post("/v1/capsules", json={"template": source["name"], "vcpus": 1}), 400,
                       "invalid_request")
    assert "vcpus" in err["message"]
    assert_error(api.post("/v1/capsules", json={"template": source["name"], "memory_mb": 512}), 400,
                 "invalid_request")
    # Asking for the template's own shape is fine.
    cap = api.create(template=source["name"], vcpus=2, memory_mb=1024)
    api.destroy(cap["id"])


def test_name_taken_overwrite_and_reserved(api: Api) -> None:
    cap = api.running()
    cid = cap["id"]
    name = _name("api-dup")
    first = snapshot(api, cid, name)
    assert api.get_capsule(cid)["status"] == "paused"
    # A paused capsule can be snapshotted too; the name is taken.
    err = assert_error(api.post("/v1/snapshots", json={"sandbox_id": cid, "name": name}), 409,
                       "template_name_taken")
    assert name in err["message"]
    assert_error(api.post("/v1/snapshots", params={"overwrite": "false"}, json={"sandbox_id": cid, "name": name}),
                 409, "template_name_taken")

    # overwrite=true replaces it, with the new state.
    assert api.post(f"/v1/capsules/{cid}/resume").status_code == 200
    api.wait(cid)
    api.sh(cid, "echo second > /tmp/version")
    second = snapshot(api, cid, name, overwrite="true")
    assert second["name"] == name and parse_ts(second["created_at"]) >= parse_ts(first["created_at"])
    assert [n for n in templates(api) if n == name] == [name]
    clone = api.running(template=name)
    assert api.sh(clone["id"], "cat /tmp/version")["stdout"] == "second\n"
    api.destroy(clone["id"])

    for reserved in ("minimal", "base-python"):
        assert_error(api.post("/v1/snapshots", json={"sandbox_id": cid, "name": reserved}), 409, "name_reserved")
        assert_error(api.post("/v1/snapshots", params={"overwrite": "true"},
                              json={"sandbox_id": cid, "name": reserved}), 409, "name_reserved")

    # Without a name: template-<8 hex>.
    generated = snapshot(api, cid)
    assert re.fullmatch(r"template-[0-9a-f]{8}", generated["name"]), generated
    api.destroy(cid)


def test_snapshot_of_a_capsule_in_the_wrong_state(api: Api) -> None:
    cap = api.running()
    api.destroy(cap["id"])
    assert_error(api.post("/v1/snapshots", json={"sandbox_id": cap["id"], "name": _name("x")}), 409,
                 "invalid_state")
    assert_error(api.post("/v1/snapshots", json={"sandbox_id": "cl-" + "0" * 25, "name": _name("x")}), 404,
                 "not_found")


def test_delete(api: Api) -> None:
    cap = api.running()
    name = _name("api-del")
    snapshot(api, cap["id"], name)
    resp = api.delete(f"/v1/snapshots/{name}")
    assert resp.status_code == 204 and resp.content == b""
    assert name not in templates(api)
    assert_error(api.delete(f"/v1/snapshots/{name}"), 404, "not_found")
    err = assert_error(api.post("/v1/capsules", json={"template": name}), 400, "invalid_request")
    assert name in err["message"]
    for builtin in ("minimal", "base-python"):
        assert_error(api.delete(f"/v1/snapshots/{builtin}"), 403, "forbidden")
    assert {"minimal", "base-python"} <= set(templates(api))
    # The name can be used again after a delete.
    snapshot(api, cap["id"], name)
    assert name in templates(api)
    api.destroy(cap["id"])


def test_templates_are_per_team(api: Api, other_team: Api, source: dict[str, Any]) -> None:  # noqa: F811
    name = source["name"]
    assert name not in templates(other_team)
    assert set(templates(other_team)) == {"minimal", "base-python", "code-runner-beta"}
    assert_error(other_team.post("/v1/capsules", json={"template": name}), 400, "invalid_request")
    assert_error(other_team.delete(f"/v1/snapshots/{name}"), 404, "not_found")
    # The other team may use the same name for its own template.
    theirs = other_team.running()
    resp = other_team.post("/v1/snapshots", json={"sandbox_id": theirs["id"], "name": name})
    assert resp.status_code == 201, resp.text
    assert templates(api)[name]["vcpus"] == 2 and templates(other_team)[name]["vcpus"] == 1
    clone = other_team.running(template=name)
    assert clone["vcpus"] == 1
    assert other_team.delete(f"/v1/snapshots/{name}").status_code == 204
    assert name in templates(api)  # theirs went, mine stays
    other_team.destroy(clone["id"])
    other_team.destroy(theirs["id"])


def test_boot_failure_is_reported_as_error(api: Api, wrenn_server) -> None:
    """A create the host agent cannot carry out (here: the template's files are gone) answers 502 and ends in
    status `error` with the reason in metadata.error; it can be destroyed, and nothing is left."""
    import sqlite3

    cap = api.running()
    name = _name("api-broken")
    snapshot(api, cap["id"], name)
    with sqlite3.connect(wrenn_server.data_dir / "wrenn.db") as db:
        (template_id,) = db.execute("SELECT id FROM templates WHERE name = ?", (name,)).fetchone()
    (meta,) = wrenn_server.data_dir.glob(f"**/templates/{template_id}/meta.json")
    hidden = meta.with_name("meta.json.hidden")
    meta.rename(hidden)
    try:
        # The server waits for the boot: the host agent's failure is the create's answer (502).
        err = assert_error(api.post("/v1/capsules", json={"template": name}), 502, "agent_error")
        assert err["message"]
        broken = next(c for c in api.get("/v1/capsules").json() if c["template"] == name)
        api.created.append(broken["id"])
        obj = api.get_capsule(broken["id"])
        assert obj["status"] == "error", obj
        assert obj["started_at"] is None and obj["metadata"].get("error"), obj
        assert_error(api.post(f"/v1/capsules/{broken['id']}/exec", json={"cmd": "true"}), 409, "invalid_state")
        api.destroy(broken["id"])
        assert api.get_capsule(broken["id"])["status"] == "stopped"
        assert qemu_pids(broken["id"]) == []
    finally:
        hidden.rename(meta)
    # With its files back, the template works again.
    again = api.running(template=name)
    api.destroy(again["id"])
    api.destroy(cap["id"])
