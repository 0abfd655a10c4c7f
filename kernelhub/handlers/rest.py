"""The ``/v1`` REST surface (API.md, "REST" and the NDJSON half of "Streaming").

Every handler parses the request, calls one :class:`~kernelhub.services.hub.Hub` method and shapes the answer;
no policy lives here. Errors are :class:`~kernelhub.errors.KernelHubError` subclasses, turned into
``{"error", "message"}`` by :class:`~kernelhub.handlers.base.BaseHandler`.

Request bodies are read with ``@stream_request_body`` even for JSON: the gateway's HTTP server accepts large
bodies (file uploads), and a JSON route must not buffer gigabytes a client sends it. A JSON body over
:data:`~kernelhub.handlers.base.MAX_JSON_BODY` is counted, dropped and answered 413.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tornado import iostream, web
from tornado.http1connection import HTTP1Connection

from ..errors import InvalidRequest, KernelHubError, PayloadTooLarge
from ..services.executions import Execution, Listener
from .base import MAX_JSON_BODY, BaseHandler

if TYPE_CHECKING:
    from ..sandbox.files import UploadWriter

#: The OpenAPI document kept in the repository and served at ``/v1/openapi.json``.
OPENAPI_PATH = Path(__file__).resolve().parent.parent / "openapi.json"
NDJSON = "application/x-ndjson"
#: Seconds of silence after which an NDJSON stream gets a ``{"type": "keepalive"}`` line.
KEEPALIVE_S = 10.0
#: Content-Length over this many times the JSON limit is refused before a byte of the body is read.
_EARLY_REFUSAL_FACTOR = 4

ID = r"([^/]+)"


# -- request parsing --------------------------------------------------------------------------------------

def fields(body: dict[str, Any], *, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """The body's fields, refusing unknown names (a typo such as ``limit`` must not be silently ignored)."""
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise InvalidRequest(f"Unknown field {unknown[0]!r}; this route accepts {', '.join(allowed)}.")
    for name in required:
        if body.get(name) is None:
            raise InvalidRequest(f"The field {name!r} is required.")
    return body


