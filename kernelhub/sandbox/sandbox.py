"""A running sandbox: its uid, cgroup, workspace, bubblewrap process and agent, and the processes in it.

:class:`SandboxFactory` (configured with traitlets) creates :class:`Sandbox` objects; the service layer calls
it for every new sandbox and the kernel provisioner calls it when plain jupyter_client starts a kernelspec of
ours. :meth:`Sandbox.spawn` starts any further process (a kernel, a command, a shell on a PTY) inside the same
namespaces, cgroup, uid and workspace through the agent (:mod:`kernelhub.sandbox.agent`).
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from traitlets import Bool, Enum, Integer, Unicode, default
from traitlets.config import LoggingConfigurable

from ..errors import CapacityExhausted, IsolationUnavailable, PidsExhausted, SandboxError, SandboxNotRunning
from . import bwrap, pty
from .cgroups import Cgroup, create_cgroup, open_cgroup
from .limits import Limits
from .workspace import Workspace, run_tool

log = logging.getLogger("kernelhub.sandbox")

#: Files bound read-only at /opt/kernelhub-agent in every sandbox.
AGENT_FILES = (Path(__file__).with_name("agent.py"), Path(__file__).with_name("tslab_ipc.js"))
_LOG_LINES = 2000
_LAUNCH_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}
#: Size of the run directory's tmpfs: connection files and sockets need a few KiB per kernel.
_RUN_DIR_BYTES = 2 * 1024 * 1024


async def _mount_run_dir(path: Path, uid: int, gid: int) -> None:
    # Root's, 0755: the sandbox reads its kernels' connection files and connects to their sockets here but
    # creates nothing itself (each kernel's own directory is handed to it only while that kernel binds).
    options = f"size={_RUN_DIR_BYTES},nr_inodes=4096,mode=0755,uid=0,gid=0,nosuid,nodev,noexec"
    code, out = await run_tool("mount", "-t", "tmpfs", "-o", options, "kernelhub-run", str(path))
    if code != 0:
        raise SandboxError(f"Could not mount the sandbox's run directory: {out or f'mount exit {code}'}.")


async def _unmount_run_dir(path: Path) -> None:
    if not os.path.ismount(path):
        return
    code, out = await run_tool("umount", str(path))
    if code != 0:
        code, out = await run_tool("umount", "-l", str(path))  # busy: detach, freed with the last user
    if code != 0:
        raise SandboxError(f"Could not unmount {path}: {out}")


class UidPool:
    """Hands out host uids from a range, one per live sandbox (SECURITY.md pitfall 7).

    A uid is held by an ``flock`` on a file in ``lock_dir``, so two gateways (or a gateway and plain
    jupyter_client using our provisioner) on one machine never hand out the same uid.
    """

    def __init__(self, base: int, count: int, lock_dir: Path) -> None:
        if base < 1000 or count < 1:
            raise ValueError("the uid range must start at 1000 or above and hold at least one uid")
        self.base, self.count, self.lock_dir = base, count, lock_dir
        self._held: dict[int, int] = {}

    def acquire(self) -> int:
        self.lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        start = secrets.randbelow(self.count)
        for i in range(self.count):
            uid = self.base + (start + i) % self.count
            if uid in self._held:
                continue
            fd = os.open(self.lock_dir / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._held[uid] = fd
            return uid
        raise CapacityExhausted("No free sandbox uid is left in the configured range.")

    def try_hold(self, uid: int) -> bool:
        """Take ``uid``'s lock if nobody holds it (used to reap sandboxes of dead processes)."""
        if uid in self._held:
            return False
        self.lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.lock_dir / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._held[uid] = fd
        return True

    def release(self, uid: int) -> None:
        fd = self._held.pop(uid, None)
        if fd is not None:
            os.close(fd)

    def held(self) -> set[int]:
        return set(self._held)


class SandboxProcess:
    """A process inside a sandbox, started by :meth:`Sandbox.spawn`; shaped like ``asyncio.subprocess``."""

    def __init__(self, sandbox: Sandbox, req_id: int, argv: Sequence[str]) -> None:
        self.sandbox = sandbox
        self.req_id = req_id
        self.argv = list(argv)
        self.pid: int | None = None
        self.returncode: int | None = None
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def poll(self) -> int | None:
        return self.returncode

    async def send_signal(self, signum: int, *, group: bool = True) -> None:
        """Signal the process (and its process group) inside the sandbox: the kernel itself, not bwrap's
        pid 1, which forwards nothing (SECURITY.md pitfall 6)."""
        if self.returncode is None:
            await self.sandbox._agent_send({"op": "signal", "id": self.req_id, "signal": int(signum),
                                            "group": group})

    async def kill(self) -> None:
        await self.send_signal(signal.SIGKILL)

    def _set_exit(self, status: int) -> None:
        if self.returncode is None:
            self.returncode = status
        if not self._exited.done():
            self._exited.set_result(self.returncode)


