"""The MCP tools' input schemas: the JSON Schema fragments the tools share (ids, env, timeouts, paths, limits),
``_schema`` that makes a tool's object schema, and :func:`check_arguments`, which holds ``tools/call``'s
arguments to their tool's schema before :mod:`kernelhub.models` parses them into a request."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import json_input
from ..errors import InvalidRequest

if TYPE_CHECKING:
    from .tools import ToolSpec

SANDBOX_ID = {"type": "string", "minLength": 1,
              "description": "The sandbox's id (starts with 'sb'), as sandbox_create or sandbox_list answered it."}
SESSION_ID = {"type": "string", "minLength": 1,
              "description": "A session's id (starts with 'se'), as session_create or sandbox_info answered it."}
ENV = {"type": "object", "additionalProperties": {"type": "string"},
       "description": "Environment variables to set, as {NAME: value}."}
TIMEOUT = {"type": "number", "exclusiveMinimum": 0, "maximum": 3600,
           "description": "Seconds before it is stopped (status 'timeout'); default and maximum are the sandbox's "
                          "execution_timeout_s (300 unless the sandbox was created with another)."}
PATH = {"type": "string", "minLength": 1, "description": "A path relative to /workspace, e.g. 'data/input.csv'. "
        "Absolute paths and '..' are refused."}
LANGUAGE = {"type": "string", "enum": ["python", "node", "javascript", "typescript", "bash"],
            "description": "Language of the code. Omitted: the sandbox's first kernel (its template's language). "
                           "Another language starts a kernel of it in the same sandbox on first use."}
LIMITS = {
    "type": "object",
    "description": "Resource limits for this sandbox; each may lower the gateway's default or raise it up to "
                   "the configured maximum. Omitted limits take the defaults.",
    "properties": {
        "memory_mb": {"type": "integer", "minimum": 1, "description": "Memory in MiB (default 512)."},
        "cpu": {"type": "number", "exclusiveMinimum": 0, "description": "CPU cores (default 1.0)."},
        "pids": {"type": "integer", "minimum": 1, "description": "Processes and threads (default 128)."},
        "disk_mb": {"type": "integer", "minimum": 1, "description": "Workspace quota in MiB (default 1024)."},
        "files": {"type": "integer", "minimum": 1, "description": "Files in the workspace (default 10000)."},
        "max_file_mb": {"type": "integer", "minimum": 1, "description": "Largest file in MiB (default 100)."},
        "execution_timeout_s": {"type": "number", "exclusiveMinimum": 0,
                                "description": "Longest execution or command, seconds (default 300, max 3600)."},
        "idle_timeout_s": {"type": "number", "exclusiveMinimum": 0,
                           "description": "Stopped after this long without API activity (default 300)."},
        "max_lifetime_s": {"type": "number", "exclusiveMinimum": 0,
                           "description": "Stopped after this long whatever happens (default 86400)."},
        "output_mb": {"type": "number", "exclusiveMinimum": 0,
                      "description": "Output kept per execution in MiB (default 10); more is truncated."},
    },
    "additionalProperties": False,
}


_ENTRIES = {"type": "array", "items": {"type": "string"}, "maxItems": 256}
NETWORK = {
    "oneOf": [{"type": "string", "enum": ["none", "open"]},
              {"type": "object", "properties": {"allow": _ENTRIES, "deny": _ENTRIES}, "additionalProperties": False}],
    "description": "Network policy: 'none' (the default: loopback only), 'open' (any public address) or "
                   "{allow: [...], deny: [...]} of domains ('pypi.org', '*.pythonhosted.org'), host:port, IP "
                   "addresses and CIDRs; deny wins. Egress goes through an HTTP(S) proxy (HTTP_PROXY is set); "
                   "private and cloud-metadata addresses are always refused.",
}


def _schema(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


# -- argument checks ----------------------------------------------------------------------------------------

_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}


def check_arguments(spec: ToolSpec, arguments: dict[str, Any] | None) -> dict[str, Any]:
    """The arguments checked against the tool's schema (top-level names, types, enums, required) and the rules
    of :func:`kernelhub.json_input.check_value`; nested values (limits, env) are judged by the service, which
    says precisely what is wrong."""
    if arguments is not None and not isinstance(arguments, dict):
        raise InvalidRequest(f"{spec.name} takes its arguments as a JSON object.")
    args = dict(arguments or {})
    # The SDK parsed the JSON: its depth, numbers and strings are judged here as REST's parser judges them.
    json_input.check_value(args, "An argument")
    props: dict[str, Any] = spec.schema["properties"]
    for name in args:
        if name not in props:
            raise InvalidRequest(f"{spec.name} has no argument {name!r}; it takes {', '.join(props) or 'none'}.")
    for name in spec.schema.get("required", []):
        if args.get(name) is None:
            raise InvalidRequest(f"{spec.name} needs the argument {name!r}.")
    for name, value in list(args.items()):
        if value is None:
            del args[name]
            continue
        prop = props[name]
        kind = prop.get("type")
        if kind and not _JSON_TYPES[kind](value):
            raise InvalidRequest(f"{name} must be a{'n' if kind[0] in 'aeiou' else ''} {kind}.")
        if "enum" in prop and value not in prop["enum"]:
            raise InvalidRequest(f"{name} must be one of {', '.join(map(str, prop['enum']))}.")
        if kind == "string" and prop.get("minLength") and not value:
            raise InvalidRequest(f"{name} must not be empty.")
    return args


_CODE_ARGS = {
    "sandbox_id": SANDBOX_ID,
    "code": {"type": "string", "description": "The code to run, as in a notebook cell: the value of the last "
                                              "expression is returned as the result."},
    "language": LANGUAGE,
    "session_id": {**SESSION_ID, "description": "Run in this jupyter session (to keep a separate kernel's "
                                                "state); omitted: the sandbox's kernel for the language."},
    "timeout_s": TIMEOUT,
    "env": {**ENV, "description": "Environment variables set in the kernel before this code runs."},
}

PID = {"type": "integer", "minimum": 1, "description": "The command's pid, as command_start or command_list "
                                                       "answered it."}
