"""Start-up recovery of one capsule: decide from what is on disk and what is alive, never by timing
and never by deleting.

What a crash of the server can leave (QEMU runs in its own session and outlives the server):

| QEMU      | its run state        | files                         | means                          | becomes |
|-----------|----------------------|-------------------------------|--------------------------------|---------|
| alive     | running              | no `state`                    | a running capsule              | running |
| alive     | running              | `state`                       | resume cut after `cont`        | running (stale `state` removed) |
| alive     | QMP or agent fails   | -                             | a broken VM                    | paused if QEMU said the guest had not run since `state`, else error |
| alive     | inmigrate/paused/... | `state`                       | resume cut before `cont`       | paused (QEMU ended: the guest never ran) |
| alive     | paused/finish-migrate/postmigrate | no `state`       | pause cut after `stop`         | paused (pause completed) |
| dead      | -                    | `state`                       | paused                         | paused  |
| dead      | -                    | whole `state.tmp`             | pause cut after the write      | paused (published now) |
| dead      | -                    | nothing whole                 | the VM died                    | error, files kept aside |
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import logging
import os
import time

from wrenn_host.durable import crashpoint, fsync_dir, publish_state, state_problem, state_tmp
from wrenn_host.guest import GuestClient
from wrenn_host.vmm import Machine, VmmDriver

log = logging.getLogger(__name__)

AGENT_TIMEOUT_S = 5.0  # a running guest's agent answers in milliseconds; bounded, never per-capsule serial


@dataclasses.dataclass
class Outcome:
    status: str  # "running" | "paused" | "error"
    reason: str = ""
    machine: Machine | None = None
    guest: GuestClient | None = None


async def recover(cid: str, spec, files, state, vmm: VmmDriver) -> Outcome:
    """`spec`/`files`: the capsule's MachineSpec and MachineFiles; `state`: its state path;
    `vmm`: the driver that finds the machine an earlier server process left running."""
    machine = vmm.adopt(spec, files)
    if machine is None:
        return await _dead(files, state)
    status = "unknown"
    try:
        status = await machine.status()
        return await _alive(cid, machine, status, state)
    except Exception as e:  # QMP or the agent misbehaves: end the VM, never guess
        log.warning("capsule %s: VM unusable after restart (%s): %s", cid, status, e)
        with contextlib.suppress(Exception):
            await machine.kill()
        # A saved state is only good if the guest cannot have run since: QEMU said it had not.
        if status not in ("running", "unknown") and state.exists() and state_problem(state) is None:
            return Outcome("paused")
        return Outcome("error", f"VM unusable after restart (run state {status}: {e}) and no paused "
                                "state it is known to match")


async def _alive(cid: str, machine: Machine, status: str, state) -> Outcome:
    if status == "running":
        guest = await GuestClient.connect_unix(str(machine.files.agent), timeout=AGENT_TIMEOUT_S)
        try:
            await guest.wait_ready(timeout=AGENT_TIMEOUT_S)
            if state.exists():
                # A resume was cut after the vCPUs started: the guest runs on, the saved state no
                # longer matches its memory. Finish what the resume would have done.
                await guest.call("identity", capsule_id=cid, hostname=cid,
                                 seed=base64.b64encode(os.urandom(64)).decode(), time_ns=time.time_ns())
                state.unlink()
                fsync_dir(state.parent)
        except BaseException:
            await guest.close()
            raise
        return Outcome("running", machine=machine, guest=guest)
    if state.exists():
        # A resume cut before `cont`: the guest has not run since the pause, its files still match.
        await machine.kill()
        if state_problem(state) is None:
            return Outcome("paused")
        return Outcome("error", f"paused state damaged: {state_problem(state)}")
    if status in ("paused", "finish-migrate", "postmigrate"):
        await machine.finish_pause(state)  # a pause cut after `stop`
        return Outcome("paused")
    # inmigrate without a state of its own: a create cut short; anything else: a broken VM.
    await machine.kill()
    return Outcome("error", f"VM found in state {status!r} with no paused state (a create or crash cut short)")


async def _dead(files, state) -> Outcome:
    if state.exists():
        problem = state_problem(state)
        return Outcome("paused") if problem is None else Outcome("error", f"paused state damaged: {problem}")
    tmp = state_tmp(state)
    problem = state_problem(tmp)
    if problem is None:
        await publish_state(files, tmp, state)  # a pause cut between its write and publish
        await crashpoint("recover.published")
        return Outcome("paused")
    why = "no paused state" if problem == "missing" else f"pause incomplete: state.tmp {problem}"
    return Outcome("error", f"VM not running and {why}")
