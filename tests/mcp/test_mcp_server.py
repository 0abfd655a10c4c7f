"""The MCP server through the official SDK client, over each transport: stdio with the service in-process
(``kernelhub mcp``), stdio driving a gateway (``kernelhub mcp --url``), and streamable HTTP at ``/mcp`` on the
gateway. One scenario runs on all three: every tool (the seventeen and the command ones), a sandbox, code with
progress and a plot, files both ways, commands in the foreground and by pid, and failures as tool errors."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import mcp_types as types
import pytest
from mcp import Client, ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

from kernelhub.testing import Gateway

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups]

REPO = Path(__file__).resolve().parents[2]
TOOLS = {
    "sandbox_create", "sandbox_list", "sandbox_info", "sandbox_delete", "sandbox_pause", "sandbox_resume",
    "code_execute", "code_execute_async",
    "execution_status", "command_execute", "file_upload", "file_download", "file_list", "file_delete",
    "session_create", "session_execute", "session_close", "sandbox_logs", "sandbox_metrics",
    "command_start", "command_list", "command_status", "command_send_stdin", "command_signal", "command_kill",
    "sandbox_update",
}
PNG = b"\x89PNG\r\n\x1a\n"
SLOW_PRINTS = "import time\nfor i in range(3):\n    print(f'line {i}', flush=True)\n    time.sleep(0.4)\n6 * 7"
PLOT = "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()"


def text_of(result: types.CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, types.TextContent))


def state_dir() -> str:
    path = tempfile.mkdtemp(prefix="kernelhub-mcp-", dir="/tmp")
    os.chmod(path, 0o711)  # sandbox uids must traverse it
    return path


def stdio_params(*args: str, env: dict[str, str] | None = None) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=["-m", "kernelhub.cli", "mcp", *args],
                                 env={**os.environ, **(env or {})}, cwd=str(REPO))


@asynccontextmanager
async def stdio_session(params: StdioServerParameters) -> AsyncIterator[ClientSession]:
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


@asynccontextmanager
async def http_session(url: str, token: str) -> AsyncIterator[ClientSession]:
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=120) as http, \
            streamable_http_client(url + "/mcp", http_client=http) as (read, write), \
            ClientSession(read, write) as session:
        await session.initialize()
        yield session


async def call(session: ClientSession, name: str, **arguments: Any) -> types.CallToolResult:
    return await session.call_tool(name, arguments)


def check_image_once(result: types.CallToolResult, structured_note: str | None = None) -> bytes:
    """The one image of ``result``: image content, and nowhere else as base64 (not in the text, not in the
    structured content, where a note names the image content); answers its bytes."""
    images = [c for c in result.content if isinstance(c, types.ImageContent)]
    assert len(images) == 1 and images[0].mime_type == "image/png", result.content
    data = images[0].data
    assert data not in json.dumps(result.structured_content) and data not in text_of(result)
    if structured_note is None:
        notes = [r["data"]["image/png"] for r in result.structured_content["results"] if "image/png" in r["data"]]
    else:
        notes = [result.structured_content[structured_note]]
    assert len(notes) == 1 and "image content 1" in notes[0], notes
    return base64.b64decode(data)


async def scenario(session: ClientSession, check_owner: Callable[[str], None] | None = None) -> str:
    """Everything the issue asks of every transport; answers the id of the (deleted) sandbox."""
    listed = await session.list_tools()
    assert {t.name for t in listed.tools} == TOOLS and len(listed.tools) == len(TOOLS)
    for tool in listed.tools:
        assert tool.input_schema["type"] == "object" and tool.description and len(tool.description) > 80
        assert set(tool.input_schema.get("required", [])) <= set(tool.input_schema["properties"])

    created = await call(session, "sandbox_create", template="python")
    assert not created.is_error, text_of(created)
    sandbox_id = created.structured_content["id"]
    assert created.structured_content["state"] == "running" and sandbox_id in text_of(created)
    try:
        if check_owner:
            check_owner(sandbox_id)

        # Code: stdout and the last expression's value, with progress while it runs.
        progress: list[tuple[float, str | None]] = []

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            progress.append((value, message))

        ran = await session.call_tool("code_execute", {"sandbox_id": sandbox_id, "code": SLOW_PRINTS},
                                      progress_callback=on_progress)
        assert not ran.is_error, text_of(ran)
        ex = ran.structured_content
        assert ex["status"] == "ok" and ex["stdout"] == "line 0\nline 1\nline 2\n"
        assert [r["data"]["text/plain"] for r in ex["results"] if r["is_main_result"]] == ["42"]
        assert "line 2" in text_of(ran) and "42" in text_of(ran)
        assert len(progress) >= 2 and [v for v, _ in progress] == sorted({v for v, _ in progress})
        streamed = "".join(m or "" for _, m in progress)
        assert all(f"line {i}" in streamed for i in range(3)), progress

        # A plot comes back once: as image content, with a note in its place in the structured result; and so
        # when the execution is read again, and when the same image is downloaded as a file.
        plotted = await call(session, "code_execute", sandbox_id=sandbox_id, code=PLOT + "\nplt.savefig('p.png')")
        assert not plotted.is_error, text_of(plotted)
        png = check_image_once(plotted)
        again = await call(session, "execution_status", execution_id=plotted.structured_content["id"])
        assert check_image_once(again) == png
        down = await call(session, "file_download", sandbox_id=sandbox_id, path="p.png")
        assert check_image_once(down, structured_note="attached").startswith(PNG)
        assert down.structured_content["mime_type"] == "image/png" and "content_base64" not in down.structured_content
        down = await call(session, "file_download", sandbox_id=sandbox_id, path="p.png", format="base64")
        assert not [c for c in down.content if isinstance(c, types.ImageContent)]
        assert base64.b64decode(down.structured_content["content_base64"]).startswith(PNG)

        # Files both ways, text and binary.
        up = await call(session, "file_upload", sandbox_id=sandbox_id, path="data/notes.txt", content="héllo\n")
        assert not up.is_error and up.structured_content == {"path": "data/notes.txt", "size": 7}
        blob = bytes(range(256)) * 4
        up = await call(session, "file_upload", sandbox_id=sandbox_id, path="data/blob.bin",
                        content_base64=base64.b64encode(blob).decode())
        assert not up.is_error and up.structured_content["size"] == len(blob)
        down = await call(session, "file_download", sandbox_id=sandbox_id, path="data/notes.txt")
        assert down.structured_content["content"] == "héllo\n" and "héllo" in text_of(down)
        down = await call(session, "file_download", sandbox_id=sandbox_id, path="data/blob.bin")
        assert base64.b64decode(down.structured_content["content_base64"]) == blob
        listing = await call(session, "file_list", sandbox_id=sandbox_id, path="data")
        assert sorted(e["name"] for e in listing.structured_content["entries"]) == ["blob.bin", "notes.txt"]
        seen = await call(session, "code_execute", sandbox_id=sandbox_id,
                          code="open('data/notes.txt', encoding='utf-8').read()")
        assert seen.structured_content["results"][0]["data"]["text/plain"] == "'héllo\\n'"
        gone = await call(session, "file_delete", sandbox_id=sandbox_id, path="data/blob.bin")
        assert not gone.is_error

        # A command, with env, stdin and the workspace as its directory.
        ran = await call(session, "command_execute", sandbox_id=sandbox_id, command="echo $GREETING; pwd; cat",
                         env={"GREETING": "hi"}, stdin="from stdin")
        assert not ran.is_error
        assert ran.structured_content["exit_code"] == 0
        assert ran.structured_content["stdout"] == "hi\n/workspace\nfrom stdin"

        # Failures are tool errors with the gateway's message; the server carries on.
        missing = await call(session, "code_execute", sandbox_id="sbnosuchsandbox", code="1")
        assert missing.is_error and "sbnosuchsandbox" in text_of(missing)
        assert missing.structured_content["error"] == "not_found"
        bad = await call(session, "code_execute", sandbox_id=sandbox_id)
        assert bad.is_error and "code" in text_of(bad)
        bad = await call(session, "file_download", sandbox_id=sandbox_id, path="../etc/passwd")
        assert bad.is_error
        # The last output before the end (here the error) is reported as progress too, not cut off by the end.
        progress.clear()
        raised = await session.call_tool("code_execute", {"sandbox_id": sandbox_id, "code": "1 / 0"},
                                         progress_callback=on_progress)
        assert raised.is_error and raised.structured_content["error"]["name"] == "ZeroDivisionError"
        assert "ZeroDivisionError: division by zero" in "".join(m or "" for _, m in progress), progress
        timed_out = await call(session, "code_execute", sandbox_id=sandbox_id, code="while True: pass",
                               timeout_s=1)
        assert timed_out.is_error and timed_out.structured_content["status"] == "timeout"
        after = await call(session, "code_execute", sandbox_id=sandbox_id, code="6 * 7")
        assert after.structured_content["results"][0]["data"]["text/plain"] == "42"

        info = await call(session, "sandbox_info", sandbox_id=sandbox_id)
        assert info.structured_content["id"] == sandbox_id
        listed_sandboxes = await call(session, "sandbox_list")
        assert sandbox_id in [s["id"] for s in listed_sandboxes.structured_content["sandboxes"]]
    finally:
        deleted = await call(session, "sandbox_delete", sandbox_id=sandbox_id)
    assert not deleted.is_error, text_of(deleted)
    again = await call(session, "sandbox_info", sandbox_id=sandbox_id)
    assert again.is_error and again.structured_content["error"] == "not_found"
    return sandbox_id


async def sessions_and_async(session: ClientSession) -> None:
    """The remaining tools: sessions, async executions, logs and metrics."""
    created = await call(session, "sandbox_create", template="python", limits={"memory_mb": 256})
    sandbox_id = created.structured_content["id"]
    try:
        assert created.structured_content["limits"]["memory_mb"] == 256
        started = await call(session, "code_execute_async", sandbox_id=sandbox_id,
                             code="import time; time.sleep(0.5); print('done')")
        execution_id = started.structured_content["id"]
        assert started.structured_content["status"] in ("queued", "running")
        for _ in range(100):
            status = await call(session, "execution_status", execution_id=execution_id)
            if status.structured_content["status"] not in ("queued", "running"):
                break
            await asyncio.sleep(0.1)
        assert status.structured_content["status"] == "ok" and status.structured_content["stdout"] == "done\n"

        opened = await call(session, "session_create", sandbox_id=sandbox_id, type="jupyter", language="bash")
        assert not opened.is_error, text_of(opened)
        session_id = opened.structured_content["id"]
        ran = await call(session, "session_execute", session_id=session_id, input="echo from-bash")
        assert ran.structured_content["stdout"] == "from-bash\n"
        closed = await call(session, "session_close", session_id=session_id)
        assert not closed.is_error
        again = await call(session, "session_execute", session_id=session_id, input="echo x")
        assert again.is_error and again.structured_content["error"] == "not_found"

        metrics = await call(session, "sandbox_metrics", sandbox_id=sandbox_id)
        assert metrics.structured_content["memory_limit_bytes"] == 256 * 1024 * 1024
        assert metrics.structured_content["net_rx_bytes"] == metrics.structured_content["net_tx_bytes"] == 0
        assert created.structured_content["network"] == "none"
        updated = await call(session, "sandbox_update", sandbox_id=sandbox_id, network={"allow": ["PyPI.org"]})
        assert not updated.is_error, text_of(updated)
        assert updated.structured_content["network"] == {"allow": ["pypi.org"], "deny": []}
        assert text_of(updated).startswith(f"Sandbox {sandbox_id} now has the network policy {{")
        refused = await call(session, "sandbox_update", sandbox_id=sandbox_id, network={"allow": ["*"]})
        assert refused.is_error and refused.structured_content["error"] == "invalid_request"
        assert '"*" is not an entry' in text_of(refused)
        refused = await call(session, "sandbox_update", sandbox_id=sandbox_id)
        assert refused.is_error and "needs the argument 'network'" in text_of(refused)
        logs = await call(session, "sandbox_logs", sandbox_id=sandbox_id, lines=5)
        assert isinstance(logs.structured_content["lines"], list) and len(logs.structured_content["lines"]) <= 5
        quota = await call(session, "sandbox_create", limits={"memory_mb": 10 ** 9})
        assert quota.is_error and quota.structured_content["error"] == "invalid_request"
    finally:
        await call(session, "sandbox_delete", sandbox_id=sandbox_id)


def run(coro: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(coro())


async def commands_by_pid(session: ClientSession) -> None:
    """The command tools: a background command, polled, fed and ended; signals, kills and a missing pid."""
    created = await call(session, "sandbox_create", template="python")
    sandbox_id = created.structured_content["id"]

    async def status_until(pid: int, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            seen = await call(session, "command_status", sandbox_id=sandbox_id, pid=pid)
            assert not seen.is_error, text_of(seen)
            if done(seen.structured_content):
                return dict(seen.structured_content)
            await asyncio.sleep(0.05)
        raise AssertionError(f"command {pid} never got there")

    try:
        started = await call(session, "command_start", sandbox_id=sandbox_id, stdin_open=True,
                             command="echo ready; read x; echo got $x")
        assert not started.is_error, text_of(started)
        pid = started.structured_content["pid"]
        assert started.structured_content["status"] == "running" and "command_status" in text_of(started)
        await status_until(pid, lambda c: "ready" in c["stdout"])
        fed = await call(session, "command_send_stdin", sandbox_id=sandbox_id, pid=pid, data="hi\n", eof=True)
        assert not fed.is_error and fed.structured_content["stdin_open"] is False
        ended = await status_until(pid, lambda c: c["status"] == "exited")
        assert ended["stdout"] == "ready\ngot hi\n" and ended["exit_code"] == 0
        assert "exited with code 0" in text_of(await call(session, "command_status", sandbox_id=sandbox_id, pid=pid))

        sleeper = (await call(session, "command_start", sandbox_id=sandbox_id, command="exec sleep 1000"))
        other = (await call(session, "command_start", sandbox_id=sandbox_id, command="exec sleep 1001"))
        listed = await call(session, "command_list", sandbox_id=sandbox_id)
        running = [c["pid"] for c in listed.structured_content["commands"] if c["status"] == "running"]
        assert {sleeper.structured_content["pid"], other.structured_content["pid"]} <= set(running)
        signalled = await call(session, "command_signal", sandbox_id=sandbox_id, pid=sleeper.structured_content["pid"])
        assert not signalled.is_error and signalled.structured_content["signalled"] == 1
        assert (await status_until(sleeper.structured_content["pid"], lambda c: c["status"] == "exited"))[
            "exit_code"] == 143
        killed = await call(session, "command_kill", sandbox_id=sandbox_id, pid=other.structured_content["pid"])
        assert killed.structured_content["reason"] == "killed" and "exited with code 137" in text_of(killed)
        missing = await call(session, "command_status", sandbox_id=sandbox_id, pid=999999)
        assert missing.is_error and missing.structured_content["error"] == "not_found"
        again = await call(session, "command_kill", sandbox_id=sandbox_id, pid=other.structured_content["pid"])
        assert again.is_error and again.structured_content["error"] == "conflict"
    finally:
        await call(session, "sandbox_delete", sandbox_id=sandbox_id)


def test_stdio_embedded() -> None:
    state = state_dir()
    try:
        async def main() -> None:
            async with stdio_session(stdio_params("--state-dir", state)) as session:
                await scenario(session)
                await sessions_and_async(session)
                await commands_by_pid(session)
                # Left running on purpose: closing the server must stop it (and the warm pool's, which live
                # beside it).
                left = await call(session, "sandbox_create")
                assert left.structured_content["id"] in os.listdir(Path(state, "sandboxes"))

        run(main)
        assert os.listdir(Path(state, "sandboxes")) == []
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_stdio_remote(gateway: Gateway) -> None:
    def owned_by_alice(sandbox_id: str) -> None:
        assert gateway.request("GET", f"/v1/sandboxes/{sandbox_id}")[0] == 200
        assert gateway.request("GET", f"/v1/sandboxes/{sandbox_id}", token=gateway.other_token)[0] == 404

    async def main() -> None:
        params = stdio_params("--url", gateway.url, env={"KERNELHUB_TOKEN": gateway.token})
        async with stdio_session(params) as session:
            await scenario(session, owned_by_alice)
            await sessions_and_async(session)
            await commands_by_pid(session)

    run(main)


def test_stdio_remote_unreachable_gateway_is_a_tool_error() -> None:
    async def main() -> None:
        params = stdio_params("--url", "http://127.0.0.1:9", env={"KERNELHUB_TOKEN": "x"})
        async with stdio_session(params) as session:
            listed = await session.list_tools()
            assert len(listed.tools) == len(TOOLS)
            result = await call(session, "sandbox_list")
            assert result.is_error and "127.0.0.1:9" in text_of(result)

    run(main)


def test_streamable_http(gateway: Gateway) -> None:
    def owned_by_alice(sandbox_id: str) -> None:
        assert gateway.request("GET", f"/v1/sandboxes/{sandbox_id}")[0] == 200

    async def main() -> None:
        async with http_session(gateway.url, gateway.token) as session:
            await scenario(session, owned_by_alice)
            await sessions_and_async(session)
            await commands_by_pid(session)

    run(main)


def test_streamable_http_runs_as_the_callers_tenant(gateway: Gateway) -> None:
    status, sandbox = gateway.request("POST", "/v1/sandboxes", {"template": "python"})
    assert status == 201
    try:
        async def main() -> None:
            async with http_session(gateway.url, gateway.other_token) as session:
                seen = await call(session, "sandbox_info", sandbox_id=sandbox["id"])
                assert seen.is_error and seen.structured_content["error"] == "not_found"
                listed = await call(session, "sandbox_list")
                assert sandbox["id"] not in [s["id"] for s in listed.structured_content["sandboxes"]]
            async with http_session(gateway.url, gateway.token) as session:
                seen = await call(session, "sandbox_info", sandbox_id=sandbox["id"])
                assert not seen.is_error

        run(main)
    finally:
        gateway.request("DELETE", f"/v1/sandboxes/{sandbox['id']}")


def test_streamable_http_modern_protocol_and_query_token(gateway: Gateway) -> None:
    """The SDK's default client negotiates the 2026-07-28 protocol (one request per exchange); the key may
    come as ``?token=`` as on every other route."""

    async def main() -> None:
        async with Client(f"{gateway.url}/mcp?token={gateway.token}") as client:
            assert len((await client.list_tools()).tools) == len(TOOLS)
            created = await client.call_tool("sandbox_create", {})
            sandbox_id = created.structured_content["id"]
            try:
                ran = await client.call_tool("code_execute", {"sandbox_id": sandbox_id, "code": "print(6 * 7)"})
                assert not ran.is_error and ran.structured_content["stdout"] == "42\n"
            finally:
                deleted = await client.call_tool("sandbox_delete", {"sandbox_id": sandbox_id})
            assert not deleted.is_error
            missing = await client.call_tool("sandbox_info", {"sandbox_id": sandbox_id})
            assert missing.is_error and sandbox_id in text_of(missing)

    run(main)


@pytest.mark.parametrize("token", [None, "", "not-a-key"])
def test_streamable_http_needs_a_key(gateway: Gateway, token: str | None) -> None:
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                  "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                             "clientInfo": {"name": "test", "version": "1"}}}
    accept = {"Accept": "application/json, text/event-stream"}
    headers = {**accept, "Authorization": "Bearer "} if token == "" else accept
    status, body = gateway.request("POST", "/mcp", initialize, token=token or None, headers=headers)
    assert status == 401 and body["error"] == "unauthorized"
    # The same request with the key is served.
    status, _ = gateway.request("POST", "/mcp", initialize, headers=accept)
    assert status == 200


def test_mcp_help_says_what_a_user_needs() -> None:
    result = subprocess.run([sys.executable, "-m", "kernelhub.cli", "mcp", "--help"], capture_output=True,
                            text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0
    for needed in ("--url", "--token", "--state-dir", "KERNELHUB_URL", "KERNELHUB_TOKEN", "/mcp", "mcpServers",
                   "embedded", "stdio"):
        assert needed in result.stdout, needed
    json.loads(result.stdout.split("embedded:\n", 1)[1].splitlines()[0])  # the Claude Desktop block is JSON
