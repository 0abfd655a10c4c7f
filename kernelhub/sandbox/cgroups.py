"""Per-sandbox cgroups on cgroup v1 and v2: create, limit, measure, kill every member, remove.

Who calls what:

- the sandbox service calls :func:`create_cgroup` when a sandbox is created and hands
  :attr:`Cgroup.procs_files` to the launcher (:func:`kernelhub.sandbox.bwrap.launch_argv`), whose
  ``/bin/sh`` writes its own pid into each file before it execs bubblewrap, so nothing the sandbox runs ever
  starts outside the group (SECURITY.md pitfall 2);
- when something in the sandbox dies, the service reads :meth:`Cgroup.oom_kills` and
  :meth:`Cgroup.pids_max_hits` to tell an OOM kill from a timeout kill (exit 137 alone cannot: pitfall 4), and
  :meth:`Cgroup.metrics` for usage reports;
- when the sandbox ends, the service awaits :meth:`Cgroup.remove` (pitfall 5);
- after a gateway restart the registry reattaches with :func:`open_cgroup` and removes groups that no sandbox
  owns any more with :func:`cleanup_stale`;
- ``kernelhub doctor`` shows :func:`probe`.

Both layouts are supported, told apart by ``statfs`` (pitfall 3): v1 has one hierarchy per controller (or
co-mounted ones such as ``cpu,cpuacct``) under a tmpfs, v2 is a single ``cgroup2`` mount. A v2 mount without
controllers (``/sys/fs/cgroup/unified`` on a hybrid host) still gives membership, ``cgroup.kill`` and CPU
accounting, but no limits; ``require=`` decides whether that is acceptable.

Only directories below a folder named ``kernelhub`` are ever created or removed. The one write outside it is
enabling controllers in the v2 root's ``cgroup.subtree_control``, and only when they are not enabled yet.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import ctypes
import dataclasses
import errno
import functools
import logging
import os
import re
import secrets
import signal
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, ClassVar

from cgroupspy.controllers import CpuAcctController, CpuController, MemoryController
from cgroupspy.nodes import Node

from ..errors import IsolationUnavailable, SandboxError
from .limits import Limits

__all__ = [
    "CGROUP2_SUPER_MAGIC",
    "CGROUP_SUPER_MAGIC",
    "CPU_PERIOD_US",
    "KILL_TIMEOUT_S",
    "DEFAULT_PARENT",
    "DEFAULT_ROOT",
    "LIMIT_CONTROLLERS",
    "UNLIMITED",
    "V1_CONTROLLERS",
    "Cgroup",
    "CgroupMetrics",
    "CgroupV1",
    "CgroupV2",
    "cleanup_stale",
    "cpu_quota_us",
    "create_cgroup",
    "detect_version",
    "fs_magic",
    "open_cgroup",
    "parse_keyed",
    "parse_limit",
    "parse_pids",
    "parse_v1_mounts",
    "probe",
    "v1_memory_write_order",
]

log = logging.getLogger(__name__)

CGROUP2_SUPER_MAGIC = 0x63677270
CGROUP_SUPER_MAGIC = 0x27E0EB
TMPFS_MAGIC = 0x01021994

DEFAULT_ROOT = "/sys/fs/cgroup"
DEFAULT_PARENT = "kernelhub"
#: The folder every kernelhub cgroup lives under; nothing outside it is ever created or removed.
OWN_FOLDER = "kernelhub"

#: The controllers that enforce a :class:`Limits` field (the names ``require=`` and ``controllers`` use).
LIMIT_CONTROLLERS: tuple[str, ...] = ("memory", "cpu", "pids")
#: The v1 hierarchies a sandbox joins: the limits, CPU accounting, and the freezer that makes killing safe.
V1_CONTROLLERS: tuple[str, ...] = ("memory", "cpu", "cpuacct", "pids", "freezer")

#: CFS period for CPU quotas. 100 ms is the kernel default; a shorter one costs scheduler overhead.
CPU_PERIOD_US = 100_000
#: The kernel refuses CFS quotas below 1 ms.
_MIN_CPU_QUOTA_US = 1000
#: How a limit that is not set (or not enforced) reads in :class:`CgroupMetrics`.
UNLIMITED = -1
#: v1 spells "no limit" as PAGE_COUNTER_MAX * PAGE_SIZE (9223372036854771712 with 4 KiB pages); anything this
#: large is that sentinel, never a real limit.
_V1_UNLIMITED_FROM = 1 << 62

# Names are single path components; a leading alphanumeric rules out ".", ".." and hidden entries.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

# How long to wait for a v1 freezer or v2 cgroup.freeze to report frozen before killing anyway: a task in
# uninterruptible sleep can hold off freezing indefinitely, and SIGKILL reaches it once it wakes.
_FREEZE_WAIT_S = 1.0
_POLL_S = 0.005
#: How long :meth:`Cgroup.kill_all` keeps killing before it gives up.
KILL_TIMEOUT_S = 10.0


# ------------------------------------------------------------------------------------------------------------
# Pure helpers: parsing the kernel's files and the arithmetic of limits. No OS access.


def parse_keyed(text: str) -> dict[str, int]:
    """Parse flat-keyed files (``cpu.stat``, ``memory.events``, ``pids.events``, ``memory.oom_control``).

    Each line is ``key value``; lines that are not a key and one integer are skipped, so newer kernels adding
    other shapes do not break readers.
    """
    result: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue
        try:
            result[parts[0]] = int(parts[1])
        except ValueError:
            continue
    return result


def parse_limit(text: str) -> int:
    """Parse a limit file: ``max`` (v2), a negative number (v1 CFS quota) or v1's huge sentinel mean
    :data:`UNLIMITED`; anything else is the number."""
    value = text.strip()
    if value == "max":
        return UNLIMITED
    number = int(value)
    if number < 0 or number >= _V1_UNLIMITED_FROM:
        return UNLIMITED
    return number


def parse_pids(text: str) -> set[int]:
    """Parse ``cgroup.procs``: one pid per line."""
    return {int(line) for line in text.split()}


_MOUNTINFO_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape_mountinfo(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in paths as octal escapes.
    return _MOUNTINFO_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_v1_mounts(mountinfo: str, root: str) -> dict[str, str]:
    """Map each v1 controller in :data:`V1_CONTROLLERS` to the mount point of its hierarchy directly under
    ``root``, from the text of ``/proc/self/mountinfo``.

    Co-mounted controllers (``cpu,cpuacct``) map to the same directory. Mount points elsewhere are ignored so
    a test root or a container's bind mounts never mix with the host's. The first mount of a controller wins.
    """
    root = os.path.normpath(root)
    mounts: dict[str, str] = {}
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] != "cgroup":
            continue
        mount_point = os.path.normpath(_unescape_mountinfo(fields[4]))
        if os.path.dirname(mount_point) != root:
            continue
        for option in tail[2].split(","):
            if option in V1_CONTROLLERS:
                mounts.setdefault(option, mount_point)
    return mounts


def cpu_quota_us(cores: float, period_us: int = CPU_PERIOD_US) -> int:
    """The CFS quota in microseconds per ``period_us`` for ``cores`` CPUs (at least the kernel's 1 ms)."""
    return max(_MIN_CPU_QUOTA_US, round(cores * period_us))


def v1_memory_write_order(new_limit: int, current_memsw: int) -> tuple[str, str]:
    """The order in which to write v1 ``memory.limit_in_bytes`` and ``memory.memsw.limit_in_bytes``.

    The kernel refuses any write that would leave ``memsw`` below ``limit`` (pitfall 3). Writing the limit
    first is valid when it fits under the current memsw (lowering, or the first apply on an unlimited group);
    otherwise memsw must be raised first.
    """
    limit, memsw = "memory.limit_in_bytes", "memory.memsw.limit_in_bytes"
    if new_limit <= current_memsw:
        return (limit, memsw)
    return (memsw, limit)


# ------------------------------------------------------------------------------------------------------------
# Small OS helpers.


class _Statfs(ctypes.Structure):
    # f_type is the first member of struct statfs on every Linux ABI; the padding is room for the rest of it.
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_char * 256)]


