"""Executions: one run of code in a jupyter session, its outputs, and a bounded history to read them back.

:class:`Execution` collects what the kernel's iopub stream says about one ``execute_request`` and fans it
out as events (the NDJSON/websocket event shapes of API.md) to listeners. The session
(:mod:`kernelhub.services.sessions`) drives it. :class:`~kernelhub.services.executor.Executor` creates
executions and keeps them in an :class:`ExecutionHistory` (``execution_status``), bounded per tenant in count
and bytes; ``Sandboxes`` ends a stopped sandbox's unfinished ones from there and drops a deleted sandbox's.

Every listener sees the same events in the same order, and the stored execution (``to_dict``) holds what they
saw: events go out one at a time (:meth:`Execution.emit`), ``end`` is always last, and an execution that ends
in ``error`` has sent an ``error`` event before its ``end`` (one is made from the error object when the kernel
published none, e.g. tslab, or an interrupt that landed in ipykernel's own code).

Displays (Jupyter's ``display_id``): a result carries its ``display_id``; an ``update_display_data`` replaces
every result with that id, in this execution or in the earlier one of the same session that showed it
(:class:`Displays`), and streams as ``{"type": "update", display_id, data, metadata?}``.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..errors import NotFound
from ..models import iso, new_id

if TYPE_CHECKING:
    from .store import Store

Listener = Callable[[dict[str, Any]], "Awaitable[None] | None"]
InputHandler = Callable[[str, bool], Awaitable[str]]

_log = logging.getLogger(__name__)

ENDED = ("ok", "error", "timeout", "killed")
#: How many display ids a session remembers the execution of (the oldest are forgotten first).
DISPLAYS_KEPT = 1000
#: The longest error name kept (characters); the rest of an error counts against the output cap.
MAX_ERROR_NAME = 256


class Displays:
    """Which execution of a session first showed each ``display_id``, so that an update sent by a later
    execution (``h = display(x, display_id=True)`` in one cell, ``h.update(y)`` in the next) replaces the output
    where it is. One per :class:`~kernelhub.services.sessions.JupyterSession`; bounded to :data:`DISPLAYS_KEPT`."""

    def __init__(self, size: int = DISPLAYS_KEPT) -> None:
        self.size = size
        self._owner: collections.OrderedDict[str, Execution] = collections.OrderedDict()

    def shown(self, display_id: str, execution: Execution) -> None:
        self._owner[display_id] = execution
        self._owner.move_to_end(display_id)
        while len(self._owner) > self.size:
            self._owner.popitem(last=False)

    def owner(self, display_id: str) -> Execution | None:
        return self._owner.get(display_id)


class Execution:
    """One execution. Created by the hub, run by a :class:`~kernelhub.services.sessions.JupyterSession`."""

    def __init__(self, *, tenant: str, sandbox_id: str, session_id: str, code: str, timeout_s: float,
                 output_limit: int, allow_input: bool = False) -> None:
        self.id = new_id("ex")
        self.tenant = tenant
        self.sandbox_id = sandbox_id
        self.session_id = session_id
        self.code = code
        self.timeout_s = timeout_s
        self.output_limit = output_limit
        self.status = "queued"
        self.execution_count: int | None = None
        # Appended chunk by chunk and joined when read: a long flood must not cost a copy of all the output
        # so far per message (the iopub reader would fall behind the kernel).
        self._streams: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.results: list[dict[str, Any]] = []
        self.error: dict[str, Any] | None = None
        self.reason: str | None = None
        self.truncated = False
        self.created_at = time.time()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.msg_id: str | None = None
        self.input_handler: InputHandler | None = None
        self.allow_input = allow_input
        #: Set by the session that runs it: where display ids of its kernel live.
        self.displays: Displays | None = None
        #: Set the first time output goes over ``output_limit``; the session then stops the execution.
        self.over_limit = asyncio.Event()
        #: The last stderr text (tslab prints a JavaScript error there and publishes no ``error`` message).
        self.last_stderr = ""
        self._listeners: list[Listener] = []
        self._emit_lock = asyncio.Lock()
        self._error_sent = False
        self._output_bytes = 0
        #: Bytes of kernel messages read while it ran, beyond each one's envelope (see :meth:`received`).
        self.received_bytes = 0
        self._done = asyncio.Event()
        self._started = asyncio.Event()

    @property
    def stdout(self) -> str:
        return self._text("stdout")

    @property
    def stderr(self) -> str:
        return self._text("stderr")

    def _text(self, name: str) -> str:
        parts = self._streams[name]
        if len(parts) > 1:
            parts[:] = ["".join(parts)]
        return parts[0] if parts else ""

    # -- listeners ----------------------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """Streams call this to receive every event from now on (start, outputs, end)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    async def emit(self, event: dict[str, Any]) -> None:
        """Send an event to every listener; a listener that awaits applies back-pressure to the kernel's
        reader for this session, which is what bounds the memory a slow client can pin. Events go out one at a
        time, each to every listener before the next, so that concurrent emitters (the iopub reader, the stdin
        reader, the session ending the execution) cannot reorder them for any listener."""
        event.setdefault("execution_id", self.id)
        async with self._emit_lock:
            if event.get("type") == "error":
                self._error_sent = True
            for listener in list(self._listeners):
                try:
                    result = listener(event)
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    # A listener that fails (a closed socket) stops listening; the execution carries on.
                    self.remove_listener(listener)

    # -- state --------------------------------------------------------------------------------------------

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    async def wait(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._done.wait(), timeout)

    async def wait_started(self) -> None:
        await self._started.wait()

    def mark_running(self) -> None:
        self.status = "running"
        self.started_at = time.time()
        self._started.set()

    async def finish(self, status: str, reason: str | None = None) -> None:
        """End the execution: ``end`` goes to every listener, after an ``error`` event made from
        :attr:`error` if the kernel published none. Called by the session (or the hub for a queued one)."""
        if self.ended:
            return
        if status == "error" and self.error is None:
            self.error = {"name": "Error", "value": "The execution failed.", "traceback": []}
        if self.error is not None and not self._error_sent:
            await self.emit({"type": "error", **self.error})
        if self.ended:  # ended meanwhile by another caller
            return
        self.status = status
        if reason and not self.reason:
            self.reason = reason
        if self.started_at is None:
            self.started_at = time.time()
        self.finished_at = time.time()
        self._started.set()
        await self.emit({"type": "end", "execution": self.to_dict()})
        self._done.set()

    @property
    def stored_bytes(self) -> int:
        """Bytes this execution keeps: its outputs as counted against the cap, its error and its code (what the
        execution history counts against its byte bound)."""
        return self._output_bytes + len(self.code) + (_error_size(self.error) if self.error else 0)

    def _take(self, size: int) -> bool:
        """Count output against the cap; False once it is over (the output is dropped, ``truncated`` set and
        :attr:`over_limit` fired, which makes the session stop the execution)."""
        if self._output_bytes + size > self.output_limit:
            self._over()
            return False
        self._output_bytes += size
        return True

    def received(self, nbytes: int) -> None:
        """Called by the session for each kernel message read while this execution runs, with its bytes beyond
        its envelope, before it is parsed: past the output cap the execution is stopped as for output it keeps
        (messages it would not keep, junk included, cost the gateway too)."""
        self.received_bytes += nbytes
        if self.received_bytes > self.output_limit:
            self._over()

    def _over(self) -> None:
        if not self.truncated:
            self.truncated = True
            self.reason = self.reason or "output_truncated"
            self.over_limit.set()

    async def on_iopub(self, msg: dict[str, Any]) -> None:
        """Called by the session's iopub reader for every message whose parent is this execution; messages
        that come after its end (a stopped flood, a thread still printing) are dropped.

        Every byte kept counts against the output cap (API.md ``output_mb``): stream text as it is kept, and a
        result, a display update or an error by the size of the message content it was made of
        (``msg["content_bytes"]``, set by the session; measured here when absent), metadata and MIME keys
        included. An error past the cap is kept cut to fit."""
        if self.ended:
            return
        kind = msg.get("msg_type") or msg.get("header", {}).get("msg_type")
        content = msg.get("content", {})
        if not isinstance(content, dict):
            return
        size = msg.get("content_bytes")
        if not isinstance(size, int):
            size = _json_size(content)
        if kind == "stream":
            name = "stderr" if content.get("name") == "stderr" else "stdout"
            text = str(content.get("text", ""))
            if not self._take(len(text.encode())):
                room = self.output_limit - self._output_bytes
                if room <= 0:
                    return
                text = text.encode()[:room].decode(errors="ignore")
                self._output_bytes = self.output_limit
            self._streams[name].append(text)
            if name == "stderr":
                self.last_stderr = text
            await self.emit({"type": name, "text": text})
        elif kind in ("execute_result", "display_data"):
            data = content.get("data") or {}
            if not isinstance(data, dict) or not self._take(size):
                return
            result: dict[str, Any] = {"is_main_result": kind == "execute_result", "data": data}
            if content.get("metadata"):
                result["metadata"] = content["metadata"]
            display_id = _display_id(content)
            if display_id is not None:
                result["display_id"] = display_id
                if self.displays is not None:
                    self.displays.shown(display_id, self)
            self.results.append(result)
            if kind == "execute_result" and content.get("execution_count") is not None:
                self.execution_count = content["execution_count"]
            await self.emit({"type": "result", **result})
        elif kind == "update_display_data":
            display_id = _display_id(content)
            data = content.get("data") or {}
            if display_id is None or not isinstance(data, dict) or not self._take(size):
                return  # an update without a display_id updates nothing (Jupyter's messaging spec)
            metadata = content.get("metadata") or None
            owner = self if self._shows(display_id) else (self.displays.owner(display_id) if self.displays else None)
            if owner is not None:
                owner.replace_display(display_id, data, metadata)
            event: dict[str, Any] = {"type": "update", "display_id": display_id, "data": data}
            if metadata:
                event["metadata"] = metadata
            await self.emit(event)
        elif kind == "error":
            traceback = content.get("traceback")
            error = {
                "name": str(content.get("ename", ""))[:MAX_ERROR_NAME],
                "value": str(content.get("evalue", "")),
                "traceback": [str(t) for t in traceback[:200]] if isinstance(traceback, list) else [],
            }
            self.keep_error(error, size)
            await self.emit({"type": "error", **(self.error or error)})
        elif kind == "execute_input":
            if content.get("execution_count") is not None:
                self.execution_count = content["execution_count"]

    def keep_error(self, error: dict[str, Any], size: int | None = None) -> None:
        """Keep ``error`` (``{name, value, traceback}``) as this execution's error, counting ``size`` bytes
        (default: its own) against the output cap; past the cap it is kept cut to the room left (its name kept,
        its value cut, its traceback dropped) and the execution is marked truncated."""
        self.error = error if self._take(_error_size(error) if size is None else size) else self._cut_error(error)

    def _cut_error(self, error: dict[str, Any]) -> dict[str, Any]:
        room = max(0, self.output_limit - self._output_bytes)
        note = " [cut at the output cap]"
        value = error["value"].encode()[:max(0, room - len(error["name"]) - len(note))].decode(errors="ignore")
        self._output_bytes = min(self.output_limit, self._output_bytes + len(value) + len(error["name"]))
        self._over()
        return {"name": error["name"], "value": value + note, "traceback": []}

    def _shows(self, display_id: str) -> bool:
        return any(r.get("display_id") == display_id for r in self.results)

    def replace_display(self, display_id: str, data: dict[str, Any], metadata: dict[str, Any] | None) -> None:
        """Replace the data (and metadata) of every result showing ``display_id``, as a notebook does; the
        execution may have ended (the update came from a later one)."""
        for result in self.results:
            if result.get("display_id") == display_id:
                result["data"] = data
                if metadata:
                    result["metadata"] = metadata
                else:
                    result.pop("metadata", None)

    def to_dict(self) -> dict[str, Any]:
        duration = None
        if self.started_at is not None:
            end = self.finished_at if self.finished_at is not None else time.time()
            duration = int((end - self.started_at) * 1000)
        return {
            "id": self.id,
            "sandbox_id": self.sandbox_id,
            "session_id": self.session_id,
            "status": self.status,
            "execution_count": self.execution_count,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "results": self.results,
            "error": self.error,
            "reason": self.reason,
            "truncated": self.truncated,
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "duration_ms": duration,
        }


