"""Handing a started sandbox to a new owner (kernelhub.sandbox.sandbox.Sandbox.retune), as the warm pool does: the
limits, tmpfs sizes, rlimits, environment and CPU weight of a live sandbox become those of a fresh one."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from typing import Any

import pytest

from kernelhub.errors import SandboxError
from kernelhub.sandbox.cgroups import CgroupV1
from kernelhub.sandbox.limits import Limits
from kernelhub.sandbox.sandbox import can_raise_rlimits, mount_flags

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups]

MiB = 1024 * 1024
# What a process in the sandbox sees of the limits a hand-out changes.
# The home is the workspace (its size is the image's, fixed at creation): only /tmp and /dev/shm follow memory.
PROBE = ("ulimit -u; ulimit -f; ulimit -n; df --output=size -B1 /tmp /dev/shm | tail -n +2; "
         "findmnt -n -o VFS-OPTIONS /tmp; echo \"FOO=${FOO-unset} BAR=${BAR-unset}\"; cat /proc/self/cgroup >/dev/null")


def cgroup_file(sandbox: Any, controller: str, name: str) -> str:
    group = sandbox.cgroup
    assert isinstance(group, CgroupV1)
    with open(f"{group._dirs[controller]}/{name}") as f:
        return f.read().strip()


def test_a_retuned_sandbox_is_what_a_fresh_one_would_be(factory: Any, runner: asyncio.Runner, sh: Any) -> None:
    wanted = Limits(memory_mb=256, cpu=0.5, pids=64, max_file_mb=5)
    pooled = runner.run(factory.create(limits=Limits(pids=4096, max_file_mb=10240), env={"FOO": "pooled"},
                                       cpu_weight=10))
    fresh = runner.run(factory.create(limits=wanted, env={"FOO": "x", "BAR": "y"}))
    try:
        assert cgroup_file(pooled, "cpu", "cpu.shares") == "102"
        code, before = runner.run(sh(pooled, "ulimit -u; ulimit -f"))
        assert code == 0 and before.split() == ["4096", str(10240 * 1024)], before  # bash counts KiB
        # Something already running in the sandbox, as the pooled kernel is: it must get the new rlimits too.
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            runner.run(pooled.spawn(["sleep", "1000"], stdin=devnull, stdout=devnull, stderr=devnull))
        finally:
            os.close(devnull)

        runner.run(pooled.retune(wanted, {"FOO": "x", "BAR": "y"}))
        assert pooled.limits == wanted and pooled.cpu_weight == 100
        for sandbox in (pooled, fresh):
            assert cgroup_file(sandbox, "cpu", "cpu.shares") == "1024"
            assert int(cgroup_file(sandbox, "memory", "memory.limit_in_bytes")) == 256 * MiB
            assert cgroup_file(sandbox, "cpu", "cpu.cfs_quota_us") == "50000"
            assert cgroup_file(sandbox, "pids", "pids.max") == "64"
        code_p, seen_pooled = runner.run(sh(pooled, PROBE))
        code_f, seen_fresh = runner.run(sh(fresh, PROBE))
        assert code_p == code_f == 0
        assert seen_pooled == seen_fresh, (seen_pooled, seen_fresh)
        lines = seen_fresh.split("\n")
        assert lines[:3] == ["64", str(5 * 1024), "4096"]
        assert [int(x) for x in lines[3:5]] == [64 * MiB, 32 * MiB]
        assert lines[5] == "rw,nosuid,nodev,relatime"
        assert lines[6] == "FOO=x BAR=y"
        assert pooled.metrics()["memory_limit_bytes"] == 256 * MiB
        code, running = runner.run(sh(pooled, "for p in /proc/[0-9]*; do grep -qx sleep $p/comm 2>/dev/null && "
                                              "grep -E '^Max (processes|file size)' $p/limits; done"))
        assert code == 0
        assert [line.split()[-3:-1] for line in running.strip().split("\n")] == [
            [str(5 * MiB), str(5 * MiB)], ["64", "64"]], running
    finally:
        runner.run(pooled.stop())
        runner.run(fresh.stop())


def test_what_a_live_sandbox_cannot_change_is_refused(factory: Any, runner: asyncio.Runner) -> None:
    sandbox = runner.run(factory.create(limits=Limits(pids=64, max_file_mb=5)))
    try:
        for other in ({"disk_mb": 512}, {"files": 5000}):
            limits = dataclasses.replace(sandbox.limits, **other)
            assert not sandbox.can_retune(limits)
            with pytest.raises(SandboxError, match="cannot take these limits"):
                runner.run(sandbox.retune(limits, {}))
        # Raising an rlimit of another process needs CAP_SYS_RESOURCE, which root lacks here.
        for other in ({"pids": 65}, {"max_file_mb": 6}):
            assert sandbox.can_retune(dataclasses.replace(sandbox.limits, **other)) == can_raise_rlimits()
        assert sandbox.can_retune(dataclasses.replace(sandbox.limits, pids=8, max_file_mb=1, memory_mb=64))
    finally:
        runner.run(sandbox.stop())
    assert not sandbox.can_retune(sandbox.limits)  # a stopped sandbox takes nothing


def test_a_memory_limit_below_what_the_sandbox_uses_fails_cleanly(factory: Any, runner: asyncio.Runner,
                                                                  sh: Any) -> None:
    sandbox = runner.run(factory.create(limits=Limits(memory_mb=256)))
    try:
        # 48 MiB held in /tmp (charged to the sandbox's memory cgroup) by a process that stays.
        code, _ = runner.run(sh(sandbox, "head -c 50331648 /dev/zero > /tmp/fill"))
        assert code == 0
        with pytest.raises(SandboxError):
            runner.run(sandbox.retune(dataclasses.replace(sandbox.limits, memory_mb=32), {}))
    finally:
        runner.run(sandbox.stop())


def test_mount_flags_reads_each_points_own() -> None:
    mountinfo = (
        "329 289 0:317 / /tmp rw,nosuid,nodev,relatime - tmpfs tmpfs rw,size=12060k,mode=755\n"
        "330 289 0:318 / /home/user rw,nosuid,nodev,noexec,relatime - tmpfs tmpfs rw,size=65536k\n"
        "331 289 0:319 / /my\\040dir ro,relatime - tmpfs tmpfs rw\n"
        "332 329 0:320 / /tmp rw,nodev,relatime - tmpfs tmpfs rw\n"  # mounted over: the visible one counts
    )
    assert mount_flags(mountinfo) == {"/tmp": "rw,nodev,relatime", "/home/user": "rw,nosuid,nodev,noexec,relatime",
                                      "/my dir": "ro,relatime"}
