"""The REST routes of API.md as transport-free request descriptions.

Each function answers a :class:`Call`, which :class:`~kernelhub.client.AsyncApiClient` performs (the sync
client runs the same one on its loop thread). Keeping the routes here, apart from the transport, lets the MCP
server's remote backend name them too.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from collections.abc import AsyncIterable
from typing import Any
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

#: How long the client waits for each step of a plain request (connect, each read, each write), seconds.
DEFAULT_REQUEST_TIMEOUT = 60.0
#: Extra time over an execution's own limit before the client gives up waiting for its answer.
EXECUTION_GRACE_S = 30.0
#: The gateway's own ceiling for execution_timeout_s (API.md); used when the caller names no timeout.
MAX_EXECUTION_TIMEOUT_S = 3600.0
#: The gateway's ceiling for a sandbox's max_lifetime_s (API.md): the longest a followed command can run.
MAX_LIFETIME_S = 7 * 86400.0
DEFAULT_URL = "http://127.0.0.1:8888"

#: An upload body: whole bytes, or chunks read as they are sent.
Content = bytes | AsyncIterable[bytes]


def resolve_url(url: str | None) -> str:
    """``url``, else ``KERNELHUB_URL``, else the gateway's default address; without a trailing slash."""
    value = url or os.environ.get("KERNELHUB_URL") or DEFAULT_URL
    return value.rstrip("/")


def resolve_token(token: str | None) -> str | None:
    return token or os.environ.get("KERNELHUB_TOKEN") or None


def ws_url(base: str, path: str) -> str:
    parts = urlsplit(base)
    scheme = {"https": "wss", "http": "ws"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + path, "", ""))


def file_path(path: str) -> str:
    """A workspace path for a URL. ``/workspace/x`` is accepted as ``x``; anything else goes as given and the
    gateway judges it (absolute paths and ``..`` are refused there)."""
    if path == "/workspace" or path.startswith("/workspace/"):
        path = path[len("/workspace"):].lstrip("/")
    return quote(path, safe="/")


def execution_timeout(timeout_s: float | None) -> float:
    return (timeout_s if timeout_s is not None else MAX_EXECUTION_TIMEOUT_S) + EXECUTION_GRACE_S


@dataclasses.dataclass
class Call:
    """One HTTP request: method, path under the gateway's URL, query, a JSON body or raw ``content`` (with its
    ``content_length`` when known, so that the gateway can refuse an oversized upload before reading it), and
    how long the client waits for each step (``None``: the client's ``request_timeout``). ``raw`` asks for the
    answer's bytes instead of parsed JSON."""

    method: str
    path: str
    json_body: Any = None
    content: Content | None = None
    content_length: int | None = None
    query: dict[str, Any] | None = None
    raw: bool = False
    timeout: float | None = None

    def url(self, base: str) -> str:
        url = base + self.path
        if self.query:
            url += "?" + urlencode({k: v for k, v in self.query.items() if v is not None})
        return url

    def body(self) -> Content | None:
        if self.content is not None:
            return self.content
        if self.json_body is not None:
            return json.dumps(self.json_body).encode()
        return None

    def headers(self, token: str | None, accept: str) -> dict[str, str]:
        headers = {"Accept": accept}
        if self.content is not None:
            headers["Content-Type"] = "application/octet-stream"
            if self.content_length is not None:
                headers["Content-Length"] = str(self.content_length)
        elif self.json_body is not None:
            headers["Content-Type"] = "application/json"
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers


def _drop_none(**kwargs: Any) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


def _sid(sandbox_id: str) -> str:
    return quote(str(sandbox_id), safe="")


# -- sandboxes ------------------------------------------------------------------------------------------

def create_sandbox(template: str | None, limits: dict[str, Any] | None, env: dict[str, str] | None,
                   metadata: dict[str, Any] | None, network: str | dict[str, Any] | None) -> Call:
    body = _drop_none(template=template, limits=limits, env=env, metadata=metadata, network=network)
    return Call("POST", "/v1/sandboxes", json_body=body, timeout=120.0)


def update_sandbox(sandbox_id: str, network: str | dict[str, Any]) -> Call:
    return Call("PATCH", f"/v1/sandboxes/{_sid(sandbox_id)}", json_body={"network": network}, timeout=120.0)


def list_sandboxes() -> Call:
    return Call("GET", "/v1/sandboxes")


def get_sandbox(sandbox_id: str) -> Call:
    return Call("GET", f"/v1/sandboxes/{_sid(sandbox_id)}")


def delete_sandbox(sandbox_id: str) -> Call:
    return Call("DELETE", f"/v1/sandboxes/{_sid(sandbox_id)}", timeout=120.0)


def pause_sandbox(sandbox_id: str) -> Call:
    return Call("POST", f"/v1/sandboxes/{_sid(sandbox_id)}/pause", timeout=120.0)


def resume_sandbox(sandbox_id: str) -> Call:
    return Call("POST", f"/v1/sandboxes/{_sid(sandbox_id)}/resume", timeout=120.0)


def sandbox_logs(sandbox_id: str, lines: int) -> Call:
    return Call("GET", f"/v1/sandboxes/{_sid(sandbox_id)}/logs", query={"lines": lines})


def sandbox_metrics(sandbox_id: str) -> Call:
    return Call("GET", f"/v1/sandboxes/{_sid(sandbox_id)}/metrics")


