"""What `run_code` returns: an Execution with its rich results, logs and error (the published
SDK's shapes)."""

from __future__ import annotations

import dataclasses
from typing import Any

_MIME_FIELDS = {
    "text/plain": "text", "text/html": "html", "text/markdown": "markdown", "image/svg+xml": "svg",
    "image/png": "png", "image/jpeg": "jpeg", "image/gif": "gif", "application/pdf": "pdf",
    "text/latex": "latex", "application/json": "json", "application/javascript": "javascript",
    "application/vnd.plotly.v1+json": "plotly",
}


@dataclasses.dataclass
class ExecutionError:
    """The exception a cell raised: its class name, message and traceback (also "Timeout" and
    "Disconnected" when the call itself was cut short)."""

    name: str = ""
    value: str = ""
    traceback: str = ""


@dataclasses.dataclass
class Logs:
    """stdout / stderr, one list element per chunk as the kernel sent it."""

    stdout: list[str] = dataclasses.field(default_factory=list)
    stderr: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Result:
    """One rich output: the cell's value (`execute_result`, is_main_result) or a `display_data`.
    Known MIME types become fields (binary ones base64), others go to `extra`."""

    text: str | None = None
    html: str | None = None
    markdown: str | None = None
    svg: str | None = None
    png: str | None = None
    jpeg: str | None = None
    gif: str | None = None
    pdf: str | None = None
    latex: str | None = None
    json: dict | None = None
    javascript: str | None = None
    plotly: dict | None = None
    extra: dict[str, Any] | None = None
    is_main_result: bool = False

    @classmethod
    def from_bundle(cls, bundle: dict[str, Any], *, is_main_result: bool = False) -> Result:
        known = {_MIME_FIELDS[m]: v for m, v in bundle.items() if m in _MIME_FIELDS}
        extra = {m: v for m, v in bundle.items() if m not in _MIME_FIELDS}
        return cls(**known, extra=extra or None, is_main_result=is_main_result)

    def formats(self) -> list[str]:
        """Names of the formats this result has."""
        return [f for f in _MIME_FIELDS.values() if getattr(self, f) is not None] + list(self.extra or {})


@dataclasses.dataclass
class Execution:
    results: list[Result] = dataclasses.field(default_factory=list)
    logs: Logs = dataclasses.field(default_factory=Logs)
    error: ExecutionError | None = None
    execution_count: int | None = None
    timed_out: bool = False

    @property
    def text(self) -> str | None:
        """text/plain of the cell's value, if it had one."""
        return next((r.text for r in self.results if r.is_main_result), None)
