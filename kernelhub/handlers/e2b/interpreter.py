"""The code interpreter, port 49999 (E2B.md 5.3): ``POST /execute`` (NDJSON), ``/contexts``, ``/health``.

A context is a jupyter session of the sandbox (its id is the session's); ``language`` without a context is the
sandbox's kernel of that language (started on first use, as on ``/v1``), ``env_vars`` the execution's ``env``.
Languages: ``python``, ``javascript`` (``js``), ``typescript`` (``ts``) and ``bash``; others answer 400.

``/execute`` streams one JSON object a line as the execution goes, in E2B's shapes: ``stdout``/``stderr``
(``text``, ``timestamp`` in ns), ``result`` (the Jupyter MIME bundle flattened: ``text``, ``html``,
``markdown``, ``svg``, ``png``, ``jpeg``, ``pdf``, ``latex``, ``json``, ``javascript``; any other type under
``extra``; ``is_main_result``), ``error`` (``traceback`` one string), then ``number_of_executions`` and
``end_of_execution``. An execution that a limit ended without an exception of its own gets an ``error`` line
naming why (``TimeoutError``, ``KernelDied``, …). A client that disconnects gets its execution interrupted, as on
``/v1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from ...errors import InvalidRequest, KernelHubError, NotFound
from ...services.executions import Execution
from ..streaming import StreamingMixin
from .base import INTERPRETER_PORT, SandboxHandler, SandboxPort
from .envd import HOME, HealthHandler

#: E2B's language names -> kernelhub's.
LANGUAGES = {"python": "python", "python3": "python", "js": "node", "javascript": "node", "ts": "typescript",
             "typescript": "typescript", "bash": "bash", "sh": "bash"}
#: kernelhub's language -> the name E2B shows for a context.
E2B_LANGUAGE = {"python": "python", "node": "javascript", "typescript": "typescript", "bash": "bash"}
#: Jupyter MIME types -> E2B's result keys.
MIME_KEYS = {"text/plain": "text", "text/html": "html", "text/markdown": "markdown", "image/svg+xml": "svg",
             "image/png": "png", "image/jpeg": "jpeg", "application/pdf": "pdf", "text/latex": "latex",
             "application/json": "json", "application/javascript": "javascript"}
#: Why an execution ended without an exception of its own, as the error E2B's SDK shows.
ENDED_BY = {"timeout": ("TimeoutError", "The execution ran past its timeout and was stopped."),
            "killed": ("KernelDied", "The kernel died during the execution and was restarted.")}
#: Lines waiting for a slow client at most; more holds back the kernel's reader (back-pressure).
QUEUE_LINES = 64


def kernel_language(language: object) -> str | None:
    if language is None:
        return None
    if not isinstance(language, str) or language.lower() not in LANGUAGES:
        raise InvalidRequest(f"Language {str(language)[:32]!r} is not available here; use one of python, "
                             "javascript, typescript or bash.")
    return LANGUAGES[language.lower()]


def result_line(event: dict[str, Any]) -> dict[str, Any]:
    """A kernelhub ``result`` event as E2B's result line."""
    line: dict[str, Any] = {"type": "result", "is_main_result": bool(event.get("is_main_result"))}
    extra = {}
    for mime, value in (event.get("data") or {}).items():
        if mime in MIME_KEYS:
            line[MIME_KEYS[mime]] = value
        else:
            extra[mime] = value
    if extra:
        line["extra"] = extra
    return line


def e2b_lines(event: dict[str, Any]) -> list[dict[str, Any]]:
    """The E2B lines for one kernelhub execution event (none for the ones E2B has no line for)."""
    kind = event.get("type")
    if kind in ("stdout", "stderr"):
        return [{"type": kind, "text": event.get("text", ""), "timestamp": time.time_ns()}]
    if kind == "result":
        return [result_line(event)]
    if kind == "error":
        return [{"type": "error", "name": event.get("name", ""), "value": event.get("value", ""),
                 "traceback": "\n".join(event.get("traceback") or [])}]
    if kind == "end":
        ex = event.get("execution") or {}
        lines: list[dict[str, Any]] = []
        if ex.get("error") is None and ex.get("status") in ("timeout", "killed"):
            name, value = ENDED_BY.get(ex.get("reason") or ex["status"], ENDED_BY[ex["status"]])
            lines.append({"type": "error", "name": name, "value": value, "traceback": f"{name}: {value}"})
        lines.append({"type": "number_of_executions", "execution_count": ex.get("execution_count") or 0})
        lines.append({"type": "end_of_execution"})
        return lines
    return []


