"""The synchronous client: :class:`Sandbox`, a thin wrapper that runs :class:`~kernelhub.client.AsyncSandbox`
on one private event loop thread. There is no sync copy of any logic: each method hands the async one's
coroutine to the loop thread and waits for it.

This works from any thread, including one whose own event loop is running (a Jupyter cell): the caller's loop
is simply blocked while it waits, as for any sync call. Callbacks (``on_stdout=`` …) run in the *calling*
thread, in order, while the call waits (in Jupyter, that is what sends their output to the right cell); a
callback that raises, or a ``KeyboardInterrupt`` while waiting, cancels the call (an execution is interrupted)
and is raised once the call has wound down.
"""

from __future__ import annotations

import asyncio
import atexit
import builtins
import contextlib
import functools
import os
import queue
import threading
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

import httpx2

from ._async import (
    AsyncApiClient,
    AsyncCommandHandle,
    AsyncCommands,
    AsyncFiles,
    AsyncSandbox,
    AsyncSessions,
    new_http_client,
    shared_http,
)

P = ParamSpec("P")
R = TypeVar("R")
A = TypeVar("A")

#: Where a callback invoked on the loop thread sends its call, for the calling thread to make.
_caller_inbox: ContextVar[queue.SimpleQueue[Any]] = ContextVar("kernelhub_caller_inbox")
_DONE = object()


class _LoopThread:
    """One event loop on a daemon thread, shared by every sync client of the process, with one HTTP
    connection pool on it (so that a :class:`Sandbox` owns no sockets and needs no closing). Started on first
    use, and again in a forked child."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._http: httpx2.AsyncClient | None = None
        self._pid = 0

    def _ensure(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="kernelhub-client", daemon=True)
                thread.start()
                self._loop, self._thread, self._pid, self._http = loop, thread, os.getpid(), new_http_client()
            return self._loop

    def run(self, awaitable: Awaitable[R]) -> R:
        """Run ``awaitable`` on the loop thread and answer its result (or raise its error), making in this thread
        the callback calls it sends (see :func:`in_caller`)."""
        loop = self._ensure()
        if threading.current_thread() is self._thread:
            raise RuntimeError("The sync kernelhub client was called on its own loop thread; use AsyncSandbox.")
        inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        http = self._http

        async def main() -> R:
            _caller_inbox.set(inbox)
            shared_http.set(http)
            return await awaitable

        tasks: list[asyncio.Task[R]] = []

        def start() -> None:
            task = loop.create_task(main())
            task.add_done_callback(lambda _: inbox.put(_DONE))
            tasks.append(task)

        loop.call_soon_threadsafe(start)
        failure: BaseException | None = None
        while True:
            try:
                item = inbox.get()
                if item is _DONE:
                    break
                if failure is None:
                    callback, arg = item
                    callback(arg)
            except BaseException as exc:  # a callback's error, or KeyboardInterrupt while waiting
                if failure is None:
                    failure = exc
                    # Runs after start(): callbacks given to call_soon_threadsafe run in order.
                    loop.call_soon_threadsafe(lambda: tasks[0].cancel())
        if failure is not None:
            raise failure
        return tasks[0].result()

    def close(self) -> None:
        """Close the connection pool and stop the loop (at interpreter exit)."""
        loop, http = self._loop, self._http
        if loop is None or self._pid != os.getpid() or not loop.is_running():
            return
        if http is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(http.aclose(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)


_loop_thread = _LoopThread()
atexit.register(_loop_thread.close)


def in_caller(callback: Callable[[Any], Any] | None) -> Callable[[Any], None] | None:
    """``callback`` made from the loop thread as a call for the waiting thread to make (in order)."""
    if callback is None:
        return None

    def send(arg: Any) -> None:
        _caller_inbox.get().put((callback, arg))

    return send


def blocking(method: Callable[Concatenate[A, P], Awaitable[R]]) -> Callable[Concatenate[Any, P], R]:
    """The sync form of an async method of the object in ``self._async``: same arguments, same answer, same
    docstring; keyword arguments named ``on_*`` (callbacks) are called back in the calling thread."""

    @functools.wraps(method)
    def call(self: Any, *args: P.args, **kwargs: P.kwargs) -> R:
        for name, value in kwargs.items():
            if name.startswith("on_") and callable(value):
                kwargs[name] = in_caller(value)
        return _loop_thread.run(method(self._async, *args, **kwargs))

    return call


class ApiClient:
    """The sync form of :class:`~kernelhub.client.AsyncApiClient`: ``call`` a :mod:`~kernelhub.client._api`
    route and get its parsed answer, or ``stream`` one as NDJSON."""

    def __init__(self, url: str | None = None, token: str | None = None,
                 request_timeout: float | None = None) -> None:
        self._async = AsyncApiClient(url, token, request_timeout)

    @classmethod
    def _of(cls, api: AsyncApiClient) -> ApiClient:
        client = cls.__new__(cls)
        client._async = api
        return client

    @property
    def url(self) -> str:
        return self._async.url

    @property
    def token(self) -> str | None:
        return self._async.token

    @property
    def request_timeout(self) -> float:
        return self._async.request_timeout

    call = blocking(AsyncApiClient.call)
    stream = blocking(AsyncApiClient.stream)


class Files:
    """``sandbox.files``: the sandbox's ``/workspace``; the methods of :class:`~kernelhub.client.AsyncSandbox`'s
    ``files``, not awaited. ``write`` streams a binary file object from the calling thread's file."""

    def __init__(self, files: AsyncFiles) -> None:
        self._async = files

    write = blocking(AsyncFiles.write)
    read = blocking(AsyncFiles.read)
    list = blocking(AsyncFiles.list)
    remove = blocking(AsyncFiles.remove)
    exists = blocking(AsyncFiles.exists)


