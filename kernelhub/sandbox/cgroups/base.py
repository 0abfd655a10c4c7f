"""What a sandbox's cgroup is on either version: :class:`Cgroup` (membership, killing every member, removal)
and :class:`CgroupMetrics`; :mod:`~kernelhub.sandbox.cgroups.v1` and :mod:`~kernelhub.sandbox.cgroups.v2`
supply limits, metrics and their ways of killing."""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import errno
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, ClassVar

from ...errors import SandboxError
from ..limits import Limits
from .fs import read, write
from .parsing import parse_pids

__all__ = ["FREEZE_WAIT_S", "KILL_TIMEOUT_S", "Cgroup", "CgroupMetrics", "poll_until", "signal_members",
           "sigkill_members"]

log = logging.getLogger("kernelhub.sandbox.cgroups")

# How long to wait for a v1 freezer or v2 cgroup.freeze to report frozen before killing anyway: a task in
# uninterruptible sleep can hold off freezing indefinitely, and SIGKILL reaches it once it wakes.
FREEZE_WAIT_S = 1.0
_POLL_S = 0.005
#: How long :meth:`Cgroup.kill_all` keeps killing before it gives up.
KILL_TIMEOUT_S = 10.0


async def poll_until(predicate: Callable[[], bool], until: float) -> bool:
    """Poll ``predicate`` until it holds (True) or the event loop's clock passes ``until`` (False).

    cgroupfs offers inotify on ``cgroup.events`` only for v2 and not for the v1 freezer; polling a few
    milliseconds apart is the one way that works on both.
    """
    loop = asyncio.get_running_loop()
    while True:
        if predicate():
            return True
        if loop.time() >= until:
            return False
        await asyncio.sleep(_POLL_S)


def _subtree(top: str) -> list[str]:
    """``top`` and every cgroup below it, deepest first (the order rmdir needs). Empty if ``top`` is gone."""
    return [dirpath for dirpath, _dirs, _files in os.walk(top, topdown=False)]


def _subtree_pids(top: str) -> set[int]:
    found: set[int] = set()
    for directory in _subtree(top):
        try:
            found |= parse_pids(read(os.path.join(directory, "cgroup.procs")))
        except FileNotFoundError:
            continue  # removed while we walked
    return found


def sigkill_members(members: Callable[[], set[int]]) -> int:
    """SIGKILL every pid ``members()`` returns; returns how many were signalled (see :func:`signal_members`)."""
    return signal_members(members, signal.SIGKILL)


def signal_members(members: Callable[[], set[int]], signum: int) -> int:
    """Send ``signum`` to every pid ``members()`` returns; returns how many were signalled.

    A pid read from ``cgroup.procs`` may exit and be reused by an unrelated host process before ``kill(2)``.
    Opening a pidfd first and seeing the pid still listed afterwards proves the pidfd names a member (a pid
    reused inside the group belongs to a member too), so nothing outside the group is ever signalled.
    """
    pidfds: dict[int, int | None] = {}
    try:
        for pid in members():
            try:
                pidfds[pid] = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            except OSError as e:
                if e.errno != errno.ENOSYS:
                    raise
                # Linux < 5.3 has no pidfds: plain kill(2) below, with the small reuse window that leaves.
                pidfds[pid] = None
        confirmed = members()
        signalled = 0
        for pid, pidfd in pidfds.items():
            if pid not in confirmed:
                continue
            try:
                if pidfd is None:
                    os.kill(pid, signum)
                else:
                    signal.pidfd_send_signal(pidfd, signum)
                signalled += 1
            except ProcessLookupError:
                continue
        return signalled
    finally:
        for pidfd in pidfds.values():
            if pidfd is not None:
                os.close(pidfd)



