"""What runs in a sandbox's sessions: code in its kernels, keystrokes in its terminals.

:class:`Executor` serves ``code_execute`` and ``code_execute_async`` (:meth:`Executor.execute`: picks or
starts the jupyter session of the language, queues an :class:`~kernelhub.services.executions.Execution` on
it, keeps it in the :class:`~kernelhub.services.executions.ExecutionHistory`), ``session_execute``,
``execution_status`` and the interrupt of an execution (shell commands are
:mod:`kernelhub.services.commands`'). Whatever runs holds its sandbox busy (the reaper does not stop it as idle)
and counts as activity when it ends; each is bounded by the sandbox's ``execution_timeout_s`` and
``output_mb``.

Built by :class:`~kernelhub.services.hub.Hub` on :class:`~kernelhub.services.sandboxes.Sandboxes`; the
surfaces call it through the hub.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from ..errors import Conflict, InvalidRequest, NotFound, QuotaExceeded
from .executions import Execution, ExecutionHistory, InputHandler, Listener
from .sandboxes import Sandboxes, SandboxRecord
from .sessions import KERNELSPECS, LANGUAGES, JupyterSession
from .tenants import Tenant
from .terminals import TerminalSession
from .validation import check_env, check_timeout

MAX_CODE_BYTES = 2 * 1024 * 1024


class Executor:
    """Runs code and keystrokes in the sandboxes of :class:`~kernelhub.services.sandboxes.Sandboxes`
    and keeps executions in ``executions`` for ``execution_status``."""

    def __init__(self, sandboxes: Sandboxes, executions: ExecutionHistory, *, max_queued: int = 100,
                 max_queued_code_bytes: int = 32 * 1024 * 1024) -> None:
        self.sandboxes = sandboxes
        self.executions = executions
        #: Unfinished executions a jupyter session may hold, and bytes of their code a sandbox may hold.
        self.max_queued = max_queued
        self.max_queued_code_bytes = max_queued_code_bytes
        self._queued: dict[str, int] = {}
        self._queued_code: dict[str, int] = {}

    # -- sessions ---------------------------------------------------------------------------------------

    async def session_execute(self, tenant: Tenant, session_id: object, input: object, timeout_s: object = None,
                              listener: Listener | None = None) -> Execution | dict[str, Any]:
        """``session_execute``: code in a jupyter session (an execution) or keystrokes to a terminal."""
        record, session = self.sandboxes.get_session(tenant, session_id)
        if not isinstance(input, str):
            raise InvalidRequest("input must be a string.")
        if isinstance(session, TerminalSession):
            timeout = check_timeout(timeout_s, record.limits.execution_timeout_s) if timeout_s else 1.0
            record.busy += 1
            try:
                return await session.execute(input, timeout)
            finally:
                record.busy -= 1
                record.touch()
        return await self.execute(tenant, record.id, input, session_id=session.id, timeout_s=timeout_s,
                                  listener=listener)

    # -- executions -------------------------------------------------------------------------------------

    async def _pick_session(self, record: SandboxRecord, language: str | None,
                            session_id: object) -> JupyterSession:
        if session_id is not None:
            found = self.sandboxes.find_session(session_id) if isinstance(session_id, str) else None
            if found is None or found[0] is not record:
                raise NotFound(f"No session {str(session_id)[:64]!r} in sandbox {record.id}.")
            session = found[1]
            if not isinstance(session, JupyterSession):
                raise InvalidRequest("Code runs in jupyter sessions; use session_execute for terminals.")
            if language is not None and language not in (session.language,) and \
                    not (language == "javascript" and session.language == "node"):
                raise InvalidRequest(f"Session {session.id} runs {session.language}, not {language}.")
            return session
        jupyter = [s for s in record.sessions.values() if isinstance(s, JupyterSession) and s.state != "closed"]
        if language is None:
            if not jupyter:
                raise Conflict(f"Sandbox {record.id} has no jupyter session; create one first.")
            return jupyter[0]
        if language not in KERNELSPECS:
            raise InvalidRequest(f"Unknown language {language!r}; use one of {', '.join(LANGUAGES)}.")
        lang = "node" if language == "javascript" else language
        for s in jupyter:
            if s.language == lang:
                return s
        # First code in another language: start a kernel of it in the same sandbox.
        session = await self.sandboxes.create_session(record.tenant, record.id, "jupyter", lang)
        assert isinstance(session, JupyterSession)
        return session

    async def execute(self, tenant: Tenant, sandbox_id: object, code: object, language: str | None = None,
                      session_id: object = None, timeout_s: object = None, env: object = None,
                      *, listener: Listener | None = None, input_handler: InputHandler | None = None,
                      wait: bool = True) -> Execution:
        """``code_execute`` (``wait=True``: answers when it ended) and ``code_execute_async``."""
        record, sandbox = self.sandboxes.running(tenant, sandbox_id)
        if not isinstance(code, str):
            raise InvalidRequest("code must be a string.")
        if len(code.encode()) > MAX_CODE_BYTES:
            raise InvalidRequest(f"code may be at most {MAX_CODE_BYTES} bytes.")
        timeout = check_timeout(timeout_s, record.limits.execution_timeout_s)
        env_vars = check_env(env)
        record.busy += 1
        try:
            session = await self._pick_session(record, language, session_id)
        except BaseException:
            record.busy -= 1
            raise
        try:
            code_bytes = self._hold(record.id, session.id, len(code.encode()))
        except BaseException:
            record.busy -= 1
            raise
        ex = Execution(tenant=tenant.name, sandbox_id=record.id, session_id=session.id, code=code,
                       timeout_s=timeout, output_limit=record.limits.output_bytes)
        ex.input_handler = input_handler
        self.sandboxes.telemetry.watch(ex)
        if listener is not None:
            ex.add_listener(listener)
        self.executions.add(ex)

        async def run() -> None:
            try:
                await session.execute(ex, env_vars)
            finally:
                record.busy -= 1
                record.touch()
                self._release(record.id, session.id, code_bytes)
                self.executions.finished(ex)

        if not wait:
            try:
                await self.executions.stored(ex)  # its id survives a crash of the gateway from now on
            finally:
                # Spawned last, with no await before the caller gets the execution: whatever the caller sends
                # first (the stream's "accepted") precedes the execution's own "start".
                self.sandboxes.spawn(run())
            return ex
        task = self.sandboxes.spawn(run())
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            # The caller went away (a disconnected stream): interrupt what it started.
            if not ex.ended:
                self.sandboxes.spawn(self._interrupt(session, ex))
            raise
        return ex

    def _hold(self, sandbox_id: str, session_id: str, code_bytes: int) -> int:
        """Count one more unfinished execution of ``code_bytes`` in the session and its sandbox, or refuse it
        (:class:`~kernelhub.errors.QuotaExceeded`) past ``max_queued`` or ``max_queued_code_bytes``; check and
        count happen with no await between them, so concurrent requests cannot all pass."""
        if self._queued.get(session_id, 0) >= self.max_queued:
            raise QuotaExceeded(f"Session {session_id} already has {self.max_queued} executions waiting or "
                                "running, the most it may have; wait for some to end.")
        if self._queued_code.get(sandbox_id, 0) + code_bytes > self.max_queued_code_bytes:
            raise QuotaExceeded(f"Sandbox {sandbox_id}'s waiting and running executions already hold "
                                f"{self._queued_code.get(sandbox_id, 0)} bytes of code; at most "
                                f"{self.max_queued_code_bytes} may wait at once. Wait for some to end.")
        self._queued[session_id] = self._queued.get(session_id, 0) + 1
        self._queued_code[sandbox_id] = self._queued_code.get(sandbox_id, 0) + code_bytes
        return code_bytes

    def _release(self, sandbox_id: str, session_id: str, code_bytes: int) -> None:
        for counts, key, amount in ((self._queued, session_id, 1), (self._queued_code, sandbox_id, code_bytes)):
            left = counts.get(key, 0) - amount
            if left > 0:
                counts[key] = left
            else:
                counts.pop(key, None)

    async def _interrupt(self, session: JupyterSession, ex: Execution) -> None:
        """A queued execution ends ``killed``/``cancelled``; a running one is interrupted, escalating to a
        kernel restart (``killed``/``interrupted``, state lost) if the kernel ignores the signal."""
        if ex.status == "queued":
            await ex.finish("killed", "cancelled")
        elif ex.status == "running":
            with contextlib.suppress(Exception):
                await session.interrupt(escalate=True)

    def get_execution(self, tenant: Tenant, execution_id: object) -> Execution:
        """``execution_status``: the tenant's execution, unfinished or still in its tenant's history (bounded
        per tenant by ``execution_history`` and ``execution_history_mb``, and freed with its sandbox); raises
        :class:`~kernelhub.errors.NotFound` otherwise."""
        if not isinstance(execution_id, str):
            raise NotFound("No such execution.")
        ex = self.executions.get(tenant.name, execution_id)
        record = self.sandboxes.find(ex.sandbox_id)
        if record is not None:
            record.touch()
        return ex

    async def execution_status(self, tenant: Tenant, execution_id: object) -> dict[str, Any]:
        """``execution_status`` in the API's shape: :meth:`get_execution`'s, or the history's record of one
        this gateway no longer holds in memory (one a gateway that died ran, ended ``killed`` with reason
        ``gateway_restart``). Raises :class:`~kernelhub.errors.NotFound`."""
        try:
            return self.get_execution(tenant, execution_id).to_dict()
        except NotFound:
            if not isinstance(execution_id, str):
                raise
            return await self.executions.read(tenant.name, execution_id)

    async def interrupt_execution(self, tenant: Tenant, execution_id: object) -> Execution:
        """Stop a queued (ends ``killed``, reason ``cancelled``) or running (SIGINT to its kernel) execution."""
        ex = self.get_execution(tenant, execution_id)
        found = self.sandboxes.find_session(ex.session_id)
        session = found[1] if found is not None else None
        if isinstance(session, JupyterSession) and not ex.ended:
            await self._interrupt(session, ex)
        return ex
