"""The Jupyter API's kernels service (kernelhub/services/kernels.py) with real kernels: the restarter brings back
a kernel that died and tells its listeners around it, gives up past its limit, and says ``shutdown`` when the
kernel's sandbox goes."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernelhub.sandbox.factory import SandboxFactory
from kernelhub.services.hub import Hub
from kernelhub.services.kernels import AUTORESTART_LIMIT, POLL_INTERVAL_S
from kernelhub.services.tenants import Tenant

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups]

ALICE = Tenant("alice")


@pytest.fixture(scope="module")
def hub(runner: asyncio.Runner, state_dir: Path) -> Iterator[Hub]:
    made = Hub(SandboxFactory(state_dir=str(state_dir)))
    runner.run(made.start())
    yield made
    runner.run(made.shutdown())


def test_the_restarter_restarts_a_dead_kernel_then_gives_up(hub: Hub, runner: asyncio.Runner) -> None:
    async def main() -> None:
        events: list[tuple[str, str]] = []
        seen = asyncio.Queue[tuple[str, str]]()

        async def listener(kernel_id: str, event: str) -> None:
            events.append((kernel_id, event))
            await seen.put((kernel_id, event))

        hub.jupyter.add_listener(listener)
        hub.jupyter.poll_interval, hub.jupyter.restart_limit = 0.05, 1
        try:
            record, session = await hub.start_kernel(ALICE, "kernelhub-python")
        finally:
            hub.jupyter.poll_interval, hub.jupyter.restart_limit = POLL_INTERVAL_S, AUTORESTART_LIMIT
        kernel_id = session.kernel_id or ""
        await session.km.provisioner.process.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(seen.get(), 30) == (kernel_id, "restarting")
        assert await asyncio.wait_for(seen.get(), 60) == (kernel_id, "restarted")
        assert session.state == "running" and await session.km.is_alive()
        assert (await hub.execute(ALICE, record.id, "print('back')")).stdout == "back\n"
        # A second death within the window: past the limit of one, the kernel is left dead.
        await session.km.provisioner.process.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(seen.get(), 30) == (kernel_id, "dead")
        assert not await session.km.is_alive()
        await hub.shutdown_kernel(ALICE, kernel_id)
        assert await asyncio.wait_for(seen.get(), 30) == (kernel_id, "shutdown")
        assert [e for _, e in events] == ["restarting", "restarted", "dead", "shutdown"]

    runner.run(main())


def test_a_reaped_kernel_is_announced_shut_down(hub: Hub, runner: asyncio.Runner) -> None:
    async def main() -> None:
        seen = asyncio.Queue[tuple[str, str]]()

        async def listener(kernel_id: str, event: str) -> None:
            await seen.put((kernel_id, event))

        hub.jupyter.add_listener(listener)
        record, session = await hub.start_kernel(ALICE, "kernelhub-bash")
        await hub.delete_sandbox(ALICE, record.id)  # as the reaper or sandbox_delete would
        assert await asyncio.wait_for(seen.get(), 30) == (session.kernel_id, "shutdown")

    runner.run(main())
