"""The service layer in-process: limits end in their machine-readable reasons, reaping, tenants, sessions.

Real sandboxes (bubblewrap, cgroups, loop workspaces) and real kernels; no HTTP here (the handlers' tests
drive the same methods through the gateway).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from kernelhub.errors import Conflict, InvalidRequest, KernelHubError, NotFound, QuotaExceeded
from kernelhub.sandbox.factory import SandboxFactory
from kernelhub.services.hub import Hub
from kernelhub.services.tenants import Tenant, TenantRegistry

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups]

ALICE, BOB = Tenant("alice"), Tenant("bob")


@pytest.fixture
def run() -> Iterator[Callable[[Callable[[Hub], Awaitable[Any]]], Any]]:
    """Run a coroutine against a fresh hub in its own state dir; always shuts the hub down."""
    state = tempfile.mkdtemp(prefix="kernelhub-hub-", dir="/tmp")
    os.chmod(state, 0o711)

    def runner(body: Callable[[Hub], Awaitable[Any]], **hub_kwargs: Any) -> Any:
        async def main() -> Any:
            hub = Hub(SandboxFactory(state_dir=state), **hub_kwargs)
            await hub.start()
            try:
                return await body(hub)
            finally:
                await hub.shutdown()

        return asyncio.run(main())

    yield runner
    shutil.rmtree(state, ignore_errors=True)


def test_execution_shapes_and_reasons(run: Any) -> None:
    async def body(hub: Hub) -> None:
        rec = await hub.create_sandbox(ALICE, "python", limits={"memory_mb": 192, "max_file_mb": 8,
                                                                "output_mb": 0.01})
        ex = await hub.execute(ALICE, rec.id, "print('hi')\n6*7")
        d = ex.to_dict()
        assert d["status"] == "ok" and d["stdout"] == "hi\n"
        assert d["results"] == [{"is_main_result": True, "data": {"text/plain": "42"}}]
        assert d["started_at"].endswith("Z") and d["duration_ms"] >= 0 and d["execution_count"] == 1

        ex = await hub.execute(ALICE, rec.id, "kept = 11\n1/0")
        assert ex.status == "error" and ex.error and ex.error["name"] == "ZeroDivisionError"

        # Timeout: interrupted, status timeout, the kernel keeps its state.
        started = time.monotonic()
        ex = await hub.execute(ALICE, rec.id, "while True: pass", timeout_s=1)
        assert (ex.status, ex.reason) == ("timeout", "timeout")
        assert time.monotonic() - started < 10
        ex = await hub.execute(ALICE, rec.id, "print(kept)")
        assert ex.stdout == "11\n"

        # Output cap: ~10 kB.
        ex = await hub.execute(ALICE, rec.id, "for i in range(5000): print('x' * 20)")
        assert ex.truncated and ex.reason == "output_truncated" and len(ex.stdout) <= 10486

        # A file over max_file_mb fails with EFBIG: reason disk.
        ex = await hub.execute(ALICE, rec.id, "open('big', 'wb').write(b'x' * (9 * 1024 * 1024))")
        assert (ex.status, ex.reason) == ("error", "disk")

        # Memory: the kernel is OOM-killed, the reason says so, and the session carries on.
        ex = await hub.execute(ALICE, rec.id, "a = bytearray(400 * 1024 * 1024)")
        assert (ex.status, ex.reason) == ("killed", "oom")
        ex = await hub.execute(ALICE, rec.id, "print('alive')")
        assert ex.stdout == "alive\n"
        assert hub.sandbox_metrics(ALICE, rec.id)["oom_kills"] >= 1

        # REST callers have no input handler: input() is a clear error, not a hang.
        ex = await hub.execute(ALICE, rec.id, "input('name? ')", timeout_s=20)
        assert ex.status == "error" and ex.error and "StdinNotImplementedError" in ex.error["name"]

        # env holds for one execution only.
        ex = await hub.execute(ALICE, rec.id, "import os\nprint(os.environ.get('KH_X'))", env={"KH_X": "1"})
        assert ex.stdout == "1\n"
        ex = await hub.execute(ALICE, rec.id, "print(os.environ.get('KH_X'))")
        assert ex.stdout == "None\n"

    run(body)


def test_pids_and_disk_reasons(run: Any) -> None:
    async def body(hub: Hub) -> None:
        rec = await hub.create_sandbox(ALICE, "python", limits={"pids": 40, "disk_mb": 16})
        ex = await hub.execute(ALICE, rec.id, "import subprocess\nps = []\n"
                               "for _ in range(100): ps.append(subprocess.Popen(['sleep', '30']))", timeout_s=30)
        assert (ex.status, ex.reason) == ("error", "pids")
        metrics = hub.sandbox_metrics(ALICE, rec.id)
        assert metrics["pids"] <= 40
        # While the sandbox is at its limit, a command is refused with reason pids rather than hanging.
        with pytest.raises(KernelHubError) as refused:
            await hub.run_command(ALICE, rec.id, "true")
        assert refused.value.error == "pids" and refused.value.status == 429
        ex = await hub.execute(ALICE, rec.id, "for p in ps: p.kill(); p.wait()")
        assert ex.status == "ok"
        # The workspace quota: writing past disk_mb fails with ENOSPC.
        ex = await hub.execute(ALICE, rec.id, "f = open('/workspace/fill', 'wb')\n"
                               "for _ in range(64): f.write(b'x' * 1024 * 1024)\nf.close()")
        assert (ex.status, ex.reason) == ("error", "disk")
        result = await hub.run_command(ALICE, rec.id, "df -k /workspace | tail -1")
        assert result["exit_code"] == 0

    run(body)


def test_sessions_commands_and_languages(run: Any) -> None:
    async def body(hub: Hub) -> None:
        rec = await hub.create_sandbox(ALICE, "python")
        # A second language in the same sandbox shares /workspace.
        await hub.execute(ALICE, rec.id, "open('/workspace/shared.txt', 'w').write('from python')")
        ex = await hub.execute(ALICE, rec.id, "cat /workspace/shared.txt", language="bash")
        assert ex.status == "ok" and "from python" in ex.stdout
        ex = await hub.execute(ALICE, rec.id, "const n: number = 21; console.log(n * 2)", language="typescript")
        assert ex.status == "ok" and ex.stdout.strip() == "42"
        kinds = sorted(s["language"] for s in rec.to_dict()["sessions"])
        assert kinds == ["bash", "python", "typescript"]

        result = await hub.run_command(ALICE, rec.id, "cat; echo err >&2; exit 7", stdin="in")
        assert result["exit_code"] == 7 and result["stdout"] == "in" and result["stderr"] == "err\n"
        result = await hub.run_command(ALICE, rec.id, "sleep 30", timeout_s=1)
        assert result["reason"] == "timeout" and result["duration_ms"] < 5000
        result = await hub.run_command(ALICE, rec.id, "pwd; id -u")
        assert result["stdout"] == "/workspace\n1000\n"

        session = await hub.create_session(ALICE, rec.id, "jupyter", "python")
        ex = await hub.session_execute(ALICE, session.id, "y = 3\nprint(y)")
        assert ex.stdout == "3\n"
        await hub.close_session(ALICE, session.id)
        with pytest.raises(NotFound):
            hub.get_session(ALICE, session.id)

    run(body)


def test_tenants_caps_and_bad_input(run: Any) -> None:
    async def body(hub: Hub) -> None:
        rec = await hub.create_sandbox(ALICE, "bash")
        with pytest.raises(NotFound):
            hub.get_sandbox(BOB, rec.id)
        with pytest.raises(NotFound):
            await hub.execute(BOB, rec.id, "echo hi")
        with pytest.raises(NotFound):
            await hub.delete_sandbox(BOB, rec.id)
        assert hub.list_sandboxes(BOB) == []
        ex = await hub.execute(ALICE, rec.id, "echo hi")
        with pytest.raises(NotFound):
            hub.get_execution(BOB, ex.id)
        # Concurrent creates cannot race past the cap of 2 (one live already).
        results = await asyncio.gather(*(hub.create_sandbox(ALICE, "bash") for _ in range(3)),
                                       return_exceptions=True)
        assert sum(isinstance(r, QuotaExceeded) for r in results) == 2
        for bad in ({"memory_mb": -1}, {"memory_mb": 10**9}, {"nope": 1}, {"cpu": "lots"}):
            with pytest.raises(InvalidRequest):
                await hub.create_sandbox(BOB, "python", limits=bad)
        with pytest.raises(InvalidRequest):
            await hub.create_sandbox(BOB, "cobol")
        with pytest.raises(InvalidRequest):
            await hub.create_sandbox(BOB, "python", env={"LD_PRELOAD": "/x.so"})
        with pytest.raises(InvalidRequest):
            await hub.execute(ALICE, rec.id, "echo", timeout_s=10**6)
        await hub.delete_sandbox(ALICE, rec.id)
        with pytest.raises(NotFound):
            hub.get_sandbox(ALICE, rec.id)
        assert not os.path.exists(f"/sys/fs/cgroup/memory/kernelhub/{rec.id}")

    run(body, max_sandboxes_per_tenant=2)


def test_idle_and_lifetime_reaping(run: Any) -> None:
    async def body(hub: Hub) -> None:
        idle = await hub.create_sandbox(ALICE, "bash", limits={"idle_timeout_s": 2})
        old = await hub.create_sandbox(ALICE, "bash", limits={"max_lifetime_s": 3, "idle_timeout_s": 60})
        # A long execution is activity: the idle sandbox is not reaped while it runs.
        busy = await hub.create_sandbox(ALICE, "python", limits={"idle_timeout_s": 2})
        ex = await hub.execute(ALICE, busy.id, "import time; time.sleep(4)")
        assert ex.status == "ok"
        await asyncio.sleep(4)
        assert (idle.state, idle.reason) == ("stopped", "idle")
        assert (old.state, old.reason) == ("stopped", "lifetime")
        info = hub.get_sandbox(ALICE, idle.id).to_dict()
        assert info["state"] == "stopped" and info["reason"] == "idle"
        with pytest.raises(Conflict):
            await hub.execute(ALICE, idle.id, "echo hi")
        assert not os.path.exists(f"/sys/fs/cgroup/memory/kernelhub/{idle.id}")

    run(body, reap_interval=0.2)


def test_tenant_registry_keys() -> None:
    reg = TenantRegistry({"k1": "alice", "k2": "bob"})
    assert reg.authenticate("k1") == ALICE and reg.authenticate("k2") == BOB
    for bad in (None, "", "k3", "k1 "):
        with pytest.raises(Exception, match="key"):
            reg.authenticate(bad)
