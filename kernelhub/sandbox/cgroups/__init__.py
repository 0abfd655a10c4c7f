"""Per-sandbox cgroups on cgroup v1 and v2: create, limit, measure, kill every member, remove.

Who calls what:

- :class:`~kernelhub.sandbox.sandbox.Sandbox` calls :func:`create_cgroup` when it starts and hands
  :attr:`Cgroup.procs_files` to the launcher (:func:`kernelhub.sandbox.bwrap.launch_argv`), whose
  ``/bin/sh`` writes its own pid into each file before it execs bubblewrap, so nothing the sandbox runs ever
  starts outside the group (SECURITY.md pitfall 2);
- when something in the sandbox dies, the services ask the sandbox, which reads :meth:`Cgroup.oom_kills` and
  :meth:`Cgroup.pids_max_hits` to tell an OOM kill from a timeout kill (exit 137 alone cannot: pitfall 4), and
  :meth:`Cgroup.metrics` for usage reports;
- when the sandbox stops, it awaits :meth:`Cgroup.remove` (pitfall 5);
- at start-up :meth:`SandboxFactory.reap_stale <kernelhub.sandbox.factory.SandboxFactory.reap_stale>` reopens
  the groups of sandboxes a dead process left with :func:`open_cgroup` and removes them;
  :func:`cleanup_stale` does the same for every group of a parent folder that is not named alive (for a
  gateway that keeps no sandbox directories; the gateway itself does not call it);
- ``kernelhub doctor`` shows :func:`probe`.

Both layouts are supported, told apart by ``statfs`` (pitfall 3): v1 has one hierarchy per controller (or
co-mounted ones such as ``cpu,cpuacct``) under a tmpfs, v2 is a single ``cgroup2`` mount. A v2 mount without
controllers (``/sys/fs/cgroup/unified`` on a hybrid host) still gives membership, ``cgroup.kill`` and CPU
accounting, but no limits; ``require=`` decides whether that is acceptable.

Only directories below a folder named ``kernelhub`` are ever created or removed. The one write outside it is
enabling controllers in the v2 root's ``cgroup.subtree_control``, and only when they are not enabled yet.

The rooms: :mod:`~.parsing` (pure helpers), :mod:`~.fs` (reading and writing cgroupfs files),
:mod:`~.layout` (names, the ``kernelhub`` folder, required controllers), :mod:`~.base` (the :class:`Cgroup`
both versions share: membership, killing, removal), :mod:`~.v1` and :mod:`~.v2`, :mod:`~.detect` (statfs,
probe) and :mod:`~.lifecycle` (the entry points :func:`create_cgroup`, :func:`open_cgroup` and
:func:`cleanup_stale`). Everything a caller needs is importable from this package.
"""

from __future__ import annotations

from .base import KILL_TIMEOUT_S, Cgroup, CgroupMetrics, signal_members
from .detect import CGROUP2_SUPER_MAGIC, CGROUP_SUPER_MAGIC, detect_version, fs_magic, probe
from .layout import DEFAULT_PARENT, DEFAULT_ROOT
from .lifecycle import cleanup_stale, create_cgroup, open_cgroup, parent_memory_headroom
from .parsing import (
    CPU_PERIOD_US,
    CPU_WEIGHT_DEFAULT,
    LIMIT_CONTROLLERS,
    UNLIMITED,
    V1_CONTROLLERS,
    check_cpu_weight,
    cpu_quota_us,
    cpu_shares,
    parse_keyed,
    parse_limit,
    parse_pids,
    parse_v1_mounts,
    v1_memory_write_order,
)
from .v1 import CgroupV1
from .v2 import CgroupV2

__all__ = [
    "CGROUP2_SUPER_MAGIC",
    "CGROUP_SUPER_MAGIC",
    "CPU_PERIOD_US",
    "CPU_WEIGHT_DEFAULT",
    "KILL_TIMEOUT_S",
    "DEFAULT_PARENT",
    "DEFAULT_ROOT",
    "LIMIT_CONTROLLERS",
    "UNLIMITED",
    "V1_CONTROLLERS",
    "Cgroup",
    "CgroupMetrics",
    "CgroupV1",
    "CgroupV2",
    "check_cpu_weight",
    "cleanup_stale",
    "cpu_quota_us",
    "cpu_shares",
    "create_cgroup",
    "detect_version",
    "fs_magic",
    "open_cgroup",
    "parent_memory_headroom",
    "parse_keyed",
    "parse_limit",
    "parse_pids",
    "parse_v1_mounts",
    "probe",
    "signal_members",
    "v1_memory_write_order",
]