class CommandHandle:
    """A command running in the sandbox by its ``pid``: :class:`~kernelhub.client._async.AsyncCommandHandle`'s
    methods, not awaited (``wait`` calls ``on_stdout``/``on_stderr`` in the calling thread as the text comes)."""

    def __init__(self, handle: AsyncCommandHandle) -> None:
        self._async = handle

    @property
    def pid(self) -> int:
        return self._async.pid

    @property
    def info(self) -> dict[str, Any]:
        return self._async.info

    wait = blocking(AsyncCommandHandle.wait)
    refresh = blocking(AsyncCommandHandle.refresh)
    send_stdin = blocking(AsyncCommandHandle.send_stdin)
    close_stdin = blocking(AsyncCommandHandle.close_stdin)
    signal = blocking(AsyncCommandHandle.signal)
    kill = blocking(AsyncCommandHandle.kill)

    def __repr__(self) -> str:
        return f"<CommandHandle pid={self.pid} status={self.info.get('status')!r}>"


class Commands:
    """``sandbox.commands``: shell commands (bash) in the sandbox, in ``/workspace`` by default; the methods of
    :class:`~kernelhub.client._async.AsyncCommands`, not awaited, with a :class:`CommandHandle` for a background
    command."""

    def __init__(self, commands: AsyncCommands) -> None:
        self._async = commands

    _run = blocking(AsyncCommands.run)
    _connect = blocking(AsyncCommands.connect)
    list = blocking(AsyncCommands.list)
    send_stdin = blocking(AsyncCommands.send_stdin)
    kill = blocking(AsyncCommands.kill)

    def run(self, cmd: str, **kwargs: Any) -> Any:
        """:meth:`AsyncCommands.run <kernelhub.client._async.AsyncCommands.run>`: a :class:`CommandResult`, or
        with ``background=True`` a :class:`CommandHandle`."""
        answer = self._run(cmd, **kwargs)
        return CommandHandle(answer) if isinstance(answer, AsyncCommandHandle) else answer

    def connect(self, pid: int, **kwargs: Any) -> CommandHandle:
        """A :class:`CommandHandle` on the command ``pid``."""
        return CommandHandle(self._connect(pid, **kwargs))


