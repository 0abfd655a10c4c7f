"""PTYs for terminals: from the sandbox's own devpts instance, so that ``tty`` works inside.

bubblewrap gives each sandbox its own ``/dev/pts``; a PTY opened on the host would not be a terminal there. The
master is reached through ``/proc/<pid>/root`` of bubblewrap's pid 1, never following a link the sandbox user
(who owns its ``/dev``) could plant. Where that fails, a host PTY still works, except that ``tty`` says
"not a tty".
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import struct

log = logging.getLogger("kernelhub.sandbox")

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
