"""cgroup v2: the single unified hierarchy, a ``cgroup2`` mount.

A v2 mount without controllers (``/sys/fs/cgroup/unified`` on a hybrid host) still gives membership,
``cgroup.kill`` and CPU accounting, but no limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterable

from ...errors import SandboxError
from ..limits import Limits
from .base import FREEZE_WAIT_S, Cgroup, CgroupMetrics, log, poll_until, sigkill_members
from .fs import read, read_int, read_keyed, read_limit, write
from .layout import check_name, in_own_folder, make_parent, require_controllers
from .parsing import CPU_PERIOD_US, LIMIT_CONTROLLERS, check_cpu_weight, cpu_quota_us

__all__ = ["CgroupV2", "create_v2", "v2_enable"]


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
                write(self._file("memory.max"), str(limits.memory_bytes))
                swap_max = self._file("memory.swap.max")
                if os.path.exists(swap_max):  # absent without swap accounting
                    write(swap_max, "0")
            if "cpu" in self.controllers:
                write(self._file("cpu.max"), f"{cpu_quota_us(limits.cpu)} {CPU_PERIOD_US}")
            if "pids" in self.controllers:
                write(self._file("pids.max"), str(limits.pids))
        except OSError as e:
            raise SandboxError(f"Cannot set limits on cgroup {self.parent}/{self.name}: {e}.") from e

    def set_cpu_weight(self, weight: int) -> None:
        check_cpu_weight(weight)
        if "cpu" not in self.controllers:
            return
        try:
            write(self._file("cpu.weight"), str(weight))
        except OSError as e:
            raise SandboxError(f"Cannot set the CPU weight of cgroup {self.parent}/{self.name}: {e}.") from e

    def metrics(self) -> CgroupMetrics:
        self._check_metrics_possible()
        # cpu.stat's usage_usec is core cgroup v2 accounting, there even without the cpu controller.
        cpu_usec = read_keyed(self._file("cpu.stat"), "usage_usec")
        memory_bytes = read_int(self._file("memory.current"))
        return CgroupMetrics(
            cpu_seconds=cpu_usec / 1e6,
            memory_bytes=memory_bytes,
            memory_peak_bytes=read_int(self._file("memory.peak"), memory_bytes),
            memory_limit_bytes=read_limit(self._file("memory.max")),
            pids=read_int(self._file("pids.current")),
            pids_limit=read_limit(self._file("pids.max")),
            oom_kills=self.oom_kills(),
            pids_max_hits=self.pids_max_hits(),
        )

    def oom_kills(self) -> int:
        # memory.events counts this group and its descendants, so a kill anywhere in the sandbox shows.
        return read_keyed(self._file("memory.events"), "oom_kill")

    def pids_max_hits(self) -> int:
        return read_keyed(self._file("pids.events"), "max")

    def child(self, name: str) -> CgroupV2:
        # No controller is enabled in this group's cgroup.subtree_control, so processes may stay in it next to
        # the child (the "no internal processes" rule binds only groups that pass controllers down).
        check_name(name)
        path = os.path.join(self.path, name)
        try:
            os.mkdir(path)
        except OSError as e:
            raise SandboxError(f"Cannot create cgroup {self.parent}/{self.name}/{name}: {e.strerror}.") from e
        return CgroupV2(name, root=self.root, parent=f"{self.parent}/{self.name}", path=path, controllers=())

    async def _kill_all(self, deadline: float) -> None:
        if self._has_kill:
            await self._kill_rounds(self._kill_round, deadline)
        elif self._has_freeze:  # Linux 5.2 to 5.13
            await self._kill_rounds(self._frozen_round, deadline)
        else:
            await self._kill_rounds(self._plain_round, deadline)

    async def _kill_round(self, deadline: float) -> None:
        # cgroup.kill SIGKILLs the whole subtree inside the kernel, including tasks forked while it runs.
        write(self._file("cgroup.kill"), "1")

    async def _frozen_round(self, deadline: float) -> None:
        """The v1 freezer round with ``cgroup.freeze``, for kernels without ``cgroup.kill``."""
        freeze = self._file("cgroup.freeze")
        write(freeze, "1")
        try:
            until = min(deadline, asyncio.get_running_loop().time() + FREEZE_WAIT_S)
            if not await poll_until(lambda: bool(read_keyed(self._file("cgroup.events"), "frozen")), until):
                log.warning("cgroup %s/%s did not freeze in time; killing anyway", self.parent, self.name)
            sigkill_members(self.pids)
        finally:
            with contextlib.suppress(FileNotFoundError):
                write(freeze, "0")




def v2_enable(root: str, parent_path: str) -> None:
    """Enable the limit controllers from ``root`` down to ``parent_path`` where available and not yet on.

    Writes only into folders inside ``kernelhub`` and, when needed, the root itself; a folder in between (a
    delegated systemd subtree) that does not pass a controller on simply leaves it unavailable.
    """
    levels = [root]
    relative = os.path.relpath(parent_path, root)
    for part in relative.split(os.sep):
        levels.append(os.path.join(levels[-1], part))
    for level in levels:
        if level != root and not in_own_folder(root, level):
            continue
        try:
            available = set(read(os.path.join(level, "cgroup.controllers")).split())
            enabled = set(read(os.path.join(level, "cgroup.subtree_control")).split())
        except OSError:
            return
        for controller in LIMIT_CONTROLLERS:
            if controller in available and controller not in enabled:
                # One controller per write: a controller the kernel refuses must not take the others with it.
                try:
                    write(os.path.join(level, "cgroup.subtree_control"), f"+{controller}")
                except OSError as e:
                    log.warning("Cannot enable the %s controller in %s: %s", controller, level, e.strerror)



def create_v2(name: str, root: str, parent: str, parts: list[str], required: frozenset[str]) -> CgroupV2:
    parent_path = make_parent(root, parts)
    v2_enable(root, parent_path)
    offered = set(read(os.path.join(parent_path, "cgroup.subtree_control")).split())
    require_controllers(required, offered, f"cgroup v2 at {root} (for {parent}/)")
    group = os.path.join(parent_path, name)
    try:
        os.mkdir(group)
    except FileExistsError as e:
        raise SandboxError(f"cgroup {parent}/{name} already exists.") from e
    except OSError as e:
        raise SandboxError(f"Cannot create cgroup {parent}/{name}: {e.strerror}.") from e
    controllers = set(read(os.path.join(group, "cgroup.controllers")).split()) & set(LIMIT_CONTROLLERS)
    return CgroupV2(name, root=root, parent=parent, path=group, controllers=controllers)

