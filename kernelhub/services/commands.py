"""Commands in a sandbox: processes that stream their output, run in the background, and are re-attached by pid.

A command is a program (``bash -c <command line>`` on the REST API, any argv for E2B's ``process.Process``)
started by the agent with host pipes as its stdio, in a cgroup of its own below the sandbox's
(:func:`kernelhub.sandbox.pipes.start_piped`), so that its whole process tree can be signalled and killed, the
processes that made a session of their own included. It is addressed by its **pid as the sandbox sees it**
(what ``$$`` says inside, what E2B's SDK passes around); a pid is unique among a sandbox's live processes, and
the registry keeps the newest command under a pid the kernel gave out again.

This module is the policy (the OS side lives in the sandbox layer):

- **Foreground** (``command_execute``): the caller waits; the answer holds stdout and stderr up to the
  sandbox's ``output_mb`` (``truncated`` past it), as before. It is the same mechanism as the background case
  with one listener that keeps the whole output; a REST client that goes away kills it.
- **Background** (``background: true``, and every E2B ``Start``): the call answers at once with the pid; the
  command outlives the connection that started it and is bounded by the sandbox (it ends with the sandbox, and
  its processes count against its ``pids`` and memory).
- **Deadline**: a command still running at ``timeout_s`` gets SIGTERM on its whole tree, then, after
  ``kill_grace_s`` (or once the tree is empty), SIGKILL on whatever is left of it; reason ``timeout``. A
  foreground command's ``timeout_s`` is at most the sandbox's ``execution_timeout_s`` (its default, as
  before); a background command has no deadline of its own unless given one (at most the sandbox's
  ``max_lifetime_s``). Processes the command left running after it exited are no longer its own: they live on
  until they exit or the sandbox stops (``cmd &`` keeps working), in the command's cgroup.
- **Output kept for re-attaching**: the last ``output_buffer_bytes`` (1 MiB by default) of each command's
  stdout and stderr together, in the order they came. A re-attacher (:meth:`Command.follow`) gets everything
  since the start while less than that was written; otherwise a ``dropped`` mark with the count of bytes it
  cannot have, then the kept tail, then the live output. A follower slower than the command by more than the
  buffer skips ahead the same way: a slow client never holds up the command nor grows the gateway's memory.
- **Per sandbox**: at most ``max_live`` commands running at once (``max_commands_per_sandbox``, and never more
  than a quarter of the sandbox's ``pids`` limit), and at most ``ended_kept`` ended ones remembered for status
  and re-attach, the oldest forgotten first; so a sandbox's commands hold at most
  ``(max_live + ended_kept) * output_buffer_bytes`` of output (32 MiB with the defaults).

Built by :class:`~kernelhub.services.hub.Hub`; the REST command routes, the ``/stream`` websocket, MCP and the
E2B surface call it through the hub.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import contextlib
import posixpath
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from ..errors import Conflict, InvalidRequest, NotFound, QuotaExceeded, SandboxError
from ..models import iso
from ..sandbox import bwrap
from ..sandbox.cgroups.base import poll_until
from ..sandbox.pipes import PipedProcess, start_piped
from ..sandbox.sandbox import Sandbox
from .sandboxes import Sandboxes, SandboxRecord
from .tenants import Tenant
from .validation import check_env, check_timeout

#: Signals a caller may send by name (with or without the ``SIG`` prefix).
SIGNALS = {name: int(getattr(signal, name)) for name in (
    "SIGTERM", "SIGKILL", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGSTOP", "SIGCONT")}
#: The longest argv a command may have, and the most bytes it may hold together.
MAX_ARGS = 4096
MAX_ARGV_BYTES = 1024 * 1024
#: The most stdin one call may send (bytes); more is sent in several calls.
MAX_STDIN_BYTES = 8 * 1024 * 1024

#: A chunk of a followed command's output: (``"stdout"`` or ``"stderr"``, bytes), (``"dropped"``, how many bytes
#: the follower cannot have any more) or (``"end"``, None), always last.
Chunk = tuple[str, Any]


class OutputBuffer:
    """A command's stdout and stderr in the order they came, of which the last ``limit`` bytes are kept.

    Bytes are addressed by their offset in everything the command wrote (both streams together): ``start`` is
    the offset of the first byte still kept, ``end`` the count of all bytes written. Readers keep their own
    offset (:meth:`read`) and wait for more with :meth:`wait`; :meth:`close` wakes them for good.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.start = 0
        self.end = 0
        self.closed = False
        self._chunks: collections.deque[tuple[int, str, bytes]] = collections.deque()
        self._waiters: list[asyncio.Future[None]] = []

    def append(self, stream: str, data: bytes) -> None:
        self._chunks.append((self.end, stream, data))
        self.end += len(data)
        while self.end - self.start > self.limit:
            offset, name, first = self._chunks[0]
            excess = self.end - self.start - self.limit
            if len(first) <= excess:
                self._chunks.popleft()
                self.start = offset + len(first)
            else:
                self._chunks[0] = (offset + excess, name, first[excess:])
                self.start = offset + excess
        self._wake()

    def read(self, cursor: int) -> tuple[int, list[tuple[str, bytes]], int]:
        """What follows ``cursor``: (bytes no longer kept between it and what is, the kept chunks after it, the
        new cursor)."""
        dropped = max(0, self.start - cursor)
        cursor = max(cursor, self.start)
        out = []
        for offset, stream, data in self._chunks:
            if offset + len(data) <= cursor:
                continue
            out.append((stream, data[max(0, cursor - offset):]))
        return dropped, out, self.end

    async def wait(self, cursor: int) -> None:
        """Return once there is output after ``cursor`` or the buffer closed."""
        if self.end > cursor or self.closed:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


