"""A Connect protocol subset over JSON, as E2B's SDKs speak it to envd (E2B.md 5.2).

E2B's Python SDK uses the Connect protocol with the JSON codec only and no compression; so do these
helpers, with no protobuf runtime:

- a **unary** call is ``POST /<package.Service>/<Method>`` with ``Content-Type: application/json`` and the
  request message as ProtoJSON; the answer is ``200 application/json`` with the response message, or an error:
  an HTTP status of its code (:data:`HTTP_STATUS`) and ``{"code": "<code>", "message"}``;
- a **server-streaming** call sends ``Content-Type: application/connect+json`` and one enveloped message (a
  flags byte, a 4-byte big-endian length, the JSON); the answer is ``200 application/connect+json`` with one
  envelope per message and a last one with flag ``0x02`` holding ``{}`` or ``{"error": {code, message}}``;
- ``Connect-Timeout-Ms`` is the caller's deadline (for envd's ``Start``, the command's lifetime).

Messages are ProtoJSON: lowerCamelCase names (snake_case accepted on input), enums by name, ``bytes`` as
standard base64, int64 as strings on output. Used by :mod:`kernelhub.handlers.e2b.envd`.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from typing import Any

from ...errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    KernelHubError,
    NotFound,
    PayloadTooLarge,
    QuotaExceeded,
    SandboxNotRunning,
    Timeout,
    Unauthorized,
    Unavailable,
)

JSON = "application/json"
STREAM_JSON = "application/connect+json"
#: Flag of an envelope: compressed payload, and the end of a stream.
FLAG_COMPRESSED = 0x01
FLAG_END_STREAM = 0x02
#: The largest request message read (bytes): envd's requests are small, stdin chunks included.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

#: Connect error codes and the HTTP status a unary error answer carries (connectrpc.com/docs/protocol).
HTTP_STATUS = {
    "canceled": 499, "unknown": 500, "invalid_argument": 400, "deadline_exceeded": 504, "not_found": 404,
    "already_exists": 409, "permission_denied": 403, "resource_exhausted": 429, "failed_precondition": 400,
    "aborted": 409, "out_of_range": 400, "unimplemented": 501, "internal": 500, "unavailable": 503,
    "data_loss": 500, "unauthenticated": 401,
}


class ConnectError(Exception):
    """An error answered in Connect's shape: ``code`` one of :data:`HTTP_STATUS`, ``message`` for a person;
    ``status`` overrides the code's HTTP status (415 for a codec the server does not speak)."""

    def __init__(self, code: str, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or HTTP_STATUS.get(code, 500)

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


#: kernelhub's error classes and their Connect codes, the first that matches wins (subclasses before classes).
CODES: tuple[tuple[type[KernelHubError] | tuple[type[KernelHubError], ...], str], ...] = (
    (SandboxNotRunning, "unavailable"),
    (Unauthorized, "unauthenticated"),
    (Forbidden, "permission_denied"),
    (NotFound, "not_found"),
    ((PayloadTooLarge, QuotaExceeded), "resource_exhausted"),
    (Conflict, "failed_precondition"),
    (InvalidRequest, "invalid_argument"),
    (Timeout, "deadline_exceeded"),
    (Unavailable, "unavailable"),
)


def connect_error(exc: KernelHubError) -> ConnectError:
    """The Connect error for one of kernelhub's: the code of its class (:data:`CODES`), else ``internal``."""
    code = next((code for kinds, code in CODES if isinstance(exc, kinds)), "internal")
    return ConnectError(code, exc.message)


def check_codec(content_type: str, expected: str) -> None:
    """Raise :class:`ConnectError` (HTTP 415) unless ``content_type`` is ``expected``: the JSON codec only."""
    kind = content_type.split(";")[0].strip().lower()
    if kind != expected:
        raise ConnectError("unimplemented", f"Only {expected} is served here, not {kind or 'no content type'}.",
                           status=415)


def parse_unary(content_type: str, body: bytes) -> dict[str, Any]:
    """The request message of a unary call. Raises :class:`ConnectError`: 415 for another codec, invalid_argument
    for a body that is not a JSON object."""
    check_codec(content_type, JSON)
    return _message(body or b"{}")


def parse_envelope(content_type: str, body: bytes) -> dict[str, Any]:
    """The one request message of a server-streaming call. Raises :class:`ConnectError` for another codec, a
    compressed or malformed envelope, or more than one message."""
    check_codec(content_type, STREAM_JSON)
    if len(body) < 5:
        raise ConnectError("invalid_argument", "The request is not an enveloped Connect message.")
    flags, length = struct.unpack(">BI", body[:5])
    if flags & FLAG_COMPRESSED:
        raise ConnectError("unimplemented", "Compressed messages are not supported; send identity.")
    if flags & ~FLAG_COMPRESSED or 5 + length != len(body):
        raise ConnectError("invalid_argument", "The request envelope's flags or length do not match its body; "
                                               "a server-streaming call sends exactly one message.")
    return _message(body[5:])


def _message(payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_MESSAGE_BYTES:
        raise ConnectError("resource_exhausted", f"A message may be at most {MAX_MESSAGE_BYTES} bytes.")
    try:
        message = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConnectError("invalid_argument", f"The message is not valid JSON: {exc}.") from None
    if not isinstance(message, dict):
        raise ConnectError("invalid_argument", "The message must be a JSON object.")
    try:
        json.dumps(message, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        # JSON's \ud800 escapes decode to text no path, argument or variable can hold.
        raise ConnectError("invalid_argument", "The message holds text that is not valid UTF-8.") from None
    return message


def envelope(message: dict[str, Any], *, end: bool = False) -> bytes:
    """One message (or, with ``end``, the end of the stream) as an envelope."""
    payload = json.dumps(message, separators=(",", ":")).encode()
    return struct.pack(">BI", FLAG_END_STREAM if end else 0, len(payload)) + payload


def end_stream(error: ConnectError | None = None) -> bytes:
    """The last envelope of a stream: ``{}``, or the error that ended it."""
    return envelope({"error": error.to_dict()} if error is not None else {}, end=True)


def timeout_ms(value: str | None) -> float | None:
    """``Connect-Timeout-Ms`` in seconds (None when absent). Raises :class:`ConnectError` for one that is not a
    positive whole number of at most 10 digits (the protocol's limit)."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if not text.isdigit() or len(text) > 10 or int(text) == 0:
        raise ConnectError("invalid_argument", "Connect-Timeout-Ms must be a positive whole number of at most "
                                               "10 digits.")
    return int(text) / 1000


def field(message: dict[str, Any], camel: str, default: Any = None) -> Any:
    """A field by its ProtoJSON name or its proto (snake_case) name."""
    if camel in message:
        return message[camel]
    snake = "".join("_" + c.lower() if c.isupper() else c for c in camel)
    return message.get(snake, default)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(value: object, what: str) -> bytes:
    """``bytes`` from ProtoJSON (standard or URL-safe base64). Raises :class:`ConnectError`."""
    if not isinstance(value, str):
        raise ConnectError("invalid_argument", f"{what} must be base64 text.")
    try:
        return base64.b64decode(value.replace("-", "+").replace("_", "/") + "=" * (-len(value) % 4),
                                validate=True)
    except (binascii.Error, ValueError):
        raise ConnectError("invalid_argument", f"{what} is not valid base64.") from None
