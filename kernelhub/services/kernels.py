"""The Jupyter API's kernels (``/api/kernels``, a drop-in for the Jupyter Kernel Gateway): one sandbox per kernel.

:class:`Kernels` starts a kernel as a new sandbox of the matching template whose first session runs the
kernelspec asked for, lists the tenant's kernels, interrupts and restarts them in place, and stops the whole
sandbox when the kernel is shut down. A sandbox made here is marked ``jupyter_api``; sandboxes made by
``sandbox_create`` are not kernels here. Built by :class:`~kernelhub.services.hub.Hub` on
:class:`~kernelhub.services.sandboxes.Sandboxes`; :mod:`kernelhub.handlers.jupyter` calls it through the hub.

Each kernel has a :class:`KernelRestarter`, Jupyter Server's restart policy: a kernel that dies is restarted, at
most :data:`AUTORESTART_LIMIT` times in :data:`AUTORESTART_WINDOW_S`, then left dead. Whoever shows a kernel to
clients (the Jupyter websockets' registry) subscribes with :meth:`Kernels.add_listener` and is told, for each
kernel, ``restarting`` and then ``restarted`` around every restart (asked for or automatic), ``dead`` when the
kernel is left dead, and ``shutdown`` when it is gone (shut down, or its sandbox stopped).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from ..errors import InvalidRequest, NotFound
from .sandboxes import Sandboxes, SandboxRecord
from .sessions import KERNELSPECS, JupyterSession
from .templates import Template
from .tenants import Tenant
from .validation import check_env

log = logging.getLogger("kernelhub.kernels")

#: How often a kernel is checked for life, and its sandbox for having stopped (seconds).
POLL_INTERVAL_S = 1.0
#: A kernel that died this many times within the window is not restarted again (Jupyter Server's restart_limit).
AUTORESTART_LIMIT = 5
AUTORESTART_WINDOW_S = 300.0

#: ``listener(kernel_id, event)`` with event one of ``restarting``, ``restarted``, ``dead``, ``shutdown``.
KernelListener = Callable[[str, str], Awaitable[None]]


class KernelRestarter:
    """Watches one kernel of the Jupyter API and restarts it when it dies, in the pattern of jupyter_client's
    ``AsyncIOLoopKernelRestarter`` (``jupyter_client/ioloop/restarter.py``: poll ``is_alive`` every interval,
    restart a dead kernel, give up past a limit), with two differences: the restart goes through the session
    (:meth:`Sandboxes.restart_session`), whose sockets and state follow the new kernel, not straight to the
    kernel manager; and the limit is per window of time, as Jupyter Server's clients see it, not per run of
    consecutive failures. Also tells the listeners when the kernel's sandbox has stopped (``shutdown``).

    Created and started by :meth:`Kernels.start_kernel`; stopped when the kernel's sandbox stops (shut down
    through the API, reaped, or the gateway exiting) or its session is closed."""

    def __init__(self, kernels: Kernels, record: SandboxRecord, session: JupyterSession, *,
                 interval: float = POLL_INTERVAL_S, limit: int = AUTORESTART_LIMIT,
                 window: float = AUTORESTART_WINDOW_S) -> None:
        self.kernels = kernels
        self.record = record
        self.session = session
        self.kernel_id = session.kernel_id or ""
        self.interval = interval
        self.limit = limit
        self.window = window
        self.given_up = False
        self._restarts: list[float] = []
        self._restarting = False
        self._task: asyncio.Task[None] | None = None
        # Every restart of the session (this policy's, the API's, or the session's own: an output flood, an
        # interrupt it ignored) is told to the listeners, which hold their clients' messages around it.
        session.restart_listeners.append(self._session_restart)

    async def _session_restart(self, event: str) -> None:
        await self.kernels.tell(self.kernel_id, event)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._poll())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self.record.state != "running" or self.session.state == "closed":  # its session was closed
                self._task = None
                await self.kernels.tell(self.kernel_id, "shutdown")
                return
            if self.session.state != "running" or self.session.busy or self._restarting or self.given_up:
                continue
            try:
                alive = await self.session.km.is_alive()
            except Exception:  # noqa: BLE001 - a manager that cannot tell is taken for alive, as before
                alive = True
            if not alive:
                await self._autorestart()

    async def _autorestart(self) -> None:
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < self.window]
        if len(self._restarts) >= self.limit:
            log.warning("kernel %s keeps dying; not restarting it again", self.kernel_id)
            self.given_up = True
            await self.kernels.tell(self.kernel_id, "dead")
            return
        self._restarts.append(now)
        log.warning("kernel %s died; restarting it", self.kernel_id)
        try:
            await self.restart()
        except Exception:
            log.exception("restarting kernel %s failed", self.kernel_id)
            await self.kernels.tell(self.kernel_id, "dead")

    async def restart(self) -> None:
        """Restart the kernel (state lost, same id and sockets); the session tells the listeners before and after
        (:attr:`JupyterSession.restart_listeners`). Raises what the restart raises."""
        self._restarting = True
        try:
            await self.kernels.sandboxes.restart_session(self.record.tenant, self.session.id)
        finally:
            self._restarting = False


class Kernels:
    """Jupyter kernels, each the first session of a sandbox of its own in
    :class:`~kernelhub.services.sandboxes.Sandboxes`."""

    def __init__(self, sandboxes: Sandboxes, templates: dict[str, Template]) -> None:
        self.sandboxes = sandboxes
        self.templates = templates
        #: What each new kernel's restarter is made with (see :class:`KernelRestarter`).
        self.poll_interval = POLL_INTERVAL_S
        self.restart_limit = AUTORESTART_LIMIT
        self.restart_window = AUTORESTART_WINDOW_S
        self._restarters: dict[str, KernelRestarter] = {}
        self._listeners: list[KernelListener] = []
        sandboxes.on_stop.append(self._sandbox_stopped)
        sandboxes.on_restart.append(self._watch)

    def _sandbox_stopped(self, record: SandboxRecord) -> None:
        """Called by :class:`Sandboxes` as a sandbox stops (deleted, reaped, failed, the gateway exiting): its
        kernels' restarters stop, and the listeners are told ``shutdown``."""
        for session in record.sessions.values():
            restarter = self._restarters.pop(session.kernel_id or "", None) \
                if isinstance(session, JupyterSession) else None
            if restarter is not None:
                restarter.stop()
                self.sandboxes.spawn(self.tell(restarter.kernel_id, "shutdown"))

    def add_listener(self, listener: KernelListener) -> None:
        """Be told of every kernel's restarts, death and shutdown (see the module docstring)."""
        self._listeners.append(listener)

    async def tell(self, kernel_id: str, event: str) -> None:
        """Called by the restarters and here: each listener in turn; one that fails does not stop the others."""
        if event == "shutdown":
            restarter = self._restarters.pop(kernel_id, None)
            if restarter is not None:
                restarter.stop()
        for listener in list(self._listeners):
            try:
                await listener(kernel_id, event)
            except Exception:
                log.exception("telling a listener of kernel %s about %s failed", kernel_id, event)

    def template_for_kernelspec(self, name: object) -> str:
        """The language whose kernelspec is ``name`` (``kernelhub-python`` → ``python``); raises
        :class:`~kernelhub.errors.NotFound` for any other name."""
        for language, spec in KERNELSPECS.items():
            if spec == name and language != "javascript":
                return language
        raise NotFound(f"No kernelspec {str(name)[:64]!r}.")

    async def start_kernel(self, tenant: Tenant, kernel_name: object,
                           env: object = None) -> tuple[SandboxRecord, JupyterSession]:
        """``POST /api/kernels``: a new sandbox whose first session runs that kernelspec. Of ``env``, only
        ``KERNEL_*`` variables reach the kernel, as with the Jupyter Kernel Gateway (Jupyter Server in gateway
        mode sends its own environment's ``KERNEL_*`` variables, e.g. ``KERNEL_USERNAME``)."""
        if env is not None and not isinstance(env, dict):
            raise InvalidRequest("env must be a JSON object of strings.")
        kernel_env = check_env({k: v for k, v in (env or {}).items()
                                if isinstance(k, str) and k.startswith("KERNEL_")})
        language = self.template_for_kernelspec(kernel_name or "kernelhub-python")
        template = language if language in self.templates else "python"
        if language == "typescript":
            template = "node"
        record = await self.sandboxes.create_sandbox(tenant, template, env=kernel_env, kernel_language=language,
                                                     jupyter_api=True)
        self._watch(record)
        return record, session_of(record)

    def _watch(self, record: SandboxRecord) -> None:
        """Give each kernel of a Jupyter API sandbox its restarter: one just made, or one that runs again (after
        a gateway restart or a resume: its kernels are fresh processes under their old ids)."""
        if not record.jupyter_api:
            return
        for session in record.sessions.values():
            if isinstance(session, JupyterSession):
                restarter = self._restarters[session.kernel_id or ""] = KernelRestarter(
                    self, record, session, interval=self.poll_interval, limit=self.restart_limit,
                    window=self.restart_window)
                restarter.start()

    def kernels(self, tenant: Tenant) -> list[tuple[SandboxRecord, JupyterSession]]:
        """``GET /api/kernels``: the tenant's running kernels and their sandboxes' records."""
        out = []
        for record in self.sandboxes.list_sandboxes(tenant):
            if record.jupyter_api and record.state == "running":
                for s in record.sessions.values():
                    if isinstance(s, JupyterSession):
                        out.append((record, s))
        return out

    def get_kernel(self, tenant: Tenant, kernel_id: object) -> tuple[SandboxRecord, JupyterSession]:
        """The tenant's running kernel ``kernel_id``; counts as activity. Raises
        :class:`~kernelhub.errors.NotFound` otherwise."""
        for record, session in self.kernels(tenant):
            if session.kernel_id == kernel_id:
                record.touch()
                return record, session
        raise NotFound(f"No kernel {str(kernel_id)[:64]!r}.")

    async def interrupt_kernel(self, tenant: Tenant, kernel_id: object) -> None:
        """``POST /api/kernels/{id}/interrupt``: SIGINT to the kernel; it keeps its state."""
        _, session = self.get_kernel(tenant, kernel_id)
        await session.interrupt()

    async def restart_kernel(self, tenant: Tenant, kernel_id: object) -> tuple[SandboxRecord, JupyterSession]:
        """``POST /api/kernels/{id}/restart``: a fresh kernel process in the same sandbox, same id and sockets;
        the listeners are told ``restarting`` and ``restarted`` around it."""
        record, session = self.get_kernel(tenant, kernel_id)
        restarter = self._restarters.get(session.kernel_id or "")
        if restarter is not None:
            await restarter.restart()
        else:
            await self.sandboxes.restart_session(tenant, session.id)
        return record, session

    async def shutdown_kernel(self, tenant: Tenant, kernel_id: object) -> None:
        """``DELETE /api/kernels/{id}``: the kernel's sandbox goes with it (one sandbox per kernel)."""
        record, _ = self.get_kernel(tenant, kernel_id)
        await self.sandboxes.delete_sandbox(tenant, record.id)


def session_of(record: SandboxRecord) -> JupyterSession:
    """The Jupyter API sandbox's kernel: its first jupyter session."""
    return next(s for s in record.sessions.values() if isinstance(s, JupyterSession))
