"""ExecutionHistory (kernelhub.services.executions): every unfinished execution and the last ``size`` finished."""

from __future__ import annotations

import asyncio

from kernelhub.errors import NotFound
from kernelhub.services.executions import Execution, ExecutionHistory


def new() -> Execution:
    return Execution(tenant="t", sandbox_id="sb", session_id="se", code="x = 1", timeout_s=10, output_limit=1000)


def kept(history: ExecutionHistory, executions: list[Execution]) -> list[int]:
    out = []
    for i, ex in enumerate(executions):
        try:
            history.get("t", ex.id)
            out.append(i)
        except NotFound:
            pass
    return out


def test_keeps_every_unfinished_and_the_last_finished() -> None:
    async def scenario() -> None:
        history = ExecutionHistory(size=3)
        made = [new() for _ in range(6)]
        for ex in made:
            history.add(ex)
        assert kept(history, made) == [0, 1, 2, 3, 4, 5]  # none finished: all kept, whatever the size
        for i in (1, 2, 4, 5):  # 0 and 3 still run
            await made[i].finish("ok")
        history.add(later := new())
        made.append(later)
        # Four finished, three may stay: the oldest finished (1) goes; the old unfinished one (0) stays.
        assert kept(history, made) == [0, 2, 3, 4, 5, 6]
        await made[0].finish("error")
        await made[6].finish("ok")
        history.add(last := new())
        made.append(last)
        # Finished now: 0, 2, 4, 5, 6; the three newest of them stay, with the unfinished 3 and 7.
        assert kept(history, made) == [3, 4, 5, 6, 7]

    asyncio.run(scenario())


def test_a_long_run_keeps_the_history_at_its_size() -> None:
    async def scenario() -> None:
        history = ExecutionHistory(size=50)
        made = []
        for _ in range(500):
            ex = new()
            history.add(ex)
            made.append(ex)
            await ex.finish("ok")
        history.add(new())
        assert kept(history, made) == list(range(450, 500))

    asyncio.run(scenario())
