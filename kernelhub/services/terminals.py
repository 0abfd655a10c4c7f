"""Terminal sessions: a login shell on a PTY inside a sandbox, shared by websocket clients and ``session_execute``.

terminado supplies the terminal machinery (the read loop on the PTY master, broadcasting output to every
client, the replay buffer for reconnecting clients, sizing the terminal to its smallest client, the websocket
message shape). It normally spawns its shell on the host with ``ptyprocess``; here the shell is started by the
sandbox's agent (:meth:`Sandbox.start_pty <kernelhub.sandbox.sandbox.Sandbox.start_pty>`) and the gateway keeps
only the PTY master, as a :class:`~kernelhub.sandbox.pty.SandboxPty`: it duck-types what terminado uses of
``ptyprocess.PtyProcessUnicode`` (``fd``, ``pid``, ``read``, ``write``, ``close``, ``getwinsize``,
``setwinsize``, ``isalive``, ``kill``, ``delayafterterminate``, ``decoder``). The OS side (the PTY in the
sandbox's own devpts, so ``tty`` answers ``/dev/pts/N``; its I/O; signals through the agent) is
:mod:`kernelhub.sandbox.pty`'s. What stays here is the session policy, in two small terminado classes:

- :class:`SandboxTerminal` is a terminado ``PtyWithClients`` built around a ``SandboxPty`` instead of
  spawning one;
- :class:`SandboxTermManager` is a terminado ``TermManagerBase`` with exactly one terminal, the session's.

How a websocket handler attaches (:class:`kernelhub.handlers.terminal.TerminalWebSocket` does exactly this)::

    session = ...                              # a TerminalSession in state "running"
    self.term_manager = session.manager        # what terminado.TermSocket expects in self.term_manager
    self._blocking_io_executor = session.manager.blocking_io_executor
    self.size = (None, None)                   # rows, cols; set from ["set_size", rows, cols]
    self.terminal = session.manager.get_terminal()
    self.terminal.clients.append(self)         # from now on: self.on_pty_read(text), self.on_pty_died()
    # send ["setup", {}], then "".join(self.terminal.read_buffer) (what it printed before) as ["stdout", ...]
    # ["stdin", data]     -> self.terminal.ptyproc.write(data); await self.terminal.ptyproc.drain()
    # ["set_size", r, c]  -> self.size = (r, c); self.terminal.resize_to_smallest()
    # on close            -> self.terminal.clients.remove(self); self.terminal.resize_to_smallest()

A client is any object with ``size`` (``(rows, cols)``, ``None`` for unknown), ``on_pty_read(text)`` and
``on_pty_died()``. Everything runs on the event loop thread: ``SandboxPty.write`` never blocks (it queues
what the PTY does not take yet), and the manager's ``blocking_io_executor`` runs calls inline so that stock
``TermSocket.stdin_to_ptyproc`` writes on the loop too. A client that cannot keep up may call
:meth:`TerminalSession.pause_reading` / :meth:`TerminalSession.resume_reading`: while any client holds a pause
the master is not read, so the shell blocks on its own output instead of the gateway buffering it.

Closing a session hangs up the shell's process group, kills it, then kills whatever else is left in the
shell's session (background jobs, ``nohup``); a process that made a session of its own (``setsid``) lives on
until the sandbox stops, as a daemon outlives an ssh login.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import shlex
import signal
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from terminado.management import PtyWithClients, TermManagerBase
from tornado.ioloop import IOLoop

from ..errors import Conflict, SandboxError
from ..models import new_id
from ..sandbox.pty import DEFAULT_COLS, DEFAULT_ROWS, READ_SIZE, SandboxPty

if TYPE_CHECKING:
    from ..sandbox.sandbox import Sandbox, SandboxProcess

log = logging.getLogger("kernelhub.terminals")

#: The shell of every terminal session.
SHELL_ARGV = ("/bin/bash", "-l", "-i")
TERM_TYPE = "xterm-256color"
#: ``execute`` returns once the terminal has printed nothing for this long (or at its timeout).
QUIET_S = 0.3
#: How long ``start`` waits for the shell's first prompt: input typed before readline is ready echoes twice.
PROMPT_WAIT_S = 5.0
#: How long a hung-up shell has to exit before it is killed.
HANGUP_GRACE_S = 0.5
#: What a reconnecting client is replayed, at most (characters).
REPLAY_CHARS = 256 * 1024


# -- terminado's side ---------------------------------------------------------------------------------------


class SandboxTerminal(PtyWithClients):
    """terminado's terminal-with-clients around a :class:`SandboxPty` (``PtyWithClients.__init__`` would
    spawn a host process). ``clients``, ``read_buffer``, ``resize_to_smallest`` and ``terminate`` are
    terminado's."""

    ptyproc: SandboxPty

    def __init__(self, ptyproc: SandboxPty, name: str) -> None:
        self.clients: list[Any] = []
        self.read_buffer: collections.deque[str] = collections.deque()
        self.ptyproc = ptyproc
        self.term_name = name
        #: Characters read from the terminal so far.
        self.received = 0
        self._buffered = 0

    def record(self, text: str) -> None:
        """Keep ``text`` for clients that connect later, at most :data:`REPLAY_CHARS` in all."""
        self.received += len(text)
        self.read_buffer.append(text)
        self._buffered += len(text)
        while self._buffered > REPLAY_CHARS and len(self.read_buffer) > 1:
            self._buffered -= len(self.read_buffer.popleft())

    def killpg(self, sig: int = signal.SIGTERM) -> None:
        # terminado's would call os.getpgid on a pid of the sandbox's pid namespace.
        self.ptyproc.killpg(sig)


