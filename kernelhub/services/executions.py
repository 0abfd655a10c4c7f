"""Executions: one run of code in a jupyter session, its outputs, and a bounded history to read them back.

:class:`Execution` collects what the kernel's iopub stream says about one ``execute_request`` and fans it
out as events (the NDJSON/websocket event shapes of API.md) to listeners. The session
(:mod:`kernelhub.services.sessions`) drives it. :class:`~kernelhub.services.executor.Executor` creates
executions and keeps them in :class:`ExecutionHistory` (``execution_status``); ``Sandboxes`` ends a stopped
sandbox's unfinished ones from there.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import NotFound
from ..models import iso, new_id

Listener = Callable[[dict[str, Any]], "Awaitable[None] | None"]
InputHandler = Callable[[str, bool], Awaitable[str]]

ENDED = ("ok", "error", "timeout", "killed")


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
        self.stdout = ""
        self.stderr = ""
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
        self._listeners: list[Listener] = []
        self._output_bytes = 0
        self._done = asyncio.Event()
        self._started = asyncio.Event()

    # -- listeners ----------------------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """Streams call this to receive every event from now on (start, outputs, end)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    async def emit(self, event: dict[str, Any]) -> None:
        """Send an event to every listener; a listener that awaits applies back-pressure to the kernel's
        reader for this session, which is what bounds the memory a slow client can pin."""
        event.setdefault("execution_id", self.id)
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
        if self.ended:
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

    def _take(self, size: int) -> bool:
        """Count output against the cap; False once it is over (the output is dropped, ``truncated`` set)."""
        if self._output_bytes + size > self.output_limit:
            if not self.truncated:
                self.truncated = True
                self.reason = self.reason or "output_truncated"
            return False
        self._output_bytes += size
        return True

    async def on_iopub(self, msg: dict[str, Any]) -> None:
        """Called by the session's iopub reader for every message whose parent is this execution."""
        kind = msg.get("msg_type") or msg.get("header", {}).get("msg_type")
        content = msg.get("content", {})
        if kind == "stream":
            name = "stderr" if content.get("name") == "stderr" else "stdout"
            text = str(content.get("text", ""))
            if not self._take(len(text.encode())):
                room = self.output_limit - self._output_bytes
                if room <= 0:
                    return
                text = text.encode()[:room].decode(errors="ignore")
                self._output_bytes = self.output_limit
            setattr(self, name, getattr(self, name) + text)
            await self.emit({"type": name, "text": text})
        elif kind in ("execute_result", "display_data", "update_display_data"):
            data = content.get("data", {})
            size = sum(len(str(v)) for v in data.values())
            if not self._take(size):
                return
            result = {"is_main_result": kind == "execute_result", "data": data}
            if content.get("metadata"):
                result["metadata"] = content["metadata"]
            self.results.append(result)
            if kind == "execute_result" and content.get("execution_count") is not None:
                self.execution_count = content["execution_count"]
            await self.emit({"type": "result", **result})
        elif kind == "error":
            self.error = {
                "name": str(content.get("ename", "")),
                "value": str(content.get("evalue", "")),
                "traceback": [str(t) for t in content.get("traceback", [])][:200],
            }
            await self.emit({"type": "error", **self.error})
        elif kind == "execute_input":
            if content.get("execution_count") is not None:
                self.execution_count = content["execution_count"]

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


class ExecutionHistory:
    """Executions by id for ``execution_status``: every unfinished one, and the last ``size`` finished."""

    def __init__(self, size: int = 1000) -> None:
        self.size = size
        self._all: collections.OrderedDict[str, Execution] = collections.OrderedDict()
        #: Ids that had not ended when last looked at: few (one queue per session), so counting the finished
        #: ones never walks the whole history, which was a tenth of a core at 300 executions a second.
        self._unfinished: set[str] = set()

    def add(self, execution: Execution) -> None:
        self._all[execution.id] = execution
        self._unfinished.add(execution.id)
        self._trim()

    def _trim(self) -> None:
        self._unfinished = {k for k in self._unfinished if k in self._all and not self._all[k].ended}
        excess = len(self._all) - len(self._unfinished) - self.size
        if excess <= 0:
            return
        # The oldest finished ones go; executions end about in the order they came, so this stops near the front.
        doomed: list[str] = []
        for key, ex in self._all.items():
            if len(doomed) == excess:
                break
            if ex.ended:
                doomed.append(key)
        for key in doomed:
            del self._all[key]

    def get(self, tenant: str, execution_id: str) -> Execution:
        ex = self._all.get(execution_id)
        if ex is None or ex.tenant != tenant:
            raise NotFound(f"No execution {execution_id!r}.")
        return ex

    def for_sandbox(self, sandbox_id: str) -> list[Execution]:
        return [ex for ex in self._all.values() if ex.sandbox_id == sandbox_id]
