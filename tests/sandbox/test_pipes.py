"""Host-side pipes (kernelhub.sandbox.pipes): log lines bounded and flushed at end of file; a process in a real
sandbox run with its stdin fed, its stdout and stderr captured under one shared cap, and killed at its time
limit."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import pytest

from kernelhub.sandbox.pipes import MAX_LINE_BYTES, pump_lines, run_piped


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


@pytest.mark.root
@pytest.mark.bwrap
@pytest.mark.cgroups
def test_run_piped_feeds_captures_caps_and_kills(factory: Any, runner: asyncio.Runner) -> None:
    sandbox = runner.run(factory.create())

    def run(script: str, **kwargs: Any) -> Any:
        options = {"stdin": b"", "env": {}, "cwd": "/workspace", "timeout_s": 30, "output_limit": 1 << 20}
        return runner.run(run_piped(sandbox, ["/bin/bash", "-c", script], **{**options, **kwargs}))

    try:
        done = run("tr a-z A-Z; echo oops >&2; exit 3", stdin=b"fed through stdin\n" * 10_000)
        assert done.status == 3 and not done.truncated and not done.timed_out
        assert done.stdout == b"FED THROUGH STDIN\n" * 10_000 and done.stderr == b"oops\n"

        capped = run("head -c 3000 /dev/zero; head -c 3000 /dev/zero >&2", output_limit=4000)
        assert capped.truncated and len(capped.stdout) + len(capped.stderr) == 4000

        killed = run("echo started; exec sleep 100", timeout_s=0.5)
        assert killed.timed_out and killed.status == -signal.SIGKILL and killed.stdout == b"started\n"

        # A background child that keeps the pipes open does not keep the caller waiting.
        lingering = run("(sleep 100 &); echo parent done")
        assert lingering.status == 0 and lingering.stdout == b"parent done\n" and not lingering.timed_out
    finally:
        runner.run(sandbox.stop())
