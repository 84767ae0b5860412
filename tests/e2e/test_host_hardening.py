"""Host hardening against a real `wrenn server` and real microVMs: nothing under the data and
cache directories is readable by another user; QEMU runs confined (unprivileged user, no
capabilities, empty chroot, its own cgroup with limits, seccomp); a guest filling its memory
stays inside its cgroup; a guest flooding its serial console keeps the log under its cap."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ServerHandle, _free_port, kill_qemus, qemu_pids
from tests.e2e.test_api_capsules import Api

pytestmark = pytest.mark.vm

SERIAL_CAP = 64 << 10  # the smallest cap (one read)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerHandle]:
    # Under /tmp (world-searchable), not pytest's 0700 base: the modes checked are the server's own.
    data_dir = Path(tempfile.mkdtemp(prefix="wrenn-harden-", dir="/tmp"))
    os.chmod(data_dir, 0o755)
    os.environ["WRENN_SERIAL_LOG_MAX_BYTES"] = str(SERIAL_CAP)
    port = _free_port()
    handle = ServerHandle(f"http://127.0.0.1:{port}/api", "wrn_" + secrets.token_hex(16), data_dir, port)
    try:
        handle.start()
    finally:
        del os.environ["WRENN_SERIAL_LOG_MAX_BYTES"]
    yield handle
    handle.stop()
    kill_qemus(data_dir)
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def api(server) -> Iterator[Api]:
    a = Api(server)
    yield a
    a.cleanup()


def run_dir(server: ServerHandle) -> Path:
    from wrenn_host.paths import HostPaths
    return HostPaths(server.data_dir / "host").run


def cache_dir() -> Path:
    from wrenn_images.builder import cache_dir
    return cache_dir()


def test_nothing_readable_by_another_user(api: Api, server: ServerHandle) -> None:
    running = api.running()["id"]
    api.sh(running, "echo s3cret-in-ram > /dev/shm/secret; echo s3cret-on-disk > /root/secret; sync")
    paused = api.running()["id"]
    assert api.post(f"/v1/capsules/{paused}/pause").status_code == 200
    name = f"perm-{secrets.token_hex(3)}"
    assert api.post("/v1/snapshots", json={"sandbox_id": running, "name": name}).status_code == 201
    try:
        paths = []
        for root in (server.data_dir, run_dir(server)):
            for dirpath, dirnames, filenames in os.walk(root):
                for n in [dirpath, *(os.path.join(dirpath, f) for f in dirnames + filenames)]:
                    paths.append(n)
        # Modes, as root: directories 0700, files 0600 (or 0700), whoever made them.
        loose = []
        for p in paths:
            st = os.lstat(p)
            if (stat.S_IMODE(st.st_mode) & 0o077) and not stat.S_ISLNK(st.st_mode):
                loose.append((p, oct(stat.S_IMODE(st.st_mode))))
        assert loose == [], loose
        assert any(p.endswith("/memory") for p in paths) and any(p.endswith("wrenn.db") for p in paths)
        assert any(p.endswith("jwt.secret") for p in paths)
        cache = cache_dir()
        assert stat.S_IMODE(cache.stat().st_mode) == 0o700
        for sub in ("snapshots", "rootfs", "kernel"):
            for dirpath, dirnames, filenames in os.walk(cache / sub):
                for n in [dirpath, *(os.path.join(dirpath, f) for f in filenames)]:
                    assert not stat.S_IMODE(os.lstat(n).st_mode) & 0o077, n
        paths += [str(cache), str(cache / "snapshots")]
        # And as `nobody`: not one of them can be listed or read.
        script = ('while read -r f; do if [ -d "$f" ]; then ls "$f" >/dev/null 2>&1 && echo "LIST $f"; '
                  'else head -c1 "$f" >/dev/null 2>&1 && echo "READ $f"; fi; done; true')
        out = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "/bin/sh", "-c", script],
                             input="\n".join(paths), capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout == "", out.stdout
        print(f"\n{len(paths)} paths checked as nobody: none readable")
    finally:
        api.delete(f"/v1/snapshots/{name}")
        api.destroy(running)
        api.destroy(paused)


def _status(pid: int) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)


def _cgroups(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        for c in ctrls.split(","):
            out[c] = path
    return out


def test_qemu_runs_confined(api: Api, server: ServerHandle) -> None:
    health = api.get("/health").json()
    assert health["confinement"] == {"user": "wrenn-vmm", "chroot": True, "cgroup": "v1", "seccomp": True,
                                     "capabilities": "none"}, health
    cap = api.running(vcpus=1, memory_mb=512)
    cid = cap["id"]
    [pid] = qemu_pids(cid)
    st = _status(pid)
    vmm = pwd.getpwnam("wrenn-vmm")
    assert st["Uid"].split() == [str(vmm.pw_uid)] * 4 and st["Gid"].split() == [str(vmm.pw_gid)] * 4, st
    assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0, st
    assert st["Seccomp"].strip() == "2", st  # filter mode
    root = os.readlink(f"/proc/{pid}/root")
    assert root == str(run_dir(server) / "jail") and os.listdir(root) == [], root
    groups = _cgroups(pid)
    base = Path("/sys/fs/cgroup")
    for ctrl in ("memory", "cpu", "pids"):
        assert groups[ctrl].endswith(f"/{cid}"), groups
    mem, cpu, pids = (base / c / groups[c].lstrip("/") for c in ("memory", "cpu", "pids"))
    assert int((mem / "memory.limit_in_bytes").read_text()) == (512 + 256) << 20
    assert int((cpu / "cpu.cfs_quota_us").read_text()) == 100_000
    assert int((cpu / "cpu.cfs_period_us").read_text()) == 100_000
    assert int((pids / "pids.max").read_text()) == 160
    assert str(pid) in (mem / "cgroup.procs").read_text().split()
    # Pause and resume work from inside the jail (QEMU re-opens its disks by descriptor).
    api.sh(cid, "echo kept > /root/k")
    assert api.post(f"/v1/capsules/{cid}/pause").status_code == 200
    assert api.post(f"/v1/capsules/{cid}/resume").status_code == 200
    assert api.sh(cid, "cat /root/k")["stdout"] == "kept\n"
    [pid2] = qemu_pids(cid)
    assert _status(pid2)["Uid"].split()[0] == str(vmm.pw_uid)
    api.destroy(cid)
    assert not mem.exists() and not cpu.exists() and not pids.exists()


def test_guest_filling_its_memory_stays_in_its_cgroup(api: Api) -> None:
    cid = api.running(memory_mb=256)["id"]
    [pid] = qemu_pids(cid)
    mem = Path("/sys/fs/cgroup/memory") / _cgroups(pid)["memory"].lstrip("/")
    limit = int((mem / "memory.limit_in_bytes").read_text())
    # Fill anonymous memory past the guest's size (the guest's OOM killer ends it), and /dev/shm.
    hog = ("import os\na=[]\ntry:\n  while True: a.append(os.urandom(1) * (8 << 20))\n"
           "except MemoryError: pass\n")
    api.exec(cid, "/bin/sh", "-c", f"python3 -c '{hog}' ; head -c 200M /dev/zero > /dev/shm/fill; true",
             timeout_sec=110)
    rss = int(_status(pid)["VmRSS"].split()[0]) * 1024
    peak = int((mem / "memory.max_usage_in_bytes").read_text())
    print(f"\nguest 256 MiB: QEMU RSS {rss >> 20} MiB, cgroup peak {peak >> 20} MiB, limit {limit >> 20} MiB")
    assert rss <= limit and peak <= limit
    assert api.sh(cid, "echo alive")["stdout"] == "alive\n"  # the VM and its agent are still there
    api.destroy(cid)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_serial_flood_keeps_the_log_under_its_cap(api: Api, server: ServerHandle) -> None:
    cid = api.running()["id"]
    d = server.data_dir / "host" / "capsules" / cid
    before = _cpu_seconds(server.proc.pid)
    t0 = time.monotonic()
    r = api.sh(cid, "cat /dev/urandom | base64 | timeout -s INT 20 dd of=/dev/ttyS0 bs=4096 2>&1 | tail -n1",
               timeout_sec=60)
    assert r["exit_code"] == 0, r
    spent = _cpu_seconds(server.proc.pid) - before
    logs = sorted(d.glob("serial.log*"))
    sizes = {p.name: p.stat().st_size for p in logs}
    print(f"\nserial flood 20 s: guest wrote {r['stdout'].strip()}; logs {sizes}; "
          f"server CPU {spent:.2f} s over {time.monotonic() - t0:.1f} s")
    assert set(sizes) <= {"serial.log", "serial.log.1"}, sizes
    assert all(s <= SERIAL_CAP for s in sizes.values()), sizes
    assert "serial.log.1" in sizes  # it did rotate: the flood was more than the cap
    assert api.sh(cid, "echo alive")["stdout"] == "alive\n"
    api.destroy(cid)
