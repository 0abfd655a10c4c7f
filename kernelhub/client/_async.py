"""The client, written once: :class:`AsyncSandbox` over httpx (REST, NDJSON) and ``websockets.asyncio`` (code
streamed over ``/v1/sandboxes/{id}/stream``). The sync :class:`~kernelhub.client.Sandbox` runs this same code
on a private loop thread.

Every answer of the gateway that is an error reaches the caller as its typed :mod:`kernelhub.errors` class,
whatever the request's shape: a JSON call, an upload the gateway refused before reading it (it answers 413 and
closes; httpx reads that answer after the broken write), an NDJSON stream (an error status, or an ``end`` event
carrying one), a websocket (its handshake answered with an error, or a ``rejected`` event) or a download. Only
when no answer (or no whole answer) came is it a :class:`~kernelhub.errors.GatewayConnectionError`.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import contextvars
import inspect
import io
import json
import os
import stat
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Generator
from types import TracebackType
from typing import IO, Any

import httpx2
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from ..errors import Conflict, GatewayConnectionError, KernelHubError, NotFound, ResponseTimeoutError, error_for
from . import _api
from ._transport import GatewayTransport
from .errors import MAX_ERROR_BODY, error_from_response
from .models import CommandExitError, CommandResult, Execution, ExecutionStream, TerminalOutput

#: Longest wait for a TCP (and TLS) connection to the gateway, seconds; less when ``request_timeout`` is less.
CONNECT_TIMEOUT_S = 30.0
#: Size of the chunks a file object is read and uploaded in, bytes.
UPLOAD_CHUNK = 1024 * 1024

#: The connection pool an :class:`AsyncApiClient` uses when it makes none of its own: the sync client's loop
#: thread sets it to the one pool of its loop, so that sync sandboxes never hold sockets of their own.
shared_http: contextvars.ContextVar[httpx2.AsyncClient | None] = contextvars.ContextVar("kernelhub_http",
                                                                                       default=None)

#: Receives one streamed event; may be a coroutine function.
EventCallback = Callable[[dict[str, Any]], Any]
#: What ``files.write`` takes: text (UTF-8), bytes, a binary file object (sync or async ``read``; streamed,
#: not read whole) or an async iterable of bytes (streamed, sent chunked).
Upload = str | bytes | bytearray | memoryview | IO[bytes] | AsyncIterable[bytes]


def new_http_client() -> httpx2.AsyncClient:
    """An HTTP client for the gateway: a keep-alive pool whose connections keep an early answer readable
    (:mod:`._transport`), no redirects, timeouts set per request."""
    return httpx2.AsyncClient(transport=GatewayTransport(), timeout=_api.DEFAULT_REQUEST_TIMEOUT,
                              follow_redirects=False)


class AsyncApiClient:
    """A thin asynchronous caller of the REST API (API.md) for one gateway URL and API key; used by
    :class:`AsyncSandbox`, by the sync client and by the MCP server's remote backend. Call :meth:`aclose` when
    done. ``request_timeout`` bounds each step of a request (connecting, each read, each write), in seconds."""

    def __init__(self, url: str | None = None, token: str | None = None,
                 request_timeout: float | None = None) -> None:
        self.url = _api.resolve_url(url)
        self.token = _api.resolve_token(token)
        self.request_timeout = request_timeout or _api.DEFAULT_REQUEST_TIMEOUT
        self._http: httpx2.AsyncClient | None = None
        self._owns_http = False

    def _client(self) -> httpx2.AsyncClient:
        if self._http is None:
            self._http = shared_http.get()
            if self._http is None:
                self._http, self._owns_http = new_http_client(), True
        return self._http

    @contextlib.asynccontextmanager
    async def open(self, call: _api.Call, *, accept: str = "application/json") -> AsyncIterator[httpx2.Response]:
        """Send ``call`` and yield its answer, body unread, once it is a success; an error answer raises its
        typed :class:`~kernelhub.errors.KernelHubError` instead. No answer, or one cut short while the body is
        read inside the block, raises :class:`~kernelhub.errors.GatewayConnectionError` (or
        :class:`~kernelhub.errors.ResponseTimeoutError` when a step took longer than the timeout)."""
        timeout = max(call.timeout or 0.0, self.request_timeout)
        http = self._client()
        request = http.build_request(call.method, call.url(self.url), content=call.body(),
                                     headers=call.headers(self.token, accept),
                                     timeout=httpx2.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT_S)))
        try:
            response = await http.send(request, stream=True)
            try:
                if response.status_code >= 400:
                    raise error_from_response(response.status_code, await _read_start(response))
                yield response
            finally:
                await response.aclose()
        except httpx2.TimeoutException as err:
            raise ResponseTimeoutError(f"No answer from the gateway at {self.url} within {timeout:g} s "
                                       f"({type(err).__name__}).") from None
        except (httpx2.ConnectError, httpx2.UnsupportedProtocol, httpx2.ProxyError) as err:
            raise GatewayConnectionError(f"Cannot reach the gateway at {self.url}: {err or type(err).__name__}.") \
                from None
        except httpx2.TransportError as err:
            raise GatewayConnectionError(f"The connection to the gateway at {self.url} broke before its answer "
                                         f"was whole: {err or type(err).__name__}.") from None

    async def call(self, call: _api.Call) -> Any:
        """Perform ``call``: its parsed JSON answer, ``None`` for an empty one (204), its bytes when ``raw``."""
        async with self.open(call, accept="*/*" if call.raw else "application/json") as response:
            body = await response.aread()
        if call.raw:
            return body
        if response.status_code == 204 or not body:
            return None
        ctype = response.headers.get("Content-Type", "")
        if "json" not in ctype:
            raise KernelHubError(f"The gateway answered {ctype or 'no content type'} where JSON was expected.",
                                 status=response.status_code)
        return json.loads(body)

    async def stream(self, call: _api.Call, on_event: EventCallback | None = None) -> dict[str, Any]:
        """Perform ``call`` as NDJSON (``Accept: application/x-ndjson``, API.md "Streaming"): every event but the
        last goes to ``on_event`` as it arrives, and the answer is the last one, ``{"type": "end", ...}``. An
        ``end`` that carries an error (``{"execution": null, "error", "message"}``) raises it, typed."""
        end: dict[str, Any] | None = None
        async with self.open(call, accept="application/x-ndjson") as response:
            async for line in response.aiter_lines():
                try:
                    event = json.loads(line) if line.strip() else None
                except ValueError:
                    event = None
                if not isinstance(event, dict):
                    continue
                if event.get("type") == "end":
                    end = event
                    break
                if on_event is not None:
                    result = on_event(event)
                    if inspect.isawaitable(result):
                        await result
        if end is None:
            raise GatewayConnectionError(f"The gateway at {self.url} ended the stream without its end event.")
        if end.get("execution", False) is None and isinstance(end.get("message"), str):
            code = end.get("error")
            raise error_for(code if isinstance(code, str) else None, end["message"], body=end)
        return end

    async def stream_execute(self, sandbox_id: str, message: dict[str, Any], stream: ExecutionStream,
                             timeout_s: float | None) -> Execution:
        """Run code over ``WS /v1/sandboxes/{id}/stream``: send ``message`` as an ``execute`` request, feed every
        event of it to ``stream`` and invoke (or await) the callbacks it names as they arrive; answer the ended
        :class:`Execution`. A handshake the gateway refused and a ``rejected`` event raise their typed error.
        If the caller is cancelled, or a callback raises, the execution is interrupted on the way out."""
        request_id = uuid.uuid4().hex
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        limit = _api.execution_timeout(timeout_s)
        opened = False
        try:
            async with asyncio.timeout(limit):
                async with ws_connect(_api.ws_url(self.url, _api.stream_path(sandbox_id)),
                                      additional_headers=headers, open_timeout=self.request_timeout,
                                      max_size=None, close_timeout=2) as ws:
                    opened = True
                    await ws.send(json.dumps({**message, "type": "execute", "request_id": request_id}))
                    try:
                        async for raw in ws:
                            event = json.loads(raw)
                            if not isinstance(event, dict) or event.get("request_id") not in (None, request_id):
                                continue
                            _raise_rejected(event)
                            for callback, arg in stream.feed(event):
                                result = callback(arg)
                                if inspect.isawaitable(result):
                                    await result
                            if stream.done:
                                break
                    except BaseException:
                        if stream.execution.id and not stream.done:
                            await asyncio.shield(_interrupt(ws, stream.execution.id))
                        raise
        except KernelHubError:
            raise  # typed already (rejected); GatewayConnectionError derives from OSError, caught below otherwise
        except InvalidStatus as err:
            raise error_from_response(err.response.status_code, err.response.body or b"") from None
        except ConnectionClosed as err:
            if not stream.done:
                raise GatewayConnectionError(
                    f"The gateway at {self.url} closed the stream before the execution ended ({err}).") from None
        except TimeoutError:
            if not opened:
                raise ResponseTimeoutError(f"No answer from the gateway at {self.url} within "
                                           f"{self.request_timeout:g} s.") from None
            raise ResponseTimeoutError(f"The execution did not end within {limit:g} s of waiting; it may still be "
                                       "running.") from None
        except (InvalidHandshake, OSError) as err:
            raise GatewayConnectionError(f"Cannot reach the gateway at {self.url}: {err}.") from None
        if not stream.done:
            raise GatewayConnectionError(f"The gateway at {self.url} closed the stream before the execution ended.")
        return stream.execution

    async def aclose(self) -> None:
        if self._http is not None and self._owns_http:
            await self._http.aclose()
        self._http, self._owns_http = None, False


async def _read_start(response: httpx2.Response) -> bytes:
    """The first :data:`~kernelhub.client.errors.MAX_ERROR_BODY` bytes of an answer: enough for an error
    body, and bounded whatever a proxy sends."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) >= MAX_ERROR_BODY:
            break
    return bytes(body[:MAX_ERROR_BODY])