@functools.cache
def _libc_statfs() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    statfs = libc.statfs
    statfs.argtypes = [ctypes.c_char_p, ctypes.POINTER(_Statfs)]
    statfs.restype = ctypes.c_int
    return statfs


def fs_magic(path: str) -> int | None:
    """The filesystem magic number of ``path`` (``statfs(2)`` ``f_type``), or None if it cannot be stat'ed.

    ``os.statvfs`` has no ``f_type``, hence ctypes.
    """
    buf = _Statfs()
    if _libc_statfs()(os.fsencode(path), ctypes.byref(buf)) != 0:
        return None
    return int(buf.f_type) & 0xFFFFFFFF


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _read_int(path: str, default: int = 0) -> int:
    """An integer file, or ``default`` when the kernel lacks it (older kernel, controller not enabled)."""
    try:
        return int(_read(path).strip())
    except FileNotFoundError:
        return default


def _read_keyed(path: str, key: str) -> int:
    try:
        return parse_keyed(_read(path)).get(key, 0)
    except FileNotFoundError:
        return 0


def _read_limit(path: str) -> int:
    try:
        return parse_limit(_read(path))
    except FileNotFoundError:
        return UNLIMITED


def _write(path: str, value: str) -> None:
    # One write(2) per value: cgroupfs parses each write on its own, and an error (EINVAL, EBUSY) surfaces
    # here rather than at a buffered close.
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


