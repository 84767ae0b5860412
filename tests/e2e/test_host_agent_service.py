"""`wrenn host-agent` as a real process with real VMs: it registers with a control plane (a
stand-in made by the test, on loopback), serves its calls, heartbeats; `kill -9` of it leaves
its capsules running, and its restart (no token: the saved registration) brings them back."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import kill_qemus
from tests.hostservice import free_port, serving_app
from tests.unit.test_host_service import StandInControlPlane, wait_for
from wrenn_control.hosts.remote import HostUnreachable, RemoteHostAgent

pytestmark = pytest.mark.vm


def start_agent(cp_url: str, port: int, data_dir, log, token: str | None) -> subprocess.Popen:
    args = [sys.executable, "-m", "wrenn_cli.main", "host-agent", "--control-plane", cp_url,
            "--listen", f"127.0.0.1:{port}", "--data-dir", str(data_dir)]
    if token:
        args += ["--token", token]
    env = dict(os.environ, WRENN_SPARE_VMS="0")  # no spare VMs: this test needs none
    return subprocess.Popen(args, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


async def test_host_agent_registers_serves_and_survives_kill_9(tmp_path) -> None:
    cp = StandInControlPlane()
    data_dir, log = tmp_path / "host", tmp_path / "agent.log"
    port = free_port()
    proc = None
    async with serving_app(cp.app) as cp_url:
        try:
            proc = start_agent(cp_url, port, data_dir, log, cp.token)
            await wait_for(lambda: cp.beats or proc.poll() is not None, "the first heartbeat", bound=600)
            assert proc.poll() is None, log.read_text()[-3000:]
            (reg,) = cp.registrations
            # HTTPS by default, with the self-signed certificate it sent to be pinned
            assert reg["address"] == f"https://127.0.0.1:{port}" and reg["accelerator"] in ("kvm", "tcg")
            assert reg["tls_cert"] == (data_dir / "tls" / "agent.crt").read_text()
            saved = json.loads((data_dir / "registration.json").read_text())
            assert oct(os.stat(data_dir / "registration.json").st_mode & 0o777) == "0o600"
            assert saved["control_token"] == cp.control_token and saved["host_id"] == "host-1"

            remote = RemoteHostAgent(reg["address"], cp.control_token, tls_cert=reg["tls_cert"])
            await remote.create("cl-hostsvc1", "minimal", None, None)
            await remote.write_file("cl-hostsvc1", "/tmp/left.txt", b"still here\n")
            await remote.spawn("cl-hostsvc1", "/bin/sleep", ["3600"], tag="sleeper")
            await wait_for(lambda: cp.beats[-1]["capsules"] == {"cl-hostsvc1": "running"}, "a beat with it")
            assert cp.beats[-1]["usage"]["capsules_running"] == 1
            metrics = await remote.metrics_text()
            assert 'wrenn_host_capsules{state="running"} 1.0' in metrics

            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            with pytest.raises(HostUnreachable):
                await remote.get("cl-hostsvc1")

            n = len(cp.registrations)
            proc = start_agent(cp_url, port, data_dir, log, None)  # no token: the saved registration
            beats = len(cp.beats)
            await wait_for(lambda: len(cp.beats) > beats or proc.poll() is not None, "a beat after restart",
                           bound=300)
            assert proc.poll() is None, log.read_text()[-3000:]
            assert len(cp.registrations) == n
            assert cp.beats[-1]["capsules"] == {"cl-hostsvc1": "running"}
            assert (await remote.get("cl-hostsvc1")).state == "running"
            assert await remote.read_file("cl-hostsvc1", "/tmp/left.txt") == b"still here\n"
            assert any(p.tag == "sleeper" and p.running for p in await remote.processes("cl-hostsvc1"))

            # the control plane decides: a reconcile that does not know the capsule removes it
            report = await remote.start({})
            assert report.lost == ["cl-hostsvc1"]
            await wait_for(lambda: cp.beats[-1]["capsules"] == {}, "a beat without it")
            await remote.close()
        finally:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
            kill_qemus(data_dir)
