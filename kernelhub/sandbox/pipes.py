"""Host-side pipes to processes in a sandbox, read and written on the event loop.

The agent starts every process with stdio the gateway passed it (:meth:`Sandbox.spawn
<kernelhub.sandbox.sandbox.Sandbox.spawn>`); the gateway keeps the other ends of those pipes here:

- :func:`pump_lines` copies a pipe's lines into a log (kernels' stderr, bubblewrap's errors), each line
  bounded;
- :func:`start_piped` starts a command: stdin a pipe the gateway writes (or closed at once), stdout and stderr
  handed chunk by chunk to a callback as they come, and the whole process tree in a cgroup of its own below the
  sandbox's, so that a signal or a kill reaches every process it started, the ones that made a session of their
  own included (:class:`PipedProcess`). The command service (:mod:`kernelhub.services.commands`) decides what
  is kept of the output, for how long, and when the tree is killed.

Every read is non-blocking and driven by the event loop's reader callbacks: a process that writes without end
costs the gateway no thread; what the output costs in memory is the callback's to bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from ..errors import Conflict, SandboxError
from .cgroups import Cgroup, signal_members

if TYPE_CHECKING:
    from .sandbox import Sandbox, SandboxProcess

__all__ = ["LINGER_S", "PipedProcess", "pump_lines", "start_piped"]

READ_BYTES = 65536
#: The longest line :func:`pump_lines` keeps together (bytes); longer ones are cut into pieces of this size.
MAX_LINE_BYTES = 8192
#: After the process exits, how long its background children may keep writing to the pipes it left them.
LINGER_S = 0.5
#: The longest a write to a command's stdin waits for the command to read (seconds).
STDIN_WRITE_TIMEOUT_S = 30.0


def _read_to_eof(fd: int, on_data: Callable[[bytes], None]) -> asyncio.Future[None]:
    """Read the pipe ``fd`` (made non-blocking) on the event loop, handing each chunk to ``on_data``; the
    future is done at end of file, when reading has stopped. Cancelling it does not stop the reading: the
    caller removes the reader."""
    loop = asyncio.get_running_loop()
    eof: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        try:
            data = os.read(fd, READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            if not eof.done():
                eof.set_result(None)
            return
        on_data(data)

    os.set_blocking(fd, False)
    loop.add_reader(fd, on_readable)
    return eof


def pump_lines(fd: int, emit: Callable[[str], None]) -> None:
    """Hand every line read from the pipe ``fd`` to ``emit`` (decoded, without its newline; at most
    :data:`MAX_LINE_BYTES` each) until end of file, then close ``fd``. Returns at once; called by the sandbox
    for its log pipes."""
    buf = bytearray()

    def on_data(data: bytes) -> None:
        buf.extend(data)
        # Bound what one unterminated line may hold.
        while b"\n" in buf or len(buf) > MAX_LINE_BYTES:
            newline = buf.find(b"\n")
            if 0 <= newline <= MAX_LINE_BYTES:
                emit(bytes(buf[:newline]).decode(errors="replace"))
                del buf[: newline + 1]
            else:  # a piece of a longer line: nothing of it is dropped
                emit(bytes(buf[:MAX_LINE_BYTES]).decode(errors="replace"))
                del buf[:MAX_LINE_BYTES]

    def on_eof(_eof: asyncio.Future[None]) -> None:
        os.close(fd)
        if buf:
            emit(buf.decode(errors="replace"))

    _read_to_eof(fd, on_data).add_done_callback(on_eof)


async def _writable(fd: int, timeout: float) -> None:
    """Wait until the pipe ``fd`` has room; raises TimeoutError after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def on_writable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fd, on_writable)
    try:
        await asyncio.wait_for(ready, timeout)
    finally:
        loop.remove_writer(fd)


def _tagged(on_output: Callable[[str, bytes], None], name: str) -> Callable[[bytes], None]:
    return lambda data: on_output(name, data)


