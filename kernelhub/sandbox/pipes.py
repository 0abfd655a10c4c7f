"""Host-side pipes to processes in a sandbox, read and written on the event loop.

The agent starts every process with stdio the gateway passed it (:meth:`Sandbox.spawn
<kernelhub.sandbox.sandbox.Sandbox.spawn>`); the gateway keeps the other ends of those pipes here:

- :func:`pump_lines` copies a pipe's lines into a log (kernels' stderr, bubblewrap's errors), each line
  bounded;
- :func:`run_piped` runs one process with its stdin fed from bytes and its stdout and stderr captured up to a
  shared cap, killed at a time limit (``command_execute``; the command service decides the numbers and what
  they mean to the caller).

Every read is non-blocking and driven by the event loop's reader callbacks: a process that writes without end
costs the gateway no thread and, past the cap, no memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sandbox import Sandbox

__all__ = ["LINGER_S", "PipedRun", "pump_lines", "run_piped"]

READ_BYTES = 65536
#: The longest line :func:`pump_lines` keeps together (bytes); longer ones are cut into pieces of this size.
MAX_LINE_BYTES = 8192
#: After the process exits, how long its background children may keep writing to the pipes it left them.
LINGER_S = 0.5


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


class _CappedOutput:
    """stdout and stderr of one process, at most ``limit`` bytes together; what does not fit is dropped."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.truncated = False
        self.chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}

    async def read(self, fd: int, stream: str) -> None:
        """Read ``fd`` to end of file into ``stream``. Cancelled, it stops reading (``fd`` stays open)."""
        chunks = self.chunks[stream]

        def keep(data: bytes) -> None:
            room = self.limit - self.size
            if room <= 0:
                self.truncated = True
                return
            if len(data) > room:
                self.truncated = True
                data = data[:room]
            self.size += len(data)
            chunks.append(data)

        try:
            await _read_to_eof(fd, keep)
        finally:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(fd)

    def joined(self, stream: str) -> bytes:
        return b"".join(self.chunks[stream])


async def _feed(fd: int, data: bytes) -> None:
    """Write ``data`` to the pipe ``fd`` as the reader takes it, then close ``fd``; a reader that closed its end
    ends the feeding quietly."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    view = memoryview(data)
    try:
        while view:
            try:
                n = os.write(fd, view)
                view = view[n:]
            except BlockingIOError:
                ready: asyncio.Future[None] = loop.create_future()

                def on_writable(r: asyncio.Future[None] = ready) -> None:
                    if not r.done():
                        r.set_result(None)

                loop.add_writer(fd, on_writable)
                try:
                    await ready
                finally:
                    loop.remove_writer(fd)
            except BrokenPipeError:
                return
    finally:
        os.close(fd)


@dataclasses.dataclass(frozen=True)
class PipedRun:
    """How a :func:`run_piped` process ended.

    ``status``: its exit status, negative for the signal that killed it (as ``os.waitstatus_to_exitcode``).
    ``stdout``/``stderr``: what it wrote, at most ``output_limit`` bytes together. ``truncated``: it wrote more
    than that. ``timed_out``: it was still running at ``timeout_s`` and was killed (SIGKILL to its process
    group).
    """

    status: int
    stdout: bytes
    stderr: bytes
    truncated: bool
    timed_out: bool


async def run_piped(
    sandbox: Sandbox,
    argv: Sequence[str],
    *,
    stdin: bytes,
    env: Mapping[str, str],
    cwd: str,
    timeout_s: float,
    output_limit: int,
) -> PipedRun:
    """Run ``argv`` in ``sandbox`` with ``stdin`` as its input and its output captured; called by the command
    service for ``command_execute``.

    Waits for the process to exit (or kills it at ``timeout_s`` seconds), then reads what its background
    children still write for at most :data:`LINGER_S` seconds. Raises what :meth:`Sandbox.spawn
    <kernelhub.sandbox.sandbox.Sandbox.spawn>` raises; every pipe is closed however this ends.
    """
    in_r, in_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    try:
        proc = await sandbox.spawn(argv, stdin=in_r, stdout=out_w, stderr=err_w, env=dict(env), cwd=cwd)
    except BaseException:
        for fd in (in_r, in_w, out_r, out_w, err_r, err_w):
            os.close(fd)
        raise
    finally:
        for fd in (in_r, out_w, err_w):
            with contextlib.suppress(OSError):
                os.close(fd)
    output = _CappedOutput(output_limit)
    readers = [
        asyncio.ensure_future(output.read(out_r, "stdout")),
        asyncio.ensure_future(output.read(err_r, "stderr")),
        asyncio.ensure_future(_feed(in_w, stdin)),
    ]
    timed_out = False
    try:
        try:
            status = await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            timed_out = True
            await proc.send_signal(signal.SIGKILL)
            status = await proc.wait()
        # Background children may hold the pipes open; give them a moment, then stop reading.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*readers[:2]), LINGER_S)
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for fd in (out_r, err_r):
            with contextlib.suppress(OSError):
                os.close(fd)
    return PipedRun(status=status, stdout=output.joined("stdout"), stderr=output.joined("stderr"),
                    truncated=output.truncated, timed_out=timed_out)
