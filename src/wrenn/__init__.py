"""Wrenn Python SDK: create microVM sandboxes (capsules), run commands, move files.

Quick start::

    from wrenn import Capsule

    with Capsule(template="minimal", wait=True) as capsule:  # reads WRENN_API_KEY
        print(capsule.commands.run("echo hello").stdout)

``WrennClient`` / ``AsyncWrennClient`` give direct access to every API call.
"""

from wrenn._async_client import AsyncWrennClient
from wrenn._client import WrennClient
from wrenn._exceptions import (
    WrennAgentError,
    WrennAPIError,
    WrennAuthenticationError,
    WrennCapsuleStateError,
    WrennConflictError,
    WrennConnectionError,
    WrennError,
    WrennForbiddenError,
    WrennHostHasCapsulesError,
    WrennHostUnavailableError,
    WrennInternalError,
    WrennNotFoundError,
    WrennTimeoutError,
    WrennTooLargeError,
    WrennValidationError,
    WrennWaitTimeoutError,
)
from wrenn._models import (
    BackgroundProcess,
    CapsuleInfo,
    NetworkRules,
    ExecResult,
    FileEntry,
    ProcessInfo,
    Status,
    Template,
    TemplateType,
)
from wrenn.async_capsule import AsyncCapsule
from wrenn.capsule import Capsule
from wrenn.commands import (
    AsyncCommands,
    Commands,
    StreamErrorEvent,
    StreamEvent,
    StreamExitEvent,
    StreamStartEvent,
    StreamStderrEvent,
    StreamStdoutEvent,
)
from wrenn.files import AsyncFiles, Files
from wrenn.pty import AsyncPtySession, PtyEvent, PtyEventType, PtySession

# Names the published SDK uses for the same things.
CommandResult = ExecResult
CommandHandle = BackgroundProcess
Snapshot = Template

__version__ = "0.3.0"  # the published SDK version whose API this package matches

__all__ = [
    "AsyncCapsule",
    "AsyncCommands",
    "AsyncFiles",
    "AsyncPtySession",
    "AsyncWrennClient",
    "BackgroundProcess",
    "Capsule",
    "CapsuleInfo",
    "NetworkRules",
    "CommandHandle",
    "CommandResult",
    "Commands",
    "ExecResult",
    "FileEntry",
    "Files",
    "ProcessInfo",
    "PtyEvent",
    "PtyEventType",
    "PtySession",
    "Snapshot",
    "Status",
    "StreamErrorEvent",
    "StreamEvent",
    "StreamExitEvent",
    "StreamStartEvent",
    "StreamStderrEvent",
    "StreamStdoutEvent",
    "Template",
    "TemplateType",
    "WrennAPIError",
    "WrennAgentError",
    "WrennAuthenticationError",
    "WrennCapsuleStateError",
    "WrennClient",
    "WrennConflictError",
    "WrennConnectionError",
    "WrennError",
    "WrennForbiddenError",
    "WrennHostHasCapsulesError",
    "WrennHostUnavailableError",
    "WrennInternalError",
    "WrennNotFoundError",
    "WrennTimeoutError",
    "WrennTooLargeError",
    "WrennValidationError",
    "WrennWaitTimeoutError",
    "__version__",
]
