"""Image builder pieces, host paths and the accelerator choice (no VM needed)."""

from __future__ import annotations

import dataclasses
import gzip
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wrenn_cli.main import app
from wrenn_host.paths import HostPaths, check_id
from wrenn_host.templates import sparse_copy
from wrenn_host.vmm import accel
from wrenn_host.vmm.qemu import MachineFiles, MachineSpec, build_argv
from wrenn_images import builder
from wrenn_images.recipes import TEMPLATES, RootfsRecipe


def fake_elf(size: int = 200_000) -> bytes:
    return b"\x7fELF" + os.urandom(size)


@pytest.mark.skipif(shutil.which("lz4") is None, reason="lz4 not installed")
def test_extract_vmlinux_from_lz4_bzimage():
    elf = fake_elf()
    packed = subprocess.run(["lz4", "-l", "-c"], input=elf, capture_output=True, check=True).stdout
    bzimage = b"MZ" + os.urandom(5000).replace(b"\x02!L\x18", b"xxxx") + packed + b"\x00" * 64
    assert builder.extract_vmlinux(bzimage) == elf


def test_extract_vmlinux_from_gzip_bzimage():
    elf = fake_elf()
    bzimage = b"MZ" + b"\x00" * 3000 + gzip.compress(elf)
    assert builder.extract_vmlinux(bzimage) == elf


def test_extract_vmlinux_rejects_garbage():
    with pytest.raises(builder.BuildError):
        builder.extract_vmlinux(b"MZ" + b"\x00" * 4096)


def test_recipe_keys_follow_the_recipe():
    minimal = TEMPLATES["minimal"]
    assert minimal.tree_key() == RootfsRecipe("minimal", tuple(reversed(minimal.packages))).tree_key()
    bigger = dataclasses.replace(minimal, packages=minimal.packages + ("git",))
    assert bigger.tree_key() != minimal.tree_key()
    assert bigger.image_key() != minimal.image_key()
    assert TEMPLATES["base-python"].tree_key() != minimal.tree_key()
    assert set(TEMPLATES["minimal"].packages) <= set(TEMPLATES["base-python"].packages)


def test_debian_mirror_override(monkeypatch):
    monkeypatch.setenv("WRENN_DEBIAN_MIRROR", "http://mirror.example/debian")
    assert builder.debian_mirror() == "http://mirror.example/debian"


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", ".", "..", "x" * 200, "-rf"])
def test_ids_that_could_escape_are_refused(bad):
    with pytest.raises(ValueError):
        check_id(bad)


def test_host_paths_keep_sockets_short(tmp_path):
    deep = tmp_path / ("d" * 120)
    paths = HostPaths(deep)
    files = paths.machine_files("cl-" + "a" * 25)
    assert len(str(files.agent)) < 100 and len(str(files.qmp)) < 100
    assert files.memory.parent == paths.capsule_dir("cl-" + "a" * 25)
    # Two data dirs never share a socket directory.
    other = HostPaths(tmp_path / "other")
    assert other.run != paths.run
    for p in (paths, other):
        p.run.rmdir()


def test_sparse_copy_keeps_holes_and_data(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    with open(src, "wb") as f:
        f.truncate(64 * 1024 * 1024)
        f.seek(10 * 1024 * 1024)
        f.write(b"A" * 8192)
        f.seek(40 * 1024 * 1024)
        f.write(b"B" * 4096)
    sparse_copy(src, dst)
    assert dst.stat().st_size == src.stat().st_size
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_blocks * 512 < 4 * 1024 * 1024  # holes stayed holes


def test_qemu_argv_restores_with_shared_memory_file(tmp_path):
    spec = MachineSpec(vcpus=2, memory_mb=768, kernel=Path("/k"), initrd=Path("/i"), cmdline="quiet", accel="tcg")
    files = MachineFiles(*(tmp_path / n for n in ("d", "m", "q", "a", "s", "l", "p")))
    argv = build_argv(spec, files, incoming=True)
    joined = " ".join(argv)
    assert f"mem-path={tmp_path / 'm'},share=on" in joined
    assert "size=768M" in joined and argv[argv.index("-smp") + 1] == "2"
    assert argv[-2:] == ["-incoming", "defer"]
    assert "vhost" not in joined  # no vhost devices on these hosts
    assert "-incoming" not in build_argv(spec, files, incoming=False)


def test_accelerator_override_and_missing_kvm(monkeypatch, tmp_path):
    k, i = tmp_path / "vmlinux", tmp_path / "initrd"
    k.write_bytes(b"x")
    monkeypatch.setenv("WRENN_ACCEL", "kvm")
    assert accel.choose_accelerator(k, i, tmp_path / "c.json") == "kvm"
    monkeypatch.setenv("WRENN_ACCEL", "tcg")
    assert accel.choose_accelerator(k, i, tmp_path / "c.json") == "tcg"
    monkeypatch.delenv("WRENN_ACCEL")
    monkeypatch.setattr(accel.os, "access", lambda *a: False)
    assert accel.choose_accelerator(k, i, tmp_path / "c.json") == "tcg"


def test_accelerator_probe_result_is_cached(monkeypatch, tmp_path):
    k, i = tmp_path / "vmlinux", tmp_path / "initrd"
    k.write_bytes(b"x")
    monkeypatch.delenv("WRENN_ACCEL", raising=False)
    monkeypatch.setattr(accel.os, "access", lambda *a: True)
    monkeypatch.setattr(accel, "_kvm_id", lambda: "kvm-1")
    calls = []
    monkeypatch.setattr(accel, "kvm_boots", lambda *a: calls.append(1) or False)
    assert accel.choose_accelerator(k, i, tmp_path / "c.json") == "tcg"
    assert accel.choose_accelerator(k, i, tmp_path / "c.json") == "tcg"
    assert calls == [1]


def test_cli_help_explains_every_command():
    runner = CliRunner()
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0
    for name in ("server", "images", "capsule", "snapshot"):
        assert name in top.output
    for args in (["server", "--help"], ["images", "build", "--help"], ["capsule", "--help"],
                 ["snapshot", "--help"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert len(result.output.strip().splitlines()) > 3
    server_help = runner.invoke(app, ["server", "--help"], terminal_width=200).output
    assert "--port" in server_help and "--data-dir" in server_help and "--host" in server_help


def test_cli_images_build_is_a_noop_when_cached(monkeypatch, tmp_path):
    monkeypatch.setattr(builder, "is_built", lambda: True)
    monkeypatch.setattr("wrenn_cli.platform._check_tools", lambda: None)
    monkeypatch.setenv("WRENN_CACHE_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["images", "build"])
    assert result.exit_code == 0
    assert "up to date" in result.output and "nothing to do" in result.output


def test_cli_server_reports_missing_host_tools(monkeypatch):
    monkeypatch.setattr("wrenn_cli.platform.shutil.which", lambda tool: None)
    result = CliRunner().invoke(app, ["images", "build"])
    assert result.exit_code == 1
    assert "missing host tools" in result.output and "apt-get install" in result.output
