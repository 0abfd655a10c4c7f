"""The sandbox factory (kernelhub.sandbox.factory): reaping what a SIGKILLed process left behind (real
sandboxes, real cgroups, real mounts), and refusing a state directory sandbox uids cannot reach."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from kernelhub.errors import IsolationUnavailable
from kernelhub.sandbox.factory import SandboxFactory, _mem_available

CRASHER = """
import asyncio, os, sys
from kernelhub.sandbox.factory import SandboxFactory
async def main():
    sb = await SandboxFactory(state_dir=sys.argv[1]).create()
    devnull = os.open(os.devnull, os.O_RDWR)
    # A process that ignores its parent's death, as a real workload might.
    await sb.spawn(["/bin/sh", "-c", "trap '' HUP TERM; sleep 1000"], stdin=devnull, stdout=devnull,
                   stderr=devnull)
    print(sb.id, sb.uid, flush=True)
    await asyncio.sleep(1000)
asyncio.run(main())
"""


@pytest.mark.root
@pytest.mark.bwrap
@pytest.mark.cgroups
def test_reap_stale_removes_a_sandbox_left_by_a_sigkilled_process(
    factory: Any, runner: asyncio.Runner, leftovers_of: Any
) -> None:
    state = factory.state_dir
    with subprocess.Popen([sys.executable, "-c", CRASHER, state], stdout=subprocess.PIPE, text=True) as crasher:
        assert crasher.stdout is not None
        line = crasher.stdout.readline()
        crasher.send_signal(signal.SIGKILL)
    sandbox_id, uid_text = line.split()
    uid = int(uid_text)
    # What the dead process left: its directory, cgroups, the mounted workspace.
    left = leftovers_of(sandbox_id, uid, state)
    assert any(x.startswith("cgroup") for x in left) and any(x.startswith("mount") for x in left), left

    # A live sandbox of this process in the same state dir must survive the reaping.
    live = runner.run(factory.create())
    reaped = runner.run(factory.reap_stale())
    assert reaped == [sandbox_id]
    assert leftovers_of(sandbox_id, uid, state) == []
    assert uid not in factory.uids.held()
    assert live.state == "running" and (Path(state) / "sandboxes" / live.id).is_dir()
    # Reaping twice finds nothing more.
    assert runner.run(factory.reap_stale()) == []
    runner.run(live.stop())
    assert leftovers_of(live.id, live.uid, state) == []


@pytest.mark.root
def test_state_dir_under_an_untraversable_parent_is_refused(runner: asyncio.Runner) -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as closed:
        os.chmod(closed, 0o700)
        with pytest.raises(IsolationUnavailable):
            runner.run(SandboxFactory(state_dir=f"{closed}/state").create())


def test_memory_headroom_reads_memavailable(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   12000000 kB\n")
    assert _mem_available(str(meminfo)) == 12000000 * 1024
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\n")  # before Linux 3.14
    assert _mem_available(str(meminfo)) == 1000000 * 1024
    # Here: kernelhub's own cgroup folder has no memory limit, so the host's figure is the headroom.
    factory = SandboxFactory(state_dir=str(tmp_path))
    assert 0 < factory.memory_headroom() <= _mem_available() * 1.1
