"""Commands as processes (kernelhub.services.commands) on the hub in-process: background runs, re-attaching
within the output bound, stdin, signals, the deadline kill of a whole tree, the per-sandbox bounds, tenants.

Real sandboxes and real processes; the module's factory checks at the end that nothing was left behind (no
process, no cgroup: the commands' own cgroups included)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from kernelhub.errors import Conflict, InvalidRequest, NotFound, QuotaExceeded
from kernelhub.services.commands import Command, OutputBuffer, text_events
from kernelhub.services.hub import Hub
from kernelhub.services.tenants import Tenant

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups]

ALICE, BOB = Tenant("alice"), Tenant("bob")
BUFFER_KIB = 4
ENDED_KEPT = 3
GRACE_S = 0.5


@pytest.fixture(scope="module")
def hub(factory: Any, runner: asyncio.Runner) -> Iterator[Hub]:
    # Not durable: its shutdown must leave nothing (the leftovers check), where a durable hub keeps its sandboxes'
    # workspaces for the next start (tests/handlers/test_restart.py).
    made = Hub(factory, command_output_buffer_kib=BUFFER_KIB, ended_commands_kept=ENDED_KEPT,
               command_kill_grace_s=GRACE_S, durable=False)
    runner.run(made.start())
    yield made
    runner.run(made.shutdown())


@pytest.fixture(scope="module")
def sandbox_id(hub: Hub, runner: asyncio.Runner) -> str:
    # 64 pids: at most 16 commands at once (a quarter of them).
    return runner.run(hub.create_sandbox(ALICE, "python", limits={"pids": 64})).id


async def chunks(cmd: Command, *, replay: bool = True) -> list[tuple[str, Any]]:
    return [c async for c in cmd.follow(replay=replay)]


async def until_output(cmd: Command, text: bytes) -> None:
    async for kind, data in cmd.follow():
        if kind == "stdout" and text in data or kind == "end":
            return


async def processes(hub: Hub, sandbox_id: str) -> str:
    result = await hub.run_command(ALICE, sandbox_id, "ps -eo args")
    return str(result["stdout"])


def test_output_buffer_keeps_the_tail_and_says_what_it_dropped() -> None:
    buffer = OutputBuffer(10)
    buffer.append("stdout", b"0123")
    buffer.append("stderr", b"456")
    assert buffer.read(0) == (0, [("stdout", b"0123"), ("stderr", b"456")], 7)
    buffer.append("stdout", b"789abcdef")  # 16 written, the last 10 kept
    assert (buffer.start, buffer.end) == (6, 16)
    assert buffer.read(0) == (6, [("stderr", b"6"), ("stdout", b"789abcdef")], 16)
    assert buffer.read(7) == (0, [("stdout", b"789abcdef")], 16)
    assert buffer.read(12) == (0, [("stdout", b"cdef")], 16)
    assert buffer.read(16) == (0, [], 16)
    buffer.append("stdout", b"x" * 25)  # one chunk longer than the whole buffer
    assert buffer.read(16) == (15, [("stdout", b"x" * 10)], 41)


def test_background_command_streams_takes_stdin_and_replays_to_a_second_follower(hub: Hub, sandbox_id: str,
                                                                                 runner: asyncio.Runner) -> None:
    async def scenario() -> None:
        cmd = await hub.start_command(ALICE, sandbox_id, "echo ready; while read line; do echo got $line; done; "
                                      "echo bye >&2; exit 5", stdin_open=True, background=True)
        assert cmd.running and cmd.background and cmd.timeout_s is None and cmd.pid > 1
        await asyncio.wait_for(until_output(cmd, b"ready"), 30)
        assert [c.pid for c in hub.list_commands(ALICE, sandbox_id, ended=False)] == [cmd.pid]
        await hub.command_stdin(ALICE, sandbox_id, cmd.pid, "one\n")
        await hub.command_stdin(ALICE, sandbox_id, str(cmd.pid), b"two\n", eof=True)
        ended = await asyncio.wait_for(cmd.wait(), 30)
        assert ended.exit_code == 5 and ended.status == "exited" and ended.reason is None
        # A follower that comes later gets everything since the start, in order, and the end.
        got = await chunks(hub.get_command(ALICE, sandbox_id, cmd.pid))
        stdout = b"".join(d for k, d in got if k == "stdout")
        assert stdout == b"ready\ngot one\ngot two\n" and (("stderr", b"bye\n") in got) and got[-1] == ("end", None)
        events = [e async for e in text_events(cmd)]
        assert events[0]["type"] == "start" and events[-1]["type"] == "end"
        assert events[-1]["command"]["exit_code"] == 5 and events[-1]["command"]["status"] == "exited"
        with pytest.raises(Conflict):
            await hub.command_stdin(ALICE, sandbox_id, cmd.pid, "late\n")

    runner.run(scenario())


def test_reattach_past_the_bound_says_what_was_dropped_then_replays_the_tail(hub: Hub, sandbox_id: str,
                                                                          runner: asyncio.Runner) -> None:
    limit = BUFFER_KIB * 1024

    async def scenario() -> None:
        cmd = await hub.start_command(ALICE, sandbox_id, f"head -c {3 * limit} /dev/zero | tr '\\0' a; echo; "
                                      "echo marker; read x; echo after $x", stdin_open=True)
        await asyncio.wait_for(until_output(cmd, b"marker"), 30)
        follower = cmd.follow(replay=True)
        kind, dropped = await anext(follower)
        assert kind == "dropped" and dropped == cmd.output.end - limit
        kept = bytearray()
        while len(kept) < limit:
            kind, data = await anext(follower)
            kept += data
        assert len(kept) == limit and kept.endswith(b"\nmarker\n")
        # Then live: what the command writes after the re-attach arrives, and the end.
        await hub.command_stdin(ALICE, sandbox_id, cmd.pid, "now\n", eof=True)
        rest = [c async for c in follower]
        assert rest == [("stdout", b"after now\n"), ("end", None)]
        listed = hub.get_command(ALICE, sandbox_id, cmd.pid).to_dict()
        assert listed["dropped_bytes"] == cmd.output.end - limit and listed["output_bytes"] == cmd.output.end

    runner.run(scenario())


def test_deadline_kills_a_tree_that_ignores_sigterm_and_left_its_session(hub: Hub, sandbox_id: str,
                                                                         runner: asyncio.Runner) -> None:
    script = ("trap '' TERM; setsid bash -c 'trap \"\" TERM; exec sleep 2001' & (setsid sh -c 'sleep 2002 &' &); "
              "echo started; exec sleep 2003")

    async def scenario() -> None:
        cmd = await hub.start_command(ALICE, sandbox_id, script, timeout_s=3, background=True)
        await asyncio.wait_for(until_output(cmd, b"started"), 30)
        assert (await processes(hub, sandbox_id)).count("sleep 200") == 3
        loop = asyncio.get_running_loop()
        began = loop.time()
        ended = await asyncio.wait_for(cmd.wait(), 30)
        # SIGTERM at the deadline is ignored by all of them; SIGKILL follows after the grace.
        assert ended.reason == "timeout" and ended.exit_status == -signal.SIGKILL and ended.exit_code == 137
        assert loop.time() - began >= GRACE_S - 0.1
        assert "sleep 200" not in await processes(hub, sandbox_id)
        assert cmd.process is not None and cmd.process.tree_size() == 0

    runner.run(scenario())


def test_signals_kill_and_their_errors(hub: Hub, sandbox_id: str, runner: asyncio.Runner) -> None:
    async def scenario() -> None:
        cmd = await hub.start_command(ALICE, sandbox_id, "trap 'echo got term; exit 7' TERM; echo armed; "
                                      "while :; do sleep 0.05; done")
        await asyncio.wait_for(until_output(cmd, b"armed"), 30)
        assert await hub.signal_command(ALICE, sandbox_id, cmd.pid, "term") >= 1
        ended = await asyncio.wait_for(cmd.wait(), 30)
        assert ended.exit_code == 7 and b"got term" in b"".join(d for k, d in await chunks(cmd) if k == "stdout")
        with pytest.raises(Conflict):
            await hub.signal_command(ALICE, sandbox_id, cmd.pid, "SIGTERM")

        sleeper = await hub.start_command(ALICE, sandbox_id, "sleep 1000 & sleep 1001")
        killed = await hub.kill_command(ALICE, sandbox_id, sleeper.pid)
        assert killed.reason == "killed" and killed.exit_code == 137 and not killed.running
        assert "sleep 100" not in await processes(hub, sandbox_id)

        for bad in ("SIGWINCH", "nine", 9, None):
            with pytest.raises(InvalidRequest):
                await hub.signal_command(ALICE, sandbox_id, cmd.pid, bad)
        for pid in ("x", -1, 0, True):
            with pytest.raises(InvalidRequest):
                hub.get_command(ALICE, sandbox_id, pid)
        with pytest.raises(NotFound):
            hub.get_command(ALICE, sandbox_id, 1)  # bwrap's pid 1: a process, not a command
        with pytest.raises(InvalidRequest):
            await hub.start_command(ALICE, sandbox_id, "true", argv=["true"])
        with pytest.raises(InvalidRequest):
            await hub.start_command(ALICE, sandbox_id, argv=[])
        with pytest.raises(InvalidRequest):
            await hub.start_command(ALICE, sandbox_id, "true", background=False, timeout_s=10_000)

    runner.run(scenario())


def test_running_commands_are_capped_and_ended_ones_forgotten_oldest_first(hub: Hub, sandbox_id: str,
                                                                           runner: asyncio.Runner) -> None:
    async def scenario() -> None:
        record = hub.get_sandbox(ALICE, sandbox_id)
        cap = hub.commands.max_live(record)
        assert cap == 16  # a quarter of its 64 pids, and the default of 16
        sleepers = [await hub.start_command(ALICE, sandbox_id, "exec sleep 1000") for _ in range(cap)]
        with pytest.raises(QuotaExceeded):
            await hub.start_command(ALICE, sandbox_id, "true")
        with pytest.raises(QuotaExceeded):
            await hub.run_command(ALICE, sandbox_id, "true")  # the foreground counts too
        for cmd in sleepers:
            await hub.kill_command(ALICE, sandbox_id, cmd.pid)
        done = [await hub.run_command(ALICE, sandbox_id, f"echo {i}") for i in range(ENDED_KEPT + 2)]
        remembered = [c.pid for c in hub.list_commands(ALICE, sandbox_id)]
        assert remembered == [r["pid"] for r in done[-ENDED_KEPT:]]
        with pytest.raises(NotFound):
            hub.get_command(ALICE, sandbox_id, done[0]["pid"])

    runner.run(scenario())


def test_foreground_output_is_held_to_output_mb_and_its_cancel_kills_it(hub: Hub, runner: asyncio.Runner) -> None:
    async def scenario() -> None:
        record = await hub.create_sandbox(ALICE, "python", limits={"output_mb": 0.01})
        try:
            result = await hub.run_command(ALICE, record.id, "head -c 50000 /dev/zero | tr '\\0' a")
            assert result["truncated"] and result["reason"] == "output_truncated"
            assert len(result["stdout"]) == int(0.01 * 1024 * 1024)

            started: asyncio.Future[Command] = asyncio.get_running_loop().create_future()
            task = asyncio.ensure_future(hub.run_command(ALICE, record.id, "sleep 1000",
                                                         listener=started.set_result))
            cmd = await started
            task.cancel()
            ended = await asyncio.wait_for(cmd.wait(), 30)
            assert ended.reason == "cancelled" and ended.exit_code == 137
        finally:
            await hub.delete_sandbox(ALICE, record.id)

    runner.run(scenario())


def test_commands_belong_to_their_tenant_and_end_with_their_sandbox(hub: Hub, runner: asyncio.Runner) -> None:
    async def scenario() -> None:
        record = await hub.create_sandbox(ALICE, "python")
        cmd = await hub.start_command(ALICE, record.id, "exec sleep 1000")
        for call in (lambda: hub.get_command(BOB, record.id, cmd.pid), lambda: hub.list_commands(BOB, record.id)):
            with pytest.raises(NotFound):
                call()
        with pytest.raises(NotFound):
            await hub.kill_command(BOB, record.id, cmd.pid)
        with pytest.raises(NotFound):
            await hub.start_command(BOB, record.id, "true")
        await hub.delete_sandbox(ALICE, record.id)
        ended = await asyncio.wait_for(cmd.wait(), 30)
        assert ended.exit_status == -signal.SIGKILL and not ended.running
        with pytest.raises(NotFound):
            hub.get_command(ALICE, record.id, cmd.pid)

    runner.run(scenario())