async def _wait_for(predicate: Callable[[], bool], until: float) -> bool:
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
            found |= parse_pids(_read(os.path.join(directory, "cgroup.procs")))
        except FileNotFoundError:
            continue  # removed while we walked
    return found


def _sigkill_members(members: Callable[[], set[int]]) -> int:
    """SIGKILL every pid ``members()`` returns; returns how many were signalled.

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
                    os.kill(pid, signal.SIGKILL)
                else:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                signalled += 1
            except ProcessLookupError:
                continue
        return signalled
    finally:
        for pidfd in pidfds.values():
            if pidfd is not None:
                os.close(pidfd)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"Invalid cgroup name {name!r}: use letters, digits, '_', '.', '-' (at most 128).")


def _check_parent(parent: str) -> list[str]:
    parts = parent.split("/") if isinstance(parent, str) else []
    if not parts or not all(_NAME_RE.match(part) for part in parts) or OWN_FOLDER not in parts:
        # Refusing anything not below a "kernelhub" folder keeps remove() and cleanup_stale() away from
        # cgroups that belong to the rest of the system.
        raise ValueError(
            f"Invalid cgroup parent {parent!r}: want a relative path of plain names through {OWN_FOLDER!r}."
        )
    return parts


def _check_require(require: Iterable[str]) -> frozenset[str]:
    required = frozenset(require)
    unknown = required - set(LIMIT_CONTROLLERS)
    if unknown:
        raise ValueError(f"Unknown controller(s) {sorted(unknown)}; known: {', '.join(LIMIT_CONTROLLERS)}.")
    return required


def _make_parent(base: str, parts: list[str]) -> str:
    """Create ``base/parent`` from the ``kernelhub`` folder down and return it.

    Folders above ``kernelhub`` (a systemd-delegated subtree, say) must exist already: they are not ours.
    """
    own = parts.index(OWN_FOLDER)
    path = os.path.join(base, *parts[:own]) if own else base
    if not os.path.isdir(path):
        raise IsolationUnavailable(f"cgroup folder {path} does not exist.")
    for part in parts[own:]:
        path = os.path.join(path, part)
        try:
            os.mkdir(path)
        except FileExistsError:
            pass
        except OSError as e:
            raise IsolationUnavailable(f"Cannot create cgroup folder {path}: {e.strerror}.") from e
    return path


def _v1_mounts(root: str) -> dict[str, str]:
    with open("/proc/self/mountinfo") as f:
        return parse_v1_mounts(f.read(), os.path.realpath(root))


def detect_version(root: str = DEFAULT_ROOT) -> int | None:
    """Which cgroup layout is mounted at ``root``: 2, 1, or None for neither.

    2 if ``root`` itself is a ``cgroup2`` mount; 1 if it is a tmpfs holding v1 hierarchies (whether or not a
    v2 mount sits beside them, as on hybrid hosts). Called by :func:`create_cgroup` when no version is given,
    and by :func:`probe`.
    """
    magic = fs_magic(root)
    if magic == CGROUP2_SUPER_MAGIC:
        return 2
    if magic == TMPFS_MAGIC:
        try:
            entries = os.listdir(root)
        except OSError:
            return None
        if any(fs_magic(os.path.join(root, entry)) == CGROUP_SUPER_MAGIC for entry in entries):
            return 1
    return None


def _resolve_version(root: str, version: int | None) -> int:
    if version not in (None, 1, 2):
        raise ValueError(f"cgroup version must be 1, 2 or None, not {version!r}.")
    detected = detect_version(root)
    if version is None:
        if detected is None:
            raise IsolationUnavailable(f"No cgroup hierarchy is mounted at {root}.")
        return detected
    if version == 2 and detected != 2:
        raise IsolationUnavailable(f"{root} is not a cgroup2 mount.")
    if version == 1 and detected != 1:
        raise IsolationUnavailable(f"{root} holds no cgroup v1 hierarchies.")
    return version


# ------------------------------------------------------------------------------------------------------------
# The objects.


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
                _write(procs, str(pid))
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

        Called by :func:`create_cgroup`, and by the service when a sandbox's limits change. Raises
        SandboxError if the kernel refuses a value (e.g. a memory limit below what v1 can reclaim).
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

    async def kill_all(self) -> None:
        """SIGKILL every process in the group, orphaned background ones included; return once none is left.

        Called by :meth:`remove` and by the service to end a sandbox. Raises SandboxError if processes are
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
        Idempotent: a group that is already gone is fine. Called by the service when a sandbox ends and by
        :func:`cleanup_stale`.
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
            await _wait_for(lambda: not self.pids(), min(deadline, loop.time() + 0.1))

    async def _plain_round(self, deadline: float) -> None:
        """Kill without freezing, for hosts without a freezer: members may fork between reading and killing,
        so :meth:`_kill_rounds` repeats it; ``pids.max`` bounds how many can appear each round."""
        _sigkill_members(self.pids)