def optional(body: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    """``body[name]`` if present and of ``kind`` (None when absent); an InvalidRequest naming ``what`` else."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise InvalidRequest(f"{name} must be {what}.")
    if not isinstance(value, kind):
        raise InvalidRequest(f"{name} must be {what}.")
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def wants_ndjson(accept: str) -> bool:
    return any(part.split(";")[0].strip().lower() == NDJSON for part in accept.split(","))


# -- handler bases ----------------------------------------------------------------------------------------

@web.stream_request_body
class JsonHandler(BaseHandler):
    """A REST handler whose JSON body is streamed in and capped (see the module docstring)."""

    _body: bytearray
    _body_size: int

    async def prepare(self) -> None:  # type: ignore[override]
        self._body = bytearray()
        self._body_size = 0
        super().prepare()
        length = self.request.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > MAX_JSON_BODY * _EARLY_REFUSAL_FACTOR:
            raise PayloadTooLarge(f"The JSON body may be at most {MAX_JSON_BODY} bytes.")

    def data_received(self, chunk: bytes) -> None:
        self._body_size += len(chunk)
        if self._body_size <= MAX_JSON_BODY:
            self._body += chunk

    def json_body(self, *, required: bool = True) -> dict[str, Any]:
        if self._body_size > MAX_JSON_BODY:
            raise PayloadTooLarge(f"The JSON body may be at most {MAX_JSON_BODY} bytes.")
        if not self._body:
            if required:
                raise InvalidRequest("The request needs a JSON object body.")
            return {}
        try:
            # NaN and Infinity are not JSON (RFC 8259), and answers echoing them would not be either.
            data = json.loads(self._body, parse_constant=_refuse_constant)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"The body is not valid JSON: {exc}.") from None
        if not isinstance(data, dict):
            raise InvalidRequest("The body must be a JSON object.")
        return data


class StreamingExecutionHandler(JsonHandler):
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
                self.write(json.dumps(event, ensure_ascii=False, default=str) + "\n")
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


def _execution_args(body: dict[str, Any]) -> dict[str, Any]:
    fields(body, allowed=("code", "language", "session_id", "timeout_s", "env"), required=("code",))
    return {
        "code": optional(body, "code", str, "a string of code"),
        "language": optional(body, "language", str, "a language name (python, node, typescript, bash)"),
        "session_id": optional(body, "session_id", str, "a session id"),
        "timeout_s": optional(body, "timeout_s", (int, float), "a number of seconds"),
        "env": optional(body, "env", dict, "a JSON object of strings"),
    }


# -- sandboxes --------------------------------------------------------------------------------------------

class SandboxesHandler(JsonHandler):
    """``POST /v1/sandboxes`` (sandbox_create) and ``GET /v1/sandboxes`` (sandbox_list)."""

    async def post(self) -> None:
        body = fields(self.json_body(required=False),
                      allowed=("template", "limits", "env", "metadata", "network"))
        record = await self.hub.create_sandbox(
            self.tenant,
            template=optional(body, "template", str, "a template name"),
            limits=optional(body, "limits", dict, "a JSON object of limits"),
            env=optional(body, "env", dict, "a JSON object of strings"),
            metadata=optional(body, "metadata", dict, "a JSON object"),
            network=optional(body, "network", str, "a network mode"),
        )
        self.set_header("Location", f"/v1/sandboxes/{record.id}")
        self.send_json(record.to_dict(), 201)

    def get(self) -> None:
        self.send_json({"sandboxes": [r.to_dict() for r in self.hub.list_sandboxes(self.tenant)]})


class SandboxHandler(JsonHandler):
    """``GET /v1/sandboxes/{id}`` (sandbox_info) and ``DELETE`` (sandbox_delete)."""

    def get(self, sandbox_id: str) -> None:
        self.send_json(self.hub.get_sandbox(self.tenant, sandbox_id).to_dict())

    async def delete(self, sandbox_id: str) -> None:
        await self.hub.delete_sandbox(self.tenant, sandbox_id)
        self.set_status(204)
        self.finish()


class LogsHandler(JsonHandler):
    """``GET /v1/sandboxes/{id}/logs?lines=N`` (sandbox_logs)."""

    def get(self, sandbox_id: str) -> None:
        lines = self.get_query_argument("lines", "100")
        self.send_json({"lines": self.hub.sandbox_logs(self.tenant, sandbox_id, lines)})


class MetricsHandler(JsonHandler):
    """``GET /v1/sandboxes/{id}/metrics`` (sandbox_metrics)."""

    def get(self, sandbox_id: str) -> None:
        self.send_json(self.hub.sandbox_metrics(self.tenant, sandbox_id))


class TemplatesHandler(JsonHandler):
    """``GET /v1/templates``: the templates sandbox_create accepts (an extension of API.md)."""

    def get(self) -> None:
        self.send_json({"templates": self.hub.list_templates()})


# -- executions -------------------------------------------------------------------------------------------

class ExecuteHandler(StreamingExecutionHandler):
    """``POST /v1/sandboxes/{id}/execute`` (code_execute), whole or as NDJSON events."""

    async def post(self, sandbox_id: str) -> None:
        args = _execution_args(self.json_body())

        def call(listener: Listener | None) -> Awaitable[Execution]:
            return self.hub.execute(self.tenant, sandbox_id, listener=listener, wait=True, **args)

        await self.run_execution(call, lambda ex: ex.to_dict())


class ExecutionsHandler(JsonHandler):
    """``POST /v1/sandboxes/{id}/executions`` (code_execute_async): 202 ``{id, status}``."""

    async def post(self, sandbox_id: str) -> None:
        args = _execution_args(self.json_body())
        ex = await self.hub.execute(self.tenant, sandbox_id, wait=False, **args)
        self.set_header("Location", f"/v1/executions/{ex.id}")
        self.send_json({"id": ex.id, "status": ex.status}, 202)


class ExecutionHandler(JsonHandler):
    """``GET /v1/executions/{id}`` (execution_status)."""

    def get(self, execution_id: str) -> None:
        self.send_json(self.hub.get_execution(self.tenant, execution_id).to_dict())


class ExecutionInterruptHandler(JsonHandler):
    """``POST /v1/executions/{id}/interrupt``: stop a queued or running execution (an extension)."""

    async def post(self, execution_id: str) -> None:
        ex = await self.hub.interrupt_execution(self.tenant, execution_id)
        self.send_json(ex.to_dict())


class CommandsHandler(JsonHandler):
    """``POST /v1/sandboxes/{id}/commands`` (command_execute)."""

    async def post(self, sandbox_id: str) -> None:
        body = fields(self.json_body(), allowed=("command", "cwd", "env", "timeout_s", "stdin"),
                      required=("command",))
        result = await self.hub.run_command(
            self.tenant, sandbox_id,
            command=optional(body, "command", str, "a string"),
            cwd=optional(body, "cwd", str, "a path string"),
            env=optional(body, "env", dict, "a JSON object of strings"),
            timeout_s=optional(body, "timeout_s", (int, float), "a number of seconds"),
            stdin=optional(body, "stdin", str, "a string"),
        )
        self.send_json(result)


# -- sessions ---------------------------------------------------------------------------------------------

class SessionsHandler(JsonHandler):
    """``POST /v1/sandboxes/{id}/sessions`` (session_create)."""

    async def post(self, sandbox_id: str) -> None:
        body = fields(self.json_body(required=False), allowed=("type", "language"))
        session = await self.hub.create_session(
            self.tenant, sandbox_id,
            type=optional(body, "type", str, '"jupyter" or "terminal"') or "jupyter",
            language=optional(body, "language", str, "a language name (python, node, typescript, bash)"),
        )
        self.send_json(session.to_dict(), 201)


class SessionHandler(JsonHandler):
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
        body = fields(self.json_body(), allowed=("input", "timeout_s"), required=("input",))
        text = optional(body, "input", str, "a string")
        timeout = optional(body, "timeout_s", (int, float), "a number of seconds")

        def call(listener: Listener | None) -> Awaitable[Any]:
            return self.hub.session_execute(self.tenant, session_id, text, timeout_s=timeout, listener=listener)

        def shape(result: Any) -> Any:
            if isinstance(result, Execution):
                return result.to_dict()
            return result if isinstance(result, dict) else {"output": result}

        await self.run_execution(call, shape)


# -- files ------------------------------------------------------------------------------------------------

@web.stream_request_body
class FilesHandler(BaseHandler):
    """``PUT|GET|DELETE /v1/sandboxes/{id}/files/{path}``: upload (streamed), download (streamed), list
    (``?list=1``, or the workspace root) and delete. Paths are handed to the hub as they came; the workspace
    layer refuses ``..``, absolute paths, NUL bytes and symlinks."""

    _writer: UploadWriter | None = None
    _error: KernelHubError | None = None

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
        self.send_json({"path": writer.path, "size": size}, 201)

    async def get(self, sandbox_id: str, path: str) -> None:
        if self.get_query_argument("list", "") not in ("", "0", "false") or not path.strip("/"):
            self.send_json({"entries": self.hub.list_files(self.tenant, sandbox_id, path)})
            return
        # The file is closed when this block ends, however it ends (the client going away included).
        async with self.hub.open_download(self.tenant, sandbox_id, path) as download:
            self.set_header("Content-Type", "application/octet-stream")
            self.set_header("Content-Length", str(download.size))
            name = path.rstrip("/").rsplit("/", 1)[-1]
            self.set_header("Content-Disposition", "attachment; filename*=UTF-8''" + urllib.parse.quote(name))
            async for chunk in download:
                self.write(chunk)
                try:
                    await self.flush()
                except iostream.StreamClosedError:
                    return
            if download.sent < download.size and isinstance(self.request.connection, HTTP1Connection):
                # The sandbox truncated the file meanwhile, and Content-Length promised more than there is:
                # end the connection rather than lie.
                self.request.connection.stream.close()
                return
        self.finish()

    async def delete(self, sandbox_id: str, path: str) -> None:
        self.hub.delete_file(self.tenant, sandbox_id, path)
        self.set_status(204)
        self.finish()


class WorkspaceRootHandler(JsonHandler):
    """``GET /v1/sandboxes/{id}/files`` (with or without ``?list=1``): the entries of ``/workspace``."""

    def get(self, sandbox_id: str) -> None:
        self.send_json({"entries": self.hub.list_files(self.tenant, sandbox_id, "")})


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


default_handlers: list[Any] = [
    (r"/v1/openapi\.json", OpenAPIHandler),
    (r"/v1/templates", TemplatesHandler),
    (r"/v1/sandboxes", SandboxesHandler),
    (rf"/v1/sandboxes/{ID}", SandboxHandler),
    (rf"/v1/sandboxes/{ID}/execute", ExecuteHandler),
    (rf"/v1/sandboxes/{ID}/executions", ExecutionsHandler),
    (rf"/v1/sandboxes/{ID}/commands", CommandsHandler),
    (rf"/v1/sandboxes/{ID}/files", WorkspaceRootHandler),
    (rf"/v1/sandboxes/{ID}/files/(.*)", FilesHandler),
    (rf"/v1/sandboxes/{ID}/sessions", SessionsHandler),
    (rf"/v1/sandboxes/{ID}/logs", LogsHandler),
    (rf"/v1/sandboxes/{ID}/metrics", MetricsHandler),
    (rf"/v1/executions/{ID}", ExecutionHandler),
    (rf"/v1/executions/{ID}/interrupt", ExecutionInterruptHandler),
    (rf"/v1/sessions/{ID}", SessionHandler),
    (rf"/v1/sessions/{ID}/execute", SessionExecuteHandler),
]
