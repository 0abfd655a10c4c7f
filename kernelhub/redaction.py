"""Credentials never reach a log line: API keys in ``?token=``, ``Authorization`` headers, HMAC keys.

Clients may put their key in the query string (``?token=KEY``, as Jupyter does), and tornado's access log and
its error reports print the request's URI; debug logs may print headers. Every line kernelhub's processes log
goes through :class:`RedactingFilter` (installed on the console handler by
:meth:`kernelhub.app.KernelHubApp.get_default_logging_config`), and the access log prints a redacted URI
(:func:`log_request`, tornado's ``log_function``).
"""

from __future__ import annotations

import logging
import re
from typing import Any

__all__ = ["REDACTED", "RedactingFilter", "log_request", "redact"]

REDACTED = "[redacted]"

# ?token=… / &api_key=… (also URL-encoded as %3D), key=… in text; Authorization: <scheme> <credentials>.
_QUERY = re.compile(r"(?i)\b((?:access_)?token|api[_-]?key|key|password|secret)(=|%3D)[^&\s\"'#]+")
_HEADER = re.compile(r"(?i)\b(authorization|x-api-key|cookie)(['\"]?\s*[:=]\s*['\"]?)(?:(bearer|token|basic)\s+)?"
                     r"[^\s'\",}]+")


def redact(text: str) -> str:
    """``text`` with every credential-looking value replaced by :data:`REDACTED`."""
    text = _QUERY.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    return _HEADER.sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(3) + ' ' if m.group(3) else ''}{REDACTED}",
                       text)


class RedactingFilter(logging.Filter):
    """Rewrites a record's message (and its formatted traceback) through :func:`redact`; drops nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record whose args do not fit its format: leave it to the handler
            return True
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


_access_log = logging.getLogger("tornado.access")


def log_request(handler: Any) -> None:
    """tornado's access log line (``log_function``), with the URI redacted: ``STATUS METHOD URI (IP) MS``."""
    status = handler.get_status()
    if status < 400:
        level = logging.INFO
    elif status < 500:
        level = logging.WARNING
    else:
        level = logging.ERROR
    if not _access_log.isEnabledFor(level):
        return
    request = handler.request
    _access_log.log(level, "%d %s %s (%s) %.2fms", status, request.method, redact(request.uri or ""),
                    request.remote_ip, 1000.0 * request.request_time())
