"""The host contract's results cross a network as JSON (`api.to_wire` / `api.from_wire`): every
dataclass comes back equal, bytes survive as base64, a newer peer's extra fields are ignored."""

from __future__ import annotations

import json

import pytest

from wrenn_host import api

SAMPLES = [
    api.CapsuleRuntime("cl-1", "running", "minimal", 1, 512, {"kernel_version": "6.1"}),
    api.TemplateRuntime("tpl-1", 2, 1024, 123456, version="abc"),
    api.ExecResult(b"out\x00\xff", b"err", 3, 12, timed_out=True, stdout_truncated=True),
    api.ProcessInfo(7, "web", "python3", ["-m", "http.server"], True, None),
    api.StreamEvent("exit", exit_code=0),
    api.StreamEvent("stdout", data=bytes(range(256))),
    api.ReconcileReport(["a"], ["b"], ["c"], {"d": "bad meta.json"}),
    api.FileInfo("x", "/root/x", "symlink", 4, 0o777, "rwxrwxrwx", "root", "root",
                 "2026-12-01T10:00:00Z", symlink_target="/etc/hosts"),
    api.CapsuleMetrics(cpu_pct=12.5, mem_bytes=1 << 30, disk_bytes=None, disk_size_bytes=2 << 30),
    api.GuestDefaults("app", 1000, "/srv", {"A": "1"}),
    api.HostLimits(max_vcpus=2, min_memory_mb=128, max_memory_mb=18432),
]


@pytest.mark.parametrize("obj", SAMPLES, ids=lambda o: type(o).__name__)
def test_every_result_round_trips_through_json(obj):
    wire = json.loads(json.dumps(api.to_wire(obj)))
    assert api.from_wire(type(obj), wire) == obj


def test_lists_and_extra_fields():
    entries = [SAMPLES[7], api.FileInfo("d", "/d", "directory", 0, 0o755, "rwxr-xr-x", "root", "root", "t")]
    wire = json.loads(json.dumps(api.to_wire(entries)))
    assert api.from_wire(list[api.FileInfo], wire) == entries
    newer = {**api.to_wire(SAMPLES[4]), "added_in_a_later_version": 1}
    assert api.from_wire(api.StreamEvent, newer) == SAMPLES[4]
    with pytest.raises(ValueError):
        api.from_wire(api.ExecResult, ["not", "an", "object"])


def test_the_one_shape_check_names_the_bounds():
    limits = api.HostLimits(max_vcpus=2, min_memory_mb=128, max_memory_mb=1024)
    limits.check(2, 1024)
    with pytest.raises(api.InvalidShape, match="vcpus must be between 1 and 2, got 3"):
        limits.check(3, 512)
    with pytest.raises(api.InvalidShape, match="memory_mb must be between 128 and 1024, got 64"):
        limits.check(1, 64)
