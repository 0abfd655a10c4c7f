"""Execution (kernelhub/services/executions.py) on its own, fed the iopub messages a kernel sends: every listener
sees the same events in the same order with ``end`` last and an ``error`` event before an error's end, the
stored execution agrees with them, display updates replace their output (in this execution or an earlier
one), and the output cap fires once. The kernels' side of the same guarantees is in test_sessions.py."""

from __future__ import annotations

import asyncio
from typing import Any

from kernelhub.services.executions import Displays, Execution


def make(limit: int = 1 << 20) -> Execution:
    return Execution(tenant="t", sandbox_id="sb", session_id="se", code="", timeout_s=10, output_limit=limit)


def iopub(kind: str, **content: Any) -> dict[str, Any]:
    return {"msg_type": kind, "content": content}


class Recorder:
    """A listener that keeps what it got; with ``hold`` set, it is slow on ``stdout`` events (a client whose
    socket is full while the output streams) until ``hold`` fires, and quick on everything else."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.hold: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def __call__(self, event: dict[str, Any]) -> None:
        self.entered.set()
        if self.hold is not None and event["type"] == "stdout":
            await self.hold.wait()
        self.events.append(event)

    @property
    def kinds(self) -> list[str]:
        return [e["type"] for e in self.events]


def test_an_error_no_event_showed_is_sent_before_the_end() -> None:
    async def main() -> None:
        ex = make()
        first, second = Recorder(), Recorder()
        ex.add_listener(first)
        ex.add_listener(second)
        ex.mark_running()
        await ex.on_iopub(iopub("stream", name="stderr", text="Error: x\n    at <anonymous>\n"))
        # tslab publishes no error message; the session builds the error object from the reply.
        ex.error = {"name": "Error", "value": "x", "traceback": ["Error: x"]}
        await ex.finish("error")
        for rec in (first, second):
            assert rec.kinds == ["stderr", "error", "end"]
            assert {k: rec.events[1][k] for k in ("name", "value", "traceback")} == ex.error
            assert rec.events[-1]["execution"] == ex.to_dict()
        assert first.events == second.events

    asyncio.run(main())


def test_an_error_event_is_not_sent_twice() -> None:
    async def main() -> None:
        ex = make()
        rec = Recorder()
        ex.add_listener(rec)
        await ex.on_iopub(iopub("error", ename="ZeroDivisionError", evalue="division by zero", traceback=["tb"]))
        await ex.finish("error", None)
        assert rec.kinds == ["error", "end"]
        assert rec.events[-1]["execution"]["error"]["name"] == "ZeroDivisionError"

    asyncio.run(main())


def test_an_error_status_always_has_an_error_object() -> None:
    async def main() -> None:
        ex = make()
        rec = Recorder()
        ex.add_listener(rec)
        await ex.finish("error")
        error = rec.events[-1]["execution"]["error"]
        assert error["name"] and error["value"]
        assert rec.kinds == ["error", "end"]

    asyncio.run(main())


def test_the_end_waits_for_an_output_still_going_to_a_slow_listener() -> None:
    """The iopub reader is mid-way through sending an output (one listener is slow) when the session ends the
    execution: no listener gets the end before that output."""

    async def main() -> None:
        ex = make()
        fast, slow = Recorder(), Recorder()
        ex.add_listener(slow)
        ex.add_listener(fast)
        slow.hold = asyncio.Event()
        output = asyncio.ensure_future(ex.on_iopub(iopub("stream", name="stdout", text="last words\n")))
        await slow.entered.wait()  # the output is with the slow listener; the fast one has not got it yet
        ending = asyncio.ensure_future(ex.finish("ok"))
        await asyncio.sleep(0)
        assert not ending.done()
        slow.hold.set()
        await asyncio.gather(output, ending)
        assert slow.kinds == fast.kinds == ["stdout", "end"]
        assert fast.events[-1]["execution"]["stdout"] == "last words\n"

    asyncio.run(main())


def test_messages_after_the_end_are_dropped() -> None:
    async def main() -> None:
        ex = make()
        rec = Recorder()
        ex.add_listener(rec)
        await ex.on_iopub(iopub("stream", name="stdout", text="a\n"))
        await ex.finish("ok")
        await ex.on_iopub(iopub("stream", name="stdout", text="late\n"))
        await ex.on_iopub(iopub("display_data", data={"text/plain": "late"}, metadata={}))
        assert rec.kinds == ["stdout", "end"]
        assert ex.stdout == "a\n" and ex.results == []

    asyncio.run(main())


def test_results_carry_their_display_id_and_updates_replace_them() -> None:
    async def main() -> None:
        ex = make()
        ex.displays = Displays()
        rec = Recorder()
        ex.add_listener(rec)
        await ex.on_iopub(iopub("display_data", data={"text/plain": "'before'"}, metadata={},
                                transient={"display_id": "d1"}))
        await ex.on_iopub(iopub("display_data", data={"text/plain": "plain"}, metadata={}))
        await ex.on_iopub(iopub("update_display_data", data={"text/plain": "'after'"}, metadata={},
                                transient={"display_id": "d1"}))
        assert ex.results == [
            {"is_main_result": False, "data": {"text/plain": "'after'"}, "display_id": "d1"},
            {"is_main_result": False, "data": {"text/plain": "plain"}},
        ]
        assert rec.kinds == ["result", "result", "update"]
        assert rec.events[0]["display_id"] == "d1" and "display_id" not in rec.events[1]
        assert rec.events[2] == {"type": "update", "display_id": "d1", "data": {"text/plain": "'after'"},
                                 "execution_id": ex.id}

    asyncio.run(main())


def test_an_update_from_a_later_execution_replaces_the_earlier_output() -> None:
    async def main() -> None:
        displays = Displays()
        earlier, later = make(), make()
        earlier.displays = later.displays = displays
        await earlier.on_iopub(iopub("display_data", data={"text/plain": "0%"}, metadata={},
                                     transient={"display_id": "bar"}))
        await earlier.on_iopub(iopub("display_data", data={"text/plain": "0% again"}, metadata={},
                                     transient={"display_id": "bar"}))
        await earlier.finish("ok")
        rec = Recorder()
        later.add_listener(rec)
        await later.on_iopub(iopub("update_display_data", data={"text/plain": "100%"}, metadata={"m": 1},
                                   transient={"display_id": "bar"}))
        # Both outputs showing the id are replaced where they are, as in a notebook; the later execution only
        # streams the update.
        assert [r["data"] for r in earlier.results] == [{"text/plain": "100%"}] * 2
        assert all(r["metadata"] == {"m": 1} for r in earlier.results)
        assert later.results == []
        assert rec.kinds == ["update"] and rec.events[0]["metadata"] == {"m": 1}

    asyncio.run(main())


def test_an_update_of_an_unknown_display_stores_nothing() -> None:
    async def main() -> None:
        ex = make()
        ex.displays = Displays()
        rec = Recorder()
        ex.add_listener(rec)
        await ex.on_iopub(iopub("update_display_data", data={"text/plain": "x"}, metadata={},
                                transient={"display_id": "elsewhere"}))
        await ex.on_iopub(iopub("update_display_data", data={"text/plain": "x"}, metadata={}))  # no id: invalid
        assert ex.results == [] and rec.kinds == ["update"]

    asyncio.run(main())


def test_displays_forget_the_oldest_ids() -> None:
    displays = Displays(size=2)
    a, b = make(), make()
    displays.shown("one", a)
    displays.shown("two", b)
    displays.shown("one", a)  # seen again: the newest
    displays.shown("three", b)
    assert displays.owner("two") is None
    assert displays.owner("one") is a and displays.owner("three") is b


def test_the_output_cap_fires_once() -> None:
    async def main() -> None:
        ex = make(limit=10)
        rec = Recorder()
        ex.add_listener(rec)
        await ex.on_iopub(iopub("stream", name="stdout", text="12345678"))
        assert not ex.over_limit.is_set()
        await ex.on_iopub(iopub("stream", name="stdout", text="abcdef"))
        assert ex.over_limit.is_set() and ex.truncated and ex.reason == "output_truncated"
        await ex.on_iopub(iopub("stream", name="stdout", text="more"))
        await ex.on_iopub(iopub("display_data", data={"text/plain": "x" * 20}, metadata={}))
        assert ex.stdout == "12345678ab" and ex.results == []
        assert [e["text"] for e in rec.events] == ["12345678", "ab"]

    asyncio.run(main())


def test_long_output_is_kept_whole() -> None:
    async def main() -> None:
        ex = make()
        for i in range(1000):
            await ex.on_iopub(iopub("stream", name="stdout", text=f"{i}\n"))
            await ex.on_iopub(iopub("stream", name="stderr", text="e"))
        assert ex.stdout == "".join(f"{i}\n" for i in range(1000)) and ex.stderr == "e" * 1000
        assert ex.to_dict()["stdout"] == ex.stdout and ex.last_stderr == "e"

    asyncio.run(main())
