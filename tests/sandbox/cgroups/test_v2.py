"""Tests of kernelhub.sandbox.cgroups.v2 on this machine's controller-less cgroup2 mount."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from kernelhub.errors import IsolationUnavailable, SandboxError
from kernelhub.sandbox.cgroups import (
    UNLIMITED,
    CgroupV2,
    create_cgroup,
    lifecycle,
    open_cgroup,
    parent_memory_headroom,
)
from kernelhub.sandbox.limits import Limits
from tests.sandbox.cgroups.support import (
    V2_ROOT,
    Groups,
    is_dead,
    kill_in_rounds,
    read,
    real,
    unique,
    wait_until,
)


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


def fake_v2_group(tmp_path: Path, controllers: set[str]) -> CgroupV2:
    """A v2 group over plain files: this machine's cgroup2 mount has no controllers, so the files that the
    memory, cpu and pids controllers would add are made by hand. They start empty: a cgroupfs write replaces
    the value, a plain file's write over a longer one would not."""
    for name in ("memory.max", "cpu.max", "cpu.weight", "pids.max", "cgroup.procs"):
        (tmp_path / name).write_text("")
    return CgroupV2("fake", root=str(tmp_path), parent="kernelhub", path=str(tmp_path), controllers=controllers)


def test_v2_cpu_weight_and_live_limits_with_controllers(tmp_path: Path) -> None:
    group = fake_v2_group(tmp_path, {"memory", "cpu", "pids"})
    group.set_cpu_weight(10)
    assert read(str(tmp_path / "cpu.weight")) == "10"
    (tmp_path / "cpu.weight").write_text("")
    group.set_cpu_weight(100)
    group.apply(Limits(memory_mb=256, cpu=0.5, pids=64))
    assert read(str(tmp_path / "cpu.weight")) == "100"
    assert read(str(tmp_path / "memory.max")) == str(256 * 1024 * 1024)
    assert read(str(tmp_path / "cpu.max")) == "50000 100000"
    assert read(str(tmp_path / "pids.max")) == "64"
    with pytest.raises(ValueError, match="CPU weight"):
        group.set_cpu_weight(10_001)
    assert read(str(tmp_path / "cpu.weight")) == "100"


def test_v2_cpu_weight_without_the_cpu_controller_writes_nothing(tmp_path: Path) -> None:
    group = fake_v2_group(tmp_path, {"memory", "pids"})
    group.set_cpu_weight(10)
    assert read(str(tmp_path / "cpu.weight")) == ""


def test_v2_cpu_weight_refused_by_the_kernel_is_a_sandbox_error(tmp_path: Path) -> None:
    group = fake_v2_group(tmp_path, {"cpu"})
    (tmp_path / "cpu.weight").unlink()
    (tmp_path / "cpu.weight").mkdir()  # writing fails as a vanished group's would
    with pytest.raises(SandboxError, match="CPU weight"):
        group.set_cpu_weight(10)


@real
def test_v2_parent_memory_headroom_without_a_memory_controller_is_none() -> None:
    assert parent_memory_headroom(root=V2_ROOT) is None


def test_v2_parent_memory_headroom_under_a_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A v2 folder with the memory controller, over plain files (this machine's cgroup2 has no controllers).
    monkeypatch.setattr(lifecycle, "resolve_version", lambda root, version: 2)
    folder = tmp_path / "kernelhub"
    folder.mkdir()
    (folder / "memory.max").write_text(f"{1024 * 2**20}\n")
    (folder / "memory.current").write_text(f"{100 * 2**20}\n")
    assert parent_memory_headroom(root=str(tmp_path)) == 924 * 2**20
    (folder / "memory.current").write_text(f"{2048 * 2**20}\n")  # over the limit: nothing left, not less
    assert parent_memory_headroom(root=str(tmp_path)) == 0
    (folder / "memory.max").write_text("max\n")
    assert parent_memory_headroom(root=str(tmp_path)) is None