def _raise_rejected(event: dict[str, Any]) -> None:
    """A ``rejected`` event is the gateway refusing the request itself (unknown session, bad timeout…), as
    opposed to an ``error`` event, which is the code raising."""
    if event.get("type") == "rejected":
        code = event.get("error")
        raise error_for(code if isinstance(code, str) else None,
                        str(event.get("message") or "The gateway refused the execution."), body=event)


async def _interrupt(ws: Any, execution_id: str) -> None:
    try:
        await asyncio.wait_for(ws.send(json.dumps({"type": "interrupt", "execution_id": execution_id})), 2)
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass


def upload_body(data: Upload) -> tuple[_api.Content, int | None]:
    """An upload's body and its length in bytes (``None`` when unknown: sent chunked). File objects are read in
    :data:`UPLOAD_CHUNK` pieces as they are sent, from their current position; a regular or seekable file
    declares its remaining size, so that the gateway refuses one over ``max_file_mb`` before any is sent.
    Raises :class:`TypeError` for anything else (text-mode files included)."""
    if isinstance(data, str):
        data = data.encode()
    if isinstance(data, (bytes, bytearray, memoryview)):
        payload = bytes(data)
        return payload, len(payload)
    if isinstance(data, io.TextIOBase):
        raise TypeError("files.write needs a file opened in binary mode ('rb').")
    if hasattr(data, "read"):
        size = _remaining_size(data)
        return _file_chunks(data, size), size
    if isinstance(data, AsyncIterable):
        return data, None
    raise TypeError(f"files.write takes str, bytes, a binary file object or an async iterable of bytes, "
                    f"not {type(data).__name__}.")


