"""The MCP server: the seventeen tools on the official SDK's low-level :class:`mcp.server.Server`, and
``kernelhub mcp``, which serves them over stdio.

:func:`build_server` makes the SDK server for any way of choosing a backend per call (the gateway's ``/mcp``
route picks the caller's tenant, see :mod:`kernelhub.mcp.http`); :func:`main` is ``kernelhub mcp``, in-process
by default (a :class:`~kernelhub.services.hub.Hub` of its own, tenant ``default``) or, with ``--url``, driving a
running gateway through its REST API.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import mcp_types as types
from mcp.server import Server, ServerRequestContext
from mcp.server.stdio import stdio_server

from .. import __version__
from ..errors import KernelHubError
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
    """The seventeen tools as ``tools/list`` shows them."""
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
    """One ``tools/call``: the tool runs while a :class:`ProgressReporter` forwards its execution's events."""
    if send_progress is None:
        return to_result(await tools.call_tool(backend, name, arguments))
    reporter = ProgressReporter(send_progress)
    async with anyio.create_task_group() as tg:
        tg.start_soon(reporter.run)
        try:
            out = await tools.call_tool(backend, name, arguments, reporter.on_event)
            await reporter.flush()
        finally:
            tg.cancel_scope.cancel()
    return to_result(out)


def build_server(backend_for: BackendFor) -> Server[Any]:
    """The SDK server with the seventeen tools; ``backend_for(ctx)`` picks the backend of each call."""

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


# -- kernelhub mcp ------------------------------------------------------------------------------------------

HELP = """\
Serve kernelhub's seventeen MCP tools (sandbox_create, code_execute, file_upload, ...) over stdio, for an
MCP host such as Claude Desktop or an IDE agent.

Two modes:
  embedded (default)   kernelhub runs in this process: sandboxes are started here (bubblewrap + cgroups, as
                       `kernelhub serve` does; usually needs root) for the tenant 'default', and all of them
                       are stopped when the host closes the server.
  remote (--url)       the tools drive a running gateway (`kernelhub serve`) through its REST API with
                       --token; sandboxes belong to that key's tenant and outlive this process.

The MCP host starts this command itself; stdout carries the protocol, logs go to stderr. The gateway also
serves the same tools over streamable HTTP at http://HOST:PORT/mcp (Authorization: Bearer KEY).
"""

EPILOG = """\
environment variables:
  KERNELHUB_URL         default for --url (setting it selects the remote mode)
  KERNELHUB_TOKEN       default for --token
  KERNELHUB_STATE_DIR   default for --state-dir
  KERNELHUB_CONFIG      default for --config
  KERNELHUB_ISOLATION   default for --isolation
  (every other KERNELHUB_* variable of `kernelhub serve` applies to the embedded mode too)

Claude Desktop (claude_desktop_config.json), embedded:
  {"mcpServers": {"kernelhub": {"command": "/path/to/.venv/bin/kernelhub", "args": ["mcp"]}}}
remote:
  {"mcpServers": {"kernelhub": {"command": "/path/to/.venv/bin/kernelhub",
                                "args": ["mcp", "--url", "http://127.0.0.1:8888"],
                                "env": {"KERNELHUB_TOKEN": "<key>"}}}}
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kernelhub mcp", description=HELP, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    remote = parser.add_argument_group("remote mode")
    remote.add_argument("--url", default=os.environ.get("KERNELHUB_URL") or None,
                        help="the gateway to drive, e.g. http://127.0.0.1:8888 (KERNELHUB_URL); without it the "
                             "service runs in this process")
    remote.add_argument("--token", default=os.environ.get("KERNELHUB_TOKEN") or None,
                        help="the API key for --url (KERNELHUB_TOKEN); prefer the variable, as arguments are "
                             "visible to other users of the machine")
    embedded = parser.add_argument_group("embedded mode")
    embedded.add_argument("--embedded", action="store_true",
                          help="run in this process even if KERNELHUB_URL is set")
    embedded.add_argument("--state-dir", default=None,
                          help="where sandboxes keep their workspaces (KERNELHUB_STATE_DIR; default "
                               "/var/lib/kernelhub as root, else ~/.local/share/kernelhub)")
    embedded.add_argument("--config", default=None,
                          help="a traitlets config file (.py or .json), as for `kernelhub serve` (KERNELHUB_CONFIG)")
    embedded.add_argument("--isolation", choices=["strict", "relaxed"], default=None,
                          help="strict (default): refuse to start unless `kernelhub doctor` finds the isolation "
                               "enforceable; relaxed: run with what this machine allows (KERNELHUB_ISOLATION)")
    parser.add_argument("--log-level", default=os.environ.get("KERNELHUB_LOG_LEVEL", "WARNING"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper,
                        help="what goes to stderr (KERNELHUB_LOG_LEVEL; default WARNING)")
    return parser


async def _serve_stdio(server: Server[Any], cleanup: Callable[[], Awaitable[None]]) -> None:
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
            await server.run(read_stream, write_stream, server.create_initialization_options())
    finally:
        await clean()


async def _embedded(args: argparse.Namespace) -> int:
    from ..app import KernelHubApp
    from ..sandbox import doctor
    from ..sandbox.sandbox import SandboxFactory
    from ..services.hub import Hub
    from ..services.tenants import Tenant

    argv = []
    for option, value in (("--state-dir", args.state_dir), ("--config", args.config),
                          ("--isolation", args.isolation)):
        if value:
            argv += [option, value]
    app = KernelHubApp()
    app.initialize(argv)
    app.log.setLevel(args.log_level)
    factory = SandboxFactory(parent=app)
    if factory.isolation == "strict" and not app.skip_doctor:
        results = await doctor.checks_async(bwrap=factory.bwrap_path, cgroup_root=factory.cgroup_root,
                                            runtime_dir=factory.runtime_dir)
        if not doctor.enforceable(results):
            failed = "; ".join(f"{c.name}: {c.detail}" for c in results if c.required and not c.ok)
            print(f"kernelhub mcp: this machine cannot enforce strict isolation ({failed}). Fix it, or run "
                  "with --isolation relaxed, or drive a gateway with --url.", file=sys.stderr)
            return 1
    hub = Hub(factory, parent=app)
    await hub.start()
    backend = HubBackend(hub, Tenant("default"))
    # Every sandbox this process started is stopped when the host goes away.
    await _serve_stdio(build_server(lambda ctx: backend), hub.shutdown)
    return 0


async def _remote(args: argparse.Namespace) -> int:
    from ..client import _api
    from ..client._async import AsyncApiClient

    api = AsyncApiClient(args.url, args.token)
    try:
        await api.call(_api.list_sandboxes())
    except KernelHubError as exc:
        # Not fatal: the host shows the server as connected and every tool answers this error until fixed.
        log.warning("the gateway at %s did not answer as expected: %s", api.url, exc)
    backend = RemoteBackend(api)
    # The gateway's sandboxes outlive this process (they idle out there); only the HTTP client is closed.
    await _serve_stdio(build_server(lambda ctx: backend), api.aclose)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry of ``kernelhub mcp``."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s kernelhub-mcp %(levelname)s %(name)s: %(message)s")
    try:
        if args.url and not args.embedded:
            return asyncio.run(_remote(args))
        return asyncio.run(_embedded(args))
    except KernelHubError as exc:
        print(f"kernelhub mcp: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
