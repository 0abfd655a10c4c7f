"""A real gateway for tests: ``kernelhub serve`` in a subprocess on an unused loopback port.

Used by the test suite (``pytest_plugins = ["kernelhub.testing"]``) and usable by anyone who wants to drive a
throwaway gateway from a script. The fixture ``gateway`` is session-scoped: one gateway for the whole run,
with two tenants (``alice`` with :data:`TOKEN`, ``bob`` with :data:`OTHER_TOKEN`).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

TOKEN = "test-token-alice-0123456789"
OTHER_TOKEN = "test-token-bob-9876543210"


#: Python kernel code that defines ``_forge(msg_type, content, buffers=(), metadata=None, parts=None,
#: signature=None)``: a message signed with the kernel's own key (or ``parts`` and ``signature`` as given) sent on
#: the kernel's iopub socket from its I/O thread, zero-copy, as the parent of the running cell. What hostile code
#: in a sandbox can do to the gateway (SECURITY.md pitfall 12); used by the kernel-channel tests and
#: ``benchmarks/huge_frames.py``. Also imports ``mmap`` as ``_mmap``.
FORGE_PRELUDE = r'''
import mmap as _mmap, threading as _threading
from jupyter_client.session import DELIM as _DELIM
_k = get_ipython().kernel
_s = _k.session
def _forge(msg_type, content, buffers=(), metadata=None, parts=None, signature=None):
    msg = _s.msg(msg_type, content, parent=_k.get_parent(), metadata=metadata or {})
    if parts is None:
        parts = [_s.pack(msg[k]) for k in ("header", "parent_header", "metadata", "content")]
    frames = [b"kernel.attack", _DELIM, _s.sign(parts) if signature is None else signature, *parts, *buffers]
    done = _threading.Event()
    def send():
        try:
            _k.iopub_thread.socket.send_multipart(frames, copy=False)
        finally:
            done.set()
    _k.iopub_thread.schedule(send)
    done.wait(120)
'''


def _die_with_parent() -> None:
    """In the gateway's child before exec: SIGTERM it when the test process dies (a killed pytest run must not
    leave a gateway, with its sandboxes, behind). SIGTERM lets it stop its sandboxes cleanly."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_state_dir() -> str:
    """A state directory sandbox uids can traverse (pytest's tmp_path is 0700, which they cannot)."""
    path = tempfile.mkdtemp(prefix="kernelhub-test-", dir="/tmp")
    os.chmod(path, 0o711)
    return path


def terminate(proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """SIGTERM a server started with ``start_new_session=True`` and wait for it; SIGKILL its whole process group
    if it does not end within ``timeout`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class Gateway:
    """A running ``kernelhub serve`` (``python -m <module> serve``, ``module`` being kernelhub.cli unless a
    benchmark runs a variant); ``request`` is a tiny JSON client for tests."""

    def __init__(self, *, extra_args: list[str] | None = None, env: dict[str, str] | None = None,
                 state_dir: str | None = None, module: str = "kernelhub.cli") -> None:
        """Start ``kernelhub serve`` with ``extra_args`` and ``env`` added, in ``state_dir`` (a new one by
        default; give the one of a gateway that died to start its successor)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = TOKEN
        self.other_token = OTHER_TOKEN
        self.state_dir = state_dir or make_state_dir()
        keys = os.path.join(self.state_dir, "keys.json")
        with open(keys, "w") as f:
            json.dump({OTHER_TOKEN: "bob"}, f)
        self.log_path = os.path.join(self.state_dir, "gateway.log")
        argv = [sys.executable, "-m", module, "serve", "--port", str(self.port), "--token", TOKEN,
                "--api-keys", keys, "--state-dir", self.state_dir, *(extra_args or [])]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited: {self.log()}")
            try:
                self.request("GET", "/api")
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the gateway did not start: {self.log()}")

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-5000:]

    def request(self, method: str, path: str, body: Any = None, *, token: str | None = "default",
                headers: dict[str, str] | None = None, raw: bytes | None = None,
                timeout: float = 120) -> tuple[int, Any]:
        """Send a request; answers (status, parsed JSON or bytes). Never raises for HTTP errors."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if body is not None:
            req.add_header("Content-Type", "application/json")
        if token == "default":
            token = self.token
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, payload, ctype = resp.status, resp.read(), resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            status, payload, ctype = err.code, err.read(), err.headers.get("Content-Type", "")
        if "json" in ctype and payload:
            return status, json.loads(payload)
        return status, payload

    def crash(self) -> None:
        """SIGKILL the gateway, as a crash would: its sandboxes die with it (bubblewrap's --die-with-parent) but
        leave their directories, cgroups and mounted workspaces for the next gateway on the state directory to
        reap. The state directory is kept."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._log.close()

    def stop(self, *, keep_state: bool = False) -> None:
        """SIGTERM the gateway and wait for it; then remove its state directory, unless ``keep_state`` (to start
        a successor on it: a durable gateway keeps its sandboxes there)."""
        terminate(self.proc)
        self._log.close()
        if keep_state:
            return
        # The gateway stopped its sandboxes; remove its state dir unless something is still mounted there (then
        # it is left for `kernelhub serve` to reap at its next start, never deleted from under a mount).
        with open("/proc/self/mountinfo") as f:
            mounted = any(line.split()[4].startswith(self.state_dir + "/") for line in f)
        if not mounted:
            shutil.rmtree(self.state_dir, ignore_errors=True)


async def until(check: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll ``check`` every 10 ms until it holds or ``timeout`` seconds pass; answer its last value. For a state
    that no event announces (a sandbox reaped, a cgroup's counter): tests wait on it instead of sleeping a fixed
    time, and say ``assert await until(...)``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(0.01)
    return check()


def _dump_asyncio_tasks(terminal: Any) -> None:
    """Print the stack of every task of the asyncio loop the timed-out test runs (the main thread's, if any):
    pytest-timeout shows threads only, and an in-process test that hangs is in ``select`` on every one."""
    loop = asyncio._get_running_loop()
    if loop is None:
        return
    for task in asyncio.all_tasks(loop):
        terminal.sep("~", title=f"asyncio task {task.get_name()}")
        lines: list[str] = []
        awaited: Any = task.get_coro()
        while awaited is not None:  # the chain of awaits, outermost first
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
            if frame is not None:
                lines.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}\n")
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
        terminal.write("".join(lines) or f"  {task!r}\n")


def pytest_configure(config: pytest.Config) -> None:
    """When pytest-timeout ends a test, it also prints the asyncio tasks of the loop the test was running."""
    try:
        import pytest_timeout
    except ImportError:
        return
    dump = pytest_timeout.dump_stacks
    if getattr(dump, "kernelhub", False):
        return

    def dump_stacks(terminal: Any) -> None:
        dump(terminal)
        try:
            _dump_asyncio_tasks(terminal)
        except Exception as exc:  # a diagnostic: never let it hide the timeout itself
            terminal.write(f"(could not list the asyncio tasks: {exc!r})\n")

    dump_stacks.kernelhub = True  # type: ignore[attr-defined]
    pytest_timeout.dump_stacks = dump_stacks


@pytest.fixture(scope="session")
def gateway() -> Iterator[Gateway]:
    """The run's one shared test gateway, started on first use and stopped at the end of the run. Registered by
    ``pytest_plugins = ["kernelhub.testing"]`` in ``tests/conftest.py``; a test module must not import it
    (pytest would register, and start, one per importing module)."""
    gw = Gateway()
    try:
        yield gw
    finally:
        gw.stop()
