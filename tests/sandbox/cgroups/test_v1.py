"""Tests of kernelhub.sandbox.cgroups.v1 (through the entry points) against the real kernel: real cgroups,
real processes, no mocks."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from kernelhub.errors import SandboxError
from kernelhub.sandbox.cgroups import (
    CgroupV1,
    cleanup_stale,
    create_cgroup,
    open_cgroup,
    parent_memory_headroom,
    v1_memory_write_order,
)
from kernelhub.sandbox.limits import Limits
from tests.sandbox.cgroups.support import (
    JOIN,
    Groups,
    MiB,
    is_dead,
    kill_in_rounds,
    read,
    real,
    unique,
    v1_dir,
    wait_until,
)


def test_v1_memory_write_order() -> None:
    limit, memsw = "memory.limit_in_bytes", "memory.memsw.limit_in_bytes"
    unlimited = 9223372036854771712
    assert v1_memory_write_order(64 * MiB, unlimited) == (limit, memsw)  # first apply
    assert v1_memory_write_order(64 * MiB, 128 * MiB) == (limit, memsw)  # lowering
    assert v1_memory_write_order(256 * MiB, 128 * MiB) == (memsw, limit)  # raising
    assert v1_memory_write_order(128 * MiB, 128 * MiB) == (limit, memsw)


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
def test_v1_cpu_weight_writes_shares_on_a_live_group(groups: Groups) -> None:
    group = groups.create(Limits(memory_mb=128, pids=32))
    shares = f"{v1_dir('cpu', group)}/cpu.shares"
    assert read(shares) == "1024"
    groups.spawn(group, ["sleep", "1000"])
    wait_until(lambda: len(group.pids()) == 1)
    group.set_cpu_weight(10)
    assert read(shares) == "102"
    # What a pooled sandbox's hand-out does: default weight, other limits, on the group with its process in it.
    group.set_cpu_weight(100)
    group.apply(Limits(memory_mb=256, cpu=0.5, pids=64))
    assert read(shares) == "1024"
    assert int(read(f"{v1_dir('memory', group)}/memory.limit_in_bytes")) == 256 * MiB
    assert read(f"{v1_dir('pids', group)}/pids.max") == "64"
    assert int(read(f"{v1_dir('cpu', group)}/cpu.cfs_quota_us")) == 50_000
    with pytest.raises(ValueError, match="CPU weight"):
        group.set_cpu_weight(0)
    assert read(shares) == "1024"


@real
def test_v1_cpu_weight_decides_who_waits_on_a_contended_core(groups: Groups) -> None:
    # Two spinners pinned to the same core, in sibling groups of weight 10 and 100: the heavier one gets about
    # ten times the time (a quota would not do this: neither group is near its 1-core quota).
    light, heavy = groups.create(), groups.create()
    light.set_cpu_weight(10)
    spin = ["taskset", "-c", "0", "/bin/sh", "-c", "while :; do :; done"]
    groups.spawn(light, spin)
    groups.spawn(heavy, spin)
    wait_until(lambda: len(light.pids()) == 1 and len(heavy.pids()) == 1)
    time.sleep(0.3)  # both spinning
    light0, heavy0 = light.metrics().cpu_seconds, heavy.metrics().cpu_seconds
    time.sleep(2.0)
    light_used = light.metrics().cpu_seconds - light0
    heavy_used = heavy.metrics().cpu_seconds - heavy0
    assert heavy_used > 0.2, heavy_used
    assert light_used < heavy_used / 3, (light_used, heavy_used)


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


@real
def test_v1_parent_memory_headroom_is_the_limit_of_the_folder_less_its_use(groups: Groups) -> None:
    # The pool reads this before each refill: an operator who caps kernelhub's folder caps the pool too.
    parent = f"kernelhub/{unique('headroom')}"
    group = groups.create(Limits(memory_mb=256), parent=parent)
    folder = os.path.dirname(v1_dir("memory", group))
    groups.folders.update(os.path.dirname(path) for path in group.paths)
    assert parent_memory_headroom(parent=parent) is None  # no limit of its own yet
    with open(f"{folder}/memory.limit_in_bytes", "w") as f:
        f.write(str(512 * MiB))
    groups.spawn(group, [sys.executable, "-c", "import time; x = bytearray(64 * 2**20); time.sleep(1000)"])
    wait_until(lambda: int(read(f"{folder}/memory.usage_in_bytes")) > 64 * MiB)
    headroom = parent_memory_headroom(parent=parent)
    assert headroom is not None and 384 * MiB < headroom < 448 * MiB, headroom
