"""What isolation this machine can enforce. Called by ``kernelhub doctor`` and by the gateway at start-up.

Every check is a real attempt (a bubblewrap run as an unprivileged uid with the system-call filter loaded, a
cgroup probe, a loop device), not a guess from version numbers. The one judgement from a version is the list
of known bubblewrap advisories (:data:`BWRAP_ADVISORIES`), each reported with whether the installed version
and kernelhub's way of calling it are exposed, and why.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from . import cgroups, seccomp


@dataclasses.dataclass(frozen=True)
class Advisory:
    """A known bubblewrap advisory: ``fixed_in`` (a version, or None when the fix belongs to the caller) and why
    kernelhub's way of calling bwrap is or is not exposed whatever the version. Sources: bubblewrap's
    SECURITY.md and NEWS.md, and Debian's bubblewrap changelog (``/usr/share/doc/bubblewrap``)."""

    ident: str
    fixed_in: tuple[int, ...] | None
    summary: str
    kernelhub: str


BWRAP_ADVISORIES = (
    Advisory("CVE-2020-5291 (GHSA-j2qp-rvxj-43vj)", (0, 4, 1),
             "root privilege escalation through a setuid bwrap 0.4.0 where unprivileged user namespaces are "
             "allowed",
             "kernelhub runs bwrap as the sandbox's own unprivileged uid, never setuid (checked here)"),
    Advisory("CVE-2017-5226", None,
             "a sandbox feeding keystrokes to the terminal it shares (TIOCSTI, and TIOCLINUX on a virtual "
             "console); bubblewrap's SECURITY.md counts it as the caller's to prevent",
             "kernelhub passes --new-session (the sandbox has no controlling terminal) and gives bwrap no "
             "terminal at all: stdin /dev/null, stdout /dev/null, stderr a pipe"),
    Advisory("CVE-2024-42472", None,
             "Flatpak's --persist directories could be swapped for symlinks; Debian's 0.8.0-2+deb12u1 backports "
             "--bind-fd for Flatpak's fix, the flaw is Flatpak's",
             "kernelhub binds no path the sandbox can replace: the workspace and run directory are mount points "
             "in root-owned directories, bound by path before any sandbox code runs"),
    Advisory("CVE-2021-41133", None,
             "Flatpak's seccomp filter let new mount-API calls through (named in Debian's changelog for "
             "--disable-userns)",
             "kernelhub's filter is an allow-list (fsopen, fsmount, move_mount, open_tree, mount answer EPERM) "
             "and it passes --disable-userns"),
)


def _version(text: str) -> tuple[int, ...] | None:
    """``(0, 8, 0)`` from ``bubblewrap 0.8.0``; None if there is no version in ``text``."""
    for word in text.split():
        parts = word.split(".")
        if len(parts) >= 2 and all(p.isdigit() for p in parts):
            return tuple(int(p) for p in parts)
    return None


def advisories(version_text: str, setuid: bool) -> list[Check]:
    """One informational check per :data:`BWRAP_ADVISORIES` entry for the installed bwrap."""
    version = _version(version_text)
    out = []
    for adv in BWRAP_ADVISORIES:
        if adv.fixed_in is not None and version is not None and version < adv.fixed_in:
            exposed, verdict = True, f"affected: {version_text} predates the fix in " \
                                     f"{'.'.join(map(str, adv.fixed_in))}"
        elif adv.fixed_in is not None:
            exposed = setuid
            verdict = f"not affected: fixed in {'.'.join(map(str, adv.fixed_in))}" if not setuid else \
                "fixed in this version, but bwrap is setuid here: kernelhub does not need that"
        else:
            exposed, verdict = False, "not affected (the caller's to prevent)"
        out.append(Check(f"bwrap {adv.ident}", not exposed, f"{verdict}. {adv.summary}; {adv.kernelhub}.",
                         required=False))
    return out


@dataclasses.dataclass
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True  # under strict isolation


def _is_setuid(path: str) -> bool:
    try:
        return bool(os.stat(path).st_mode & 0o4000)
    except OSError:
        return False


def _run(argv: list[str], timeout: float = 10, pass_fds: tuple[int, ...] = ()) -> tuple[int, str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                              pass_fds=pass_fds)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, str(exc)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def checks(*, bwrap: str | None = None, cgroup_root: str = "/sys/fs/cgroup",
           runtime_dir: str = "/opt/kernelhub/runtime", probe_uid: int = 199999,
           use_seccomp: bool = True) -> list[Check]:
    """Probe the machine. Blocking (runs a few short commands); call it from a thread in async code.
    ``use_seccomp`` false (the factory's ``seccomp`` option) fails the filter's check: strict isolation needs
    it."""
    out: list[Check] = []
    root = os.geteuid() == 0
    out.append(Check("root", root, "running as root: each sandbox gets a host uid of its own" if root
                     else "not root: sandboxes share your uid, no cgroups, no workspace quota"))
    bwrap = bwrap or shutil.which("bwrap")
    filter_ok, filter_text = seccomp.status() if use_seccomp else (False, "turned off (KERNELHUB_SECCOMP=false)")
    if not bwrap:
        out.append(Check("bubblewrap", False, "bwrap not found (apt-get install bubblewrap)"))
        out.append(Check("seccomp", filter_ok, filter_text))
    else:
        code, version_text = _run([bwrap, "--version"])
        setuid = _is_setuid(bwrap)
        how = (" (setuid root: kernelhub runs it unprivileged and does not need that; remove the bit)" if setuid
               else ", not setuid")
        out.append(Check("bubblewrap", code == 0 and not setuid, (version_text or f"exit {code}") + how))
        argv = [bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--disable-userns",
                "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
                "--symlink", "usr/bin", "/bin", "--proc", "/proc", "--dev", "/dev"]
        if root:
            argv = ["setpriv", f"--reuid={probe_uid}", f"--regid={probe_uid}", "--clear-groups",
                    "--no-new-privs", "--", *argv]
        code, text = _run([*argv, "--", "/bin/true"])
        out.append(Check("user namespaces", code == 0,
                         "an unprivileged uid can create user, pid and net namespaces" if code == 0
                         else f"bubblewrap could not create namespaces: {text}"))
        if filter_ok and code == 0:
            # The filter loaded by bwrap as a sandbox would: a denied call answers EPERM, the process lives on.
            fd = seccomp.program_fd()
            try:
                code, text = _run([*argv, "--seccomp", str(fd), "--", "/bin/sh", "-c",
                                   "grep -q '^Seccomp:.*2' /proc/self/status && ! unshare -U true 2>/dev/null"],
                                  pass_fds=(fd,))
            finally:
                os.close(fd)
            filter_ok = code == 0
            if not filter_ok:
                filter_text = f"bubblewrap could not load the filter: {text or f'exit {code}'}"
        out.append(Check("seccomp", filter_ok, filter_text))
        out += advisories(version_text, setuid)
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
