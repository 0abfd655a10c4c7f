"""The service layer's front door: sandboxes, sessions, executions, commands, files, logs and metrics, by tenant.

Every surface (REST, websockets, the Jupyter API, MCP) calls a :class:`Hub` method and shapes its answer; no
policy lives in a surface. Every method takes the calling :class:`~kernelhub.services.tenants.Tenant` and
answers :class:`~kernelhub.errors.NotFound` for ids of other tenants.

Room for later work: :meth:`Hub._provision` is the one place a sandbox comes from (a warm pool overrides it),
and :class:`SandboxRecord` is the registry entry a durable store would persist.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import Mapping
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from traitlets import Dict, Float, Integer, Unicode
from traitlets.config import LoggingConfigurable

from ..errors import Conflict, InvalidRequest, NotFound, QuotaExceeded
from ..models import iso
from ..sandbox import bwrap
from ..sandbox.limits import DEFAULT_MAXIMUM, Limits, resolve_limits
from ..sandbox.provisioner import KERNELSPECS_DIR
from ..sandbox.sandbox import Sandbox, SandboxFactory
from ..sandbox.workspace import UploadWriter
from .commands import run_command
from .executions import Execution, ExecutionHistory, InputHandler, Listener
from .sessions import KERNELSPECS, LANGUAGES, JupyterSession
from .tenants import Tenant

#: Session types (API.md).
SESSION_TYPES = ("jupyter", "terminal")
MAX_METADATA_BYTES = 16 * 1024
MAX_CODE_BYTES = 2 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Template:
    """A named blueprint for a sandbox: the language of its first kernel, default limits, network mode."""

    name: str
    language: str
    limits: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    network: str = "none"
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "language": self.language, "limits": dict(self.limits),
                "network": self.network, "description": self.description}


BUILTIN_TEMPLATES = {
    "python": Template("python", "python", description="Python 3 (ipykernel) with numpy, pandas, matplotlib"),
    "node": Template("node", "node", description="JavaScript and TypeScript (tslab)"),
    "bash": Template("bash", "bash", description="Bash (bash_kernel)"),
}


class SandboxRecord:
    """The registry's entry for one sandbox: who owns it, its state, sessions and activity."""

    def __init__(self, sandbox_id: str, tenant: Tenant, template: Template, limits: Limits,
                 metadata: dict[str, Any]) -> None:
        self.id = sandbox_id
        self.tenant = tenant
        self.template = template
        self.limits = limits
        self.metadata = metadata
        self.sandbox: Sandbox | None = None
        self.state = "starting"
        self.reason: str | None = None
        self.created_at = time.time()
        self.expires_at = self.created_at + limits.max_lifetime_s
        self.last_activity = self.created_at
        self.sessions: dict[str, Any] = {}
        self.busy = 0
        self.jupyter_api = False

    def touch(self) -> None:
        self.last_activity = time.time()

    @property
    def running_anything(self) -> bool:
        # A kernel busy with code a Jupyter client sent straight over its websocket counts as running too.
        return self.busy > 0 or any(getattr(s, "busy", False) or getattr(s, "execution_state", None) == "busy"
                                    for s in self.sessions.values())

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
        }
        if self.reason:
            out["reason"] = self.reason
        return out


def _check_env(env: Any, what: str = "env") -> dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, dict):
        raise InvalidRequest(f"{what} must be a JSON object of strings.")
    if len(env) > 256:
        raise InvalidRequest(f"{what} may hold at most 256 variables.")
    out = {}
    for key, value in env.items():
        if not isinstance(key, str) or not bwrap.valid_env_name(key):
            raise InvalidRequest(f"{what}: {str(key)[:64]!r} is not an allowed environment variable name.")
        if not isinstance(value, str):
            raise InvalidRequest(f"{what}.{key} must be a string.")
        if "\x00" in value or len(value) > 32768:
            raise InvalidRequest(f"{what}.{key} must be at most 32768 characters without NUL bytes.")
        out[key] = value
    return out


def _check_timeout(value: Any, limit: float) -> float:
    if value is None:
        return limit
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise InvalidRequest("timeout_s must be a number of seconds.")
    if value <= 0:
        raise InvalidRequest("timeout_s must be positive.")
    if value > limit:
        raise InvalidRequest(f"timeout_s may be at most {limit:g} for this sandbox (its execution_timeout_s).")
    return float(value)


