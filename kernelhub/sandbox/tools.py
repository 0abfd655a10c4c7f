"""Running the host's system tools (``mkfs.ext4``, ``mount``, ``umount``, ``losetup``) from the event loop.

Called by :mod:`kernelhub.sandbox.image` (the workspace's ext4 image) and :mod:`kernelhub.sandbox.sandbox`
(the run directory's tmpfs). Never through a shell, with a fixed ``PATH`` and locale instead of the gateway's
environment, and always within a time limit.
"""

from __future__ import annotations

import asyncio
import fcntl
import os

__all__ = ["TOOL_ENV", "TOOL_TIMEOUT_S", "data_fd", "run_tool"]

#: The whole environment of every tool: the system directories only, untranslated messages.
TOOL_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
#: Seconds a tool may take before it is killed.
TOOL_TIMEOUT_S = 60.0


async def run_tool(*argv: str, time_limit: float = TOOL_TIMEOUT_S, cwd: str | None = None) -> tuple[int, str]:
    """Run a system command (mkfs, mount, ...) without a shell, in ``cwd`` (default: the gateway's); answer its
    exit status and combined output.

    A tool that cannot be started answers 127 and the reason; one past ``time_limit`` seconds is killed and
    answers -1. A cancelled caller kills the tool before the cancellation goes on.
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=TOOL_ENV,
            cwd=cwd,
        )
    except OSError as exc:
        return 127, f"{argv[0]}: {exc.strerror or exc}"
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), time_limit)
    except TimeoutError:
        proc.kill()
        await proc.communicate()
        return -1, f"{argv[0]} did not finish within {time_limit:g} s"
    except asyncio.CancelledError:
        # A cancelled create must not leave mkfs or mount running behind the caller's back.
        if proc.returncode is None:
            proc.kill()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode("utf-8", "replace").strip()


def data_fd(name: str, data: bytes) -> int:
    """A new close-on-exec file descriptor that reads ``data`` from position 0 and cannot be changed (a sealed
    memfd named ``name``): how the launcher hands bubblewrap its ``--args`` and ``--seccomp`` data without a
    file anyone could swap. The caller owns it. Raises OSError."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return fd
