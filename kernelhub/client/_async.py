"""The asynchronous client: :class:`AsyncSandbox` over tornado's HTTP client (REST) and ``websockets.asyncio``
(streamed code). Callbacks may be plain functions or coroutines."""

from __future__ import annotations

import asyncio
import builtins
import inspect
import json
import uuid
from collections.abc import Awaitable, Callable, Generator
from types import TracebackType
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.simple_httpclient import HTTPTimeoutError
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from . import _api
from ._sync import _raise_request_error
from .errors import (
    GatewayConnectionError,
    KernelHubError,
    NotFoundError,
    RequestTimeoutError,
    error_from_response,
)
from .models import CommandExitError, CommandResult, Execution, ExecutionStream, TerminalOutput

#: Largest answer the async client accepts (downloads of big files).
MAX_BODY_BYTES = 4 * 1024 * 1024 * 1024


class AsyncApiClient:
    """A thin asynchronous caller of the REST API (API.md); same answers and errors as
    :class:`~kernelhub.client.Sandbox`'s ``ApiClient``. Used by :class:`AsyncSandbox` and by the MCP
    server's remote backend. Call :meth:`aclose` when done."""

    def __init__(self, url: str | None = None, token: str | None = None,
                 request_timeout: float | None = None) -> None:
        self.url = _api.resolve_url(url)
        self.token = _api.resolve_token(token)
        self.request_timeout = request_timeout or _api.DEFAULT_REQUEST_TIMEOUT
        self._http: AsyncHTTPClient | None = None

    def _client(self) -> AsyncHTTPClient:
        # Made lazily: tornado binds an HTTP client to the loop that is running when it is made.
        if self._http is None:
            self._http = AsyncHTTPClient(force_instance=True, max_body_size=MAX_BODY_BYTES,
                                         max_buffer_size=MAX_BODY_BYTES)
        return self._http

    async def call(self, call: _api.Call, *, streaming_callback: Callable[[bytes], None] | None = None,
                   headers: dict[str, str] | None = None) -> Any:
        timeout = max(call.timeout or 0, self.request_timeout)
        captured = bytearray()

        def on_chunk(chunk: bytes) -> None:
            # An error answer is streamed too: keep its start to build the exception from.
            if len(captured) < 65536:
                captured.extend(chunk[: 65536 - len(captured)])
            if streaming_callback is not None:
                streaming_callback(chunk)

        request = HTTPRequest(call.url(self.url), method=call.method, body=call.payload(),
                              headers={**call.headers(self.token), **(headers or {})},
                              connect_timeout=min(timeout, 30.0), request_timeout=timeout,
                              streaming_callback=on_chunk if streaming_callback else None,
                              decompress_response=True,
                              allow_nonstandard_methods=True)
        try:
            response = await self._client().fetch(request, raise_error=False)
        except (HTTPTimeoutError, TimeoutError):
            raise RequestTimeoutError(f"No answer from {self.url} within {timeout:g} s.", status=0) from None
        except (HTTPClientError, OSError) as err:
            raise GatewayConnectionError(f"Cannot reach the gateway at {self.url}: {err}") from None
        if response.code == 599:
            raise GatewayConnectionError(f"Cannot reach the gateway at {self.url}: {response.error}")
        body = bytes(captured) if streaming_callback is not None else (response.body or b"")
        if response.code >= 400:
            raise error_from_response(response.code, body)
        if call.raw or streaming_callback is not None:
            return body
        if response.code == 204 or not body:
            return None
        ctype = response.headers.get("Content-Type", "")
        if "json" not in ctype:
            raise KernelHubError(f"The gateway answered {ctype or 'no content type'} where JSON was expected.",
                                 status=response.code)
        return json.loads(body)

    async def stream_execute(self, sandbox_id: str, message: dict[str, Any], stream: ExecutionStream,
                             timeout_s: float | None) -> Execution:
        """As the sync client's: code over ``WS /v1/sandboxes/{id}/stream``; callbacks may be coroutines.
        Cancelling the caller interrupts the execution."""
        request_id = uuid.uuid4().hex
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            async with asyncio.timeout(_api.execution_timeout(timeout_s)):
                async with ws_connect(_api.ws_url(self.url, _api.stream_path(sandbox_id)),
                                      additional_headers=headers, open_timeout=self.request_timeout,
                                      max_size=None, close_timeout=2) as ws:
                    await ws.send(json.dumps({**message, "type": "execute", "request_id": request_id}))
                    try:
                        async for raw in ws:
                            event = json.loads(raw)
                            if not isinstance(event, dict) or event.get("request_id") not in (None, request_id):
                                continue
                            _raise_request_error(event)
                            for callback, arg in stream.feed(event):
                                result = callback(arg)
                                if inspect.isawaitable(result):
                                    await result
                            if stream.done:
                                break
                    except asyncio.CancelledError:
                        if stream.execution.id and not stream.done:
                            await asyncio.shield(_interrupt(ws, stream.execution.id))
                        raise
        except KernelHubError:
            raise  # already typed (a rejected request, a timeout of our own): some derive from OSError
        except InvalidStatus as err:
            raise error_from_response(err.response.status_code, err.response.body or b"") from None
        except ConnectionClosed as err:
            if not stream.done:
                raise GatewayConnectionError(
                    f"The gateway closed the stream before the execution ended ({err}).") from None
        except TimeoutError:
            raise RequestTimeoutError("The execution did not end in time; it may still be running.",
                                      status=0) from None
        except (InvalidHandshake, OSError) as err:
            raise GatewayConnectionError(f"Cannot reach the gateway at {self.url}: {err}") from None
        if not stream.done:
            raise GatewayConnectionError("The gateway closed the stream before the execution ended.")
        return stream.execution

    async def aclose(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None


async def _interrupt(ws: Any, execution_id: str) -> None:
    try:
        await asyncio.wait_for(ws.send(json.dumps({"type": "interrupt", "execution_id": execution_id})), 2)
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass


class AsyncFiles:
    """``sandbox.files`` of an :class:`AsyncSandbox`; see :class:`~kernelhub.client.Sandbox`'s ``files``."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    async def write(self, path: str, data: str | bytes) -> dict[str, Any]:
        payload = data.encode() if isinstance(data, str) else bytes(data)
        return await self._sandbox._call(_api.write_file(self._sandbox.id, path, payload))  # type: ignore[no-any-return]

    async def read(self, path: str, format: str = "text") -> Any:
        if format not in ("text", "bytes"):
            raise ValueError('format must be "text" or "bytes"')
        data = await self._sandbox._call(_api.read_file(self._sandbox.id, path))
        return data.decode() if format == "text" else data

    async def list(self, path: str = "") -> builtins.list[dict[str, Any]]:
        answer = await self._sandbox._call(_api.list_files(self._sandbox.id, path))
        return builtins.list(answer["entries"])

    async def remove(self, path: str) -> None:
        await self._sandbox._call(_api.delete_file(self._sandbox.id, path))

    async def exists(self, path: str) -> bool:
        parent, _, name = path.rstrip("/").rpartition("/")
        try:
            return any(e["name"] == name for e in await self.list(parent))
        except NotFoundError:
            return False


class AsyncCommands:
    """``sandbox.commands`` of an :class:`AsyncSandbox`."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    async def run(self, cmd: str, *, cwd: str | None = None, env: dict[str, str] | None = None,
                  timeout: float | None = None, stdin: str | None = None, check: bool = False) -> CommandResult:
        answer = await self._sandbox._call(_api.run_command(self._sandbox.id, cmd, cwd=cwd, env=env,
                                                            timeout_s=timeout, stdin=stdin))
        result = CommandResult.from_dict(answer)
        if check and result.exit_code != 0:
            raise CommandExitError(result)
        return result


