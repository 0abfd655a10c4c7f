"""A running sandbox: its uid, cgroup, workspace, bubblewrap process and agent, and the processes in it.

:class:`~kernelhub.sandbox.factory.SandboxFactory` creates :class:`Sandbox` objects (the service layer asks it
for every new sandbox, the kernel provisioner when plain jupyter_client starts a kernelspec of ours) and
:meth:`Sandbox.stop` ends them. :meth:`Sandbox.spawn` starts any further process (a kernel, a command, a
shell on a PTY with :meth:`Sandbox.start_pty`) inside the same namespaces, cgroup, uid and workspace through
the agent (:mod:`kernelhub.sandbox.agent`), over an :class:`~kernelhub.sandbox.agent_channel.AgentChannel`.
The rooms it uses: :mod:`~kernelhub.sandbox.bwrap` (the command line), :mod:`~kernelhub.sandbox.cgroups`,
:mod:`~kernelhub.sandbox.workspace`, :mod:`~kernelhub.sandbox.pty` and :mod:`~kernelhub.sandbox.pipes`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import errno
import json
import logging
import os
import resource
import shutil
import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import PidsExhausted, SandboxError, SandboxNotRunning
from . import bwrap, egress_forwarder, pty
from .agent_channel import AgentChannel
from .cgroups import CPU_WEIGHT_DEFAULT, Cgroup, create_cgroup
from .cgroups.base import sigkill_members
from .channel_guard import DropLog
from .limits import Limits
from .pipes import pump_lines
from .tools import data_fd, run_tool
from .workspace import Workspace

if TYPE_CHECKING:
    from .factory import SandboxFactory

log = logging.getLogger("kernelhub.sandbox")

_LOG_LINES = 2000
_LAUNCH_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}
#: Agent files that go to its ``site`` folder (:data:`~kernelhub.sandbox.bwrap.INNER_SITE_DIR`, on every
#: sandbox process's ``PYTHONPATH``) instead: :mod:`kernelhub.sandbox.sitecustomize`.
SITE_FILES = frozenset({"sitecustomize.py"})
#: Size of the run directory's tmpfs: connection files and sockets need a few KiB per kernel.
_RUN_DIR_BYTES = 2 * 1024 * 1024


async def mount_run_dir(path: Path) -> None:
    """Mount the small tmpfs a sandbox's kernels put their connection files and sockets in at ``path``."""
    # Root's, 0755: the sandbox reads its kernels' connection files and connects to their sockets here but
    # creates nothing itself (each kernel's own directory is handed to it only while that kernel binds).
    options = f"size={_RUN_DIR_BYTES},nr_inodes=4096,mode=0755,uid=0,gid=0,nosuid,nodev,noexec"
    code, out = await run_tool("mount", "-t", "tmpfs", "-o", options, "kernelhub-run", str(path))
    if code != 0:
        raise SandboxError(f"Could not mount the sandbox's run directory: {out or f'mount exit {code}'}.")


async def unmount_run_dir(path: Path) -> None:
    """Unmount a run directory (lazily if busy); nothing mounted is fine. Raises SandboxError."""
    if not os.path.ismount(path):
        return
    code, out = await run_tool("umount", str(path))
    if code != 0:
        code, out = await run_tool("umount", "-l", str(path))  # busy: detach, freed with the last user
    if code != 0:
        raise SandboxError(f"Could not unmount {path}: {out}")


