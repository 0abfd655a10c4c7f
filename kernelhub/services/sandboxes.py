"""Sandboxes and the sessions in them: the registry by tenant, lifecycle, the per-tenant cap, reaping.

:class:`Sandboxes` owns every :class:`SandboxRecord` of every tenant and indexes their sessions by id. It
creates a sandbox (checking the template, limits, env, metadata and the tenant's cap, then starting the first
jupyter session), opens and closes more sessions in it, and stops it on ``sandbox_delete``, on gateway
shutdown, when its sandbox dies, and from the reaper (``idle_timeout_s`` without activity, ``max_lifetime_s``).
Lookups take the calling :class:`~kernelhub.services.tenants.Tenant` and answer
:class:`~kernelhub.errors.NotFound` for ids of other tenants.

Built and configured by :class:`~kernelhub.services.hub.Hub` (its traitlets: default and maximum limits,
``max_sandboxes_per_tenant``, ``reap_interval``, ``stopped_retention_s``); used by the surfaces through the hub
and by :class:`~kernelhub.services.executor.Executor`, :class:`~kernelhub.services.files.Files` and
:class:`~kernelhub.services.kernels.Kernels`.

:meth:`Sandboxes._provision` is the one place a sandbox comes from: a ready one from the warm pool
(:mod:`kernelhub.services.pool`) when it can serve the request, else a new one. A :class:`SandboxRecord`'s
plain fields are what the durable :class:`~kernelhub.services.store.Store` keeps (:meth:`SandboxRecord.to_row`,
written at each change of state, before the answer that announces it); its live fields (``sandbox``,
``sessions``, ``busy``) are rebuilt, never stored; pooled sandboxes have no record until they are handed out,
and are never stored. With a store, :meth:`Sandboxes.start` restores what it records after a gateway restart
(:meth:`Sandboxes._restore`) and :meth:`Sandboxes.shutdown` keeps the sandboxes' workspaces for it; pause and
resume (:meth:`Sandboxes.pause_sandbox`, :meth:`Sandboxes.resume_sandbox`) use the same two halves, suspend and
bring back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from jupyter_client.kernelspec import KernelSpecManager

from .. import json_input
from ..errors import (
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    SandboxError,
    SandboxNotPaused,
    SandboxNotRunning,
)
from ..models import iso
from ..sandbox.egress_forwarder import proxy_env
from ..sandbox.factory import SandboxFactory
from ..sandbox.limits import Limits, resolve_limits
from ..sandbox.sandbox import Sandbox
from .egress.policy import NONE, NetworkPolicy, parse_policy
from .executions import ExecutionHistory
from .packages import install_packages
from .sessions import KERNELSPECS, LANGUAGES, JupyterSession
from .store import SandboxRow, SessionRow, Store
from .telemetry import Telemetry
from .templates import Template
from .tenants import Tenant
from .terminals import TerminalSession
from .validation import check_env

if TYPE_CHECKING:
    from .egress import EgressService
    from .pool import Pool


class Session(Protocol):
    """What every session of a sandbox is, whatever runs in it: implemented by
    :class:`~kernelhub.services.sessions.JupyterSession` (a kernel) and
    :class:`~kernelhub.services.terminals.TerminalSession` (a shell on a PTY). The registry, the reaper, the
    metrics and the surfaces' listings need no more; what ``execute`` takes and answers differs (an
    :class:`~kernelhub.services.executions.Execution` for a kernel, keystrokes and ``{"output"}`` for a
    terminal), so code that drives one kind narrows with ``isinstance``."""

    @property
    def id(self) -> str:
        """``se`` and 16 hex digits, unique in the gateway."""

    @property
    def sandbox_id(self) -> str: ...

    @property
    def type(self) -> str:
        """``jupyter`` or ``terminal`` (:data:`SESSION_TYPES`)."""

    @property
    def language(self) -> str | None:
        """The kernel's language (API.md names); None for a terminal."""

    @property
    def state(self) -> str:
        """``starting``, ``running`` or ``closed`` (a kernel also ``restarting`` and ``dead``)."""

    @property
    def last_activity(self) -> float:
        """Unix seconds of the last input or output."""

    @property
    def busy(self) -> bool:
        """True while the gateway itself runs something in it: the reaper does not stop its sandbox as idle."""

    def to_dict(self) -> dict[str, Any]:
        """The session as API.md shapes it: ``{id, sandbox_id, type, language, state}`` and a kernel's
        ``kernel_id``."""

    async def start(self) -> None:
        """Start the kernel or shell; called once by :meth:`Sandboxes.create_session` (or the pool)."""

    async def close(self) -> None:
        """Stop it and free what it holds; idempotent. Called on ``session_close`` and as its sandbox stops."""

#: Session types (API.md).
SESSION_TYPES = ("jupyter", "terminal")
MAX_METADATA_BYTES = 16 * 1024
#: Deepest nesting of a sandbox's metadata (JSON levels).
MAX_METADATA_DEPTH = 16
#: Sessions (jupyter and terminal, starting ones included) a sandbox may hold at once.
MAX_SESSIONS = 16
#: What a sandbox may do when idle (``on_idle``): stop (the default), or pause.
ON_IDLE = ("stop", "pause")
#: Sandboxes a restarted gateway starts again at once (each starts a kernel: CPU-bound).
RESTORE_CONCURRENCY = 8

T = TypeVar("T")


