"""What the client hands back: executions and their results, command results, terminal output.

Shapes follow API.md; each object keeps the gateway's dict in ``raw`` for anything not surfaced as an
attribute. :class:`ExecutionStream` folds the streamed events of one execution (``start``, ``stdout``,
``stderr``, ``result``, ``update``, ``error``, ``end``) into an :class:`Execution`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    """Tracebacks from kernels carry terminal colours; this removes them."""
    return _ANSI.sub("", text)


@dataclasses.dataclass
class Result:
    """One rich output of an execution: ``data`` maps MIME types to values (binary ones base64, as in
    Jupyter). ``is_main_result`` is true for the value of the cell's last expression; ``display_id`` is set for
    a display the code may update later (IPython's ``display(..., display_id=True)``)."""

    data: dict[str, Any]
    is_main_result: bool = False
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    display_id: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Result:
        display_id = d.get("display_id")
        return cls(data=dict(d.get("data") or {}), is_main_result=bool(d.get("is_main_result")),
                   metadata=dict(d.get("metadata") or {}),
                   display_id=display_id if isinstance(display_id, str) else None)

    def formats(self) -> list[str]:
        """The MIME types this result has."""
        return list(self.data)

    def __getitem__(self, mime: str) -> Any:
        return self.data[mime]

    @property
    def text(self) -> str | None:
        return self.data.get("text/plain")

    @property
    def html(self) -> str | None:
        return self.data.get("text/html")

    @property
    def markdown(self) -> str | None:
        return self.data.get("text/markdown")

    @property
    def png(self) -> str | None:
        """Base64 PNG, if the result is (or includes) one."""
        return self.data.get("image/png")

    @property
    def jpeg(self) -> str | None:
        return self.data.get("image/jpeg")

    @property
    def svg(self) -> str | None:
        return self.data.get("image/svg+xml")

    @property
    def json(self) -> Any:
        return self.data.get("application/json")


@dataclasses.dataclass
class ExecutionError:
    """The exception an execution raised: its class name, message and (coloured) traceback lines."""

    name: str
    value: str
    traceback: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExecutionError:
        return cls(name=str(d.get("name", "")), value=str(d.get("value", "")),
                   traceback=[str(t) for t in d.get("traceback") or []])

    @property
    def traceback_text(self) -> str:
        """The traceback as plain text, colours removed."""
        return strip_ansi("\n".join(self.traceback))

    def __str__(self) -> str:
        return f"{self.name}: {self.value}"


@dataclasses.dataclass
class Execution:
    """One run of code. ``status`` is ``ok``, ``error``, ``timeout`` or ``killed`` once ended (``queued`` or
    ``running`` before); ``reason`` says why a limit ended it (``timeout``, ``oom``, ``output_truncated``…)."""

    id: str | None = None
    status: str = "queued"
    stdout: str = ""
    stderr: str = ""
    results: list[Result] = dataclasses.field(default_factory=list)
    error: ExecutionError | None = None
    reason: str | None = None
    truncated: bool = False
    execution_count: int | None = None
    sandbox_id: str | None = None
    session_id: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    duration_ms: int | None = None
    raw: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Execution:
        error = d.get("error")
        return cls(
            id=d.get("id"), status=d.get("status", "queued"), stdout=d.get("stdout") or "",
            stderr=d.get("stderr") or "", results=[Result.from_dict(r) for r in d.get("results") or []],
            error=ExecutionError.from_dict(error) if isinstance(error, dict) else None, reason=d.get("reason"),
            truncated=bool(d.get("truncated")), execution_count=d.get("execution_count"),
            sandbox_id=d.get("sandbox_id"), session_id=d.get("session_id"), started_at=d.get("started_at"),
            finished_at=d.get("finished_at"), duration_ms=d.get("duration_ms"), raw=dict(d),
        )

    @property
    def ended(self) -> bool:
        return self.status in ("ok", "error", "timeout", "killed")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def main_result(self) -> Result | None:
        return next((r for r in self.results if r.is_main_result), None)

    @property
    def text(self) -> str | None:
        """The ``text/plain`` of the main result (the last expression's value), as E2B's ``Execution.text``."""
        main = self.main_result
        return main.text if main else None


@dataclasses.dataclass
class CommandResult:
    """What ``commands.run`` answers: exit code (``None`` if it was killed), output, duration, limit reason."""

    exit_code: int | None
    stdout: str
    stderr: str
    duration_ms: int | None = None
    reason: str | None = None
    raw: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CommandResult:
        return cls(exit_code=d.get("exit_code"), stdout=d.get("stdout") or "", stderr=d.get("stderr") or "",
                   duration_ms=d.get("duration_ms"), reason=d.get("reason"), raw=dict(d))

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclasses.dataclass
class TerminalOutput:
    """What a terminal session printed in answer to ``sessions.execute``."""

    output: str
    raw: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)


class CommandExitError(Exception):
    """Raised by ``commands.run(..., check=True)`` when the command exits non-zero."""

    def __init__(self, result: CommandResult) -> None:
        super().__init__(f"The command exited with {result.exit_code}: {result.stderr.strip()[-500:]}")
        self.result = result


Callback = Callable[[Any], Any]


class ExecutionStream:
    """Folds one execution's streamed events (API.md "Streaming") into an :class:`Execution` and says which
    callback to call.

    The transport feeds events in order with :meth:`feed`; it answers ``(callback, argument)`` pairs for the
    transport to invoke (and await, for coroutine callbacks). An ``update`` event (``{"type": "update",
    display_id, data, metadata?}``) replaces the data (and metadata, when given) of this execution's results
    with that ``display_id`` in place: an update is never a new result, and one for a display this execution
    did not make changes nothing here.
    """

    def __init__(self, *, on_stdout: Callback | None = None, on_stderr: Callback | None = None,
                 on_result: Callback | None = None, on_error: Callback | None = None) -> None:
        self.execution = Execution()
        self.done = False
        self._callbacks = {"stdout": on_stdout, "stderr": on_stderr, "result": on_result, "error": on_error}

    def feed(self, event: dict[str, Any]) -> list[tuple[Callback, Any]]:
        kind = event.get("type")
        ex = self.execution
        if event.get("execution_id") and not ex.id:
            ex.id = event["execution_id"]
        calls: list[tuple[Callback, Any]] = []
        arg: Any = None
        if kind == "start":
            ex.status = "running"
        elif kind in ("stdout", "stderr"):
            text = str(event.get("text", ""))
            setattr(ex, kind, getattr(ex, kind) + text)
            arg = text
        elif kind == "result":
            result = Result.from_dict(event)
            ex.results.append(result)
            arg = result
        elif kind == "update":
            self._update(event)
        elif kind == "error":
            ex.error = ExecutionError.from_dict(event)
            arg = ex.error
        elif kind == "end":
            final = event.get("execution")
            if isinstance(final, dict):
                self.execution = Execution.from_dict(final)
            self.done = True
        callback = self._callbacks.get(str(kind))
        if callback is not None and arg is not None:
            calls.append((callback, arg))
        return calls

    def _update(self, event: dict[str, Any]) -> None:
        display_id = event.get("display_id")
        data = event.get("data")
        if not isinstance(display_id, str) or not isinstance(data, dict):
            return
        metadata = event.get("metadata")
        for i, result in enumerate(self.execution.results):
            if result.display_id == display_id:
                self.execution.results[i] = dataclasses.replace(
                    result, data=dict(data), metadata=dict(metadata) if isinstance(metadata, dict) else result.metadata)