class ExecuteHandler(SandboxHandler, StreamingMixin):
    """``POST /execute`` ``{code, context_id?, language?, env_vars?}``: the execution as NDJSON lines."""

    traffic = True

    async def post(self) -> None:
        body = self.json_body()
        code = body.get("code")
        if not isinstance(code, str):
            raise InvalidRequest("code must be a string.")
        context_id, language = body.get("context_id"), body.get("language")
        if context_id is not None and language is not None:
            raise InvalidRequest("Give context_id or language, not both.")
        env = body.get("env_vars") or None
        queue: asyncio.Queue[bytes] = asyncio.Queue(QUEUE_LINES)

        async def listener(event: dict[str, Any]) -> None:
            for line in e2b_lines(event):
                # ASCII escapes: kernel output may hold lone surrogates, which JSON escapes and UTF-8 cannot carry.
                await queue.put((json.dumps(line) + "\n").encode())

        run = asyncio.ensure_future(self.hub.execute(
            self.tenant, self.sandbox_id, code, language=kernel_language(language), session_id=context_id,
            env=env, listener=listener, wait=True))
        first: asyncio.Future[Any] = asyncio.ensure_future(queue.get())
        try:
            await asyncio.wait({run, first}, return_when=asyncio.FIRST_COMPLETED)
            if not first.done():
                run.result()  # refused before it began (an unknown context, a bad env): a plain error
        except BaseException:
            first.cancel()
            raise

        async def lines() -> AsyncIterator[bytes]:
            getter = first
            while True:
                await asyncio.wait({run, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                    getter = asyncio.ensure_future(queue.get())
                    continue
                getter.cancel()  # the execution ended: every line is queued by now
                while not queue.empty():
                    yield queue.get_nowait()
                return

        self.begin_stream("application/x-ndjson")
        try:
            if await self.pump(lines()):
                self.finish()
        finally:
            if not run.done():
                run.cancel()  # the client went away: hub.execute interrupts the execution
            with contextlib.suppress(BaseException):
                await run


class ContextsHandler(SandboxHandler):
    """``POST /contexts`` ``{language?, cwd?}`` (a new jupyter session) and ``GET /contexts`` (all of them)."""

    traffic = True

    async def post(self) -> None:
        body = self.json_body(required=False)
        language = kernel_language(body.get("language")) or "python"
        cwd = body.get("cwd") or HOME
        if not isinstance(cwd, str):
            raise InvalidRequest("cwd must be a path string.")
        session = await self.hub.create_session(self.tenant, self.sandbox_id, "jupyter", language)
        if cwd not in (HOME, HOME + "/", "/workspace", "/workspace/"):
            try:
                ex: Execution = await self.hub.execute(self.tenant, self.sandbox_id, _chdir(language, cwd),
                                                       session_id=session.id, timeout_s=30)
                if ex.status != "ok":
                    raise InvalidRequest(f"The context cannot start in {cwd[:200]!r}: "
                                         f"{(ex.error or {}).get('value', ex.status)}")
            except KernelHubError:
                await self.hub.close_session(self.tenant, session.id)
                raise
        self.send_json(_context(session.id, session.language or language, cwd))

    def get(self) -> None:
        record = self.hub.get_sandbox(self.tenant, self.sandbox_id)
        self.send_json([_context(s.id, s.language or "python", HOME) for s in record.sessions.values()
                        if s.type == "jupyter" and s.state != "closed"])


class ContextHandler(SandboxHandler):
    """``DELETE /contexts/{id}``: close the session; ``POST /contexts/{id}/restart``: a fresh kernel."""

    traffic = True

    def _own(self, context_id: str) -> str:
        record, session = self.hub.get_session(self.tenant, context_id)
        if record.id != self.sandbox_id:
            raise NotFound(f"No context {context_id[:64]!r} in this sandbox.")
        return session.id

    async def delete(self, context_id: str) -> None:
        await self.hub.close_session(self.tenant, self._own(context_id))
        self.set_status(204)
        self.finish()

    async def post(self, context_id: str) -> None:
        await self.hub.restart_session(self.tenant, self._own(context_id))
        self.set_status(204)
        self.finish()


def _context(session_id: str, language: str, cwd: str) -> dict[str, Any]:
    return {"id": session_id, "language": E2B_LANGUAGE.get(language, language), "cwd": cwd}


def _chdir(language: str, cwd: str) -> str:
    quoted = json.dumps(cwd)
    if language == "python":
        return f"import os as _kh_os; _kh_os.chdir({quoted}); del _kh_os"
    if language == "bash":
        return "cd " + "'" + cwd.replace("'", "'\\''") + "'"
    return f"process.chdir({quoted});"


default_handlers: list[tuple[SandboxPort, type, dict[str, Any]]] = [
    (SandboxPort(INTERPRETER_PORT, "/health"), HealthHandler, {}),
    (SandboxPort(INTERPRETER_PORT, "/execute"), ExecuteHandler, {}),
    (SandboxPort(INTERPRETER_PORT, "/contexts"), ContextsHandler, {}),
    (SandboxPort(INTERPRETER_PORT, r"/contexts/([^/]+)(?:/restart)?"), ContextHandler, {}),
]
