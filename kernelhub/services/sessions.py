"""Jupyter sessions: a kernel inside a sandbox, and the one-at-a-time execution loop around it.

A :class:`JupyterSession` owns a jupyter_client ``AsyncKernelManager`` whose provisioner starts the kernel in
the sandbox (``start_kernel(sandbox=...)``), a client on the kernel's ipc sockets, and readers that route
iopub/shell/stdin messages to the running :class:`~kernelhub.services.executions.Execution`. Executions are
queued one at a time per kernel (tslab loses replies when requests are pipelined, KERNELS.md).

Created, started and closed by :class:`~kernelhub.services.sandboxes.Sandboxes` (``sandbox_create``,
``session_create``, ``session_close``, sandbox stop); executions are run and interrupted by
:class:`~kernelhub.services.executor.Executor`, kernels interrupted and restarted by
:class:`~kernelhub.services.kernels.Kernels`; the Jupyter API's websocket talks to the kernel's sockets itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import shlex
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from ..errors import InvalidRequest, SandboxError
from ..models import new_id
from .executions import Execution

if TYPE_CHECKING:
    from ..sandbox.sandbox import Sandbox

log = logging.getLogger("kernelhub.sessions")

#: Session languages (API.md) and the kernelspec each starts.
KERNELSPECS = {
    "python": "kernelhub-python",
    "node": "kernelhub-javascript",
    "javascript": "kernelhub-javascript",
    "typescript": "kernelhub-typescript",
    "bash": "kernelhub-bash",
}
LANGUAGES = ("python", "node", "typescript", "bash")

#: How long to wait for the other half of "done" (idle on iopub, execute_reply on shell) once one arrived.
DONE_GRACE_S = 1.0
#: After an interrupt, how long the kernel has to stop before it is restarted.
INTERRUPT_GRACE_S = 3.0
#: How long an interrupt waits for the kernel to show it runs the current execution (see :meth:`interrupt`).
INTERRUPT_WAIT_S = 2.0

_DISK_ERRORS = re.compile(
    r"\[Errno (27|28|122)\]|No space left on device|Disk quota exceeded|File too large|ENOSPC|EDQUOT|EFBIG"
)
_PIDS_ERRORS = re.compile(r"\[Errno 11\]|Resource temporarily unavailable|EAGAIN|fork: retry")


def env_snippet(language: str, values: Mapping[str, str | None]) -> str:
    """Code that sets (or, for None, removes) environment variables in a running kernel's process."""
    if language == "python":
        return (f"import os as _kh_os\nfor _kh_k, _kh_v in {dict(values)!r}.items():\n"
                "    _kh_os.environ.pop(_kh_k, None) if _kh_v is None else "
                "_kh_os.environ.__setitem__(_kh_k, _kh_v)\ndel _kh_os, _kh_k, _kh_v")
    if language in ("node", "typescript"):
        return "\n".join(
            f"delete process.env[{json.dumps(k)}];" if v is None else f"process.env[{json.dumps(k)}] = {json.dumps(v)};"
            for k, v in values.items()
        )
    if language == "bash":
        return "\n".join(f"unset {k}" if v is None else f"export {k}={shlex.quote(v)}" for k, v in values.items())
    raise InvalidRequest(f"env is not supported for {language} sessions.")


def kernelspec_for(language: str) -> str:
    try:
        return KERNELSPECS[language]
    except KeyError:
        raise InvalidRequest(
            f"Unknown language {language!r}; use one of {', '.join(LANGUAGES)}."
        ) from None