class Sessions:
    """``sandbox.sessions``: more kernels (any language) or terminals in the same sandbox."""

    def __init__(self, sessions: AsyncSessions) -> None:
        self._async = sessions

    create = blocking(AsyncSessions.create)
    execute = blocking(AsyncSessions.execute)
    close = blocking(AsyncSessions.close)


class Sandbox:
    """A kernelhub sandbox, in the manner of E2B's ``Sandbox``: :class:`~kernelhub.client.AsyncSandbox`'s
    methods, not awaited.

    ``with Sandbox.create() as sandbox:`` makes one and kills it on exit. The gateway is ``url`` (else
    ``KERNELHUB_URL``, else ``http://127.0.0.1:8888``) and the API key ``token`` (else ``KERNELHUB_TOKEN``).
    Errors are the typed classes of :mod:`kernelhub.errors` (``NotFoundError`` is ``errors.NotFound``, …).
    """

    def __init__(self, info: dict[str, Any], api: ApiClient) -> None:
        self._api = api
        self._async = AsyncSandbox(info, api._async)
        self.files = Files(self._async.files)
        self.commands = Commands(self._async.commands)
        self.sessions = Sessions(self._async.sessions)

    @classmethod
    def _of(cls, sandbox: AsyncSandbox) -> Sandbox:
        return cls(sandbox._info, ApiClient._of(sandbox._api))

    # -- making and finding ---------------------------------------------------------------------------

    @classmethod
    def create(cls, template: str = "python", *, limits: dict[str, Any] | None = None,
               env: dict[str, str] | None = None, metadata: dict[str, Any] | None = None,
               network: str | dict[str, Any] | None = None, timeout: float | None = None, url: str | None = None,
               token: str | None = None, request_timeout: float | None = None) -> Sandbox:
        """Start a sandbox (see :meth:`AsyncSandbox.create <kernelhub.client.AsyncSandbox.create>` for
        ``network``). ``timeout`` is how long it may live, in seconds (``limits.max_lifetime_s``, as E2B's
        ``timeout``); ``request_timeout`` bounds each step of each HTTP request."""
        return cls._of(_loop_thread.run(AsyncSandbox.create(
            template, limits=limits, env=env, metadata=metadata, network=network, timeout=timeout, url=url,
            token=token, request_timeout=request_timeout)))

    @classmethod
    def connect(cls, sandbox_id: str, *, url: str | None = None, token: str | None = None,
                request_timeout: float | None = None) -> Sandbox:
        """Attach to an existing sandbox of this key (raises :class:`NotFoundError` if there is none)."""
        return cls._of(_loop_thread.run(AsyncSandbox.connect(sandbox_id, url=url, token=token,
                                                             request_timeout=request_timeout)))

    @classmethod
    def list(cls, *, url: str | None = None, token: str | None = None) -> builtins.list[dict[str, Any]]:
        """Every sandbox of this key, as the gateway describes them."""
        return _loop_thread.run(AsyncSandbox.list(url=url, token=token))

    # -- what it is -----------------------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self._async.id

    sandbox_id = id

    @property
    def template(self) -> str:
        return self._async.template

    info = blocking(AsyncSandbox.info)
    set_network = blocking(AsyncSandbox.set_network)
    is_running = blocking(AsyncSandbox.is_running)
    pause = blocking(AsyncSandbox.pause)
    resume = blocking(AsyncSandbox.resume)
    metrics = blocking(AsyncSandbox.metrics)
    logs = blocking(AsyncSandbox.logs)
    run_code = blocking(AsyncSandbox.run_code)
    get_execution = blocking(AsyncSandbox.get_execution)
    kill = blocking(AsyncSandbox.kill)
    close = blocking(AsyncSandbox.close)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        _loop_thread.run(self._async.__aexit__(exc_type, exc, tb))

    def __repr__(self) -> str:
        return f"<Sandbox {self.id} template={self.template!r} url={self._api.url!r}>"


__all__ = ["ApiClient", "CommandHandle", "Sandbox"]
