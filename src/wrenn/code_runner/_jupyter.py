"""Jupyter's wire protocol as the code runner uses it (no I/O): the server's REST API for kernels,
the kernel channels WebSocket for execute requests and their IOPub replies."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from wrenn.code_runner.models import Execution, ExecutionError, Result

JUPYTER_PORT = 8888
KERNEL_RETRY_S = 0.5


def execute_request(code: str) -> dict[str, Any]:
    return {
        "header": {"msg_id": str(uuid.uuid4()), "msg_type": "execute_request", "username": "wrenn-sdk",
                   "session": str(uuid.uuid4()), "date": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
                   "version": "5.3"},
        "parent_header": {}, "metadata": {}, "buffers": [], "channel": "shell",
        "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True},
    }


def pick_kernel(kernels: list[dict[str, Any]], name: str) -> str | None:
    return next((k.get("id") for k in kernels if k.get("name") == name), None)


class Collector:
    """Folds the replies to one execute request into an Execution, calling the callbacks."""

    def __init__(self, msg_id: str, on_result: Callable[[Result], Any] | None = None,
                 on_stdout: Callable[[str], Any] | None = None, on_stderr: Callable[[str], Any] | None = None,
                 on_error: Callable[[ExecutionError], Any] | None = None):
        self.msg_id = msg_id
        self.execution = Execution()
        self.on_result, self.on_stdout, self.on_stderr, self.on_error = on_result, on_stdout, on_stderr, on_error

    def error(self, err: ExecutionError) -> None:
        self.execution.error = err
        if self.on_error is not None:
            self.on_error(err)

    def feed(self, msg: dict[str, Any]) -> bool:
        """Take one message; True once the kernel is idle again (the cell is done)."""
        if (msg.get("parent_header") or {}).get("msg_id") != self.msg_id:
            return False
        kind = msg.get("msg_type") or (msg.get("header") or {}).get("msg_type")
        content = msg.get("content") or {}
        ex = self.execution
        if kind == "stream":
            text = content.get("text", "")
            if content.get("name") == "stderr":
                ex.logs.stderr.append(text)
                if self.on_stderr is not None:
                    self.on_stderr(text)
            else:
                ex.logs.stdout.append(text)
                if self.on_stdout is not None:
                    self.on_stdout(text)
        elif kind in ("execute_result", "display_data"):
            result = Result.from_bundle(content.get("data") or {}, is_main_result=kind == "execute_result")
            ex.results.append(result)
            if kind == "execute_result":
                ex.execution_count = content.get("execution_count")
            if self.on_result is not None:
                self.on_result(result)
        elif kind == "error":
            self.error(ExecutionError(content.get("ename", ""), content.get("evalue", ""),
                                      "\n".join(content.get("traceback") or [])))
        elif kind == "status" and content.get("execution_state") == "idle":
            return True
        return False

    def timed_out(self, timeout: float) -> Execution:
        self.execution.timed_out = True
        if self.execution.error is None:
            self.error(ExecutionError("Timeout", f"run_code exceeded {timeout}s"))
        return self.execution


def check_language(language: str) -> None:
    if language != "python":
        raise ValueError(f"language={language!r} is not supported; only 'python' "
                         "(pick another kernelspec with the kernel= argument of the capsule)")