class _Collector:
    """A foreground command's whole output, up to ``limit`` bytes together (the sandbox's ``output_mb``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.truncated = False
        self.parts: dict[str, list[bytes]] = {"stdout": [], "stderr": []}

    def __call__(self, stream: str, data: bytes) -> None:
        room = self.limit - self.size
        if len(data) > room:
            self.truncated = True
            data = data[:max(0, room)]
        if data:
            self.size += len(data)
            self.parts[stream].append(data)

    def text(self, stream: str) -> str:
        return b"".join(self.parts[stream]).decode(errors="replace")


class Command:
    """One command: what was started, its state, its kept output and the process. Made by :class:`Commands`.

    ``status`` is ``"running"`` until the command's process exited and its output was read to the end, then
    ``"exited"`` with ``exit_status`` (negative: the signal that killed it) and maybe a ``reason``
    (``timeout``, ``killed``, ``oom``, or why the sandbox stopped).
    """

    def __init__(self, *, sandbox_id: str, argv: list[str], command: str | None, cwd: str, env: dict[str, str],
                 background: bool, tag: str | None, timeout_s: float | None, buffer_bytes: int) -> None:
        self.sandbox_id = sandbox_id
        self.argv = argv
        self.command = command
        self.cwd = cwd
        self.env = env
        self.background = background
        self.tag = tag
        self.timeout_s = timeout_s
        self.pid = 0
        self.status = "running"
        self.exit_status: int | None = None
        self.reason: str | None = None
        self.started_at = time.time()
        self.finished_at: float | None = None
        self.output = OutputBuffer(buffer_bytes)
        self.sinks: list[Callable[[str, bytes], None]] = []
        self.process: PipedProcess | None = None
        self._ended = asyncio.Event()

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def exit_code(self) -> int | None:
        """The shell's way: the exit status, or 128 + N when signal N killed it."""
        if self.exit_status is None:
            return None
        return self.exit_status if self.exit_status >= 0 else 128 - self.exit_status

    def on_output(self, stream: str, data: bytes) -> None:
        self.output.append(stream, data)
        for sink in self.sinks:
            sink(stream, data)

    async def wait(self) -> Command:
        """Return once the command ended (its output read to the end)."""
        await self._ended.wait()
        return self

    async def follow(self, *, replay: bool = True) -> AsyncIterator[Chunk]:
        """The command's output as :data:`Chunk` s: since its start (as far as it is kept, see the module) when
        ``replay``, else from now; live while it runs; ``("end", None)`` once it ended."""
        cursor = 0 if replay else self.output.end
        while True:
            dropped, chunks, cursor = self.output.read(cursor)
            if dropped:
                yield ("dropped", dropped)
            for chunk in chunks:
                yield chunk
            if self._ended.is_set() and cursor >= self.output.end:
                yield ("end", None)
                return
            await self.output.wait(cursor)

    def kept_output(self) -> dict[str, str]:
        """What is kept of its output now, as text: ``{"stdout", "stderr"}`` (for pollers: MCP's
        ``command_status``, ``?output=1``); ``dropped_bytes`` in :meth:`to_dict` says what is no longer kept."""
        parts: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        for stream, data in self.output.read(0)[1]:
            parts[stream].append(data)
        return {name: b"".join(chunks).decode(errors="replace") for name, chunks in parts.items()}

    def to_dict(self) -> dict[str, Any]:
        """The command as the REST API, MCP and the client show it."""
        end = self.finished_at if self.finished_at is not None else time.time()
        out: dict[str, Any] = {
            "pid": self.pid,
            "sandbox_id": self.sandbox_id,
            "command": self.command,
            "argv": self.argv,
            "cwd": self.cwd,
            "background": self.background,
            "status": self.status,
            "exit_code": self.exit_code,
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "duration_ms": int((end - self.started_at) * 1000),
            "timeout_s": self.timeout_s,
            "stdin_open": bool(self.process is not None and self.process.stdin_open and self.running),
            "output_bytes": self.output.end,
            "dropped_bytes": self.output.start,
        }
        if self.tag is not None:
            out["tag"] = self.tag
        if self.reason:
            out["reason"] = self.reason
        return out

    def _finish(self, status: int, reason: str | None) -> None:
        self.exit_status = status
        self.reason = self.reason or reason
        self.status = "exited"
        self.finished_at = time.time()
        self.output.close()
        self._ended.set()


