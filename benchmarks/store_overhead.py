"""What the durable store adds to the create and execute paths: the store against a no-op store, same calls.

Each path makes the calls the integration plan has it make (kernelhub/services/store.py, audit.py):

- **create**: ``put_sandbox`` and ``put_session`` awaited (the record is durable before the 201), an audit entry
  recorded without waiting;
- **execute**: ``start_execution`` awaited (the id is durable before it is announced), ``N`` output events posted
  (not awaited), ``finish_execution`` awaited (durable before the end event), an audit entry recorded;
- **execute, appends awaited**: the same with each append awaited, to show what posting them saves;
- **execute with a kernel**: the path as the integration plan has it, around a kernel simulated by
  ``asyncio.sleep`` of a python ``x=1`` round trip (3.1 ms, KERNELS.md): ``start_execution`` queued before the
  ``execute_request`` goes out and awaited only before the id is announced (its commit overlaps the kernel's
  work), outputs posted as they come, ``finish_execution`` awaited before the end event (and, to weigh that
  choice, not awaited).

The peer is :class:`NullStore`: the same interface, answering at once without a thread or a file. Both are
timed in the same run, interleaved, one client at a time (latency) and with 20 clients at once (like 20 kernels
executing in parallel: the writer batches their calls). Reported: wall time per operation and the event loop
thread's CPU time per operation (the store's SQL runs on its own thread; the loop is what every request shares).

Usage: ``.venv/bin/python benchmarks/store_overhead.py [ROUNDS]`` (no root needed).

``--gateway`` measures the same paths end to end instead, through two real gateways started side by side
(root needed): one with the store (the default) and one with ``--Hub.durable=False`` (memory only, no audit
log). Create: ``POST /v1/sandboxes`` (no warm pool: each create starts its sandbox and kernel) until its 201;
execute: ``POST /v1/sandboxes/{id}/execute`` of ``x = 1`` until its 200, back to back on one sandbox; each timed
interleaved between the two gateways, medians and their ratio printed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from kernelhub.services.audit import AuditLog
from kernelhub.services.store import SandboxRow, SessionRow, Store

T = TypeVar("T")
#: A python ``x=1`` round trip on this kind of machine (KERNELS.md).
KERNEL_ROUND_TRIP_S = 0.0031
LIMITS = {"memory_mb": 512, "cpu": 1.0, "pids": 128, "disk_mb": 1024, "files": 10000, "max_file_mb": 100,
          "execution_timeout_s": 300.0, "idle_timeout_s": 300.0, "max_lifetime_s": 86400.0, "output_mb": 10.0}


class NullStore(Store):
    """The store's interface doing nothing: every call answers at once."""

    def submit(self, fn: Callable[[sqlite3.Connection], T], *, transaction: bool = True) -> asyncio.Future[T]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    def post(self, fn: Callable[[sqlite3.Connection], Any]) -> None:
        pass

    def append_output(self, execution_id: str, event: Any) -> None:
        pass


