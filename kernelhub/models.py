"""Shapes shared by REST, websockets and MCP (API.md): the times and ids they answer with, and the requests
they take, parsed and checked once (``parse_*``, see "requests" below)."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import secrets
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from .errors import InvalidRequest


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


# -- requests ---------------------------------------------------------------------------------------------------
#
# What a client asks for, parsed and checked once whichever surface it came through: the REST routes
# (kernelhub.handlers.rest, .commands), the /stream websocket's messages (kernelhub.handlers.streams, .commands)
# and the MCP tools (kernelhub.mcp.tools, after the SDK's schema check). Each parse_* function takes the decoded
# JSON object (body, message or arguments) and answers a frozen dataclass, or raises InvalidRequest with a
# sentence naming the field. Checks here are of shape (names, JSON types, exclusive fields, base64); what needs
# a sandbox to judge (a timeout against its execution_timeout_s, env names, a template) stays with the service.

#: What the JSON types of a field are called in messages, by the Python types that carry them.
Kind = type | tuple[type, ...]


def fields(body: Mapping[str, Any], *, allowed: Sequence[str], required: Sequence[str] = (),
           who: str = "this route") -> Mapping[str, Any]:
    """``body``, after refusing unknown names (a typo such as ``limit`` must not be silently ignored: the
    message says what ``who`` accepts) and absent or null ``required`` ones. Raises
    :class:`~kernelhub.errors.InvalidRequest`."""
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise InvalidRequest(f"Unknown field {unknown[0]!r}; {who} accepts {', '.join(allowed)}.")
    for name in required:
        if body.get(name) is None:
            raise InvalidRequest(f"The field {name!r} is required.")
    return body


def optional(body: Mapping[str, Any], name: str, kind: Kind, what: str) -> Any:
    """``body[name]`` if present and of ``kind`` (None when absent or null); an
    :class:`~kernelhub.errors.InvalidRequest` saying ``{name} must be {what}.`` otherwise. A JSON boolean is
    not a number here (Python's ``bool`` is an ``int``)."""
    value = body.get(name)
    if value is None:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise InvalidRequest(f"{name} must be {what}.")
    return value


def required(body: Mapping[str, Any], name: str, kind: Kind, what: str) -> Any:
    """``body[name]``, which must be present, not null and of ``kind``; see :func:`optional`."""
    if body.get(name) is None:
        raise InvalidRequest(f"The field {name!r} is required.")
    return optional(body, name, kind, what)


def _flag(body: Mapping[str, Any], name: str) -> bool:
    return bool(optional(body, name, bool, "true or false"))


def _text_or_base64(body: Mapping[str, Any], text: str, encoded: str, *, required: bool) -> str | bytes | None:
    """The field ``text`` (a string) or the bytes of ``encoded`` (base64), never both; with ``required``,
    exactly one of them. Raises :class:`~kernelhub.errors.InvalidRequest`."""
    value = optional(body, text, str, "a string")
    data = optional(body, encoded, str, "base64 text")
    if (value is not None and data is not None) or (required and value is None and data is None):
        raise InvalidRequest(f"Give exactly one of {text} (text) or {encoded} (binary)." if required
                             else f"Give {text} or {encoded}, not both.")
    if data is None:
        return value
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{encoded} is not valid base64.") from None


_LANGUAGE = "a language name (python, node, typescript, bash)"
_SECONDS = "a number of seconds"
_ENV = "a JSON object of strings"


@dataclasses.dataclass(frozen=True)
class SandboxCreate:
    """``sandbox_create``: ``POST /v1/sandboxes`` and the MCP tool. Every field may be absent (the template's
    and the gateway's defaults apply)."""

    template: str | None = None
    limits: dict[str, Any] | None = None
    env: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    #: A string or an object, as sent: the service's policy module (services/egress/policy.py) judges it.
    network: str | dict[str, Any] | None = None
    #: What the idle reaper does: ``"stop"`` (the default) or ``"pause"``; the service judges the value.
    on_idle: str | None = None

    FIELDS: ClassVar[tuple[str, ...]] = ("template", "limits", "env", "metadata", "network", "on_idle")


def parse_sandbox_create(body: Mapping[str, Any], *, extra: Sequence[str] = ()) -> SandboxCreate:
    """A :class:`SandboxCreate` from a request body; ``extra`` names fields the caller reads itself."""
    fields(body, allowed=SandboxCreate.FIELDS + tuple(extra))
    return SandboxCreate(
        template=optional(body, "template", str, "a template name"),
        limits=optional(body, "limits", dict, "a JSON object of limits"),
        env=optional(body, "env", dict, _ENV),
        metadata=optional(body, "metadata", dict, "a JSON object"),
        network=body.get("network"),  # a string or an object: the policy module says what is wrong
        on_idle=optional(body, "on_idle", str, '"stop" or "pause"'),
    )


def parse_sandbox_update(body: Mapping[str, Any]) -> str | dict[str, Any]:
    """``sandbox_update`` (``PATCH /v1/sandboxes/{id}``, the MCP tool): the new network policy, as sent (the
    service's policy module judges it). Raises :class:`~kernelhub.errors.InvalidRequest` for other fields or
    none."""
    fields(body, allowed=("network",), required=("network",))
    network: str | dict[str, Any] = body["network"]
    return network


@dataclasses.dataclass(frozen=True)
class Execute:
    """``code_execute`` and ``code_execute_async``: ``POST /v1/sandboxes/{id}/execute`` and ``/executions``, the
    websocket's ``execute`` message and the MCP tools. ``timeout_s`` in seconds (None: the sandbox's
    ``execution_timeout_s``); ``env`` is set in the kernel before the code runs."""

    code: str
    language: str | None = None
    session_id: str | None = None
    timeout_s: float | None = None
    env: dict[str, Any] | None = None

    FIELDS: ClassVar[tuple[str, ...]] = ("code", "language", "session_id", "timeout_s", "env")


def parse_execute(body: Mapping[str, Any], *, extra: Sequence[str] = (), who: str = "this route") -> Execute:
    """An :class:`Execute` from a request body or message; ``extra`` names fields the caller reads itself (the
    websocket's ``type`` and ``request_id``), ``who`` is what the unknown-field message says accepts them."""
    fields(body, allowed=Execute.FIELDS + tuple(extra), required=("code",), who=who)
    return Execute(
        code=optional(body, "code", str, "a string of code"),
        language=optional(body, "language", str, _LANGUAGE),
        session_id=optional(body, "session_id", str, "a session id"),
        timeout_s=optional(body, "timeout_s", (int, float), _SECONDS),
        env=optional(body, "env", dict, _ENV),
    )


@dataclasses.dataclass(frozen=True)
class SessionCreate:
    """``session_create``: ``POST /v1/sandboxes/{id}/sessions`` and the MCP tool."""

    type: str = "jupyter"
    language: str | None = None

    FIELDS: ClassVar[tuple[str, ...]] = ("type", "language")


def parse_session_create(body: Mapping[str, Any], *, extra: Sequence[str] = ()) -> SessionCreate:
    """A :class:`SessionCreate` from a request body (``type`` defaults to ``jupyter``)."""
    fields(body, allowed=SessionCreate.FIELDS + tuple(extra))
    return SessionCreate(type=optional(body, "type", str, '"jupyter" or "terminal"') or "jupyter",
                         language=optional(body, "language", str, _LANGUAGE))


@dataclasses.dataclass(frozen=True)
class SessionInput:
    """``session_execute``: code for a jupyter session, keystrokes for a terminal; ``timeout_s`` in seconds."""

    input: str
    timeout_s: float | None = None

    FIELDS: ClassVar[tuple[str, ...]] = ("input", "timeout_s")


def parse_session_input(body: Mapping[str, Any], *, extra: Sequence[str] = ()) -> SessionInput:
    """A :class:`SessionInput` from a request body (``input`` required)."""
    fields(body, allowed=SessionInput.FIELDS + tuple(extra), required=("input",))
    return SessionInput(input=optional(body, "input", str, "a string"),
                        timeout_s=optional(body, "timeout_s", (int, float), _SECONDS))


@dataclasses.dataclass(frozen=True)
class CommandRun:
    """``command_execute`` (foreground: answered when it exits) or a background command (answered once it
    runs): ``POST /v1/sandboxes/{id}/commands``, the websocket's ``command`` message, the MCP tools
    ``command_execute`` and ``command_start``. ``stdin_open`` and ``tag`` apply to background commands only."""

    command: str
    cwd: str | None = None
    env: dict[str, Any] | None = None
    timeout_s: float | None = None
    stdin: str | None = None
    stdin_open: bool = False
    tag: str | None = None
    background: bool = False

    FIELDS: ClassVar[tuple[str, ...]] = ("command", "cwd", "env", "timeout_s", "stdin", "stdin_open",
                                         "background", "tag")

    def start_args(self) -> dict[str, Any]:
        """The keyword arguments of ``Hub.start_command`` (a background command) but ``background``."""
        return {"command": self.command, "cwd": self.cwd, "env": self.env, "timeout_s": self.timeout_s,
                "stdin": self.stdin, "stdin_open": self.stdin_open, "tag": self.tag}

    def run_args(self) -> dict[str, Any]:
        """The keyword arguments of ``Hub.run_command`` (a foreground command). Raises
        :class:`~kernelhub.errors.InvalidRequest` when a background-only field was given."""
        if self.stdin_open or self.tag is not None:
            raise InvalidRequest("stdin_open and tag apply to background commands; a foreground command's stdin "
                                 "is the stdin field.")
        return {"command": self.command, "cwd": self.cwd, "env": self.env, "timeout_s": self.timeout_s,
                "stdin": self.stdin}


def parse_command_run(body: Mapping[str, Any], *, extra: Sequence[str] = ()) -> CommandRun:
    """A :class:`CommandRun` from a request body or message (``command`` required)."""
    fields(body, allowed=CommandRun.FIELDS + tuple(extra), required=("command",))
    return CommandRun(
        command=optional(body, "command", str, "a string"),
        cwd=optional(body, "cwd", str, "a path string"),
        env=optional(body, "env", dict, _ENV),
        timeout_s=optional(body, "timeout_s", (int, float), _SECONDS),
        stdin=optional(body, "stdin", str, "a string"),
        stdin_open=_flag(body, "stdin_open"),
        tag=optional(body, "tag", str, "a string"),
        background=_flag(body, "background"),
    )


@dataclasses.dataclass(frozen=True)
class CommandStdin:
    """Input for a running command's stdin (``data`` as text or, from ``data_base64``, bytes), then ``eof``
    closes it: ``POST …/commands/{pid}/stdin``, the websocket's ``command_stdin``, MCP's
    ``command_send_stdin``."""

    data: str | bytes | None = None
    eof: bool = False

    FIELDS: ClassVar[tuple[str, ...]] = ("data", "data_base64", "eof")


def parse_command_stdin(body: Mapping[str, Any], *, extra: Sequence[str] = ()) -> CommandStdin:
    """A :class:`CommandStdin` from a request body or message; ``data`` and ``data_base64`` exclude each other."""
    fields(body, allowed=tuple(extra) + CommandStdin.FIELDS)
    return CommandStdin(data=_text_or_base64(body, "data", "data_base64", required=False),
                        eof=_flag(body, "eof"))


def parse_signal(body: Mapping[str, Any], *, extra: Sequence[str] = ()) -> str:
    """The ``signal`` of ``POST …/commands/{pid}/signal`` and the websocket's ``command_signal``, a name such
    as ``SIGTERM`` (which names are allowed is the command service's to say)."""
    fields(body, allowed=tuple(extra) + ("signal",), required=("signal",))
    signal: str = optional(body, "signal", str, "a signal name such as SIGTERM")
    return signal


@dataclasses.dataclass(frozen=True)
class FileWrite:
    """A whole file to write at ``path`` (relative to ``/workspace``): MCP's ``file_upload``, whose content
    is text (``content``) or base64 (``content_base64``). REST uploads stream their body instead."""

    path: str
    data: bytes

    FIELDS: ClassVar[tuple[str, ...]] = ("path", "content", "content_base64")


def parse_file_write(body: Mapping[str, Any], *, max_bytes: int, extra: Sequence[str] = ()) -> FileWrite:
    """A :class:`FileWrite` from ``{path, content | content_base64}``, exactly one of the two, at most
    ``max_bytes`` decoded. Raises :class:`~kernelhub.errors.InvalidRequest`."""
    fields(body, allowed=tuple(extra) + FileWrite.FIELDS, required=("path",))
    content = _text_or_base64(body, "content", "content_base64", required=True)
    data = content.encode() if isinstance(content, str) else content
    assert data is not None
    if len(data) > max_bytes:
        raise InvalidRequest(f"file_upload takes at most {max_bytes} bytes over MCP.")
    return FileWrite(path=optional(body, "path", str, "a path string"), data=data)
