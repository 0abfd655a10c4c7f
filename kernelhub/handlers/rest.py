"""The ``/v1`` REST surface (API.md, "REST" and the NDJSON half of "Streaming").

Every handler parses the request, calls one :class:`~kernelhub.services.hub.Hub` method and shapes the answer;
no policy lives here. Errors are :class:`~kernelhub.errors.KernelHubError` subclasses, turned into
``{"error", "message"}`` by :class:`~kernelhub.handlers.base.BaseHandler`.

Request bodies are read by :class:`~kernelhub.handlers.base.BaseHandler`, streamed in and capped at
:data:`~kernelhub.handlers.base.MAX_JSON_BODY` (file uploads stream to the workspace instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tornado import iostream
from tornado.http1connection import HTTP1Connection

from ..errors import KernelHubError, PayloadTooLarge
from ..models import (
    parse_execute,
    parse_sandbox_create,
    parse_sandbox_update,
    parse_session_create,
    parse_session_input,
)
from ..sandbox.files import path_fields
from ..services.executions import Execution, Listener
from .base import MAX_JSON_BODY, BaseHandler, json_text
from .streaming import send_download

if TYPE_CHECKING:
    from ..sandbox.files import UploadWriter

#: The OpenAPI document kept in the repository and served at ``/v1/openapi.json``.
OPENAPI_PATH = Path(__file__).resolve().parent.parent / "openapi.json"
NDJSON = "application/x-ndjson"
#: Seconds of silence after which an NDJSON stream gets a ``{"type": "keepalive"}`` line.
KEEPALIVE_S = 10.0

ID = r"([^/]+)"


# -- content negotiation (requests are parsed by kernelhub.models) ----------------------------------------

def wants_ndjson(accept: str) -> bool:
    return any(part.split(";")[0].strip().lower() == NDJSON for part in accept.split(","))


# -- handler bases ----------------------------------------------------------------------------------------

class StreamingExecutionHandler(BaseHandler):
    """Runs one execution for a request: answered whole when it ended, or as NDJSON events while it runs.

    The hub call runs in a task of its own, cancelled when the client goes away: ``Hub.execute(wait=True)``
    then interrupts the execution (API.md: "a client that disconnects mid-run gets its execution interrupted").
    """

    _task: asyncio.Future[Any] | None = None
    _gone = False

    def on_connection_close(self) -> None:
        self._gone = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
        super().on_connection_close()

    async def run_execution(self, call: Callable[[Listener | None], Awaitable[Any]],
                            shape: Callable[[Any], Any]) -> None:
        if wants_ndjson(self.request.headers.get("Accept", "")):
            await self._run_streamed(call)
            return
        self._task = asyncio.ensure_future(call(None))
        try:
            result = await self._task
        except asyncio.CancelledError:
            if self._gone:
                return
            raise
        self.send_json(shape(result))

    async def _run_streamed(self, call: Callable[[Listener | None], Awaitable[Any]]) -> None:
        lock = asyncio.Lock()
        loop = asyncio.get_running_loop()
        state = {"last": loop.time(), "started": False, "ended": False}

        async def emit(event: dict[str, Any]) -> None:
            async with lock:
                if self._gone:
                    raise iostream.StreamClosedError()
                if not state["started"]:
                    state["started"] = True
                    self.set_status(200)
                    self.set_header("Content-Type", NDJSON + "; charset=UTF-8")
                    self.set_header("X-Accel-Buffering", "no")
                    if isinstance(self.request.connection, HTTP1Connection):
                        # KERNELS.md: no Nagle delay on streamed answers.
                        self.request.connection.stream.set_nodelay(True)
                if event.get("type") == "end":
                    state["ended"] = True
                self.write(json_text(event) + "\n")
                state["last"] = loop.time()
                await self.flush()

        async def keepalive() -> None:
            while True:
                await asyncio.sleep(KEEPALIVE_S - (loop.time() - state["last"]))
                if loop.time() - state["last"] >= KEEPALIVE_S - 0.05:
                    await emit({"type": "keepalive"})

        self._task = asyncio.ensure_future(call(emit))
        pinger = asyncio.ensure_future(keepalive())
        try:
            result = await self._task
        except asyncio.CancelledError:
            if self._gone:
                return
            raise
        except KernelHubError as exc:
            if not state["started"]:
                raise  # nothing sent yet: an ordinary JSON error with its status
            with contextlib.suppress(Exception):
                await emit({"type": "end", "execution": None, "error": exc.error, "message": exc.message})
            self.finish()
            return
        finally:
            pinger.cancel()
            with contextlib.suppress(BaseException):
                await pinger
        if not state["ended"] and isinstance(result, Execution):
            # The listener was dropped on a write error (or it ended before it was listened to): the contract
            # says "always last end".
            with contextlib.suppress(Exception):
                await emit({"type": "end", "execution_id": result.id, "execution": result.to_dict()})
        if not state["started"] and not isinstance(result, Execution):
            # A terminal session's input gives no events: its {output} is the end line.
            with contextlib.suppress(Exception):
                await emit({"type": "end", **(result if isinstance(result, dict) else {"output": result})})
        if not self._finished and not self._gone:
            self.finish()


# -- sandboxes --------------------------------------------------------------------------------------------

class SandboxesHandler(BaseHandler):
    """``POST /v1/sandboxes`` (sandbox_create) and ``GET /v1/sandboxes`` (sandbox_list)."""

    async def post(self) -> None:
        req = parse_sandbox_create(self.json_body(required=False))
        record = await self.hub.create_sandbox(self.tenant, template=req.template, limits=req.limits, env=req.env,
                                               metadata=req.metadata, network=req.network, on_idle=req.on_idle)
        self.set_header("Location", f"/v1/sandboxes/{record.id}")
        self.send_json(record.to_dict(), 201)

    def get(self) -> None:
        self.send_json({"sandboxes": [r.to_dict() for r in self.hub.list_sandboxes(self.tenant)]})


class SandboxHandler(BaseHandler):
    """``GET /v1/sandboxes/{id}`` (sandbox_info), ``PATCH`` (sandbox_update: its network policy) and ``DELETE``
    (sandbox_delete)."""

    def get(self, sandbox_id: str) -> None:
        self.send_json(self.hub.get_sandbox(self.tenant, sandbox_id).to_dict())

    async def patch(self, sandbox_id: str) -> None:
        network = parse_sandbox_update(self.json_body())
        record = await self.hub.update_sandbox(self.tenant, sandbox_id, network)
        self.send_json(record.to_dict())

    async def delete(self, sandbox_id: str) -> None:
        await self.hub.delete_sandbox(self.tenant, sandbox_id)
        self.set_status(204)
        self.finish()


class LogsHandler(BaseHandler):
    """``GET /v1/sandboxes/{id}/logs?lines=N`` (sandbox_logs)."""

    def get(self, sandbox_id: str) -> None:
        lines = self.get_query_argument("lines", "100")
        self.send_json({"lines": self.hub.sandbox_logs(self.tenant, sandbox_id, lines)})


class MetricsHandler(BaseHandler):
    """``GET /v1/sandboxes/{id}/metrics`` (sandbox_metrics)."""

    def get(self, sandbox_id: str) -> None:
        self.send_json(self.hub.sandbox_metrics(self.tenant, sandbox_id))


class TemplatesHandler(BaseHandler):
    """``GET /v1/templates``: the templates sandbox_create accepts (an extension of API.md)."""

    def get(self) -> None:
        self.send_json({"templates": self.hub.list_templates()})


# -- executions -------------------------------------------------------------------------------------------

class ExecuteHandler(StreamingExecutionHandler):
    """``POST /v1/sandboxes/{id}/execute`` (code_execute), whole or as NDJSON events."""

    async def post(self, sandbox_id: str) -> None:
        req = parse_execute(self.json_body())

        def call(listener: Listener | None) -> Awaitable[Execution]:
            return self.hub.execute(self.tenant, sandbox_id, listener=listener, wait=True, **vars(req))

        await self.run_execution(call, lambda ex: ex.to_dict())


class ExecutionsHandler(BaseHandler):
    """``POST /v1/sandboxes/{id}/executions`` (code_execute_async): 202 ``{id, status}``."""

    async def post(self, sandbox_id: str) -> None:
        req = parse_execute(self.json_body())
        ex = await self.hub.execute(self.tenant, sandbox_id, wait=False, **vars(req))
        self.set_header("Location", f"/v1/executions/{ex.id}")
        self.send_json({"id": ex.id, "status": ex.status}, 202)


class ExecutionHandler(BaseHandler):
    """``GET /v1/executions/{id}`` (execution_status)."""

    async def get(self, execution_id: str) -> None:
        self.send_json(await self.hub.execution_status(self.tenant, execution_id))


class ExecutionInterruptHandler(BaseHandler):
    """``POST /v1/executions/{id}/interrupt``: stop a queued or running execution (an extension)."""

    async def post(self, execution_id: str) -> None:
        ex = await self.hub.interrupt_execution(self.tenant, execution_id)
        self.send_json(ex.to_dict())


# -- sessions ---------------------------------------------------------------------------------------------

class SessionsHandler(BaseHandler):
    """``POST /v1/sandboxes/{id}/sessions`` (session_create)."""

    async def post(self, sandbox_id: str) -> None:
        req = parse_session_create(self.json_body(required=False))
        session = await self.hub.create_session(self.tenant, sandbox_id, type=req.type, language=req.language)
        self.send_json(session.to_dict(), 201)


class SessionHandler(BaseHandler):
    """``GET /v1/sessions/{id}`` (an extension) and ``DELETE`` (session_close)."""

    def get(self, session_id: str) -> None:
        _, session = self.hub.get_session(self.tenant, session_id)
        self.send_json(session.to_dict())

    async def delete(self, session_id: str) -> None:
        await self.hub.close_session(self.tenant, session_id)
        self.set_status(204)
        self.finish()


class SessionExecuteHandler(StreamingExecutionHandler):
    """``POST /v1/sessions/{id}/execute`` (session_execute): an execution, or ``{output}`` for terminals."""

    async def post(self, session_id: str) -> None:
        req = parse_session_input(self.json_body())

        def call(listener: Listener | None) -> Awaitable[Any]:
            return self.hub.session_execute(self.tenant, session_id, req.input, timeout_s=req.timeout_s,
                                            listener=listener)

        def shape(result: Any) -> Any:
            if isinstance(result, Execution):
                return result.to_dict()
            return result if isinstance(result, dict) else {"output": result}

        await self.run_execution(call, shape)


# -- files ------------------------------------------------------------------------------------------------

class FilesHandler(BaseHandler):
    """``PUT|GET|DELETE /v1/sandboxes/{id}/files/{path}``: upload (streamed), download (streamed), list
    (``?list=1``, or the workspace root) and delete. Paths are handed to the hub as they came; the workspace
    layer refuses ``..``, absolute paths, NUL bytes and symlinks.

    A file name need not be UTF-8 (Linux names are bytes, and sandbox code makes any): the URL's path is
    percent-decoded to bytes and taken with ``surrogateescape``, the way Python names such files, so ``%FF``
    reaches the file whose name has the byte 0xFF. ``file_list`` shows such names with U+FFFD and gives the
    ready-made percent-encoded ``url_path`` to use here (see :mod:`kernelhub.sandbox.workspace`)."""

    _writer: UploadWriter | None = None
    _error: KernelHubError | None = None

    def decode_argument(self, value: bytes, name: str | None = None) -> str:
        if name is None:  # the URL's groups: the sandbox id and the path
            return value.decode("utf-8", "surrogateescape")
        return super().decode_argument(value, name)

    def body_limit(self) -> int | None:
        return None if self.request.method == "PUT" else MAX_JSON_BODY

    async def prepare(self) -> None:  # type: ignore[override]
        super().prepare()  # auth first: a stranger's upload is refused before a byte of it is read
        if self.request.method != "PUT":
            if isinstance(self.request.connection, HTTP1Connection):
                self.request.connection.set_max_body_size(MAX_JSON_BODY)
            return
        sandbox_id, path = self.path_args
        length = self.request.headers.get("Content-Length", "").strip()
        try:
            limit = self.hub.max_file_bytes(self.tenant, sandbox_id)
        except KernelHubError as exc:
            self._error = exc
            return
        if length.isdigit() and int(length) > limit:
            # Refused before the body is read (API.md: max_file_mb); the connection closes after this answer.
            raise PayloadTooLarge(f"The file is larger than the {limit // (1024 * 1024)} MiB a single file may "
                                  "have (limits.max_file_mb).")
        try:
            self._writer = self.hub.open_upload(self.tenant, sandbox_id, path)
        except KernelHubError as exc:
            # Answered once the body is read: closing on an unread body can lose the answer (a TCP reset).
            self._error = exc

    async def data_received(self, chunk: bytes) -> None:  # type: ignore[override]
        writer = self._writer
        if writer is None or self._error is not None:
            return
        try:
            # In a thread: a write may block on the disk (dirty page throttling) and the loop serves others.
            await asyncio.get_running_loop().run_in_executor(None, writer.write, chunk)
        except KernelHubError as exc:
            self._error = exc  # the writer removed the partial file; the rest of the body is dropped

    def on_connection_close(self) -> None:
        if self._writer is not None:
            self._writer.abort()
        super().on_connection_close()

    def on_finish(self) -> None:
        if self._writer is not None and not self._writer.closed:
            self._writer.abort()
        super().on_finish()

    async def put(self, sandbox_id: str, path: str) -> None:
        if self._error is not None:
            raise self._error
        assert self._writer is not None
        writer, self._writer = self._writer, None
        try:
            size = await asyncio.get_running_loop().run_in_executor(None, writer.finish)
        except BaseException:
            writer.abort()
            raise
        self.send_json({**path_fields(writer.path), "size": size}, 201)

    async def get(self, sandbox_id: str, path: str) -> None:
        if self.get_query_argument("list", "") not in ("", "0", "false") or not path.strip("/"):
            await _send_listing(self, sandbox_id, path)
            return
        # The file is closed when this block ends, however it ends (the client going away included).
        async with self.hub.open_download(self.tenant, sandbox_id, path) as download:
            name = path.rstrip("/").rsplit("/", 1)[-1].encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            self.set_header("Content-Disposition", "attachment; filename*=UTF-8''" + urllib.parse.quote(name))
            await send_download(self, download)

    async def delete(self, sandbox_id: str, path: str) -> None:
        await self.hub.delete_file(self.tenant, sandbox_id, path)
        self.set_status(204)
        self.finish()


async def _send_listing(handler: BaseHandler, sandbox_id: str, path: str) -> None:
    """``file_list``: one page (``?limit=&cursor=``) of a directory's entries."""
    handler.send_json(await handler.hub.list_files(handler.tenant, sandbox_id, path,
                                                   limit=handler.get_query_argument("limit", None),
                                                   cursor=handler.get_query_argument("cursor", None)))