class Bench:
    def __init__(self, store: Store, audit: AuditLog) -> None:
        self.store, self.audit, self.n = store, audit, 0

    def _id(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    async def create(self) -> None:
        now = time.time()
        sb = self._id("sb")
        await self.store.put_sandbox(SandboxRow(sb, "alice", "python", LIMITS, now, now + 86400,
                                                metadata={"job": "bench"}, state="running", uid=200000,
                                                sandbox_dir=f"/var/lib/kernelhub/sandboxes/{sb}",
                                                workspace_mode="loop"))
        await self.store.put_session(SessionRow(self._id("se"), sb, "jupyter", "python", "running", "k"))
        self.audit.record("alice", "k_0123456789abcdef", "sandbox_create", {"sandbox_id": sb}, 201)

    async def execute(self, appends: int, *, await_appends: bool = False) -> None:
        ex = self._id("ex")
        await self.store.start_execution(id=ex, tenant="alice", sandbox_id="sb1", session_id="se1",
                                         code="for i in range(10): print(i)", output_limit=10 * 1024 * 1024)
        self.store.update_execution(ex, status="running", started_at=time.time())
        for i in range(appends):
            self.store.append_output(ex, {"type": "stdout", "text": f"line {i} of the output\n"})
            if await_appends:
                await self.store.flush()
        self.store.append_output(ex, {"type": "result", "is_main_result": True, "data": {"text/plain": "42"}})
        await self.store.finish_execution(ex, "ok")
        self.audit.record("alice", "k_0123456789abcdef", "code_execute", {"sandbox_id": "sb1", "execution_id": ex},
                          200, code="for i in range(10): print(i)")


    async def execute_with_kernel(self, appends: int, *, await_finish: bool = True) -> None:
        ex = self._id("ex")
        started = self.store.start_execution(id=ex, tenant="alice", sandbox_id="sb1", session_id="se1",
                                             code="x=1", output_limit=10 * 1024 * 1024)
        await asyncio.sleep(KERNEL_ROUND_TRIP_S / 2)  # execute_request out, the kernel starts
        await started  # the id is durable: announce it
        self.store.update_execution(ex, status="running", started_at=time.time())
        for i in range(appends):
            self.store.append_output(ex, {"type": "stdout", "text": f"line {i} of the output\n"})
        await asyncio.sleep(KERNEL_ROUND_TRIP_S / 2)  # the kernel finishes
        finished = self.store.finish_execution(ex, "ok")
        if await_finish:  # durable before the end event goes out
            await finished
        self.audit.record("alice", "k_0123456789abcdef", "code_execute", {"sandbox_id": "sb1", "execution_id": ex},
                          200, code="x=1")


async def open_pair(kind: str, state: str) -> Bench:
    if kind == "store":
        store = await Store.open(state)
        audit = await AuditLog.open(store, state)
    else:
        store = NullStore(Path(state) / "null.db")  # never opened
        audit = AuditLog(store, b"0" * 32)
    bench = Bench(store, audit)
    now = time.time()
    await store.put_sandbox(SandboxRow("sb1", "alice", "python", LIMITS, now, now + 86400, state="running"))
    return bench


async def timed(bench: Bench, op: Callable[[], Awaitable[None]], count: int, clients: int) -> tuple[float, float]:
    """(wall µs per op, loop-thread CPU µs per op) for ``count`` ops by ``clients`` concurrent clients."""

    async def client(k: int) -> None:
        for _ in range(k):
            await op()

    each = count // clients
    await bench.store.flush()
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    await asyncio.gather(*(client(each) for _ in range(clients)))
    await bench.store.flush()  # what was posted is part of the cost
    wall, cpu = time.perf_counter() - wall0, time.thread_time() - cpu0
    done = each * clients
    return wall / done * 1e6, cpu / done * 1e6


async def restart_cost(state: str, sandboxes: int = 20, history: int = 1000) -> tuple[float, float]:
    """The store's share of a restart: (ms to open the file and read every running sandbox with its sessions,
    ms to end the executions the crash cut), on a file holding ``sandboxes`` sandboxes, each of its own tenant
    with ``history`` finished executions."""
    store = await Store.open(state)
    audit = await AuditLog.open(store, state)
    now = time.time()
    for n in range(sandboxes):
        await store.put_sandbox(SandboxRow(f"sb{n}", f"t{n}", "python", LIMITS, now, now + 86400, state="running"))
        await store.put_session(SessionRow(f"se{n}", f"sb{n}", "jupyter", "python", "running"))
        for i in range(history):
            store.start_execution(id=f"ex{n}-{i}", tenant=f"t{n}", sandbox_id=f"sb{n}", session_id=f"se{n}",
                                  code="x", output_limit=1000)
            store.append_output(f"ex{n}-{i}", {"type": "stdout", "text": "out\n"})
            if i < history - 1:
                store.finish_execution(f"ex{n}-{i}", "ok")
        await store.flush()
    await audit.close()
    await store.close()
    t0 = time.perf_counter()
    store = await Store.open(state)
    audit = await AuditLog.open(store, state)
    for row in await store.list_sandboxes(states=["running"]):
        await store.list_sessions(row.id)
    t1 = time.perf_counter()
    cut = await store.mark_cut_executions()
    t2 = time.perf_counter()
    assert len(cut) == sandboxes
    await audit.close()
    await store.close()
    return (t1 - t0) * 1000, (t2 - t1) * 1000


async def main(rounds: int) -> None:
    dirs = [tempfile.mkdtemp(prefix="kh-bench-store-") for _ in range(2)]
    store_bench = await open_pair("store", dirs[0])
    null_bench = await open_pair("null", dirs[1])
    cases: list[tuple[str, Callable[[Bench], Callable[[], Awaitable[None]]], int, int]] = [
        ("create (put sandbox + session, audit)", lambda b: b.create, 300, 1),
        ("execute, 10 outputs", lambda b: lambda: b.execute(10), 300, 1),
        ("execute, 100 outputs", lambda b: lambda: b.execute(100), 100, 1),
        ("execute, 10 outputs, appends awaited", lambda b: lambda: b.execute(10, await_appends=True), 100, 1),
        ("execute with a 3.1 ms kernel, 10 outputs", lambda b: lambda: b.execute_with_kernel(10), 200, 1),
        ("the same, finish not awaited", lambda b: lambda: b.execute_with_kernel(10, await_finish=False), 200, 1),
        ("create, 20 clients at once", lambda b: b.create, 400, 20),
        ("execute, 10 outputs, 20 clients at once", lambda b: lambda: b.execute(10), 400, 20),
        ("execute with a kernel, 20 clients at once", lambda b: lambda: b.execute_with_kernel(10), 400, 20),
    ]
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; {rounds} rounds, medians")
    print(f"{'path':44} {'store µs':>9} {'none µs':>8} {'ratio':>7} | {'loop CPU µs':>11} {'none':>6} "
          f"{'ratio':>6}")
    try:
        for name, make, count, clients in cases:
            samples: dict[str, list[tuple[float, float]]] = {"store": [], "null": []}
            for _ in range(rounds):  # interleaved, so machine noise hits both alike
                samples["store"].append(await timed(store_bench, make(store_bench), count, clients))
                samples["null"].append(await timed(null_bench, make(null_bench), count, clients))
            s_wall = statistics.median(w for w, _ in samples["store"])
            n_wall = statistics.median(w for w, _ in samples["null"])
            s_cpu = statistics.median(c for _, c in samples["store"])
            n_cpu = statistics.median(c for _, c in samples["null"])
            print(f"{name:44} {s_wall:9.1f} {n_wall:8.1f} {s_wall / n_wall:7.2f} | {s_cpu:11.1f} {n_cpu:6.1f} "
                  f"{s_cpu / n_cpu:6.1f}")
        stats = store_bench.store.stats
        print(f"\nwriter: {stats.ops} operations in {stats.batches} transactions "
              f"({stats.ops / max(stats.batches, 1):.1f} per commit), {stats.merged} stream appends merged")
        print("For scale (KERNELS.md, this kind of machine): a python `x=1` round trip is about 3100 µs, a "
              "kernel ready in about 310 000 µs.")
        restart = tempfile.mkdtemp(prefix="kh-bench-restart-")
        dirs.append(restart)
        read_ms, cut_ms = await restart_cost(restart)
        print(f"restart, the store's share (20 running sandboxes, 20 000 executions kept): open and read the "
              f"sandboxes {read_ms:.1f} ms, end the 20 cut executions {cut_ms:.1f} ms")
    finally:
        await store_bench.audit.close()
        await store_bench.store.close()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def gateway_paths(creates: int = 8, executes: int = 300) -> None:
    """The ``--gateway`` figures (module docstring)."""
    from kernelhub.testing import Gateway

    common = ["--pool-size", "0"]
    gateways = {"store": Gateway(extra_args=common), "off": Gateway(extra_args=[*common, "--Hub.durable=False"])}
    try:
        create: dict[str, list[float]] = {k: [] for k in gateways}
        for _ in range(creates):
            for kind, gw in gateways.items():
                t0 = time.perf_counter()
                status, sb = gw.request("POST", "/v1/sandboxes", {"template": "python"})
                create[kind].append(time.perf_counter() - t0)
                assert status == 201, sb
                gw.request("DELETE", f"/v1/sandboxes/{sb['id']}")
        execute: dict[str, list[float]] = {k: [] for k in gateways}
        sandboxes = {kind: gw.request("POST", "/v1/sandboxes", {"template": "python"})[1]["id"]
                     for kind, gw in gateways.items()}
        for _ in range(executes):
            for kind, gw in gateways.items():
                t0 = time.perf_counter()
                status, ex = gw.request("POST", f"/v1/sandboxes/{sandboxes[kind]}/execute", {"code": "x = 1"})
                execute[kind].append(time.perf_counter() - t0)
                assert status == 200 and ex["status"] == "ok", ex
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; two real gateways, no pool, "
              "medians")
        print(f"{'path':44} {'store ms':>9} {'off ms':>8} {'ratio':>7}")
        for name, samples in ((f"create ({creates} each)", create), (f"execute x = 1 ({executes} each)", execute)):
            on, off = statistics.median(samples["store"]) * 1000, statistics.median(samples["off"]) * 1000
            print(f"{name:44} {on:9.2f} {off:8.2f} {on / off:7.3f}")
    finally:
        for gw in gateways.values():
            gw.stop()


if __name__ == "__main__":
    if "--gateway" in sys.argv[1:]:
        gateway_paths()
    else:
        asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 5))