class JupyterSession:
    """A kernel in a sandbox. Created and started by the hub; closed by the hub or with its sandbox."""

    type: Literal["jupyter"] = "jupyter"

    def __init__(self, sandbox: Sandbox, language: str, kernel_spec_manager: KernelSpecManager) -> None:
        self.id = new_id("se")
        self.sandbox = sandbox
        self.sandbox_id = sandbox.id
        self.language = "node" if language == "javascript" else language
        self.kernel_name = kernelspec_for(language)
        self.state = "starting"
        self.km = AsyncKernelManager(kernel_name=self.kernel_name, kernel_spec_manager=kernel_spec_manager)
        self.kc: Any = None
        self.last_activity = time.time()
        self.execution_state = "starting"
        self._lock = asyncio.Lock()
        self._current: Execution | None = None
        self._idle: asyncio.Event | None = None
        self._begun: asyncio.Event | None = None
        self._interrupted = False
        self._reply: asyncio.Future[dict[str, Any]] | None = None
        self._shell_waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._readers: list[asyncio.Task[None]] = []
        self.restarts = 0
        self._iopub_seen = asyncio.Event()

    @property
    def kernel_id(self) -> str | None:
        return self.km.kernel_id

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "sandbox_id": self.sandbox_id, "type": "jupyter", "language": self.language,
                "state": self.state, "kernel_id": self.kernel_id}

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    # -- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the kernel in the sandbox and wait for its first ``kernel_info_reply`` (KERNELS.md: the
        earliest moment it is usable)."""
        try:
            await self.km.start_kernel(sandbox=self.sandbox)
            await self._connect()
        except BaseException:
            self.state = "failed"
            with contextlib.suppress(Exception):
                await self._shutdown_kernel()
            raise
        self.state = "running"
        self.execution_state = "idle"

    async def hand_over(self, env: Mapping[str, str]) -> None:
        """Called by the pool when it hands this started kernel (the first session of a pre-started sandbox)
        to its owner, before any of the owner's code runs: ``env`` is set in the kernel's own environment by
        a silent request (no execution count, no history, no output), and the hand-out counts as the
        session's first activity. Raises what a silent request raises (SandboxError, TimeoutError)."""
        if env:
            await self._run_silent(env_snippet(self.language, env))
        self.last_activity = time.time()

    async def _connect(self, timeout: float = 60.0) -> None:
        self.kc = self.km.client()
        self.kc.start_channels()
        self._readers = [
            asyncio.ensure_future(self._read(self.kc.iopub_channel, self._on_iopub)),
            asyncio.ensure_future(self._read(self.kc.shell_channel, self._on_shell)),
            asyncio.ensure_future(self._read(self.kc.stdin_channel, self._on_stdin)),
        ]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._iopub_seen = asyncio.Event()
        while True:
            msg_id = self.kc.kernel_info()
            fut = loop.create_future()
            self._shell_waiters[msg_id] = fut
            try:
                await asyncio.wait_for(fut, 0.5)
                # The reply came on shell; iopub is a separate subscription that may join later (ZeroMQ's slow
                # joiner), and output published before it joins is lost. The kernel publishes a status for
                # every request, so once one has arrived, iopub is live.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._iopub_seen.wait(), 0.2)
                if self._iopub_seen.is_set():
                    return
            except TimeoutError:
                self._shell_waiters.pop(msg_id, None)
            if not await self.km.is_alive():
                raise SandboxError(
                    "The kernel exited while starting: " + " | ".join(self.sandbox.logs(6))
                )
            if loop.time() > deadline:
                raise SandboxError("The kernel did not answer kernel_info in time.")

    async def _disconnect(self) -> None:
        for task in self._readers:
            task.cancel()
        for task in self._readers:
            with contextlib.suppress(BaseException):
                await task
        self._readers = []
        if self.kc is not None:
            self.kc.stop_channels()
            self.kc = None

    async def _read(self, channel: Any, handler: Any) -> None:
        while True:
            try:
                msg = await channel.get_msg()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a malformed or badly signed message: drop it, keep reading
                log.debug("dropped a kernel message: %s", exc)
                await asyncio.sleep(0)
                continue
            try:
                await handler(msg)
            except Exception:
                log.exception("error handling a kernel message")

    async def _on_iopub(self, msg: dict[str, Any]) -> None:
        self._iopub_seen.set()
        parent = msg.get("parent_header", {}).get("msg_id")
        ex = self._current
        if msg.get("msg_type") == "status":
            state = msg.get("content", {}).get("execution_state")
            if state in ("busy", "idle", "starting"):
                self.execution_state = state
        if ex is None or parent != ex.msg_id:
            return
        if self._begun is not None and msg.get("msg_type") != "status":
            self._begun.set()  # execute_input or output: the kernel is inside the execute handler
        if msg.get("msg_type") == "status" and msg["content"].get("execution_state") == "idle":
            if self._idle is not None:
                self._idle.set()
            return
        await ex.on_iopub(msg)

    async def _on_shell(self, msg: dict[str, Any]) -> None:
        parent = msg.get("parent_header", {}).get("msg_id")
        fut = self._shell_waiters.pop(parent, None)
        if fut is not None and not fut.done():
            fut.set_result(msg)
        ex = self._current
        if ex is not None and parent == ex.msg_id and msg.get("msg_type") == "execute_reply":
            if self._reply is not None and not self._reply.done():
                self._reply.set_result(msg)

    async def _on_stdin(self, msg: dict[str, Any]) -> None:
        if msg.get("msg_type") != "input_request":
            return
        ex = self._current
        content = msg.get("content", {})
        value = ""
        if ex is not None and ex.input_handler is not None:
            await ex.emit({"type": "input_request", "prompt": str(content.get("prompt", "")),
                           "password": bool(content.get("password"))})
            try:
                value = await ex.input_handler(str(content.get("prompt", "")), bool(content.get("password")))
            except Exception:
                value = ""
        if self.kc is not None:
            self.kc.input(value)

    # -- execution ------------------------------------------------------------------------------------

    async def _run_silent(self, code: str, timeout: float = 10.0) -> None:
        """Run bookkeeping code (no outputs, no history); used around executions that carry ``env``."""
        msg_id = self.kc.execute(code, silent=True, store_history=False, allow_stdin=False)
        fut = asyncio.get_running_loop().create_future()
        self._shell_waiters[msg_id] = fut
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            self._shell_waiters.pop(msg_id, None)

    async def execute(self, ex: Execution, env: Mapping[str, str] | None = None) -> None:
        """Run ``ex`` when the kernel is free; returns when it ended. Called by the hub. ``env`` holds for
        this execution only: it is set before and put back after."""
        async with self._lock:
            if ex.ended:
                return
            self.last_activity = time.time()
            try:
                if env:
                    if self.sandbox.spec is None:
                        raise SandboxError("The sandbox is not running.")
                    from ..sandbox.bwrap import sandbox_env

                    base = sandbox_env(self.sandbox.spec)
                    await self._run_silent(env_snippet(self.language, env))
                    try:
                        await self._run(ex)
                    finally:
                        if ex.status != "timeout" and self.state == "running":
                            with contextlib.suppress(Exception):
                                await self._run_silent(
                                    env_snippet(self.language, {k: base.get(k) for k in env}))
                else:
                    await self._run(ex)
            except Exception as exc:
                log.exception("execution %s failed", ex.id)
                if not ex.ended:
                    ex.error = ex.error or {"name": "SandboxError", "value": str(exc), "traceback": []}
                    await ex.finish("killed", "sandbox_error")
            finally:
                self._current = None
                self.last_activity = time.time()

    async def _run(self, ex: Execution) -> None:
        sandbox = self.sandbox
        if sandbox.state != "running":
            ex.error = {"name": "SandboxStopped", "value": f"The sandbox is {sandbox.state}.", "traceback": []}
            await ex.finish("killed", sandbox.reason or "stopped")
            return
        if not await self.km.is_alive():
            await self._restart("the kernel had died")
        oom0, pids0 = sandbox.oom_kills(), sandbox.pids_max_hits()
        loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._begun = asyncio.Event()
        self._interrupted = False
        self._reply = loop.create_future()
        ex.mark_running()
        await ex.emit({"type": "start"})
        ex.msg_id = self.kc.execute(ex.code, allow_stdin=ex.input_handler is not None, stop_on_error=False)
        self._current = ex
        process = getattr(self.km.provisioner, "process", None)
        died = asyncio.ensure_future(process.wait()) if process is not None else loop.create_future()
        done = asyncio.ensure_future(self._wait_done())
        try:
            finished, _ = await asyncio.wait({done, died}, timeout=ex.timeout_s,
                                             return_when=asyncio.FIRST_COMPLETED)
            if done in finished:
                await self._finish_from_reply(ex, done.result(), oom0, pids0)
                return
            if died in finished:
                await self._kernel_died(ex, oom0)
                return
            # Timeout: interrupt first; if the kernel does not stop, restart it.
            sandbox.log(f"execution {ex.id} timed out after {ex.timeout_s}s; interrupting")
            with contextlib.suppress(Exception):
                await self.km.interrupt_kernel()
            finished, _ = await asyncio.wait({done, died}, timeout=INTERRUPT_GRACE_S,
                                             return_when=asyncio.FIRST_COMPLETED)
            if done not in finished:
                sandbox.log(f"execution {ex.id}: the kernel ignored the interrupt; restarting it")
                await self._restart("timeout")
            await ex.finish("timeout", "timeout")
        finally:
            done.cancel()
            died.cancel()

    async def _wait_done(self) -> dict[str, Any] | None:
        """Done = execute_reply and idle. Either may be lost (tslab, KERNELS.md), so once one has arrived
        the other gets a short grace."""
        assert self._idle is not None and self._reply is not None
        idle_task = asyncio.ensure_future(self._idle.wait())
        try:
            waiters: set[asyncio.Future[Any]] = {idle_task, self._reply}
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if not self._reply.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._reply), DONE_GRACE_S)
            elif not self._idle.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), DONE_GRACE_S)
        finally:
            idle_task.cancel()
        return self._reply.result() if self._reply.done() else None

    async def _finish_from_reply(self, ex: Execution, reply: dict[str, Any] | None, oom0: int,
                                 pids0: int) -> None:
        content = (reply or {}).get("content", {})
        if content.get("execution_count") is not None:
            ex.execution_count = content["execution_count"]
        status = content.get("status")
        if reply is None and ex.error is None and self._interrupted:
            # The signal landed in the kernel's own code around the cell ("KeyboardInterrupt caught in kernel"):
            # the cell was stopped, but no execute_reply says so.
            ex.error = {"name": "KeyboardInterrupt", "value": "The execution was interrupted.", "traceback": []}
        if status is None:
            status = "error" if ex.error else "ok"
        if status == "error" and ex.error is None:
            ex.error = {"name": str(content.get("ename", "Error")), "value": str(content.get("evalue", "")),
                        "traceback": [str(t) for t in content.get("traceback", [])]}
        if status == "aborted":
            status = "error"
        reason = None
        if status == "error" and ex.error is not None:
            text = f"{ex.error.get('name')}: {ex.error.get('value')}"
            if ex.error.get("name") == "KeyboardInterrupt":
                reason = "interrupted"
            elif self.sandbox.oom_kills() > oom0 or ex.error.get("name") == "MemoryError":
                reason = "oom"
            elif self.sandbox.pids_max_hits() > pids0 or _PIDS_ERRORS.search(text):
                reason = "pids"
            elif _DISK_ERRORS.search(text) or _DISK_ERRORS.search(ex.stderr[-2000:]):
                reason = "disk"
        elif _DISK_ERRORS.search(ex.stderr[-2000:]):
            reason = "disk"
        elif self.sandbox.oom_kills() > oom0:
            reason = "oom"  # a child process was OOM-killed while the kernel carried on
        await ex.finish(status if status in ("ok", "error") else "error", reason)

    async def _kernel_died(self, ex: Execution, oom0: int) -> None:
        reason = "oom" if self.sandbox.oom_kills() > oom0 else "killed"
        self.sandbox.log(f"the {self.language} kernel died during execution {ex.id} ({reason}); restarting it")
        ex.error = ex.error or {
            "name": "KernelDied",
            "value": "The kernel ran out of memory and was restarted." if reason == "oom"
            else "The kernel died and was restarted.",
            "traceback": [],
        }
        await ex.finish("killed", reason)
        if self.sandbox.state == "running":
            with contextlib.suppress(Exception):
                await self._restart(reason)

    async def _restart(self, why: str) -> None:
        self.restarts += 1
        self.state = "restarting"
        await self._disconnect()
        await self.km.restart_kernel(now=True)
        await self._connect()
        self.state = "running"
        self.sandbox.log(f"{self.language} kernel restarted ({why})")

    async def interrupt(self) -> None:
        """Interrupt whatever runs now; the kernel keeps its state. Called by the hub.

        A kernel ignores SIGINT between requests (ipykernel honours it only inside a shell handler), and an
        execution is "running" from just before its request is sent: a signal sent in that gap would be
        lost and the code would run on. So the signal waits (briefly) until the kernel has shown that it
        runs the current execution."""
        begun = self._begun
        if self._lock.locked() and begun is not None and not begun.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(begun.wait(), INTERRUPT_WAIT_S)
        self._interrupted = self._lock.locked()
        await self.km.interrupt_kernel()

    async def restart(self) -> None:
        async with self._lock:
            await self._restart("requested")

    async def _shutdown_kernel(self) -> None:
        await self._disconnect()
        if self.km.has_kernel:
            with contextlib.suppress(Exception):
                await self.km.shutdown_kernel(now=True)

    async def close(self) -> None:
        """Stop the kernel; the sandbox carries on. Called by the hub on session_close and sandbox stop."""
        if self.state == "closed":
            return
        self.state = "closed"
        ex = self._current
        if ex is not None and not ex.ended:
            await ex.finish("killed", "closed")
        await self._shutdown_kernel()
