"""One exception family for kernelhub, and the one registry of its ``error`` codes.

Every failure a client can see is a :class:`KernelHubError` subclass carrying its HTTP status and a snake_case
``error`` code. The REST layer turns them into ``{"error", "message"}`` bodies in one place
(``handlers/base.py``); the MCP server turns the same ones into tool errors; the Python client
(:mod:`kernelhub.client`) turns an answer back into the same class with :func:`error_for`. Anything else that
escapes the server is a bug and is answered as a generic 500 without a traceback.

The registry: each class that names its own ``error`` is the class of that code (:func:`error_class`), and
:data:`STATUS_CLASSES` names the class for a bare HTTP status (an answer without a code, tornado's own errors).
Two classes are the client's alone and never come from an answer: :class:`GatewayConnectionError` (no answer at
all) and its :class:`ResponseTimeoutError` (no answer in the client's time), both with ``status`` 0.

This module imports nothing beyond the standard library: the client uses it without the server's dependencies.
"""

from __future__ import annotations

import builtins
import http
import re
from typing import Any

#: error code -> class; filled by :meth:`KernelHubError.__init_subclass__` from each class's own ``error``.
_BY_CODE: dict[str, type[KernelHubError]] = {}


class KernelHubError(Exception):
    """Base of every error a client may see. ``message`` is a sentence for a person; ``status`` the HTTP status
    (0: not an HTTP answer: no answer came, on the client's side, or the command line's own errors); ``error``
    the snake_case code; ``body``, on the client, the answer's parsed body (``None`` on the server)."""

    status: int = 500
    error: str = "internal_error"

    def __init__(self, message: str, *, error: str | None = None, status: int | None = None,
                 body: Any = None) -> None:
        super().__init__(message)
        self.message = message
        if error is not None:
            self.error = error
        if status is not None:
            self.status = status
        self.body = body

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        code = cls.__dict__.get("error")
        if code is None or cls.status == 0:
            return  # a class without a code of its own, or one no answer may name (client side only)
        if code in _BY_CODE:
            raise TypeError(f"error code {code!r} already belongs to {_BY_CODE[code].__name__}")
        _BY_CODE[code] = cls

    def to_dict(self) -> dict[str, str]:
        return {"error": self.error, "message": self.message}


_BY_CODE[KernelHubError.error] = KernelHubError


# -- 4xx: the request ------------------------------------------------------------------------------------

class InvalidRequest(KernelHubError):
    """The request is malformed or asks for something out of range (400)."""

    status = 400
    error = "invalid_request"


class MethodNotAllowed(InvalidRequest):
    """The route exists but not with this HTTP method (405)."""

    status = 405
    error = "method_not_allowed"


class LengthRequired(InvalidRequest):
    """A body came without a length the gateway needs (411)."""

    status = 411
    error = "length_required"


class UnsupportedMediaType(InvalidRequest):
    """The body's ``Content-Type`` is not one this route reads (415)."""

    status = 415
    error = "unsupported_media_type"


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


class Timeout(KernelHubError):
    """An operation ran past its time limit (408 for requests the server gave up on)."""

    status = 408
    error = "timeout"


class Conflict(KernelHubError):
    """The object is in a state that does not allow this (409)."""

    status = 409
    error = "conflict"


class ExecutionEnded(Conflict):
    """An interrupt or input for an execution that already ended (409, ``/stream`` websocket)."""

    error = "execution_ended"


class NoInputRequested(Conflict):
    """Input for an execution that is not waiting for any (409, ``/stream`` websocket)."""

    error = "no_input_requested"


class PayloadTooLarge(KernelHubError):
    """A body or file over its limit (413), e.g. an upload over ``limits.max_file_mb``."""

    status = 413
    error = "payload_too_large"


class UpgradeRequired(KernelHubError):
    """A websocket handshake in a protocol version this gateway does not speak (426); the answer's
    ``Sec-WebSocket-Version`` header names the one it does (RFC 6455, 4.4)."""

    status = 426
    error = "upgrade_required"


class QuotaExceeded(KernelHubError):
    """A per-tenant or per-sandbox quota is reached (429 for counts; subclasses for disk and processes)."""

    status = 429
    error = "quota_exceeded"


class DiskQuotaExceeded(QuotaExceeded):
    """The workspace is full: its ``disk_mb`` or ``files`` limit is reached (507, reason ``disk``)."""

    status = 507
    error = "disk"


# -- 5xx: the gateway or the sandbox ----------------------------------------------------------------------

class Unavailable(KernelHubError):
    """The gateway cannot serve this now (503); trying again later may work."""

    status = 503
    error = "unavailable"


class StoreError(KernelHubError):
    """The gateway's store cannot do what was asked: its file cannot be opened, is from a newer kernelhub, is
    held by another gateway, or SQLite failed (500)."""

    status = 500
    error = "store_error"


class SandboxError(KernelHubError):
    """The sandbox could not be set up or a process in it could not be started (500 or 503)."""

    status = 500
    error = "sandbox_error"


