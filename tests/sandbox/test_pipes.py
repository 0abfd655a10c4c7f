"""Host-side pipes (kernelhub.sandbox.pipes): log lines bounded and flushed at end of file; a command in a real
sandbox with its output streamed, its stdin written and closed, and its whole process tree, in a cgroup of its
own, signalled and killed."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import pytest

from kernelhub.errors import Conflict
from kernelhub.sandbox.cgroups.base import poll_until
from kernelhub.sandbox.pipes import MAX_LINE_BYTES, PipedProcess, pump_lines, start_piped


def test_pump_lines_splits_bounds_and_flushes_at_eof() -> None:
    async def main() -> list[str]:
        lines: list[str] = []
        r, w = os.pipe2(os.O_CLOEXEC)
        done = asyncio.Event()

        def emit(line: str) -> None:
            lines.append(line)
            if line == "last, without a newline":
                done.set()

        pump_lines(r, emit)
        os.write(w, b"one\ntw")
        os.write(w, b"o\n" + b"x" * (MAX_LINE_BYTES + 10) + b"\n\xff\n" + b"y" * MAX_LINE_BYTES + b"\n")
        os.write(w, b"last, without a newline")
        os.close(w)
        await asyncio.wait_for(done.wait(), 10)
        with pytest.raises(OSError):
            os.fstat(r)  # closed at end of file
        return lines

    lines = asyncio.run(main())
    assert lines == ["one", "two", "x" * MAX_LINE_BYTES, "x" * 10, "\ufffd", "y" * MAX_LINE_BYTES,
                     "last, without a newline"]


async def _finished(piped: PipedProcess) -> int:
    return await asyncio.wait_for(piped.finished(), 60)


@pytest.mark.root
@pytest.mark.bwrap
@pytest.mark.cgroups
def test_start_piped_streams_output_takes_stdin_and_ends(factory: Any, runner: asyncio.Runner) -> None:
    sandbox = runner.run(factory.create())

    async def scenario() -> None:
        out: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        seen = asyncio.Event()

        def on_output(stream: str, data: bytes) -> None:
            out[stream] += data
            if b"ready" in out["stdout"]:
                seen.set()

        piped = await start_piped(sandbox, ["/bin/bash", "-c", "echo ready; tr a-z A-Z; echo oops >&2; exit 3"],
                                  env={}, cwd="/workspace", on_output=on_output, stdin=True)
        assert piped.pid > 1 and piped.tree is not None and piped.stdin_open
        await asyncio.wait_for(seen.wait(), 30)  # streamed while the process still runs
        assert piped.returncode is None
        await piped.write_stdin(b"fed through stdin\n" * 10_000)
        piped.close_stdin()
        with pytest.raises(Conflict):
            await piped.write_stdin(b"too late")
        assert await _finished(piped) == 3
        assert bytes(out["stdout"]) == b"ready\n" + b"FED THROUGH STDIN\n" * 10_000 and out["stderr"] == b"oops\n"
        piped.release()
        assert not piped.tree.exists()  # nothing left in it: its cgroup went

        # Without stdin the command reads end of file at once; a child left running keeps it from nothing.
        quiet: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        lingering = await start_piped(sandbox, ["/bin/bash", "-c", "cat; (sleep 100 &); echo parent done"], env={},
                                      cwd="/workspace", on_output=lambda s, d: quiet[s].extend(d), stdin=False)
        assert await _finished(lingering) == 0 and quiet["stdout"] == b"parent done\n"
        assert lingering.tree is not None and lingering.tree_size() == 1  # the sleep, still in the command's group
        lingering.release()
        assert lingering.tree.exists()  # kept while a process is in it
        await lingering.kill_tree()
        assert lingering.tree_size() == 0

    try:
        runner.run(scenario())
    finally:
        runner.run(sandbox.stop())


@pytest.mark.root
@pytest.mark.bwrap
@pytest.mark.cgroups
def test_kill_tree_reaches_processes_that_left_the_session(factory: Any, runner: asyncio.Runner,
                                                          sh: Any) -> None:
    """setsid, a double fork and an ignored SIGTERM: the command's cgroup still holds them all, so the tree
    signal reaches them and the kill leaves none."""
    sandbox = runner.run(factory.create())
    script = ("trap '' TERM; setsid bash -c 'trap \"\" TERM; exec sleep 1001' & "
              "(setsid sh -c 'sleep 1002 &' &); echo started; exec sleep 1003")

    async def scenario() -> None:
        started = asyncio.Event()
        piped = await start_piped(sandbox, ["/bin/bash", "-c", script], env={}, cwd="/workspace",
                                  on_output=lambda s, d: started.set(), stdin=False)
        await asyncio.wait_for(started.wait(), 30)
        assert piped.tree is not None
        assert await poll_until(lambda: piped.tree_size() == 3, asyncio.get_running_loop().time() + 10)
        code, ps = await sh(sandbox, "ps -eo sid,args")
        assert ps.count("sleep 100") == 3, ps
        # All three ignore SIGTERM (the trap's SIG_IGN is inherited through fork and exec): an ignored signal is
        # discarded when it is sent, so they are all still there.
        assert await piped.signal(signal.SIGTERM) == 3
        assert piped.tree_size() == 3
        await piped.kill_tree()
        assert piped.tree_size() == 0 and await asyncio.wait_for(piped.wait(), 10) == -signal.SIGKILL
        code, ps = await sh(sandbox, "ps -eo args")
        assert "sleep 100" not in ps, ps
        piped.release()
        assert not piped.tree.exists()

    try:
        runner.run(scenario())
    finally:
        runner.run(sandbox.stop())
