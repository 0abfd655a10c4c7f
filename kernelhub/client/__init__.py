"""The kernelhub Python client, in the manner of E2B's SDK.

Sync::

    from kernelhub.client import Sandbox

    with Sandbox.create("python") as sandbox:          # KERNELHUB_URL / KERNELHUB_TOKEN, or url=, token=
        execution = sandbox.run_code("print('hi'); 6 * 7", on_stdout=print)
        execution.text                                  # '42'
        sandbox.files.write("data.csv", "a,b\\n1,2\\n")
        sandbox.commands.run("wc -l data.csv").stdout
        server = sandbox.commands.run("python -m http.server", background=True)   # a CommandHandle
        server.kill()

Async: :class:`AsyncSandbox`, the same methods awaited (``async with AsyncSandbox.create() as sandbox:``); the
sync :class:`Sandbox` runs that same code on a private loop thread, so it also works inside a running event loop
(Jupyter). Errors are the gateway's own classes (:mod:`kernelhub.errors`) under the client's names
(:class:`NotFoundError` is ``kernelhub.errors.NotFound``, :class:`InvalidRequestError` is ``InvalidRequest``,
…), all :class:`KernelHubError`; :class:`GatewayConnectionError` alone means that no answer came.

This package needs none of the server's dependencies (tornado, zmq, jupyter_client, traitlets): only httpx2,
websockets and :mod:`kernelhub.errors`.
"""

from __future__ import annotations

from ._async import AsyncApiClient, AsyncCommandHandle, AsyncSandbox
from ._sync import ApiClient, CommandHandle, Sandbox
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
    ResponseTimeoutError,
    SandboxError,
    UnauthorizedError,
)
from .models import CommandExitError, CommandResult, Execution, ExecutionError, Result, TerminalOutput

__all__ = [
    "ApiClient",
    "AsyncApiClient",
    "AsyncCommandHandle",
    "AsyncSandbox",
    "CommandExitError",
    "CommandHandle",
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
    "ResponseTimeoutError",
    "Result",
    "Sandbox",
    "SandboxError",
    "TerminalOutput",
    "UnauthorizedError",
]