def tmpfs_sizes(limits: Limits) -> dict[str, int]:
    """Bytes of each tmpfs of a sandbox (``/tmp``, ``/dev/shm``; the home is the workspace) for ``limits``:
    together 3/8 of the memory limit, so a sandbox that fills them both can still run its kernel (their pages are
    charged to its memory cgroup)."""
    return {
        "/tmp": max(limits.memory_bytes // 4, 8 * 1024 * 1024),
        "/dev/shm": max(limits.memory_bytes // 8, 4 * 1024 * 1024),
    }


def rlimits(limits: Limits) -> dict[str, int]:
    """The rlimits every process of a sandbox runs with (set by the agent on itself, inherited by all it
    starts); ``nproc`` counts per host uid, which is the sandbox's own (SECURITY.md pitfall 7)."""
    return {"nofile": 4096, "fsize": limits.max_file_mb * 1024 * 1024, "core": 0, "nproc": limits.pids}


def mount_flags(mountinfo: str) -> dict[str, str]:
    """Each mount point's per-mount flags (``rw,nosuid,nodev,relatime``) from a ``/proc/PID/mountinfo`` text;
    a point mounted over keeps its last (visible) mount's. Used to remount a tmpfs with nothing but its size
    changed."""
    flags = {}
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 5:
            flags[fields[4].replace("\\040", " ")] = fields[5]
    return flags


def can_raise_rlimits() -> bool:
    """Whether this process may set another process's rlimits, raising them included: it needs
    ``CAP_SYS_RESOURCE`` (bit 24 of ``CapEff`` in ``/proc/self/status``), which root lacks on some hosts (in some
    containers). Without it, only a process of the target's own uid may change them, and only downwards."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> 24 & 1)
    return False


_RAISE_RLIMITS = can_raise_rlimits()
_RLIMIT_NUMBERS = {"nofile": resource.RLIMIT_NOFILE, "fsize": resource.RLIMIT_FSIZE, "core": resource.RLIMIT_CORE,
                   "nproc": resource.RLIMIT_NPROC}


# Run inside the sandbox by SandboxProcess.kill_session: kill every process of the session argv[1] until none is
# left. Zombies are skipped: they are dead and their parent (bwrap's pid 1 for orphans) reaps them.
_KILL_SESSION = """\
import os, sys
sid = int(sys.argv[1])
for _ in range(100):
    found = False
    for name in os.listdir('/proc'):
        if not name.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % name) as f:
                fields = f.read().rsplit(')', 1)[1].split()
            if fields[0] != 'Z' and int(fields[3]) == sid:
                os.kill(int(name), 9)
                found = True
        except (OSError, ValueError, IndexError):
            pass
    if not found:
        break
"""
_KILL_SESSION_TIMEOUT_S = 10
#: Seconds a SIGKILL sent through the agent may take to be reported as an exit before the gateway kills the
#: process from the host, and again before it counts the process as killed without the agent's word: a
#: stopped or hijacked agent never makes a wait on a killed process hang.
KILL_DEADLINE_S = 2.0


def _ns_ids(host_pid: int) -> tuple[int, int, bool] | None:
    """(pid, pgid inside the innermost pid namespace, is a zombie) of a host process; None if it is gone."""
    try:
        with open(f"/proc/{host_pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return (int(fields["NSpid"].split()[-1]), int(fields["NSpgid"].split()[-1]),
                fields["State"].strip().startswith("Z"))
    except (OSError, KeyError, ValueError, IndexError):
        return None


class SandboxProcess:
    """A process inside a sandbox, started by :meth:`Sandbox.spawn`; shaped like ``asyncio.subprocess``."""

    def __init__(self, sandbox: Sandbox, req_id: int, argv: Sequence[str]) -> None:
        self.sandbox = sandbox
        self.req_id = req_id
        self.argv = list(argv)
        self.pid: int | None = None
        self.returncode: int | None = None
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._enforcing: asyncio.Task[None] | None = None

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def poll(self) -> int | None:
        return self.returncode

    async def send_signal(self, signum: int, *, group: bool = True) -> None:
        """Signal the process (and its process group) inside the sandbox: the kernel itself, not bwrap's
        pid 1, which forwards nothing (SECURITY.md pitfall 6).

        A SIGKILL is enforced: if the agent does not report the exit within :data:`KILL_DEADLINE_S`, the
        gateway kills the process (and its group) from the host, and after another deadline :meth:`wait`
        answers ``-SIGKILL`` whatever the agent says. Raises :class:`SandboxNotRunning` for another signal when
        the sandbox is gone."""
        if self.returncode is not None:
            return
        if signum == signal.SIGKILL and self._enforcing is None:
            self._enforcing = self.sandbox._spawn_task(self._enforce_kill(group))
        try:
            await self.sandbox._channel().send({"op": "signal", "id": self.req_id, "signal": int(signum),
                                                "group": group})
        except SandboxError:
            if signum != signal.SIGKILL:
                raise  # a SIGKILL is carried out from the host all the same

    async def _enforce_kill(self, group: bool) -> None:
        for last in (False, True):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._exited), KILL_DEADLINE_S)
                return
            if last:
                self.sandbox.log(f"the agent never reported the end of {self.argv[0]!r} (pid {self.pid}); "
                                 "counted as killed")
                self._set_exit(-signal.SIGKILL)
            elif self.pid is not None:
                self.sandbox.log(f"the agent did not end {self.argv[0]!r} (pid {self.pid}) within "
                                 f"{KILL_DEADLINE_S:g} s; killed from the host")
                self.sandbox.kill_from_host(self.pid, group=group)
                self.sandbox.wake_agent()

    async def kill(self) -> None:
        await self.send_signal(signal.SIGKILL)

    async def kill_session(self) -> None:
        """Kill every process left in this process's session (its sid is its pid: the agent setsid()s every
        process it starts), background jobs and ``nohup`` included; one that made a session of its own lives
        on. Only call it right after this process died, so the sid cannot have been reused. Called by the
        terminal sessions when they close."""
        if self.pid is None:
            return
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            killer = await self.sandbox.spawn(
                [self.sandbox.factory.agent_python, "-I", "-S", "-c", _KILL_SESSION, str(self.pid)],
                stdin=devnull, stdout=devnull, stderr=devnull)
        finally:
            os.close(devnull)
        try:
            await asyncio.wait_for(killer.wait(), _KILL_SESSION_TIMEOUT_S)
        except TimeoutError:
            await killer.kill()

    def _set_exit(self, status: int) -> None:
        if self.returncode is None:
            self.returncode = status
        if not self._exited.done():
            self._exited.set_result(self.returncode)


class Sandbox:
    """One isolation domain. Created by :meth:`SandboxFactory.create`; stopped by :meth:`stop`."""

    def __init__(self, factory: SandboxFactory, sandbox_id: str, uid: int, limits: Limits,
                 env: Mapping[str, str], cpu_weight: int = CPU_WEIGHT_DEFAULT) -> None:
        self.factory = factory
        self.id = sandbox_id
        self.uid = self.gid = uid
        self.limits = limits
        self.env = dict(env)
        #: The cgroup's share of contended CPU (cgroup v2 ``cpu.weight`` units), from the start on.
        self.cpu_weight = cpu_weight
        self.dir = factory.sandboxes_dir / sandbox_id
        self.run_dir = self.dir / "run"
        self.hostname = f"sandbox-{sandbox_id}"[:63]
        self.state = "starting"
        self.reason: str | None = None
        self.created_at = time.time()
        self.workspace: Workspace | None = None
        self.cgroup: Cgroup | None = None
        self.spec: bwrap.SandboxSpec | None = None
        self._launcher: asyncio.subprocess.Process | None = None
        self._agent: AgentChannel | None = None
        self._agent_pid: int | None = None
        self._procs: dict[int, SandboxProcess] = {}
        self._commands = 0
        self._log: collections.deque[str] = collections.deque(maxlen=_LOG_LINES)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping: asyncio.Task[None] | None = None
        self.on_exit: list[Callable[[Sandbox], Any]] = []
        #: Messages dropped from this sandbox's kernels, logged at most once a minute.
        self.kernel_drops = DropLog(f"sandbox {sandbox_id}")
        #: The proxy variables once :meth:`start_egress_forwarder` ran.
        self._egress_env: dict[str, str] | None = None
        #: The forwarder's process, to start it again if it ended (:meth:`start_egress_forwarder`).
        self._egress_proc: SandboxProcess | None = None

    # -- logs -----------------------------------------------------------------------------------------

    def log(self, message: str) -> None:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        for line in message.rstrip("\n").splitlines() or [""]:
            self._log.append(f"{stamp} {line}")

    def logs(self, lines: int = 100) -> list[str]:
        if lines <= 0:
            return []
        return list(self._log)[-lines:]

    def log_pipe(self, prefix: str) -> int:
        """A pipe whose write end a process may use as stdout/stderr; its lines go to the sandbox log.
        Returns the write end; the caller passes it to :meth:`spawn` and then closes it."""
        r, w = os.pipe2(os.O_CLOEXEC)
        pump_lines(r, lambda line: self.log(prefix + line))
        return w

    # -- start ------------------------------------------------------------------------------------------

    async def _start(self, reattach: bool = False) -> None:
        """Set up and launch the sandbox. ``reattach``: its directory and workspace exist already (a paused
        sandbox resumed, or one restored after a gateway restart): the workspace is mounted again
        (:meth:`Workspace.reattach`), never made anew, and a run directory a dead gateway left is replaced."""
        f = self.factory
        self.dir.mkdir(mode=0o711, parents=True, exist_ok=reattach)
        os.chmod(self.dir, 0o711)
        # Recorded so that a later process can tell a live sandbox (uid lock held) from a crashed one.
        (self.dir / "uid").write_text(str(self.uid))
        if reattach and os.path.lexists(self.run_dir):
            await unmount_run_dir(self.run_dir)
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(mode=0o700)
        if f.as_root:
            # The sandbox writes here (its kernels' sockets): a small tmpfs, charged to its memory cgroup,
            # instead of the host disk, where no quota would hold what it writes.
            await mount_run_dir(self.run_dir)
        # The generated /etc files and the agent live in the run directory too: bound from a tmpfs, their
        # mounts show a neutral source (``kernelhub-run``) and a root relative to it in the sandbox's
        # /proc/self/mountinfo, not the state directory's host path.
        etc_dir = self.run_dir / "etc"
        etc_dir.mkdir(mode=0o755)
        agent_dir = self.run_dir / "agent"
        agent_dir.mkdir(mode=0o755)
        site_dir = agent_dir / "site"
        site_dir.mkdir(mode=0o755)
        for path in f.agent_dir().iterdir():
            if path.name.startswith("."):
                continue  # a copy being written
            target = (site_dir if path.name in SITE_FILES else agent_dir) / path.name
            shutil.copyfile(path, target)
            os.chmod(target, 0o644)
        self.workspace = Workspace(self.dir, self.uid, self.gid, self.limits,
                                   mode=f.workspace_mode, min_host_free_mb=f.min_host_free_mb)
        await (self.workspace.reattach() if reattach else self.workspace.create())
        self.cgroup = create_cgroup(self.id, self.limits, root=f.cgroup_root, parent=f.cgroup_parent,
                                    require=f.required_controllers())
        if self.cpu_weight != CPU_WEIGHT_DEFAULT:
            # Before the launcher joins: bubblewrap, the agent and the first kernel all start at this weight.
            self.cgroup.set_cpu_weight(self.cpu_weight)
        node_modules = Path(f.runtime_dir) / "node" / "node_modules"
        sizes = tmpfs_sizes(self.limits)
        self.spec = bwrap.SandboxSpec(
            sandbox_id=self.id,
            uid=self.uid,
            gid=self.gid,
            hostname=self.hostname,
            workspace=str(self.workspace.path),
            run_dir=str(self.run_dir),
            etc_dir=str(etc_dir),
            agent_dir=str(agent_dir),
            runtime_dir=f.runtime_dir if Path(f.runtime_dir).is_dir() else None,
            node_modules=str(node_modules) if node_modules.is_dir() else None,
            tmp_size_bytes=sizes["/tmp"],
            shm_size_bytes=sizes["/dev/shm"],
            env=self.env,
        )
        for name, text in bwrap.passwd_files(self.spec).items():
            (etc_dir / name).write_text(text)
            os.chmod(etc_dir / name, 0o644)
        # Three descriptors besides stdio reach bwrap. bwrap closes two before the sandbox's first process exists:
        # the system-call filter, and its options (host paths), kept out of /proc/1/cmdline. The third, the
        # agent's control socket, bwrap's pid 1 closes and only the agent keeps (never stdio, which pid 1 keeps
        # and the sandbox's code could take from it).
        seccomp_fd = f.seccomp_program_fd()
        args_fd: int | None = None
        gateway_end: socket.socket | None = None
        agent_end: socket.socket | None = None
        stderr_w = -1
        try:
            gateway_end, agent_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            command = bwrap.agent_command(f.agent_python) + [json.dumps(rlimits(self.limits)), str(agent_end.fileno())]
            args_fd = data_fd("kernelhub-bwrap-args",
                              bwrap.args_data(bwrap.bwrap_options(self.spec, seccomp_fd=seccomp_fd)))
            argv = bwrap.launch_argv(self.spec, self.cgroup.procs_files, command, bwrap=f.bwrap_path,
                                     as_root=f.as_root, args_fd=args_fd)
            pass_fds = [args_fd, agent_end.fileno()] + ([] if seccomp_fd is None else [seccomp_fd])
            stderr_w = self.log_pipe("")
            self._launcher = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=stderr_w,
                close_fds=True, pass_fds=pass_fds,
                # Not the gateway's environment (nor its cwd, which /bin/sh exports as PWD): bwrap's pid 1
                # keeps what it was exec'd with in /proc/1/environ, readable inside the sandbox whatever
                # --clearenv did for its child.
                env=_LAUNCH_ENV, cwd="/",
            )
        except BaseException:
            if gateway_end is not None:
                gateway_end.close()
            raise
        finally:
            for fd in (args_fd, seccomp_fd, stderr_w):
                if fd is not None and fd >= 0:
                    os.close(fd)
            if agent_end is not None:
                agent_end.close()
        assert gateway_end is not None
        self._agent = AgentChannel(gateway_end, on_exit=self._on_process_exit, on_closed=self._end_processes,
                                   log=self.log)
        self._spawn_task(self._watch_launcher())
        try:
            ready = await self._agent.wait_ready(f.start_timeout)
        except SandboxError as exc:
            detail = "; ".join(self.logs(5)) or str(exc) or "no output"
            raise SandboxError(f"The sandbox did not start: {detail}") from None
        pid = ready.get("pid")
        self._agent_pid = pid if isinstance(pid, int) and pid > 1 else None
        self.state = "running"
        self.log(f"sandbox {self.id} running as host uid {self.uid}")

    def _spawn_task(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _watch_launcher(self) -> None:
        assert self._launcher is not None
        code = await self._launcher.wait()
        if self._agent is not None:
            self._agent.fail_ready(SandboxError(f"bubblewrap exited with {code}"))
        if self.state in ("starting", "running"):
            reason = "oom" if self.cgroup is not None and self.cgroup.oom_kills() > 0 else None
            self.log(f"sandbox exited unexpectedly (status {code}{', out of memory' if reason else ''})")
            self.reason = self.reason or reason or "failed"
            self.state = "failed"
            self._fail_all()
            for callback in list(self.on_exit):
                callback(self)

    # -- processes --------------------------------------------------------------------------------------

    def _channel(self) -> AgentChannel:
        if self._agent is None or self._agent.closed:
            raise SandboxNotRunning("The sandbox is not running.")
        return self._agent

    def _on_process_exit(self, req: int, status: int) -> None:
        proc = self._procs.pop(req, None)
        if proc is None:
            return
        proc._set_exit(status)
        # The agent reaps a process before it reports its end, so a live process of that pid means the report
        # was false: the gateway would lose track of a process that goes on running. Never leave one.
        if proc.pid is not None and self.kill_from_host(proc.pid, group=False, live_only=True):
            self.log(f"the agent reported the end of pid {proc.pid} while it was running; killed it")

    def wake_agent(self) -> None:
        """SIGCONT the agent from the host: the sandbox's code (same uid) may have stopped it. Called when the
        agent missed a deadline; a stopped agent would otherwise leave every later request to time out."""
        if self.cgroup is None or self._agent_pid is None:
            return
        for host_pid in self.cgroup.pids():
            ids = _ns_ids(host_pid)
            if ids is not None and ids[0] == self._agent_pid:
                with contextlib.suppress(OSError):
                    os.kill(host_pid, signal.SIGCONT)

    def kill_from_host(self, inner_pid: int, *, group: bool, live_only: bool = False) -> int:
        """SIGKILL, from the host, the sandbox's process whose pid inside is ``inner_pid`` (and with ``group``
        every process of that process group), without the agent. Only members of the sandbox's cgroup are
        ever signalled; ``live_only`` leaves zombies alone. Answers how many were signalled (0 without a
        cgroup). Called when the agent does not carry out a kill in time or reports an exit falsely."""
        cgroup = self.cgroup
        if cgroup is None or inner_pid <= 1:
            return 0

        def members() -> set[int]:
            found = set()
            for host_pid in cgroup.pids():
                ids = _ns_ids(host_pid)
                if ids is not None and (ids[0] == inner_pid or (group and ids[1] == inner_pid)) \
                        and not (live_only and ids[2]):
                    found.add(host_pid)
            return found

        try:
            return sigkill_members(members)
        except OSError:
            return 0

    def _end_processes(self) -> None:
        """The agent is gone, and everything it started with it."""
        for proc in self._procs.values():
            proc._set_exit(-signal.SIGKILL)
        self._procs.clear()

    def _fail_all(self) -> None:
        if self._agent is not None:
            self._agent.fail_pending()
        self._end_processes()

    async def spawn(
        self,
        argv: Sequence[str],
        *,
        stdin: int,
        stdout: int,
        stderr: int,
        env: Mapping[str, str] | None = None,
        cwd: str = bwrap.INNER_WORKSPACE,
        pty: bool = False,
        cgroup: Cgroup | None = None,
    ) -> SandboxProcess:
        """Start ``argv`` inside the sandbox with the given host fds as its stdio (for a PTY, pass the slave
        as all three). The caller keeps ownership of the fds. ``cgroup`` (from :meth:`command_cgroup`): the
        process joins it before it execs, so that it and all it will fork are members. Called by the
        provisioner, the command runner and the terminal manager."""
        if self.state != "running":
            raise SandboxNotRunning(f"The sandbox is {self.state}.")
        agent = self._channel()
        req = agent.next_id()
        proc = SandboxProcess(self, req, argv)
        self._procs[req] = proc
        assert self.spec is not None
        full_env = bwrap.sandbox_env(self.spec, env)
        # Where it starts, by the name it was given: the workspace is also the home, and a login shell would
        # otherwise call its directory ~ (bash takes $HOME when it is the same directory as ".").
        full_env.setdefault("PWD", cwd)
        fds = [stdin] if pty else [stdin, stdout, stderr]
        join = [os.open(path, os.O_WRONLY | os.O_CLOEXEC) for path in cgroup.procs_files] if cgroup else []
        try:
            reply = await agent.request(
                {"op": "spawn", "id": req, "argv": list(argv), "env": full_env, "cwd": cwd, "pty": pty,
                 "join": len(join)}, fds + join,
                timeout=self.factory.start_timeout, on_slow=self.wake_agent,
            )
        except SandboxNotRunning:
            self._procs.pop(req, None)
            raise
        except SandboxError:
            self._procs.pop(req, None)
            self.wake_agent()  # the agent missed its deadline: perhaps the sandbox's code stopped it
            raise
        except BaseException:
            self._procs.pop(req, None)
            raise
        finally:
            for fd in join:
                os.close(fd)
        if reply.get("op") != "spawned":
            self._procs.pop(req, None)
            message = str(reply.get("message"))[:500]
            if reply.get("errno") == errno.EAGAIN:
                raise PidsExhausted(f"Could not start {argv[0]!r}: the sandbox is at its process limit "
                                    f"({self.limits.pids} pids).")
            raise SandboxError(f"Could not start {argv[0]!r} in the sandbox: {message}")
        pid = reply.get("pid")
        proc.pid = pid if isinstance(pid, int) else None
        return proc

    async def start_pty(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                        rows: int = pty.DEFAULT_ROWS, cols: int = pty.DEFAULT_COLS) -> pty.SandboxPty:
        """Start ``argv`` on a new PTY of ``rows`` x ``cols`` and answer the gateway's side of it. The gateway
        keeps no slave, so reading the master ends (EOF) once the shell and everything it left holding the
        terminal are gone. Called by the terminal sessions; raises what :meth:`spawn` raises."""
        master, slave = self.open_pty()
        try:
            pty.set_window_size(master, rows, cols)
            process = await self.spawn(argv, stdin=slave, stdout=slave, stderr=slave, env=env, pty=True)
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        return pty.SandboxPty(master, process)

    def command_cgroup(self) -> Cgroup | None:
        """A new cgroup below the sandbox's, for one command's process tree (None when the sandbox has no
        cgroup: an unprivileged gateway). Pass it to :meth:`spawn`; the sandbox's stop removes it with its own.
        Called by :func:`~kernelhub.sandbox.pipes.start_piped`. Raises SandboxError if it cannot be made."""
        if self.cgroup is None:
            return None
        self._commands += 1
        return self.cgroup.child(f"cmd-{self._commands}")

    # -- egress -----------------------------------------------------------------------------------------

    @property
    def egress_socket(self) -> Path:
        """Where the gateway's egress proxy of this sandbox listens: ``egress.sock`` in its run directory, which
        is ``/run/kernelhub`` inside (:data:`~kernelhub.sandbox.egress_forwarder.INNER_SOCKET`)."""
        return self.run_dir / "egress.sock"

    async def start_egress_forwarder(self) -> dict[str, str]:
        """Start the forwarder (:mod:`~kernelhub.sandbox.egress_forwarder`) inside, on the sandbox's loopback
        port :data:`~kernelhub.sandbox.egress_forwarder.DEFAULT_LISTEN`, relaying to the proxy's socket (which
        the caller has made), wait until it accepts connections, and give every later process of the sandbox
        the proxy variables (:func:`~kernelhub.sandbox.egress_forwarder.proxy_env`, answered too). Its error
        lines go to the sandbox log. Once per sandbox while it runs; later calls answer the same variables, and
        start it again if it ended (the sandbox's code may kill it: ``pkill python`` does). Raises
        :class:`~kernelhub.errors.SandboxError` if it does not start within the start timeout."""
        if self._egress_env is not None and self._egress_proc is not None and self._egress_proc.returncode is None:
            return dict(self._egress_env)
        if self._egress_proc is not None:
            self.log(f"egress forwarder: it had ended (status {self._egress_proc.returncode}); starting it again")
        r, w = os.pipe2(os.O_CLOEXEC)
        devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        err = self.log_pipe("egress forwarder: ")
        try:
            self._egress_proc = await self.spawn(
                [self.factory.agent_python, "-I", "-S", "-B", f"{bwrap.INNER_AGENT_DIR}/egress_forwarder.py",
                 "--listen", egress_forwarder.DEFAULT_LISTEN, "--socket", egress_forwarder.INNER_SOCKET],
                stdin=devnull, stdout=w, stderr=err)
        finally:
            for fd in (w, err, devnull):
                os.close(fd)
        try:
            reader = asyncio.StreamReader()
            transport, _ = await asyncio.get_running_loop().connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(r, "rb", buffering=0))
        except BaseException:
            os.close(r)
            raise
        try:
            line = await asyncio.wait_for(reader.readline(), self.factory.start_timeout)
        except TimeoutError:
            line = b""
        finally:
            transport.close()
        if not line.startswith(b"listening "):
            raise SandboxError(f"The sandbox's egress forwarder did not start: {'; '.join(self.logs(3))}")
        self._egress_env = egress_forwarder.proxy_env(egress_forwarder.DEFAULT_LISTEN)
        self.add_env(self._egress_env)
        return dict(self._egress_env)

    def add_env(self, values: Mapping[str, str]) -> None:
        """Add ``values`` to the environment of every later process of the sandbox (those running keep theirs)."""
        self.env.update(values)
        if self.spec is not None:
            self.spec = dataclasses.replace(self.spec, env=dict(self.env))

    # -- hand-out ---------------------------------------------------------------------------------------

    def can_retune(self, limits: Limits) -> bool:
        """Whether :meth:`retune` can give this running sandbox ``limits``: not another workspace size
        (``disk_mb``) or inode count (``files``), which its ext4 image fixed when it was made, nor, where the
        gateway may not raise another process's rlimits (:func:`can_raise_rlimits`), a higher ``pids`` or
        ``max_file_mb`` than it started with."""
        old = self.limits
        raises = limits.pids > old.pids or limits.max_file_mb > old.max_file_mb
        return (self.state == "running" and (limits.disk_mb, limits.files) == (old.disk_mb, old.files)
                and (not raises or _RAISE_RLIMITS))

    async def retune(self, limits: Limits, env: Mapping[str, str]) -> None:
        """Make this running sandbox what a fresh one of ``limits`` and ``env`` would be, and give it the
        default CPU weight. Called by the pool when it hands a pre-started sandbox out, before anything of
        its new owner runs in it.

        Memory, CPU and pids are written into the live cgroup; the tmpfs sizes that follow from memory
        (:func:`tmpfs_sizes`) are changed by remounting them inside the sandbox's mount namespace; the
        rlimits that follow from ``pids`` and ``max_file_mb`` (:func:`rlimits`) are set on every process
        already there (the agent and the kernel), so all they start inherits them; ``env``
        is what every later process gets (a process already running is the caller's to update). Raises
        :class:`~kernelhub.errors.SandboxError` if any of it cannot be done (:meth:`can_retune` false, or the
        kernel refusing a value, e.g. a memory limit below what the sandbox already uses): the sandbox is
        then half-changed and the caller stops it."""
        if not self.can_retune(limits) or self.cgroup is None or self.spec is None:
            raise SandboxError(f"Sandbox {self.id} cannot take these limits without a new workspace.")
        old = self.limits
        if self.cpu_weight != CPU_WEIGHT_DEFAULT:
            # First: from now on the sandbox is live, and its kernel must not wait for CPU behind the pool's.
            self.cgroup.set_cpu_weight(CPU_WEIGHT_DEFAULT)
            self.cpu_weight = CPU_WEIGHT_DEFAULT
        if (limits.memory_mb, limits.cpu, limits.pids) != (old.memory_mb, old.cpu, old.pids):
            self.cgroup.apply(limits)
        if limits.memory_mb != old.memory_mb:
            await self._resize_tmpfs(tmpfs_sizes(limits))
        if rlimits(limits) != rlimits(old):
            await self._set_rlimits({k: v for k, v in rlimits(limits).items() if v != rlimits(old)[k]})
        sizes = tmpfs_sizes(limits)
        self.limits, self.env = limits, dict(env)
        self.spec = dataclasses.replace(self.spec, env=self.env, tmp_size_bytes=sizes["/tmp"],
                                        shm_size_bytes=sizes["/dev/shm"])

    async def _resize_tmpfs(self, sizes: Mapping[str, int]) -> None:
        # Root may remount the sandbox's mounts from its mount namespace (entered through bubblewrap's pid 1);
        # a remount resets the per-mount flags it does not name, so each mount's own are named again. sh and
        # mount are found in the sandbox's view: its read-only /usr, the host's. Only pooled sandboxes are
        # retuned, before anything of anyone ran in them, so nothing there can have been planted either.
        inner = self._init_pid()
        if inner is None:
            raise SandboxError(f"Sandbox {self.id} has no process to reach its mounts through.")
        flags = self._mount_flags(inner)
        if not set(sizes) <= set(flags):
            raise SandboxError(f"Sandbox {self.id} lacks one of the mounts {', '.join(sizes)}.")
        script = " && ".join(f"mount -o remount,{flags[path]},size={int(size)} {path}" for path, size in sizes.items())
        code, out = await run_tool("nsenter", f"--target={inner}", "--mount", "--", "/bin/sh", "-c", script)
        if code != 0:
            raise SandboxError(f"Could not resize the tmpfs mounts of sandbox {self.id}: {out or code}.")

    async def _set_rlimits(self, values: Mapping[str, int]) -> None:
        """Set ``values`` (:func:`rlimits` names) on the agent and every process it started (bubblewrap's two
        never fork again). With ``CAP_SYS_RESOURCE``, prlimit(2) from here; without it, prlimit(1) run as the
        sandbox's uid, outside its namespaces, which may only lower them (:meth:`can_retune` says so)."""
        assert self.cgroup is not None
        skip = {self._launcher.pid if self._launcher else None, self._init_pid()}
        pids = []
        for pid in sorted(self.cgroup.pids() - skip):
            with contextlib.suppress(FileNotFoundError):
                if os.stat(f"/proc/{pid}").st_uid == self.uid:
                    pids.append(pid)
        if _RAISE_RLIMITS:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    for name, value in values.items():
                        resource.prlimit(pid, _RLIMIT_NUMBERS[name], (value, value))
            return
        as_sandbox = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--"]
        options = [f"--{name}={int(value)}:{int(value)}" for name, value in values.items()]
        results = await asyncio.gather(*(run_tool(*as_sandbox, "prlimit", f"--pid={pid}", *options)
                                         for pid in pids))
        for pid, (code, out) in zip(pids, results, strict=True):
            if code != 0 and os.path.exists(f"/proc/{pid}"):
                raise SandboxError(f"Could not set the rlimits of sandbox {self.id}: {out or code}.")

    def _mount_flags(self, pid: int) -> dict[str, str]:
        """:func:`mount_flags` of the mount namespace of host pid ``pid``; raises SandboxError."""
        try:
            with open(f"/proc/{pid}/mountinfo") as f:
                return mount_flags(f.read())
        except OSError as exc:
            raise SandboxError(f"Could not read the mounts of sandbox {self.id}: {exc}.") from exc

    def _init_pid(self) -> int | None:
        """Host pid of bubblewrap's pid 1 (the launcher's one child), or None once it is gone."""
        launcher = self._launcher
        if launcher is None or launcher.returncode is not None:
            return None
        try:
            with open(f"/proc/{launcher.pid}/task/{launcher.pid}/children") as f:
                children = f.read().split()
        except OSError:
            return None
        return int(children[0]) if len(children) == 1 else None

    # -- state ------------------------------------------------------------------------------------------

    def open_pty(self) -> tuple[int, int]:
        """A (master, slave) PTY of the sandbox's own devpts for a terminal; the caller closes both and passes
        the slave to :meth:`spawn` with ``pty=True``. Called by :meth:`start_pty`."""
        launcher = self._launcher
        pid = launcher.pid if launcher is not None and launcher.returncode is None else None
        return pty.open_pty(pid, self.id, self.uid, self.gid)

    def inner_run_path(self, name: str) -> str:
        return f"{bwrap.INNER_RUN}/{name}"

    def metrics(self) -> dict[str, Any]:
        """Usage read from the cgroup and the workspace; called by the service layer for sandbox_metrics."""
        out: dict[str, Any] = {
            "cpu_seconds": 0.0, "cpu_percent": 0.0, "memory_bytes": 0, "memory_peak_bytes": 0,
            "memory_limit_bytes": self.limits.memory_bytes, "pids": 0, "pids_limit": self.limits.pids,
            "disk_bytes": 0, "disk_limit_bytes": self.limits.disk_mb * 1024 * 1024, "oom_kills": 0,
        }
        if self.cgroup is not None and self.state == "running":
            with contextlib.suppress(OSError):
                m = self.cgroup.metrics()
                now = time.monotonic()
                last = getattr(self, "_cpu_sample", None)
                if last is not None and now > last[0]:
                    out["cpu_percent"] = round(100.0 * (m.cpu_seconds - last[1]) / (now - last[0]), 1)
                self._cpu_sample = (now, m.cpu_seconds)
                out.update(cpu_seconds=round(m.cpu_seconds, 3), memory_bytes=m.memory_bytes,
                           memory_peak_bytes=m.memory_peak_bytes, pids=m.pids, oom_kills=m.oom_kills)
                if m.memory_limit_bytes:
                    out["memory_limit_bytes"] = m.memory_limit_bytes
                if m.pids_limit:
                    out["pids_limit"] = m.pids_limit
        if self.workspace is not None:
            with contextlib.suppress(OSError):
                out["disk_bytes"] = self.workspace.usage()[0]
        return out

    def oom_kills(self) -> int:
        """How many processes the OOM killer ended in the sandbox so far (0 without a cgroup); the services ask
        it to tell an OOM kill from another SIGKILL."""
        return self._cgroup_count(lambda cgroup: cgroup.oom_kills())

    def pids_max_hits(self) -> int:
        """How many forks failed at the sandbox's pids limit so far (0 without a cgroup)."""
        return self._cgroup_count(lambda cgroup: cgroup.pids_max_hits())

    def _cgroup_count(self, read: Callable[[Cgroup], int]) -> int:
        if self.cgroup is None:
            return 0
        try:
            return read(self.cgroup)
        except OSError:
            return 0

    # -- stop -------------------------------------------------------------------------------------------

    async def stop(self, reason: str | None = None, *, keep_workspace: bool = False) -> None:
        """Kill every process, remove the cgroups, unmount and delete the workspace, free the uid.

        ``keep_workspace``: the workspace is unmounted but kept (its image or directory, and the sandbox's
        directory holding it), for a sandbox that is paused or that the next gateway on this state directory
        restores (:meth:`SandboxFactory.create` with ``reattach``). Idempotent; concurrent callers wait for the
        same stop (the first caller's ``keep_workspace`` holds). Called by the service layer (delete, reaping,
        pause, shutdown) and by the provisioner that owns a sandbox of its own."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(reason, keep_workspace))
        await asyncio.shield(self._stopping)

    async def _stop(self, reason: str | None, keep_workspace: bool = False) -> None:
        if self.state in ("starting", "running"):
            self.state = "stopped"
        if reason and not self.reason:
            self.reason = reason
        self.log(f"sandbox stopping{f' ({reason})' if reason else ''}")
        if self._agent is not None:
            self._agent.close()
        self._fail_all()
        errors: list[str] = []
        if self.cgroup is not None:
            try:
                await self.cgroup.remove()
            except Exception as exc:
                errors.append(f"cgroup: {exc}")
        if self._launcher is not None and self._launcher.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._launcher.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._launcher.wait(), 5)
        if self.workspace is not None:
            try:
                await (self.workspace.detach() if keep_workspace else self.workspace.destroy())
            except Exception as exc:
                errors.append(f"workspace: {exc}")
        try:
            await unmount_run_dir(self.run_dir)
        except SandboxError as exc:
            errors.append(f"run dir: {exc}")
        for task in list(self._tasks):
            task.cancel()
        self.factory.uids.release(self.uid)
        self.factory._live.pop(self.id, None)
        if keep_workspace:
            with contextlib.suppress(OSError):
                os.rmdir(self.run_dir)
        elif not errors:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            log.error("sandbox %s left resources behind: %s", self.id, "; ".join(errors))