class Hub(LoggingConfigurable):
    """Owns every sandbox of every tenant. Created by the app (or in-process by ``kernelhub mcp``)."""

    default_limits = Dict(help="Limits a sandbox gets when the request names none (API.md names).",
                          config=True)
    max_limits = Dict(help="The most a request may ask for, per limit (API.md names).", config=True)
    max_sandboxes_per_tenant = Integer(20, help="Live sandboxes a tenant may have at once, starting ones "
                                       "included (KERNELHUB_MAX_SANDBOXES_PER_TENANT env var).", config=True)
    execution_history = Integer(1000, help="Finished executions kept for execution_status.", config=True)
    reap_interval = Float(1.0, help="Seconds between idle/lifetime checks.", config=True)
    templates_json = Unicode("", help="Extra templates as a JSON object {name: {language, limits, network, "
                             "env, description}} (KERNELHUB_TEMPLATES env var).", config=True)
    stopped_retention_s = Float(3600.0, help="How long a stopped sandbox stays visible with its reason.",
                                config=True)

    def __init__(self, factory: SandboxFactory, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.factory = factory
        self.kernel_spec_manager = KernelSpecManager(kernel_dirs=[str(KERNELSPECS_DIR)],
                                                     ensure_native_kernel=False)
        self.templates: dict[str, Template] = dict(BUILTIN_TEMPLATES)
        if self.templates_json:
            self.templates.update(self._parse_templates(self.templates_json))
        self.defaults = resolve_limits(self.default_limits, Limits(), DEFAULT_MAXIMUM)
        self.maximum = resolve_limits(self.max_limits, DEFAULT_MAXIMUM, DEFAULT_MAXIMUM) \
            if self.max_limits else DEFAULT_MAXIMUM
        self._records: dict[str, SandboxRecord] = {}
        self._sessions: dict[str, tuple[SandboxRecord, Any]] = {}
        self._pending: dict[str, int] = {}
        self.executions = ExecutionHistory(self.execution_history)
        self._reaper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    @staticmethod
    def _parse_templates(text: str) -> dict[str, Template]:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InvalidRequest(f"templates are not valid JSON: {exc}") from None
        out = {}
        for name, spec in data.items():
            language = spec.get("language", "python")
            if language not in LANGUAGES:
                raise InvalidRequest(f"template {name!r}: unknown language {language!r}")
            out[name] = Template(name, language, spec.get("limits", {}), spec.get("network", "none"),
                                 spec.get("env", {}), spec.get("description", ""))
        return out

    # -- lifecycle --------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Called by the app once the loop runs: reaps what a crash left, starts the idle/lifetime reaper."""
        await self.factory.reap_stale()
        self._reaper = asyncio.ensure_future(self._reap_loop())

    async def shutdown(self) -> None:
        """Called by the app on exit: stops every sandbox (no process, cgroup, mount or uid is left)."""
        if self._reaper is not None:
            self._reaper.cancel()
        await asyncio.gather(*(self._stop_record(r, "shutdown") for r in list(self._records.values())),
                             return_exceptions=True)
        await self.factory.stop_all()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
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
                        if now >= record.expires_at:
                            await self._stop_record(record, "lifetime")
                        elif (not record.running_anything
                              and now - record.last_activity >= record.limits.idle_timeout_s):
                            await self._stop_record(record, "idle")
                    elif record.state in ("stopped", "failed") and record.sandbox is None and \
                            now - record.last_activity > self.stopped_retention_s:
                        self._records.pop(record.id, None)
                except Exception:
                    self.log.exception("reaping %s failed", record.id)

    # -- sandboxes --------------------------------------------------------------------------------------

    def _live_count(self, tenant: Tenant) -> int:
        return sum(1 for r in self._records.values()
                   if r.tenant == tenant and r.state in ("starting", "running"))

    async def _provision(self, limits: Limits, env: dict[str, str]) -> Sandbox:
        """Where every sandbox comes from; a warm pool would hand out a pre-started one here."""
        return await self.factory.create(limits=limits, env=env)

    async def create_sandbox(self, tenant: Tenant, template: Any = "python", limits: Any = None,
                             env: Any = None, metadata: Any = None, network: Any = None,
                             *, kernel_language: str | None = None) -> SandboxRecord:
        """``sandbox_create``: a running sandbox with one jupyter session of its template's language."""
        if template is None:
            template = "python"
        if not isinstance(template, str) or template not in self.templates:
            raise InvalidRequest(f"Unknown template {template!r}; known templates are "
                                 f"{', '.join(sorted(self.templates))}.")
        tmpl = self.templates[template]
        base = resolve_limits(tmpl.limits, self.defaults, self.maximum) if tmpl.limits else self.defaults
        resolved = resolve_limits(limits, base, self.maximum)
        env_vars = {**tmpl.env, **_check_env(env)}
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict):
            raise InvalidRequest("metadata must be a JSON object.")
        if len(json.dumps(metadata)) > MAX_METADATA_BYTES:
            raise InvalidRequest(f"metadata may be at most {MAX_METADATA_BYTES} bytes of JSON.")
        network = tmpl.network if network is None else network
        if network != "none":
            raise InvalidRequest(f"Network mode {network!r} is not available on this gateway; sandboxes reach "
                                 "only their own loopback (network: \"none\").")
        language = kernel_language or tmpl.language
        if language not in KERNELSPECS:
            raise InvalidRequest(f"Unknown language {language!r}.")
        name = tenant.name
        if self._live_count(tenant) + self._pending.get(name, 0) >= self.max_sandboxes_per_tenant:
            raise QuotaExceeded(f"Tenant {name!r} already has {self.max_sandboxes_per_tenant} live sandboxes; "
                                "delete one first.")
        self._pending[name] = self._pending.get(name, 0) + 1
        sandbox: Sandbox | None = None
        try:
            sandbox = await self._provision(resolved, env_vars)
            record = SandboxRecord(sandbox.id, tenant, tmpl, resolved, metadata)
            record.sandbox = sandbox
            sandbox.on_exit.append(lambda sb: self._on_sandbox_exit(record))
            self._records[record.id] = record
            session = JupyterSession(sandbox, language, self.kernel_spec_manager)
            record.sessions[session.id] = session
            self._sessions[session.id] = (record, session)
            await session.start()
            record.state = "running"
            record.touch()
            return record
        except BaseException:
            if sandbox is not None:
                record_ = self._records.get(sandbox.id)
                if record_ is not None:
                    await self._stop_record(record_, "failed")
                    self._records.pop(sandbox.id, None)
                else:
                    await sandbox.stop("failed")
            raise
        finally:
            self._pending[name] -= 1

    def _on_sandbox_exit(self, record: SandboxRecord) -> None:
        sb = record.sandbox
        if record.state in ("starting", "running"):
            record.state = "failed"
            record.reason = (sb.reason if sb else None) or "failed"
            self._spawn(self._stop_record(record, record.reason))

    def list_sandboxes(self, tenant: Tenant) -> list[SandboxRecord]:
        return [r for r in self._records.values() if r.tenant == tenant]

    def get_sandbox(self, tenant: Tenant, sandbox_id: Any) -> SandboxRecord:
        record = self._records.get(sandbox_id) if isinstance(sandbox_id, str) else None
        if record is None or record.tenant != tenant:
            raise NotFound(f"No sandbox {str(sandbox_id)[:64]!r}.")
        return record

    def _running(self, tenant: Tenant, sandbox_id: Any) -> tuple[SandboxRecord, Sandbox]:
        record = self.get_sandbox(tenant, sandbox_id)
        if record.state != "running" or record.sandbox is None:
            reason = f" ({record.reason})" if record.reason else ""
            raise Conflict(f"Sandbox {record.id} is {record.state}{reason}.", error="sandbox_not_running")
        record.touch()
        return record, record.sandbox

    async def _stop_record(self, record: SandboxRecord, reason: str | None) -> None:
        if record.state in ("starting", "running"):
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
        sandbox, record.sandbox = record.sandbox, None
        if sandbox is not None:
            await sandbox.stop(reason)
        record.touch()

    async def delete_sandbox(self, tenant: Tenant, sandbox_id: Any) -> None:
        """``sandbox_delete``: kill everything, free every resource, forget the sandbox."""
        record = self.get_sandbox(tenant, sandbox_id)
        await self._stop_record(record, "deleted")
        self._records.pop(record.id, None)

    def sandbox_logs(self, tenant: Tenant, sandbox_id: Any, lines: Any = 100) -> list[str]:
        record = self.get_sandbox(tenant, sandbox_id)
        try:
            n = int(lines)
        except (TypeError, ValueError):
            raise InvalidRequest("lines must be a whole number.") from None
        if not 0 <= n <= 10000:
            raise InvalidRequest("lines must be between 0 and 10000.")
        record.touch()
        return record.sandbox.logs(n) if record.sandbox is not None else []

    def sandbox_metrics(self, tenant: Tenant, sandbox_id: Any) -> dict[str, Any]:
        record = self.get_sandbox(tenant, sandbox_id)
        record.touch()
        if record.sandbox is None:
            raise Conflict(f"Sandbox {record.id} is {record.state}.", error="sandbox_not_running")
        return record.sandbox.metrics()

    # -- sessions ---------------------------------------------------------------------------------------

    async def create_session(self, tenant: Tenant, sandbox_id: Any, type: Any = "jupyter",
                             language: Any = None) -> Any:
        """``session_create``: another kernel (any language) or a terminal in the same sandbox."""
        record, sandbox = self._running(tenant, sandbox_id)
        if type not in SESSION_TYPES:
            raise InvalidRequest(f"type must be one of {', '.join(SESSION_TYPES)}.")
        if len(record.sessions) >= 16:
            raise QuotaExceeded("A sandbox may hold at most 16 sessions.")
        session: Any
        if type == "jupyter":
            lang = language or record.template.language
            if lang not in KERNELSPECS:
                raise InvalidRequest(f"Unknown language {lang!r}; use one of {', '.join(LANGUAGES)}.")
            session = JupyterSession(sandbox, lang, self.kernel_spec_manager)
        else:
            if language is not None:
                raise InvalidRequest("language applies only to jupyter sessions.")
            from .terminals import TerminalSession

            session = TerminalSession(sandbox)
        record.busy += 1
        try:
            await session.start()
        finally:
            record.busy -= 1
        record.sessions[session.id] = session
        self._sessions[session.id] = (record, session)
        record.touch()
        return session

    def get_session(self, tenant: Tenant, session_id: Any) -> tuple[SandboxRecord, Any]:
        found = self._sessions.get(session_id) if isinstance(session_id, str) else None
        if found is None or found[0].tenant != tenant:
            raise NotFound(f"No session {str(session_id)[:64]!r}.")
        found[0].touch()
        return found

    async def close_session(self, tenant: Tenant, session_id: Any) -> None:
        record, session = self.get_session(tenant, session_id)
        self._sessions.pop(session.id, None)
        record.sessions.pop(session.id, None)
        await session.close()

    async def session_execute(self, tenant: Tenant, session_id: Any, input: Any, timeout_s: Any = None,
                              listener: Listener | None = None) -> Any:
        """``session_execute``: code in a jupyter session (an execution) or keystrokes to a terminal."""
        record, session = self.get_session(tenant, session_id)
        if not isinstance(input, str):
            raise InvalidRequest("input must be a string.")
        if session.type == "terminal":
            timeout = _check_timeout(timeout_s, record.limits.execution_timeout_s) if timeout_s else 1.0
            record.busy += 1
            try:
                return await session.execute(input, timeout)
            finally:
                record.busy -= 1
                record.touch()
        return await self.execute(tenant, record.id, input, session_id=session.id, timeout_s=timeout_s,
                                  listener=listener)

    # -- executions -------------------------------------------------------------------------------------

    async def _pick_session(self, record: SandboxRecord, language: Any, session_id: Any) -> JupyterSession:
        if session_id is not None:
            found = self._sessions.get(session_id) if isinstance(session_id, str) else None
            if found is None or found[0] is not record:
                raise NotFound(f"No session {str(session_id)[:64]!r} in sandbox {record.id}.")
            session = found[1]
            if session.type != "jupyter":
                raise InvalidRequest("Code runs in jupyter sessions; use session_execute for terminals.")
            if language is not None and language not in (session.language,) and \
                    not (language == "javascript" and session.language == "node"):
                raise InvalidRequest(f"Session {session.id} runs {session.language}, not {language}.")
            return session
        jupyter = [s for s in record.sessions.values() if s.type == "jupyter" and s.state != "closed"]
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
        session = await self.create_session(record.tenant, record.id, "jupyter", lang)
        assert isinstance(session, JupyterSession)
        return session

    async def execute(self, tenant: Tenant, sandbox_id: Any, code: Any, language: Any = None,
                      session_id: Any = None, timeout_s: Any = None, env: Any = None,
                      *, listener: Listener | None = None, input_handler: InputHandler | None = None,
                      wait: bool = True) -> Execution:
        """``code_execute`` (``wait=True``: answers when it ended) and ``code_execute_async``."""
        record, sandbox = self._running(tenant, sandbox_id)
        if not isinstance(code, str):
            raise InvalidRequest("code must be a string.")
        if len(code.encode()) > MAX_CODE_BYTES:
            raise InvalidRequest(f"code may be at most {MAX_CODE_BYTES} bytes.")
        timeout = _check_timeout(timeout_s, record.limits.execution_timeout_s)
        env_vars = _check_env(env)
        record.busy += 1
        try:
            session = await self._pick_session(record, language, session_id)
        except BaseException:
            record.busy -= 1
            raise
        ex = Execution(tenant=tenant.name, sandbox_id=record.id, session_id=session.id, code=code,
                       timeout_s=timeout, output_limit=record.limits.output_bytes)
        ex.input_handler = input_handler
        if listener is not None:
            ex.add_listener(listener)
        self.executions.add(ex)

        async def run() -> None:
            try:
                await session.execute(ex, env_vars)
            finally:
                record.busy -= 1
                record.touch()
                self.executions._trim()

        if not wait:
            self._spawn(run())
            return ex
        task = self._spawn(run())
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            # The caller went away (a disconnected stream): interrupt what it started.
            if not ex.ended:
                self._spawn(self._interrupt(session, ex))
            raise
        return ex

    async def _interrupt(self, session: JupyterSession, ex: Execution) -> None:
        """A queued execution ends ``killed``/``cancelled``; a running one is interrupted, escalating to a
        kernel restart (``killed``/``interrupted``, state lost) if the kernel ignores the signal."""
        if ex.status == "queued":
            await ex.finish("killed", "cancelled")
        elif ex.status == "running":
            with contextlib.suppress(Exception):
                await session.interrupt(escalate=True)

    def get_execution(self, tenant: Tenant, execution_id: Any) -> Execution:
        if not isinstance(execution_id, str):
            raise NotFound("No such execution.")
        ex = self.executions.get(tenant.name, execution_id)
        record = self._records.get(ex.sandbox_id)
        if record is not None:
            record.touch()
        return ex

    async def interrupt_execution(self, tenant: Tenant, execution_id: Any) -> Execution:
        ex = self.get_execution(tenant, execution_id)
        found = self._sessions.get(ex.session_id)
        if found is not None and not ex.ended:
            await self._interrupt(found[1], ex)
        return ex

    # -- commands and files -----------------------------------------------------------------------------

    async def run_command(self, tenant: Tenant, sandbox_id: Any, command: Any, cwd: Any = None,
                          env: Any = None, timeout_s: Any = None, stdin: Any = None) -> dict[str, Any]:
        """``command_execute``: bash in the sandbox as its uid, in /workspace unless ``cwd`` says otherwise."""
        record, sandbox = self._running(tenant, sandbox_id)
        if not isinstance(command, str):
            raise InvalidRequest("command must be a string.")
        if cwd is not None and (not isinstance(cwd, str) or "\x00" in cwd or len(cwd) > 4096):
            raise InvalidRequest("cwd must be a path string.")
        if stdin is not None and not isinstance(stdin, str):
            raise InvalidRequest("stdin must be a string.")
        timeout = _check_timeout(timeout_s, record.limits.execution_timeout_s)
        record.busy += 1
        try:
            return await run_command(sandbox, command, cwd=cwd, env=_check_env(env), timeout_s=timeout,
                                     stdin=stdin, output_limit=record.limits.output_bytes)
        finally:
            record.busy -= 1
            record.touch()

    def _workspace(self, tenant: Tenant, sandbox_id: Any) -> Any:
        record, sandbox = self._running(tenant, sandbox_id)
        assert sandbox.workspace is not None
        return sandbox.workspace

    def open_upload(self, tenant: Tenant, sandbox_id: Any, path: Any) -> UploadWriter:
        """``file_upload``: a writer the surface feeds chunk by chunk, then ``finish()``es."""
        if not isinstance(path, str):
            raise InvalidRequest("path must be a string.")
        return UploadWriter(self._workspace(tenant, sandbox_id), path)

    def open_download(self, tenant: Tenant, sandbox_id: Any, path: Any) -> tuple[int, int]:
        """``file_download``: an open fd (the caller closes it) and the file's size."""
        if not isinstance(path, str):
            raise InvalidRequest("path must be a string.")
        fd, st = self._workspace(tenant, sandbox_id).open_read(path)
        return fd, st.st_size

    def list_files(self, tenant: Tenant, sandbox_id: Any, path: Any = "") -> list[dict[str, Any]]:
        if not isinstance(path, str):
            raise InvalidRequest("path must be a string.")
        return self._workspace(tenant, sandbox_id).list_dir(path)

    def delete_file(self, tenant: Tenant, sandbox_id: Any, path: Any) -> None:
        if not isinstance(path, str) or not path.strip("/"):
            raise InvalidRequest("path must name a file or directory inside the workspace.")
        self._workspace(tenant, sandbox_id).delete(path)

    def max_file_bytes(self, tenant: Tenant, sandbox_id: Any) -> int:
        record = self.get_sandbox(tenant, sandbox_id)
        return record.limits.max_file_mb * 1024 * 1024

    # -- the Jupyter API: one sandbox per kernel ------------------------------------------------------

    def template_for_kernelspec(self, name: Any) -> str:
        for language, spec in KERNELSPECS.items():
            if spec == name and language != "javascript":
                return language
        raise NotFound(f"No kernelspec {str(name)[:64]!r}.")

    async def start_kernel(self, tenant: Tenant, kernel_name: Any,
                           env: Any = None) -> tuple[SandboxRecord, JupyterSession]:
        """``POST /api/kernels``: a new sandbox whose first session runs that kernelspec. Of ``env``, only
        ``KERNEL_*`` variables reach the kernel, as with the Jupyter Kernel Gateway (Jupyter Server in gateway
        mode sends its own environment's ``KERNEL_*`` variables, e.g. ``KERNEL_USERNAME``)."""
        if env is not None and not isinstance(env, dict):
            raise InvalidRequest("env must be a JSON object of strings.")
        kernel_env = _check_env({k: v for k, v in (env or {}).items()
                                 if isinstance(k, str) and k.startswith("KERNEL_")})
        language = self.template_for_kernelspec(kernel_name or "kernelhub-python")
        template = language if language in self.templates else "python"
        if language == "typescript":
            template = "node"
        record = await self.create_sandbox(tenant, template, env=kernel_env, kernel_language=language)
        record.jupyter_api = True
        session = next(iter(record.sessions.values()))
        return record, session

    def kernels(self, tenant: Tenant) -> list[tuple[SandboxRecord, JupyterSession]]:
        out = []
        for record in self._records.values():
            if record.tenant == tenant and record.jupyter_api and record.state == "running":
                for s in record.sessions.values():
                    if s.type == "jupyter":
                        out.append((record, s))
        return out

    def get_kernel(self, tenant: Tenant, kernel_id: Any) -> tuple[SandboxRecord, JupyterSession]:
        for record, session in self.kernels(tenant):
            if session.kernel_id == kernel_id:
                record.touch()
                return record, session
        raise NotFound(f"No kernel {str(kernel_id)[:64]!r}.")

    async def interrupt_kernel(self, tenant: Tenant, kernel_id: Any) -> None:
        """``POST /api/kernels/{id}/interrupt``: SIGINT to the kernel; it keeps its state."""
        _, session = self.get_kernel(tenant, kernel_id)
        await session.interrupt()

    async def restart_kernel(self, tenant: Tenant, kernel_id: Any) -> tuple[SandboxRecord, JupyterSession]:
        """``POST /api/kernels/{id}/restart``: a fresh kernel process in the same sandbox, same id and sockets."""
        record, session = self.get_kernel(tenant, kernel_id)
        record.busy += 1
        try:
            await session.restart()
        finally:
            record.busy -= 1
            record.touch()
        return record, session

    async def shutdown_kernel(self, tenant: Tenant, kernel_id: Any) -> None:
        """``DELETE /api/kernels/{id}``: the kernel's sandbox goes with it (one sandbox per kernel)."""
        record, _ = self.get_kernel(tenant, kernel_id)
        await self.delete_sandbox(tenant, record.id)