def _display_id(content: dict[str, Any]) -> str | None:
    transient = content.get("transient")
    display_id = transient.get("display_id") if isinstance(transient, dict) else None
    return str(display_id) if display_id not in (None, "") else None


def _json_size(value: Any) -> int:
    """Bytes of ``value`` as JSON (what the session would have read for it)."""
    return len(json.dumps(value, default=str).encode(errors="replace"))


def _error_size(error: dict[str, Any]) -> int:
    return len(str(error.get("name", ""))) + len(str(error.get("value", ""))) + \
        sum(len(str(t)) for t in error.get("traceback") or [])


class ExecutionHistory(abc.ABC):
    """Where executions are kept for ``execution_status``: every unfinished one, and per tenant the most recent
    finished ones within a count and a byte bound (one tenant's executions never push out another's); a
    sandbox's executions go when the sandbox is deleted or forgotten.

    The one interface of the history: :class:`MemoryExecutionHistory` keeps it in this process; a durable one
    (finished executions in :mod:`kernelhub.services.store`, with the same per-tenant bounds) can take its place
    behind the same methods. Called by :class:`~kernelhub.services.executor.Executor` (``add``, ``finished``,
    ``get``) and :class:`~kernelhub.services.sandboxes.Sandboxes` (``for_sandbox`` on stop,
    ``forget_sandbox`` on delete)."""

    @abc.abstractmethod
    def add(self, execution: Execution) -> None:
        """Keep a new (queued) execution; it is not counted against the bounds until it has finished."""

    @abc.abstractmethod
    def finished(self, execution: Execution) -> None:
        """``execution`` has ended: count it against its tenant's bounds, dropping that tenant's oldest finished
        executions past them (the newest is always kept)."""

    @abc.abstractmethod
    def get(self, tenant: str, execution_id: str) -> Execution:
        """The tenant's execution; raises :class:`~kernelhub.errors.NotFound` for unknown ids, dropped ones and
        other tenants' ids."""

    @abc.abstractmethod
    def for_sandbox(self, sandbox_id: str) -> list[Execution]:
        """Every execution of the sandbox still kept, oldest first."""

    @abc.abstractmethod
    def forget_sandbox(self, sandbox_id: str) -> None:
        """Drop every execution of the sandbox (it was deleted): its output is freed, its ids answer 404."""

    @abc.abstractmethod
    def usage(self, tenant: str) -> tuple[int, int]:
        """The tenant's finished executions kept and their bytes (:attr:`Execution.stored_bytes`)."""

    async def stored(self, execution: Execution) -> None:
        """Wait until ``execution`` (just added) would survive a crash of the gateway; the executor awaits it
        before it announces an execution's id. Nothing to wait for in memory."""
        return None

    async def read(self, tenant: str, execution_id: str) -> dict[str, Any]:
        """``execution_status`` of an execution :meth:`get` no longer holds (one a previous gateway ran, or
        one whose outputs live on disk only), in the API's shape. Raises :class:`~kernelhub.errors.NotFound`
        (in memory there is nothing more)."""
        raise NotFound(f"No execution {execution_id[:64]!r}.")