class WorkspaceRootHandler(BaseHandler):
    """``GET /v1/sandboxes/{id}/files`` (with or without ``?list=1``): the entries of ``/workspace``."""

    async def get(self, sandbox_id: str) -> None:
        await _send_listing(self, sandbox_id, "")


# -- the API description ----------------------------------------------------------------------------------

class OpenAPIHandler(BaseHandler):
    """``GET /v1/openapi.json``: the OpenAPI 3.1 document, served without auth as API descriptions are."""

    auth_required = False
    _cache: bytes | None = None

    def get(self) -> None:
        if OpenAPIHandler._cache is None:
            OpenAPIHandler._cache = OPENAPI_PATH.read_bytes()
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(OpenAPIHandler._cache)


class SandboxPauseHandler(BaseHandler):
    """``POST /v1/sandboxes/{id}/pause`` (sandbox_pause): the paused sandbox."""

    async def post(self, sandbox_id: str) -> None:
        self.send_json((await self.hub.pause_sandbox(self.tenant, sandbox_id)).to_dict())


class SandboxResumeHandler(BaseHandler):
    """``POST /v1/sandboxes/{id}/resume`` (sandbox_resume): the running sandbox."""

    async def post(self, sandbox_id: str) -> None:
        self.send_json((await self.hub.resume_sandbox(self.tenant, sandbox_id)).to_dict())


