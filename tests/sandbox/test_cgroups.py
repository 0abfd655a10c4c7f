"""Tests of kernelhub.sandbox.cgroups against the real kernel: real cgroups, real processes, no mocks.

This machine mounts cgroup v1 at /sys/fs/cgroup (cpu and cpuacct as separate hierarchies) and a cgroup2 at
/sys/fs/cgroup/unified with no controllers, so the v2 tests cover membership, cgroup.kill and removal but can
never see a v2 limit enforced. The parsing helpers are pure and tested without the OS.

Processes join a group the way the launcher does it (SECURITY.md pitfall 2): a /bin/sh writes its own pid into
every procs file, then execs the workload.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from uuid import uuid4

import pytest

from kernelhub.errors import IsolationUnavailable, SandboxError
from kernelhub.sandbox import cgroups
from kernelhub.sandbox.cgroups import (
    UNLIMITED,
    Cgroup,
    CgroupV1,
    CgroupV2,
    cleanup_stale,
    cpu_quota_us,
    create_cgroup,
    detect_version,
    open_cgroup,
    parse_keyed,
    parse_limit,
    parse_pids,
    parse_v1_mounts,
    probe,
    v1_memory_write_order,
)
from kernelhub.sandbox.limits import Limits

V1_ROOT = "/sys/fs/cgroup"
V2_ROOT = "/sys/fs/cgroup/unified"
MiB = 1024 * 1024

# Writes $$ into each file given before "--", then execs the rest: the launcher's join, in miniature.
JOIN = 'while [ "$1" != "--" ]; do echo $$ > "$1" || exit 121; shift; done; shift; exec "$@"'


def real(test: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a test that needs root and a writable cgroup hierarchy."""
    return pytest.mark.root(pytest.mark.cgroups(test))


def unique(prefix: str = "test") -> str:
    return f"{prefix}-{uuid4().hex[:8]}"


