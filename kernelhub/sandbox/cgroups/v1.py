"""cgroup v1: one hierarchy per controller (or co-mounted ones such as ``cpu,cpuacct``) under a tmpfs.

Memory and CPU files go through cgroupspy; it has no pids or freezer support, so those are plain writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Mapping

from cgroupspy.controllers import CpuAcctController, CpuController, MemoryController
from cgroupspy.nodes import Node

from ...errors import SandboxError
from ..limits import Limits
from .base import FREEZE_WAIT_S, Cgroup, CgroupMetrics, log, poll_until, sigkill_members
from .fs import read, read_int, read_keyed, read_limit, write
from .layout import check_name, make_parent, require_controllers
from .parsing import (
    CPU_PERIOD_US,
    LIMIT_CONTROLLERS,
    UNLIMITED,
    V1_CONTROLLERS,
    cpu_quota_us,
    cpu_shares,
    parse_keyed,
    parse_v1_mounts,
    v1_memory_write_order,
)

__all__ = ["CgroupV1", "create_v1", "v1_mounts"]


def v1_mounts(root: str) -> dict[str, str]:
    with open("/proc/self/mountinfo") as f:
        return parse_v1_mounts(f.read(), os.path.realpath(root))



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
                write(os.path.join(self._dirs["pids"], "pids.max"), str(limits.pids))
        except OSError as e:
            raise SandboxError(f"Cannot set limits on cgroup {self.parent}/{self.name}: {e}.") from e

    def set_cpu_weight(self, weight: int) -> None:
        shares = cpu_shares(weight)
        if "cpu" not in self._dirs:
            return
        try:
            write(os.path.join(self._dirs["cpu"], "cpu.shares"), str(shares))
        except OSError as e:
            raise SandboxError(f"Cannot set the CPU weight of cgroup {self.parent}/{self.name}: {e}.") from e

    def _apply_memory(self, limit: int) -> None:
        directory = self._dirs["memory"]
        memory = MemoryController(Node(os.fsencode(directory)))
        # Groups inherit oom_kill_disable from their parent; with it set, a group at its limit would hang its
        # tasks instead of killing one.
        oom_control = os.path.join(directory, "memory.oom_control")
        if parse_keyed(read(oom_control)).get("oom_kill_disable", 0):
            write(oom_control, "0")
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
            memory_limit_bytes=read_limit(limit) if limit else UNLIMITED,
            pids=read_int(current) if current else 0,
            pids_limit=read_limit(pids_max) if pids_max else UNLIMITED,
            oom_kills=self.oom_kills(),
            pids_max_hits=self.pids_max_hits(),
        )

    def oom_kills(self) -> int:
        # The "oom_kill N" line exists since Linux 4.13; "under_oom" only says whether it is happening now.
        path = self._file("memory", "memory.oom_control")
        return read_keyed(path, "oom_kill") if path else 0

    def pids_max_hits(self) -> int:
        path = self._file("pids", "pids.events")
        return read_keyed(path, "max") if path else 0

    def child(self, name: str) -> CgroupV1:
        # Membership needs one hierarchy and killing wants the freezer; the pids one also counts the tree.
        # Memory and CPU stay with the parent: a v1 memory group without use_hierarchy would escape its limit.
        check_name(name)
        wanted: list[str] = [c for c in ("pids", "freezer") if c in self._dirs] or list(self._dirs)[:1]
        dirs: dict[str, str] = {}
        for controller in wanted:
            path = os.path.join(self._dirs[controller], name)
            if path not in dirs.values():
                try:
                    os.mkdir(path)
                except OSError as e:
                    for made in dirs.values():
                        with contextlib.suppress(OSError):
                            os.rmdir(made)
                    raise SandboxError(f"Cannot create cgroup {self.parent}/{self.name}/{name}: {e.strerror}.") from e
            dirs[controller] = path
        return CgroupV1(name, root=self.root, parent=f"{self.parent}/{self.name}", dirs=dirs)

    async def _kill_all(self, deadline: float) -> None:
        one_round = self._frozen_round if "freezer" in self._dirs else self._plain_round
        await self._kill_rounds(one_round, deadline)

    async def _frozen_round(self, deadline: float) -> None:
        # Frozen tasks can neither fork nor exit, so one pass over cgroup.procs gets every one of them and no
        # pid can be reused between reading and killing. Killed tasks die once thawed.
        state = os.path.join(self._dirs["freezer"], "freezer.state")
        write(state, "FROZEN")
        try:
            until = min(deadline, asyncio.get_running_loop().time() + FREEZE_WAIT_S)
            if not await poll_until(lambda: read(state).strip() == "FROZEN", until):
                log.warning("cgroup %s/%s did not freeze in time; killing anyway", self.parent, self.name)
            sigkill_members(self.pids)
        finally:
            with contextlib.suppress(FileNotFoundError):
                write(state, "THAWED")




def create_v1(name: str, root: str, parent: str, parts: list[str], required: frozenset[str]) -> CgroupV1:
    mounts = v1_mounts(root)
    require_controllers(required, mounts, f"cgroup v1 at {root}")
    dirs: dict[str, str] = {}
    created: list[str] = []
    try:
        for controller in V1_CONTROLLERS:
            mount = mounts.get(controller)
            if mount is None:
                continue
            group = os.path.join(mount, *parts, name)
            if group not in created:
                make_parent(mount, parts)
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

