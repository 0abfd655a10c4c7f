"""Creating sandboxes: :class:`SandboxFactory`, configured with traitlets, one per process.

The gateway app configures one (``--SandboxFactory.*`` options and ``KERNELHUB_*`` variables); plain
jupyter_client gets one from the kernel provisioner, configured from the variables alone. The hub calls
:meth:`SandboxFactory.create` for every new sandbox, :meth:`SandboxFactory.reap_stale` at start-up and
:meth:`SandboxFactory.stop_all` at shutdown. The factory holds what its sandboxes share: the uid pool
(:mod:`kernelhub.sandbox.uids`), the state directory and the copy of the agent they run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from traitlets import Bool, Enum, Float, Integer, TraitError, Unicode, default, validate
from traitlets.config import LoggingConfigurable

from ..errors import IsolationUnavailable, SandboxError
from . import seccomp
from .cgroups import CPU_WEIGHT_DEFAULT, detect_version, open_cgroup, parent_memory_headroom
from .channel_guard import MESSAGE_BURST, MESSAGES_PER_S
from .limits import Limits
from .sandbox import Sandbox, unmount_run_dir
from .uids import UidPool
from .workspace import Workspace

__all__ = ["AGENT_FILES", "SandboxFactory"]

#: Files bound read-only at /opt/kernelhub-agent in every sandbox: the agent, what kernelspecs start kernels
#: with, the egress forwarder, and (in its ``site`` folder, :data:`~kernelhub.sandbox.sandbox.SITE_FILES`) the
#: Python start-up hook that opens the user site.
AGENT_FILES = (Path(__file__).with_name("agent.py"), Path(__file__).with_name("tslab_ipc.js"),
               Path(__file__).with_name("ipykernel_launch.py"), Path(__file__).with_name("egress_forwarder.py"),
               Path(__file__).with_name("sitecustomize.py"))


def _mem_available(meminfo: str = "/proc/meminfo") -> int:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (Linux 3.14+; ``MemFree`` on older kernels)."""
    with open(meminfo) as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    value = fields.get("MemAvailable") or fields["MemFree"]
    return int(value.split()[0]) * 1024