class _InlineExecutor(concurrent.futures.Executor):
    """Runs each call at once on the calling (event loop) thread. ``SandboxPty`` I/O never blocks and is
    not thread-safe, so terminado's ``run_on_executor`` writes must not go to a thread."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


_INLINE = _InlineExecutor()


class SandboxTermManager(TermManagerBase):
    """A terminado manager with one terminal: the session's. What ``terminado.TermSocket`` needs as its
    ``term_manager``; created by :class:`TerminalSession`, which starts and stops its reading."""

    def __init__(self, session: TerminalSession) -> None:
        super().__init__(shell_command=shlex.join(SHELL_ARGV), term_settings={"type": TERM_TYPE},
                         blocking_io_executor=_INLINE)
        self.session = session

    def get_terminal(self, url_component: Any = None) -> SandboxTerminal:
        """The session's terminal, whatever the URL says (the handler resolved the session already)."""
        terminal = self.session.terminal
        if terminal is None or self.session.state != "running":
            raise Conflict(f"Terminal session {self.session.id} is {self.session.state}.")
        return terminal

    def new_terminal(self, **kwargs: Any) -> PtyWithClients:
        raise NotImplementedError("terminals are started by TerminalSession.start")

    def pty_read(self, fd: int, events: Any = None) -> None:
        """Called by the event loop when the master is readable: broadcast what the terminal printed.

        terminado's version polls first (blocking the loop up to 100 ms on a spurious wake-up); the master is
        non-blocking here, so a read that finds nothing just returns."""
        terminal = self.ptys_by_fd.get(fd)
        if terminal is None:
            return
        try:
            text = terminal.ptyproc.read(READ_SIZE)
        except EOFError:
            self.on_eof(terminal)
            return
        if not text:
            return
        assert isinstance(terminal, SandboxTerminal)
        terminal.record(text)
        for client in list(terminal.clients):
            try:
                client.on_pty_read(text)
            except Exception:
                log.exception("terminal %s: a client failed to take output", terminal.term_name)

    def on_eof(self, ptywclients: PtyWithClients) -> None:
        """Every holder of the slave is gone: stop reading, tell the clients, end the session."""
        fd = ptywclients.ptyproc.fd
        if self.ptys_by_fd.pop(fd, None) is not None:
            IOLoop.current().remove_handler(fd)
        ptywclients.ptyproc.close()
        clients, ptywclients.clients = list(ptywclients.clients), []
        for client in clients:
            with contextlib.suppress(Exception):
                client.on_pty_died()
        self.session._ended()

    def stop_reading(self, terminal: SandboxTerminal) -> None:
        fd = terminal.ptyproc.fd
        if self.ptys_by_fd.pop(fd, None) is not None:
            IOLoop.current().remove_handler(fd)

    def set_reading(self, terminal: SandboxTerminal, on: bool) -> None:
        fd = terminal.ptyproc.fd
        if fd in self.ptys_by_fd:
            IOLoop.current().update_handler(fd, IOLoop.READ if on else 0)

    async def kill_all(self) -> None:
        await self.session.close()