def _remaining_size(f: Any) -> int | None:
    try:
        st = os.fstat(f.fileno())
        if stat.S_ISREG(st.st_mode):
            return max(0, st.st_size - f.tell())
    except (AttributeError, OSError, ValueError):
        pass
    try:
        if f.seekable():
            here = f.tell()
            end = f.seek(0, io.SEEK_END)
            f.seek(here)
            return max(0, end - here)
    except (AttributeError, OSError, ValueError):
        pass
    return None


async def _file_chunks(f: Any, size: int | None) -> AsyncIterator[bytes]:
    """``f``'s bytes in chunks: a sync ``read`` in a worker thread (a disk read must not stall the loop), an
    async one awaited. At most ``size`` bytes when given (the length the request declared); a file that ends
    sooner raises :class:`ValueError`, as the request could not be completed truthfully."""
    read_async = inspect.iscoroutinefunction(f.read)
    left = size
    while left is None or left > 0:
        n = UPLOAD_CHUNK if left is None else min(UPLOAD_CHUNK, left)
        chunk = await f.read(n) if read_async else await asyncio.to_thread(f.read, n)
        if not chunk:
            break
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise TypeError("files.write needs a file opened in binary mode ('rb').")
        if left is not None:
            left -= len(chunk)
        yield bytes(chunk)
    if left:
        raise ValueError(f"The file ended {left} bytes short of the {size} it had when the upload began.")