def is_dead(pid: int) -> bool:
    """Gone, or a zombie waiting for a parent that never reaps (pid 1 here does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


class Groups:
    """Makes groups and starts processes in them; the fixture removes every group, reaps every process."""

    def __init__(self) -> None:
        self.groups: list[Cgroup] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.folders: set[str] = set()  # parent folders of a test's own, removed after the groups in them

    def create(self, limits: Limits | None = None, **kwargs: Any) -> Cgroup:
        group = create_cgroup(unique(), limits or Limits(), **kwargs)
        self.groups.append(group)
        return group

    def adopt(self, group: Cgroup) -> Cgroup:
        self.groups.append(group)
        return group

    def spawn(self, group: Cgroup, argv: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", JOIN, "join", *group.procs_files, "--", *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for group in self.groups:
            asyncio.run(group.remove())
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()  # only if it escaped its group, which a test would already have reported
            proc.wait(timeout=10)
        for folder in self.folders:
            try:
                os.rmdir(folder)
            except FileNotFoundError:
                pass


@pytest.fixture
def groups() -> Iterator[Groups]:
    made = Groups()
    try:
        yield made
    finally:
        made.close()


def read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def v1_dir(controller: str, group: Cgroup) -> str:
    return os.path.join(V1_ROOT, controller, group.parent, group.name)


# ----------------------------------------------------------------------------------------------------------
# Pure helpers.


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


def test_v1_memory_write_order() -> None:
    limit, memsw = "memory.limit_in_bytes", "memory.memsw.limit_in_bytes"
    unlimited = 9223372036854771712
    assert v1_memory_write_order(64 * MiB, unlimited) == (limit, memsw)  # first apply
    assert v1_memory_write_order(64 * MiB, 128 * MiB) == (limit, memsw)  # lowering
    assert v1_memory_write_order(256 * MiB, 128 * MiB) == (memsw, limit)  # raising
    assert v1_memory_write_order(128 * MiB, 128 * MiB) == (limit, memsw)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "-x", "x" * 129, "white space"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        create_cgroup(name, Limits(), root=V1_ROOT)


@pytest.mark.parametrize("parent", ["", "system.slice", "/kernelhub", "kernelhub/../x", "kernelhub//x"])
def test_parents_outside_a_kernelhub_folder_are_refused(parent: str) -> None:
    with pytest.raises(ValueError):
        create_cgroup("x", Limits(), root=V1_ROOT, parent=parent)
    with pytest.raises(ValueError):
        asyncio.run(cleanup_stale(set(), root=V1_ROOT, parent=parent))


def test_unknown_required_controller_is_refused() -> None:
    with pytest.raises(ValueError):
        create_cgroup("x", Limits(), root=V1_ROOT, require=("memory", "blkio"))


# ----------------------------------------------------------------------------------------------------------
# Detection and probing.


@real
def test_detect_version() -> None:
    assert detect_version(V1_ROOT) == 1  # tmpfs with v1 hierarchies (and a v2 mount beside them)
    assert detect_version(V2_ROOT) == 2
    assert detect_version("/proc") is None
    assert detect_version("/nonexistent-cgroup-root") is None


@real
def test_probe_v1_and_v2() -> None:
    report = probe(V1_ROOT)
    assert report["version"] == 1
    for controller in ("memory", "cpu", "cpuacct", "pids", "freezer"):
        assert report["controllers"][controller]["available"], controller
        assert report["controllers"][controller]["writable"], controller
    assert report["freezer"] is True
    assert report["swap_accounting"] == os.path.exists(f"{V1_ROOT}/memory/memory.memsw.limit_in_bytes")
    assert report["error"] is None

    report = probe(V2_ROOT)
    assert report["version"] == 2
    assert report["kill"] is True and report["freezer"] is True
    # No controllers are (or can be) enabled on this machine's v2 mount.
    assert not any(c["writable"] for c in report["controllers"].values())

    assert probe("/proc")["version"] is None


# ----------------------------------------------------------------------------------------------------------
# cgroup v1.


@real
def test_v1_create_apply_metrics(groups: Groups) -> None:
    group = groups.create(Limits(memory_mb=128, cpu=0.5, pids=32))
    assert isinstance(group, CgroupV1) and group.version == 1
    assert group.controllers == {"memory", "cpu", "pids"}
    # cpu and cpuacct are separate hierarchies here: one procs file per hierarchy, five in all.
    assert len(group.procs_files) == len(set(group.procs_files)) == 5
    memory = v1_dir("memory", group)
    assert int(read(f"{memory}/memory.limit_in_bytes")) == 128 * MiB
    if os.path.exists(f"{memory}/memory.memsw.limit_in_bytes"):
        assert int(read(f"{memory}/memory.memsw.limit_in_bytes")) == 128 * MiB
    assert "oom_kill_disable 0" in read(f"{memory}/memory.oom_control")
    assert int(read(f"{v1_dir('cpu', group)}/cpu.cfs_quota_us")) == 50_000
    assert int(read(f"{v1_dir('cpu', group)}/cpu.cfs_period_us")) == 100_000
    assert read(f"{v1_dir('pids', group)}/pids.max") == "32"

    # Raising then lowering exercises both write orders of limit and memsw.
    for memory_mb in (256, 64):
        group.apply(Limits(memory_mb=memory_mb, cpu=1.5, pids=64))
        assert int(read(f"{memory}/memory.limit_in_bytes")) == memory_mb * MiB
        if os.path.exists(f"{memory}/memory.memsw.limit_in_bytes"):
            assert int(read(f"{memory}/memory.memsw.limit_in_bytes")) == memory_mb * MiB

    metrics = group.metrics()
    assert metrics.memory_limit_bytes == 64 * MiB
    assert metrics.pids_limit == 64
    assert metrics.pids == 0 and metrics.memory_bytes == 0 and metrics.cpu_seconds == 0.0
    assert metrics.oom_kills == 0 and metrics.pids_max_hits == 0
    assert set(metrics.to_dict()) == {
        "cpu_seconds", "memory_bytes", "memory_peak_bytes", "memory_limit_bytes",
        "pids", "pids_limit", "oom_kills", "pids_max_hits",
    }  # fmt: skip


@real
def test_v1_create_refuses_an_existing_name(groups: Groups) -> None:
    group = groups.create()
    with pytest.raises(SandboxError, match="already exists"):
        create_cgroup(group.name, Limits())
    assert all(os.path.isdir(path) for path in group.paths)  # the existing group is untouched


@real
def test_v1_process_joined_before_exec_runs_inside(groups: Groups) -> None:
    group = groups.create()
    reader, writer = os.pipe()
    try:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", JOIN, "join", *group.procs_files, "--", "cat", "/proc/self/cgroup"],
            stdout=writer,
        )
        groups.procs.append(proc)
        os.close(writer)
        writer = -1
        with os.fdopen(reader) as f:
            reader = -1
            lines = f.read().splitlines()
    finally:
        for fd in (reader, writer):
            if fd >= 0:
                os.close(fd)
    assert proc.wait(timeout=10) == 0
    placed = {line.split(":")[1]: line.split(":", 2)[2] for line in lines}
    for controller in ("memory", "cpu", "cpuacct", "pids", "freezer"):
        assert placed[controller] == f"/{group.parent}/{group.name}", controller


@real
def test_v1_memory_hog_is_oom_killed(groups: Groups) -> None:
    group = groups.create(Limits(memory_mb=64))
    hog = "b = bytearray()\nwhile True:\n    b += bytearray(1 << 20)\n"
    proc = groups.spawn(group, [sys.executable, "-c", hog])
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert group.oom_kills() >= 1
    metrics = group.metrics()
    assert metrics.oom_kills >= 1
    assert metrics.memory_peak_bytes <= 64 * MiB


@real
def test_v1_fork_bomb_is_held_at_pids_max(groups: Groups) -> None:
    group = groups.create(Limits(pids=16))
    bomb = (
        "import os, time\n"
        "while True:\n"
        "    try:\n"
        "        os.fork()\n"  # parent and child both carry on forking
        "    except OSError:\n"
        "        time.sleep(0.001)\n"
    )
    groups.spawn(group, [sys.executable, "-c", bomb])
    wait_until(lambda: group.pids_max_hits() > 0)
    most = 0
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        metrics = group.metrics()
        most = max(most, metrics.pids, len(group.pids()))
        time.sleep(0.01)
    assert most <= 16
    assert group.pids_max_hits() > 0
    peak = f"{v1_dir('pids', group)}/pids.peak"
    if os.path.exists(peak):  # Linux 6.9+
        assert int(read(peak)) <= 16
    asyncio.run(group.kill_all())
    assert group.pids() == set()


@real
def test_v1_cpu_quota_holds_two_spinners_to_a_fifth_of_a_core(groups: Groups) -> None:
    group = groups.create(Limits(cpu=0.2))
    # Two spinners on a two-core machine would use 2.0 cores unlimited.
    groups.spawn(group, ["/bin/sh", "-c", "while :; do :; done & while :; do :; done"])
    wait_until(lambda: len(group.pids()) >= 2)
    time.sleep(0.3)  # let the first period's burst pass
    used0, t0 = group.metrics().cpu_seconds, time.monotonic()
    time.sleep(2.0)
    used1, t1 = group.metrics().cpu_seconds, time.monotonic()
    cores = (used1 - used0) / (t1 - t0)
    assert 0.05 < cores < 0.45, cores


@real
def test_v1_kill_all_gets_orphans_and_remove_leaves_nothing(groups: Groups) -> None:
    group = groups.create()
    # A double-forked sleep (orphaned to pid 1), one in its own session, one background, one foreground.
    tree = "(sleep 1000 &); (setsid sleep 1000 &); sleep 1000 & exec sleep 1000"
    proc = groups.spawn(group, ["/bin/sh", "-c", tree])
    wait_until(lambda: len(group.pids()) >= 4)
    members = group.pids()
    orphans = {pid for pid in members if int(read(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()[1]) == 1}
    assert orphans, "the double fork should have left a process whose parent is pid 1"

    asyncio.run(group.kill_all())
    assert group.pids() == set()
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert all(is_dead(pid) for pid in members)

    paths = list(group.paths)
    asyncio.run(group.remove())
    assert not any(os.path.exists(path) for path in paths)
    assert not group.exists()
    asyncio.run(group.remove())  # idempotent


@real
def test_v1_remove_kills_members_itself(groups: Groups) -> None:
    group = groups.create()
    proc = groups.spawn(group, ["/bin/sh", "-c", "sleep 1000 & sleep 1000 & wait"])
    wait_until(lambda: len(group.pids()) >= 3)
    members = group.pids()
    asyncio.run(group.remove())
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert all(is_dead(pid) for pid in members)
    assert not any(os.path.exists(path) for path in group.paths)
    with pytest.raises(SandboxError):
        group.metrics()


@real
def test_v1_kill_without_freezer(groups: Groups) -> None:
    # The fallback for hosts without a freezer hierarchy: kill rounds checked through pidfds.
    group = groups.create()
    assert isinstance(group, CgroupV1)
    proc = groups.spawn(group, ["/bin/sh", "-c", "(sleep 1000 &); sleep 1000 & exec sleep 1000"])
    wait_until(lambda: len(group.pids()) >= 3)
    asyncio.run(kill_in_rounds(group, group._plain_round))
    assert group.pids() == set()
    assert proc.wait(timeout=10) == -signal.SIGKILL


async def kill_in_rounds(group: Cgroup, one_round: Callable[[float], Awaitable[None]]) -> None:
    """Drive one particular kill strategy, as kill_all() would pick it on a host that has nothing better."""
    await group._kill_rounds(one_round, asyncio.get_running_loop().time() + 10)


@real
def test_v1_add_pid_and_open_cgroup_reattach(groups: Groups) -> None:
    group = groups.create()
    proc = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL)
    groups.procs.append(proc)
    group.add_pid(proc.pid)
    assert group.pids() == {proc.pid}

    again = open_cgroup(group.name)
    assert isinstance(again, CgroupV1)
    assert again.paths == group.paths
    assert again.controllers == group.controllers
    assert again.pids() == {proc.pid}
    assert again.metrics().pids == 1
    asyncio.run(again.remove())
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert not group.exists()

    with pytest.raises(SandboxError):
        open_cgroup(group.name)
    with pytest.raises(ProcessLookupError):
        groups.create().add_pid(proc.pid)  # reaped: no such process


@real
def test_v1_cleanup_stale_removes_only_dead_groups(groups: Groups) -> None:
    # A parent of our own inside kernelhub/, so groups of other tests running now are never touched.
    parent = f"kernelhub/{unique('stale')}"
    alive = groups.create(parent=parent)
    groups.folders.update(os.path.dirname(path) for path in alive.paths)
    stale_busy = groups.create(parent=parent)
    stale_idle = groups.create(parent=parent)
    proc = groups.spawn(stale_busy, ["/bin/sh", "-c", "(sleep 1000 &); exec sleep 1000"])
    wait_until(lambda: len(stale_busy.pids()) >= 2)

    removed = asyncio.run(cleanup_stale({alive.name}, parent=parent))
    assert sorted(removed) == sorted([stale_busy.name, stale_idle.name])
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert alive.exists() and not stale_busy.exists() and not stale_idle.exists()
    assert asyncio.run(cleanup_stale({alive.name}, parent=parent)) == []


# ----------------------------------------------------------------------------------------------------------
# cgroup v2, on this machine's controller-less cgroup2 mount.


@real
def test_v2_require_unavailable_controller_raises() -> None:
    # /sys/fs/cgroup/unified can never have memory, cpu or pids: on a hybrid host they are bound to the v1
    # hierarchies, and a controller lives in one hierarchy at a time.
    name = unique()
    with pytest.raises(IsolationUnavailable, match="memory"):
        create_cgroup(name, Limits(), root=V2_ROOT, version=2, require=("memory",))
    with pytest.raises(IsolationUnavailable, match="cpu, memory, pids"):
        create_cgroup(name, Limits(), root=V2_ROOT)  # the default requires all three
    assert not os.path.exists(os.path.join(V2_ROOT, "kernelhub", name))


@real
def test_version_mismatch_is_unavailable() -> None:
    with pytest.raises(IsolationUnavailable):
        create_cgroup(unique(), Limits(), root=V1_ROOT, version=2, require=())
    with pytest.raises(IsolationUnavailable):
        create_cgroup(unique(), Limits(), root=V2_ROOT, version=1, require=())


@real
def test_v2_lifecycle_without_controllers(groups: Groups) -> None:
    group = groups.create(Limits(memory_mb=64), root=V2_ROOT, version=2, require=())
    assert isinstance(group, CgroupV2) and group.version == 2
    assert group.controllers == set()
    assert group.procs_files == [os.path.join(V2_ROOT, "kernelhub", group.name, "cgroup.procs")]

    tree = "(sleep 1000 &); (setsid sleep 1000 &); sleep 1000 & exec sleep 1000"
    proc = groups.spawn(group, ["/bin/sh", "-c", tree])
    wait_until(lambda: len(group.pids()) >= 4)
    members = group.pids()
    assert proc.pid in members

    metrics = group.metrics()
    assert metrics.memory_limit_bytes == UNLIMITED and metrics.pids_limit == UNLIMITED
    assert metrics.pids == 0  # no pids controller to count them
    assert metrics.cpu_seconds >= 0.0  # core v2 accounting exists without the cpu controller

    again = open_cgroup(group.name, root=V2_ROOT, version=2)
    assert again.pids() == members

    asyncio.run(group.kill_all())  # through cgroup.kill
    assert group.pids() == set()
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert all(is_dead(pid) for pid in members)

    asyncio.run(group.remove())
    assert not os.path.exists(group.paths[0])
    asyncio.run(group.remove())


@real
def test_v2_kill_by_freezing(groups: Groups) -> None:
    # The path for kernels without cgroup.kill (5.2 to 5.13), run here with cgroup.freeze.
    group = groups.create(root=V2_ROOT, version=2, require=())
    assert isinstance(group, CgroupV2)
    proc = groups.spawn(group, ["/bin/sh", "-c", "(sleep 1000 &); sleep 1000 & exec sleep 1000"])
    wait_until(lambda: len(group.pids()) >= 3)
    asyncio.run(kill_in_rounds(group, group._frozen_round))
    assert group.pids() == set()
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert read(os.path.join(group.paths[0], "cgroup.freeze")) == "0"


def test_module_exports() -> None:
    for name in cgroups.__all__:
        assert hasattr(cgroups, name), name
