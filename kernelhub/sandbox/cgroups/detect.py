"""Which cgroup layout a host has, told apart by ``statfs`` (SECURITY.md pitfall 3), and what it can enforce.

:func:`detect_version` is asked by the entry points when no version is given; :func:`probe` reports to
``kernelhub doctor`` by creating and removing an empty group.
"""

from __future__ import annotations

import ctypes
import functools
import os
import secrets
from typing import Any

from ...errors import IsolationUnavailable
from .fs import read
from .layout import DEFAULT_PARENT, DEFAULT_ROOT, check_parent, make_parent
from .parsing import LIMIT_CONTROLLERS, V1_CONTROLLERS
from .v1 import v1_mounts
from .v2 import v2_enable

__all__ = [
    "CGROUP2_SUPER_MAGIC",
    "CGROUP_SUPER_MAGIC",
    "TMPFS_MAGIC",
    "detect_version",
    "fs_magic",
    "probe",
    "resolve_version",
]

CGROUP2_SUPER_MAGIC = 0x63677270
CGROUP_SUPER_MAGIC = 0x27E0EB
TMPFS_MAGIC = 0x01021994


class _Statfs(ctypes.Structure):
    # f_type is the first member of struct statfs on every Linux ABI; the padding is room for the rest of it.
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_char * 256)]


@functools.cache
def _libc_statfs() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    statfs = libc.statfs
    statfs.argtypes = [ctypes.c_char_p, ctypes.POINTER(_Statfs)]
    statfs.restype = ctypes.c_int
    return statfs


def fs_magic(path: str) -> int | None:
    """The filesystem magic number of ``path`` (``statfs(2)`` ``f_type``), or None if it cannot be stat'ed.

    ``os.statvfs`` has no ``f_type``, hence ctypes.
    """
    buf = _Statfs()
    if _libc_statfs()(os.fsencode(path), ctypes.byref(buf)) != 0:
        return None
    return int(buf.f_type) & 0xFFFFFFFF



def detect_version(root: str = DEFAULT_ROOT) -> int | None:
    """Which cgroup layout is mounted at ``root``: 2, 1, or None for neither.

    2 if ``root`` itself is a ``cgroup2`` mount; 1 if it is a tmpfs holding v1 hierarchies (whether or not a
    v2 mount sits beside them, as on hybrid hosts). Called by :func:`create_cgroup` when no version is given,
    and by :func:`probe`.
    """
    magic = fs_magic(root)
    if magic == CGROUP2_SUPER_MAGIC:
        return 2
    if magic == TMPFS_MAGIC:
        try:
            entries = os.listdir(root)
        except OSError:
            return None
        if any(fs_magic(os.path.join(root, entry)) == CGROUP_SUPER_MAGIC for entry in entries):
            return 1
    return None


def resolve_version(root: str, version: int | None) -> int:
    if version not in (None, 1, 2):
        raise ValueError(f"cgroup version must be 1, 2 or None, not {version!r}.")
    detected = detect_version(root)
    if version is None:
        if detected is None:
            raise IsolationUnavailable(f"No cgroup hierarchy is mounted at {root}.")
        return detected
    if version == 2 and detected != 2:
        raise IsolationUnavailable(f"{root} is not a cgroup2 mount.")
    if version == 1 and detected != 1:
        raise IsolationUnavailable(f"{root} holds no cgroup v1 hierarchies.")
    return version



def probe(root: str = DEFAULT_ROOT, *, parent: str = DEFAULT_PARENT) -> dict[str, Any]:
    """What this host's cgroups can do, for ``kernelhub doctor``.

    Creates and removes an empty probe group under ``parent`` (enabling v2 controllers there as
    :func:`create_cgroup` would) to learn what is writable in practice. Returns ``version``, per controller
    ``available`` (the kernel has it at ``root``) and ``writable`` (a group under ``parent`` gets it),
    ``swap_accounting`` (memory+swap can be capped), ``freezer``, ``kill`` (v2 ``cgroup.kill``) and ``error``.
    """
    parts = check_parent(parent)
    version = detect_version(root)
    report: dict[str, Any] = {
        "root": root,
        "parent": parent,
        "version": version,
        "controllers": {},
        "swap_accounting": False,
        "freezer": False,
        "kill": False,
        "error": None,
    }
    probe_name = f"probe-{os.getpid()}-{secrets.token_hex(4)}"
    if version == 1:
        mounts = v1_mounts(root)
        for controller in V1_CONTROLLERS:
            mount = mounts.get(controller)
            writable = False
            if mount is not None:
                group = os.path.join(mount, *parts, probe_name)
                try:
                    make_parent(mount, parts)
                    os.mkdir(group)
                    writable = True
                    if controller == "memory":
                        report["swap_accounting"] = os.path.exists(
                            os.path.join(group, "memory.memsw.limit_in_bytes")
                        )
                    os.rmdir(group)
                except (OSError, IsolationUnavailable) as e:
                    report["error"] = str(e)
            report["controllers"][controller] = {
                "available": mount is not None,
                "writable": writable,
                "path": mount,
            }
        report["freezer"] = report["controllers"]["freezer"]["writable"]
    elif version == 2:
        available = set(read(os.path.join(root, "cgroup.controllers")).split())
        offered: set[str] = set()
        try:
            parent_path = make_parent(root, parts)
            v2_enable(root, parent_path)
            group = os.path.join(parent_path, probe_name)
            os.mkdir(group)
            try:
                offered = set(read(os.path.join(group, "cgroup.controllers")).split())
                report["swap_accounting"] = os.path.exists(os.path.join(group, "memory.swap.max"))
                report["freezer"] = os.path.exists(os.path.join(group, "cgroup.freeze"))
                report["kill"] = os.path.exists(os.path.join(group, "cgroup.kill"))
            finally:
                os.rmdir(group)
        except (OSError, IsolationUnavailable) as e:
            report["error"] = str(e)
        for controller in LIMIT_CONTROLLERS:
            report["controllers"][controller] = {
                "available": controller in available,
                "writable": controller in offered,
                "path": root,
            }
    else:
        report["error"] = f"No cgroup hierarchy is mounted at {root}."
    return report