class AsyncFiles:
    """``sandbox.files``: the sandbox's ``/workspace``. Paths are relative to it (``/workspace/x`` is ``x``)."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    async def write(self, path: str, data: Upload) -> dict[str, Any]:
        """Create or replace a file (parents are made); answers ``{path, size}``. ``data``: text (UTF-8), bytes,
        a binary file object or an async iterable of bytes; file objects and iterables are streamed, never held
        whole in memory. Raises :class:`~kernelhub.errors.PayloadTooLarge` over the sandbox's ``max_file_mb``,
        :class:`~kernelhub.errors.DiskQuotaExceeded` when the workspace fills up."""
        content, size = upload_body(data)
        return await self._sandbox._call(_api.write_file(self._sandbox.id, path, content, size))  # type: ignore[no-any-return]

    async def read(self, path: str, format: str = "text") -> Any:
        """A file's content: ``format="text"`` (UTF-8, the default) or ``"bytes"``. Raises
        :class:`~kernelhub.errors.NotFound` for a missing file."""
        if format not in ("text", "bytes"):
            raise ValueError('format must be "text" or "bytes"')
        data = await self._sandbox._call(_api.read_file(self._sandbox.id, path))
        return data.decode() if format == "text" else data

    async def list(self, path: str = "", *, page_size: int | None = None) -> builtins.list[dict[str, Any]]:
        """The entries of a directory, sorted by name: ``[{name, path, type, size, modified}]``, all of them
        (the gateway answers in pages of ``page_size`` entries, its default 1000; they are fetched in turn)."""
        entries: builtins.list[dict[str, Any]] = []
        cursor = None
        while True:
            answer = await self._sandbox._call(_api.list_files(self._sandbox.id, path, limit=page_size,
                                                               cursor=cursor))
            entries += answer["entries"]
            cursor = answer.get("next")
            if not cursor:
                return entries

    async def remove(self, path: str) -> None:
        """Delete a file or directory (recursively)."""
        await self._sandbox._call(_api.delete_file(self._sandbox.id, path))

    async def exists(self, path: str) -> bool:
        """Whether ``path`` names a file or directory (its parent is listed)."""
        parent, _, name = path.rstrip("/").rpartition("/")
        try:
            return any(e["name"] == name for e in await self.list(parent))
        except NotFound:
            return False


class AsyncCommandHandle:
    """A command running in the sandbox, by its ``pid`` (what :meth:`AsyncCommands.run` with
    ``background=True`` and :meth:`AsyncCommands.connect` answer). It runs on whether or not anyone waits for it;
    :meth:`wait` follows its output from its start (as far as the gateway keeps it: its last MiB) to its end."""

    def __init__(self, commands: AsyncCommands, info: dict[str, Any], *, on_stdout: Any = None,
                 on_stderr: Any = None) -> None:
        self._commands = commands
        self.info = info
        self._on_stdout, self._on_stderr = on_stdout, on_stderr

    @property
    def pid(self) -> int:
        return int(self.info["pid"])

    async def wait(self, *, on_stdout: Any = None, on_stderr: Any = None, check: bool = False) -> CommandResult:
        """Follow the command to its end and answer its :class:`CommandResult`; ``on_stdout``/``on_stderr`` (or
        those given to ``run``) get its text as it comes, from its start; ``check=True`` raises
        :class:`CommandExitError` on a non-zero exit. A command that wrote more than the gateway keeps begins with
        its last MiB (``result.raw["dropped_bytes"]`` says how much was not)."""
        sandbox = self._commands._sandbox
        result = await _follow(sandbox, _api.follow_command(sandbox.id, self.pid),
                               on_stdout or self._on_stdout, on_stderr or self._on_stderr, check)
        self.info = dict(result.raw)
        return result

    async def refresh(self) -> dict[str, Any]:
        """The command as the gateway sees it now, with ``stdout`` and ``stderr`` kept so far."""
        sandbox = self._commands._sandbox
        self.info = await sandbox._call(_api.get_command(sandbox.id, self.pid, output=True))
        return dict(self.info)

    async def send_stdin(self, data: str | bytes, *, eof: bool = False) -> None:
        """Write to its stdin (it must have been started with ``stdin_open=True``); ``eof`` closes it after."""
        await self._commands.send_stdin(self.pid, data, eof=eof)

    async def close_stdin(self) -> None:
        await self._commands.send_stdin(self.pid, None, eof=True)

    async def signal(self, signal: str = "SIGTERM") -> int:
        """Send ``signal`` to every process of its tree; answers how many got it."""
        sandbox = self._commands._sandbox
        answer = await sandbox._call(_api.signal_command(sandbox.id, self.pid, signal))
        return int(answer["signalled"])

    async def kill(self) -> bool:
        """Kill its whole process tree: True, or False if it had ended already."""
        return await self._commands.kill(self.pid)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} pid={self.pid} status={self.info.get('status')!r}>"


class AsyncCommands:
    """``sandbox.commands``: shell commands (bash) in the sandbox, in ``/workspace`` by default."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    async def run(self, cmd: str, *, background: bool = False, cwd: str | None = None,
                  env: dict[str, str] | None = None, timeout: float | None = None, stdin: str | None = None,
                  stdin_open: bool = False, check: bool = False, on_stdout: Any = None,
                  on_stderr: Any = None) -> Any:
        """Run ``cmd`` to its end and answer its :class:`CommandResult` (``timeout`` in seconds ends it, whole
        tree, with reason ``timeout``; ``check=True`` raises :class:`CommandExitError` on a non-zero exit;
        ``on_stdout``/``on_stderr`` get its text as it comes). With ``background=True``, answer at once an
        :class:`AsyncCommandHandle` (``stdin_open`` keeps its stdin open; ``timeout`` is then its lifetime, none by
        default); the callbacks then run while its ``wait()`` runs."""
        sandbox = self._sandbox
        if background:
            info = await sandbox._call(_api.start_command(sandbox.id, cmd, cwd=cwd, env=env, timeout_s=timeout,
                                                          stdin=stdin, stdin_open=stdin_open or None))
            return AsyncCommandHandle(self, info, on_stdout=on_stdout, on_stderr=on_stderr)
        if stdin_open:
            raise ValueError("stdin_open applies to background commands.")
        call = _api.run_command(sandbox.id, cmd, cwd=cwd, env=env, timeout_s=timeout, stdin=stdin)
        if on_stdout is None and on_stderr is None:
            result = CommandResult.from_dict(await sandbox._call(call))
            if check and result.exit_code != 0:
                raise CommandExitError(result)
            return result
        return await _follow(sandbox, call, on_stdout, on_stderr, check)

    async def list(self) -> builtins.list[dict[str, Any]]:
        """The sandbox's commands, running and recently ended: ``[{pid, command, status, exit_code, …}]``."""
        return builtins.list((await self._sandbox._call(_api.list_commands(self._sandbox.id)))["commands"])

    async def connect(self, pid: int, *, on_stdout: Any = None, on_stderr: Any = None) -> AsyncCommandHandle:
        """A handle on the command ``pid`` (raises :class:`~kernelhub.errors.NotFound` if the sandbox has none)."""
        info = await self._sandbox._call(_api.get_command(self._sandbox.id, pid))
        return AsyncCommandHandle(self, info, on_stdout=on_stdout, on_stderr=on_stderr)

    async def send_stdin(self, pid: int, data: str | bytes | None, *, eof: bool = False) -> None:
        """Write to the stdin of the command ``pid``; ``eof`` closes it after."""
        await self._sandbox._call(_api.command_stdin(self._sandbox.id, pid, data, eof))

    async def kill(self, pid: int) -> bool:
        """Kill the command ``pid`` and its whole process tree: True, or False if it had ended or is unknown."""
        try:
            await self._sandbox._call(_api.kill_command(self._sandbox.id, pid))
        except (Conflict, NotFound):
            return False
        return True


