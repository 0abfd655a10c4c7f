"""Plain jupyter_client (and nbclient) with kernelhub's installed kernelspecs: the provisioner makes a sandbox of
its own from ``KERNELHUB_*`` variables, runs the kernel in it, interrupts, restarts and shuts it down without
leaving anything behind."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from kernelhub.sandbox import provisioner

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups]


@pytest.fixture(scope="module")
def own_factory(state_dir: Path, kernels: Any, runner: asyncio.Runner, leftovers_of: Any) -> Iterator[list[Any]]:
    """Points the provisioner's default factory at the test state dir; yields a list the tests append the
    sandboxes they saw to, and proves at the end that none of them left anything."""
    seen: list[Any] = []
    provisioner._default_factory = None
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KERNELHUB_STATE_DIR", str(state_dir))
        yield seen
    made = provisioner._default_factory
    provisioner._default_factory = None
    if made is not None:
        assert str(made.state_dir) == str(state_dir)
        runner.run(made.stop_all())
        assert not made.uids.held()
    for sb in seen:
        assert leftovers_of(sb.id, sb.uid, state_dir) == [], sb.id


def sandbox_of(km: Any) -> Any:
    return km.provisioner.sandbox


CODE = {
    "kernelhub-python": ("import os\nprint(6 * 7, os.getuid(), os.getcwd())", "42 1000 /workspace\n"),
    "kernelhub-javascript": ("console.log(6 * 7, process.getuid(), process.cwd())", "42 1000 /workspace\n"),
    "kernelhub-typescript": ("const n: number = 6;\nconsole.log(n * 7, process.getuid(), process.cwd())",
                             "42 1000 /workspace\n"),
    "kernelhub-bash": ("echo $((6 * 7)) $(id -u) $PWD", "42 1000 /workspace\n"),
}


@pytest.mark.parametrize("name", list(CODE))
def test_each_language_runs_in_a_sandbox_of_its_own(name: str, own_factory: list[Any], kernels: Any,
                                                    runner: asyncio.Runner) -> None:
    code, expected = CODE[name]

    async def scenario() -> None:
        km, kc = await kernels.start(name)
        sb = sandbox_of(km)
        own_factory.append(sb)
        try:
            assert sb.state == "running" and km.provisioner.owns_sandbox
            assert str(sb.dir).startswith(os.environ["KERNELHUB_STATE_DIR"])
            reply, out = await kernels.execute(kc, code)
            assert reply["status"] == "ok", (reply, out)
            assert out == expected
            # A second execution in the same kernel sees the first one's state where the language keeps it.
            if name == "kernelhub-python":
                assert (await kernels.execute(kc, "print(os.getpid() > 1)"))[1] == "True\n"
        finally:
            await kernels.stop(km, kc)
        assert sb.state == "stopped"

    runner.run(scenario())


def pss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return sum(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))


def test_an_idle_python_sandbox_stays_small_and_leaves_the_debugger_out(own_factory: list[Any], kernels: Any,
                                                                        runner: asyncio.Runner) -> None:
    # ipykernel imports debugpy whenever it is there (7 MiB); the kernelspec says debugger: false, so the
    # launcher keeps it out, yet user code may still import it, and nothing of the agent's directory shadows
    # the user's modules.
    async def scenario() -> None:
        km, kc = await kernels.start("kernelhub-python")
        sb = sandbox_of(km)
        own_factory.append(sb)
        try:
            # The whole idle sandbox (bubblewrap, the agent, the kernel), measured as the benchmark does.
            total = sum(pss_bytes(pid) for pid in sb.cgroup.pids())
            assert total <= 36 * 1024 * 1024, total  # 33 MiB measured here; 36 is the target
            info = await kc.kernel_info(reply=True, timeout=30)
            assert "debugger" not in info["content"].get("supported_features", [])
            code = ("import sys\nprint('debugpy' in sys.modules, [p for p in sys.path if 'kernelhub-agent' in p])\n"
                    "import debugpy\nprint('debugpy' in sys.modules)\n"
                    "try:\n    import agent\nexcept ImportError:\n    print('no agent')")
            reply, out = await kernels.execute(kc, code)
            assert reply["status"] == "ok" and out == "False []\nTrue\nno agent\n", out
        finally:
            await kernels.stop(km, kc)

    runner.run(scenario())


def test_interrupt_stops_a_busy_loop_and_keeps_state(own_factory: list[Any], kernels: Any,
                                                     runner: asyncio.Runner) -> None:
    async def scenario() -> None:
        km, kc = await kernels.start("kernelhub-python")
        own_factory.append(sandbox_of(km))
        try:
            assert (await kernels.execute(kc, "x = 41"))[0]["status"] == "ok"
            busy = kc.execute("print('spinning', flush=True)\nwhile True: pass")
            # The interrupt must land inside the loop: once 'spinning' is out, the loop is next.
            seen = ""
            while "spinning" not in seen:
                msg = await kc.get_iopub_msg(timeout=30)
                if msg["parent_header"].get("msg_id") == busy and msg["msg_type"] == "stream":
                    seen += msg["content"]["text"]
            assert await km.is_alive()
            await km.interrupt_kernel()
            reply, rest = await kernels.collect(kc, busy, timeout=15)
            out = seen + rest
            assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt"
            assert out.startswith("spinning\n") and "KeyboardInterrupt" in out
            assert await km.is_alive()
            reply, out = await kernels.execute(kc, "print(x + 1)")
            assert (reply["status"], out) == ("ok", "42\n")
        finally:
            await kernels.stop(km, kc)

    runner.run(scenario())


def test_restart_clears_state_and_the_kernel_answers(own_factory: list[Any], kernels: Any,
                                                     runner: asyncio.Runner) -> None:
    async def scenario() -> None:
        km, kc = await kernels.start("kernelhub-python")
        sb = sandbox_of(km)
        own_factory.append(sb)
        try:
            await kernels.execute(kc, "y = 'before'; import os; pid = os.getpid()")
            first_pid = (await kernels.execute(kc, "print(pid)"))[1]
            await km.restart_kernel()
            kc.stop_channels()
            kc = km.client()
            kc.start_channels()
            await kc.wait_for_ready(timeout=60)
            reply, out = await kernels.execute(kc, "print(globals().get('y'), 'y' in dir())")
            assert (reply["status"], out) == ("ok", "None False\n")
            assert (await kernels.execute(kc, "import os; print(os.getpid())"))[1] != first_pid
            # The restart keeps the sandbox (and its workspace); only the kernel process is new.
            assert sandbox_of(km) is sb and sb.state == "running"
        finally:
            await kernels.stop(km, kc)

    runner.run(scenario())


def test_shutdown_leaves_nothing(own_factory: list[Any], kernels: Any, runner: asyncio.Runner,
                                 leftovers_of: Any) -> None:
    async def scenario() -> Any:
        km, kc = await kernels.start("kernelhub-python")
        sb = sandbox_of(km)
        own_factory.append(sb)
        # A grandchild that leaves the kernel's session and process group: the kernel's end must take it.
        code = ("import subprocess\n"
                "subprocess.Popen(['sleep', '1000'], start_new_session=True)\n"
                "open('/workspace/data', 'w').write('x')")
        assert (await kernels.execute(kc, code))[0]["status"] == "ok"
        assert sb.cgroup is not None and len(sb.cgroup.pids()) >= 5
        host_connection_file = km.connection_file
        assert os.path.exists(host_connection_file) and list(sb.run_dir.glob("k-*"))
        await kernels.stop(km, kc)
        assert not os.path.exists(host_connection_file)
        return sb

    sb = runner.run(scenario())
    assert sb.state == "stopped"
    assert leftovers_of(sb.id, sb.uid, sb.factory.state_dir) == []
    assert sb.uid not in sb.factory.uids.held() and not sb.factory.live()


def test_nbclient_runs_a_notebook_in_a_sandbox(own_factory: list[Any], kernels: Any,
                                                runner: asyncio.Runner) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("import numpy as np, pandas as pd\nframe = pd.DataFrame({'a': np.arange(4)})"),
        nbformat.v4.new_code_cell("print(frame.a.sum())"),
        nbformat.v4.new_code_cell("import os\nos.getuid(), os.getcwd()"),
        nbformat.v4.new_code_cell(
            "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
            "plt.plot([1, 2, 3])\nplt.savefig('/workspace/plot.png')\nos.path.getsize('/workspace/plot.png') > 0"
        ),
    ]
    client = NotebookClient(nb, kernel_name="kernelhub-python", timeout=60, startup_timeout=90)
    runner.run(client.async_execute())
    outputs = [cell.outputs for cell in nb.cells]
    assert outputs[0] == []
    assert outputs[1][0]["text"] == "6\n"
    assert outputs[2][0]["data"]["text/plain"] == "(1000, '/workspace')"
    assert outputs[3][-1]["data"]["text/plain"] == "True"
    made = provisioner._default_factory
    assert made is not None and not made.live()
    assert not list((Path(os.environ["KERNELHUB_STATE_DIR"]) / "sandboxes").iterdir())