# -- executions -----------------------------------------------------------------------------------------

def execute(sandbox_id: str, code: str, *, language: str | None = None, session_id: str | None = None,
            timeout_s: float | None = None, env: dict[str, str] | None = None, wait: bool = True) -> Call:
    body = _drop_none(code=code, language=language, session_id=session_id, timeout_s=timeout_s, env=env)
    route = "execute" if wait else "executions"
    return Call("POST", f"/v1/sandboxes/{_sid(sandbox_id)}/{route}", json_body=body,
                timeout=execution_timeout(timeout_s) if wait else None)


def get_execution(execution_id: str) -> Call:
    return Call("GET", f"/v1/executions/{_sid(execution_id)}")


def run_command(sandbox_id: str, command: str, *, cwd: str | None = None, env: dict[str, str] | None = None,
                timeout_s: float | None = None, stdin: str | None = None) -> Call:
    body = _drop_none(command=command, cwd=cwd, env=env, timeout_s=timeout_s, stdin=stdin)
    return Call("POST", f"/v1/sandboxes/{_sid(sandbox_id)}/commands", json_body=body,
                timeout=execution_timeout(timeout_s))


def start_command(sandbox_id: str, command: str, *, cwd: str | None = None, env: dict[str, str] | None = None,
                  timeout_s: float | None = None, stdin: str | None = None, stdin_open: bool | None = None,
                  tag: str | None = None) -> Call:
    body = _drop_none(command=command, cwd=cwd, env=env, timeout_s=timeout_s, stdin=stdin, stdin_open=stdin_open,
                      tag=tag, background=True)
    return Call("POST", f"/v1/sandboxes/{_sid(sandbox_id)}/commands", json_body=body)


def list_commands(sandbox_id: str) -> Call:
    return Call("GET", f"/v1/sandboxes/{_sid(sandbox_id)}/commands")


def get_command(sandbox_id: str, pid: int, *, output: bool = False) -> Call:
    return Call("GET", f"/v1/sandboxes/{_sid(sandbox_id)}/commands/{int(pid)}", query={"output": 1} if output else None)


def follow_command(sandbox_id: str, pid: int, *, replay: bool = True) -> Call:
    """The command's events as NDJSON until its end; no time limit of its own (a background command may run
    for as long as its sandbox)."""
    return Call("GET", f"/v1/sandboxes/{_sid(sandbox_id)}/commands/{int(pid)}",
                query={"follow": 1, "replay": 1 if replay else 0}, timeout=MAX_LIFETIME_S)


def command_stdin(sandbox_id: str, pid: int, data: str | bytes | None, eof: bool = False) -> Call:
    body: dict[str, Any] = {"eof": eof}
    if isinstance(data, bytes):
        body["data_base64"] = base64.b64encode(data).decode()
    elif data is not None:
        body["data"] = data
    return Call("POST", f"/v1/sandboxes/{_sid(sandbox_id)}/commands/{int(pid)}/stdin", json_body=body)


def signal_command(sandbox_id: str, pid: int, signal: str) -> Call:
    return Call("POST", f"/v1/sandboxes/{_sid(sandbox_id)}/commands/{int(pid)}/signal", json_body={"signal": signal})


def kill_command(sandbox_id: str, pid: int) -> Call:
    return Call("DELETE", f"/v1/sandboxes/{_sid(sandbox_id)}/commands/{int(pid)}")


# -- files ----------------------------------------------------------------------------------------------

def write_file(sandbox_id: str, path: str, content: Content, size: int | None) -> Call:
    """``size`` is the body's length in bytes when known (``None`` sends it chunked)."""
    return Call("PUT", f"/v1/sandboxes/{_sid(sandbox_id)}/files/{file_path(path)}", content=content,
                content_length=size)


def read_file(sandbox_id: str, path: str) -> Call:
    return Call("GET", f"/v1/sandboxes/{_sid(sandbox_id)}/files/{file_path(path)}", raw=True)


def list_files(sandbox_id: str, path: str, *, limit: int | None = None, cursor: str | None = None) -> Call:
    query: dict[str, Any] = {"list": 1}
    if limit is not None:
        query["limit"] = limit
    if cursor:
        query["cursor"] = cursor
    return Call("GET", f"/v1/sandboxes/{_sid(sandbox_id)}/files/{file_path(path)}", query=query)


def delete_file(sandbox_id: str, path: str) -> Call:
    return Call("DELETE", f"/v1/sandboxes/{_sid(sandbox_id)}/files/{file_path(path)}")


# -- sessions -------------------------------------------------------------------------------------------

def create_session(sandbox_id: str, type: str, language: str | None) -> Call:
    return Call("POST", f"/v1/sandboxes/{_sid(sandbox_id)}/sessions",
                json_body=_drop_none(type=type, language=language), timeout=120.0)


def session_execute(session_id: str, input: str, timeout_s: float | None) -> Call:
    return Call("POST", f"/v1/sessions/{_sid(session_id)}/execute",
                json_body=_drop_none(input=input, timeout_s=timeout_s), timeout=execution_timeout(timeout_s))


def close_session(session_id: str) -> Call:
    return Call("DELETE", f"/v1/sessions/{_sid(session_id)}")


def stream_path(sandbox_id: str) -> str:
    return f"/v1/sandboxes/{_sid(sandbox_id)}/stream"