class MemoryExecutionHistory(ExecutionHistory):
    """:class:`ExecutionHistory` in memory: per tenant at most ``count`` finished executions and ``max_bytes``
    bytes of them (what each keeps: outputs, error, code), besides the unfinished ones (each bounded by its
    output cap, and their number by the per-session queue bound)."""

    def __init__(self, count: int = 1000, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.count = max(1, count)
        self.max_bytes = max_bytes
        self._all: dict[str, Execution] = {}
        self._by_sandbox: dict[str, dict[str, None]] = {}
        #: Per tenant: finished executions kept, oldest first, with the bytes each was counted for.
        self._finished: dict[str, collections.OrderedDict[str, int]] = {}
        self._bytes: dict[str, int] = {}

    def add(self, execution: Execution) -> None:
        self._all[execution.id] = execution
        self._by_sandbox.setdefault(execution.sandbox_id, {})[execution.id] = None

    def finished(self, execution: Execution) -> None:
        if self._all.get(execution.id) is not execution:
            return
        kept = self._finished.setdefault(execution.tenant, collections.OrderedDict())
        if execution.id in kept:
            return
        size = execution.stored_bytes
        kept[execution.id] = size
        self._bytes[execution.tenant] = self._bytes.get(execution.tenant, 0) + size
        count, max_bytes = self._bounds()
        while len(kept) > 1 and (len(kept) > count or self._bytes[execution.tenant] > max_bytes):
            oldest, _ = next(iter(kept.items()))
            self._drop(oldest)

    def _bounds(self) -> tuple[int, int]:
        """The most finished executions, and bytes of them, kept in memory per tenant."""
        return self.count, self.max_bytes

    def _drop(self, execution_id: str) -> None:
        execution = self._all.pop(execution_id, None)
        if execution is None:
            return
        in_sandbox = self._by_sandbox.get(execution.sandbox_id)
        if in_sandbox is not None:
            in_sandbox.pop(execution_id, None)
            if not in_sandbox:
                del self._by_sandbox[execution.sandbox_id]
        kept = self._finished.get(execution.tenant)
        if kept is not None and execution_id in kept:
            self._bytes[execution.tenant] -= kept.pop(execution_id)
            if not kept:
                del self._finished[execution.tenant]
                del self._bytes[execution.tenant]

    def get(self, tenant: str, execution_id: str) -> Execution:
        ex = self._all.get(execution_id)
        if ex is None or ex.tenant != tenant:
            raise NotFound(f"No execution {execution_id[:64]!r}.")
        return ex

    def for_sandbox(self, sandbox_id: str) -> list[Execution]:
        return [self._all[i] for i in self._by_sandbox.get(sandbox_id, {})]

    def forget_sandbox(self, sandbox_id: str) -> None:
        for execution_id in list(self._by_sandbox.get(sandbox_id, {})):
            self._drop(execution_id)

    def usage(self, tenant: str) -> tuple[int, int]:
        return len(self._finished.get(tenant, {})), self._bytes.get(tenant, 0)


#: Execution events the store keeps as outputs (:meth:`~kernelhub.services.store.Store.append_output`).
_STORED_EVENTS = frozenset(("stdout", "stderr", "result", "update", "error"))


#: With the store open: finished executions each tenant keeps in the gateway's memory too, at most (the rest are
#: read from disk), and their bytes. A stream or an interrupt refers to an execution only while it runs or just
#: after, so a few suffice.
MEMORY_FINISHED = 32
MEMORY_FINISHED_BYTES = 16 * 1024 * 1024


class StoreExecutionHistory(MemoryExecutionHistory):
    """:class:`MemoryExecutionHistory` written through to the durable :class:`~kernelhub.services.store.Store`
    (issue 10): every execution is stored when added (its code as SHA-256 and size), its outputs as they come
    (up to its output cap, on disk), its start and its end; the store prunes each tenant's finished ones by the
    same bounds. Live executions are read from memory as before; of the finished ones memory keeps each tenant's
    last :data:`MEMORY_FINISHED` (at most :data:`MEMORY_FINISHED_BYTES`), and :meth:`read` answers from the store
    what memory no longer holds, e.g. the executions of a gateway that died (which the next start ends as
    ``killed``, reason ``gateway_restart``). Until :attr:`store` is set (the hub opens it once the loop runs)
    it is the memory history alone."""

    def __init__(self, count: int = 1000, max_bytes: int = 256 * 1024 * 1024) -> None:
        super().__init__(count, max_bytes)
        self.store: Store | None = None
        self._adding: dict[str, asyncio.Future[None]] = {}

    def add(self, execution: Execution) -> None:
        super().add(execution)
        if self.store is None:
            return
        future = self.store.start_execution(
            id=execution.id, tenant=execution.tenant, sandbox_id=execution.sandbox_id,
            session_id=execution.session_id, code=execution.code, output_limit=execution.output_limit,
            timeout_s=execution.timeout_s, created_at=execution.created_at)
        self._adding[execution.id] = future
        future.add_done_callback(lambda f: self._added(execution.id, f))
        execution.add_listener(self._writer(self.store, execution.id))

    def _added(self, execution_id: str, future: asyncio.Future[None]) -> None:
        self._adding.pop(execution_id, None)
        if not future.cancelled() and future.exception() is not None:
            _log.error("execution %s could not be stored: %s", execution_id, future.exception())

    def _bounds(self) -> tuple[int, int]:
        # With the store open, finished executions live on disk (pruned there by count and max_bytes); memory
        # keeps only each tenant's most recent few, for interrupts and streams that still refer to them.
        if self.store is None or self.store.closed:
            return self.count, self.max_bytes
        return min(self.count, MEMORY_FINISHED), min(self.max_bytes, MEMORY_FINISHED_BYTES)

    @staticmethod
    def _writer(store: Store, execution_id: str) -> Listener:
        def write(event: dict[str, Any]) -> None:
            kind = event.get("type")
            if kind in _STORED_EVENTS:
                store.append_output(execution_id, event)
            elif kind == "start":
                store.update_execution(execution_id, status="running", started_at=time.time())
        return write

    async def stored(self, execution: Execution) -> None:
        future = self._adding.get(execution.id)
        if future is not None:
            with contextlib.suppress(Exception):  # a store failure is logged (_added); the execution runs on
                await asyncio.shield(future)

    def finished(self, execution: Execution) -> None:
        super().finished(execution)
        if self.store is None or self.store.closed:
            return
        future = self.store.finish_execution(execution.id, execution.status, execution.reason,
                                             finished_at=execution.finished_at,
                                             execution_count=execution.execution_count)
        future.add_done_callback(_log_store_failure)

    async def read(self, tenant: str, execution_id: str) -> dict[str, Any]:
        if self.store is None:
            return await super().read(tenant, execution_id)
        return await self.store.get_execution(tenant, execution_id)


def _log_store_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        _log.error("the store failed: %s", future.exception())