class SandboxFactory(LoggingConfigurable):
    """Creates sandboxes. Configured by the gateway app (or, for plain jupyter_client, from ``KERNELHUB_*``
    variables); one per process."""

    # Each option's KERNELHUB_* variable is its ``env`` tag, read by kernelhub.settings (the command line, and
    # the provisioner's own factory under plain jupyter_client).
    state_dir = Unicode(help="Where sandboxes keep their workspaces and sockets.", config=True).tag(
        env="KERNELHUB_STATE_DIR", default_help="/var/lib/kernelhub as root, else ~/.local/share/kernelhub")

    @default("state_dir")
    def _state_dir_default(self) -> str:
        return "/var/lib/kernelhub" if os.geteuid() == 0 else os.path.expanduser("~/.local/share/kernelhub")

    runtime_dir = Unicode("/opt/kernelhub/runtime", help="The kernels' runtime (python venv, node_modules), bound "
                          "read-only into every sandbox.", config=True).tag(env="KERNELHUB_RUNTIME_DIR")
    agent_python = Unicode("/usr/bin/python3", help="Python that runs the in-sandbox agent.",
                           config=True).tag(env="KERNELHUB_AGENT_PYTHON")
    bwrap_path = Unicode(help="The bubblewrap binary.", config=True).tag(
        env="KERNELHUB_BWRAP", default_help="bwrap on PATH")

    @default("bwrap_path")
    def _bwrap_default(self) -> str:
        return shutil.which("bwrap") or "bwrap"

    kernel_messages_per_s = Float(MESSAGES_PER_S, help="Messages a second each gateway socket to a kernel takes "
                                  "from it, sustained; a kernel past it (and its burst) is restarted, as for output "
                                  "past twice its cap.", config=True).tag(env="KERNELHUB_KERNEL_MESSAGES_PER_S")
    kernel_message_burst = Integer(MESSAGE_BURST, help="Messages each gateway socket to a kernel takes from it at "
                                   "once before kernel_messages_per_s applies.", config=True).tag(
        env="KERNELHUB_KERNEL_MESSAGE_BURST")

    @validate("kernel_messages_per_s", "kernel_message_burst")
    def _positive_rate(self, proposal: Any) -> Any:
        if not proposal["value"] > 0:
            raise TraitError(f"{proposal['trait'].name} must be positive")
        return proposal["value"]

    uid_base = Integer(200000, help="First host uid handed to sandboxes.", config=True).tag(env="KERNELHUB_UID_BASE")
    uid_count = Integer(65536, help="How many host uids sandboxes may use.", config=True).tag(
        env="KERNELHUB_UID_COUNT")
    uid_lock_dir = Unicode("/run/kernelhub-uids", help="Machine-wide directory of uid locks, shared by every "
                           "kernelhub process.", config=True).tag(env="KERNELHUB_UID_LOCK_DIR")
    cgroup_root = Unicode("/sys/fs/cgroup", help="Mount point of the cgroup hierarchies.", config=True).tag(
        env="KERNELHUB_CGROUP_ROOT")
    cgroup_parent = Unicode("kernelhub", help="The folder of kernelhub's own cgroups in each hierarchy.",
                            config=True).tag(env="KERNELHUB_CGROUP_PARENT")
    isolation = Enum(["strict", "relaxed"], "strict", help="strict: refuse to start sandboxes unless memory, cpu "
                     "and pids limits, a uid of their own and the workspace quota can all be enforced; relaxed: "
                     "run with whatever this machine allows, as `kernelhub doctor` reports.",
                     config=True).tag(env="KERNELHUB_ISOLATION")
    workspace_mode = Enum(["auto", "loop", "dir"], "auto", help="How workspaces get their disk quota: loop (an "
                          "ext4 image per sandbox), dir (no quota) or auto.", config=True).tag(
        env="KERNELHUB_WORKSPACE_MODE")
    min_host_free_mb = Integer(1024, help="Refuse new workspaces that could leave less than this much free "
                               "space on the host.", config=True).tag(env="KERNELHUB_MIN_HOST_FREE_MB")
    start_timeout = Integer(30, help="Seconds a sandbox may take to start.", config=True).tag(
        env="KERNELHUB_START_TIMEOUT")
    seccomp = Bool(True, help="Filter the system calls of every sandbox process (kernelhub.sandbox.seccomp); "
                   "strict isolation refuses to start sandboxes without the filter.", config=True).tag(
        env="KERNELHUB_SECCOMP")
    as_root = Bool(help="Whether sandboxes get uids of their own (needs root).", config=True).tag(
        env="KERNELHUB_AS_ROOT", default_help="true when run as root")

    @default("as_root")
    def _as_root_default(self) -> bool:
        return os.geteuid() == 0

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.uids = UidPool(self.uid_base, self.uid_count, Path(self.uid_lock_dir))
        self._live: dict[str, Sandbox] = {}
        # Done once per factory, not on every create (the hot path of sandbox_create).
        self._agent_dir: Path | None = None
        self._state_ready = False
        self._warned_seccomp = False

    @property
    def sandboxes_dir(self) -> Path:
        return Path(self.state_dir) / "sandboxes"

    def required_controllers(self) -> tuple[str, ...]:
        return ("memory", "cpu", "pids") if self.isolation == "strict" else ()

    def seccomp_program_fd(self) -> int | None:
        """A fresh descriptor of the compiled system-call filter for one launch (the caller closes it), or None
        when the filter is off or unavailable under relaxed isolation. Raises :class:`IsolationUnavailable`
        under strict isolation without it. Called by :meth:`Sandbox._start`."""
        problem = "it is turned off (KERNELHUB_SECCOMP)"
        if self.seccomp:
            try:
                return seccomp.program_fd()
            except seccomp.SeccompUnavailable as exc:
                problem = str(exc)
        if self.isolation == "strict":
            raise IsolationUnavailable(f"Strict isolation needs the system-call filter, but {problem}; fix it "
                                       "or set KERNELHUB_ISOLATION=relaxed.")
        if not self._warned_seccomp:
            self.log.warning("sandboxes run without a system-call filter: %s", problem)
            self._warned_seccomp = True
        return None

    def agent_dir(self) -> Path:
        """A root-owned copy of the agent where sandbox uids can read it (the package may live under /root)."""
        if self._agent_dir is not None:
            return self._agent_dir
        target = Path(self.state_dir) / "agent"
        target.mkdir(parents=True, exist_ok=True)
        os.chmod(target, 0o755)
        for source_path in AGENT_FILES:
            path = target / source_path.name
            source = source_path.read_bytes()
            if not path.exists() or path.read_bytes() != source:
                tmp = target / f".{source_path.name}.{os.getpid()}.tmp"
                tmp.write_bytes(source)
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)
        self._agent_dir = target
        return target

    def _prepare_state_dir(self) -> None:
        if self._state_ready:
            return
        state = Path(self.state_dir)
        state.mkdir(parents=True, exist_ok=True)
        os.chmod(state, 0o711)
        self.sandboxes_dir.mkdir(exist_ok=True)
        os.chmod(self.sandboxes_dir, 0o711)
        if self.as_root:
            # Sandbox uids must be able to traverse every parent to reach their bind-mount sources.
            for parent in state.resolve().parents:
                if parent.stat().st_mode & 0o001 == 0:
                    raise IsolationUnavailable(
                        f"The state directory {state} sits under {parent}, which sandbox users cannot "
                        "traverse; choose another --state-dir."
                    )
        self._state_ready = True

    async def create(self, limits: Limits | None = None, env: Mapping[str, str] | None = None,
                     sandbox_id: str | None = None, cpu_weight: int = CPU_WEIGHT_DEFAULT, *,
                     reattach: bool = False, uid: int | None = None) -> Sandbox:
        """Start a new sandbox with its agent running. Called by the service layer and the provisioner.

        ``cpu_weight`` (cgroup v2 ``cpu.weight`` units, 1 to 10000) is its share of contended CPU from the
        first process on: the pool starts its sandboxes below the default so that refilling yields to live
        sandboxes, and :meth:`Sandbox.retune` restores the default at hand-out.

        ``reattach`` (with ``sandbox_id``): start the sandbox again on the workspace it kept when it stopped
        (paused, or left by a gateway that died): nothing is formatted, and a failed start keeps the
        workspace. ``uid``: the host uid it ran as, taken again when free (else a new one, and the workspace's
        files are given to it). Raises :class:`SandboxError` when the workspace is missing."""
        if self.isolation == "strict" and not self.as_root:
            raise IsolationUnavailable(
                "Strict isolation needs root (a host uid per sandbox, cgroups, workspace quotas); run as root "
                "or set KERNELHUB_ISOLATION=relaxed."
            )
        self._prepare_state_dir()
        limits = limits or Limits()
        sandbox_id = sandbox_id or "sb" + secrets.token_hex(5)
        if not self.as_root:
            uid = os.getuid()
        elif uid is None or not self.uids.try_hold(uid):
            uid = self.uids.acquire()
        sandbox = Sandbox(self, sandbox_id, uid, limits, env or {}, cpu_weight=cpu_weight)
        self._live[sandbox_id] = sandbox
        try:
            await sandbox._start(reattach=reattach)
        except BaseException as exc:
            sandbox.state = "failed"
            await sandbox.stop("failed", keep_workspace=reattach)
            if isinstance(exc, SandboxError):
                raise
            if isinstance(exc, Exception):
                raise SandboxError(f"The sandbox could not be set up: {exc}") from exc
            raise
        return sandbox

    async def reap_stale(self, keep: Collection[str] = ()) -> list[str]:
        """Remove what crashed processes left behind: sandbox directories whose uid lock nobody holds, with
        their cgroups and mounted workspaces. Called by the gateway at start-up; safe while other kernelhub
        processes share the state directory (their sandboxes hold their uid locks).

        ``keep``: ids of sandboxes a record still claims (the store's running and paused ones, which the gateway
        restores): only their cgroup and run directory go; their workspace is unmounted and kept for
        :meth:`create` with ``reattach``. Answers the ids removed."""
        reaped: list[str] = []
        if not self.sandboxes_dir.is_dir():
            return reaped
        for entry in sorted(self.sandboxes_dir.iterdir()):
            if entry.name in self._live or not entry.is_dir():
                continue
            if entry.name in keep:
                await self._clear_kept(entry)
                continue
            try:
                uid = int((entry / "uid").read_text())
            except (OSError, ValueError):
                uid = None
            if uid is not None and self.as_root:
                if not self.uids.try_hold(uid):
                    continue  # a live sandbox of another process
            try:
                with contextlib.suppress(SandboxError, OSError):
                    await open_cgroup(entry.name, root=self.cgroup_root, parent=self.cgroup_parent).remove()
                workspace = Workspace(entry, uid or 0, uid or 0, Limits(), mode=self.workspace_mode)
                with contextlib.suppress(Exception):
                    await workspace.destroy()
                with contextlib.suppress(SandboxError):
                    await unmount_run_dir(entry / "run")
                shutil.rmtree(entry, ignore_errors=True)
                reaped.append(entry.name)
            finally:
                if uid is not None and self.as_root:
                    self.uids.release(uid)
        if reaped:
            self.log.warning("removed %d sandboxes left by a process that died: %s", len(reaped), reaped)
        return reaped

    async def discard(self, sandbox_id: str) -> None:
        """Remove what a stopped sandbox kept (a paused one's workspace and directory) for good. Nothing kept is
        fine. Raises :class:`SandboxError` when the workspace cannot be removed."""
        if sandbox_id in self._live or "/" in sandbox_id or sandbox_id in ("", ".", ".."):
            return
        entry = self.sandboxes_dir / sandbox_id
        if not entry.is_dir():
            return
        await Workspace(entry, 0, 0, Limits(), mode=self.workspace_mode).destroy()
        with contextlib.suppress(SandboxError):
            await unmount_run_dir(entry / "run")
        shutil.rmtree(entry, ignore_errors=True)

    async def _clear_kept(self, entry: Path) -> None:
        """What a dead process left of a sandbox that will be restored: its cgroup and run directory (its
        workspace, unmounted, stays)."""
        try:
            uid: int | None = int((entry / "uid").read_text())
        except (OSError, ValueError):
            uid = None
        if uid is not None and self.as_root and not self.uids.try_hold(uid):
            return  # a live sandbox of another process
        try:
            with contextlib.suppress(SandboxError, OSError):
                await open_cgroup(entry.name, root=self.cgroup_root, parent=self.cgroup_parent).remove()
            with contextlib.suppress(SandboxError):
                await unmount_run_dir(entry / "run")
            shutil.rmtree(entry / "run", ignore_errors=True)
            with contextlib.suppress(Exception):
                await Workspace(entry, uid or 0, uid or 0, Limits(), mode=self.workspace_mode).detach()
        finally:
            if uid is not None and self.as_root:
                self.uids.release(uid)

    def health(self) -> list[str]:
        """Why :meth:`create` would fail now, as short sentences (empty: it can start sandboxes). For ``GET
        /healthz``, which anyone may ask, so it is cheap (``stat``/``statvfs`` calls, no process, no sandbox)
        and names no path: ``kernelhub doctor`` and the gateway's log say more.

        Looks at what every start needs and can go away while the gateway runs: bubblewrap (and ``setpriv``
        as root), the cgroup hierarchy under strict isolation, a writable state directory with
        ``min_host_free_mb`` free, and the kernels' runtime."""
        problems: list[str] = []
        if self.isolation == "strict" and not self.as_root:
            problems.append("strict isolation needs the gateway to run as root")
        if not shutil.which(self.bwrap_path):
            problems.append("bubblewrap (bwrap) is not installed or not executable")
        if self.as_root and not shutil.which("setpriv"):
            problems.append("setpriv (util-linux) is not installed")
        if self.isolation == "strict" and detect_version(self.cgroup_root) is None:
            problems.append("no cgroup hierarchy is mounted at the configured cgroup root")
        state = Path(self.state_dir)
        existing = next((p for p in (state, *state.parents) if p.exists()), None)
        try:
            st = os.statvfs(existing) if existing is not None else None
        except OSError:
            st = None
        if existing is None or st is None or st.f_flag & os.ST_RDONLY or not os.access(existing, os.W_OK):
            problems.append("the state directory is not writable")
        elif st.f_bavail * st.f_frsize < self.min_host_free_mb * 1024 * 1024:
            problems.append(f"the state directory's disk has less than {self.min_host_free_mb} MiB free "
                            "(min_host_free_mb)")
        if not (Path(self.runtime_dir) / "python" / "bin" / "python").exists():
            problems.append("the kernels' runtime is missing (make install)")
        return problems

    def memory_headroom(self) -> int:
        """Bytes new sandboxes may still take: the host's ``MemAvailable`` (``/proc/meminfo``, the kernel's
        estimate of what can be allocated without swapping), or less when kernelhub's parent cgroup has a
        memory limit of its own and is nearer to it. Read by the pool before each refill."""
        available = _mem_available()
        with contextlib.suppress(OSError, SandboxError, ValueError):
            headroom = parent_memory_headroom(root=self.cgroup_root, parent=self.cgroup_parent)
            if headroom is not None:
                available = min(available, headroom)
        return available

    def live(self) -> list[Sandbox]:
        return list(self._live.values())

    async def stop_all(self) -> None:
        await asyncio.gather(*(sb.stop("shutdown") for sb in self.live()), return_exceptions=True)