async def text_events(command: Command, *, replay: bool = True) -> AsyncIterator[dict[str, Any]]:
    """A command's events as the REST NDJSON stream, the ``/stream`` websocket and MCP show them: ``{"type":
    "start", pid, command}``, then ``{"type": "stdout"|"stderr", pid, text}`` (UTF-8, decoded across chunk
    boundaries), ``{"type": "dropped", pid, bytes}`` where output was no longer kept, and always last
    ``{"type": "end", pid, command}``."""
    decoders = {name: codecs.getincrementaldecoder("utf-8")(errors="replace") for name in ("stdout", "stderr")}
    yield {"type": "start", "pid": command.pid, "command": command.to_dict()}
    async for kind, data in command.follow(replay=replay):
        if kind in decoders:
            text = decoders[kind].decode(data)
            if text:
                yield {"type": kind, "pid": command.pid, "text": text}
        elif kind == "dropped":
            for decoder in decoders.values():
                decoder.reset()
            yield {"type": "dropped", "pid": command.pid, "bytes": data}
        else:
            for name, decoder in decoders.items():
                rest = decoder.decode(b"", final=True)
                if rest:
                    yield {"type": name, "pid": command.pid, "text": rest}
            yield {"type": "end", "pid": command.pid, "command": command.to_dict()}


class _SandboxCommands:
    """The commands of one sandbox: the running ones by pid, and the last ended ones."""

    def __init__(self) -> None:
        self.live: dict[int, Command] = {}
        self.ended: collections.OrderedDict[int, Command] = collections.OrderedDict()

    def find(self, pid: int) -> Command | None:
        return self.live.get(pid) or self.ended.get(pid)


