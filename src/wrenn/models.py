"""The API models, at the import path and under the names the published SDK uses.

Here ``Capsule`` is the model a capsule is described by (``wrenn.CapsuleInfo``), not the
high-level ``wrenn.Capsule``.
"""

from wrenn._models import (
    Actor,
    BackgroundProcess,
    CapsuleInfo,
    NetworkRules,
    CapsuleMetrics,
    CapsuleStats,
    EventType,
    ExecResult,
    FileEntry,
    MetricPoint,
    ProcessInfo,
    Resource,
    SSEEvent,
    StatsCurrent,
    StatsPeaks,
    StatsSeries,
    Status,
    Template,
    TemplateType,
    UsagePoint,
    UsageResponse,
)

Capsule = CapsuleInfo

__all__ = [
    "Actor",
    "BackgroundProcess",
    "Capsule",
    "CapsuleInfo",
    "NetworkRules",
    "CapsuleMetrics",
    "CapsuleStats",
    "EventType",
    "ExecResult",
    "FileEntry",
    "MetricPoint",
    "ProcessInfo",
    "Resource",
    "SSEEvent",
    "StatsCurrent",
    "StatsPeaks",
    "StatsSeries",
    "Status",
    "Template",
    "TemplateType",
    "UsagePoint",
    "UsageResponse",
]
