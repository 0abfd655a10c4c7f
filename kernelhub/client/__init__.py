"""The kernelhub Python client, in the manner of E2B's SDK.

Sync::

    from kernelhub.client import Sandbox

    with Sandbox.create("python") as sandbox:          # KERNELHUB_URL / KERNELHUB_TOKEN, or url=, token=
        execution = sandbox.run_code("print('hi'); 6 * 7", on_stdout=print)
        execution.text                                  # '42'
        sandbox.files.write("data.csv", "a,b\\n1,2\\n")
        sandbox.commands.run("wc -l data.csv").stdout

Async: :class:`AsyncSandbox`, the same methods awaited (``async with AsyncSandbox.create() as sandbox:``).
Errors are typed after the gateway's error codes (:class:`NotFoundError`, :class:`InvalidRequestError`, …, all
:class:`KernelHubError`).
"""

from __future__ import annotations

from ._async import AsyncApiClient, AsyncSandbox
from ._sync import ApiClient, Sandbox
from .errors import (
    ConflictError,
    DiskQuotaExceededError,
    ForbiddenError,
    GatewayConnectionError,
    InvalidRequestError,
    KernelHubError,
    NotFoundError,
    PayloadTooLargeError,
    QuotaExceededError,
    RequestTimeoutError,
    SandboxError,
    UnauthorizedError,
)
from .models import CommandExitError, CommandResult, Execution, ExecutionError, Result, TerminalOutput

__all__ = [
    "ApiClient",
    "AsyncApiClient",
    "AsyncSandbox",
    "CommandExitError",
    "CommandResult",
    "ConflictError",
    "DiskQuotaExceededError",
    "Execution",
    "ExecutionError",
    "ForbiddenError",
    "GatewayConnectionError",
    "InvalidRequestError",
    "KernelHubError",
    "NotFoundError",
    "PayloadTooLargeError",
    "QuotaExceededError",
    "RequestTimeoutError",
    "Result",
    "Sandbox",
    "SandboxError",
    "TerminalOutput",
    "UnauthorizedError",
]
