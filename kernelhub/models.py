"""Small shared helpers for the shapes REST, websockets and MCP answer with (API.md)."""

from __future__ import annotations

import datetime
import secrets


def iso(ts: float | None) -> str | None:
    """Seconds since the epoch as ISO 8601 UTC with a ``Z`` and milliseconds."""
    if ts is None:
        return None
    dt = datetime.datetime.fromtimestamp(ts, datetime.UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def iso_micro(ts: float | None) -> str | None:
    """Jupyter Server's shape: microseconds and a ``Z``."""
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_id(prefix: str) -> str:
    """Ids are unguessable: knowing one tenant's id pattern says nothing of another's."""
    return prefix + secrets.token_hex(8)
