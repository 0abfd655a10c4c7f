"""The service layer in-process: limits end in their machine-readable reasons, reaping, tenants, sessions.

Real sandboxes (bubblewrap, cgroups, loop workspaces) and real kernels; no HTTP here (the handlers' tests
drive the same methods through the gateway).
"""

from __future__ import annotations

import asyncio
import contextlib
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


def _provisioner(hub: Hub) -> Any:
    """What makes sandboxes (its ``_provision``, the one place a sandbox comes from): the hub itself, or the
    sandboxes service of a hub split by concern."""
    return getattr(hub, "sandboxes", hub)


def test_sandbox_cap_is_exact_under_concurrency(run: Any) -> None:
    """Issue 7 item 9: creates that overlap are counted once each, whatever stage each is in (reserved,
    provisioning, kernel starting, running): exactly as many as there are free places are admitted, and a
    create that fails or is cancelled gives its place back."""
    cap = 4

    def live(hub: Hub) -> list[Any]:
        return [r for r in hub.list_sandboxes(ALICE) if r.state in ("starting", "running")]

    def admitted(results: list[Any], room: int) -> list[Any]:
        """The sandboxes made by creates sent while ``room`` places were free: exactly ``min(count, room)`` were
        admitted (made, or failed after admission: a kernel that did not start on a loaded machine is not the
        cap's doing), every other one is a 429 with a sentence."""
        expected = min(len(results), room)
        refused = [r for r in results if isinstance(r, QuotaExceeded)]
        failed = [r for r in results if isinstance(r, BaseException) and not isinstance(r, QuotaExceeded)]
        made = [r for r in results if not isinstance(r, BaseException)]
        assert all(isinstance(f, KernelHubError) for f in failed), failed
        assert (len(made) + len(failed), len(refused)) == (expected, len(results) - expected), results
        assert all(e.status == 429 and e.message.endswith(".") and f"{cap} live" in e.message for e in refused)
        return made

    async def wave(hub: Hub, count: int) -> list[Any]:
        room = cap - len(live(hub))
        results = await asyncio.gather(*(hub.create_sandbox(ALICE, "python") for _ in range(count)),
                                       return_exceptions=True)
        return admitted(results, room)

    async def staggered(hub: Hub, count: int) -> list[Any]:
        """``count`` creates, each sent once the one before it is starting its kernel (its record exists and
        it still holds its reservation): the overlap that counted a sandbox twice (17 of 20 in the issue)."""
        room = cap - len(live(hub))
        owner = _provisioner(hub)
        provision = owner._provision
        provisioned: asyncio.Queue[str] = asyncio.Queue()

        async def signalling(*args: Any, **kwargs: Any) -> Any:
            made = await provision(*args, **kwargs)  # (sandbox, the pooled session or None)
            provisioned.put_nowait(made[0].id)  # the caller goes on to the record and the kernel at once
            return made

        owner._provision = signalling
        tasks = []
        try:
            for _ in range(count):
                task = asyncio.ensure_future(hub.create_sandbox(ALICE, "python"))
                tasks.append(task)
                got = asyncio.ensure_future(provisioned.get())
                await asyncio.wait([task, got], return_when=asyncio.FIRST_COMPLETED)
                got.cancel()
                if not task.done():
                    assert hub.get_sandbox(ALICE, got.result()).state == "starting"
            results = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            owner._provision = provision
        return admitted(results, room)

    async def leave_room(hub: Hub, room: int) -> None:
        while cap - len(live(hub)) > room:
            with contextlib.suppress(KernelHubError):
                await hub.create_sandbox(ALICE, "python")
        for record in live(hub)[: room - (cap - len(live(hub)))]:
            await hub.delete_sandbox(ALICE, record.id)

    async def body(hub: Hub) -> None:
        made = await staggered(hub, 6)
        assert all(r.state == "running" for r in made)
        for record in live(hub):
            await hub.delete_sandbox(ALICE, record.id)
        made = await wave(hub, 7)
        # Another tenant has a cap of its own.
        other = await hub.create_sandbox(BOB, "python")
        # After deleting two, exactly two more fit.
        for record in made[:2]:
            await hub.delete_sandbox(ALICE, record.id)
        await wave(hub, 5)

        # A create that fails while provisioning gives its place back.
        await leave_room(hub, 1)
        owner = _provisioner(hub)
        provision = owner._provision

        async def failing(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(0)
            raise KernelHubError("provisioning failed on purpose", status=503, error="unavailable")

        owner._provision = failing
        with pytest.raises(KernelHubError, match="on purpose"):
            await hub.create_sandbox(ALICE, "python")
        owner._provision = provision

        # So does one cancelled while provisioning (a client that went away).
        entered, hold = asyncio.Event(), asyncio.Event()

        async def held(*args: Any, **kwargs: Any) -> Any:
            entered.set()
            await hold.wait()
            return await provision(*args, **kwargs)

        owner._provision = held
        task = asyncio.ensure_future(hub.create_sandbox(ALICE, "python"))
        await entered.wait()
        with pytest.raises(QuotaExceeded):  # the held create has the last place meanwhile
            await hub.create_sandbox(ALICE, "python")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        owner._provision = provision
        await wave(hub, 3)
        assert len(live(hub)) <= cap
        await hub.delete_sandbox(BOB, other.id)

    run(body, max_sandboxes_per_tenant=cap)


def test_session_cap_is_exact_under_concurrency(run: Any) -> None:
    """16 sessions a sandbox, starting ones included: 20 terminals asked for at once beside the first
    kernel give 15 and 5 refusals; closing three makes room for exactly three."""

    async def body(hub: Hub) -> None:
        rec = await hub.create_sandbox(ALICE, "python")

        async def wave(count: int) -> tuple[list[Any], list[QuotaExceeded]]:
            results = await asyncio.gather(*(hub.create_session(ALICE, rec.id, "terminal") for _ in range(count)),
                                           return_exceptions=True)
            made = [r for r in results if not isinstance(r, BaseException)]
            refused = [r for r in results if isinstance(r, QuotaExceeded)]
            assert len(made) + len(refused) == count, results
            return made, refused

        made, refused = await wave(20)
        assert (len(made), len(refused)) == (15, 5) and len(rec.sessions) == 16
        assert all(e.status == 429 and "16 sessions" in e.message for e in refused)
        for session in made[:3]:
            await hub.close_session(ALICE, session.id)
        more, refused = await wave(5)
        assert (len(more), len(refused)) == (3, 2) and len(rec.sessions) == 16
        # Code in another language needs a new kernel, and there is no room for one.
        with pytest.raises(QuotaExceeded):
            await hub.execute(ALICE, rec.id, "echo hi", language="bash")
        await hub.delete_sandbox(ALICE, rec.id)

    run(body)
