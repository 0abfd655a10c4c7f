"""The MCP server: the tools on the official SDK's low-level :class:`mcp.server.Server`, and their
stdio transport for ``kernelhub mcp``.

:func:`build_server` makes the SDK server for any way of choosing a backend per call (the gateway's ``/mcp``
route picks the caller's tenant, see :mod:`kernelhub.mcp.http`). :func:`stdio_embedded` serves the tools over
stdio on a hub in this process (started by ``kernelhub mcp``'s app, which owns the command line and the start-up,
see :class:`kernelhub.cli.MCPApp`); :func:`stdio_remote` drives a running gateway through its REST API.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import mcp_types as types
from mcp.server import Server, ServerRequestContext
from mcp.server.stdio import stdio_server
from mcp.shared.message import SessionMessage
from pydantic import ValidationError

from .. import __version__
from ..client import _api
from ..client._async import AsyncApiClient
from ..errors import KernelHubError, error_class
from ..services.hub import Hub
from ..services.tenants import Tenant
from . import tools
from .backends import Backend, HubBackend, RemoteBackend

log = logging.getLogger("kernelhub.mcp")

INSTRUCTIONS = (
    "kernelhub runs code in isolated sandboxes with Jupyter kernels (python, node/typescript, bash). Create a "
    "sandbox with sandbox_create, run code with code_execute (state persists between calls, like notebook "
    "cells; plots come back as images), move files with file_upload/file_download, run shell commands with "
    "command_execute, and delete the sandbox with sandbox_delete when the work is done. Sandboxes have no "
    "internet access."
)

#: Progress notifications: at most one per this many seconds while output flows...
PROGRESS_MIN_INTERVAL_S = 0.2
#: ...and one per this many seconds while the execution is quiet.
PROGRESS_HEARTBEAT_S = 5.0
#: The longest message a progress notification carries (the newest output).
PROGRESS_MESSAGE_CHARS = 1000

SendProgress = Callable[[float, float | None, str | None], Awaitable[None]]
BackendFor = Callable[[ServerRequestContext[Any, Any]], Backend]


class ProgressReporter:
    """Turns an execution's events into MCP progress notifications for the ``tools/call`` that started it.

    ``on_event`` is the execution's listener: it never blocks (a slow MCP client must not slow the kernel), it
    only keeps the newest output. :meth:`run` sends it, coalesced to one notification per
    :data:`PROGRESS_MIN_INTERVAL_S`, and a heartbeat ("running for N s") every :data:`PROGRESS_HEARTBEAT_S`
    while quiet. The SDK sends nothing when the client asked for no progress (no ``progressToken``).

    anyio throughout (not bare asyncio tasks): the SDK runs each request in an anyio cancel scope, and a plain
    task cancelled next to it can leave the request without an answer.
    """

    def __init__(self, send: SendProgress) -> None:
        self._send = send
        self._pending: list[str] = []
        self._wake = anyio.Event()
        self._count = 0
        self._started = time.monotonic()

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind in ("stdout", "stderr"):
            self._pending.append(str(event.get("text", "")))
        elif kind == "error":
            self._pending.append(f"{event.get('name')}: {event.get('value')}\n")
        elif kind == "result" and event.get("is_main_result"):
            self._pending.append("(result)\n")
        elif kind == "update":
            self._pending.append(f"(display {event.get('display_id')} updated)\n")
        else:
            return
        self._wake.set()

    async def run(self) -> None:
        while True:
            with anyio.move_on_after(PROGRESS_HEARTBEAT_S):
                await self._wake.wait()
            self._wake = anyio.Event()  # before taking the text: what comes meanwhile wakes the next round
            await self._notify(f"running for {time.monotonic() - self._started:.0f} s")
            await anyio.sleep(PROGRESS_MIN_INTERVAL_S)

    async def flush(self) -> None:
        """Send the output not sent yet. Called by :func:`run_tool` once the tool has its answer and before
        :meth:`run` is cancelled, so that the last output of an execution (often its error) is reported too."""
        if self._pending:
            await self._notify("")

    async def _notify(self, quiet: str) -> None:
        text = "".join(self._pending)[-PROGRESS_MESSAGE_CHARS:]
        self._pending.clear()
        self._count += 1
        try:
            await self._send(self._count, None, text or quiet)
        except Exception:  # noqa: BLE001 - progress is advisory; the client may be gone
            log.debug("progress notification failed", exc_info=True)


def tool_list() -> list[types.Tool]:
    """The tools as ``tools/list`` shows them."""
    return [
        types.Tool(name=spec.name, title=spec.title, description=spec.description, input_schema=spec.schema,
                   annotations=types.ToolAnnotations(
                       title=spec.title, read_only_hint=spec.read_only, destructive_hint=spec.destructive,
                       idempotent_hint=spec.idempotent, open_world_hint=False))
        for spec in tools.TOOLS
    ]


def to_result(out: tools.ToolOutput) -> types.CallToolResult:
    content: list[Any] = [types.TextContent(text=out.text)]
    content += [types.ImageContent(data=data, mime_type=mime) for mime, data in out.images]
    return types.CallToolResult(content=content, structured_content=out.structured, is_error=out.is_error)


async def run_tool(backend: Backend, name: str, arguments: dict[str, Any] | None,
                   send_progress: SendProgress | None) -> types.CallToolResult:
    """One ``tools/call``: the tool runs while a :class:`ProgressReporter` forwards its execution's events;
    then it is recorded in the audit log (:func:`audit_tool`)."""
    if send_progress is None:
        out = await tools.call_tool(backend, name, arguments)
    else:
        reporter = ProgressReporter(send_progress)
        async with anyio.create_task_group() as tg:
            tg.start_soon(reporter.run)
            try:
                out = await tools.call_tool(backend, name, arguments, reporter.on_event)
                await reporter.flush()
            finally:
                tg.cancel_scope.cancel()
    audit_tool(backend, name, arguments, out)
    return to_result(out)


#: Tool arguments recorded as the ids a call touched, and those whose value is code (kept as SHA-256 and size).
_AUDIT_IDS = ("sandbox_id", "session_id", "execution_id", "path")
_AUDIT_CODE = ("code", "command", "input")


def audit_tool(backend: Backend, name: str, arguments: dict[str, Any] | None, out: tools.ToolOutput) -> None:
    """The MCP surface's one audit hook: a tool call that ran on the in-process hub is an entry (action: the
    tool's name; ids: its id and path arguments, and the id it made; outcome: 200, or the status and code of
    its error). A remote backend's calls are audited by the gateway they reach."""
    if not isinstance(backend, HubBackend):
        return
    args = arguments if isinstance(arguments, dict) else {}
    ids: dict[str, object] = {k: v for k in _AUDIT_IDS if isinstance(v := args.get(k), str)}
    error = out.structured.get("error") if out.is_error else None
    made = out.structured.get("id")
    if not out.is_error and isinstance(made, str) and made not in ids.values():
        ids["created"] = made
    code = next((v for k in _AUDIT_CODE if isinstance(v := args.get(k), str)), None)
    status = error_class(str(error), 0).status if out.is_error else 200
    backend.hub.record_action(backend.tenant, backend.key, name[:256], ids, status or 500,
                              str(error) if error else None, code)