class SandboxNotRunning(Conflict, SandboxError):
    """The sandbox is stopped, failed or paused (409), so nothing can run in it; its ``reason`` is in the
    message. A :class:`Conflict` for the caller, a :class:`SandboxError` for the layers that start processes."""

    status = 409
    error = "sandbox_not_running"


class SandboxNotPaused(Conflict):
    """A resume of a sandbox that is not paused (409)."""

    error = "sandbox_not_paused"


class AuditUnavailable(Conflict):
    """``GET /v1/audit`` on a gateway that keeps no audit log (``--Hub.durable=False``) (409)."""

    error = "audit_unavailable"


class IsolationUnavailable(SandboxError):
    """This machine cannot enforce the configured isolation policy (503)."""

    status = 503
    error = "isolation_unavailable"


class CapacityExhausted(SandboxError):
    """The gateway has no room for another sandbox: its range of sandbox uids is used up (503)."""

    status = 503
    error = "capacity"


class WorkspaceUnavailable(SandboxError):
    """The sandbox's workspace is missing or not mounted (503); nothing was read or written."""

    status = 503
    error = "workspace_unavailable"


class HostDiskFull(SandboxError):
    """The host's state disk lacks the room a new workspace needs (507)."""

    status = 507
    error = "host_disk_full"


class PidsExhausted(SandboxError, QuotaExceeded):
    """A process could not be started: the sandbox is at its ``pids`` limit (429, reason ``pids``)."""

    status = 429
    error = "pids"


# -- the client's own: no answer came ----------------------------------------------------------------------

class GatewayConnectionError(KernelHubError, builtins.ConnectionError):
    """The gateway could not be reached, or the connection broke before its answer was whole (refused, reset,
    DNS, TLS, a stream cut short). Raised by the client only, never an answer of the gateway: ``status`` 0."""

    status = 0
    error = "connection_error"


class ResponseTimeoutError(GatewayConnectionError, Timeout, builtins.TimeoutError):
    """No answer (or no end of a streamed one) came within the client's time limit; what was asked may still be
    under way on the gateway. Also a :class:`Timeout`, like the gateway's own 408. ``status`` 0."""

    status = 0
    error = "timeout"


#: The class of an answer that names no code (or one this version does not know), by HTTP status.
STATUS_CLASSES: dict[int, type[KernelHubError]] = {
    400: InvalidRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 405: MethodNotAllowed,
    408: Timeout, 409: Conflict, 411: LengthRequired, 413: PayloadTooLarge, 415: UnsupportedMediaType,
    429: QuotaExceeded, 500: KernelHubError, 503: Unavailable, 507: DiskQuotaExceeded,
}


def error_class(code: str | None, status: int = 0) -> type[KernelHubError]:
    """The class of an ``error`` code, else of the HTTP ``status`` (:data:`STATUS_CLASSES`), else
    :class:`InvalidRequest` for another 4xx and :class:`KernelHubError` for anything else."""
    if code and code in _BY_CODE:
        return _BY_CODE[code]
    if status in STATUS_CLASSES:
        return STATUS_CLASSES[status]
    return InvalidRequest if 400 <= status < 500 else KernelHubError


def error_code(status: int) -> str:
    """The ``error`` code for an HTTP status that came without one (tornado's own errors): the registered
    class's, else the status phrase in snake_case (``502`` -> ``bad_gateway``)."""
    cls = STATUS_CLASSES.get(status)
    if cls is not None:
        return cls.error
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        return "error"
    return re.sub(r"\W+", "_", phrase.lower()).strip("_")


def error_for(code: str | None, message: str, status: int = 0, *, body: Any = None) -> KernelHubError:
    """The typed error for an answer's ``error`` code, ``message`` and HTTP ``status`` (0 where the answer has
    none, e.g. a websocket's ``rejected`` event: the class's own status is taken). An unknown code keeps its
    text in ``error`` and gets the class of its status."""
    cls = error_class(code, status)
    if not code:
        code = error_code(status) if status else cls.error
    return cls(message, error=code, status=status or cls.status, body=body)


__all__ = [
    "STATUS_CLASSES",
    "AuditUnavailable",
    "CapacityExhausted",
    "Conflict",
    "DiskQuotaExceeded",
    "ExecutionEnded",
    "Forbidden",
    "GatewayConnectionError",
    "HostDiskFull",
    "InvalidRequest",
    "IsolationUnavailable",
    "KernelHubError",
    "LengthRequired",
    "MethodNotAllowed",
    "NoInputRequested",
    "NotFound",
    "PayloadTooLarge",
    "PidsExhausted",
    "QuotaExceeded",
    "ResponseTimeoutError",
    "SandboxError",
    "SandboxNotPaused",
    "SandboxNotRunning",
    "Timeout",
    "Unauthorized",
    "Unavailable",
    "UnsupportedMediaType",
    "WorkspaceUnavailable",
    "error_class",
    "error_code",
    "error_for",
]