class Commands:
    """Every sandbox's commands, with the bounds of the module docstring. Built by the hub from its traitlets;
    forgets a sandbox's commands when the sandbox stops."""

    def __init__(self, sandboxes: Sandboxes, *, output_buffer_bytes: int, max_commands_per_sandbox: int,
                 ended_kept: int, kill_grace_s: float) -> None:
        self.sandboxes = sandboxes
        self.output_buffer_bytes = output_buffer_bytes
        self.max_commands_per_sandbox = max_commands_per_sandbox
        self.ended_kept = ended_kept
        self.kill_grace_s = kill_grace_s
        self._by_sandbox: dict[str, _SandboxCommands] = {}
        sandboxes.on_stop.append(self._forget)

    def _forget(self, record: SandboxRecord) -> None:
        self._by_sandbox.pop(record.id, None)

    def max_live(self, record: SandboxRecord) -> int:
        """How many commands may run in the sandbox at once."""
        return max(1, min(self.max_commands_per_sandbox, record.limits.pids // 4))

    # -- starting -----------------------------------------------------------------------------------------

    async def start(self, tenant: Tenant, sandbox_id: object, command: object = None, *, argv: object = None,
                    cwd: object = None, env: object = None, timeout_s: object = None, stdin: object = None,
                    stdin_open: bool = False, background: bool = True, tag: object = None) -> Command:
        """Start a command and answer it running (see the module for what ``background`` and ``timeout_s``
        mean). Exactly one of ``command`` (a bash command line) and ``argv`` (a program and its arguments) is
        given. ``cwd`` is relative to /workspace unless absolute; ``stdin`` (text or bytes) is written first,
        then stdin is closed unless ``stdin_open``. Raises :class:`~kernelhub.errors.InvalidRequest` for bad
        arguments, :class:`~kernelhub.errors.QuotaExceeded` when the sandbox runs as many commands as it may,
        :class:`~kernelhub.errors.NotFound` / ``sandbox_not_running`` for the sandbox, and what starting a
        process raises (``pids`` at the sandbox's process limit)."""
        record, sandbox = self.sandboxes.running(tenant, sandbox_id)
        args = _argv(command, argv)
        workdir = _cwd(cwd)
        env_vars = check_env(env)
        if tag is not None and (not isinstance(tag, str) or len(tag) > 256 or not _utf8(tag)):
            raise InvalidRequest("tag must be a string of at most 256 characters.")
        if background:
            timeout = None if timeout_s is None else check_timeout(timeout_s, record.limits.max_lifetime_s)
        else:
            timeout = check_timeout(timeout_s, record.limits.execution_timeout_s)
        data = _stdin_bytes(stdin)
        registry = self._by_sandbox.setdefault(record.id, _SandboxCommands())
        if len(registry.live) >= self.max_live(record):
            raise QuotaExceeded(f"Sandbox {record.id} already runs {len(registry.live)} commands, as many as it "
                                "may; wait for one to end or kill one.")
        cmd = Command(sandbox_id=record.id, argv=args, command=command if isinstance(command, str) else None,
                      cwd=workdir, env=env_vars, background=background, tag=tag, timeout_s=timeout,
                      buffer_bytes=self.output_buffer_bytes)
        process = await start_piped(sandbox, args, env=env_vars, cwd=workdir, on_output=cmd.on_output,
                                    stdin=bool(data) or stdin_open)
        cmd.process, cmd.pid = process, process.pid
        old = registry.live.pop(cmd.pid, None) or registry.ended.pop(cmd.pid, None)
        if old is not None and old.process is not None:
            old.process.release()
        registry.live[cmd.pid] = cmd
        record.busy += 1
        self.sandboxes.spawn(self._run(record, sandbox, registry, cmd, data, stdin_open))
        return cmd

    async def _run(self, record: SandboxRecord, sandbox: Sandbox, registry: _SandboxCommands, cmd: Command,
                   data: bytes, stdin_open: bool) -> None:
        """A command from start to end: feed its stdin, keep its deadline, record how it ended."""
        process = cmd.process
        assert process is not None
        oom0 = sandbox.oom_kills()
        feeder = asyncio.ensure_future(self._feed(process, data, stdin_open)) if data else None
        try:
            try:
                status = await asyncio.wait_for(process.wait(), cmd.timeout_s)
            except TimeoutError:
                cmd.reason = "timeout"
                sandbox.log(f"command {cmd.pid} ran past its {cmd.timeout_s:g} s; ending its processes")
                await self._terminate(process)
            status = await process.finished()
        finally:
            if feeder is not None:
                feeder.cancel()
            record.busy -= 1
            record.touch()
        reason = None
        if status == -signal.SIGKILL and sandbox.oom_kills() > oom0:
            reason = "oom"
        elif sandbox.state != "running":
            reason = record.reason or sandbox.reason or "stopped"
        cmd._finish(status, reason)
        if registry.live.get(cmd.pid) is cmd:
            del registry.live[cmd.pid]
            registry.ended[cmd.pid] = cmd
        while len(registry.ended) > self.ended_kept:
            _pid, oldest = registry.ended.popitem(last=False)
            if oldest.process is not None:
                oldest.process.release()
        for ended in registry.ended.values():
            # Its cgroup goes once empty; so do those of earlier ones whose left-behind processes exited since.
            if ended.process is not None:
                ended.process.release()

    async def _feed(self, process: PipedProcess, data: bytes, keep_open: bool) -> None:
        with contextlib.suppress(Conflict, SandboxError):
            await process.write_stdin(data)
        if not keep_open:
            process.close_stdin()

    async def _terminate(self, process: PipedProcess) -> None:
        """SIGTERM to the whole tree; SIGKILL to what is left of it after the grace (or at once, when the tree
        is already gone)."""
        with contextlib.suppress(SandboxError):
            await process.signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        await poll_until(lambda: process.tree_size() == 0, loop.time() + self.kill_grace_s)
        with contextlib.suppress(SandboxError):
            await process.kill_tree()

    # -- foreground ---------------------------------------------------------------------------------------

    async def run(self, tenant: Tenant, sandbox_id: object, command: object, cwd: object = None,
                  env: object = None, timeout_s: object = None, stdin: object = None,
                  listener: Callable[[Command], None] | None = None) -> dict[str, Any]:
        """``command_execute``: run ``command`` in the foreground and answer ``{exit_code, stdout, stderr,
        duration_ms, pid, reason?, truncated?}`` (output up to the sandbox's ``output_mb``). ``listener`` gets
        the command as soon as it started (to stream it). Cancelled (the caller went away), it kills the
        command's tree. Raises what :meth:`start` raises."""
        if not isinstance(command, str):
            raise InvalidRequest("command must be a string.")
        if stdin is not None and not isinstance(stdin, str):
            raise InvalidRequest("stdin must be a string.")
        record, _ = self.sandboxes.running(tenant, sandbox_id)
        cmd = await self.start(tenant, sandbox_id, command, cwd=cwd, env=env, timeout_s=timeout_s, stdin=stdin,
                               background=False)
        collector = _Collector(record.limits.output_bytes)
        for stream, data in cmd.output.read(0)[1]:
            collector(stream, data)
        cmd.sinks.append(collector)
        if listener is not None:
            listener(cmd)
        try:
            await asyncio.shield(cmd.wait())
        except asyncio.CancelledError:
            if cmd.running:
                self.sandboxes.spawn(self._kill(cmd, "cancelled"))
            raise
        result: dict[str, Any] = {
            "exit_code": cmd.exit_code,
            "stdout": collector.text("stdout"),
            "stderr": collector.text("stderr"),
            "duration_ms": cmd.to_dict()["duration_ms"],
            "pid": cmd.pid,
        }
        reason = cmd.reason or ("output_truncated" if collector.truncated else None)
        if reason:
            result["reason"] = reason
        if collector.truncated:
            result["truncated"] = True
        return result

    # -- finding and steering -----------------------------------------------------------------------------

    def _registry(self, tenant: Tenant, sandbox_id: object) -> tuple[SandboxRecord, _SandboxCommands]:
        record, _ = self.sandboxes.running(tenant, sandbox_id)
        return record, self._by_sandbox.setdefault(record.id, _SandboxCommands())

    def list(self, tenant: Tenant, sandbox_id: object, *, ended: bool = True) -> list[Command]:
        """The sandbox's commands, oldest first: the running ones and (``ended``) the remembered ended ones."""
        _, registry = self._registry(tenant, sandbox_id)
        found = list(registry.live.values()) + (list(registry.ended.values()) if ended else [])
        return sorted(found, key=lambda c: c.started_at)

    def get(self, tenant: Tenant, sandbox_id: object, pid: object) -> Command:
        """The command of ``pid`` in the sandbox, running or remembered. Raises
        :class:`~kernelhub.errors.NotFound` (an unknown pid, or one of a process that is not a command) and
        :class:`~kernelhub.errors.InvalidRequest` for a pid that is not a whole number."""
        number = _pid(pid)
        record, registry = self._registry(tenant, sandbox_id)
        cmd = registry.find(number)
        if cmd is None:
            raise NotFound(f"No command with pid {number} in sandbox {record.id}.")
        return cmd

    def find_tag(self, tenant: Tenant, sandbox_id: object, tag: object) -> Command:
        """The running command started with ``tag`` (E2B's process selector). Raises
        :class:`~kernelhub.errors.NotFound`."""
        record, registry = self._registry(tenant, sandbox_id)
        for cmd in registry.live.values():
            if cmd.tag is not None and cmd.tag == tag:
                return cmd
        raise NotFound(f"No running command tagged {str(tag)[:64]!r} in sandbox {record.id}.")

    def _running(self, tenant: Tenant, sandbox_id: object, pid: object) -> tuple[Command, PipedProcess]:
        cmd = self.get(tenant, sandbox_id, pid)
        if not cmd.running or cmd.process is None:
            raise Conflict(f"Command {cmd.pid} already ended (exit code {cmd.exit_code}).")
        return cmd, cmd.process

    async def send_stdin(self, tenant: Tenant, sandbox_id: object, pid: object, data: object = None,
                         eof: bool = False) -> Command:
        """Write ``data`` (text or bytes, at most :data:`MAX_STDIN_BYTES`) to the command's stdin, then close
        it if ``eof``. Raises :class:`~kernelhub.errors.Conflict` when the command ended or its stdin is
        closed."""
        cmd, process = self._running(tenant, sandbox_id, pid)
        payload = _stdin_bytes(data)
        if payload:
            await process.write_stdin(payload)
        elif not eof and not process.stdin_open:
            raise Conflict(f"The stdin of command {cmd.pid} is closed.")
        if eof:
            process.close_stdin()
        return cmd

    async def signal(self, tenant: Tenant, sandbox_id: object, pid: object, name: object) -> int:
        """Send the signal ``name`` (``SIGTERM``, ``TERM``, … of :data:`SIGNALS`) to every process of the
        command's tree; answers how many processes got it. ``SIGKILL`` is :meth:`kill`."""
        signum = signal_number(name)
        if signum == signal.SIGKILL:
            await self.kill(tenant, sandbox_id, pid)
            return 1
        _cmd, process = self._running(tenant, sandbox_id, pid)
        return await process.signal(signum)

    async def kill(self, tenant: Tenant, sandbox_id: object, pid: object) -> Command:
        """Kill the command's whole tree at once (SIGKILL) and answer it ended, reason ``killed``."""
        cmd, _process = self._running(tenant, sandbox_id, pid)
        await self._kill(cmd, "killed")
        return await cmd.wait()

    async def _kill(self, cmd: Command, reason: str) -> None:
        if cmd.process is None or not cmd.running:
            return
        cmd.reason = cmd.reason or reason
        with contextlib.suppress(SandboxError):
            await cmd.process.kill_tree()


def signal_number(name: object) -> int:
    """The number of a signal named as in :data:`SIGNALS` (``"SIGTERM"`` or ``"TERM"``, any case). Raises
    :class:`~kernelhub.errors.InvalidRequest` naming the allowed ones."""
    if isinstance(name, str):
        key = name.strip().upper()
        key = key if key.startswith("SIG") else "SIG" + key
        if key in SIGNALS:
            return SIGNALS[key]
    raise InvalidRequest(f"signal must be one of {', '.join(SIGNALS)}.")


def _pid(pid: object) -> int:
    if isinstance(pid, str) and pid.isdigit() and len(pid) < 10:
        pid = int(pid)
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < 1 << 31:
        raise InvalidRequest("pid must be a positive whole number.")
    return pid


def _argv(command: object, argv: object) -> list[str]:
    if (command is None) == (argv is None):
        raise InvalidRequest("Give either command (a bash command line) or argv (a program and its arguments).")
    if command is not None:
        if not isinstance(command, str) or not command.strip():
            raise InvalidRequest("command must be a non-empty string.")
        args = ["/bin/bash", "-c", command]
    else:
        if not isinstance(argv, Sequence) or isinstance(argv, str) or not argv or \
                not all(isinstance(a, str) for a in argv):
            raise InvalidRequest("argv must be a non-empty list of strings.")
        args = list(argv)
        if not args[0]:
            raise InvalidRequest("argv[0] must name a program.")
    if any("\x00" in a for a in args):
        raise InvalidRequest("command must not contain NUL bytes.")
    if not all(_utf8(a) for a in args):
        raise InvalidRequest("command must be valid UTF-8 text.")
    if len(args) > MAX_ARGS or sum(len(a.encode()) for a in args) > MAX_ARGV_BYTES:
        raise InvalidRequest(f"A command may have at most {MAX_ARGS} arguments of {MAX_ARGV_BYTES} bytes together.")
    return args


def _utf8(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8: JSON lets a request carry lone surrogates, which no program takes."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _cwd(cwd: object) -> str:
    if cwd is None or cwd == "":
        return bwrap.INNER_WORKSPACE
    if not isinstance(cwd, str) or "\x00" in cwd or len(cwd) > 4096 or not _utf8(cwd):
        raise InvalidRequest("cwd must be a path string.")
    return cwd if cwd.startswith("/") else posixpath.join(bwrap.INNER_WORKSPACE, cwd)


def _stdin_bytes(data: object) -> bytes:
    if data is None:
        return b""
    if isinstance(data, str):
        data = data.encode(errors="replace")  # a lone surrogate (JSON allows one) becomes "?"
    if not isinstance(data, (bytes, bytearray)):
        raise InvalidRequest("stdin must be a string.")
    if len(data) > MAX_STDIN_BYTES:
        raise InvalidRequest(f"stdin may be at most {MAX_STDIN_BYTES} bytes a call.")
    return bytes(data)


__all__ = ["SIGNALS", "Chunk", "Command", "Commands", "OutputBuffer", "signal_number", "text_events"]