class CgroupV1(Cgroup):
    """A sandbox's group in each cgroup v1 hierarchy (memory, cpu, cpuacct, pids, freezer) that this host has.

    Memory and CPU files go through cgroupspy; it has no pids or freezer support, so those are plain writes.
    """

    version = 1

    def __init__(self, name: str, *, root: str, parent: str, dirs: Mapping[str, str]) -> None:
        self._dirs = dict(dirs)  # controller -> group directory; co-mounted controllers share one
        super().__init__(
            name,
            root=root,
            parent=parent,
            paths=[self._dirs[c] for c in V1_CONTROLLERS if c in self._dirs],
            controllers=[c for c in LIMIT_CONTROLLERS if c in self._dirs],
        )

    def _file(self, controller: str, filename: str) -> str | None:
        directory = self._dirs.get(controller)
        return os.path.join(directory, filename) if directory else None

    def apply(self, limits: Limits) -> None:
        try:
            if "memory" in self._dirs:
                self._apply_memory(limits.memory_bytes)
            if "cpu" in self._dirs:
                cpu = CpuController(Node(os.fsencode(self._dirs["cpu"])))
                cpu.cfs_period_us = CPU_PERIOD_US
                cpu.cfs_quota_us = cpu_quota_us(limits.cpu)
            if "pids" in self._dirs:
                _write(os.path.join(self._dirs["pids"], "pids.max"), str(limits.pids))
        except OSError as e:
            raise SandboxError(f"Cannot set limits on cgroup {self.parent}/{self.name}: {e}.") from e

    def _apply_memory(self, limit: int) -> None:
        directory = self._dirs["memory"]
        memory = MemoryController(Node(os.fsencode(directory)))
        # Groups inherit oom_kill_disable from their parent; with it set, a group at its limit would hang its
        # tasks instead of killing one.
        oom_control = os.path.join(directory, "memory.oom_control")
        if parse_keyed(_read(oom_control)).get("oom_kill_disable", 0):
            _write(oom_control, "0")
        if os.path.exists(os.path.join(directory, "memory.memsw.limit_in_bytes")):
            # memory+swap equal to memory: not one byte may go to swap.
            setters: dict[str, Callable[[], None]] = {
                "memory.limit_in_bytes": lambda: setattr(memory, "limit_in_bytes", limit),
                "memory.memsw.limit_in_bytes": lambda: setattr(memory, "memsw_limit_in_bytes", limit),
            }
            for filename in v1_memory_write_order(limit, memory.memsw_limit_in_bytes):
                setters[filename]()
        else:
            # Without swap accounting (no memsw) swap cannot be capped; swappiness 0 keeps the group's pages
            # out of swap as far as the kernel allows. `kernelhub doctor` reports the missing memsw.
            memory.limit_in_bytes = limit
            try:
                memory.swappiness = 0
            except OSError:
                pass

    def metrics(self) -> CgroupMetrics:
        self._check_metrics_possible()
        cpu_seconds = 0.0
        memory_bytes = memory_peak = 0
        try:
            if "cpuacct" in self._dirs:
                cpu_seconds = CpuAcctController(Node(os.fsencode(self._dirs["cpuacct"]))).usage / 1e9
            if "memory" in self._dirs:
                memory = MemoryController(Node(os.fsencode(self._dirs["memory"])))
                memory_bytes, memory_peak = memory.usage_in_bytes, memory.max_usage_in_bytes
        except FileNotFoundError as e:
            raise SandboxError(f"cgroup {self.parent}/{self.name} vanished while being read.") from e
        limit = self._file("memory", "memory.limit_in_bytes")
        current = self._file("pids", "pids.current")
        pids_max = self._file("pids", "pids.max")
        return CgroupMetrics(
            cpu_seconds=cpu_seconds,
            memory_bytes=memory_bytes,
            memory_peak_bytes=memory_peak,
            memory_limit_bytes=_read_limit(limit) if limit else UNLIMITED,
            pids=_read_int(current) if current else 0,
            pids_limit=_read_limit(pids_max) if pids_max else UNLIMITED,
            oom_kills=self.oom_kills(),
            pids_max_hits=self.pids_max_hits(),
        )

    def oom_kills(self) -> int:
        # The "oom_kill N" line exists since Linux 4.13; "under_oom" only says whether it is happening now.
        path = self._file("memory", "memory.oom_control")
        return _read_keyed(path, "oom_kill") if path else 0

    def pids_max_hits(self) -> int:
        path = self._file("pids", "pids.events")
        return _read_keyed(path, "max") if path else 0

    async def _kill_all(self, deadline: float) -> None:
        one_round = self._frozen_round if "freezer" in self._dirs else self._plain_round
        await self._kill_rounds(one_round, deadline)

    async def _frozen_round(self, deadline: float) -> None:
        # Frozen tasks can neither fork nor exit, so one pass over cgroup.procs gets every one of them and no
        # pid can be reused between reading and killing. Killed tasks die once thawed.
        state = os.path.join(self._dirs["freezer"], "freezer.state")
        _write(state, "FROZEN")
        try:
            until = min(deadline, asyncio.get_running_loop().time() + _FREEZE_WAIT_S)
            if not await _wait_for(lambda: _read(state).strip() == "FROZEN", until):
                log.warning("cgroup %s/%s did not freeze in time; killing anyway", self.parent, self.name)
            _sigkill_members(self.pids)
        finally:
            with contextlib.suppress(FileNotFoundError):
                _write(state, "THAWED")


