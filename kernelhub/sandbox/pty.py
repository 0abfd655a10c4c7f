"""PTYs for terminals: from the sandbox's own devpts instance, so that ``tty`` works inside, and the gateway's
side of them.

bubblewrap gives each sandbox its own ``/dev/pts``; a PTY opened on the host would not be a terminal there. The
master is reached through ``/proc/<pid>/root`` of bubblewrap's pid 1, never following a link the sandbox user
(who owns its ``/dev``) could plant. Where that fails, a host PTY still works, except that ``tty`` says
"not a tty".

Who calls what: :meth:`Sandbox.start_pty <kernelhub.sandbox.sandbox.Sandbox.start_pty>` opens a pair with
:func:`open_pty`, sizes it with :func:`set_window_size`, starts the shell on the slave and hands the master
to the terminal sessions (:mod:`kernelhub.services.terminals`) as a :class:`SandboxPty`: non-blocking reads and
writes on the event loop, the window size, and signals to the shell through the agent.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import fcntl
import logging
import os
import signal
import stat
import struct
import termios
from typing import TYPE_CHECKING

from ..errors import SandboxError

if TYPE_CHECKING:
    from .sandbox import SandboxProcess

log = logging.getLogger("kernelhub.sandbox")

DEFAULT_ROWS, DEFAULT_COLS = 24, 80
#: How much :meth:`SandboxPty.read` takes at once (bytes).
READ_SIZE = 65536
#: :meth:`SandboxPty.drain` returns once at most this much input (bytes) waits for the PTY.
DRAIN_LIMIT = 64 * 1024

_TIOCSPTLCK = 0x40045431  # unlockpt()
_TIOCGPTPEER = 0x5441  # open the slave of a master without a path lookup (Linux 4.13+)
_PTMX_RDEV = os.makedev(5, 2)


def _open_sandbox_ptmx(launcher_pid: int | None, sandbox_id: str) -> int | None:
    """Open ``/dev/pts/ptmx`` of the sandbox's own devpts instance, or None where it cannot be reached.

    The path is walked from ``/proc/<pid>/root`` of bubblewrap's pid 1 (the launcher's only child, checked by
    its parent pid through the same ``/proc`` entry) without following symlinks, and the node must be the
    ptmx device before it is opened: the sandbox user owns its ``/dev`` tmpfs and could plant anything else.
    """
    if launcher_pid is None:
        return None
    fds: list[int] = []

    def opened(fd: int) -> int:
        fds.append(fd)
        return fd

    try:
        with open(f"/proc/{launcher_pid}/task/{launcher_pid}/children") as f:
            children = f.read().split()
        if len(children) != 1:
            return None
        proc = opened(os.open(f"/proc/{int(children[0])}", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        stat_fd = opened(os.open("stat", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc))
        fields = os.read(stat_fd, 4096).rsplit(b")", 1)[1].split()
        if int(fields[1]) != launcher_pid:
            return None
        d = opened(os.open("root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=proc))
        for name in ("dev", "pts"):
            d = opened(os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d))
        node = opened(os.open("ptmx", os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d))
        st = os.fstat(node)
        if not stat.S_ISCHR(st.st_mode) or st.st_rdev != _PTMX_RDEV:
            return None
        # Reopening the O_PATH fd opens exactly the inode checked above.
        return os.open(f"/proc/self/fd/{node}", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except (OSError, ValueError, IndexError) as exc:
        log.debug("sandbox %s: no PTY from its devpts (%s); using a host PTY", sandbox_id, exc)
        return None
    finally:
        for fd in fds:
            os.close(fd)


def open_pty(launcher_pid: int | None, sandbox_id: str, uid: int, gid: int) -> tuple[int, int]:
    """A (master, slave) PTY pair for a shell in a sandbox; both close-on-exec, the caller closes them.
    Called by :meth:`Sandbox.open_pty`."""
    master = _open_sandbox_ptmx(launcher_pid, sandbox_id)
    if master is None:
        return os.openpty()
    try:
        fcntl.ioctl(master, _TIOCSPTLCK, struct.pack("i", 0))
        slave = fcntl.ioctl(master, _TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        os.close(master)
        return os.openpty()
    if os.geteuid() == 0:
        # Owned by the sandbox user (as on a login), not by a root it cannot map.
        with contextlib.suppress(OSError):
            os.fchown(slave, uid, gid)
    return master, slave


def set_window_size(fd: int, rows: int, cols: int) -> None:
    """Set the window size of the terminal ``fd`` belongs to (either side); the kernel sends SIGWINCH to its
    foreground process group."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class SandboxPty:
    """What terminado uses of ``ptyprocess.PtyProcessUnicode``, for a shell started by the sandbox's agent.

    Made by :meth:`Sandbox.start_pty <kernelhub.sandbox.sandbox.Sandbox.start_pty>`, which hands it ``fd`` (the
    master; closed by :meth:`close`) and the shell's ``process``; the terminal sessions' terminado manager
    reads it, clients write to it. ``pid`` is the shell's pid inside the sandbox: signals go through the agent,
    never ``os.kill`` on the host. All I/O happens on the event loop thread and never blocks.
    """

    #: terminado's ``PtyWithClients.terminate`` sleeps this long between signals.
    delayafterterminate = 0.1

    def __init__(self, fd: int, process: SandboxProcess) -> None:
        self.fd = fd
        self.process = process
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        os.set_blocking(fd, False)
        self._loop = asyncio.get_running_loop()
        self._out = bytearray()
        self._writing = False
        self._drained = asyncio.Event()
        self._drained.set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def isalive(self) -> bool:
        return self.process.returncode is None

    # -- I/O: on the event loop thread only -------------------------------------------------------------

    def read(self, size: int = READ_SIZE) -> str:
        """What the terminal printed, decoded; ``""`` when nothing is waiting. Raises EOFError once every
        holder of the slave is gone (or the PTY is closed)."""
        if self.fd < 0:
            raise EOFError("the PTY is closed")
        try:
            data = os.read(self.fd, size)
        except BlockingIOError:
            return ""
        except OSError as exc:  # EIO: the slave side is gone
            raise EOFError(str(exc)) from None
        if not data:
            raise EOFError("end of file")
        return self.decoder.decode(data)

    def write(self, text: str) -> int:
        """Queue ``text`` for the shell and write what the PTY takes now; never blocks. Await :meth:`drain`
        to wait for the queue to empty. Answers ``len(text)`` like ``ptyprocess``."""
        if self.fd < 0:
            return 0
        self._out += text.encode("utf-8", errors="replace")  # JSON may carry lone surrogates
        self._flush()
        return len(text)

    async def drain(self, limit: int = DRAIN_LIMIT) -> None:
        """Wait until at most ``limit`` bytes of input wait for the PTY (or it closed). Callers that take input
        from a network await this so that a shell not reading pushes back on the client."""
        while len(self._out) > limit and self.fd >= 0:
            self._drained.clear()
            await self._drained.wait()

    @property
    def pending_input(self) -> int:
        return len(self._out)

    def _flush(self) -> None:
        while self._out and self.fd >= 0:
            try:
                n = os.write(self.fd, self._out)
            except BlockingIOError:
                break
            except OSError:
                self._out.clear()  # the terminal is gone: nobody will read it
                break
            del self._out[:n]
        if self._out and self.fd >= 0:
            if not self._writing:
                self._loop.add_writer(self.fd, self._flush)
                self._writing = True
        else:
            if self._writing:
                self._loop.remove_writer(self.fd)
                self._writing = False
        if len(self._out) <= DRAIN_LIMIT or self.fd < 0:
            self._drained.set()

    def close(self, force: bool = True) -> None:
        """Close the master (idempotent). Called by terminado's manager on EOF and by the session's close."""
        if self.fd < 0:
            return
        if self._writing:
            self._loop.remove_writer(self.fd)
            self._writing = False
        os.close(self.fd)
        self.fd = -1
        self._out.clear()
        self._drained.set()

    # -- the window -------------------------------------------------------------------------------------

    def getwinsize(self) -> tuple[int, int]:
        """(rows, cols) of the terminal."""
        if self.fd < 0:
            return DEFAULT_ROWS, DEFAULT_COLS
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(self.fd, termios.TIOCGWINSZ, b"\0" * 8))
        return rows, cols

    def setwinsize(self, rows: int, cols: int) -> None:
        """Resize; the kernel sends SIGWINCH to the terminal's foreground process group."""
        if self.fd >= 0:
            set_window_size(self.fd, rows, cols)

    # -- signals (through the agent; the call returns before the signal is delivered) -------------------

    def kill(self, sig: int = signal.SIGTERM) -> None:
        """Signal the shell alone, as ``ptyprocess`` does."""
        self._signal(sig, group=False)

    def killpg(self, sig: int = signal.SIGTERM) -> None:
        """Signal the shell's process group (the shell and its foreground job)."""
        self._signal(sig, group=True)

    def _signal(self, sig: int, *, group: bool) -> None:
        async def send() -> None:
            with contextlib.suppress(SandboxError):
                await self.process.send_signal(sig, group=group)

        task = self._loop.create_task(send())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
