"""The API models, at the import path and under the names the published SDK uses.

Here ``Capsule`` is the model a capsule is described by (``wrenn.CapsuleInfo``), not the
high-level ``wrenn.Capsule``.
"""

from wrenn._models import (
    BackgroundProcess,
    CapsuleInfo,
    ExecResult,
    FileEntry,
    ProcessInfo,
    Status,
    Template,
    TemplateType,
)

Capsule = CapsuleInfo

__all__ = [
    "BackgroundProcess",
    "Capsule",
    "CapsuleInfo",
    "ExecResult",
    "FileEntry",
    "ProcessInfo",
    "Status",
    "Template",
    "TemplateType",
]