class AuditHandler(BaseHandler):
    """``GET /v1/audit?since=&limit=&cursor=``: the caller's tenant's own audit entries, oldest first, paged
    (``{"entries", "next"}``; :meth:`kernelhub.services.audit.AuditLog.read`)."""

    async def get(self) -> None:
        self.send_json(await self.hub.read_audit(self.tenant, self.get_query_argument("since", None),
                                                 self.get_query_argument("limit", None),
                                                 self.get_query_argument("cursor", None)))


default_handlers: list[Any] = [
    (r"/v1/openapi\.json", OpenAPIHandler),
    (r"/v1/templates", TemplatesHandler),
    (r"/v1/sandboxes", SandboxesHandler),
    (rf"/v1/sandboxes/{ID}", SandboxHandler),
    (rf"/v1/sandboxes/{ID}/execute", ExecuteHandler),
    (rf"/v1/sandboxes/{ID}/executions", ExecutionsHandler),
    (rf"/v1/sandboxes/{ID}/files", WorkspaceRootHandler),
    (rf"/v1/sandboxes/{ID}/files/(.*)", FilesHandler),
    (rf"/v1/sandboxes/{ID}/sessions", SessionsHandler),
    (rf"/v1/sandboxes/{ID}/logs", LogsHandler),
    (rf"/v1/sandboxes/{ID}/metrics", MetricsHandler),
    (rf"/v1/executions/{ID}", ExecutionHandler),
    (rf"/v1/executions/{ID}/interrupt", ExecutionInterruptHandler),
    (rf"/v1/sessions/{ID}", SessionHandler),
    (rf"/v1/sessions/{ID}/execute", SessionExecuteHandler),
    (rf"/v1/sandboxes/{ID}/pause", SandboxPauseHandler),
    (rf"/v1/sandboxes/{ID}/resume", SandboxResumeHandler),
    (r"/v1/audit", AuditHandler),
]