class CgroupV2(Cgroup):
    """A sandbox's group in the cgroup v2 (unified) hierarchy."""

    version = 2

    def __init__(self, name: str, *, root: str, parent: str, path: str, controllers: Iterable[str]) -> None:
        super().__init__(name, root=root, parent=parent, paths=[path], controllers=controllers)
        self.path = path
        # cgroup.kill came with Linux 5.14, cgroup.freeze with 5.2.
        self._has_kill = os.path.exists(self._file("cgroup.kill"))
        self._has_freeze = os.path.exists(self._file("cgroup.freeze"))

    def _file(self, filename: str) -> str:
        return os.path.join(self.path, filename)

    def apply(self, limits: Limits) -> None:
        try:
            if "memory" in self.controllers:
                _write(self._file("memory.max"), str(limits.memory_bytes))
                swap_max = self._file("memory.swap.max")
                if os.path.exists(swap_max):  # absent without swap accounting
                    _write(swap_max, "0")
            if "cpu" in self.controllers:
                _write(self._file("cpu.max"), f"{cpu_quota_us(limits.cpu)} {CPU_PERIOD_US}")
            if "pids" in self.controllers:
                _write(self._file("pids.max"), str(limits.pids))
        except OSError as e:
            raise SandboxError(f"Cannot set limits on cgroup {self.parent}/{self.name}: {e}.") from e

    def metrics(self) -> CgroupMetrics:
        self._check_metrics_possible()
        # cpu.stat's usage_usec is core cgroup v2 accounting, there even without the cpu controller.
        cpu_usec = _read_keyed(self._file("cpu.stat"), "usage_usec")
        memory_bytes = _read_int(self._file("memory.current"))
        return CgroupMetrics(
            cpu_seconds=cpu_usec / 1e6,
            memory_bytes=memory_bytes,
            memory_peak_bytes=_read_int(self._file("memory.peak"), memory_bytes),
            memory_limit_bytes=_read_limit(self._file("memory.max")),
            pids=_read_int(self._file("pids.current")),
            pids_limit=_read_limit(self._file("pids.max")),
            oom_kills=self.oom_kills(),
            pids_max_hits=self.pids_max_hits(),
        )

    def oom_kills(self) -> int:
        # memory.events counts this group and its descendants, so a kill anywhere in the sandbox shows.
        return _read_keyed(self._file("memory.events"), "oom_kill")

    def pids_max_hits(self) -> int:
        return _read_keyed(self._file("pids.events"), "max")

    async def _kill_all(self, deadline: float) -> None:
        if self._has_kill:
            await self._kill_rounds(self._kill_round, deadline)
        elif self._has_freeze:  # Linux 5.2 to 5.13
            await self._kill_rounds(self._frozen_round, deadline)
        else:
            await self._kill_rounds(self._plain_round, deadline)

    async def _kill_round(self, deadline: float) -> None:
        # cgroup.kill SIGKILLs the whole subtree inside the kernel, including tasks forked while it runs.
        _write(self._file("cgroup.kill"), "1")

    async def _frozen_round(self, deadline: float) -> None:
        """The v1 freezer round with ``cgroup.freeze``, for kernels without ``cgroup.kill``."""
        freeze = self._file("cgroup.freeze")
        _write(freeze, "1")
        try:
            until = min(deadline, asyncio.get_running_loop().time() + _FREEZE_WAIT_S)
            if not await _wait_for(lambda: bool(_read_keyed(self._file("cgroup.events"), "frozen")), until):
                log.warning("cgroup %s/%s did not freeze in time; killing anyway", self.parent, self.name)
            _sigkill_members(self.pids)
        finally:
            with contextlib.suppress(FileNotFoundError):
                _write(freeze, "0")


