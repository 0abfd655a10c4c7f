"""Shared fixtures: an event loop per module, a state directory sandbox uids can traverse, and a real
:class:`SandboxFactory` whose teardown proves that nothing it made is left (process, cgroup, mount, uid lock).

No pytest-asyncio: tests are synchronous and drive coroutines with ``runner.run(...)`` (one loop per module,
so a sandbox created in one test can serve the next). The one test gateway of the run, ``gateway``, comes from
:mod:`kernelhub.testing` through ``pytest_plugins``. Two helpers come as fixtures: ``sh`` runs a shell
command in a sandbox, ``kernels`` starts kernels through jupyter_client with kernelhub's kernelspecs (installed by
its CLI into a prefix on JUPYTER_PATH) and executes code in them.
"""

from __future__ import annotations

import asyncio
import glob
import os
import queue
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager

from kernelhub.sandbox.factory import SandboxFactory
from kernelhub.sandbox.sandbox import Sandbox

# kernelhub.testing's fixtures, registered once for the whole run: one `gateway` (session-scoped) shared by every
# module that asks for it. Importing the fixture into a module instead registers it per module, and pytest then
# starts one gateway per importing module.
pytest_plugins = ["kernelhub.testing"]


def pytest_configure(config: pytest.Config) -> None:
    # Every test is real (uids of their own, cgroups, loop devices, bubblewrap): the suite needs root and says
    # so once, rather than skipping what it cannot do.
    if os.geteuid() != 0:
        pytest.exit("kernelhub's tests need root: run `make test` as root.", returncode=2)


class RecordingFactory(SandboxFactory):
    """A real SandboxFactory that remembers (id, uid) of every sandbox it made, for :func:`leftovers`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.made: list[tuple[str, int]] = []

    async def create(self, *args: Any, **kwargs: Any) -> Sandbox:
        sandbox = await super().create(*args, **kwargs)
        self.made.append((sandbox.id, sandbox.uid))
        return sandbox


def make_state_dir() -> Path:
    # Not pytest's tmp_path: its 0700 parents are untraversable by sandbox uids.
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="kh-test-"))
    os.chmod(path, 0o711)
    return path


def mounts_under(path: Path | str) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p.startswith(prefix)]


def uid_processes(uid: int) -> list[int]:
    """Live processes whose real uid is ``uid``. Zombies are left out: one whose parent was SIGKILLed waits
    for the host's init to reap it, holds nothing, and can do nothing."""
    found = []
    for status in glob.glob("/proc/[0-9]*/status"):
        try:
            with open(status) as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith("Z"):
            found.append(int(status.split("/")[2]))
    return found


def cgroup_dirs(sandbox_id: str, root: str = "/sys/fs/cgroup", parent: str = "kernelhub") -> list[str]:
    return glob.glob(f"{root}/*/{parent}/{sandbox_id}") + glob.glob(f"{root}/{parent}/{sandbox_id}")


def _leftovers_of(sandbox_id: str, uid: int, state_dir: Path | str) -> list[str]:
    """Whatever a stopped sandbox still holds: its dir, cgroups, mounts and processes of its uid."""
    found = [f"cgroup {d}" for d in cgroup_dirs(sandbox_id)]
    found += [f"mount {m}" for m in mounts_under(Path(state_dir) / "sandboxes" / sandbox_id)]
    found += [f"pid {p} of uid {uid}" for p in uid_processes(uid)]
    if (Path(state_dir) / "sandboxes" / sandbox_id).exists():
        found.append(f"dir of {sandbox_id}")
    return found


def leftovers(factory: RecordingFactory) -> list[str]:
    found = [f"live sandbox {sb.id}" for sb in factory.live()]
    found += [f"uid lock {uid}" for uid in factory.uids.held()]
    for sandbox_id, uid in factory.made:
        found += _leftovers_of(sandbox_id, uid, factory.state_dir)
    found += [f"mount {m}" for m in mounts_under(factory.state_dir)]
    return found


def _remove_state_dir(path: Path) -> None:
    for point in sorted(mounts_under(path), reverse=True):  # only after a failure: never rm into a mount
        subprocess.run(["umount", "-l", point], check=False)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as r:
        yield r


@pytest.fixture(scope="module")
def state_dir() -> Iterator[Path]:
    path = make_state_dir()
    yield path
    _remove_state_dir(path)


@pytest.fixture(scope="module")
def factory(state_dir: Path, runner: asyncio.Runner) -> Iterator[RecordingFactory]:
    made = RecordingFactory(state_dir=str(state_dir))
    yield made
    runner.run(made.stop_all())
    left = leftovers(made)
    assert not left, f"sandboxes left resources behind: {left}"


