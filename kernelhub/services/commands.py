"""Shell commands in a sandbox (``command_execute``): exit code, separate stdout and stderr, stdin, timeout.

Commands do not go through bash_kernel (KERNELS.md: 105 ms a round trip); the agent starts ``/bin/bash -c``
directly with host pipes as its stdio.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import InvalidRequest

if TYPE_CHECKING:
    from ..sandbox.sandbox import Sandbox


async def _read_capped(fd: int, limit: int, state: dict[str, Any], key: str) -> None:
    """Read a pipe to EOF, keeping at most ``limit`` bytes shared across stdout and stderr."""
    loop = asyncio.get_running_loop()
    chunks = state[key]
    done: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            if not done.done():
                done.set_result(None)
            return
        room = limit - state["size"]
        if room <= 0:
            state["truncated"] = True
            return
        if len(data) > room:
            state["truncated"] = True
            data = data[:room]
        state["size"] += len(data)
        chunks.append(data)

    os.set_blocking(fd, False)
    loop.add_reader(fd, on_readable)
    try:
        await done
    finally:
        with contextlib.suppress(Exception):
            loop.remove_reader(fd)


async def _feed(fd: int, data: bytes) -> None:
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


async def run_command(
    sandbox: Sandbox,
    command: str,
    *,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float,
    stdin: str | bytes | None = None,
    output_limit: int,
) -> dict[str, Any]:
    """Run ``command`` with bash in the sandbox as its uid; called by the hub for ``command_execute``."""
    if not isinstance(command, str) or not command.strip():
        raise InvalidRequest("command must be a non-empty string.")
    if "\x00" in command:
        raise InvalidRequest("command must not contain NUL bytes.")
    workdir = cwd or "/workspace"
    if not workdir.startswith("/"):
        workdir = "/workspace/" + workdir
    in_r, in_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    started = time.monotonic()
    try:
        proc = await sandbox.spawn(["/bin/bash", "-c", command], stdin=in_r, stdout=out_w, stderr=err_w,
                                   env=dict(env or {}), cwd=workdir)
    except BaseException:
        for fd in (in_r, in_w, out_r, out_w, err_r, err_w):
            os.close(fd)
        raise
    finally:
        for fd in (in_r, out_w, err_w):
            with contextlib.suppress(OSError):
                os.close(fd)
    data = stdin.encode() if isinstance(stdin, str) else (stdin or b"")
    state: dict[str, Any] = {"size": 0, "truncated": False, "stdout": [], "stderr": []}
    readers = [
        asyncio.ensure_future(_read_capped(out_r, output_limit, state, "stdout")),
        asyncio.ensure_future(_read_capped(err_r, output_limit, state, "stderr")),
        asyncio.ensure_future(_feed(in_w, data)),
    ]
    reason = None
    try:
        try:
            code = await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            reason = "timeout"
            await proc.send_signal(signal.SIGKILL)
            code = await proc.wait()
        # Background children may hold the pipes open; give them a moment, then stop reading.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*readers[:2]), 0.5)
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for fd in (out_r, err_r):
            with contextlib.suppress(OSError):
                os.close(fd)
    if reason is None and state["truncated"]:
        reason = "output_truncated"
    if reason is None and code == -signal.SIGKILL and sandbox.oom_kills() > 0:
        reason = "oom"
    result: dict[str, Any] = {
        "exit_code": code if code >= 0 else 128 - code,
        "stdout": b"".join(state["stdout"]).decode(errors="replace"),
        "stderr": b"".join(state["stderr"]).decode(errors="replace"),
        "duration_ms": int((time.monotonic() - started) * 1000),
    }
    if reason:
        result["reason"] = reason
    if state["truncated"]:
        result["truncated"] = True
    return result
