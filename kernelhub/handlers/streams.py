"""``WS /v1/sandboxes/{id}/stream``: executions over a websocket (API.md, "Streaming").

The client sends ``{"type": "execute", code, session_id?, language?, timeout_s?, env?, request_id?}``,
``{"type": "interrupt", execution_id}`` and ``{"type": "input", execution_id, value}``. The server answers each
execute with ``{"type": "accepted", execution_id, request_id, status}`` at once (so a queued execution can be
interrupted before it starts), then the execution's events as the NDJSON stream has them (``start``,
``stdout``/``stderr``, ``result``, ``error``, ``input_request``, ``end``), each with ``execution_id`` and the
client's ``request_id``. A message the server cannot act on is answered ``{"type": "rejected", request_id,
error, message}`` (not ``error``, which is an execution's exception).

Several executions may be in flight from one connection; each runs in a task of its own. Events are sent
with ``await write_message(...)`` from the execution's listener, so a slow client slows its kernel's reader
rather than making the gateway buffer without bound. A closed connection is an ordinary disconnect: what it
started and has not ended is interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from tornado import websocket

from .. import json_input
from ..errors import ExecutionEnded, InvalidRequest, KernelHubError, NoInputRequested, NotFound
from ..models import Execute, parse_execute, required
from ..services.executions import Execution
from ..services.hub import Hub
from ..services.tenants import TenantRegistry
from .base import GatewayConfig, audited_code, json_text
from .commands import CommandStreamMixin

MAX_REQUEST_ID = 256


def _request_id(msg: dict[str, Any]) -> Any:
    rid = msg.get("request_id")
    if rid is None or (isinstance(rid, (str, int)) and not isinstance(rid, bool) and len(str(rid)) <= MAX_REQUEST_ID):
        return rid
    return None


class SandboxStreamHandler(CommandStreamMixin):
    """One client's executions (and commands, :class:`~kernelhub.handlers.commands.CommandStreamMixin`) in one
    sandbox over a websocket."""

    sandbox_id: str

    def initialize(self, hub: Hub, tenants: TenantRegistry, config: GatewayConfig, **kwargs: Any) -> None:
        super().initialize(hub, tenants, config, **kwargs)
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._live: dict[str, Execution] = {}
        self._inputs: dict[str, asyncio.Future[str]] = {}
        self.command_setup()

    def before_upgrade(self, *args: Any, **kwargs: Any) -> None:
        self.hub.get_sandbox(self.tenant, args[0] if args else None)

    def open(self, *args: Any, **kwargs: Any) -> None:
        super().open(*args, **kwargs)
        self.sandbox_id = args[0]

    # -- sending ------------------------------------------------------------------------------------------

    async def _send(self, message: dict[str, Any]) -> None:
        """Send one message, waiting until tornado has handed it to the socket (back-pressure)."""
        await self.write_message(json_text(message))

    async def _reject(self, request_id: Any, exc: KernelHubError) -> None:
        with contextlib.suppress(websocket.WebSocketClosedError):
            await self._send({"type": "rejected", "request_id": request_id, "error": exc.error,
                              "message": exc.message})

    # -- receiving ----------------------------------------------------------------------------------------

    async def on_message(self, message: str | bytes) -> None:
        # tornado delivers the next message only when this returns: anything long runs in a task.
        try:
            if isinstance(message, bytes):
                raise InvalidRequest("Messages are JSON objects in text frames, not binary frames.")
            msg = json_input.loads(message, "A message")
            if not isinstance(msg, dict):
                raise InvalidRequest("A message must be a JSON object.")
        except KernelHubError as exc:
            self.audit("WS /v1/sandboxes/{sandbox_id}/stream message", {"sandbox_id": self.sandbox_id}, exc.status,
                       exc.error)
            await self._reject(None, exc)
            return
        request_id = _request_id(msg)
        action = f"WS /v1/sandboxes/{{sandbox_id}}/stream {str(msg.get('type'))[:32]}"
        ids = {"sandbox_id": self.sandbox_id, "execution_id": msg.get("execution_id")}
        try:
            if msg.get("request_id") is not None and request_id is None:
                raise InvalidRequest(f"request_id must be a string or an integer of at most {MAX_REQUEST_ID} "
                                     "characters.")
            kind = msg.get("type")
            if kind == "execute":
                self._start(msg, request_id)
            elif kind == "interrupt":
                self._interrupt(msg)
            elif kind == "input":
                self._input(msg)
            elif kind in self.COMMAND_MESSAGES:
                await self.on_command_message(msg, request_id)
            else:
                raise InvalidRequest(f"Unknown message type {str(kind)[:64]!r}; send execute, interrupt, input, "
                                     f"{', '.join(self.COMMAND_MESSAGES)}.")
        except KernelHubError as exc:
            self.audit(action, ids, exc.status, exc.error, audited_code(msg))
            await self._reject(request_id, exc)
        else:
            if kind != "execute":  # an execute is recorded once accepted or rejected (_run_execution)
                self.audit(action, ids, 200, None, audited_code(msg))

    def _start(self, msg: dict[str, Any], request_id: Any) -> None:
        req = parse_execute(msg, extra=("type", "request_id"), who="execute")
        self._background(self._run_execution(req, request_id))

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)  # held so that it is not garbage-collected while it runs
        task.add_done_callback(self._tasks.discard)

    async def _run_execution(self, req: Execute, request_id: Any) -> None:
        """One execution from accept to end; runs in its own task."""
        holder: dict[str, Execution] = {}

        async def listener(event: dict[str, Any]) -> None:
            event = {**event, "request_id": request_id}
            await self._send(event)

        async def input_handler(prompt: str, password: bool) -> str:
            ex = holder["ex"]
            fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            self._inputs[ex.id] = fut
            try:
                return await asyncio.wait_for(fut, ex.timeout_s)
            finally:
                self._inputs.pop(ex.id, None)

        action = "WS /v1/sandboxes/{sandbox_id}/stream execute"
        try:
            ex = await self.hub.execute(self.tenant, self.sandbox_id, listener=listener,
                                        input_handler=input_handler, wait=False, **vars(req))
        except KernelHubError as exc:
            self.audit(action, {"sandbox_id": self.sandbox_id}, exc.status, exc.error, req.code)
            await self._reject(request_id, exc)
            return
        self.audit(action, {"sandbox_id": self.sandbox_id, "execution_id": ex.id}, 202, None, req.code)
        holder["ex"] = ex
        self._live[ex.id] = ex
        try:
            if self._closed:
                return  # gone while the execution was being set up: the finally interrupts it
            with contextlib.suppress(websocket.WebSocketClosedError):
                # Sent before the execution's task can run, so it always precedes "start".
                await self._send({"type": "accepted", "execution_id": ex.id, "request_id": request_id,
                                  "status": ex.status, "session_id": ex.session_id})
            await ex.wait()
        finally:
            self._live.pop(ex.id, None)
            pending = self._inputs.pop(ex.id, None)
            if pending is not None and not pending.done():
                # Ended while asking for input: free the session's stdin reader for the next execution now.
                pending.set_result("")
            if self._closed and not ex.ended:
                with contextlib.suppress(KernelHubError):
                    await self.hub.interrupt_execution(self.tenant, ex.id)

    def _owned(self, msg: dict[str, Any]) -> Execution:
        execution_id = required(msg, "execution_id", str, "an execution id")
        ex = self.hub.get_execution(self.tenant, execution_id)
        if ex.sandbox_id != self.sandbox_id:
            raise NotFound(f"No execution {str(execution_id)[:64]!r} in sandbox {self.sandbox_id}.")
        return ex

    def _interrupt(self, msg: dict[str, Any]) -> None:
        ex = self._owned(msg)
        if ex.ended:
            raise ExecutionEnded(f"Execution {ex.id} already ended ({ex.status}).")
        # In a task: the interrupt may wait for the kernel to begin the code, and messages keep flowing.
        self._background(self._interrupt_quietly(ex.id))

    def _input(self, msg: dict[str, Any]) -> None:
        ex = self._owned(msg)
        value = msg.get("value")
        if not isinstance(value, str):
            raise InvalidRequest("value must be a string.")
        fut = self._inputs.get(ex.id)
        if fut is None or fut.done():
            raise NoInputRequested(f"Execution {ex.id} is not waiting for input.")
        fut.set_result(value)

    # -- closing ------------------------------------------------------------------------------------------

    def on_close(self) -> None:
        """An ordinary disconnect: interrupt what this connection started and has not ended."""
        self._closed = True
        self.command_close()
        for fut in self._inputs.values():
            if not fut.done():
                # An empty answer, not cancel(): the session's stdin reader must survive this.
                fut.set_result("")
        for ex in list(self._live.values()):
            if not ex.ended:
                self._background(self._interrupt_quietly(ex.id))

    async def _interrupt_quietly(self, execution_id: str) -> None:
        with contextlib.suppress(KernelHubError):
            await self.hub.interrupt_execution(self.tenant, execution_id)


default_handlers: list[Any] = [
    (r"/v1/sandboxes/([^/]+)/stream", SandboxStreamHandler),
]