# ------------------------------------------------------------------------------------------------------------
# Creating, reopening, cleaning up, probing.


def _in_own_folder(root: str, path: str) -> bool:
    relative = os.path.relpath(path, root)
    return OWN_FOLDER in relative.split(os.sep)


def _v2_enable(root: str, parent_path: str) -> None:
    """Enable the limit controllers from ``root`` down to ``parent_path`` where available and not yet on.

    Writes only into folders inside ``kernelhub`` and, when needed, the root itself; a folder in between (a
    delegated systemd subtree) that does not pass a controller on simply leaves it unavailable.
    """
    levels = [root]
    relative = os.path.relpath(parent_path, root)
    for part in relative.split(os.sep):
        levels.append(os.path.join(levels[-1], part))
    for level in levels:
        if level != root and not _in_own_folder(root, level):
            continue
        try:
            available = set(_read(os.path.join(level, "cgroup.controllers")).split())
            enabled = set(_read(os.path.join(level, "cgroup.subtree_control")).split())
        except OSError:
            return
        for controller in LIMIT_CONTROLLERS:
            if controller in available and controller not in enabled:
                # One controller per write: a controller the kernel refuses must not take the others with it.
                try:
                    _write(os.path.join(level, "cgroup.subtree_control"), f"+{controller}")
                except OSError as e:
                    log.warning("Cannot enable the %s controller in %s: %s", controller, level, e.strerror)


def _missing(required: frozenset[str], have: Iterable[str], where: str) -> None:
    missing = sorted(required - set(have))
    if missing:
        raise IsolationUnavailable(
            f"This host cannot enforce {', '.join(missing)} limits: {where} has no usable "
            f"{'controller' if len(missing) == 1 else 'controllers'} {', '.join(missing)}."
        )


