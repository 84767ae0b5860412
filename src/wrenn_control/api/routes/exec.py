"""Commands and background processes inside a capsule."""

from __future__ import annotations

import asyncio
import base64
from typing import Literal

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from wrenn_control.api.deps import GatewayDep, SettingsDep, TeamCapsule
from wrenn_control.errors import agent_error
from wrenn_control.schemas import (
    BackgroundExecResponse,
    ErrorBody,
    ExecRequest,
    ExecResponse,
    ProcessEntry,
    ProcessList,
)

router = APIRouter(tags=["commands"], responses={401: {"model": ErrorBody}, 404: {"model": ErrorBody},
                                                 409: {"model": ErrorBody}, 502: {"model": ErrorBody}})

DEFAULT_TIMEOUT_SEC = 30
# The guest enforces the command's timeout; this bound only covers a guest that never answers.
HOST_GRACE_SEC = 30


def _encode(stdout: bytes, stderr: bytes) -> tuple[str, str, Literal["utf-8", "base64"]]:
    """UTF-8 when both streams are valid UTF-8; otherwise both base64 (one encoding per answer)."""
    try:
        return stdout.decode("utf-8"), stderr.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(stdout).decode(), base64.b64encode(stderr).decode(), "base64"


@router.post("/capsules/{capsule_id}/exec", response_model=ExecResponse,
             responses={202: {"model": BackgroundExecResponse, "description": "background process started"}})
async def exec_command(capsule: TeamCapsule, body: ExecRequest, gateway: GatewayDep,
                       settings: SettingsDep) -> ExecResponse | JSONResponse:
    """Foreground: runs to completion, 200 with its output (a timed-out command is still 200,
    with `timed_out: true` and exit code -9). Each output stream keeps at most
    WRENN_EXEC_MAX_OUTPUT_BYTES (16 MiB); past that the rest is dropped and `stdout_truncated` /
    `stderr_truncated` (and `truncated`) are true. Background: 202 with pid and tag (409 conflict
    if the tag is held by a live process)."""
    args = body.args or []
    async with gateway.open(capsule, activity=True) as guest:
        if body.background:
            info = await guest.spawn(body.cmd, args, envs=body.envs, cwd=body.cwd, tag=body.tag)
            started = BackgroundExecResponse(sandbox_id=capsule.id, cmd=body.cmd, pid=info.pid, tag=info.tag)
            return JSONResponse(started.model_dump(), status_code=202)
        timeout = body.timeout_sec if body.timeout_sec is not None else DEFAULT_TIMEOUT_SEC
        try:
            result = await asyncio.wait_for(
                guest.exec(body.cmd, args, envs=body.envs, cwd=body.cwd, timeout_sec=timeout,
                           max_output_bytes=settings.exec_max_output_bytes),
                timeout + HOST_GRACE_SEC)
        except asyncio.TimeoutError:
            raise agent_error(f"the guest did not answer within {timeout + HOST_GRACE_SEC:g} s") from None
        if result.duration_ms >= 1000:
            await guest.record_activity(force=True)  # a long command counts as activity until it ends
    stdout, stderr, encoding = _encode(result.stdout, result.stderr)
    return ExecResponse(sandbox_id=capsule.id, cmd=body.cmd, stdout=stdout, stderr=stderr,
                        exit_code=result.exit_code, duration_ms=result.duration_ms, encoding=encoding,
                        timed_out=result.timed_out, truncated=result.stdout_truncated or result.stderr_truncated,
                        stdout_truncated=result.stdout_truncated, stderr_truncated=result.stderr_truncated)


@router.get("/capsules/{capsule_id}/processes", response_model=ProcessList)
async def list_processes(capsule: TeamCapsule, gateway: GatewayDep) -> ProcessList:
    """Background processes started through the API (finished ones stay listed with running=false)."""
    async with gateway.open(capsule) as guest:
        procs = await guest.processes()
    return ProcessList(processes=[ProcessEntry(pid=p.pid, tag=p.tag, cmd=p.cmd, args=list(p.args),
                                               running=p.running, exit_code=p.exit_code) for p in procs])


@router.delete("/capsules/{capsule_id}/processes/{target}", status_code=204, response_class=Response,
               responses={400: {"model": ErrorBody}})
async def kill_process(capsule: TeamCapsule, target: str, gateway: GatewayDep,
                       signal: Literal["SIGKILL", "SIGTERM"] = "SIGKILL") -> Response:
    """`target` is a pid (all digits) or a tag."""
    selector: int | str = int(target) if target.isdigit() else target
    async with gateway.open(capsule) as guest:
        await guest.kill(selector, signal)
    return Response(status_code=204)
