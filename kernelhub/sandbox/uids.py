"""Host uids for sandboxes: one of its own per live sandbox, machine-wide.

``RLIMIT_NPROC`` counts per host uid and processes of one uid can signal and ptrace each other, so sandboxes
never share one (SECURITY.md pitfalls 7 and 13). :class:`~kernelhub.sandbox.factory.SandboxFactory` holds one
:class:`UidPool`: it acquires a uid for every new sandbox, releases it when the sandbox stops, and takes the
uids of dead processes' sandboxes with :meth:`UidPool.try_hold` before reaping them.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from pathlib import Path

from ..errors import CapacityExhausted

__all__ = ["UidPool"]


class UidPool:
    """Hands out host uids from a range, one per live sandbox (SECURITY.md pitfall 7).

    A uid is held by an ``flock`` on a file in ``lock_dir``, so two gateways (or a gateway and plain
    jupyter_client using our provisioner) on one machine never hand out the same uid.
    """

    def __init__(self, base: int, count: int, lock_dir: Path) -> None:
        if base < 1000 or count < 1:
            raise ValueError("the uid range must start at 1000 or above and hold at least one uid")
        self.base, self.count, self.lock_dir = base, count, lock_dir
        self._held: dict[int, int] = {}

    def acquire(self) -> int:
        """A uid nobody holds, now held by this pool; tried from a random point of the range. Raises
        :class:`SandboxError` (``capacity``) when every uid is held."""
        self.lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        start = secrets.randbelow(self.count)
        for i in range(self.count):
            uid = self.base + (start + i) % self.count
            if uid not in self._held and self._lock(uid):
                return uid
        raise CapacityExhausted("No free sandbox uid is left in the configured range.")

    def try_hold(self, uid: int) -> bool:
        """Take ``uid``'s lock if nobody holds it (used to reap sandboxes of dead processes)."""
        if uid in self._held:
            return False
        self.lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return self._lock(uid)

    def _lock(self, uid: int) -> bool:
        fd = os.open(self.lock_dir / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._held[uid] = fd
        return True

    def release(self, uid: int) -> None:
        """Let ``uid`` go (its sandbox stopped); a uid this pool does not hold is ignored."""
        fd = self._held.pop(uid, None)
        if fd is not None:
            os.close(fd)

    def held(self) -> set[int]:
        """The uids this pool holds now."""
        return set(self._held)
