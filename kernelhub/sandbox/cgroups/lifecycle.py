"""The entry points: create a sandbox's cgroup, reattach to one, clear away the ones nobody owns."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from ...errors import IsolationUnavailable, SandboxError
from ..limits import Limits
from .base import Cgroup
from .detect import resolve_version
from .fs import read, read_int, read_limit
from .layout import DEFAULT_PARENT, DEFAULT_ROOT, NAME_RE, check_name, check_parent, check_require
from .parsing import LIMIT_CONTROLLERS, UNLIMITED
from .v1 import CgroupV1, create_v1, v1_mounts
from .v2 import CgroupV2, create_v2

__all__ = ["cleanup_stale", "create_cgroup", "open_cgroup", "parent_memory_headroom"]

log = logging.getLogger("kernelhub.sandbox.cgroups")


def create_cgroup(
    name: str,
    limits: Limits,
    *,
    root: str = DEFAULT_ROOT,
    parent: str = DEFAULT_PARENT,
    version: int | None = None,
    require: Iterable[str] = LIMIT_CONTROLLERS,
) -> Cgroup:
    """Create the cgroup ``parent/name`` in every hierarchy and apply ``limits``. Called by
    :class:`~kernelhub.sandbox.sandbox.Sandbox` when it starts, before its first process exists.

    ``version`` None detects the layout at ``root``. Every controller in ``require`` must be enforceable or
    IsolationUnavailable names the missing ones and nothing is created; with ``require=()`` the group gets
    what the host offers and :attr:`Cgroup.controllers` says which limits hold. A group of that name must not
    exist yet (SandboxError): reattaching is :func:`open_cgroup`'s job.
    """
    check_name(name)
    parts = check_parent(parent)
    required = check_require(require)
    resolved = resolve_version(root, version)
    group: Cgroup
    if resolved == 1:
        group = create_v1(name, root, parent, parts, required)
    else:
        group = create_v2(name, root, parent, parts, required)
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

    Called by :meth:`SandboxFactory.reap_stale <kernelhub.sandbox.factory.SandboxFactory.reap_stale>` to remove
    the group of a sandbox a dead process left, and by :func:`cleanup_stale`. Raises SandboxError if it exists
    in no hierarchy.
    """
    check_name(name)
    parts = check_parent(parent)
    resolved = resolve_version(root, version)
    if resolved == 1:
        mounts = v1_mounts(root)
        dirs = {c: os.path.join(mount, *parts, name) for c, mount in mounts.items()}
        dirs = {c: path for c, path in dirs.items() if os.path.isdir(path)}
        if not dirs:
            raise SandboxError(f"No cgroup {parent}/{name} under {root}.")
        return CgroupV1(name, root=root, parent=parent, dirs=dirs)
    path = os.path.join(root, *parts, name)
    try:
        offered = set(read(os.path.join(path, "cgroup.controllers")).split())
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

    For clearing away what a crash left when no sandbox directories say which groups are whose (the gateway
    reaps per sandbox directory instead). A group that cannot be removed is
    logged and skipped so one stuck group does not keep the gateway from starting.
    """
    parts = check_parent(parent)
    alive = set(names_alive)
    try:
        resolved = resolve_version(root, version)
    except IsolationUnavailable:
        return []  # no cgroups at all: nothing can be stale
    if resolved == 1:
        bases = {os.path.join(mount, *parts) for mount in v1_mounts(root).values()}
    else:
        bases = {os.path.join(root, *parts)}
    found: set[str] = set()
    for base in bases:
        try:
            with os.scandir(base) as entries:
                found.update(
                    e.name for e in entries if e.is_dir(follow_symlinks=False) and NAME_RE.match(e.name)
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


def parent_memory_headroom(
    *, root: str = DEFAULT_ROOT, parent: str = DEFAULT_PARENT, version: int | None = None
) -> int | None:
    """Bytes between the memory limit of the folder ``parent`` (which every sandbox's group sits in) and what
    it uses now, or None when it has no limit (or no memory controller, or does not exist yet). An operator
    caps all sandboxes together by limiting that folder; the pool reads this before it starts another
    sandbox. Raises IsolationUnavailable where there are no cgroups at all."""
    parts = check_parent(parent)
    if resolve_version(root, version) == 1:
        mount = v1_mounts(root).get("memory")
        if mount is None:
            return None
        folder = os.path.join(mount, *parts)
        limit_file, usage_file = "memory.limit_in_bytes", "memory.usage_in_bytes"
    else:
        folder = os.path.join(root, *parts)
        limit_file, usage_file = "memory.max", "memory.current"
    limit = read_limit(os.path.join(folder, limit_file))
    if limit == UNLIMITED:
        return None
    return max(0, limit - read_int(os.path.join(folder, usage_file)))
