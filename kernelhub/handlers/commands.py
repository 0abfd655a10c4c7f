"""The command routes of ``/v1`` (API.md "Commands"), and the command messages of the ``/stream`` websocket.

- ``POST /v1/sandboxes/{id}/commands``: ``command_execute``; run to the end (JSON), or streamed (``Accept:
  application/x-ndjson``), or with ``"background": true`` answered 202 with the command at once;
- ``GET /v1/sandboxes/{id}/commands``: ``{"commands": [command…]}``, running and remembered ended ones;
- ``GET /v1/sandboxes/{id}/commands/{pid}``: the command (``?output=1``: with the ``stdout`` and ``stderr``
  kept so far); ``?follow=1`` (or ``Accept: application/x-ndjson``) re-attaches: its output since it started
  (within the kept bound), then live, as NDJSON (``&replay=0``: live only);
- ``POST /v1/sandboxes/{id}/commands/{pid}/stdin``: ``{data?, data_base64?, eof?}`` to its stdin, closed with
  ``eof``;
- ``POST /v1/sandboxes/{id}/commands/{pid}/signal``: ``{signal}`` to every process of its tree;
- ``DELETE /v1/sandboxes/{id}/commands/{pid}``: kill its whole tree; answers the ended command.

Streamed events are :func:`kernelhub.services.commands.text_events`' plus ``{"type": "keepalive"}`` while quiet.
A foreground command whose streaming client goes away is killed; a background one carries on.

:class:`CommandStreamMixin` adds to the ``/stream`` websocket (:mod:`kernelhub.handlers.streams`) the messages
``{"type": "command", command, cwd?, env?, timeout_s?, stdin?, stdin_open?, background?, request_id?}``,
``{"type": "command_attach", pid, replay?, request_id?}``, ``{"type": "command_stdin", pid, data?, eof?}`` and
``{"type": "command_signal", pid, signal}``; the server answers with the command's events, each carrying the
client's ``request_id``. Closing the socket kills the foreground commands it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from tornado import websocket

from ..errors import InvalidRequest, KernelHubError
from ..models import CommandRun, fields, optional, parse_command_run, parse_command_stdin, parse_signal
from ..services.commands import Command, text_events
from ..services.hub import Hub
from ..services.tenants import Tenant
from .base import BaseHandler, WebSocketBase
from .rest import ID, KEEPALIVE_S, NDJSON, wants_ndjson
from .streaming import StreamingMixin

_KEEPALIVE = b'{"type": "keepalive"}\n'
#: The fields every websocket message may have besides its own.
_MESSAGE_FIELDS = ("type", "request_id")


def _line(event: dict[str, Any]) -> bytes:
    return (json.dumps(event, ensure_ascii=False) + "\n").encode()


async def _lines(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    async for event in events:
        yield _line(event)


async def start_foreground(hub: Hub, tenant: Tenant, sandbox_id: str,
                           req: CommandRun) -> tuple[Command, asyncio.Task[dict[str, Any]]]:
    """Start a foreground command through ``Hub.run_command`` and answer it once it runs, with the task that
    waits for it: cancelling that task is what kills the command when its client goes away (the service's
    rule). An error before it started is raised here."""
    args = req.run_args()
    started: asyncio.Future[Command] = asyncio.get_running_loop().create_future()
    run = asyncio.ensure_future(hub.run_command(tenant, sandbox_id, listener=started.set_result, **args))
    first: set[asyncio.Future[Any]] = {run, started}
    await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
    if not started.done():
        run.result()  # failed before it started: raises
    return started.result(), run


def _message_pid(msg: dict[str, Any]) -> object:
    """The ``pid`` a websocket command message names (the REST routes have it in their path)."""
    if msg.get("pid") is None:
        raise InvalidRequest("The field 'pid' is required.")
    return msg["pid"]


class _CommandStreamHandler(StreamingMixin, BaseHandler):
    """A command route that can answer with the command's events as NDJSON."""

    async def _stream(self, cmd: Command, *, replay: bool = True) -> bool:
        self.begin_stream(NDJSON + "; charset=UTF-8")
        completed = await self.pump(_lines(text_events(cmd, replay=replay)), keepalive=_KEEPALIVE,
                                    interval=KEEPALIVE_S)
        if completed:
            self.finish()
        return completed


class CommandsHandler(_CommandStreamHandler):
    """``POST /v1/sandboxes/{id}/commands`` (command_execute, background, NDJSON) and ``GET`` (the list)."""

    async def post(self, sandbox_id: str) -> None:
        req = parse_command_run(self.json_body())
        if req.background:
            cmd = await self.hub.start_command(self.tenant, sandbox_id, background=True, **req.start_args())
            self.set_header("Location", f"/v1/sandboxes/{sandbox_id}/commands/{cmd.pid}")
            if wants_ndjson(self.request.headers.get("Accept", "")):
                await self._stream(cmd)
                return
            self.send_json(cmd.to_dict(), 202)
            return
        if not wants_ndjson(self.request.headers.get("Accept", "")):
            task = asyncio.ensure_future(self.hub.run_command(self.tenant, sandbox_id, **req.run_args()))
            waiting: set[asyncio.Future[Any]] = {task, self.gone}
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if task not in done:
                task.cancel()  # the client went away: the service kills what it started
                return
            self.send_json(task.result())
            return
        cmd, run = await start_foreground(self.hub, self.tenant, sandbox_id, req)
        try:
            if await self._stream(cmd):
                with contextlib.suppress(KernelHubError):
                    await run
        finally:
            if not run.done():
                run.cancel()  # the client went away: the service kills the command

    def get(self, sandbox_id: str) -> None:
        self.send_json({"commands": [c.to_dict() for c in self.hub.list_commands(self.tenant, sandbox_id)]})