@dataclasses.dataclass(eq=False)
class SandboxRecord:
    """The registry's entry for one sandbox: who owns it, its state, sessions and activity.

    The fields up to ``jupyter_api`` are plain data: what the API shows and what a store would keep (times
    are Unix seconds). ``sandbox``, ``sessions`` and ``busy`` are live: the OS objects and what runs in them
    now, set by :class:`Sandboxes`."""

    id: str
    tenant: Tenant
    template: Template
    limits: Limits
    metadata: dict[str, Any]
    state: str = "starting"
    reason: str | None = None
    created_at: float = dataclasses.field(default_factory=time.time)
    expires_at: float = dataclasses.field(init=False)
    last_activity: float = dataclasses.field(init=False)
    jupyter_api: bool = False
    #: Its network policy (API.md, "Network policy"): the template's or the request's, changed by ``PATCH``.
    network: NetworkPolicy = NONE
    #: The environment its kernels start with (the template's merged with the request's); kept to restore it.
    env: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)
    #: What the idle reaper does with it: ``"stop"`` it, or ``"pause"`` it (:meth:`Sandboxes.pause_sandbox`).
    on_idle: str = "stop"
    #: When a restarted gateway brought it back on its workspace (kernel memory lost), or None.
    restored_at: float | None = None
    #: When it was paused (state ``paused``), or None.
    paused_at: float | None = None
    #: The host uid it last ran as (its workspace's files belong to it), taken again at resume when free.
    uid: int | None = None
    #: The sessions a paused sandbox had (their ids, types and languages), started afresh at resume.
    kept_sessions: list[SessionRow] = dataclasses.field(default_factory=list, repr=False)
    sandbox: Sandbox | None = dataclasses.field(default=None, init=False, repr=False)
    sessions: dict[str, Session] = dataclasses.field(default_factory=dict, init=False, repr=False)
    #: Calls running in the sandbox now (executions, commands, session starts): the reaper leaves it alone.
    busy: int = dataclasses.field(default=0, init=False)
    #: Sessions being started by ``create_session``: they count against :data:`MAX_SESSIONS` already.
    starting_sessions: int = dataclasses.field(default=0, init=False)
    #: Held by a ``PATCH`` of its network from the proxy's change to the record's: one at a time, so the policy
    #: the sandbox shows is the one its proxy enforces.
    network_lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.expires_at = self.created_at + self.limits.max_lifetime_s
        self.last_activity = self.created_at

    def touch(self) -> None:
        self.last_activity = time.time()

    def idle_deadline(self) -> float | None:
        """When the reaper may stop this sandbox as idle (Unix seconds): ``idle_timeout_s`` after its last
        activity, or None while the gateway itself runs something in it (an API call, an execution: each bounded
        by its own timeout).

        A kernel that says it is busy (its iopub ``status``, e.g. code a Jupyter client sent over the websocket)
        holds the sandbox at most ``execution_timeout_s`` longer: the claim is the sandbox's own word, which its
        code can forge for ever, and no execution may run longer than that."""
        if self.busy > 0 or any(s.busy for s in self.sessions.values()):
            return None
        deadline = self.last_activity + self.limits.idle_timeout_s
        if any(isinstance(s, JupyterSession) and s.execution_state == "busy" for s in self.sessions.values()):
            deadline += self.limits.execution_timeout_s
        return deadline

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "template": self.template.name,
            "state": self.state,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "limits": self.limits.to_dict(),
            "sessions": [s.to_dict() for s in self.sessions.values()],
            "metadata": self.metadata,
            "network": self.network.to_json(),
        }
        if self.reason:
            out["reason"] = self.reason
        if self.restored_at is not None:
            out["restored_at"] = iso(self.restored_at)
        if self.paused_at is not None:
            out["paused_at"] = iso(self.paused_at)
        if self.on_idle != "stop":
            out["on_idle"] = self.on_idle
        return out

    def to_row(self) -> SandboxRow:
        """What the store keeps of this record (:class:`~kernelhub.services.store.SandboxRow`)."""
        return SandboxRow(
            id=self.id, tenant=self.tenant.name, template=self.template.name, limits=self.limits.to_dict(),
            created_at=self.created_at, expires_at=self.expires_at, network=self.network.to_json(),
            metadata=self.metadata, env=self.env, state=self.state, reason=self.reason,
            last_activity=self.last_activity, restored_at=self.restored_at, paused_at=self.paused_at,
            on_idle=self.on_idle, jupyter_api=self.jupyter_api, uid=self.uid,
            sandbox_dir=str(self.sandbox.dir) if self.sandbox is not None else None,
            workspace_mode=self.sandbox.workspace.mode if self.sandbox and self.sandbox.workspace else None)


