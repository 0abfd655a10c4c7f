"""Helpers shared by the cgroup tests: making groups, starting processes in them, waiting on the kernel.

This machine mounts cgroup v1 at /sys/fs/cgroup (cpu and cpuacct as separate hierarchies) and a cgroup2 at
/sys/fs/cgroup/unified with no controllers, so the v2 tests cover membership, cgroup.kill and removal but can
never see a v2 limit enforced. Processes join a group the way the launcher does it (SECURITY.md pitfall 2): a
/bin/sh writes its own pid into every procs file, then execs the workload.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import uuid4

import pytest

from kernelhub.sandbox.cgroups import (
    Cgroup,
    create_cgroup,
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


def read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def v1_dir(controller: str, group: Cgroup) -> str:
    return os.path.join(V1_ROOT, controller, group.parent, group.name)


async def kill_in_rounds(group: Cgroup, one_round: Callable[[float], Awaitable[None]]) -> None:
    """Drive one particular kill strategy, as kill_all() would pick it on a host that has nothing better."""
    await group._kill_rounds(one_round, asyncio.get_running_loop().time() + 10)
