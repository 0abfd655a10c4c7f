"""What isolation this machine can enforce. Called by ``kernelhub doctor`` and by the gateway at start-up.

Every check is a real attempt (a bubblewrap run as an unprivileged uid, a cgroup probe, a loop device), not a
guess from version numbers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from . import cgroups


@dataclasses.dataclass
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True  # under strict isolation


def _run(argv: list[str], timeout: float = 10) -> tuple[int, str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, str(exc)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def checks(*, bwrap: str | None = None, cgroup_root: str = "/sys/fs/cgroup",
           runtime_dir: str = "/opt/kernelhub/runtime", probe_uid: int = 199999) -> list[Check]:
    """Probe the machine. Blocking (runs a few short commands); call it from a thread in async code."""
    out: list[Check] = []
    root = os.geteuid() == 0
    out.append(Check("root", root, "running as root: each sandbox gets a host uid of its own" if root
                     else "not root: sandboxes share your uid, no cgroups, no workspace quota"))
    bwrap = bwrap or shutil.which("bwrap")
    if not bwrap:
        out.append(Check("bubblewrap", False, "bwrap not found (apt-get install bubblewrap)"))
    else:
        code, text = _run([bwrap, "--version"])
        out.append(Check("bubblewrap", code == 0, text or f"exit {code}"))
        argv = [bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--disable-userns",
                "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
                "--symlink", "usr/bin", "/bin", "--proc", "/proc", "--dev", "/dev", "--", "/bin/true"]
        if root:
            argv = ["setpriv", f"--reuid={probe_uid}", f"--regid={probe_uid}", "--clear-groups",
                    "--no-new-privs", "--", *argv]
        code, text = _run(argv)
        out.append(Check("user namespaces", code == 0,
                         "an unprivileged uid can create user, pid and net namespaces" if code == 0
                         else f"bubblewrap could not create namespaces: {text}"))
    version = cgroups.detect_version(cgroup_root)
    info: dict[str, Any] = cgroups.probe(cgroup_root) if version else {}
    out.append(Check("cgroups", version is not None,
                     f"cgroup v{version} at {cgroup_root}" if version else f"no cgroup hierarchy at {cgroup_root}"))
    controllers = info.get("controllers") or {}
    for controller in ("memory", "cpu", "pids"):
        # cgroups.probe lists every controller it looked for; only "writable" says a group gets it.
        available = bool(controllers.get(controller, {}).get("writable"))
        out.append(Check(f"cgroup {controller}", available and root,
                         "enforced" if available and root else "not available: that limit cannot be enforced"))
    swap = bool(info.get("swap_accounting"))
    out.append(Check("swap accounting", swap, "memory limits include swap" if swap
                     else "no memsw: memory limits do not cover swap", required=False))
    freezer = bool(info.get("freezer"))
    out.append(Check("freezer", freezer, "processes are frozen before they are killed" if freezer
                     else "no freezer: a fork storm may race the kill loop", required=False))
    loop = False
    if root and shutil.which("losetup") and shutil.which("mkfs.ext4"):
        code, text = _run(["losetup", "-f"])
        loop = code == 0
    out.append(Check("workspace quota", loop, "ext4 loop images per workspace (disk and inode quota)" if loop
                     else "no loop devices: workspaces have no disk quota"))
    seccomp = "Seccomp:" in Path("/proc/self/status").read_text()
    out.append(Check("seccomp", seccomp, "the kernel supports seccomp; kernelhub relies on no_new_privs, "
                     "dropped capabilities and --disable-userns and installs no syscall filter of its own"
                     if seccomp else "no seccomp", required=False))
    py = Path(runtime_dir) / "python" / "bin" / "python"
    node = Path(runtime_dir) / "node" / "node_modules" / "tslab"
    out.append(Check("python runtime", py.exists(), str(py) if py.exists() else f"{py} missing (make install)"))
    out.append(Check("node runtime", node.exists(), str(node) if node.exists()
                     else f"{node} missing (make install)", required=False))
    return out


def enforceable(results: list[Check]) -> bool:
    """True when every check that strict isolation needs passed."""
    return all(c.ok for c in results if c.required)


async def checks_async(**kwargs: Any) -> list[Check]:
    return await asyncio.to_thread(checks, **kwargs)


def report(results: list[Check]) -> str:
    lines = []
    for c in results:
        mark = "ok  " if c.ok else ("FAIL" if c.required else "warn")
        lines.append(f"[{mark}] {c.name}: {c.detail}")
    return "\n".join(lines)