async def _sh(sandbox: Sandbox, script: str, *, timeout: float = 60, argv: list[str] | None = None,
             env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """Run ``bash -c script`` (or ``argv``) in the sandbox; answer its exit status and stdout+stderr."""
    r, w = os.pipe2(os.O_CLOEXEC)
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        proc = await sandbox.spawn(argv or ["/bin/bash", "-c", script], stdin=devnull, stdout=w, stderr=w,
                                   env=env)
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
        os.close(devnull)
    loop = asyncio.get_running_loop()
    out = bytearray()
    eof = loop.create_future()

    def readable() -> None:
        try:
            data = os.read(r, 1 << 16)
        except BlockingIOError:
            return
        if data:
            out.extend(data)
        elif not eof.done():
            eof.set_result(None)

    os.set_blocking(r, False)
    loop.add_reader(r, readable)
    try:
        try:
            code = await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            await proc.kill()
            raise
        # A background process may hold the pipe open: take what came, do not wait for it.
        try:
            await asyncio.wait_for(asyncio.shield(eof), 2)
        except TimeoutError:
            pass
    finally:
        loop.remove_reader(r)
        os.close(r)
    return code, out.decode(errors="replace")


@pytest.fixture(scope="session")
def sh() -> Any:
    """``await sh(sandbox, script)`` -> (exit status, output)."""
    return _sh


@pytest.fixture(scope="session")
def leftovers_of() -> Any:
    """``leftovers_of(sandbox_id, uid, state_dir)`` -> what a stopped sandbox still holds (empty is clean)."""
    return _leftovers_of


class Kernels:
    """Starts kernels through jupyter_client and the installed kernelspecs; shuts down what a test left."""

    def __init__(self) -> None:
        self.running: list[AsyncKernelManager] = []

    async def start(self, name: str, **kwargs: Any) -> tuple[AsyncKernelManager, AsyncKernelClient]:
        km = AsyncKernelManager(kernel_name=name)
        try:
            await km.start_kernel(**kwargs)
        except BaseException:
            await km.cleanup_resources()  # the control socket and context of a start that failed halfway
            raise
        self.running.append(km)
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=90)
        except BaseException:
            kc.stop_channels()
            raise
        return km, kc

    async def stop(self, km: AsyncKernelManager, kc: AsyncKernelClient | None = None, now: bool = False) -> None:
        if kc is not None:
            kc.stop_channels()
        if km in self.running:
            self.running.remove(km)
        await km.shutdown_kernel(now=now)

    @staticmethod
    async def collect(kc: AsyncKernelClient, msg_id: str, timeout: float = 60) -> tuple[dict[str, Any], str]:
        """The execute_reply content of ``msg_id`` and its output as text (streams, results, errors).

        Done on idle, or on the reply followed by a quiet iopub: tslab now and then never sends idle."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        reply: dict[str, Any] | None = None
        idle = False
        out: list[str] = []
        while not (reply is not None and idle):
            if loop.time() > deadline:
                raise TimeoutError(f"no reply to {msg_id} within {timeout} s; output so far: {''.join(out)!r}")
            try:
                msg = await kc.get_iopub_msg(timeout=0.25)
            except queue.Empty:
                msg = None
            if msg is not None and msg["parent_header"].get("msg_id") == msg_id:
                kind, content = msg["msg_type"], msg["content"]
                if kind == "stream":
                    out.append(content["text"])
                elif kind in ("execute_result", "display_data"):
                    out.append(content["data"].get("text/plain", "") + "\n")
                elif kind == "error":
                    out.append(f"{content['ename']}: {content['evalue']}\n")
                elif kind == "status" and content["execution_state"] == "idle":
                    idle = True
            while reply is None:
                try:
                    shell = await kc.get_shell_msg(timeout=0.001)
                except queue.Empty:
                    break
                if shell["parent_header"].get("msg_id") == msg_id:
                    reply = shell["content"]
            if reply is not None and msg is None:
                break
        assert reply is not None
        return reply, "".join(out)

    async def execute(self, kc: AsyncKernelClient, code: str, timeout: float = 60) -> tuple[dict[str, Any], str]:
        return await self.collect(kc, kc.execute(code), timeout)


@pytest.fixture(scope="module")
def kernels(factory: RecordingFactory, runner: asyncio.Runner,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kernels]:
    """The kernelspecs installed by kernelhub's own installer into a prefix on JUPYTER_PATH, and a starter."""
    prefix = tmp_path_factory.mktemp("kernelspecs")
    kernelhub = str(Path(sys.executable).with_name("kernelhub"))
    subprocess.run([kernelhub, "kernelspecs", "install", "--prefix", str(prefix)], check=True, capture_output=True)
    made = Kernels()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
        yield made
    for km in list(made.running):
        runner.run(made.stop(km, now=True))
