"""Tests of kernelhub.sandbox.cgroups.parsing: the pure helpers, without the OS."""

from __future__ import annotations

import pytest

from kernelhub.sandbox.cgroups import (
    CPU_WEIGHT_DEFAULT,
    UNLIMITED,
    cpu_quota_us,
    cpu_shares,
    parse_keyed,
    parse_limit,
    parse_pids,
    parse_v1_mounts,
    v1_memory_write_order,
)
from tests.sandbox.cgroups.support import (
    MiB,
)


def test_parse_keyed() -> None:
    text = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"
    assert parse_keyed(text) == {"oom_kill_disable": 0, "under_oom": 0, "oom_kill": 3}
    assert parse_keyed("usage_usec 1234\nuser_usec 1000\nsystem_usec 234\n")["usage_usec"] == 1234
    assert parse_keyed("max 7") == {"max": 7}
    # Lines of another shape are skipped, not fatal.
    assert parse_keyed("max 7\nsome text here\nbad value\n\n") == {"max": 7}
    assert parse_keyed("") == {}


def test_parse_limit() -> None:
    assert parse_limit("max\n") == UNLIMITED
    assert parse_limit("9223372036854771712\n") == UNLIMITED  # v1 "no limit"
    assert parse_limit("-1\n") == UNLIMITED  # v1 cpu.cfs_quota_us
    assert parse_limit("67108864\n") == 64 * MiB
    assert parse_limit("0") == 0


def test_parse_pids() -> None:
    assert parse_pids("12\n345\n") == {12, 345}
    assert parse_pids("") == set()


def test_parse_v1_mounts_separate_and_comounted() -> None:
    separate = (
        "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
        "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
        "33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct\n"
        "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
        "37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer\n"
        "39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids\n"
        "40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
    )
    assert parse_v1_mounts(separate, "/sys/fs/cgroup") == {
        "cpu": "/sys/fs/cgroup/cpu",
        "cpuacct": "/sys/fs/cgroup/cpuacct",
        "memory": "/sys/fs/cgroup/memory",
        "freezer": "/sys/fs/cgroup/freezer",
        "pids": "/sys/fs/cgroup/pids",
    }
    comounted = (
        "25 24 0:22 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:9 - cgroup cgroup rw,cpu,cpuacct\n"
        "26 24 0:23 / /sys/fs/cgroup/memory rw,nosuid shared:10 - cgroup cgroup rw,memory\n"
        # A hierarchy mounted somewhere else is not under the root asked about.
        "27 24 0:24 / /mnt/other/pids rw - cgroup cgroup rw,pids\n"
    )
    assert parse_v1_mounts(comounted, "/sys/fs/cgroup/") == {
        "cpu": "/sys/fs/cgroup/cpu,cpuacct",
        "cpuacct": "/sys/fs/cgroup/cpu,cpuacct",
        "memory": "/sys/fs/cgroup/memory",
    }
    assert parse_v1_mounts("41 31 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n", "/sys/fs") == {}


def test_parse_v1_mounts_unescapes_paths() -> None:
    line = "32 31 0:29 / /srv/my\\040cgroups/memory rw - cgroup cgroup rw,memory\n"
    assert parse_v1_mounts(line, "/srv/my cgroups") == {"memory": "/srv/my cgroups/memory"}


def test_cpu_quota() -> None:
    assert cpu_quota_us(0.2) == 20_000
    assert cpu_quota_us(1.5) == 150_000
    assert cpu_quota_us(0.001) == 1000  # the kernel's minimum
    assert cpu_quota_us(0.5, period_us=50_000) == 25_000


def test_cpu_shares_is_the_same_proportion_of_the_v1_default() -> None:
    assert cpu_shares(CPU_WEIGHT_DEFAULT) == 1024  # v1's own default
    assert cpu_shares(10) == 102
    assert cpu_shares(1) == 10
    assert cpu_shares(10_000) == 102_400
    for bad in (0, -1, 10_001, 1.5, True, "100"):
        with pytest.raises(ValueError, match="CPU weight"):
            cpu_shares(bad)  # type: ignore[arg-type]


def test_v1_memory_write_order() -> None:
    limit, memsw = "memory.limit_in_bytes", "memory.memsw.limit_in_bytes"
    unlimited = 9223372036854771712
    assert v1_memory_write_order(64 * MiB, unlimited) == (limit, memsw)  # first apply
    assert v1_memory_write_order(64 * MiB, 128 * MiB) == (limit, memsw)  # lowering
    assert v1_memory_write_order(256 * MiB, 128 * MiB) == (memsw, limit)  # raising
    assert v1_memory_write_order(128 * MiB, 128 * MiB) == (limit, memsw)
