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
import base64
import binascii
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from tornado import websocket

from ..errors import InvalidRequest, KernelHubError
from ..services.commands import Command, text_events
from ..services.hub import Hub
from ..services.tenants import Tenant
from .base import BaseHandler, WebSocketBase
from .rest import ID, KEEPALIVE_S, NDJSON, fields, optional, wants_ndjson
from .streaming import StreamingMixin

_KEEPALIVE = b'{"type": "keepalive"}\n'
_START_FIELDS = ("command", "cwd", "env", "timeout_s", "stdin", "stdin_open", "background", "tag")


def _line(event: dict[str, Any]) -> bytes:
    return (json.dumps(event, ensure_ascii=False) + "\n").encode()


async def _lines(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    async for event in events:
        yield _line(event)


def _start_args(body: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``Hub.start_command`` from a request body (REST or websocket message)."""
    return {
        "command": optional(body, "command", str, "a string"),
        "cwd": optional(body, "cwd", str, "a path string"),
        "env": optional(body, "env", dict, "a JSON object of strings"),
        "timeout_s": optional(body, "timeout_s", (int, float), "a number of seconds"),
        "stdin": optional(body, "stdin", str, "a string"),
        "stdin_open": bool(optional(body, "stdin_open", bool, "true or false")),
        "tag": optional(body, "tag", str, "a string"),
    }


def _foreground_args(args: dict[str, Any]) -> None:
    """Drop the background-only arguments from ``args``, refusing them when they were given."""
    if args.pop("stdin_open") or args.pop("tag") is not None:
        raise InvalidRequest("stdin_open and tag apply to background commands; a foreground command's stdin is "
                             "the stdin field.")


async def start_foreground(hub: Hub, tenant: Tenant, sandbox_id: str,
                           args: dict[str, Any]) -> tuple[Command, asyncio.Task[dict[str, Any]]]:
    """Start a foreground command through ``Hub.run_command`` and answer it once it runs, with the task that
    waits for it: cancelling that task is what kills the command when its client goes away (the service's
    rule). An error before it started is raised here."""
    started: asyncio.Future[Command] = asyncio.get_running_loop().create_future()
    run = asyncio.ensure_future(hub.run_command(tenant, sandbox_id, listener=started.set_result, **args))
    first: set[asyncio.Future[Any]] = {run, started}
    await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
    if not started.done():
        run.result()  # failed before it started: raises
    return started.result(), run


def _stdin_data(body: dict[str, Any]) -> str | bytes | None:
    text = optional(body, "data", str, "a string")
    encoded = optional(body, "data_base64", str, "base64 text")
    if text is not None and encoded is not None:
        raise InvalidRequest("Give data or data_base64, not both.")
    if encoded is not None:
        try:
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest("data_base64 is not valid base64.") from None
    return text


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
        body = fields(self.json_body(), allowed=_START_FIELDS, required=("command",))
        args = _start_args(body)
        background = bool(optional(body, "background", bool, "true or false"))
        if background:
            cmd = await self.hub.start_command(self.tenant, sandbox_id, background=True, **args)
            self.set_header("Location", f"/v1/sandboxes/{sandbox_id}/commands/{cmd.pid}")
            if wants_ndjson(self.request.headers.get("Accept", "")):
                await self._stream(cmd)
                return
            self.send_json(cmd.to_dict(), 202)
            return
        _foreground_args(args)
        if not wants_ndjson(self.request.headers.get("Accept", "")):
            task = asyncio.ensure_future(self.hub.run_command(self.tenant, sandbox_id, **args))
            waiting: set[asyncio.Future[Any]] = {task, self.gone}
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if task not in done:
                task.cancel()  # the client went away: the service kills what it started
                return
            self.send_json(task.result())
            return
        cmd, run = await start_foreground(self.hub, self.tenant, sandbox_id, args)
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
        body = fields(self.json_body(), allowed=("data", "data_base64", "eof"))
        eof = bool(optional(body, "eof", bool, "true or false"))
        cmd = await self.hub.command_stdin(self.tenant, sandbox_id, pid, _stdin_data(body), eof=eof)
        self.send_json(cmd.to_dict())


class CommandSignalHandler(BaseHandler):
    """``POST /v1/sandboxes/{id}/commands/{pid}/signal``: ``{signal}`` to every process of the command's tree."""

    async def post(self, sandbox_id: str, pid: str) -> None:
        body = fields(self.json_body(), allowed=("signal",), required=("signal",))
        count = await self.hub.signal_command(self.tenant, sandbox_id, pid,
                                              optional(body, "signal", str, "a signal name such as SIGTERM"))
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
            body = fields({k: v for k, v in msg.items() if k not in ("type", "request_id")},
                          allowed=_START_FIELDS, required=("command",))
            args = _start_args(body)
            if optional(body, "background", bool, "true or false"):
                cmd = await self.hub.start_command(self.tenant, self.sandbox_id, background=True, **args)
            else:
                _foreground_args(args)
                cmd, run = await start_foreground(self.hub, self.tenant, self.sandbox_id, args)
                self._hold(run)
            self._send_command_events(cmd, request_id, replay=True)
        elif kind == "command_attach":
            fields(msg, allowed=("type", "request_id", "pid", "replay"), required=("pid",))
            cmd = self.hub.get_command(self.tenant, self.sandbox_id, msg.get("pid"))
            replay = optional(msg, "replay", bool, "true or false")
            self._send_command_events(cmd, request_id, replay=replay is not False)
        elif kind == "command_stdin":
            fields(msg, allowed=("type", "request_id", "pid", "data", "data_base64", "eof"), required=("pid",))
            eof = bool(optional(msg, "eof", bool, "true or false"))
            await self.hub.command_stdin(self.tenant, self.sandbox_id, msg.get("pid"), _stdin_data(msg), eof=eof)
        else:
            fields(msg, allowed=("type", "request_id", "pid", "signal"), required=("pid", "signal"))
            await self.hub.signal_command(self.tenant, self.sandbox_id, msg.get("pid"),
                                          optional(msg, "signal", str, "a signal name such as SIGTERM"))

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
