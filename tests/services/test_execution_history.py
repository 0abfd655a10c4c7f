"""MemoryExecutionHistory (kernelhub.services.executions): every unfinished execution, and per tenant the most
recent finished ones within a count and a byte bound; a sandbox's executions go with it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from kernelhub.errors import NotFound
from kernelhub.services.executions import (
    MEMORY_FINISHED,
    Execution,
    ExecutionHistory,
    MemoryExecutionHistory,
    StoreExecutionHistory,
)
from kernelhub.services.store import SandboxRow, Store


def new(tenant: str = "t", sandbox_id: str = "sb", code: str = "x = 1") -> Execution:
    return Execution(tenant=tenant, sandbox_id=sandbox_id, session_id="se", code=code, timeout_s=10,
                     output_limit=1000)


def kept(history: ExecutionHistory, executions: list[Execution]) -> list[int]:
    out = []
    for i, ex in enumerate(executions):
        try:
            assert history.get(ex.tenant, ex.id) is ex
            out.append(i)
        except NotFound:
            pass
    return out


async def finish(history: ExecutionHistory, ex: Execution, status: str = "ok") -> None:
    """What the executor does when an execution ends."""
    await ex.finish(status)
    history.finished(ex)


def test_keeps_every_unfinished_and_the_last_finished() -> None:
    async def scenario() -> None:
        history = MemoryExecutionHistory(count=3)
        made = [new() for _ in range(6)]
        for ex in made:
            history.add(ex)
        assert kept(history, made) == [0, 1, 2, 3, 4, 5]  # none finished: all kept, whatever the count
        for i in (1, 2, 4, 5):  # 0 and 3 still run
            await finish(history, made[i])
        # Four finished, three may stay: the first to finish (1) goes; the unfinished 0 and 3 stay.
        assert kept(history, made) == [0, 2, 3, 4, 5]
        await finish(history, made[0], "error")
        # 0 finished last, so it is the newest: 2 goes.
        assert kept(history, made) == [0, 3, 4, 5]
        assert history.usage("t")[0] == 3

    asyncio.run(scenario())


def test_a_long_run_keeps_the_history_at_its_count() -> None:
    async def scenario() -> None:
        history = MemoryExecutionHistory(count=50)
        made = []
        for _ in range(500):
            ex = new()
            history.add(ex)
            made.append(ex)
            await finish(history, ex)
        assert kept(history, made) == list(range(450, 500))
        assert history.usage("t")[0] == 50

    asyncio.run(scenario())


def test_the_byte_bound_drops_the_oldest_but_keeps_the_newest() -> None:
    async def scenario() -> None:
        history = MemoryExecutionHistory(count=1000, max_bytes=1000)
        made = [new(code="x" * 300) for _ in range(5)]
        for ex in made:
            history.add(ex)
            await finish(history, ex)
        assert kept(history, made) == [2, 3, 4]  # 3 x 300 bytes fit in 1000, 4 do not
        assert history.usage("t") == (3, sum(ex.stored_bytes for ex in made[2:]))
        huge = new(code="y" * 5000)
        history.add(huge)
        await finish(history, huge)
        assert kept(history, [*made, huge]) == [5]  # over the bound alone, and still kept: it is the newest

    asyncio.run(scenario())


def test_one_tenant_never_pushes_out_another() -> None:
    async def scenario() -> None:
        history = MemoryExecutionHistory(count=2)
        alice = [new("alice") for _ in range(2)]
        bob = [new("bob") for _ in range(10)]
        for ex in [*alice, *bob]:
            history.add(ex)
            await finish(history, ex)
        assert kept(history, alice) == [0, 1] and kept(history, bob) == [8, 9]
        try:
            history.get("bob", alice[0].id)
        except NotFound:
            pass
        else:
            raise AssertionError("a tenant read another's execution")

    asyncio.run(scenario())


def test_a_deleted_sandbox_takes_its_executions_with_it() -> None:
    async def scenario() -> None:
        history = MemoryExecutionHistory(count=10)
        gone = [new(sandbox_id="sb1") for _ in range(3)]
        stays = [new(sandbox_id="sb2") for _ in range(2)]
        for ex in [*gone, *stays]:
            history.add(ex)
        await finish(history, gone[0])
        assert history.for_sandbox("sb1") == gone
        history.forget_sandbox("sb1")
        assert kept(history, gone) == [] and kept(history, stays) == [0, 1]
        assert history.for_sandbox("sb1") == [] and history.usage("t") == (0, 0)

    asyncio.run(scenario())


def test_with_the_store_finished_executions_live_on_disk_and_memory_keeps_a_few(tmp_path: Any) -> None:
    """Issue 10: finished executions' outputs are kept on disk rather than in the gateway's memory; memory
    keeps each tenant's last MEMORY_FINISHED, and execution_status reads the rest from the store."""
    async def scenario() -> None:
        store = await Store.open(tmp_path, history_count=1000)
        history = StoreExecutionHistory(count=1000)
        history.store = store
        await store.put_sandbox(SandboxRow("sb", "t", "python", {"output_mb": 10.0}, time.time(), time.time() + 60))
        try:
            made = []
            for i in range(MEMORY_FINISHED + 20):
                ex = new(code=f"print({i})")
                history.add(ex)
                await history.stored(ex)
                await ex.emit({"type": "stdout", "text": f"{i}\n"})
                await finish(history, ex)
                made.append(ex)
            in_memory = kept(history, made)
            assert in_memory == list(range(20, MEMORY_FINISHED + 20))  # the newest few, no more
            assert history.usage("t")[0] == MEMORY_FINISHED
            oldest = await history.read("t", made[0].id)  # from disk, outputs included
            assert oldest["status"] == "ok" and oldest["stdout"] == "0\n", oldest
            with pytest.raises(NotFound):
                await history.read("other-tenant", made[0].id)
        finally:
            await store.close()

    asyncio.run(scenario())