def _create_v1(name: str, root: str, parent: str, parts: list[str], required: frozenset[str]) -> CgroupV1:
    mounts = _v1_mounts(root)
    _missing(required, mounts, f"cgroup v1 at {root}")
    dirs: dict[str, str] = {}
    created: list[str] = []
    try:
        for controller in V1_CONTROLLERS:
            mount = mounts.get(controller)
            if mount is None:
                continue
            group = os.path.join(mount, *parts, name)
            if group not in created:
                _make_parent(mount, parts)
                os.mkdir(group)
                created.append(group)
            dirs[controller] = group
    except BaseException as e:
        for group in reversed(created):
            os.rmdir(group)
        if isinstance(e, FileExistsError):
            raise SandboxError(f"cgroup {parent}/{name} already exists.") from e
        if isinstance(e, OSError):
            raise SandboxError(f"Cannot create cgroup {parent}/{name}: {e.strerror}.") from e
        raise
    return CgroupV1(name, root=root, parent=parent, dirs=dirs)


def _create_v2(name: str, root: str, parent: str, parts: list[str], required: frozenset[str]) -> CgroupV2:
    parent_path = _make_parent(root, parts)
    _v2_enable(root, parent_path)
    offered = set(_read(os.path.join(parent_path, "cgroup.subtree_control")).split())
    _missing(required, offered, f"cgroup v2 at {root} (for {parent}/)")
    group = os.path.join(parent_path, name)
    try:
        os.mkdir(group)
    except FileExistsError as e:
        raise SandboxError(f"cgroup {parent}/{name} already exists.") from e
    except OSError as e:
        raise SandboxError(f"Cannot create cgroup {parent}/{name}: {e.strerror}.") from e
    controllers = set(_read(os.path.join(group, "cgroup.controllers")).split()) & set(LIMIT_CONTROLLERS)
    return CgroupV2(name, root=root, parent=parent, path=group, controllers=controllers)


def create_cgroup(
    name: str,
    limits: Limits,
    *,
    root: str = DEFAULT_ROOT,
    parent: str = DEFAULT_PARENT,
    version: int | None = None,
    require: Iterable[str] = LIMIT_CONTROLLERS,
) -> Cgroup:
    """Create the cgroup ``parent/name`` in every hierarchy and apply ``limits``. Called by the service when a
    sandbox is created, before its first process starts.

    ``version`` None detects the layout at ``root``. Every controller in ``require`` must be enforceable or
    IsolationUnavailable names the missing ones and nothing is created; with ``require=()`` the group gets
    what the host offers and :attr:`Cgroup.controllers` says which limits hold. A group of that name must not
    exist yet (SandboxError): reattaching is :func:`open_cgroup`'s job.
    """
    _check_name(name)
    parts = _check_parent(parent)
    required = _check_require(require)
    resolved = _resolve_version(root, version)
    group: Cgroup
    if resolved == 1:
        group = _create_v1(name, root, parent, parts, required)
    else:
        group = _create_v2(name, root, parent, parts, required)
    try:
        group.apply(limits)
    except BaseException:
        # Nothing has joined yet, so the directories are empty and rmdir cannot be busy.
        for path in group.paths:
            os.rmdir(path)
        raise
    return group


def open_cgroup(
    name: str,
    *,
    root: str = DEFAULT_ROOT,
    parent: str = DEFAULT_PARENT,
    version: int | None = None,
) -> Cgroup:
    """Reattach to an existing cgroup ``parent/name`` without changing it.

    Called by the registry after a gateway restart. Raises SandboxError if it exists in no hierarchy.
    """
    _check_name(name)
    parts = _check_parent(parent)
    resolved = _resolve_version(root, version)
    if resolved == 1:
        mounts = _v1_mounts(root)
        dirs = {c: os.path.join(mount, *parts, name) for c, mount in mounts.items()}
        dirs = {c: path for c, path in dirs.items() if os.path.isdir(path)}
        if not dirs:
            raise SandboxError(f"No cgroup {parent}/{name} under {root}.")
        return CgroupV1(name, root=root, parent=parent, dirs=dirs)
    path = os.path.join(root, *parts, name)
    try:
        offered = set(_read(os.path.join(path, "cgroup.controllers")).split())
    except FileNotFoundError as e:
        raise SandboxError(f"No cgroup {parent}/{name} under {root}.") from e
    return CgroupV2(name, root=root, parent=parent, path=path, controllers=offered & set(LIMIT_CONTROLLERS))