@dataclasses.dataclass(frozen=True)
class CgroupMetrics:
    """One reading of a cgroup's usage and limits, from :meth:`Cgroup.metrics`.

    Byte and count limits that are not set, or not enforced because the controller is missing, read
    :data:`UNLIMITED`; usage of a missing controller reads 0. ``memory_peak_bytes`` falls back to the current
    usage on v2 kernels without ``memory.peak`` (before 5.19).
    """

    cpu_seconds: float
    memory_bytes: int
    memory_peak_bytes: int
    memory_limit_bytes: int
    pids: int
    pids_limit: int
    oom_kills: int
    pids_max_hits: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Cgroup(abc.ABC):
    """One sandbox's cgroup, in every hierarchy it uses.

    Made by :func:`create_cgroup` or reattached by :func:`open_cgroup`; never constructed directly.
    ``controllers`` names the limits that are actually enforced (a subset of :data:`LIMIT_CONTROLLERS`).
    """

    version: ClassVar[int]

    def __init__(
        self, name: str, *, root: str, parent: str, paths: Iterable[str], controllers: Iterable[str]
    ) -> None:
        self.name = name
        self.root = root
        self.parent = parent
        #: The group's directory in each hierarchy, one per hierarchy (co-mounted controllers share one).
        self.paths: list[str] = list(dict.fromkeys(paths))
        self.controllers: set[str] = set(controllers)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.parent}/{self.name} controllers={sorted(self.controllers)}>"

    @property
    def procs_files(self) -> list[str]:
        """Every ``cgroup.procs`` file a process must write its own pid into to join.

        The launcher's ``/bin/sh`` writes ``$$`` into each before it execs bubblewrap (pitfall 2): moving a
        process in afterwards would let whatever it forked in between escape the limits.
        """
        return [os.path.join(path, "cgroup.procs") for path in self.paths]

    def exists(self) -> bool:
        """Whether any of the group's directories is still there."""
        return any(os.path.isdir(path) for path in self.paths)

    def add_pid(self, pid: int) -> None:
        """Move ``pid`` (not its already-forked children) into the group in every hierarchy.

        For processes started elsewhere; sandbox launches join by themselves through :attr:`procs_files`.
        Raises ProcessLookupError if the process is gone.
        """
        for procs in self.procs_files:
            try:
                write(procs, str(pid))
            except ProcessLookupError:
                raise
            except OSError as e:
                raise SandboxError(f"Cannot move pid {pid} into {procs}: {e.strerror}.") from e

    def pids(self) -> set[int]:
        """Every process in the group (and any group below it), over all hierarchies."""
        found: set[int] = set()
        for path in self.paths:
            found |= _subtree_pids(path)
        return found

    @abc.abstractmethod
    def apply(self, limits: Limits) -> None:
        """Write ``limits`` (memory without swap, CPU cores, pids) into the enforced controllers.

        Called by :func:`create_cgroup`, and on a live group by
        :meth:`Sandbox.retune <kernelhub.sandbox.sandbox.Sandbox.retune>` when a pooled sandbox is handed out
        with other limits. Raises SandboxError if the kernel refuses a value (e.g. a memory limit below what
        the group already uses and cannot reclaim).
        """

    @abc.abstractmethod
    def set_cpu_weight(self, weight: int) -> None:
        """Set the group's share of CPU time against its siblings when the CPUs are contended: ``weight`` in
        cgroup v2 ``cpu.weight`` units (1 to 10000, default :data:`~.parsing.CPU_WEIGHT_DEFAULT`), written as
        ``cpu.weight`` on v2 and as the proportional ``cpu.shares`` on v1 (:func:`~.parsing.cpu_shares`).

        The quota of :meth:`apply` still caps the group; the weight only decides who waits when the machine
        is busy. A group without the cpu controller keeps no weight (nothing happens). Called by the sandbox
        for pooled sandboxes, which start at a low weight and get the default one when handed out. Raises
        ValueError for a weight out of range, SandboxError if the kernel refuses the write.
        """

    @abc.abstractmethod
    def metrics(self) -> CgroupMetrics:
        """Read usage and limits. Called for usage reports and after a process died, before :meth:`remove`.

        Raises SandboxError once the group is gone.
        """

    @abc.abstractmethod
    def oom_kills(self) -> int:
        """How many processes the kernel's OOM killer ended in this group (pitfall 4)."""

    @abc.abstractmethod
    def pids_max_hits(self) -> int:
        """How many fork()s failed because the group was at ``pids.max``."""

    @abc.abstractmethod
    def child(self, name: str) -> Cgroup:
        """Create ``name`` below this group, for membership only: no limit of its own and none taken from this
        group's (its processes stay charged to this group's limits, which are hierarchical), so nothing it
        holds can escape them. A process joins it by writing ``0`` into each of its :attr:`procs_files`; every
        process it forks afterwards stays in it whatever session or process group it makes, which is what
        lets :meth:`kill_all` and :func:`signal_members` on the child reach a whole process tree.

        Called by :meth:`Sandbox.command_cgroup <kernelhub.sandbox.sandbox.Sandbox.command_cgroup>`; the
        sandbox's own :meth:`remove` takes the child away with it. Raises SandboxError if it cannot be made.
        """

    def remove_if_empty(self) -> bool:
        """Remove the group's directories if no process is left in them; True when they are gone. Never kills
        anything (that is :meth:`remove`): a group still holding processes is left as it is (False)."""
        for top in self.paths:
            for directory in _subtree(top):
                try:
                    os.rmdir(directory)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    if e.errno in (errno.EBUSY, errno.ENOTEMPTY):
                        return False
                    raise SandboxError(f"Cannot remove cgroup {directory}: {e.strerror}.") from e
        return True

    async def kill_all(self) -> None:
        """SIGKILL every process in the group, orphaned background ones included; return once none is left.

        Called by :meth:`remove`. Raises SandboxError if processes are
        still there after :data:`KILL_TIMEOUT_S` (a task stuck in uninterruptible sleep, say).
        """
        await self._kill_all(asyncio.get_running_loop().time() + KILL_TIMEOUT_S)

    @abc.abstractmethod
    async def _kill_all(self, deadline: float) -> None:
        """:meth:`kill_all`, giving up when the event loop's clock reaches ``deadline``."""

    def _check_metrics_possible(self) -> None:
        if not self.exists():
            raise SandboxError(f"cgroup {self.parent}/{self.name} no longer exists.")

    # The API promises remove(timeout=...); the error must be a SandboxError naming the group, not the bare
    # TimeoutError of asyncio.timeout().
    async def remove(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Kill every member, then remove the group's directories in every hierarchy.

        ``rmdir`` right after the last task died can still fail with EBUSY while the kernel finishes the
        exit (pitfall 5), so it is retried with short sleeps until ``timeout`` seconds have passed.
        Idempotent: a group that is already gone is fine. Called by the sandbox when it stops, by the
        factory's reaping and by :func:`cleanup_stale`.
        """
        deadline = asyncio.get_running_loop().time() + timeout
        if not self.exists():
            return
        await self._kill_all(deadline)
        for top in self.paths:
            for directory in _subtree(top):
                await self._rmdir(directory, deadline)

    async def _rmdir(self, directory: str, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                os.rmdir(directory)
                return
            except FileNotFoundError:
                return
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise SandboxError(f"Cannot remove cgroup {directory}: {e.strerror}.") from e
                if loop.time() >= deadline:
                    raise SandboxError(f"cgroup {directory} is still busy after killing its tasks.") from e
            if self.pids():  # something still exiting, or a straggler the kill did not see
                await self._kill_all(deadline)
            await asyncio.sleep(0.02)

    async def _kill_rounds(self, one_round: Callable[[float], Awaitable[None]], deadline: float) -> None:
        """Repeat ``one_round`` (one way of killing what is there now) until the group is empty."""
        loop = asyncio.get_running_loop()
        while self.pids():
            if loop.time() >= deadline:
                raise SandboxError(f"cgroup {self.parent}/{self.name} still has tasks after killing them.")
            try:
                await one_round(deadline)
            except FileNotFoundError:
                return  # the group was removed under us, so nothing is left in it
            # Killed tasks take a moment to leave cgroup.procs; a new round for them would only churn.
            await poll_until(lambda: not self.pids(), min(deadline, loop.time() + 0.1))

    async def _plain_round(self, deadline: float) -> None:
        """Kill without freezing, for hosts without a freezer: members may fork between reading and killing,
        so :meth:`_kill_rounds` repeats it; ``pids.max`` bounds how many can appear each round."""
        sigkill_members(self.pids)