def build_server(backend_for: BackendFor) -> Server[Any]:
    """The SDK server with the tools; ``backend_for(ctx)`` picks the backend of each call."""

    async def list_tools(ctx: ServerRequestContext[Any, Any],
                         params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        return types.ListToolsResult(tools=tool_list())

    async def call_tool(ctx: ServerRequestContext[Any, Any],
                        params: types.CallToolRequestParams) -> types.CallToolResult:
        try:
            backend = backend_for(ctx)
        except KernelHubError as exc:
            return to_result(tools.error_output(exc))
        return await run_tool(backend, params.name, params.arguments, ctx.session.report_progress)

    return Server("kernelhub", version=__version__, title="kernelhub sandboxes", instructions=INSTRUCTIONS,
                  on_list_tools=list_tools, on_call_tool=call_tool)


# -- kernelhub mcp: stdio -----------------------------------------------------------------------------------


def stdio_error(exc: Exception) -> types.JSONRPCError:
    """The JSON-RPC answer to a stdin line that is not a JSON-RPC message (JSON-RPC 2.0 section 5.1): -32700
    when it is not JSON, -32600 when it is JSON of another shape; ``id`` is null, as the line's id is unknown."""
    errors = exc.errors() if isinstance(exc, ValidationError) else []
    if errors and errors[0].get("type") != "json_invalid":
        code, head = types.INVALID_REQUEST, "Invalid request: not a JSON-RPC 2.0 request, notification or response"
    else:
        detail = errors[0].get("msg", "") if errors else str(exc).splitlines()[0] if str(exc) else ""
        code, head = types.PARSE_ERROR, f"Parse error: {detail[:200]}" if detail else "Parse error"
    return types.JSONRPCError(jsonrpc="2.0", id=None, error=types.ErrorData(code=code, message=head + "."))


class AnswerMalformedLines:
    """The stdio transport's read stream, answering each line it could not read as JSON-RPC with
    :func:`stdio_error` on the write stream. The SDK's own stdio server passes such lines on as exceptions,
    which its server drops without a word: a host would wait forever for an answer."""

    def __init__(self, inner: Any, write_stream: Any) -> None:
        self._inner = inner
        self._write = write_stream

    @property
    def last_context(self) -> Any:
        return getattr(self._inner, "last_context", None)

    async def receive(self) -> Any:
        while True:
            item = await self._inner.receive()
            if not isinstance(item, Exception):
                return item
            log.info("answered a malformed stdin line: %s", str(item).splitlines()[0][:200] if str(item) else "")
            await self._write.send(SessionMessage(stdio_error(item)))

    async def aclose(self) -> None:
        await self._inner.aclose()

    def __aiter__(self) -> AnswerMalformedLines:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> AnswerMalformedLines:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


async def serve_stdio(server: Server[Any], cleanup: Callable[[], Awaitable[None]]) -> None:
    """Serve until the host closes stdin, then ``cleanup()``. SIGTERM/SIGINT run the same clean-up and end
    the process: the SDK reads stdin in a thread that a cancellation cannot interrupt."""
    loop = asyncio.get_running_loop()
    cleaning: asyncio.Future[None] | None = None
    pending: set[asyncio.Future[None]] = set()

    def clean() -> asyncio.Future[None]:
        nonlocal cleaning
        if cleaning is None:
            cleaning = asyncio.ensure_future(cleanup())
        return cleaning

    async def on_signal() -> None:
        try:
            await clean()
        finally:
            os._exit(0)

    def signalled() -> None:
        task = asyncio.ensure_future(on_signal())
        pending.add(task)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signalled)
    try:
        async with stdio_server() as (read_stream, write_stream):
            await server.run(AnswerMalformedLines(read_stream, write_stream), write_stream,
                             server.create_initialization_options())
    finally:
        await clean()


async def stdio_embedded(hub: Hub, tenant: Tenant) -> None:
    """``kernelhub mcp`` in-process: the tools act as ``tenant`` on ``hub`` (started by the caller) until the
    host closes the server; then, or on SIGTERM/SIGINT, every sandbox this process started is stopped."""
    backend = HubBackend(hub, tenant)
    await serve_stdio(build_server(lambda ctx: backend), hub.shutdown)


async def stdio_remote(url: str, token: str | None) -> None:
    """``kernelhub mcp --url``: the tools drive the gateway at ``url`` with the API key ``token``. A gateway
    that does not answer is logged, not fatal: the host shows the server as connected and every tool answers
    that error until it is fixed. The gateway's sandboxes outlive this process (they idle out there)."""
    api = AsyncApiClient(url, token)
    try:
        await api.call(_api.list_sandboxes())
    except KernelHubError as exc:
        log.warning("the gateway at %s did not answer as expected: %s", api.url, exc)
    backend = RemoteBackend(api)
    await serve_stdio(build_server(lambda ctx: backend), api.aclose)