async def cleanup_stale(
    names_alive: Iterable[str],
    *,
    root: str = DEFAULT_ROOT,
    parent: str = DEFAULT_PARENT,
    version: int | None = None,
    remove_timeout: float = 10.0,
) -> list[str]:
    """Kill and remove every group under ``parent`` whose name is not in ``names_alive``; return their names.

    Called by the registry at start-up, after a crash left groups behind. A group that cannot be removed is
    logged and skipped so one stuck group does not keep the gateway from starting.
    """
    parts = _check_parent(parent)
    alive = set(names_alive)
    try:
        resolved = _resolve_version(root, version)
    except IsolationUnavailable:
        return []  # no cgroups at all: nothing can be stale
    if resolved == 1:
        bases = {os.path.join(mount, *parts) for mount in _v1_mounts(root).values()}
    else:
        bases = {os.path.join(root, *parts)}
    found: set[str] = set()
    for base in bases:
        try:
            with os.scandir(base) as entries:
                found.update(
                    e.name for e in entries if e.is_dir(follow_symlinks=False) and _NAME_RE.match(e.name)
                )
        except FileNotFoundError:
            continue
    removed: list[str] = []
    for name in sorted(found - alive):
        try:
            await open_cgroup(name, root=root, parent=parent, version=resolved).remove(timeout=remove_timeout)
        except SandboxError as e:
            log.warning("Cannot remove stale cgroup %s/%s: %s", parent, name, e.message)
            continue
        removed.append(name)
    return removed


def probe(root: str = DEFAULT_ROOT, *, parent: str = DEFAULT_PARENT) -> dict[str, Any]:
    """What this host's cgroups can do, for ``kernelhub doctor``.

    Creates and removes an empty probe group under ``parent`` (enabling v2 controllers there as
    :func:`create_cgroup` would) to learn what is writable in practice. Returns ``version``, per controller
    ``available`` (the kernel has it at ``root``) and ``writable`` (a group under ``parent`` gets it),
    ``swap_accounting`` (memory+swap can be capped), ``freezer``, ``kill`` (v2 ``cgroup.kill``) and ``error``.
    """
    parts = _check_parent(parent)
    version = detect_version(root)
    report: dict[str, Any] = {
        "root": root,
        "parent": parent,
        "version": version,
        "controllers": {},
        "swap_accounting": False,
        "freezer": False,
        "kill": False,
        "error": None,
    }
    probe_name = f"probe-{os.getpid()}-{secrets.token_hex(4)}"
    if version == 1:
        mounts = _v1_mounts(root)
        for controller in V1_CONTROLLERS:
            mount = mounts.get(controller)
            writable = False
            if mount is not None:
                group = os.path.join(mount, *parts, probe_name)
                try:
                    _make_parent(mount, parts)
                    os.mkdir(group)
                    writable = True
                    if controller == "memory":
                        report["swap_accounting"] = os.path.exists(
                            os.path.join(group, "memory.memsw.limit_in_bytes")
                        )
                    os.rmdir(group)
                except (OSError, IsolationUnavailable) as e:
                    report["error"] = str(e)
            report["controllers"][controller] = {
                "available": mount is not None,
                "writable": writable,
                "path": mount,
            }
        report["freezer"] = report["controllers"]["freezer"]["writable"]
    elif version == 2:
        available = set(_read(os.path.join(root, "cgroup.controllers")).split())
        offered: set[str] = set()
        try:
            parent_path = _make_parent(root, parts)
            _v2_enable(root, parent_path)
            group = os.path.join(parent_path, probe_name)
            os.mkdir(group)
            try:
                offered = set(_read(os.path.join(group, "cgroup.controllers")).split())
                report["swap_accounting"] = os.path.exists(os.path.join(group, "memory.swap.max"))
                report["freezer"] = os.path.exists(os.path.join(group, "cgroup.freeze"))
                report["kill"] = os.path.exists(os.path.join(group, "cgroup.kill"))
            finally:
                os.rmdir(group)
        except (OSError, IsolationUnavailable) as e:
            report["error"] = str(e)
        for controller in LIMIT_CONTROLLERS:
            report["controllers"][controller] = {
                "available": controller in available,
                "writable": controller in offered,
                "path": root,
            }
    else:
        report["error"] = f"No cgroup hierarchy is mounted at {root}."
    return report
