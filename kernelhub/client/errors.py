"""Typed exceptions of the Python client, one per error code the gateway answers (API.md).

Every failure the gateway reports arrives as HTTP status plus ``{"error": "<code>", "message": "<sentence>"}``;
:func:`error_from_response` turns it into the matching class below. They derive from
:class:`kernelhub.errors.KernelHubError`, so code that handles the service's errors (the MCP server's tool
layer does) handles the client's too.
"""

from __future__ import annotations

import builtins
import json
from typing import Any

from .. import errors as _service_errors


class KernelHubError(_service_errors.KernelHubError):
    """Base of every error the client raises. ``status`` is the HTTP status (0 when no answer came),
    ``error`` the gateway's snake_case code and ``message`` its sentence for a person."""

    def __init__(self, message: str, *, error: str | None = None, status: int | None = None,
                 body: Any = None) -> None:
        super().__init__(message, error=error, status=status)
        self.body = body

    def __str__(self) -> str:
        return f"{self.message} ({self.error}, HTTP {self.status})" if self.status else self.message


class InvalidRequestError(KernelHubError):
    """The gateway refused the request as malformed or out of range (400)."""

    status = 400
    error = "invalid_request"


class UnauthorizedError(KernelHubError):
    """No API key, or one that no tenant has (401)."""

    status = 401
    error = "unauthorized"


class ForbiddenError(KernelHubError):
    """The key is known but may not do this (403)."""

    status = 403
    error = "forbidden"


class NotFoundError(KernelHubError):
    """No such sandbox, session, execution or file for this key (404)."""

    status = 404
    error = "not_found"


class ConflictError(KernelHubError):
    """The object's state does not allow this (409), e.g. the sandbox is stopped (``sandbox_not_running``)."""

    status = 409
    error = "conflict"


class PayloadTooLargeError(KernelHubError):
    """A body or file over its limit (413)."""

    status = 413
    error = "payload_too_large"


class QuotaExceededError(KernelHubError):
    """A per-tenant or per-sandbox quota is reached (429)."""

    status = 429
    error = "quota_exceeded"


class DiskQuotaExceededError(QuotaExceededError):
    """The sandbox's workspace is full (507, ``disk``)."""

    status = 507
    error = "disk"


class RequestTimeoutError(KernelHubError, builtins.TimeoutError):
    """The gateway gave up on the request (408), or no answer came in the client's own time limit."""

    status = 408
    error = "timeout"


class SandboxError(KernelHubError):
    """The sandbox could not be set up or a process in it could not be started (500, 503)."""

    status = 500
    error = "sandbox_error"


class GatewayConnectionError(KernelHubError, builtins.ConnectionError):
    """The gateway could not be reached at all (refused, reset, DNS); ``status`` is 0."""

    status = 0
    error = "connection_error"


_BY_CODE: dict[str, type[KernelHubError]] = {
    "invalid_request": InvalidRequestError,
    "unauthorized": UnauthorizedError,
    "forbidden": ForbiddenError,
    "not_found": NotFoundError,
    "conflict": ConflictError,
    "sandbox_not_running": ConflictError,
    "payload_too_large": PayloadTooLargeError,
    "quota_exceeded": QuotaExceededError,
    "disk": DiskQuotaExceededError,
    "timeout": RequestTimeoutError,
    "sandbox_error": SandboxError,
    "isolation_unavailable": SandboxError,
}

_BY_STATUS: dict[int, type[KernelHubError]] = {
    400: InvalidRequestError, 401: UnauthorizedError, 403: ForbiddenError, 404: NotFoundError,
    405: InvalidRequestError, 408: RequestTimeoutError, 409: ConflictError, 411: InvalidRequestError,
    413: PayloadTooLargeError, 415: InvalidRequestError, 429: QuotaExceededError, 503: SandboxError,
    507: DiskQuotaExceededError,
}


def error_class(code: str | None, status: int) -> type[KernelHubError]:
    """The exception class for an ``error`` code, falling back to the HTTP status."""
    if code and code in _BY_CODE:
        return _BY_CODE[code]
    return _BY_STATUS.get(status, SandboxError if status >= 500 else KernelHubError)


def error_from_response(status: int, body: bytes | str | Any) -> KernelHubError:
    """Build the typed exception for an HTTP error answer (``{"error", "message"}`` or anything else)."""
    data: Any = body
    if isinstance(body, (bytes, str)):
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
    code = message = None
    if isinstance(data, dict):
        code = data.get("error") if isinstance(data.get("error"), str) else None
        message = data.get("message") if isinstance(data.get("message"), str) else None
    if message is None:
        text = body.decode(errors="replace") if isinstance(body, bytes) else str(body or "")
        message = text.strip()[:500] or f"The gateway answered HTTP {status}."
    cls = error_class(code, status)
    return cls(message, error=code or cls.error, status=status, body=data)