@dataclasses.dataclass(eq=False, kw_only=True)
class Sandboxes:
    """Every sandbox of every tenant, and the sessions in them. Created by :class:`~kernelhub.services.hub.Hub`
    from its configuration (the fields); :meth:`start` and :meth:`shutdown` are called through the hub by the
    app."""

    factory: SandboxFactory
    kernel_spec_manager: KernelSpecManager
    #: Templates by name (:mod:`kernelhub.services.templates`).
    templates: dict[str, Template]
    #: Limits of a sandbox whose request and template name none, and the most a request may ask for.
    defaults: Limits
    maximum: Limits
    max_sandboxes_per_tenant: int
    #: Paused sandboxes a tenant may keep at once (they do not count toward ``max_sandboxes_per_tenant``).
    max_paused_per_tenant: int = 20
    #: Seconds between the reaper's rounds, and how long a stopped sandbox stays listed.
    reap_interval: float
    stopped_retention_s: float
    #: Read on stop, to end the sandbox's unfinished executions; told when a sandbox is deleted or forgotten.
    executions: ExecutionHistory
    log: logging.Logger
    #: Told of every lifecycle event (its INFO log lines and metrics); one of its own when none is given.
    telemetry: Telemetry = dataclasses.field(default=None)  # type: ignore[assignment]
    #: Ready sandboxes handed out by :meth:`_provision`; None: every sandbox is made when asked for.
    pool: Pool | None = None
    #: The egress proxies of sandboxes whose policy is not "none"; None: no sandbox may have one.
    egress: EgressService | None = None
    _records: dict[str, SandboxRecord] = dataclasses.field(default_factory=dict, init=False, repr=False)
    _sessions: dict[str, tuple[SandboxRecord, Session]] = dataclasses.field(default_factory=dict, init=False,
                                                                             repr=False)
    _pending: dict[str, int] = dataclasses.field(default_factory=dict, init=False, repr=False)
    _reaper: asyncio.Task[None] | None = dataclasses.field(default=None, init=False, repr=False)
    _background: set[asyncio.Task[Any]] = dataclasses.field(default_factory=set, init=False, repr=False)
    #: Called with a record when its sandbox stops, before its OS objects go (the command registry forgets it).
    on_stop: list[Callable[[SandboxRecord], None]] = dataclasses.field(default_factory=list, init=False,
                                                                       repr=False)
    #: Called with a record when its sandbox runs again on its workspace (restored or resumed), its sessions
    #: started (the Jupyter API gives their kernels restarters again).
    on_restart: list[Callable[[SandboxRecord], None]] = dataclasses.field(default_factory=list, init=False,
                                                                          repr=False)
    #: Other names for templates: ``{alias: template}`` (E2B's ``base`` and ``code-interpreter-v1``, …).
    template_aliases: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Where records are kept across restarts (issue 10); None: in memory only. Set by the hub before start.
    store: Store | None = None
    #: At shutdown, stop sandboxes for good (today's behaviour before the store) instead of keeping them, with
    #: their workspaces, for the next gateway on this state directory to restore.
    ephemeral: bool = False

    def __post_init__(self) -> None:
        if self.telemetry is None:
            self.telemetry = Telemetry(self.all_records)

    # -- lifecycle --------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Called by the app once the loop runs: with a store, brings back the sandboxes it records
        (:meth:`_restore`); reaps what a crash left that no record claims; starts the idle/lifetime reaper."""
        if self.store is not None:
            await self._restore()
        else:
            await self.factory.reap_stale()
        self._reaper = asyncio.ensure_future(self._reap_loop())
        if self.pool is not None:
            self.pool.start()

    async def shutdown(self) -> None:
        """Called by the app on exit. With a store and not ``ephemeral``: every running sandbox's processes end
        and its workspace is unmounted but kept, its record stays ``running`` for the next gateway on this state
        directory to restore, and unfinished executions end ``killed`` (``gateway_restart``). Otherwise every
        sandbox stops for good. Either way no process, cgroup, mount or uid is left."""
        if self._reaper is not None:
            self._reaper.cancel()
        if self.pool is not None:
            await self.pool.shutdown()
        records = list(self._records.values())
        if self.store is not None and not self.ephemeral:
            await asyncio.gather(*(self._suspend(r, "gateway_restart") for r in records if r.sandbox is not None),
                                 return_exceptions=True)
        else:
            await asyncio.gather(*(self._stop_record(r, "shutdown") for r in records), return_exceptions=True)
            if self.store is not None:
                await asyncio.gather(*(self.store.delete_sandbox(r.id) for r in records), return_exceptions=True)
        if self.egress is not None:
            await self.egress.close_all()
        await self.factory.stop_all()

    # -- the store ----------------------------------------------------------------------------------------

    def _save(self, record: SandboxRecord) -> asyncio.Future[None] | None:
        """Queue the record's plain fields for the store (ordered with every later write); the answer may be
        awaited to know it is on disk. None without a store."""
        if self.store is None or self.store.closed:
            return None
        future = self.store.put_sandbox(record.to_row())
        future.add_done_callback(self._log_failure)
        return future

    async def _saved(self, record: SandboxRecord) -> None:
        """:meth:`_save`, waiting until it is on disk (before an answer that announces the change); a store
        failure is logged, not raised."""
        future = self._save(record)
        if future is not None:
            with contextlib.suppress(Exception):
                await future

    def _save_session(self, record: SandboxRecord, session: Session) -> asyncio.Future[None] | None:
        if self.store is None or self.store.closed:
            return None
        kernel_id = session.kernel_id if isinstance(session, JupyterSession) else None
        future = self.store.put_session(SessionRow(session.id, record.id, session.type, session.language,
                                                   session.state, kernel_id))
        future.add_done_callback(self._log_failure)
        return future

    def _forget(self, record: SandboxRecord) -> None:
        """The record is gone for good: its row, sessions and executions leave the store too."""
        if self.store is not None and not self.store.closed:
            self.store.delete_sandbox(record.id).add_done_callback(self._log_failure)

    def _log_failure(self, future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is not None:
            self.log.error("the store failed: %s", future.exception())

    def _from_row(self, row: SandboxRow) -> SandboxRecord:
        template = self.templates.get(row.template) or Template(row.template, "python")
        record = SandboxRecord(row.id, Tenant(row.tenant), template, Limits(**row.limits), row.metadata,
                               state=row.state, reason=row.reason, created_at=row.created_at,
                               jupyter_api=row.jupyter_api, env=dict(row.env), on_idle=row.on_idle,
                               restored_at=row.restored_at, paused_at=row.paused_at, uid=row.uid)
        try:
            record.network = parse_policy(row.network)
        except InvalidRequest as exc:  # only if the policy language changed under a stored value
            self.log.error("sandbox %s: its stored network policy is no longer valid (%s): none", row.id, exc)
        record.expires_at = row.expires_at
        record.last_activity = row.last_activity or row.created_at
        return record

    async def _restore(self) -> None:
        """Start-up with a store (issue 10): executions a dead gateway cut end ``killed`` (``gateway_restart``);
        every stored sandbox is registered again; running ones past their lifetime stop (``lifetime``), the
        others start again on their workspace with a fresh kernel per session (:meth:`_bring_back`, at most
        :data:`RESTORE_CONCURRENCY` at once); paused ones stay paused; and only what no record claims is reaped
        from the state directory."""
        assert self.store is not None
        now = time.time()
        rows = await self.store.list_sandboxes()
        cut = await self.store.mark_cut_executions("gateway_restart", finished_at=now)
        if cut:
            self.log.warning("%d executions were cut by the gateway's restart: they ended killed "
                             "(gateway_restart)", len(cut))
        keep = {r.id for r in rows if r.state in ("running", "paused") and now < r.expires_at}
        await self.factory.reap_stale(keep=keep)
        restoring: list[SandboxRecord] = []
        for row in rows:
            record = self._from_row(row)
            self._records[record.id] = record
            if row.state in ("running", "paused", "starting") and record.id not in keep:
                record.state, record.reason = "stopped", "lifetime" if now >= row.expires_at else "gateway_restart"
                self._save(record)
            elif row.state == "running":
                record.state = "starting"
                restoring.append(record)
        gate = asyncio.Semaphore(RESTORE_CONCURRENCY)

        async def one(record: SandboxRecord) -> None:
            async with gate:
                if await self._bring_back(record, "the gateway restarted"):
                    record.restored_at = time.time()
                    self._save(record)

        await asyncio.gather(*(one(r) for r in restoring))
        if restoring:
            self.log.warning("restored %d sandboxes on their workspaces in %.1f s", len(restoring), time.time() - now)

    async def _bring_back(self, record: SandboxRecord, why: str) -> bool:
        """Start ``record``'s sandbox again on the workspace it kept (restore after a restart, resume after a
        pause): same id, tenant, limits and metadata; a fresh kernel (or shell) for each stored session, under
        its old id; one of the template's language if none was stored. Answers whether it runs; on failure it
        is ``failed`` (reason ``restore_failed``), its workspace kept."""
        rows = list(record.kept_sessions) if self.store is None else await self.store.list_sessions(record.id)
        try:
            sandbox = await self.factory.create(limits=record.limits, env=record.env, sandbox_id=record.id,
                                                uid=record.uid, reattach=True)
        except Exception as exc:
            self.log.error("sandbox %s could not be started again on its workspace: %s", record.id, exc)
            record.state, record.reason = "failed", "restore_failed"
            self._save(record)
            return False
        self._attach(record, sandbox)
        if self.egress is not None:
            try:
                await self.egress.attach(sandbox, record.network)
            except Exception as exc:
                sandbox.log(f"{why}: its network policy could not be applied again, it has no egress: {exc}")
        sandbox.log(f"{why}: this sandbox runs again on its workspace, whose files are kept; kernel memory was "
                    "lost (variables, imports, running code): each session has a fresh kernel")
        if not any(r.type == "jupyter" for r in rows):
            rows.insert(0, SessionRow("", record.id, "jupyter", record.template.language))
        for row in rows:
            session: Session
            if row.type == "jupyter":
                session = JupyterSession(sandbox, row.language or record.template.language,
                                         self.kernel_spec_manager)
            else:
                from .terminals import TerminalSession

                session = TerminalSession(sandbox)
            session.id = row.id or session.id
            if session.type == "jupyter" and row.kernel_id:
                session.km.kernel_id = row.kernel_id  # a Jupyter client reconnects under the id it knew
            try:
                await session.start()
            except Exception as exc:
                sandbox.log(f"session {session.id} ({row.language or row.type}) could not start again: {exc}")
                if self.store is not None:
                    self.store.delete_session(session.id).add_done_callback(self._log_failure)
                continue
            record.sessions[session.id] = session
            self._sessions[session.id] = (record, session)
            self._save_session(record, session)
        record.state, record.reason, record.kept_sessions = "running", None, []
        record.touch()
        await self._saved(record)
        for listener in self.on_restart:
            listener(record)
        return True

    def _attach(self, record: SandboxRecord, sandbox: Sandbox) -> None:
        record.sandbox = sandbox
        record.uid = sandbox.uid
        sandbox.on_exit.append(lambda sb: self._on_sandbox_exit(record))

    async def _suspend(self, record: SandboxRecord, reason: str) -> None:
        """End the sandbox's processes and free its memory and uid, keeping its workspace (unmounted) and its
        sessions' rows: for a pause, and for a shutdown that the next gateway restores. Unfinished executions
        end ``killed`` with ``reason``. The record's state is the caller's to set."""
        for ex in self.executions.for_sandbox(record.id):
            if not ex.ended:
                await ex.finish("killed", reason)
        record.kept_sessions = [SessionRow(se.id, record.id, se.type, se.language,
                                           kernel_id=se.kernel_id if isinstance(se, JupyterSession) else None)
                                for se in record.sessions.values()]
        for session in list(record.sessions.values()):
            self._sessions.pop(session.id, None)
            with contextlib.suppress(Exception):
                await session.close()
        record.sessions.clear()
        for listener in self.on_stop:
            listener(record)
        sandbox, record.sandbox = record.sandbox, None
        if sandbox is not None:
            await sandbox.stop(reason, keep_workspace=True)

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run ``coro`` as a task held until it ends (the loop keeps only weak references to tasks)."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self.reap_interval)
            now = time.time()
            for record in list(self._records.values()):
                try:
                    if record.state == "running":
                        idle_at = record.idle_deadline()
                        if now >= record.expires_at:
                            # Its deadline, which E2B's timeout may have moved before max_lifetime_s.
                            self.telemetry.sandbox_reaped(record, "lifetime", record.expires_at - record.created_at)
                            await self._stop_record(record, "lifetime")
                        elif idle_at is not None and now >= idle_at:
                            self.telemetry.sandbox_reaped(record, "idle", now - record.last_activity)
                            if record.on_idle != "pause" or not await self._pause_if_room(record, "idle"):
                                await self._stop_record(record, "idle")
                    elif record.state == "paused" and now >= record.expires_at:
                        self.telemetry.sandbox_reaped(record, "lifetime", record.limits.max_lifetime_s)
                        await self._stop_record(record, "lifetime")
                    elif record.state in ("stopped", "failed") and record.sandbox is None and \
                            now - record.last_activity > self.stopped_retention_s:
                        self._records.pop(record.id, None)
                        self.executions.forget_sandbox(record.id)
                        self._forget(record)
                except Exception:
                    self.log.exception("reaping %s failed", record.id)

    # -- sandboxes --------------------------------------------------------------------------------------

    def _live_count(self, tenant: Tenant) -> int:
        """The tenant's sandboxes that count against its cap: records starting or running, plus reservations
        of creates still provisioning (which have no record yet)."""
        records = sum(1 for r in self._records.values() if r.tenant == tenant and r.state in ("starting", "running"))
        return records + self._pending.get(tenant.name, 0)

    def _reserve_sandbox(self, tenant: Tenant) -> None:
        """Hold one of the tenant's ``max_sandboxes_per_tenant`` places for a create, or refuse (429).

        Check and hold happen with no await between them, so concurrent creates cannot all pass the check.
        The caller releases the place with :meth:`_release_sandbox` in the same step that adds the record (which
        then counts instead), or when the create fails before that."""
        if self._live_count(tenant) >= self.max_sandboxes_per_tenant:
            raise QuotaExceeded(f"Tenant {tenant.name!r} already has {self.max_sandboxes_per_tenant} live or "
                                "starting sandboxes, the most it may have; delete one first.")
        self._pending[tenant.name] = self._pending.get(tenant.name, 0) + 1

    def _release_sandbox(self, tenant: Tenant) -> None:
        left = self._pending.get(tenant.name, 0) - 1
        if left > 0:
            self._pending[tenant.name] = left
        else:
            self._pending.pop(tenant.name, None)

    async def _provision(self, template: Template, language: str, limits: Limits,
                         env: dict[str, str]) -> tuple[Sandbox, JupyterSession | None]:
        """Where every sandbox comes from: a pooled one already running a started ``language`` kernel (its
        session is answered too), made into what this request asks for, when the pool can serve it; else a
        new sandbox (and None: the caller starts its kernel). Raises what the factory raises."""
        if self.pool is not None:
            pooled = await self.pool.take(template, language, limits, env)
            if pooled is not None:
                return pooled.sandbox, pooled.session
        return await self.factory.create(limits=limits, env=env), None

    async def create_sandbox(self, tenant: Tenant, template: object = "python",
                             limits: Mapping[str, Any] | None = None, env: object = None, metadata: object = None,
                             network: object = None, *, kernel_language: str | None = None,
                             on_idle: object = None, jupyter_api: bool = False) -> SandboxRecord:
        """``sandbox_create``: a running sandbox with one jupyter session of its template's language.

        ``limits`` (API.md names) lower or raise the template's up to the maximum; ``env`` is added to the
        template's; ``metadata`` is kept as given (at most :data:`MAX_METADATA_BYTES` of JSON);
        ``kernel_language`` (the Jupyter API's kernelspec) overrides the template's language; ``jupyter_api``
        marks a sandbox the Jupyter API made (kept with it). Raises
        :class:`~kernelhub.errors.InvalidRequest` for any of them out of bounds,
        :class:`~kernelhub.errors.QuotaExceeded` past ``max_sandboxes_per_tenant`` live (starting included),
        and what the sandbox or kernel start raises."""
        if template is None:
            template = "python"
        if isinstance(template, str) and template not in self.templates:
            template = self.template_aliases.get(template, template)
        if not isinstance(template, str) or template not in self.templates:
            raise InvalidRequest(f"Unknown template {template!r}; known templates are "
                                 f"{', '.join(sorted(self.templates))}.")
        tmpl = self.templates[template]
        base = tmpl.base_limits(self.defaults, self.maximum)
        resolved = resolve_limits(limits, base, self.maximum)
        env_vars = {**tmpl.env, **check_env(env)}
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict):
            raise InvalidRequest("metadata must be a JSON object.")
        json_input.check_value(metadata, "metadata", max_depth=MAX_METADATA_DEPTH)
        if len(json.dumps(metadata)) > MAX_METADATA_BYTES:
            raise InvalidRequest(f"metadata may be at most {MAX_METADATA_BYTES} bytes of JSON.")
        policy = self._network_policy(tmpl.network if network is None else network)
        if policy.mode != "none":
            env_vars.update(proxy_env())  # in the pooled kernel too, set at hand-out like the request's env
        language = kernel_language or tmpl.language
        if language not in KERNELSPECS:
            raise InvalidRequest(f"Unknown language {language!r}.")
        if on_idle not in (None, *ON_IDLE):
            raise InvalidRequest(f"on_idle must be one of {', '.join(ON_IDLE)}.")
        self._reserve_sandbox(tenant)
        reserved = True
        sandbox: Sandbox | None = None
        asked = time.monotonic()
        try:
            sandbox, pooled_session = await self._provision(tmpl, language, resolved, env_vars)
            if self.egress is not None:
                await self.egress.attach(sandbox, policy)
            record = SandboxRecord(sandbox.id, tenant, tmpl, resolved, metadata, network=policy, env=env_vars,
                                   on_idle=str(on_idle or "stop"), jupyter_api=jupyter_api)
            self.telemetry.sandbox_created(record)
            self._attach(record, sandbox)
            # The reservation becomes the record in one step (no await between): counted once, never twice.
            self._records[record.id] = record
            self._release_sandbox(tenant)
            reserved = False
            if tmpl.packages:
                await install_packages(sandbox, tmpl.packages, resolved.execution_timeout_s)
            session = pooled_session or JupyterSession(sandbox, language, self.kernel_spec_manager)
            record.sessions[session.id] = session
            self._sessions[session.id] = (record, session)
            if pooled_session is None:
                await session.start()
            record.state = "running"
            record.touch()
            self._save(record)
            saved = self._save_session(record, session)
            if saved is not None:
                await saved  # on disk before its id is announced: a restart finds it
            self.telemetry.sandbox_ready(record, time.monotonic() - asked)
            return record
        except BaseException as exc:
            self.telemetry.sandbox_failed(tmpl.name, sandbox.id if sandbox else None,
                                          getattr(exc, "message", None) or type(exc).__name__)
            if sandbox is not None:
                record_ = self._records.get(sandbox.id)
                if record_ is not None:
                    await self._stop_record(record_, "failed")
                    self._records.pop(sandbox.id, None)
                else:
                    await sandbox.stop("failed")
            raise
        finally:
            if reserved:
                self._release_sandbox(tenant)

    def _on_sandbox_exit(self, record: SandboxRecord) -> None:
        sb = record.sandbox
        if record.state in ("starting", "running"):
            record.state = "failed"
            record.reason = (sb.reason if sb else None) or "failed"
            self.telemetry.sandbox_failed(record.template.name, record.id, f"it died ({record.reason})")
            self.spawn(self._stop_record(record, record.reason))

    def list_sandboxes(self, tenant: Tenant) -> list[SandboxRecord]:
        """``sandbox_list``: the tenant's sandboxes, stopped ones included until ``stopped_retention_s``."""
        return [r for r in self._records.values() if r.tenant == tenant]

    def all_records(self) -> list[SandboxRecord]:
        """Every tenant's sandboxes, stopped ones included until ``stopped_retention_s`` (for the metrics)."""
        return list(self._records.values())

    def get_sandbox(self, tenant: Tenant, sandbox_id: object) -> SandboxRecord:
        """``sandbox_info``: the tenant's sandbox ``sandbox_id`` in any state; raises
        :class:`~kernelhub.errors.NotFound` for unknown ids and other tenants' ids."""
        record = self._records.get(sandbox_id) if isinstance(sandbox_id, str) else None
        if record is None or record.tenant != tenant:
            raise NotFound(f"No sandbox {str(sandbox_id)[:64]!r}.")
        return record

    def find(self, sandbox_id: str) -> SandboxRecord | None:
        """The record of ``sandbox_id`` whoever owns it, or None; for services that hold an id they checked."""
        return self._records.get(sandbox_id)

    def running(self, tenant: Tenant, sandbox_id: object) -> tuple[SandboxRecord, Sandbox]:
        """The tenant's sandbox, which must be running, and counts this call as activity. Raises
        :class:`~kernelhub.errors.NotFound`, or :class:`~kernelhub.errors.Conflict`
        (``sandbox_not_running``) for a stopped or failed one."""
        record = self.get_sandbox(tenant, sandbox_id)
        if record.state != "running" or record.sandbox is None:
            reason = f" ({record.reason})" if record.reason else ""
            raise SandboxNotRunning(f"Sandbox {record.id} is {record.state}{reason}.")
        record.touch()
        return record, record.sandbox

    async def _stop_record(self, record: SandboxRecord, reason: str | None) -> None:
        if record.state == "paused":
            # Its processes are gone already; what it kept goes now.
            await self.factory.discard(record.id)
            record.paused_at = None
        if record.state in ("starting", "running", "paused"):
            record.state = "stopped"
        if reason and not record.reason and reason not in ("deleted", "shutdown"):
            record.reason = reason
        for session in list(record.sessions.values()):
            self._sessions.pop(session.id, None)
            with contextlib.suppress(Exception):
                await session.close()
        for ex in self.executions.for_sandbox(record.id):
            if not ex.ended:
                await ex.finish("killed", reason or "stopped")
        for listener in self.on_stop:
            listener(record)
        sandbox, record.sandbox = record.sandbox, None
        if self.egress is not None:
            await self.egress.close(record.id)  # before the sandbox goes: no tunnel outlives it
        if sandbox is not None:
            await sandbox.stop(reason)
            self.telemetry.sandbox_stopped(record, reason or "stopped")
        record.touch()
        if reason not in ("deleted", "shutdown"):
            self._save(record)

    async def delete_sandbox(self, tenant: Tenant, sandbox_id: object) -> None:
        """``sandbox_delete``: kill everything, free every resource, forget the sandbox."""
        record = self.get_sandbox(tenant, sandbox_id)
        self.telemetry.sandbox_deleted(record)
        await self._stop_record(record, "deleted")
        self._records.pop(record.id, None)
        self.executions.forget_sandbox(record.id)
        self._forget(record)

    async def pause_sandbox(self, tenant: Tenant, sandbox_id: object) -> SandboxRecord:
        """``sandbox_pause``: stop the running sandbox's processes and free its memory and uid, keeping its record,
        its workspace (unmounted, on disk) and its sessions' ids (state ``paused``). Unfinished executions end
        ``killed`` with reason ``paused``. A paused sandbox does not count toward ``max_sandboxes_per_tenant``;
        at most ``max_paused_per_tenant`` may be paused at once. Raises :class:`~kernelhub.errors.NotFound`,
        :class:`~kernelhub.errors.Conflict` (``sandbox_not_running``) unless it runs, and
        :class:`~kernelhub.errors.QuotaExceeded` past the paused cap."""
        record, _ = self.running(tenant, sandbox_id)
        if not await self._pause_if_room(record, "paused"):
            raise QuotaExceeded(f"Tenant {tenant.name!r} already has {self.max_paused_per_tenant} paused sandboxes, "
                                "the most it may keep; resume or delete one first.")
        return record

    async def _pause_if_room(self, record: SandboxRecord, reason: str) -> bool:
        """Pause ``record`` (see :meth:`pause_sandbox`) if its tenant is under the paused cap; answers whether."""
        paused = sum(1 for r in self._records.values() if r.tenant == record.tenant and r.state == "paused")
        if paused >= self.max_paused_per_tenant:
            return False
        record.state, record.paused_at = "paused", time.time()  # in one step: no new work is accepted from here
        await self._suspend(record, reason)
        self.log.info("sandbox %s paused (%s)", record.id, reason)
        await self._saved(record)
        return True

    async def resume_sandbox(self, tenant: Tenant, sandbox_id: object) -> SandboxRecord:
        """``sandbox_resume``: start the paused sandbox again on its workspace, with a fresh kernel (or shell)
        for each session it had, under the same ids. It counts toward ``max_sandboxes_per_tenant`` again.
        Raises :class:`~kernelhub.errors.NotFound`, :class:`~kernelhub.errors.SandboxNotPaused` (409)
        unless it is paused, :class:`~kernelhub.errors.QuotaExceeded` at the live cap, and
        :class:`~kernelhub.errors.SandboxError` when it cannot start (it is then ``failed``, its workspace
        kept)."""
        record = self.get_sandbox(tenant, sandbox_id)
        if record.state != "paused":
            raise SandboxNotPaused(f"Sandbox {record.id} is {record.state}, not paused.")
        self._reserve_sandbox(tenant)
        try:
            record.state, record.paused_at = "starting", None
            ok = await self._bring_back(record, "resumed")
        finally:
            self._release_sandbox(tenant)
        if not ok:
            raise SandboxError(f"Sandbox {record.id} could not start again on its workspace; its files are kept.")
        return record

    def set_deadline(self, tenant: Tenant, sandbox_id: object, seconds: object, *,
                     extend_only: bool = False) -> SandboxRecord:
        """Move the running sandbox's ``expires_at`` to ``seconds`` from now (E2B's ``set_timeout``; with
        ``extend_only``, E2B's ``connect``: never earlier than it was). At most the sandbox's ``max_lifetime_s``
        after its creation: raises :class:`~kernelhub.errors.InvalidRequest` beyond that or for a number that is
        not positive, and what :meth:`running` raises."""
        record, _ = self.running(tenant, sandbox_id)
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < float("inf"):
            raise InvalidRequest("The timeout must be a positive number of seconds.")
        now = time.time()
        latest = record.created_at + record.limits.max_lifetime_s
        if now + seconds > latest + 1e-3:
            raise InvalidRequest(f"Sandbox {record.id} may live at most {record.limits.max_lifetime_s:g} s from its "
                                 f"creation (its max_lifetime_s): at most {max(0, int(latest - now))} s more.")
        wanted = now + float(seconds)
        record.expires_at = max(record.expires_at, wanted) if extend_only else wanted
        self._save(record)
        return record

    def sandbox_logs(self, tenant: Tenant, sandbox_id: object, lines: int | str = 100) -> list[str]:
        """``sandbox_logs``: the last ``lines`` (0 to 10000; a query string's text is accepted) of the
        sandbox's log, oldest first."""
        record = self.get_sandbox(tenant, sandbox_id)
        try:
            n = int(lines)
        except (TypeError, ValueError):
            raise InvalidRequest("lines must be a whole number.") from None
        if not 0 <= n <= 10000:
            raise InvalidRequest("lines must be between 0 and 10000.")
        record.touch()
        return record.sandbox.logs(n) if record.sandbox is not None else []

    def sandbox_metrics(self, tenant: Tenant, sandbox_id: object) -> dict[str, Any]:
        """``sandbox_metrics``: the running sandbox's cgroup counters (:meth:`Sandbox.metrics` gives shapes)."""
        record = self.get_sandbox(tenant, sandbox_id)
        record.touch()
        if record.sandbox is None:
            raise SandboxNotRunning(f"Sandbox {record.id} is {record.state}.")
        out = record.sandbox.metrics()
        out.update(self.egress.metrics(record.id) if self.egress is not None
                   else {"net_rx_bytes": 0, "net_tx_bytes": 0})
        return out

    # -- network ----------------------------------------------------------------------------------------

    def _network_policy(self, value: object) -> NetworkPolicy:
        """``value`` (a request's or template's ``network``) parsed; raises
        :class:`~kernelhub.errors.InvalidRequest` for a bad one, or for egress on a gateway without it."""
        policy = parse_policy(value)
        if policy.mode != "none" and self.egress is None:
            raise InvalidRequest("This gateway offers no egress; sandboxes reach only their own loopback "
                                 '(network: "none").')
        return policy

    @staticmethod
    async def _give_env(sandbox: Sandbox, session: JupyterSession, env: dict[str, str]) -> None:
        try:
            await session.set_env(env)
        except Exception as exc:  # the kernel died or hung: the sandbox log says so, later kernels have it
            sandbox.log(f"could not set the proxy variables in kernel {session.id}: {exc!r}")

    async def update_sandbox(self, tenant: Tenant, sandbox_id: object, network: object) -> SandboxRecord:
        """``PATCH /v1/sandboxes/{id}`` (``sandbox_update``): the running sandbox's new network policy. New
        connections follow it at once and open ones it refuses are cut
        (:meth:`~kernelhub.services.egress.EgressService.update`).

        A sandbox that had no egress (``"none"`` since its start) gets its proxy and forwarder now; every later
        process gets the proxy variables, and so do its running python and bash kernels (a silent request
        after the execution running now, before any later one: :meth:`JupyterSession.set_env`; the answer does
        not wait for it). Node kernels, terminals and commands already running keep their environment: restart
        them to reach the network. Raises :class:`~kernelhub.errors.InvalidRequest` for a bad policy,
        what :meth:`running` raises, and :class:`~kernelhub.errors.SandboxError` if the forwarder cannot start."""
        record, sandbox = self.running(tenant, sandbox_id)
        policy = self._network_policy(network)
        if self.egress is None:
            return record
        # A first policy other than "none" starts the proxy and the forwarder, which waits on the sandbox: a
        # second PATCH meanwhile would find the proxy, set its own policy on it and answer, and the first would
        # then write its policy into the record over the second's. One at a time, the sandbox checked again.
        async with record.network_lock:
            record, sandbox = self.running(tenant, sandbox_id)
            record.busy += 1
            try:
                first = await self.egress.update(sandbox, policy)
            except Exception:
                if record.state == "running" and record.sandbox is sandbox:
                    raise
                first = False  # it stopped meanwhile, which is why the forwarder could not start
            finally:
                record.busy -= 1
            if record.state != "running" or record.sandbox is not sandbox:
                # Deleted, paused or stopped while the proxy started (its stop closed the proxy): no policy to
                # record, and no row to write back into the store for a sandbox a DELETE removed from it.
                reason = f" ({record.reason})" if record.reason else ""
                raise SandboxNotRunning(f"Sandbox {record.id} is {record.state}{reason}.")
            if first:
                for session in list(record.sessions.values()):
                    if isinstance(session, JupyterSession) and session.language in ("python", "bash"):
                        # Each in a task of its own, started now: its turn comes before any later execution.
                        self.spawn(self._give_env(sandbox, session, proxy_env()))
            record.network = policy
            if policy.mode != "none":
                record.env.update(proxy_env())  # a restored or resumed sandbox starts its kernels with them
            record.touch()
            await self._saved(record)
        return record

    # -- sessions ---------------------------------------------------------------------------------------

    async def create_session(self, tenant: Tenant, sandbox_id: object, type: object = "jupyter",
                             language: str | None = None) -> Session:
        """``session_create``: another kernel (any language) or a terminal in the same sandbox."""
        record, sandbox = self.running(tenant, sandbox_id)
        if type not in SESSION_TYPES:
            raise InvalidRequest(f"type must be one of {', '.join(SESSION_TYPES)}.")
        session: Session
        if type == "jupyter":
            lang = language or record.template.language
            if lang not in KERNELSPECS:
                raise InvalidRequest(f"Unknown language {lang!r}; use one of {', '.join(LANGUAGES)}.")
            session = JupyterSession(sandbox, lang, self.kernel_spec_manager)
        else:
            if language is not None:
                raise InvalidRequest("language applies only to jupyter sessions.")
            session = TerminalSession(sandbox)
        # Counted like sandboxes: a session still starting holds its place, and becomes a session in one step.
        if len(record.sessions) + record.starting_sessions >= MAX_SESSIONS:
            raise QuotaExceeded(f"Sandbox {record.id} already has {MAX_SESSIONS} sessions, the most a sandbox may "
                                "have; close one first.")
        record.starting_sessions += 1
        record.busy += 1
        try:
            await session.start()
        finally:
            record.busy -= 1
            record.starting_sessions -= 1
        record.sessions[session.id] = session
        self._sessions[session.id] = (record, session)
        record.touch()
        self._save_session(record, session)
        return session

    def get_session(self, tenant: Tenant, session_id: object) -> tuple[SandboxRecord, Session]:
        """The tenant's session ``session_id`` and its sandbox's record; counts as activity. Raises
        :class:`~kernelhub.errors.NotFound` for unknown, closed and other tenants' ids."""
        found = self._sessions.get(session_id) if isinstance(session_id, str) else None
        if found is None or found[0].tenant != tenant:
            raise NotFound(f"No session {str(session_id)[:64]!r}.")
        found[0].touch()
        return found

    def find_session(self, session_id: str) -> tuple[SandboxRecord, Session] | None:
        """The open session ``session_id`` and its sandbox's record whoever owns them, or None."""
        return self._sessions.get(session_id)

    async def close_session(self, tenant: Tenant, session_id: object) -> None:
        """``session_close``: stop the kernel or shell; the sandbox carries on."""
        record, session = self.get_session(tenant, session_id)
        self._sessions.pop(session.id, None)
        record.sessions.pop(session.id, None)
        if self.store is not None and not self.store.closed:
            self.store.delete_session(session.id).add_done_callback(self._log_failure)
        await session.close()

    async def restart_session(self, tenant: Tenant, session_id: object) -> JupyterSession:
        """A fresh kernel for a jupyter session (its state is lost; same id); E2B's ``restart_code_context``.
        Raises :class:`~kernelhub.errors.NotFound`, or :class:`~kernelhub.errors.InvalidRequest` for a terminal."""
        record, session = self.get_session(tenant, session_id)
        if not isinstance(session, JupyterSession):
            raise InvalidRequest("Only jupyter sessions restart.")
        record.busy += 1
        try:
            await session.restart()
        finally:
            record.busy -= 1
            record.touch()
        return session
