"""E2B's own SDKs, unmodified, against a real gateway: configured only by E2B_API_KEY, E2B_API_URL and
E2B_SANDBOX_URL, as an agent written for E2B would be (README "Use the E2B SDK").

The sync SDK goes through what an agent does (create, list, connect, code with streamed output and a plot, a
JavaScript context, files, commands in the foreground and the background, timeout, metrics, kill), the async
one through the same in short; then tenants: another key's sandbox is as unknown through E2B as on /v1."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import time
from collections.abc import Iterator

import pytest
from e2b import AsyncSandbox as AsyncBaseSandbox
from e2b import (
    CommandExitException,
    FileType,
    NotFoundException,
    SandboxException,
    SandboxNotFoundException,
    SandboxQuery,
)
from e2b_code_interpreter import AsyncSandbox, Sandbox

from kernelhub.testing import Gateway

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups]


@pytest.fixture(scope="module")
def e2b_env(gateway: Gateway) -> Iterator[dict[str, str]]:
    """The three variables an E2B agent is configured with, pointing at the gateway, for the whole module."""
    values = {"E2B_API_KEY": gateway.token, "E2B_API_URL": f"{gateway.url}/e2b",
              "E2B_SANDBOX_URL": f"{gateway.url}/e2b"}
    with pytest.MonkeyPatch.context() as patch:
        for name in ("E2B_DEBUG", "E2B_DOMAIN", "E2B_ACCESS_TOKEN"):
            patch.delenv(name, raising=False)
        for name, value in values.items():
            patch.setenv(name, value)
        yield values


@pytest.fixture(scope="module")
def sbx(e2b_env: dict[str, str]) -> Iterator[Sandbox]:
    sandbox = Sandbox.create(timeout=300, metadata={"suite": "e2b"}, envs={"GREETING": "hello"})
    yield sandbox
    sandbox.kill()


def test_create_list_connect_info(gateway: Gateway, sbx: Sandbox) -> None:
    info = sbx.get_info()
    assert info.sandbox_id == sbx.sandbox_id and info.template_id == "python" and info.metadata == {"suite": "e2b"}
    # The same sandbox on kernelhub's own API, with the env and metadata the SDK gave it.
    status, record = gateway.request("GET", f"/v1/sandboxes/{sbx.sandbox_id}")
    assert status == 200 and record["state"] == "running" and record["metadata"] == {"suite": "e2b"}
    listed = Sandbox.list().next_items()
    assert sbx.sandbox_id in [s.sandbox_id for s in listed]
    other = Sandbox.create()
    try:
        pages, paginator = [], Sandbox.list(limit=1)
        while paginator.has_next:
            pages.append([s.sandbox_id for s in paginator.next_items()])
        assert all(len(page) == 1 for page in pages)
        assert {sbx.sandbox_id, other.sandbox_id} <= {page[0] for page in pages}
        newest_first = [s.sandbox_id for s in Sandbox.list(order="desc").next_items()]
        assert newest_first.index(other.sandbox_id) < newest_first.index(sbx.sandbox_id)
    finally:
        other.kill()
    assert [s.sandbox_id for s in Sandbox.list(query=SandboxQuery(metadata={"suite": "e2b"})).next_items()] == \
        [sbx.sandbox_id]
    assert Sandbox.list(query=SandboxQuery(metadata={"suite": "other"})).next_items() == []
    again = Sandbox.connect(sbx.sandbox_id)
    assert again.run_code("import os; os.environ['GREETING']").text == "'hello'"


def test_run_code_streams_output_and_returns_rich_results(sbx: Sandbox) -> None:
    lines: list[str] = []
    execution = sbx.run_code("for i in range(3): print('line', i)\n6 * 7", on_stdout=lambda m: lines.append(m.line))
    # Chunks as the kernel flushed them: the text is what counts, and the callback saw all of it.
    assert "".join(lines) == "line 0\nline 1\nline 2\n" and execution.logs.stdout == lines
    assert execution.text == "42" and execution.results[0].is_main_result
    plot = sbx.run_code("import matplotlib.pyplot as plt\nplt.plot([1, 2, 4])\nplt.show()")
    [image] = plot.results
    assert image.png and base64.b64decode(image.png).startswith(b"\x89PNG") and not image.is_main_result
    html = sbx.run_code("import pandas as pd; pd.DataFrame({'a': [1, 2]})").results[0]
    assert html.is_main_result and "<table" in (html.html or "") and html.text
    failed = sbx.run_code("1 / 0")
    assert failed.error is not None and failed.error.name == "ZeroDivisionError"
    assert "division by zero" in failed.error.traceback  # one string, coloured as IPython prints it
    assert sbx.run_code("print(1)").logs.stdout == ["1\n"]



def test_code_contexts_in_other_languages(sbx: Sandbox) -> None:
    js = sbx.create_code_context(language="javascript")
    assert js.language == "javascript" and js.cwd == "/home/user"
    out = sbx.run_code("const x = 40 + 2; console.log(x)", context=js)
    assert out.logs.stdout == ["42\n"] and out.error is None
    assert sbx.run_code("console.log(x)", context=js).logs.stdout == ["42\n"]  # state kept in the context
    elsewhere = sbx.create_code_context(language="python", cwd="/tmp")
    assert sbx.run_code("import os; os.getcwd()", context=elsewhere).text == "'/tmp'"
    assert {js.id, elsewhere.id} <= {c.id for c in sbx.list_code_contexts()}
    sbx.restart_code_context(js)
    forgotten = sbx.run_code("console.log(x)", context=js)  # a fresh kernel: tslab no longer knows x
    assert "Cannot find name 'x'" in "".join(forgotten.logs.stderr) and not forgotten.logs.stdout
    sbx.remove_code_context(js)
    assert js.id not in {c.id for c in sbx.list_code_contexts()}
    with pytest.raises(NotFoundException):
        sbx.run_code("1", context=js)
    assert sbx.run_code("echo $((6 * 7))", language="bash").logs.stdout == ["42\n"]


def test_files(gateway: Gateway, sbx: Sandbox) -> None:
    files = sbx.files
    written = files.write("/home/user/data/a.txt", "hello")
    assert written.path == "/home/user/data/a.txt" and written.name == "a.txt"
    assert files.read("data/a.txt") == "hello" and files.read("/workspace/data/a.txt") == "hello"
    files.write("data/b.bin", io.BytesIO(b"\x00\x01" * 100_000))  # a file object: streamed as octet-stream
    assert files.read("data/b.bin", format="bytes") == b"\x00\x01" * 100_000
    files.write("data/c.gz", b"compressed on the way", gzip=True)
    assert files.read("data/c.gz") == "compressed on the way"
    from e2b.sandbox.filesystem.filesystem import WriteEntry
    many = files.write_files([WriteEntry(path="m/1.txt", data="one"), WriteEntry(path="/home/user/m/2.txt", data=b"2")])
    assert [w.path for w in many] == ["/home/user/m/1.txt", "/home/user/m/2.txt"]
    entries = {e.name: e for e in files.list("/home/user/data")}
    assert set(entries) == {"a.txt", "b.bin", "c.gz"} and entries["a.txt"].size == 5
    assert entries["a.txt"].type == FileType.FILE and entries["a.txt"].path == "/home/user/data/a.txt"
    assert entries["a.txt"].permissions == "-rw-r--r--" and entries["a.txt"].owner == "user"
    assert {e.path for e in files.list("/home/user", depth=2)} >= {"/home/user/data", "/home/user/data/a.txt"}
    assert files.exists("data/a.txt") and not files.exists("data/nope.txt")
    assert files.make_dir("made/deep/dir") is True and files.make_dir("made/deep/dir") is False
    assert files.get_info("made/deep").type == FileType.DIR
    moved = files.rename("data/a.txt", "made/a.txt")
    assert moved.path == "/home/user/made/a.txt" and files.read("made/a.txt") == "hello"
    files.remove("made")
    assert not files.exists("made")
    # The home is the workspace: kernelhub's own file API sees the same files, and code inside the sandbox too.
    status, body = gateway.request("GET", f"/v1/sandboxes/{sbx.sandbox_id}/files/m/1.txt")
    assert status == 200 and body == b"one"
    assert sbx.run_code("open('/home/user/m/2.txt').read()").text == "'2'"
    # Outside the home nothing is read or written; missing files are the SDK's own errors.
    for path in ("/etc/passwd", "/tmp/x", "../../etc/passwd", "/home/user/../../etc/shadow"):
        with pytest.raises(SandboxException):
            files.read(path)
        with pytest.raises(SandboxException):
            files.write(path, "x")
    with pytest.raises(NotFoundException):
        files.read("nope.txt")
    with pytest.raises(NotFoundException):
        files.remove("nope.txt")


def test_commands_foreground_background_and_kill(sbx: Sandbox) -> None:
    commands = sbx.commands
    result = commands.run("echo $GREETING; pwd; echo err >&2")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "hello\n/home/user\n", "err\n")
    chunks: list[str] = []
    commands.run("for i in 1 2 3; do echo tick $i; sleep 0.05; done", on_stdout=chunks.append)
    assert "".join(chunks) == "tick 1\ntick 2\ntick 3\n"
    with pytest.raises(CommandExitException) as failed:
        commands.run("echo partial; exit 3")
    assert failed.value.exit_code == 3 and failed.value.stdout == "partial\n"
    assert commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert commands.run("echo $X", envs={"X": "set"}).stdout == "set\n"

    handle = commands.run("echo ready; read line; echo got $line; touch fed; sleep 1000", background=True,
                          stdin=True)
    assert handle.pid in [p.pid for p in commands.list()]
    commands.send_stdin(handle.pid, "there\n")
    other = commands.connect(handle.pid)  # re-attached from a second stream: from now on
    assert other.pid == handle.pid
    deadline = time.monotonic() + 30
    while not sbx.files.exists("fed") and time.monotonic() < deadline:  # it has read its stdin and said so
        time.sleep(0.05)
    assert handle.kill() is True
    with pytest.raises(CommandExitException) as killed:
        handle.wait()
    assert killed.value.exit_code != 0 and "got there" in killed.value.stdout
    assert handle.pid not in [p.pid for p in commands.list()]
    assert commands.kill(handle.pid) is False  # gone: the SDK's "not found"

    quick = commands.run("sleep 0.2; echo done", background=True)
    assert quick.wait().stdout == "done\n"
    timed = commands.run("sleep 30", background=True, timeout=1)
    with pytest.raises((CommandExitException, SandboxException)):
        timed.wait()


def test_set_timeout_metrics_and_kill(e2b_env: dict[str, str]) -> None:
    sandbox = Sandbox.create(timeout=60)
    try:
        before = sandbox.get_info().end_at
        sandbox.set_timeout(600)
        after = sandbox.get_info().end_at
        assert (after - before).total_seconds() > 500
        [metric] = sandbox.get_metrics()
        assert metric.mem_used > 0 and metric.mem_total >= metric.mem_used and metric.disk_total > 0
        # connect extends the deadline, never shortens it
        Sandbox.connect(sandbox.sandbox_id, timeout=30)
        assert sandbox.get_info().end_at == after
    finally:
        assert sandbox.kill() is True
    assert sandbox.is_running() is False
    assert Sandbox.kill(sandbox.sandbox_id) is False
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(sandbox.sandbox_id)
    with pytest.raises(SandboxException):
        sandbox.files.read("x")


def test_another_tenant_sees_nothing(gateway: Gateway, sbx: Sandbox, e2b_env: dict[str, str]) -> None:
    bob = {"api_key": gateway.other_token}
    assert sbx.sandbox_id not in [s.sandbox_id for s in Sandbox.list(**bob).next_items()]
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(sbx.sandbox_id, **bob)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(sbx.sandbox_id, **bob)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.set_timeout(sbx.sandbox_id, 100, **bob)
    assert Sandbox.kill(sbx.sandbox_id, **bob) is False
    assert sbx.is_running()
    # Bob's own sandbox is his, and Alice's key cannot reach it either.
    theirs = Sandbox.create(**bob)
    try:
        with pytest.raises(SandboxNotFoundException):
            Sandbox.connect(theirs.sandbox_id)
        assert theirs.run_code("1 + 1").text == "2"
    finally:
        theirs.kill()


def test_async_sdk(e2b_env: dict[str, str]) -> None:
    async def scenario() -> None:
        sandbox = await AsyncSandbox.create()
        try:
            seen: list[str] = []
            execution = await sandbox.run_code("print('async'); 2 ** 10", on_stdout=lambda m: seen.append(m.line))
            assert seen == ["async\n"] and execution.text == "1024"
            await sandbox.files.write("async.txt", "from async")
            assert await sandbox.files.read("/home/user/async.txt") == "from async"
            assert await sandbox.files.exists("async.txt")
            ran = await sandbox.commands.run("cat async.txt")
            assert ran.stdout == "from async"
            handle = await sandbox.commands.run("sleep 1000", background=True)
            assert handle.pid in [p.pid for p in await sandbox.commands.list()]
            assert await handle.kill() is True
            with pytest.raises(CommandExitException):
                await handle.wait()
            await sandbox.set_timeout(120)
            assert (await sandbox.get_metrics())[0].cpu_count >= 1
            base = await AsyncBaseSandbox.connect(sandbox.sandbox_id)
            assert (await base.commands.run("echo base")).stdout == "base\n"
        finally:
            assert await sandbox.kill() is True
        assert await sandbox.is_running() is False

    asyncio.run(scenario())


def test_an_agent_script_runs_unchanged(gateway: Gateway, e2b_env: dict[str, str]) -> None:
    """examples/e2b_agent.py, the closing note's script, runs as a subprocess with just the three variables."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "examples" / "e2b_agent.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("E2B_", "KERNELHUB_"))} | e2b_env
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "mean of the squares: 31.7" in done.stdout and "chart saved: 1 png" in done.stdout, done.stdout
    assert time.monotonic() - started < 300