class CommandHandler(_CommandStreamHandler):
    """``GET /v1/sandboxes/{id}/commands/{pid}`` (status, or ``?follow=1`` re-attach) and ``DELETE`` (kill)."""

    async def get(self, sandbox_id: str, pid: str) -> None:
        cmd = self.hub.get_command(self.tenant, sandbox_id, pid)
        follow = self.get_query_argument("follow", "") not in ("", "0", "false")
        if follow or wants_ndjson(self.request.headers.get("Accept", "")):
            replay = self.get_query_argument("replay", "1") not in ("0", "false")
            await self._stream(cmd, replay=replay)
            return
        output = self.get_query_argument("output", "") not in ("", "0", "false")
        self.send_json({**cmd.to_dict(), **(cmd.kept_output() if output else {})})

    async def delete(self, sandbox_id: str, pid: str) -> None:
        cmd = await self.hub.kill_command(self.tenant, sandbox_id, pid)
        self.send_json(cmd.to_dict())


class CommandStdinHandler(BaseHandler):
    """``POST /v1/sandboxes/{id}/commands/{pid}/stdin``: ``{data?, data_base64?, eof?}``."""

    async def post(self, sandbox_id: str, pid: str) -> None:
        req = parse_command_stdin(self.json_body())
        cmd = await self.hub.command_stdin(self.tenant, sandbox_id, pid, req.data, eof=req.eof)
        self.send_json(cmd.to_dict())


class CommandSignalHandler(BaseHandler):
    """``POST /v1/sandboxes/{id}/commands/{pid}/signal``: ``{signal}`` to every process of the command's tree."""

    async def post(self, sandbox_id: str, pid: str) -> None:
        count = await self.hub.signal_command(self.tenant, sandbox_id, pid, parse_signal(self.json_body()))
        self.send_json({"pid": int(pid), "signalled": count})


class CommandStreamMixin(WebSocketBase):
    """The command messages of ``WS /v1/sandboxes/{id}/stream`` (see the module); the execution messages are
    :class:`~kernelhub.handlers.streams.SandboxStreamHandler`'s own. Each command's events are sent from a task
    of their own, awaiting each send (a slow client is skipped ahead by the command's output buffer rather than
    buffered without bound)."""

    sandbox_id: str
    COMMAND_MESSAGES = ("command", "command_attach", "command_stdin", "command_signal")

    def command_setup(self) -> None:
        self._command_tasks: set[asyncio.Task[Any]] = set()

    async def on_command_message(self, msg: dict[str, Any], request_id: Any) -> None:
        """Act on one command message; raises :class:`~kernelhub.errors.KernelHubError` for the caller to
        answer as ``rejected``."""
        kind = msg.get("type")
        if kind == "command":
            req = parse_command_run(msg, extra=_MESSAGE_FIELDS)
            if req.background:
                cmd = await self.hub.start_command(self.tenant, self.sandbox_id, background=True,
                                                   **req.start_args())
            else:
                cmd, run = await start_foreground(self.hub, self.tenant, self.sandbox_id, req)
                self._hold(run)
            self._send_command_events(cmd, request_id, replay=True)
        elif kind == "command_attach":
            fields(msg, allowed=(*_MESSAGE_FIELDS, "pid", "replay"), required=("pid",))
            cmd = self.hub.get_command(self.tenant, self.sandbox_id, msg.get("pid"))
            replay = optional(msg, "replay", bool, "true or false")
            self._send_command_events(cmd, request_id, replay=replay is not False)
        elif kind == "command_stdin":
            stdin = parse_command_stdin(msg, extra=(*_MESSAGE_FIELDS, "pid"))
            await self.hub.command_stdin(self.tenant, self.sandbox_id, _message_pid(msg), stdin.data, eof=stdin.eof)
        else:
            signal = parse_signal(msg, extra=(*_MESSAGE_FIELDS, "pid"))
            await self.hub.signal_command(self.tenant, self.sandbox_id, _message_pid(msg), signal)

    def _send_command_events(self, cmd: Command, request_id: Any, *, replay: bool) -> None:
        async def send() -> None:
            with contextlib.suppress(websocket.WebSocketClosedError):
                async for event in text_events(cmd, replay=replay):
                    await self.write_message(json.dumps({**event, "request_id": request_id}, ensure_ascii=False))

        self._hold(asyncio.ensure_future(send()))

    def _hold(self, task: asyncio.Task[Any]) -> None:
        self._command_tasks.add(task)
        task.add_done_callback(self._command_tasks.discard)

    def command_close(self) -> None:
        """The socket closed: stop sending, and cancel the foreground commands it started (the service kills
        those that still run, reason ``cancelled``)."""
        for task in list(self._command_tasks):
            task.cancel()


default_handlers: list[Any] = [
    (rf"/v1/sandboxes/{ID}/commands", CommandsHandler),
    (rf"/v1/sandboxes/{ID}/commands/([0-9]+)", CommandHandler),
    (rf"/v1/sandboxes/{ID}/commands/([0-9]+)/stdin", CommandStdinHandler),
    (rf"/v1/sandboxes/{ID}/commands/([0-9]+)/signal", CommandSignalHandler),
]