async def _follow(sandbox: AsyncSandbox, call: _api.Call, on_stdout: Any, on_stderr: Any,
                  check: bool) -> CommandResult:
    """Stream a command's events (``call``: a foreground run or a follow, as NDJSON): its text to the callbacks
    as it comes (awaited when they are coroutine functions), its :class:`CommandResult` at the end (``raw`` is
    the ended command); ``check`` raises :class:`CommandExitError` on a non-zero exit."""
    callbacks = {"stdout": on_stdout, "stderr": on_stderr}
    text: dict[str, builtins.list[str]] = {"stdout": [], "stderr": []}

    async def on_event(event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind in text:
            text[kind].append(str(event.get("text", "")))
            callback = callbacks[kind]
            if callback is not None:
                result = callback(event.get("text", ""))
                if inspect.isawaitable(result):
                    await result

    end = await sandbox._api.stream(call, on_event)
    command = dict(end.get("command") or {})
    result = CommandResult.from_dict({**command, "stdout": "".join(text["stdout"]), "stderr": "".join(text["stderr"])})
    result.raw = command
    if check and result.exit_code != 0:
        raise CommandExitError(result)
    return result


class AsyncSessions:
    """``sandbox.sessions``: more kernels (any language) or terminals in the same sandbox."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    async def create(self, type: str = "jupyter", language: str | None = None) -> dict[str, Any]:
        """Start a session; answers ``{id, sandbox_id, type, language?, state}``."""
        return await self._sandbox._call(_api.create_session(self._sandbox.id, type, language))  # type: ignore[no-any-return]

    async def execute(self, session_id: str, input: str, *,
                      timeout: float | None = None) -> Execution | TerminalOutput:
        """Code for a jupyter session (answers an :class:`Execution`) or keystrokes for a terminal (answers its
        :class:`TerminalOutput`)."""
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
    """A kernelhub sandbox, in the manner of E2B's ``AsyncSandbox``.

    ``async with AsyncSandbox.create() as sandbox:`` makes one and kills it on exit (or ``sandbox = await
    AsyncSandbox.create()``, then ``await sandbox.kill()`` and ``await sandbox.close()``). The gateway is
    ``url`` (else ``KERNELHUB_URL``, else ``http://127.0.0.1:8888``) and the API key ``token`` (else
    ``KERNELHUB_TOKEN``). Errors are the typed classes of :mod:`kernelhub.errors`.
    """

    def __init__(self, info: dict[str, Any], api: AsyncApiClient) -> None:
        self._info = info
        self._api = api
        self.files = AsyncFiles(self)
        self.commands = AsyncCommands(self)
        self.sessions = AsyncSessions(self)

    # -- making and finding ---------------------------------------------------------------------------

    @classmethod
    def create(cls, template: str = "python", *, limits: dict[str, Any] | None = None,
               env: dict[str, str] | None = None, metadata: dict[str, Any] | None = None,
               network: str | dict[str, Any] | None = None, timeout: float | None = None, url: str | None = None,
               token: str | None = None, request_timeout: float | None = None) -> _Creating:
        """Start a sandbox. ``network`` is its policy: ``"none"`` (the template's default), ``"open"`` or
        ``{"allow": [...], "deny": [...]}`` (API.md, "Network policy"). ``timeout`` is how long it may live, in
        seconds (``limits.max_lifetime_s``, as E2B's ``timeout``); ``request_timeout`` bounds each step of each
        HTTP request."""
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
        """Attach to an existing sandbox of this key (raises :class:`~kernelhub.errors.NotFound` if there is
        none)."""
        api = AsyncApiClient(url, token, request_timeout)
        try:
            return cls(await api.call(_api.get_sandbox(sandbox_id)), api)
        except BaseException:
            await api.aclose()
            raise

    @classmethod
    async def list(cls, *, url: str | None = None, token: str | None = None) -> builtins.list[dict[str, Any]]:
        """Every sandbox of this key, as the gateway describes them."""
        api = AsyncApiClient(url, token)
        try:
            return builtins.list((await api.call(_api.list_sandboxes()))["sandboxes"])
        finally:
            await api.aclose()

    # -- what it is -----------------------------------------------------------------------------------

    @property
    def id(self) -> str:
        return str(self._info["id"])

    sandbox_id = id

    @property
    def template(self) -> str:
        return str(self._info.get("template", ""))

    async def info(self) -> dict[str, Any]:
        """The sandbox as the gateway sees it now: ``{id, template, state, limits, sessions, …}``."""
        self._info = await self._call(_api.get_sandbox(self.id))
        return dict(self._info)

    async def set_network(self, network: str | dict[str, Any]) -> dict[str, Any]:
        """Give the running sandbox another network policy (``PATCH``, ``sandbox_update``): new connections
        follow it at once. Answers the sandbox as :meth:`info` does. Raises
        :class:`~kernelhub.errors.InvalidRequest` for a bad policy."""
        self._info = await self._call(_api.update_sandbox(self.id, network))
        return dict(self._info)

    async def is_running(self) -> bool:
        try:
            return (await self.info()).get("state") == "running"
        except NotFound:
            return False

    async def pause(self) -> dict[str, Any]:
        """Pause the sandbox: its processes stop and its memory is freed, its workspace and session ids are kept
        (state ``paused``; running code ends ``killed``, reason ``paused``). Answers the sandbox."""
        self._info = await self._call(_api.pause_sandbox(self.id))
        return dict(self._info)

    async def resume(self) -> dict[str, Any]:
        """Start a paused sandbox again on its workspace, with fresh kernels (their memory was lost) under the
        same session ids. Answers the sandbox."""
        self._info = await self._call(_api.resume_sandbox(self.id))
        return dict(self._info)

    async def metrics(self) -> dict[str, Any]:
        """CPU, memory, pids and disk usage against the sandbox's limits (API.md "metrics")."""
        return await self._call(_api.sandbox_metrics(self.id))  # type: ignore[no-any-return]

    async def logs(self, lines: int = 100) -> builtins.list[str]:
        """The last ``lines`` lines of the sandbox's log (kernel stderr, launcher messages)."""
        return builtins.list((await self._call(_api.sandbox_logs(self.id, lines)))["lines"])

    # -- running code ---------------------------------------------------------------------------------

    async def run_code(self, code: str, language: str | None = None, *, session_id: str | None = None,
                       on_stdout: Any = None, on_stderr: Any = None, on_result: Any = None, on_error: Any = None,
                       timeout: float | None = None, env: dict[str, str] | None = None) -> Execution:
        """Run code in the sandbox's kernel (or ``session_id``'s, or a kernel of ``language``), streamed over
        the websocket: ``on_stdout``/``on_stderr`` get text chunks in order, ``on_result`` each :class:`Result`,
        ``on_error`` the :class:`ExecutionError`; callbacks may be coroutine functions. Answers the ended
        :class:`Execution`; a timeout (``timeout`` seconds) shows as ``status == "timeout"``, not an exception.
        Cancelling the call, or a callback raising, interrupts the execution."""
        message: dict[str, Any] = {"code": code}
        for key, value in (("language", language), ("session_id", session_id), ("timeout_s", timeout),
                           ("env", env)):
            if value is not None:
                message[key] = value
        stream = ExecutionStream(on_stdout=on_stdout, on_stderr=on_stderr, on_result=on_result,
                                 on_error=on_error)
        return await self._api.stream_execute(self.id, message, stream, timeout)

    async def get_execution(self, execution_id: str) -> Execution:
        """An execution by id, ended or not (``execution_status``)."""
        return Execution.from_dict(await self._call(_api.get_execution(execution_id)))

    # -- ending ---------------------------------------------------------------------------------------

    async def kill(self) -> None:
        """Stop the sandbox and free everything it held. Killing one already gone is not an error."""
        try:
            await self._call(_api.delete_sandbox(self.id))
        except NotFound:
            pass

    async def close(self) -> None:
        """Release the HTTP connections (the sandbox keeps running)."""
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
        return f"<{type(self).__name__} {self.id} template={self.template!r} url={self._api.url!r}>"

    async def _call(self, call: _api.Call) -> Any:
        return await self._api.call(call)
