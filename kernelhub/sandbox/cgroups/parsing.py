"""Pure helpers for cgroups: parsing the kernel's files and the arithmetic of limits. No OS access.

Used by every other module of :mod:`kernelhub.sandbox.cgroups`; tested without the OS.
"""

from __future__ import annotations

import os
import re

__all__ = [
    "CPU_PERIOD_US",
    "CPU_WEIGHT_DEFAULT",
    "LIMIT_CONTROLLERS",
    "UNLIMITED",
    "V1_CONTROLLERS",
    "check_cpu_weight",
    "cpu_quota_us",
    "cpu_shares",
    "parse_keyed",
    "parse_limit",
    "parse_pids",
    "parse_v1_mounts",
    "v1_memory_write_order",
]

#: The controllers that enforce a :class:`Limits` field (the names ``require=`` and ``controllers`` use).
LIMIT_CONTROLLERS: tuple[str, ...] = ("memory", "cpu", "pids")
#: The v1 hierarchies a sandbox joins: the limits, CPU accounting, and the freezer that makes killing safe.
V1_CONTROLLERS: tuple[str, ...] = ("memory", "cpu", "cpuacct", "pids", "freezer")

#: CFS period for CPU quotas. 100 ms is the kernel default; a shorter one costs scheduler overhead.
CPU_PERIOD_US = 100_000
#: cgroup v2's ``cpu.weight`` of a group nobody changed (the range is 1 to 10000); v1's ``cpu.shares`` default,
#: 1024, is the same share.
CPU_WEIGHT_DEFAULT = 100
_CPU_WEIGHT_RANGE = (1, 10_000)
#: v1 ``cpu.shares`` bounds (kernel/sched: MIN_SHARES 2, MAX_SHARES 1 << 18).
_CPU_SHARES_RANGE = (2, 1 << 18)
#: The kernel refuses CFS quotas below 1 ms.
_MIN_CPU_QUOTA_US = 1000
#: How a limit that is not set (or not enforced) reads in :class:`CgroupMetrics`.
UNLIMITED = -1
#: v1 spells "no limit" as PAGE_COUNTER_MAX * PAGE_SIZE (9223372036854771712 with 4 KiB pages); anything this
#: large is that sentinel, never a real limit.
_V1_UNLIMITED_FROM = 1 << 62


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


def cpu_shares(weight: int) -> int:
    """The v1 ``cpu.shares`` of a v2 ``cpu.weight`` (1 to 10000, default :data:`CPU_WEIGHT_DEFAULT`): the same
    proportion of the v1 default 1024, kept inside v1's bounds. Raises ValueError for a weight out of range.

    >>> cpu_shares(100), cpu_shares(10), cpu_shares(1)
    (1024, 102, 10)
    """
    check_cpu_weight(weight)
    low, high = _CPU_SHARES_RANGE
    return max(low, min(high, weight * 1024 // CPU_WEIGHT_DEFAULT))


def check_cpu_weight(weight: int) -> int:
    """``weight`` if it is a whole number in cgroup v2's ``cpu.weight`` range (1 to 10000); else ValueError."""
    low, high = _CPU_WEIGHT_RANGE
    if isinstance(weight, bool) or not isinstance(weight, int) or not low <= weight <= high:
        raise ValueError(f"a CPU weight is a whole number from {low} to {high}, not {weight!r}")
    return weight
