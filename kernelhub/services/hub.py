"""The service layer's front door: the one object every surface holds, configured by traitlets.

:class:`Hub` reads the configuration (limits, the per-tenant cap, reaping, templates), builds the services and
answers, under the names the surfaces call (REST, websockets, the Jupyter API, MCP), with the service method
that does the work; no policy lives in a surface, and none here. Every method takes the calling
:class:`~kernelhub.services.tenants.Tenant` and answers :class:`~kernelhub.errors.NotFound` for ids of other
tenants.

The services, each in the module named for its concern:

- :class:`~kernelhub.services.sandboxes.Sandboxes`: sandboxes and their sessions, the per-tenant cap, the
  idle/lifetime reaper, provisioning;
- :class:`~kernelhub.services.executor.Executor`: code and keystrokes in a sandbox, executions;
- :class:`~kernelhub.services.commands.Commands`: shell commands, foreground and background, by pid;
- :class:`~kernelhub.services.tokens.SandboxTokens`: the per-sandbox access tokens of the E2B surface;
- :class:`~kernelhub.services.files.Files`: the workspace's files;
- :class:`~kernelhub.services.kernels.Kernels`: the Jupyter API's kernels, one sandbox each;
- :class:`~kernelhub.services.pool.Pool`: ready sandboxes per template, which provisioning hands out;
- :class:`~kernelhub.services.egress.EgressService`: the egress proxy of each sandbox with a network policy.

With ``durable`` (the default of ``kernelhub serve``) :meth:`Hub.start` opens the
:class:`~kernelhub.services.store.Store` and the :class:`~kernelhub.services.audit.AuditLog` in the state
directory: records survive a gateway restart, and the surfaces record every action through
:meth:`Hub.record_action`.

Created by the app (``kernelhub serve``) and in-process by ``kernelhub mcp``, which call :meth:`Hub.start` once
the loop runs and :meth:`Hub.shutdown` on exit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from traitlets import Bool, Dict, Float, Integer, Unicode
from traitlets.config import LoggingConfigurable

from ..errors import AuditUnavailable, InvalidRequest, KernelHubError
from ..sandbox.factory import SandboxFactory
from ..sandbox.limits import DEFAULT_MAXIMUM, Limits, resolve_limits
from ..sandbox.provisioner import KERNELSPECS_DIR
from .audit import AuditLog
from .commands import Commands
from .egress import EgressService, Refusal
from .executions import StoreExecutionHistory
from .executor import Executor
from .files import Files
from .kernels import Kernels
from .pool import Pool
from .sandboxes import Sandboxes
from .store import Store
from .telemetry import PoolState, Telemetry
from .templates import BUILTIN_TEMPLATES, Template, parse_templates
from .tenants import Tenant, TenantHolds
from .tokens import SandboxTokens

#: Seconds between two applications of the audit log's retention.
AUDIT_PRUNE_INTERVAL_S = 300.0


class Hub(LoggingConfigurable):
    """The service layer as the surfaces see it: its configuration (the traitlets below, ``--Hub.*`` and the
    ``KERNELHUB_*`` variables named in their help) and the services built from it, ``sandboxes``,
    ``executor``, ``commands``, ``files``, ``jupyter`` and ``tokens``. Created by the app (or in-process by
    ``kernelhub mcp``).

    Each method the surfaces call (``create_sandbox``, ``execute``, ``open_upload``, ``start_kernel``, …) is the
    service's own bound method, assigned in ``__init__``: one definition, one signature, one docstring, in the
    module of its concern."""

    # Each option's KERNELHUB_* variable is its ``env`` tag, read by kernelhub.settings.
    default_limits = Dict(help="Limits a sandbox gets when the request names none (API.md names), e.g. "
                          '{"memory_mb": 1024}.', config=True).tag(env="KERNELHUB_DEFAULT_LIMITS")
    max_limits = Dict(help="The most a request may ask for, per limit (API.md names).", config=True).tag(
        env="KERNELHUB_MAX_LIMITS")
    max_sandboxes_per_tenant = Integer(20, help="Live sandboxes a tenant may have at once, starting ones "
                                       "included.", config=True).tag(env="KERNELHUB_MAX_SANDBOXES_PER_TENANT")
    max_paused_per_tenant = Integer(20, help="Paused sandboxes a tenant may keep at once; they hold disk (their "
                                    "workspace) but no memory, uid or process, and do not count toward "
                                    "max_sandboxes_per_tenant.", config=True).tag(
        env="KERNELHUB_MAX_PAUSED_PER_TENANT")
    execution_history = Integer(1000, help="Finished executions kept for execution_status, per tenant (the "
                                "oldest go first; one tenant's never push out another's).", config=True).tag(
        env="KERNELHUB_EXECUTION_HISTORY")
    execution_history_mb = Float(256.0, help="MiB of finished executions (their outputs, errors and code) kept "
                                 "for execution_status, per tenant.", config=True).tag(
        env="KERNELHUB_EXECUTION_HISTORY_MB")
    max_queued_executions = Integer(100, help="Executions that may wait or run at once in one jupyter session; "
                                    "more are refused (429).", config=True).tag(
        env="KERNELHUB_MAX_QUEUED_EXECUTIONS")
    max_queued_code_mb = Float(32.0, help="MiB of code that may wait or run at once in one sandbox's executions; "
                               "more is refused (429).", config=True).tag(env="KERNELHUB_MAX_QUEUED_CODE_MB")
    max_connections_per_kernel = Integer(16, help="Websockets that may be open at once to one kernel of the "
                                         "Jupyter API; more are refused (429).", config=True).tag(
        env="KERNELHUB_MAX_CONNECTIONS_PER_KERNEL")
    max_websockets_per_tenant = Integer(512, help="Websockets one tenant may hold open at once, on every "
                                        "surface together (/stream, terminals, the Jupyter API); more are refused "
                                        "(429). Each costs the gateway a descriptor.", config=True).tag(
        env="KERNELHUB_MAX_WEBSOCKETS_PER_TENANT")
    max_request_body_mb_per_tenant = Float(256.0, help="MiB of request bodies a tenant's requests may have "
                                           "buffered in the gateway at once (JSON and MCP bodies, read whole "
                                           "before they are parsed; uploads stream to disk and do not count); more "
                                           "is refused (429).", config=True).tag(
        env="KERNELHUB_MAX_REQUEST_BODY_MB_PER_TENANT")
    reap_interval = Float(1.0, help="Seconds between idle/lifetime checks.", config=True).tag(
        env="KERNELHUB_REAP_INTERVAL")
    extra_templates = Dict(help="Templates besides the built-in ones: {name: {language, limits, network, env, "
                           "description}}.", config=True).tag(env="KERNELHUB_TEMPLATES")
    stopped_retention_s = Float(3600.0, help="How long a stopped sandbox stays visible with its reason.",
                                config=True).tag(env="KERNELHUB_STOPPED_RETENTION_S")
    template_aliases = Dict({"base": "python", "code-interpreter-v1": "python"},
                            help="Other names for templates, {alias: template}: E2B's SDKs ask for 'base' and "
                            "'code-interpreter-v1'.", config=True).tag(env="KERNELHUB_TEMPLATE_ALIASES")
    command_output_buffer_kib = Integer(1024, help="Output each command keeps for re-attaching (its last KiB of "
                                        "stdout and stderr together).", config=True).tag(
        env="KERNELHUB_COMMAND_OUTPUT_BUFFER_KIB")
    max_commands_per_sandbox = Integer(16, help="Commands that may run at once in one sandbox (never more than "
                                       "a quarter of its pids limit).", config=True).tag(
        env="KERNELHUB_MAX_COMMANDS_PER_SANDBOX")
    ended_commands_kept = Integer(16, help="Ended commands each sandbox remembers for status and re-attach.",
                                  config=True).tag(env="KERNELHUB_ENDED_COMMANDS_KEPT")
    command_kill_grace_s = Float(2.0, help="Seconds between SIGTERM and SIGKILL when a command reaches its "
                                 "timeout.", config=True).tag(env="KERNELHUB_COMMAND_KILL_GRACE_S")

    durable = Bool(True, help="Keep sandboxes, sessions, executions (outputs up to their cap) and the audit "
                   "log in <state-dir>/kernelhub.db, so that a gateway restarted on the same state directory "
                   "brings its sandboxes back (kernel memory excepted). False: memory only, no audit log.",
                   config=True).tag(env="KERNELHUB_DURABLE")
    ephemeral = Bool(False, help="Stop every sandbox for good when the gateway stops (SIGTERM, Ctrl-C) instead "
                     "of keeping them for the next start on this state directory.", config=True).tag(
        env="KERNELHUB_EPHEMERAL")
    audit_mirror = Unicode("audit.jsonl", help="File (under the state directory unless absolute) the audit log "
                           "is also appended to as JSON lines, for shipping elsewhere; empty: none.",
                           config=True).tag(env="KERNELHUB_AUDIT_MIRROR")
    audit_record_code = Bool(False, help="Keep the code of each audited execution in the audit log, not only "
                             "its SHA-256 and size.", config=True).tag(env="KERNELHUB_AUDIT_RECORD_CODE")
    audit_retention_days = Float(0.0, help="Days audit entries are kept in the database (0: for ever); the "
                                 "mirror file is never pruned.", config=True).tag(
        env="KERNELHUB_AUDIT_RETENTION_DAYS")
    audit_max_entries = Integer(0, help="Most audit entries kept in the database, the oldest pruned first (0: no "
                                "limit).", config=True).tag(env="KERNELHUB_AUDIT_MAX_ENTRIES")

    def __init__(self, factory: SandboxFactory, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.factory = factory
        self.kernel_spec_manager = KernelSpecManager(kernel_dirs=[str(KERNELSPECS_DIR)],
                                                     ensure_native_kernel=False)
        self.templates: dict[str, Template] = dict(BUILTIN_TEMPLATES)
        if self.extra_templates:
            self.templates.update(parse_templates(self.extra_templates))
        for alias, name in self.template_aliases.items():
            if not isinstance(name, str) or name not in self.templates:
                raise InvalidRequest(f"template alias {alias!r}: {name!r} is not a template; the templates are "
                                     f"{', '.join(sorted(self.templates))}.")
        self.defaults = resolve_limits(self.default_limits, Limits(), DEFAULT_MAXIMUM)
        self.maximum = resolve_limits(self.max_limits, DEFAULT_MAXIMUM, DEFAULT_MAXIMUM) \
            if self.max_limits else DEFAULT_MAXIMUM
        self.executions = StoreExecutionHistory(self.execution_history,
                                                int(self.execution_history_mb * 1024 * 1024))
        #: The durable store and the audit log, opened by :meth:`start` when ``durable``.
        self.store: Store | None = None
        self.audit: AuditLog | None = None
        self._pruner: asyncio.Task[None] | None = None
        self.pool = Pool(factory, self.kernel_spec_manager, self.templates,
                         {name: t.base_limits(self.defaults, self.maximum) for name, t in self.templates.items()},
                         parent=self)
        self.egress = EgressService(parent=self)
        self.egress.on_refusal = self._audit_refusal
        self.telemetry = Telemetry(lambda: self.sandboxes.all_records(), self.pool_state, self.egress.totals)
        self.sandboxes = Sandboxes(
            factory=factory, kernel_spec_manager=self.kernel_spec_manager, templates=self.templates,
            defaults=self.defaults, maximum=self.maximum, max_sandboxes_per_tenant=self.max_sandboxes_per_tenant,
            reap_interval=self.reap_interval, stopped_retention_s=self.stopped_retention_s,
            executions=self.executions, log=self.log, template_aliases=self.template_aliases,
            telemetry=self.telemetry, pool=self.pool, egress=self.egress, ephemeral=self.ephemeral,
            max_paused_per_tenant=max(0, self.max_paused_per_tenant))
        self.executor = Executor(self.sandboxes, self.executions, max_queued=max(1, self.max_queued_executions),
                                 max_queued_code_bytes=int(self.max_queued_code_mb * 1024 * 1024))
        self.commands = Commands(self.sandboxes, output_buffer_bytes=max(1, self.command_output_buffer_kib) * 1024,
                                 max_commands_per_sandbox=max(1, self.max_commands_per_sandbox),
                                 ended_kept=max(0, self.ended_commands_kept),
                                 kill_grace_s=max(0.0, self.command_kill_grace_s))
        self.tokens = SandboxTokens(self.sandboxes)
        self.websockets = TenantHolds(max(1, self.max_websockets_per_tenant), "open websockets")
        self.request_bodies = TenantHolds(max(1, int(self.max_request_body_mb_per_tenant * 1024 * 1024)),
                                          "of request bodies being received", " bytes")
        self.files = Files(self.sandboxes)
        self.jupyter = Kernels(self.sandboxes, self.templates)

        # What the surfaces call, by the names they call it: each is the one service method that does it.
        sandboxes, executor, files, jupyter = self.sandboxes, self.executor, self.files, self.jupyter
        self.list_templates = self.pool.list_templates
        self.create_sandbox = sandboxes.create_sandbox
        self.list_sandboxes = sandboxes.list_sandboxes
        self.get_sandbox = sandboxes.get_sandbox
        self.delete_sandbox = sandboxes.delete_sandbox
        self.update_sandbox = sandboxes.update_sandbox
        self.pause_sandbox = sandboxes.pause_sandbox
        self.resume_sandbox = sandboxes.resume_sandbox
        self.sandbox_logs = sandboxes.sandbox_logs
        self.sandbox_metrics = sandboxes.sandbox_metrics
        self.create_session = sandboxes.create_session
        self.get_session = sandboxes.get_session
        self.close_session = sandboxes.close_session
        self.restart_session = sandboxes.restart_session
        self.session_execute = executor.session_execute
        self.execute = executor.execute
        self.get_execution = executor.get_execution
        self.execution_status = executor.execution_status
        self.interrupt_execution = executor.interrupt_execution
        self.set_deadline = sandboxes.set_deadline
        commands = self.commands
        self.run_command = commands.run
        self.start_command = commands.start
        self.list_commands = commands.list
        self.get_command = commands.get
        self.find_command_tag = commands.find_tag
        self.command_stdin = commands.send_stdin
        self.signal_command = commands.signal
        self.kill_command = commands.kill
        self.sandbox_tokens = self.tokens.tokens_for
        self.sandbox_by_token = self.tokens.owner
        self.open_upload = files.open_upload
        self.open_download = files.open_download
        self.list_files = files.list_files
        self.delete_file = files.delete_file
        self.describe_file = files.describe_file
        self.describe_dir = files.describe_dir
        self.make_dir = files.make_dir
        self.move_file = files.move_file
        self.max_file_bytes = files.max_file_bytes
        self.start_kernel = jupyter.start_kernel
        self.kernels = jupyter.kernels
        self.get_kernel = jupyter.get_kernel
        self.interrupt_kernel = jupyter.interrupt_kernel
        self.restart_kernel = jupyter.restart_kernel
        self.shutdown_kernel = jupyter.shutdown_kernel
        self.hold_websocket = self.websockets.hold
        self.release_websocket = self.websockets.release
        self.hold_request_body = self.request_bodies.hold
        self.release_request_body = self.request_bodies.release

    async def start(self) -> None:
        """Called once the loop runs (by the app, or ``kernelhub mcp``): with ``durable``, opens the store and
        the audit log in the state directory (raises :class:`~kernelhub.errors.StoreError` for a database
        another gateway holds or a newer kernelhub wrote); then starts the sandboxes' service, which restores
        what the store records (:meth:`Sandboxes.start`)."""
        if self.durable:
            self.store = await Store.open(self.factory.state_dir, history_count=max(1, self.execution_history),
                                          history_bytes=max(1, int(self.execution_history_mb * 1024 * 1024)))
            try:
                self.audit = await AuditLog.open(
                    self.store, self.factory.state_dir, mirror_path=Path(self.audit_mirror) if self.audit_mirror
                    else None, record_code=self.audit_record_code,
                    retention_s=self.audit_retention_days * 86400 if self.audit_retention_days > 0 else None,
                    max_entries=self.audit_max_entries if self.audit_max_entries > 0 else None)
            except BaseException:
                await self.store.close()
                raise
            self.executions.store = self.store
            self.sandboxes.store = self.store
            self._pruner = asyncio.ensure_future(self._prune_audit())
        await self.sandboxes.start()

    async def _prune_audit(self) -> None:
        """Apply the audit log's retention (``audit_retention_days``, ``audit_max_entries``) every
        :data:`AUDIT_PRUNE_INTERVAL_S`; a failure is logged and retried at the next round."""
        while self.audit is not None:
            await asyncio.sleep(AUDIT_PRUNE_INTERVAL_S)
            try:
                await self.audit.prune()
            except KernelHubError as exc:
                self.log.error("pruning the audit log failed: %s", exc)

    async def shutdown(self) -> None:
        """Called on exit: stops (or, durable and not ``ephemeral``, keeps for the next start) every sandbox
        (:meth:`Sandboxes.shutdown`), then closes the audit log and the store."""
        if self._pruner is not None:
            self._pruner.cancel()
        try:
            await self.sandboxes.shutdown()
        finally:
            if self.audit is not None:
                await self.audit.close()
            if self.store is not None:
                await self.store.close()

    def record_action(self, tenant: Tenant | None, key: str | None, action: str,
                      ids: Mapping[str, object] | None, status: int, error: str | None = None,
                      code: str | None = None) -> None:
        """Put one action that ended in the audit log (:meth:`AuditLog.record`): who (``tenant``; ``key`` is
        turned into its fingerprint here and never kept), ``action`` (a route such as ``"POST
        /v1/sandboxes"`` or an MCP tool name), the ``ids`` it touched, its outcome (``status`` as HTTP,
        ``error`` code) and the ``code`` it ran (kept as SHA-256 and size). Does nothing without an audit log
        (``durable`` off) or once it closed; never raises for a failure to store (that is logged)."""
        if self.audit is None or self.store is None or self.store.closed:
            return
        key_id = self.audit.fingerprint(key) if key else None
        self.audit.record(tenant.name if tenant is not None else None, key_id, action, ids,
                          status if 100 <= status <= 599 else 500, error, code)

    def _audit_refusal(self, refusal: Refusal, left_out: int) -> None:
        """An egress refusal as an audit entry of the sandbox's tenant (issue 12: "in the audit log where there is
        one"): action ``egress``, the request in ``ids`` (``method``, ``target``, ``reason``, and ``left_out``,
        how many of the sandbox's refusals before it the egress service's budget kept out of the log, when
        any), ``status`` what the sandbox was answered, ``error`` ``egress_denied``. No key: the sandbox's code
        asked, not an API caller."""
        record = self.sandboxes.find(refusal.sandbox_id)
        if record is None:
            return
        ids = {"sandbox_id": refusal.sandbox_id, "method": refusal.method or None, "target": refusal.target or None,
               "reason": refusal.reason, "left_out": str(left_out) if left_out else None}
        self.record_action(record.tenant, None, "egress", ids, refusal.status, "egress_denied")

    async def read_audit(self, tenant: Tenant, since: object = None, limit: object = None,
                         cursor: object = None) -> dict[str, Any]:
        """``GET /v1/audit``: the tenant's own entries, paged (:meth:`AuditLog.read` gives the shape). Raises
        :class:`~kernelhub.errors.AuditUnavailable` (409) when this gateway keeps no audit log, and
        :class:`~kernelhub.errors.InvalidRequest` for a bad ``since``, ``limit`` or ``cursor``."""
        if self.audit is None:
            raise AuditUnavailable("This gateway keeps no audit log (it runs with --Hub.durable=False).")
        return await self.audit.read(tenant.name, since, limit, cursor)

    def pool_state(self) -> PoolState | None:
        """What the metrics show of the warm pool: ``self.pool.state()`` (per template ``{ready, starting,
        size}``, see :data:`~kernelhub.services.telemetry.PoolState`) when this hub has a pool, else None."""
        pool = getattr(self, "pool", None)
        return pool.state() if pool is not None else None

    def health(self) -> list[str]:
        """``GET /healthz``: why this gateway could not start a sandbox now (empty when it can). Cheap: a few
        ``stat`` calls (:meth:`SandboxFactory.health`), no sandbox started."""
        return self.factory.health()