class PipedProcess:
    """A command started by :func:`start_piped`: its process in the sandbox, the gateway's ends of its pipes and
    the cgroup that holds its whole process tree.

    ``pid`` is the process's pid inside the sandbox. :meth:`wait` answers its exit status (negative: the signal
    that killed it); :meth:`finished` also waits until its output was read to the end (or its background
    children kept the pipes open for :data:`LINGER_S` after it exited), after which no more output is read.
    ``tree`` is None without a cgroup (an unprivileged gateway): signals then reach its process group only.
    Made and driven by the command service; :meth:`release` frees what is left once it is forgotten.
    """

    def __init__(self, process: SandboxProcess, stdin: int | None, outputs: dict[str, int],
                 tree: Cgroup | None, on_output: Callable[[str, bytes], None]) -> None:
        assert process.pid is not None
        self.process = process
        self.pid: int = process.pid
        self.tree = tree
        self._stdin = stdin
        self._stdin_lock = asyncio.Lock()
        self._outputs = dict(outputs)
        loop = asyncio.get_running_loop()
        self._readers = [(fd, _read_to_eof(fd, _tagged(on_output, name))) for name, fd in outputs.items()]
        self._finished: asyncio.Future[int] = loop.create_future()
        self._watch = asyncio.ensure_future(self._drain())

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    @property
    def stdin_open(self) -> bool:
        return self._stdin is not None

    async def wait(self) -> int:
        """The exit status of the command's own process (not of what it left running)."""
        return await self.process.wait()

    async def finished(self) -> int:
        """The exit status, once the output was read to its end or :data:`LINGER_S` after the exit."""
        return await asyncio.shield(self._finished)

    async def _drain(self) -> None:
        status = await self.process.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(eof for _, eof in self._readers)), LINGER_S)
        self._stop_reading()
        self.close_stdin()
        if not self._finished.done():
            self._finished.set_result(status)

    def _stop_reading(self) -> None:
        loop = asyncio.get_running_loop()
        for fd, _eof in self._readers:
            with contextlib.suppress(Exception):
                loop.remove_reader(fd)
        for fd in self._outputs.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._readers, self._outputs = [], {}

    async def write_stdin(self, data: bytes, *, timeout: float = STDIN_WRITE_TIMEOUT_S) -> None:
        """Write ``data`` to the command's stdin as it reads it. Raises :class:`~kernelhub.errors.Conflict` when
        stdin is closed (or the command stopped reading it), :class:`SandboxError` when the command does not
        read it within ``timeout`` seconds."""
        async with self._stdin_lock:
            view = memoryview(data)
            while view:
                fd = self._stdin
                if fd is None:
                    raise Conflict(f"The stdin of process {self.pid} is closed.")
                try:
                    view = view[os.write(fd, view):]
                except BlockingIOError:
                    try:
                        await _writable(fd, timeout)
                    except TimeoutError:
                        raise SandboxError(f"Process {self.pid} did not read its stdin within {timeout:g} s.") \
                            from None
                except (BrokenPipeError, OSError):
                    self.close_stdin()
                    raise Conflict(f"Process {self.pid} closed its stdin.") from None

    def close_stdin(self) -> None:
        """Close the command's stdin (it reads end of file). Idempotent."""
        fd, self._stdin = self._stdin, None
        if fd is not None:
            os.close(fd)

    async def signal(self, signum: int) -> int:
        """Send ``signum`` to every process of the command's tree; answers how many were signalled (without a
        cgroup: the command's process group, counted as 1)."""
        if self.tree is not None:
            return signal_members(self.tree.pids, signum)
        if self.returncode is not None:
            return 0
        await self.process.send_signal(signum, group=True)
        return 1

    async def kill_tree(self) -> None:
        """SIGKILL every process of the tree and return once none is left (without a cgroup: its process group
        and every process of its session). Raises SandboxError if some are still there after
        :data:`~kernelhub.sandbox.cgroups.KILL_TIMEOUT_S`."""
        if self.tree is not None:
            await self.tree.kill_all()
            # The tree is gone; its exit still comes from the agent, which the tree may have stopped: the
            # process's own SIGKILL enforcement (a deadline, then the exit counted as a kill) covers that.
            await self.process.kill()
            return
        await self.process.kill()
        await self.process.wait()
        await self.process.kill_session()

    def tree_size(self) -> int:
        """How many processes the tree has now (without a cgroup: 1 while the command runs, else 0)."""
        if self.tree is not None:
            return len(self.tree.pids())
        return int(self.returncode is None)

    def release(self) -> None:
        """Forget the command: stop reading, close every pipe, and remove its cgroup if no process is left in it
        (processes it left running stay, in that cgroup, until the sandbox stops). Idempotent."""
        self._stop_reading()
        self.close_stdin()
        if not self._watch.done():
            self._watch.cancel()
        if self.tree is not None and self.returncode is not None:
            with contextlib.suppress(SandboxError):
                self.tree.remove_if_empty()


async def start_piped(
    sandbox: Sandbox,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str,
    on_output: Callable[[str, bytes], None],
    stdin: bool,
) -> PipedProcess:
    """Start ``argv`` in ``sandbox`` in a cgroup of its own (:meth:`Sandbox.command_cgroup
    <kernelhub.sandbox.sandbox.Sandbox.command_cgroup>`); ``on_output(stream, data)`` gets each chunk of its
    stdout (``"stdout"``) and stderr (``"stderr"``) on the event loop as it comes, and must not block. With
    ``stdin`` the command's stdin is a pipe the caller writes with :meth:`PipedProcess.write_stdin`; without, it
    reads end of file at once. Called by the command service. Raises what :meth:`Sandbox.spawn
    <kernelhub.sandbox.sandbox.Sandbox.spawn>` raises; nothing is left open or made when it fails.
    """
    tree = sandbox.command_cgroup()
    fds: list[int] = []
    try:
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        fds += [in_r, in_w]
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        fds += [out_r, out_w]
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        fds += [err_r, err_w]
        process = await sandbox.spawn(argv, stdin=in_r, stdout=out_w, stderr=err_w, env=dict(env), cwd=cwd,
                                      cgroup=tree)
    except BaseException:
        for fd in fds:
            os.close(fd)
        if tree is not None:
            # The process may have started without the agent saying so (the agent stopped, or its reply lost):
            # whatever joined the command's cgroup is ended from the host before the cgroup goes.
            with contextlib.suppress(SandboxError, OSError):
                if not tree.remove_if_empty():
                    await tree.remove()
        raise
    for fd in (in_r, out_w, err_w):
        os.close(fd)
    os.set_blocking(in_w, False)
    piped = PipedProcess(process, in_w, {"stdout": out_r, "stderr": err_r}, tree, on_output)
    if not stdin:
        piped.close_stdin()
    return piped
