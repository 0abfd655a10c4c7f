"""The client's exceptions: the gateway's own classes (:mod:`kernelhub.errors`) under the names the client has
always used, and :func:`error_from_response`, which turns an HTTP error answer into one of them.

Every failure the gateway reports arrives as HTTP status plus ``{"error": "<code>", "message": "<sentence>"}``;
the code picks the class from the one registry in :mod:`kernelhub.errors`, so ``NotFoundError`` *is*
``kernelhub.errors.NotFound`` and code that handles the service's errors (the MCP server's tool layer does)
handles the client's too. :class:`GatewayConnectionError` (and its :class:`ResponseTimeoutError`) is the one
kind that is no answer of the gateway: nothing (or nothing whole) came back; its ``status`` is 0.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import (
    Conflict,
    DiskQuotaExceeded,
    Forbidden,
    GatewayConnectionError,
    InvalidRequest,
    KernelHubError,
    NotFound,
    PayloadTooLarge,
    QuotaExceeded,
    ResponseTimeoutError,
    SandboxError,
    Timeout,
    Unauthorized,
    error_for,
)

InvalidRequestError = InvalidRequest
UnauthorizedError = Unauthorized
ForbiddenError = Forbidden
NotFoundError = NotFound
ConflictError = Conflict
PayloadTooLargeError = PayloadTooLarge
QuotaExceededError = QuotaExceeded
DiskQuotaExceededError = DiskQuotaExceeded
RequestTimeoutError = Timeout

#: How much of an error answer's body is read to build the exception from, bytes.
MAX_ERROR_BODY = 65536


def error_from_response(status: int, body: bytes | bytearray | str | None) -> KernelHubError:
    """The typed exception for an HTTP error answer: ``{"error", "message"}`` as the gateway sends, or anything
    else (a proxy's page), which gets the class of its status and its text (500 characters) as the message."""
    data: Any = None
    if body:
        try:
            data = json.loads(body)
        except ValueError:
            data = None
    code = message = None
    if isinstance(data, dict):
        code = data.get("error") if isinstance(data.get("error"), str) else None
        message = data.get("message") if isinstance(data.get("message"), str) else None
    if message is None:
        text = body.decode(errors="replace") if isinstance(body, (bytes, bytearray)) else (body or "")
        message = text.strip()[:500] or f"The gateway answered HTTP {status}."
    return error_for(code, message, status, body=data)


__all__ = [
    "ConflictError",
    "DiskQuotaExceededError",
    "ForbiddenError",
    "GatewayConnectionError",
    "InvalidRequestError",
    "KernelHubError",
    "NotFoundError",
    "PayloadTooLargeError",
    "QuotaExceededError",
    "RequestTimeoutError",
    "ResponseTimeoutError",
    "SandboxError",
    "UnauthorizedError",
    "error_from_response",
]
