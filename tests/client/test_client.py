"""The Python client, sync and async, against a real gateway: streaming callbacks, timeouts, typed errors,
files, commands, sessions, metrics and logs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kernelhub.client import (
    AsyncSandbox,
    CommandExitError,
    CommandHandle,
    ConflictError,
    Execution,
    ExecutionError,
    GatewayConnectionError,
    InvalidRequestError,
    KernelHubError,
    NotFoundError,
    Result,
    Sandbox,
    TerminalOutput,
    UnauthorizedError,
)
from kernelhub.testing import Gateway

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups]

STREAMED = "import sys, time\nfor i in range(4):\n    print(f'tick {i}', flush=True)\n    time.sleep(0.25)\n" \
           "print('oops', file=sys.stderr, flush=True)\n6 * 7"


@pytest.fixture(scope="module")
def sandbox(gateway: Gateway) -> Iterator[Sandbox]:
    with Sandbox.create("python", url=gateway.url, token=gateway.token) as sb:
        yield sb


# -- sync ---------------------------------------------------------------------------------------------------

def test_run_code_streams_callbacks_in_order(sandbox: Sandbox) -> None:
    stdout: list[tuple[float, str]] = []
    stderr: list[str] = []
    results: list[Result] = []
    execution = sandbox.run_code(STREAMED, on_stdout=lambda text: stdout.append((time.monotonic(), text)),
                                 on_stderr=stderr.append, on_result=results.append)
    assert isinstance(execution, Execution) and execution.status == "ok" and execution.ok
    assert [text for _, text in stdout] == [f"tick {i}\n" for i in range(4)]
    # Streamed as printed, not all at the end: the chunks arrived about 0.25 s apart.
    assert stdout[-1][0] - stdout[0][0] > 0.5
    assert stderr == ["oops\n"] and execution.stderr == "oops\n"
    assert execution.stdout == "".join(f"tick {i}\n" for i in range(4))
    assert [r.text for r in results] == ["42"] and execution.text == "42" and results[0].is_main_result
    assert execution.id and execution.id.startswith("ex") and execution.duration_ms is not None


def test_run_code_errors_and_rich_results(sandbox: Sandbox) -> None:
    errors: list[ExecutionError] = []
    execution = sandbox.run_code("def f():\n    raise ValueError('bad value')\nf()", on_error=errors.append)
    assert execution.status == "error" and execution.error is not None
    assert execution.error.name == "ValueError" and execution.error.value == "bad value"
    assert errors == [execution.error] and "ValueError" in execution.error.traceback_text
    assert "\x1b[" not in execution.error.traceback_text

    plotted = sandbox.run_code("import matplotlib.pyplot as plt\nplt.plot([1, 2]); plt.show()")
    assert any(r.png for r in plotted.results) and "image/png" in plotted.results[0].formats()
    html = sandbox.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2]})")
    assert html.main_result is not None and html.main_result.html and "<table" in html.main_result.html


def test_run_code_state_language_and_env(sandbox: Sandbox) -> None:
    sandbox.run_code("x = 20")
    assert sandbox.run_code("x + 1").text == "21"
    assert sandbox.run_code("import os; os.environ['GREETING']", env={"GREETING": "hello"}).text == "'hello'"
    node = sandbox.run_code("console.log([1, 2].map(x => x * 2).join(','))", language="node")
    assert node.status == "ok" and node.stdout == "2,4\n"


def test_run_code_timeout_ends_in_status_timeout(sandbox: Sandbox) -> None:
    started = time.monotonic()
    execution = sandbox.run_code("while True: pass", timeout=2)
    assert execution.status == "timeout" and execution.reason == "timeout"
    assert time.monotonic() - started < 20
    assert sandbox.run_code("1 + 1").text == "2"  # the kernel serves the next one


def test_files(sandbox: Sandbox) -> None:
    assert sandbox.files.write("docs/readme.txt", "héllo\n") == {"path": "docs/readme.txt", "size": 7}
    assert sandbox.files.read("docs/readme.txt") == "héllo\n"
    assert sandbox.files.read("/workspace/docs/readme.txt", format="bytes") == "héllo\n".encode()
    blob = bytes(range(256)) * 100
    sandbox.files.write("docs/blob.bin", blob)
    assert sandbox.files.read("docs/blob.bin", format="bytes") == blob
    entries = sandbox.files.list("docs")
    assert [(e["name"], e["type"], e["size"]) for e in entries] == [("blob.bin", "file", len(blob)),
                                                                    ("readme.txt", "file", 7)]
    assert any(e["name"] == "docs" and e["type"] == "dir" for e in sandbox.files.list())
    assert sandbox.run_code("open('docs/readme.txt', encoding='utf-8').read()").text == "'héllo\\n'"
    assert sandbox.files.exists("docs/blob.bin") and not sandbox.files.exists("docs/none")
    sandbox.files.remove("docs")
    assert not sandbox.files.exists("docs/readme.txt")
    with pytest.raises(NotFoundError):
        sandbox.files.read("docs/readme.txt")
    with pytest.raises((InvalidRequestError, NotFoundError)):
        sandbox.files.read("../../etc/passwd")
    with pytest.raises(ValueError):
        sandbox.files.read("x", format="yaml")


def test_commands(sandbox: Sandbox) -> None:
    result = sandbox.commands.run("echo $NAME; pwd; cat", env={"NAME": "kh"}, stdin="piped")
    assert result.ok and result.exit_code == 0 and result.stdout == "kh\n/workspace\npiped"
    sandbox.files.write("sub/x.txt", "x")
    assert sandbox.commands.run("ls", cwd="/workspace/sub").stdout == "x.txt\n"
    failed = sandbox.commands.run("echo nope >&2; exit 3")
    assert failed.exit_code == 3 and failed.stderr == "nope\n" and not failed.ok
    with pytest.raises(CommandExitError) as raised:
        sandbox.commands.run("exit 4", check=True)
    assert raised.value.result.exit_code == 4
    slow = sandbox.commands.run("sleep 30", timeout=1)
    assert slow.reason == "timeout"
    sandbox.files.remove("sub")


def test_background_commands(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("echo ready; read line; echo got $line; exit 6", background=True, stdin_open=True)
    assert isinstance(handle, CommandHandle) and handle.pid > 1 and handle.info["status"] == "running"
    assert handle.pid in [c["pid"] for c in sandbox.commands.list() if c["status"] == "running"]
    handle.send_stdin("there\n", eof=True)
    seen: list[str] = []
    result = handle.wait(on_stdout=seen.append)  # from the start: what it wrote before the wait is not lost
    assert "".join(seen) == "ready\ngot there\n" and result.stdout == "ready\ngot there\n"
    assert result.exit_code == 6 and not result.ok and handle.info["status"] == "exited"
    with pytest.raises(CommandExitError):
        sandbox.commands.connect(handle.pid).wait(check=True)

    server = sandbox.commands.run("trap 'echo bye; exit 0' TERM; echo up; while :; do sleep 0.05; done",
                                  background=True)
    again = sandbox.commands.connect(server.pid)
    deadline = time.monotonic() + 30
    while "up" not in again.refresh()["stdout"] and time.monotonic() < deadline:  # its trap is set
        time.sleep(0.05)
    assert again.pid == server.pid and again.info["status"] == "running"
    assert server.signal("SIGTERM") >= 1
    assert server.wait().stdout.endswith("bye\n")
    sleeper = sandbox.commands.run("exec sleep 1000", background=True)
    assert sleeper.kill() is True and sleeper.kill() is False
    assert sandbox.commands.kill(999999) is False
    streamed: list[str] = []
    ran = sandbox.commands.run("for i in 1 2; do echo $i; sleep 0.1; done", on_stdout=streamed.append)
    assert "".join(streamed) == "1\n2\n" and ran.stdout == "1\n2\n" and ran.exit_code == 0


def test_sessions(sandbox: Sandbox) -> None:
    session = sandbox.sessions.create("jupyter", "python")
    assert session["type"] == "jupyter" and session["sandbox_id"] == sandbox.id
    try:
        sandbox.sessions.execute(session["id"], "y = 5")
        answer = sandbox.sessions.execute(session["id"], "y * 2")
        assert isinstance(answer, Execution) and answer.text == "10"
        # A separate kernel: the sandbox's first one has no y.
        assert sandbox.run_code("'y' in globals()").text == "False"
        assert sandbox.run_code("y + 1", session_id=session["id"]).text == "6"
    finally:
        sandbox.sessions.close(session["id"])
    with pytest.raises(NotFoundError):
        sandbox.sessions.execute(session["id"], "1")

    terminal = sandbox.sessions.create("terminal")
    try:
        out = sandbox.sessions.execute(terminal["id"], "echo term-$((6*7))\n", timeout=2)
        assert isinstance(out, TerminalOutput) and "term-42" in out.output
    finally:
        sandbox.sessions.close(terminal["id"])


def test_info_metrics_logs_and_listing(sandbox: Sandbox, gateway: Gateway) -> None:
    info = sandbox.info()
    assert info["id"] == sandbox.id == sandbox.sandbox_id and info["state"] == "running"
    assert sandbox.is_running() and sandbox.template == "python"
    metrics = sandbox.metrics()
    assert metrics["memory_limit_bytes"] == 512 * 1024 * 1024 and metrics["memory_bytes"] > 0
    assert isinstance(sandbox.logs(10), list) and len(sandbox.logs(3)) <= 3
    assert sandbox.id in [s["id"] for s in Sandbox.list(url=gateway.url, token=gateway.token)]
    again = Sandbox.connect(sandbox.id, url=gateway.url, token=gateway.token)
    assert again.run_code("x = 'shared'; x").text == "'shared'"
    execution = sandbox.run_code("1")
    assert execution.id is not None and sandbox.get_execution(execution.id).status == "ok"


def test_defaults_from_the_environment(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERNELHUB_URL", gateway.url)
    monkeypatch.setenv("KERNELHUB_TOKEN", gateway.token)
    with Sandbox.create(limits={"memory_mb": 256}, timeout=600) as sb:
        info = sb.info()
        assert info["limits"]["memory_mb"] == 256 and info["limits"]["max_lifetime_s"] == 600
        sandbox_id = sb.id
    # Killed on leaving the block.
    with pytest.raises(NotFoundError):
        Sandbox.connect(sandbox_id)


def test_typed_errors(gateway: Gateway, sandbox: Sandbox) -> None:
    url, token = gateway.url, gateway.token
    with pytest.raises(NotFoundError) as missing:
        Sandbox.connect("sbnosuchsandbox", url=url, token=token)
    assert missing.value.status == 404 and missing.value.error == "not_found"
    assert "sbnosuchsandbox" in missing.value.message
    with pytest.raises(InvalidRequestError) as bad:
        Sandbox.create("no-such-template", url=url, token=token)
    assert "no-such-template" in bad.value.message and isinstance(bad.value, KernelHubError)
    with pytest.raises(InvalidRequestError):
        Sandbox.create(limits={"memory_mb": 10 ** 9}, url=url, token=token)
    with pytest.raises(UnauthorizedError):
        Sandbox.list(url=url, token="not-a-key")
    # Another tenant's sandbox does not exist for this key, over REST and the websocket alike.
    with pytest.raises(NotFoundError):
        Sandbox.connect(sandbox.id, url=url, token=gateway.other_token)
    stranger = Sandbox({"id": sandbox.id}, type(sandbox._api)(url, gateway.other_token))
    with pytest.raises(NotFoundError):
        stranger.run_code("1")
    with pytest.raises(InvalidRequestError):
        sandbox.run_code("1", language="cobol")
    with pytest.raises(GatewayConnectionError):
        Sandbox.list(url="http://127.0.0.1:9", token=token)


def test_stopped_sandbox_is_a_conflict(gateway: Gateway) -> None:
    with Sandbox.create(timeout=1, url=gateway.url, token=gateway.token) as sb:
        deadline = time.monotonic() + 20
        while sb.info()["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.2)
        info = sb.info()
        assert info["state"] == "stopped" and info["reason"] == "lifetime"
        assert not sb.is_running()
        with pytest.raises(ConflictError) as stopped:
            sb.commands.run("true")
        assert stopped.value.status == 409 and "stopped" in stopped.value.message
        with pytest.raises(ConflictError):
            sb.run_code("1")
    with pytest.raises(NotFoundError):
        sb.info()
    sb.kill()  # killing one already gone is not an error


# -- async --------------------------------------------------------------------------------------------------

def test_async_sandbox(gateway: Gateway) -> None:
    async def main() -> None:
        async with AsyncSandbox.create("python", url=gateway.url, token=gateway.token) as sb:
            chunks: list[str] = []
            results: list[Any] = []

            async def on_stdout(text: str) -> None:
                await asyncio.sleep(0)
                chunks.append(text)

            execution = await sb.run_code(STREAMED, on_stdout=on_stdout, on_result=results.append)
            assert chunks == [f"tick {i}\n" for i in range(4)] and execution.text == "42"
            assert [r.text for r in results] == ["42"]

            errors: list[ExecutionError] = []
            failed = await sb.run_code("1 / 0", on_error=errors.append)
            assert failed.status == "error" and errors[0].name == "ZeroDivisionError"

            timed_out = await sb.run_code("import time\nwhile True: time.sleep(0.1)", timeout=2)
            assert timed_out.status == "timeout" and timed_out.reason == "timeout"
            assert (await sb.run_code("2 + 2")).text == "4"

            await sb.files.write("a/b.txt", "text")
            await sb.files.write("a/c.bin", b"\x00\xff")
            assert await sb.files.read("a/b.txt") == "text"
            assert await sb.files.read("a/c.bin", format="bytes") == b"\x00\xff"
            assert [e["name"] for e in await sb.files.list("a")] == ["b.txt", "c.bin"]
            await sb.files.remove("a/b.txt")
            assert not await sb.files.exists("a/b.txt") and await sb.files.exists("a/c.bin")

            command = await sb.commands.run("wc -c < a/c.bin")
            assert command.exit_code == 0 and command.stdout.strip() == "2"
            got: list[str] = []

            async def on_line(text: str) -> None:
                got.append(text)

            handle = await sb.commands.run("echo bg; cat", background=True, stdin_open=True, on_stdout=on_line)
            await handle.send_stdin(b"bytes\n")
            await handle.close_stdin()
            assert (await handle.wait()).stdout == "bg\nbytes\n" and "".join(got) == "bg\nbytes\n"
            assert [c["pid"] for c in await sb.commands.list()][-1] == handle.pid
            session = await sb.sessions.create("jupyter", "bash")
            answer = await sb.sessions.execute(session["id"], "echo $((2 + 3))")
            assert isinstance(answer, Execution) and answer.stdout == "5\n"
            await sb.sessions.close(session["id"])

            assert (await sb.metrics())["pids"] >= 1
            assert isinstance(await sb.logs(5), list)
            assert (await sb.info())["state"] == "running" and await sb.is_running()
            assert sb.id in [s["id"] for s in await AsyncSandbox.list(url=gateway.url, token=gateway.token)]
            sandbox_id = sb.id

        with pytest.raises(NotFoundError):
            await AsyncSandbox.connect(sandbox_id, url=gateway.url, token=gateway.token)

        # Awaited rather than entered: the caller kills it.
        other = await AsyncSandbox.create(url=gateway.url, token=gateway.token)
        try:
            again = await AsyncSandbox.connect(other.id, url=gateway.url, token=gateway.token)
            assert (await again.run_code("'same'")).text == "'same'"
            await again.close()
        finally:
            await other.kill()
            await other.close()

    asyncio.run(main())


def test_async_errors(gateway: Gateway) -> None:
    async def main() -> None:
        with pytest.raises(NotFoundError):
            await AsyncSandbox.connect("sbnosuchsandbox", url=gateway.url, token=gateway.token)
        with pytest.raises(InvalidRequestError):
            await AsyncSandbox.create("no-such-template", url=gateway.url, token=gateway.token)
        with pytest.raises(UnauthorizedError):
            await AsyncSandbox.list(url=gateway.url, token="not-a-key")
        with pytest.raises(GatewayConnectionError):
            await AsyncSandbox.list(url="http://127.0.0.1:9", token="x")
        async with AsyncSandbox.create(url=gateway.url, token=gateway.token) as sb:
            with pytest.raises(InvalidRequestError):
                await sb.run_code("1", language="cobol")
            with pytest.raises(InvalidRequestError):
                await sb.commands.run("true", timeout=-1)
            with pytest.raises(NotFoundError):
                await sb.files.read("missing.txt")

    asyncio.run(main())


def test_async_cancel_interrupts_the_execution(gateway: Gateway) -> None:
    async def main() -> None:
        async with AsyncSandbox.create(url=gateway.url, token=gateway.token) as sb:
            started = asyncio.Event()
            task = asyncio.ensure_future(sb.run_code("import time\nprint('go', flush=True)\ntime.sleep(60)",
                                                     on_stdout=lambda _: started.set()))
            await asyncio.wait_for(started.wait(), 30)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            began = time.monotonic()
            assert (await sb.run_code("3 * 3")).text == "9"
            assert time.monotonic() - began < 15  # the sleep was interrupted, not waited out

    asyncio.run(main())
