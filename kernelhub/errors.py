"""One exception family for kernelhub.

Every failure a client can see is a :class:`KernelHubError` subclass carrying its HTTP status and a snake_case
``error`` code. The REST layer turns them into ``{"error", "message"}`` bodies in one place
(``handlers/base.py``); the MCP server turns the same ones into tool errors. Anything else that escapes is a bug
and is answered as a generic 500 without a traceback.
"""

from __future__ import annotations


class KernelHubError(Exception):
    """Base of every error a client may see. ``message`` is a sentence for a person."""

    status: int = 500
    error: str = "internal_error"

    def __init__(self, message: str, *, error: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if error is not None:
            self.error = error
        if status is not None:
            self.status = status

    def to_dict(self) -> dict[str, str]:
        return {"error": self.error, "message": self.message}


class InvalidRequest(KernelHubError):
    """The request is malformed or asks for something out of range (400)."""

    status = 400
    error = "invalid_request"


class Unauthorized(KernelHubError):
    """No key, or a key that no tenant has (401)."""

    status = 401
    error = "unauthorized"


class Forbidden(KernelHubError):
    """The caller is known but may not do this (403), e.g. a websocket from a foreign origin."""

    status = 403
    error = "forbidden"


class NotFound(KernelHubError):
    """No such object for this tenant (404). Another tenant's ids answer this too."""

    status = 404
    error = "not_found"


class Conflict(KernelHubError):
    """The object is in a state that does not allow this (409), e.g. a stopped sandbox."""

    status = 409
    error = "conflict"


class PayloadTooLarge(KernelHubError):
    """A body or file over its limit (413)."""

    status = 413
    error = "payload_too_large"


class QuotaExceeded(KernelHubError):
    """A per-tenant or per-sandbox quota is reached (429 for counts, 507 for disk)."""

    status = 429
    error = "quota_exceeded"


class DiskQuotaExceeded(KernelHubError):
    """The workspace is full (507, reason ``disk``)."""

    status = 507
    error = "disk"


class Timeout(KernelHubError):
    """An operation ran past its time limit (408 for requests the server gave up on)."""

    status = 408
    error = "timeout"


class SandboxError(KernelHubError):
    """The sandbox could not be set up or a process in it could not be started (500 or 503)."""

    status = 500
    error = "sandbox_error"


class IsolationUnavailable(SandboxError):
    """This machine cannot enforce the configured isolation policy (503)."""

    status = 503
    error = "isolation_unavailable"