class AsyncSessions:
    """``sandbox.sessions`` of an :class:`AsyncSandbox`."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    async def create(self, type: str = "jupyter", language: str | None = None) -> dict[str, Any]:
        return await self._sandbox._call(_api.create_session(self._sandbox.id, type, language))  # type: ignore[no-any-return]

    async def execute(self, session_id: str, input: str, *,
                      timeout: float | None = None) -> Execution | TerminalOutput:
        answer = await self._sandbox._call(_api.session_execute(session_id, input, timeout))
        if "output" in answer and "status" not in answer:
            return TerminalOutput(output=answer["output"], raw=answer)
        return Execution.from_dict(answer)

    async def close(self, session_id: str) -> None:
        await self._sandbox._call(_api.close_session(session_id))


class _Creating:
    """What :meth:`AsyncSandbox.create` answers: await it for the sandbox, or use it directly as
    ``async with AsyncSandbox.create() as sandbox:`` (killed on exit)."""

    def __init__(self, make: Callable[[], Awaitable[AsyncSandbox]]) -> None:
        self._make = make
        self._sandbox: AsyncSandbox | None = None

    def __await__(self) -> Generator[Any, None, AsyncSandbox]:
        return self._make().__await__()

    async def __aenter__(self) -> AsyncSandbox:
        self._sandbox = await self._make()
        return self._sandbox

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._sandbox is not None:
            await self._sandbox.__aexit__(exc_type, exc, tb)


class AsyncSandbox:
    """The asynchronous twin of :class:`~kernelhub.client.Sandbox`: the same methods, awaited.

    ``async with AsyncSandbox.create() as sandbox:`` (or ``sandbox = await AsyncSandbox.create()``, then
    ``await sandbox.kill()``).
    """

    def __init__(self, info: dict[str, Any], api: AsyncApiClient) -> None:
        self._info = info
        self._api = api
        self.files = AsyncFiles(self)
        self.commands = AsyncCommands(self)
        self.sessions = AsyncSessions(self)

    @classmethod
    def create(cls, template: str = "python", *, limits: dict[str, Any] | None = None,
               env: dict[str, str] | None = None, metadata: dict[str, Any] | None = None,
               network: str | None = None, timeout: float | None = None, url: str | None = None,
               token: str | None = None, request_timeout: float | None = None) -> _Creating:
        """Start a sandbox; ``timeout`` is its lifetime in seconds (``limits.max_lifetime_s``)."""
        if timeout is not None:
            limits = {**(limits or {}), "max_lifetime_s": timeout}

        async def make() -> AsyncSandbox:
            api = AsyncApiClient(url, token, request_timeout)
            try:
                info = await api.call(_api.create_sandbox(template, limits, env, metadata, network))
            except BaseException:
                await api.aclose()
                raise
            return cls(info, api)

        return _Creating(make)

    @classmethod
    async def connect(cls, sandbox_id: str, *, url: str | None = None, token: str | None = None,
                      request_timeout: float | None = None) -> AsyncSandbox:
        api = AsyncApiClient(url, token, request_timeout)
        try:
            return cls(await api.call(_api.get_sandbox(sandbox_id)), api)
        except BaseException:
            await api.aclose()
            raise

    @classmethod
    async def list(cls, *, url: str | None = None, token: str | None = None) -> builtins.list[dict[str, Any]]:
        api = AsyncApiClient(url, token)
        try:
            return builtins.list((await api.call(_api.list_sandboxes()))["sandboxes"])
        finally:
            await api.aclose()

    @property
    def id(self) -> str:
        return str(self._info["id"])

    sandbox_id = id

    @property
    def template(self) -> str:
        return str(self._info.get("template", ""))

    async def info(self) -> dict[str, Any]:
        self._info = await self._call(_api.get_sandbox(self.id))
        return dict(self._info)

    async def is_running(self) -> bool:
        try:
            return (await self.info()).get("state") == "running"
        except NotFoundError:
            return False

    async def metrics(self) -> dict[str, Any]:
        return await self._call(_api.sandbox_metrics(self.id))  # type: ignore[no-any-return]

    async def logs(self, lines: int = 100) -> builtins.list[str]:
        return builtins.list((await self._call(_api.sandbox_logs(self.id, lines)))["lines"])

    async def run_code(self, code: str, language: str | None = None, *, session_id: str | None = None,
                       on_stdout: Any = None, on_stderr: Any = None, on_result: Any = None, on_error: Any = None,
                       timeout: float | None = None, env: dict[str, str] | None = None) -> Execution:
        """As :meth:`Sandbox.run_code`; callbacks may be coroutine functions."""
        message: dict[str, Any] = {"code": code}
        for key, value in (("language", language), ("session_id", session_id), ("timeout_s", timeout),
                           ("env", env)):
            if value is not None:
                message[key] = value
        stream = ExecutionStream(on_stdout=on_stdout, on_stderr=on_stderr, on_result=on_result,
                                 on_error=on_error)
        return await self._api.stream_execute(self.id, message, stream, timeout)

    async def get_execution(self, execution_id: str) -> Execution:
        return Execution.from_dict(await self._call(_api.get_execution(execution_id)))

    async def kill(self) -> None:
        try:
            await self._call(_api.delete_sandbox(self.id))
        except NotFoundError:
            pass

    async def close(self) -> None:
        """Release the HTTP client (the sandbox keeps running)."""
        await self._api.aclose()

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            await self.kill()
        finally:
            await self.close()

    def __repr__(self) -> str:
        return f"<AsyncSandbox {self.id} template={self.template!r} url={self._api.url!r}>"

    async def _call(self, call: _api.Call) -> Any:
        return await self._api.call(call)
