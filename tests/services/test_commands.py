"""``command_execute`` (:mod:`kernelhub.services.commands`) against a real sandbox: every program of the kernels'
runtime starts inside one.

The runtime's installers write absolute host paths into what they install (pip's and jupyter's scripts begin
with ``#!<runtime>/python/bin/python3``); a sandbox that shows the runtime elsewhere answers
``cannot execute: required file not found`` for each of them.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernelhub.sandbox import bwrap
from kernelhub.sandbox.factory import SandboxFactory
from kernelhub.services.hub import Hub
from kernelhub.services.tenants import Tenant

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups]

TENANT = Tenant("commands")
#: What bash or the kernel's loader print when a program's interpreter is not there.
NOT_STARTED = re.compile(r"cannot execute|bad interpreter|required file not found|No such file or directory")


@pytest.fixture
def state_dir() -> Iterator[str]:
    state = tempfile.mkdtemp(prefix="kernelhub-commands-", dir="/tmp")
    os.chmod(state, 0o711)
    yield state
    shutil.rmtree(state, ignore_errors=True)


def runtime_programs(runtime_dir: Path) -> list[str]:
    """Every executable file of the runtime's bin directories, by the path PATH finds it at in a sandbox."""
    bin_dirs = {
        runtime_dir / "python" / "bin": f"{bwrap.INNER_RUNTIME}/python/bin",
        runtime_dir / "node" / "node_modules" / ".bin": "/node_modules/.bin",
    }
    found = []
    for host_dir, inner_dir in bin_dirs.items():
        for entry in sorted(host_dir.iterdir()):
            if entry.is_file() and os.access(entry, os.X_OK):
                found.append(f"{inner_dir}/{entry.name}")
    return found


def test_every_program_of_the_runtime_starts_in_a_sandbox(state_dir: str) -> None:
    factory = SandboxFactory(state_dir=state_dir)
    programs = runtime_programs(Path(factory.runtime_dir))
    # The six a user reaches for first, then everything the runtime's installers put on PATH.
    named = ["pip", "jupyter", "npm", "npx", "node", "tsc"]
    assert {f"{bwrap.INNER_RUNTIME}/python/bin/pip", "/node_modules/.bin/tsc"} <= set(programs), programs

    async def body() -> None:
        hub = Hub(factory)
        await hub.start()
        try:
            record = await hub.create_sandbox(TENANT, "python")
            for name in named:
                result = await hub.run_command(TENANT, record.id, f"{name} --version", timeout_s=60)
                assert result["exit_code"] == 0, (name, result)
                assert re.search(r"\d+\.\d+", result["stdout"]), (name, result)
            not_started = []
            for program in programs:
                # Whatever a program makes of --version (some refuse it), its interpreter must have run it.
                result = await hub.run_command(TENANT, record.id, f"{program} --version", timeout_s=60)
                output = result["stdout"] + result["stderr"]
                if result["exit_code"] in (126, 127) or NOT_STARTED.search(output):
                    not_started.append((program, result["exit_code"], output[:300]))
            assert not not_started, not_started
        finally:
            await hub.shutdown()

    asyncio.run(body())