class _Collector:
    """A terminal client that keeps what the terminal prints, for :meth:`TerminalSession.execute`."""

    size: tuple[int | None, int | None] = (None, None)

    def __init__(self, limit: int) -> None:
        self.chunks: list[str] = []
        self.length = 0
        self.limit = limit
        self.truncated = False
        self.died = False
        self.event = asyncio.Event()

    def on_pty_read(self, text: str) -> None:
        self.event.set()
        room = self.limit - self.length
        if len(text) > room:
            text = text[:max(room, 0)]
            self.truncated = True
        if text:
            self.chunks.append(text)
            self.length += len(text)

    def on_pty_died(self) -> None:
        self.died = True
        self.event.set()

    async def wait(self, timeout: float) -> bool:
        """True if something arrived within ``timeout``."""
        try:
            await asyncio.wait_for(self.event.wait(), timeout)
        except TimeoutError:
            return False
        self.event.clear()
        return True


# -- the session --------------------------------------------------------------------------------------------


class TerminalSession:
    """A shell on a PTY in a sandbox. Created and started by the hub (``session_create`` with type
    ``terminal``); driven by ``session_execute`` and by websocket clients attached through :attr:`manager`;
    closed by the hub (``session_close``, sandbox stop) or when the shell exits."""

    type: Literal["terminal"] = "terminal"
    language = None

    def __init__(self, sandbox: Sandbox, *, argv: Sequence[str] = SHELL_ARGV,
                 env: dict[str, str] | None = None) -> None:
        self.id = new_id("se")
        self.sandbox = sandbox
        self.sandbox_id = sandbox.id
        self.argv = list(argv)
        self.env = {"TERM": TERM_TYPE, **(env or {})}
        self.state = "starting"
        self.last_activity = time.time()
        self.process: SandboxProcess | None = None
        self.terminal: SandboxTerminal | None = None
        self.manager = SandboxTermManager(self)
        self._lock = asyncio.Lock()
        self._paused_by: set[int] = set()
        self._closing: asyncio.Future[None] | None = None
        self._watcher: asyncio.Task[None] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "sandbox_id": self.sandbox_id, "type": "terminal", "language": None,
                "state": self.state}

    @property
    def busy(self) -> bool:
        """True while a client is attached or an execute runs: the hub does not reap such a sandbox as idle."""
        return self.state == "running" and self.terminal is not None and bool(self.terminal.clients)

    # -- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the shell and wait for its first prompt (at most :data:`PROMPT_WAIT_S`)."""
        try:
            ptyproc = await self.sandbox.start_pty(self.argv, env=self.env, rows=DEFAULT_ROWS, cols=DEFAULT_COLS)
        except BaseException:
            self.state = "closed"
            raise
        self.process = ptyproc.process
        self.terminal = SandboxTerminal(ptyproc, self.id)
        self.manager.start_reading(self.terminal)
        self.state = "running"
        self._watcher = asyncio.ensure_future(self._watch(self.process))
        prompt = _Collector(REPLAY_CHARS)
        self.terminal.clients.append(prompt)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PROMPT_WAIT_S
        try:
            if await prompt.wait(PROMPT_WAIT_S):
                while loop.time() < deadline and await prompt.wait(0.05):
                    pass
        finally:
            with contextlib.suppress(ValueError):
                self.terminal.clients.remove(prompt)

    async def _watch(self, process: SandboxProcess) -> None:
        await process.wait()
        # Output the shell printed last may still wait in the master; the read loop takes it first.
        await asyncio.sleep(0.05)
        await self.close()

    def _ended(self) -> None:
        """The terminal hit EOF (called by the manager): end the session."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close(ended=True))

    async def close(self) -> None:
        """Hang up and kill the shell and what is left of its session, disconnect the clients, close the PTY.
        Idempotent; called by the hub, and by the session itself when the shell exits."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self, ended: bool = False) -> None:
        self.state = "closed"
        proc, terminal = self.process, self.terminal
        if proc is not None and self.sandbox.state == "running":
            try:
                if ended and proc.returncode is None:
                    # EOF: the shell is on its way out; let it exit with its own status.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(proc.wait(), HANGUP_GRACE_S)
                if proc.returncode is None:
                    await proc.send_signal(signal.SIGHUP)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(proc.wait(), HANGUP_GRACE_S)
                    await proc.send_signal(signal.SIGKILL)
                await proc.kill_session()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 5)
            except SandboxError:
                pass  # the sandbox stopped meanwhile: everything in it is gone
        if terminal is not None:
            # Whatever the shell printed last still reaches the clients, then they are told it ended.
            for _ in range(64):  # bounded: a process of another session may still hold the slave and write
                if terminal.ptyproc.fd not in self.manager.ptys_by_fd:
                    break
                before = terminal.received
                self.manager.pty_read(terminal.ptyproc.fd)
                if terminal.received == before:
                    break
            self.manager.stop_reading(terminal)
            clients, terminal.clients = list(terminal.clients), []
            for client in clients:
                with contextlib.suppress(Exception):
                    client.on_pty_died()
            terminal.ptyproc.close()
        watcher = self._watcher
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()

    # -- use ------------------------------------------------------------------------------------------

    async def execute(self, input: str, timeout: float) -> dict[str, Any]:
        """Type ``input`` (a newline is added if it does not end with one) and answer what the terminal
        printed until it was quiet for :data:`QUIET_S` or ``timeout`` passed: ``{"output": text}``, plus
        ``"reason": "output_truncated"`` past the sandbox's ``output_mb``. Called by the hub for
        ``session_execute``; one at a time per session."""
        async with self._lock:
            terminal = self.terminal
            if self.state != "running" or terminal is None:
                raise Conflict(f"Terminal session {self.id} is {self.state}.")
            self.last_activity = time.time()
            if not input.endswith("\n"):
                input += "\n"
            collector = _Collector(self.sandbox.limits.output_bytes)
            terminal.clients.append(collector)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            try:
                terminal.ptyproc.write(input)
                while not collector.died:
                    remaining = deadline - loop.time()
                    if remaining <= 0 or not await collector.wait(min(QUIET_S, remaining)):
                        break
            finally:
                with contextlib.suppress(ValueError):
                    terminal.clients.remove(collector)
                self.last_activity = time.time()
            out: dict[str, Any] = {"output": "".join(collector.chunks)}
            if collector.truncated:
                out["reason"] = "output_truncated"
            return out

    def resize(self, rows: int, cols: int) -> None:
        """Set the terminal's size directly (clients' sizes take over again on their next ``set_size``)."""
        if self.terminal is not None:
            self.terminal.ptyproc.setwinsize(rows, cols)

    def pause_reading(self, client: object) -> None:
        """Stop reading the terminal until ``client`` calls :meth:`resume_reading` (a slow websocket)."""
        if not self._paused_by and self.terminal is not None:
            self.manager.set_reading(self.terminal, False)
        self._paused_by.add(id(client))

    def resume_reading(self, client: object) -> None:
        self._paused_by.discard(id(client))
        if not self._paused_by and self.terminal is not None:
            self.manager.set_reading(self.terminal, True)