class Sandbox:
    """One isolation domain. Created by :meth:`SandboxFactory.create`; stopped by :meth:`stop`."""

    def __init__(self, factory: SandboxFactory, sandbox_id: str, uid: int, limits: Limits,
                 env: Mapping[str, str]) -> None:
        self.factory = factory
        self.id = sandbox_id
        self.uid = self.gid = uid
        self.limits = limits
        self.env = dict(env)
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
        self._ctl: socket.socket | None = None
        self._next_id = 0
        self._procs: dict[int, SandboxProcess] = {}
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ready: asyncio.Future[dict[str, Any]] | None = None
        self._log: collections.deque[str] = collections.deque(maxlen=_LOG_LINES)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping: asyncio.Task[None] | None = None
        self.on_exit: list[Callable[[Sandbox], Any]] = []

    # -- logs -----------------------------------------------------------------------------------------

    def log(self, message: str) -> None:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        for line in message.rstrip("\n").splitlines() or [""]:
            self._log.append(f"{stamp} {line}")

    def logs(self, lines: int = 100) -> list[str]:
        if lines <= 0:
            return []
        return list(self._log)[-lines:]

    def _pump_lines(self, fd: int, prefix: str) -> None:
        """Copy a host-side pipe's lines into the sandbox log (kernel stderr, bwrap errors)."""
        loop = asyncio.get_running_loop()
        buf = bytearray()

        def on_readable() -> None:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(fd)
                os.close(fd)
                if buf:
                    self.log(prefix + buf.decode(errors="replace"))
                return
            buf.extend(data)
            # Bound what one unterminated line may hold.
            while b"\n" in buf or len(buf) > 8192:
                cut = buf.find(b"\n")
                cut = cut if 0 <= cut < 8192 else 8192
                self.log(prefix + bytes(buf[:cut]).decode(errors="replace"))
                del buf[: cut + 1]

        os.set_blocking(fd, False)
        loop.add_reader(fd, on_readable)

    def log_pipe(self, prefix: str) -> int:
        """A pipe whose write end a process may use as stdout/stderr; its lines go to the sandbox log.
        Returns the write end; the caller passes it to :meth:`spawn` and then closes it."""
        r, w = os.pipe2(os.O_CLOEXEC)
        self._pump_lines(r, prefix)
        return w

    # -- start ------------------------------------------------------------------------------------------

    async def _start(self) -> None:
        f = self.factory
        self.dir.mkdir(mode=0o711, parents=True)
        os.chmod(self.dir, 0o711)
        # Recorded so that a later process can tell a live sandbox (uid lock held) from a crashed one.
        (self.dir / "uid").write_text(str(self.uid))
        etc_dir = self.dir / "etc"
        etc_dir.mkdir(mode=0o755)
        self.run_dir.mkdir(mode=0o700)
        if f.as_root:
            # The sandbox writes here (its kernels' sockets): a small tmpfs, charged to its memory cgroup,
            # instead of the host disk, where no quota would hold what it writes.
            await _mount_run_dir(self.run_dir, self.uid, self.gid)
        self.workspace = Workspace(self.dir, self.uid, self.gid, self.limits,
                                   mode=f.workspace_mode, min_host_free_mb=f.min_host_free_mb)
        await self.workspace.create()
        self.cgroup = create_cgroup(self.id, self.limits, root=f.cgroup_root, parent=f.cgroup_parent,
                                    require=f.required_controllers())
        node_modules = Path(f.runtime_dir) / "node" / "node_modules"
        self.spec = bwrap.SandboxSpec(
            sandbox_id=self.id,
            uid=self.uid,
            gid=self.gid,
            hostname=self.hostname,
            workspace=str(self.workspace.path),
            run_dir=str(self.run_dir),
            etc_dir=str(etc_dir),
            agent_dir=str(f.agent_dir()),
            runtime_dir=f.runtime_dir if Path(f.runtime_dir).is_dir() else None,
            node_modules=str(node_modules) if node_modules.is_dir() else None,
            # Together at most half the memory limit: a sandbox that fills them all can still run its kernel.
            tmp_size_bytes=max(self.limits.memory_bytes // 4, 8 * 1024 * 1024),
            shm_size_bytes=max(self.limits.memory_bytes // 8, 4 * 1024 * 1024),
            home_size_bytes=max(self.limits.memory_bytes // 8, 4 * 1024 * 1024),
            env=self.env,
        )
        for name, text in bwrap.passwd_files(self.spec).items():
            (etc_dir / name).write_text(text)
            os.chmod(etc_dir / name, 0o644)
        rlimits = {
            "nofile": 4096,
            "fsize": self.limits.max_file_mb * 1024 * 1024,
            "core": 0,
            "nproc": self.limits.pids,
        }
        command = bwrap.agent_command(f.agent_python) + [json.dumps(rlimits)]
        argv = bwrap.launch_argv(self.spec, self.cgroup.procs_files, command, bwrap=f.bwrap_path,
                                 as_root=f.as_root)
        gateway_end, agent_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        stderr_w = self.log_pipe("")
        try:
            self._launcher = await asyncio.create_subprocess_exec(
                *argv, stdin=agent_end.fileno(), stdout=asyncio.subprocess.DEVNULL, stderr=stderr_w,
                close_fds=True,
                # Not the gateway's environment (nor its cwd, which /bin/sh exports as PWD): bwrap's pid 1
                # keeps what it was exec'd with in /proc/1/environ, readable inside the sandbox whatever
                # --clearenv did for its child.
                env=_LAUNCH_ENV, cwd="/",
            )
        finally:
            agent_end.close()
            os.close(stderr_w)
        self._ctl = gateway_end
        gateway_end.setblocking(False)
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        loop.add_reader(gateway_end.fileno(), self._on_agent_readable)
        self._spawn_task(self._watch_launcher())
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), f.start_timeout)
        except (TimeoutError, SandboxError) as exc:
            detail = "; ".join(self.logs(5)) or str(exc) or "no output"
            raise SandboxError(f"The sandbox did not start: {detail}") from None
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
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(SandboxError(f"bubblewrap exited with {code}"))
        if self.state in ("starting", "running"):
            reason = "oom" if self.cgroup is not None and self.cgroup.oom_kills() > 0 else None
            self.log(f"sandbox exited unexpectedly (status {code}{', out of memory' if reason else ''})")
            self.reason = self.reason or reason or "failed"
            self.state = "failed"
            self._fail_all()
            for callback in list(self.on_exit):
                callback(self)

    # -- agent channel ---------------------------------------------------------------------------------

    def _on_agent_readable(self) -> None:
        assert self._ctl is not None
        try:
            data = self._ctl.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self._ctl.fileno())
            self._fail_all()
            return
        try:
            # The agent runs as the sandbox: whatever it says is untrusted and only affects this sandbox.
            msg = json.loads(data)
            op = msg.get("op")
            req = msg.get("id")
        except (ValueError, AttributeError):
            return
        if op == "ready":
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(msg)
            return
        if op in ("spawned", "failed"):
            fut = self._pending.pop(req, None) if isinstance(req, int) else None
            if fut is not None and not fut.done():
                fut.set_result(msg)
            elif op == "failed":
                self.log(f"agent: {str(msg.get('message'))[:500]}")
            return
        if op == "exit" and isinstance(req, int):
            proc = self._procs.pop(req, None)
            status = msg.get("status")
            if proc is not None:
                proc._set_exit(status if isinstance(status, int) else -1)

    def _fail_all(self) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(SandboxError("The sandbox stopped."))
        self._pending.clear()
        for proc in self._procs.values():
            proc._set_exit(-signal.SIGKILL)
        self._procs.clear()

    async def _agent_send(self, msg: dict[str, Any], fds: Sequence[int] = ()) -> None:
        if self._ctl is None:
            raise SandboxNotRunning("The sandbox is not running.")
        data = json.dumps(msg).encode()
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        for _ in range(1000):
            try:
                self._ctl.sendmsg([data], anc)
                return
            except BlockingIOError:
                await asyncio.sleep(0.005)
            except OSError as exc:
                raise SandboxNotRunning("The sandbox is not running.") from exc
        raise SandboxError("The sandbox's agent does not answer.")

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
    ) -> SandboxProcess:
        """Start ``argv`` inside the sandbox with the given host fds as its stdio (for a PTY, pass the slave
        as all three). The caller keeps ownership of the fds. Called by the provisioner, the command
        runner and the terminal manager."""
        if self.state != "running":
            raise SandboxNotRunning(f"The sandbox is {self.state}.")
        self._next_id += 1
        req = self._next_id
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[req] = fut
        proc = SandboxProcess(self, req, argv)
        self._procs[req] = proc
        assert self.spec is not None
        full_env = bwrap.sandbox_env(self.spec, env)
        fds = [stdin] if pty else [stdin, stdout, stderr]
        try:
            await self._agent_send(
                {"op": "spawn", "id": req, "argv": list(argv), "env": full_env, "cwd": cwd, "pty": pty}, fds
            )
            reply = await asyncio.wait_for(fut, self.factory.start_timeout)
        except BaseException:
            self._pending.pop(req, None)
            self._procs.pop(req, None)
            raise
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

    # -- state ------------------------------------------------------------------------------------------

    def open_pty(self) -> tuple[int, int]:
        """A (master, slave) PTY of the sandbox's own devpts for a terminal; the caller closes both and passes
        the slave to :meth:`spawn` with ``pty=True``. Called by the terminal sessions."""
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
        if self.cgroup is None:
            return 0
        try:
            return self.cgroup.oom_kills()
        except OSError:
            return 0

    def pids_max_hits(self) -> int:
        if self.cgroup is None:
            return 0
        try:
            return self.cgroup.pids_max_hits()
        except OSError:
            return 0

    # -- stop -------------------------------------------------------------------------------------------

    async def stop(self, reason: str | None = None) -> None:
        """Kill every process, remove the cgroups, unmount and delete the workspace, free the uid.

        Idempotent; concurrent callers wait for the same stop. Called by the service layer (delete, reaping)
        and by the provisioner that owns a sandbox of its own."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(reason))
        await asyncio.shield(self._stopping)

    async def _stop(self, reason: str | None) -> None:
        if self.state in ("starting", "running"):
            self.state = "stopped"
        if reason and not self.reason:
            self.reason = reason
        self.log(f"sandbox stopping{f' ({reason})' if reason else ''}")
        loop = asyncio.get_running_loop()
        if self._ctl is not None:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(self._ctl.fileno())
            self._ctl.close()
            self._ctl = None
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
                await self.workspace.destroy()
            except Exception as exc:
                errors.append(f"workspace: {exc}")
        try:
            await _unmount_run_dir(self.run_dir)
        except SandboxError as exc:
            errors.append(f"run dir: {exc}")
        for task in list(self._tasks):
            task.cancel()
        self.factory.uids.release(self.uid)
        self.factory._live.pop(self.id, None)
        if not errors:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            log.error("sandbox %s left resources behind: %s", self.id, "; ".join(errors))


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

    @property
    def sandboxes_dir(self) -> Path:
        return Path(self.state_dir) / "sandboxes"

    def required_controllers(self) -> tuple[str, ...]:
        return ("memory", "cpu", "pids") if self.isolation == "strict" else ()

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
                     sandbox_id: str | None = None) -> Sandbox:
        """Start a new sandbox with its agent running. Called by the service layer and the provisioner."""
        if self.isolation == "strict" and not self.as_root:
            raise IsolationUnavailable(
                "Strict isolation needs root (a host uid per sandbox, cgroups, workspace quotas); run as root "
                "or set KERNELHUB_ISOLATION=relaxed."
            )
        self._prepare_state_dir()
        limits = limits or Limits()
        sandbox_id = sandbox_id or "sb" + secrets.token_hex(5)
        uid = self.uids.acquire() if self.as_root else os.getuid()
        sandbox = Sandbox(self, sandbox_id, uid, limits, env or {})
        self._live[sandbox_id] = sandbox
        try:
            await sandbox._start()
        except BaseException as exc:
            sandbox.state = "failed"
            await sandbox.stop("failed")
            if isinstance(exc, SandboxError):
                raise
            if isinstance(exc, Exception):
                raise SandboxError(f"The sandbox could not be set up: {exc}") from exc
            raise
        return sandbox

    async def reap_stale(self) -> list[str]:
        """Remove what crashed processes left behind: sandbox directories whose uid lock nobody holds, with
        their cgroups and mounted workspaces. Called by the gateway at start-up; safe while other kernelhub
        processes share the state directory (their sandboxes hold their uid locks)."""
        reaped: list[str] = []
        if not self.sandboxes_dir.is_dir():
            return reaped
        for entry in sorted(self.sandboxes_dir.iterdir()):
            if entry.name in self._live or not entry.is_dir():
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
                    await _unmount_run_dir(entry / "run")
                shutil.rmtree(entry, ignore_errors=True)
                reaped.append(entry.name)
            finally:
                if uid is not None and self.as_root:
                    self.uids.release(uid)
        if reaped:
            self.log.warning("removed %d sandboxes left by a process that died: %s", len(reaped), reaped)
        return reaped

    def live(self) -> list[Sandbox]:
        return list(self._live.values())

    async def stop_all(self) -> None:
        await asyncio.gather(*(sb.stop("shutdown") for sb in self.live()), return_exceptions=True)
