"""A jupyter_client kernel provisioner that starts kernels inside kernelhub sandboxes.

Kernelspecs name it with ``"metadata": {"kernel_provisioner": {"provisioner_name": "kernelhub-provisioner"}}``
and jupyter_client finds it through the ``jupyter_client.kernel_provisioners`` entry point, so a plain
``KernelManager``, nbclient or Jupyter Server get sandboxed kernels from our kernelspecs.

Where the sandbox comes from:

- the gateway passes ``sandbox=<Sandbox>`` to ``KernelManager.start_kernel``; the kernel joins that sandbox
  (one more session in it) and the sandbox outlives the kernel;
- otherwise the provisioner creates a sandbox of its own (limits from the kernelspec's provisioner ``config``,
  machine settings from ``KERNELHUB_*`` variables) and stops it when the kernel is shut down.

Kernels listen on ZeroMQ ``ipc`` sockets in the sandbox's run directory (tcp cannot cross the network
namespace); the gateway reaches the same sockets through the host path of that directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import stat
import uuid
from pathlib import Path
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning import KernelProvisionerBase
from traitlets import Dict, Float

from ..errors import SandboxError
from ..settings import env_config
from .factory import SandboxFactory
from .limits import Limits, resolve_limits
from .sandbox import Sandbox, SandboxProcess

#: The kernelspecs that name this provisioner (installed by ``kernelhub kernelspecs install``; served by the
#: gateway from here).
KERNELSPECS_DIR = Path(__file__).resolve().parent.parent / "kernelspecs"

_default_factory: SandboxFactory | None = None

#: Variables that jupyter_client or the host put in a kernel's environment and that must not reach a sandbox.
_HOST_ONLY_ENV = ("JPY_PARENT_PID",)


def default_factory() -> SandboxFactory:
    """The factory used when no gateway hands in a sandbox (configured from ``KERNELHUB_*`` variables)."""
    global _default_factory
    if _default_factory is None:
        _default_factory = SandboxFactory(config=env_config([SandboxFactory]))
    return _default_factory


class SandboxProvisioner(KernelProvisionerBase):  # type: ignore[misc]
    """Launches a kernel inside a sandbox; mirrors ``Popen`` through the sandbox's agent."""

    limits = Dict(help="Limits of a sandbox this provisioner creates for itself (see API.md).", config=True)
    env = Dict(help="Extra environment variables of a sandbox this provisioner creates.", config=True)
    socket_timeout = Float(60.0, help="Seconds to wait for the kernel to bind its sockets.", config=True)

    sandbox: Sandbox | None = None
    owns_sandbox = False
    _generation = 0
    _base_dir: Any = None
    _stage_dir: Any = None
    process: SandboxProcess | None = None
    _inner_connection_file: str | None = None

    @property
    def has_process(self) -> bool:
        return self.process is not None

    async def poll(self) -> int | None:
        """Called by the kernel manager and its restarter: None while the kernel runs."""
        if self.process is None:
            return 0
        return self.process.poll()

    async def wait(self) -> int | None:
        """Called by the kernel manager after a shutdown request or a kill."""
        if self.process is None:
            return 0
        code = await self.process.wait()
        self.process = None
        return code

    async def send_signal(self, signum: int) -> None:
        """Called for ``interrupt_mode: signal`` and by kill/terminate: signals the kernel's process group
        inside the sandbox, never bwrap's pid 1."""
        if self.process is not None:
            await self.process.send_signal(signum)

    async def kill(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGTERM)

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Called by ``KernelManager.pre_start_kernel``: finds or creates the sandbox, writes the two
        connection files (host paths for the gateway, sandbox paths for the kernel) and builds the command."""
        km: Any = self.parent
        given = kwargs.pop("sandbox", None)
        kwargs.pop("transport_encryption", None)
        if given is not None:
            self.sandbox, self.owns_sandbox = given, False
        elif self.sandbox is None or self.sandbox.state != "running":
            limits = resolve_limits(self.limits) if self.limits else Limits()
            self.sandbox = await default_factory().create(limits=limits, env=self.env)
            self.owns_sandbox = True
        sandbox = self.sandbox
        assert sandbox is not None
        extra_arguments = kwargs.pop("extra_arguments", [])
        base = f"k-{(km.kernel_id or uuid.uuid4().hex).replace('-', '')[:12]}"
        # Each start of the kernel binds its sockets in a fresh staging directory that the sandbox uid owns
        # until the sockets exist; then it becomes root's and is renamed to the kernel's fixed directory, where
        # the gateway's sockets connect (and reconnect after a restart). Both live in the root-owned run
        # directory, so code in the sandbox can never put a symlink where the gateway connects (pitfall 8).
        self._generation += 1
        stage = f"{base}.{self._generation}"
        self._base_dir = sandbox.run_dir / base
        self._stage_dir = sandbox.run_dir / stage
        dir_fd = self._open_socket_dir(self._stage_dir, sandbox)
        km.transport = "ipc"
        km.ip = str(self._base_dir / "s")
        km.shell_port, km.iopub_port, km.stdin_port, km.control_port, km.hb_port = 1, 2, 3, 4, 5
        km.cache_ports = False
        # The host-side file, for the gateway (and anything else on the host that connects).
        km.write_connection_file()
        self.connection_info = km.get_connection_info()
        inner: dict[str, Any] = dict(self.connection_info)
        inner["ip"] = sandbox.inner_run_path(f"{stage}/s")
        if isinstance(inner.get("key"), bytes):
            inner["key"] = inner["key"].decode()
        os.close(dir_fd)
        # The kernel's connection file sits in the root-owned run directory (the sandbox cannot plant or swap
        # anything there), owned by the sandbox uid so that the kernel may rewrite it, as ipykernel does after
        # binding. Written by descriptor, created afresh (O_EXCL), never through a link.
        run_fd = os.open(sandbox.run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{base}.json", dir_fd=run_fd)
            fd = os.open(f"{base}.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=run_fd)
            with os.fdopen(fd, "w") as f:
                if sandbox.factory.as_root:
                    os.fchown(fd, sandbox.uid, sandbox.gid)
                json.dump(inner, f)
        finally:
            os.close(run_fd)
        self._inner_connection_file = sandbox.inner_run_path(f"{base}.json")
        cmd = [
            arg.replace(km.connection_file, self._inner_connection_file)
            for arg in km.format_kernel_cmd(extra_arguments=extra_arguments)
        ]
        env = {k: v for k, v in (self.kernel_spec.env or {}).items() if k not in _HOST_ONLY_ENV}
        # The host environment (kwargs["env"] is a copy of os.environ) never enters a sandbox.
        kwargs.pop("env", None)
        kwargs["sandbox_env"] = env
        return {"cmd": cmd, **kwargs}

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Called by the kernel manager to start the kernel: asks the sandbox's agent to run ``cmd``."""
        sandbox = self.sandbox
        assert sandbox is not None
        name = self.kernel_spec.language or "kernel"
        out = sandbox.log_pipe(f"[{name} {self.kernel_id[:8]}] ")
        devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.process = await sandbox.spawn(cmd, stdin=devnull, stdout=out, stderr=out,
                                               env=kwargs.get("sandbox_env") or {})
        finally:
            os.close(devnull)
            os.close(out)
        sandbox.log(f"kernel {self.kernel_id} ({name}) started as pid {self.process.pid}")
        # Checked here, not in post_launch: KernelManager connects its control socket before post_launch,
        # and zmq would follow a symlink planted at that path to any unix socket of the host.
        await self._sockets_or_stop()
        return self.connection_info

    async def post_launch(self, **kwargs: Any) -> None:
        """Called by ``KernelManager.post_start_kernel``; the sockets were checked in :meth:`launch_kernel`."""

    async def _sockets_or_stop(self) -> None:
        """Wait until the kernel has bound its sockets and check that each is a socket of the sandbox's uid,
        not a symlink planted by code in the sandbox (SECURITY.md pitfall 8)."""
        try:
            await self._wait_for_sockets()
        except BaseException:
            if self.owns_sandbox and self.sandbox is not None:
                await self.sandbox.stop("failed")
                self.sandbox = None
                self.process = None
            raise

    @staticmethod
    def _open_socket_dir(path: Any, sandbox: Sandbox) -> int:
        """Make (or, on restart, reopen) a kernel's socket directory and hand it to the sandbox uid for the
        kernel to bind in. Its parent is root's, so nothing in the sandbox can have replaced it."""
        shutil.rmtree(path, ignore_errors=True)  # a leftover of a start that failed halfway
        os.mkdir(path, 0o700)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        if sandbox.factory.as_root:
            os.fchown(fd, sandbox.uid, sandbox.gid)
        os.fchmod(fd, 0o700)
        return fd

    def _seal(self) -> None:
        """Called once the kernel has bound its sockets: the directory becomes root's (0755), so the sandbox
        can still connect to its kernel's sockets but can no longer remove or replace them."""
        sandbox = self.sandbox
        assert sandbox is not None
        if not sandbox.factory.as_root:
            return
        fd = os.open(self._stage_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchown(fd, 0, 0)
            os.fchmod(fd, 0o755)
        finally:
            os.close(fd)

    def _publish(self) -> None:
        """Move the sealed staging directory to the kernel's fixed directory, where the gateway connects.
        Bound unix sockets keep working when their directory is renamed."""
        old = self._base_dir.with_name(self._base_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.rename(self._base_dir, old)
        os.rename(self._stage_dir, self._base_dir)
        shutil.rmtree(old, ignore_errors=True)

    async def _wait_for_sockets(self) -> None:
        sandbox, process = self.sandbox, self.process
        assert sandbox is not None and process is not None
        paths = [f"{self._stage_dir}/s-{port}" for port in range(1, 6)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.socket_timeout
        while True:
            missing = []
            for path in paths:
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    missing.append(path)
                    continue
                if not stat.S_ISSOCK(st.st_mode) or (sandbox.factory.as_root and st.st_uid != sandbox.uid):
                    await process.kill()
                    raise SandboxError("The kernel's socket directory was tampered with; refusing to connect.")
            if not missing:
                self._seal()
                # Checked again now that the sandbox can no longer change them.
                for path in paths:
                    st = os.lstat(path)
                    if not stat.S_ISSOCK(st.st_mode) or (sandbox.factory.as_root and st.st_uid != sandbox.uid):
                        await process.kill()
                        raise SandboxError("The kernel's socket directory was tampered with; refusing to connect.")
                self._publish()
                return
            if process.poll() is not None:
                raise SandboxError(
                    f"The kernel exited with status {process.poll()} before it was ready: "
                    + " | ".join(sandbox.logs(8))
                )
            if loop.time() > deadline:
                await process.kill()
                raise SandboxError("The kernel did not open its sockets in time.")
            await asyncio.sleep(0.01)

    async def cleanup(self, restart: bool = False) -> None:
        """Called by the kernel manager after the kernel ended: removes the kernel's files and, if this
        provisioner made the sandbox, stops it (no process, cgroup or uid is left)."""
        sandbox = self.sandbox
        if sandbox is not None and self._base_dir is not None:
            # A staging directory of a start that never finished; unlink never follows the sandbox's links.
            shutil.rmtree(self._stage_dir, ignore_errors=True)
            if not restart:
                # On restart the old (dead) sockets stay until the new kernel's directory replaces them.
                shutil.rmtree(self._base_dir, ignore_errors=True)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._base_dir.with_name(self._base_dir.name + ".json"))
        if not restart and self.owns_sandbox and sandbox is not None:
            await sandbox.stop()
            self.sandbox = None

    async def get_provisioner_info(self) -> dict[str, Any]:
        info: dict[str, Any] = await super().get_provisioner_info()
        if self.sandbox is not None:
            info["sandbox_id"] = self.sandbox.id
        return info

    def get_shutdown_wait_time(self, recommended: float = 5.0) -> float:
        return min(recommended, 3.0)

    def get_stable_start_time(self, recommended: float = 10.0) -> float:
        return recommended

    def resolve_path(self, path_str: str) -> str | None:
        return None
