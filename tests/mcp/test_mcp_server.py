"""The MCP server through the official SDK client, over each transport: stdio with the service in-process
(``kernelhub mcp``), stdio driving a gateway (``kernelhub mcp --url``), and streamable HTTP at ``/mcp`` on the
gateway. One scenario runs on all three: the seventeen tools, a sandbox, code with progress and a plot, files
both ways, a command, and failures as tool errors."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
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

from kernelhub.testing import Gateway, gateway  # noqa: F401

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups]

REPO = Path(__file__).resolve().parents[2]
TOOLS = {
    "sandbox_create", "sandbox_list", "sandbox_info", "sandbox_delete", "code_execute", "code_execute_async",
    "execution_status", "command_execute", "file_upload", "file_download", "file_list", "file_delete",
    "session_create", "session_execute", "session_close", "sandbox_logs", "sandbox_metrics",
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


async def scenario(session: ClientSession, check_owner: Callable[[str], None] | None = None) -> str:
    """Everything the issue asks of every transport; answers the id of the (deleted) sandbox."""
    listed = await session.list_tools()
    assert {t.name for t in listed.tools} == TOOLS and len(listed.tools) == 17
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

        # A plot comes back as image content as well as in the structured result.
        plotted = await call(session, "code_execute", sandbox_id=sandbox_id, code=PLOT)
        images = [c for c in plotted.content if isinstance(c, types.ImageContent)]
        assert not plotted.is_error and len(images) == 1 and images[0].mime_type == "image/png"
        assert base64.b64decode(images[0].data).startswith(PNG)

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
        raised = await call(session, "code_execute", sandbox_id=sandbox_id, code="1 / 0")
        assert raised.is_error and raised.structured_content["error"]["name"] == "ZeroDivisionError"
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
        logs = await call(session, "sandbox_logs", sandbox_id=sandbox_id, lines=5)
        assert isinstance(logs.structured_content["lines"], list) and len(logs.structured_content["lines"]) <= 5
        quota = await call(session, "sandbox_create", limits={"memory_mb": 10 ** 9})
        assert quota.is_error and quota.structured_content["error"] == "invalid_request"
    finally:
        await call(session, "sandbox_delete", sandbox_id=sandbox_id)


def run(coro: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(coro())


def test_stdio_embedded() -> None:
    state = state_dir()
    try:
        async def main() -> None:
            async with stdio_session(stdio_params("--state-dir", state)) as session:
                await scenario(session)
                await sessions_and_async(session)
                # Left running on purpose: closing the server must stop it (and the warm pool's, which live
                # beside it).
                left = await call(session, "sandbox_create")
                assert left.structured_content["id"] in os.listdir(Path(state, "sandboxes"))

        run(main)
        assert os.listdir(Path(state, "sandboxes")) == []
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_stdio_remote(gateway: Gateway) -> None:  # noqa: F811
    def owned_by_alice(sandbox_id: str) -> None:
        assert gateway.request("GET", f"/v1/sandboxes/{sandbox_id}")[0] == 200
        assert gateway.request("GET", f"/v1/sandboxes/{sandbox_id}", token=gateway.other_token)[0] == 404

    async def main() -> None:
        params = stdio_params("--url", gateway.url, env={"KERNELHUB_TOKEN": gateway.token})
        async with stdio_session(params) as session:
            await scenario(session, owned_by_alice)
            await sessions_and_async(session)

    run(main)


def test_stdio_remote_unreachable_gateway_is_a_tool_error() -> None:
    async def main() -> None:
        params = stdio_params("--url", "http://127.0.0.1:9", env={"KERNELHUB_TOKEN": "x"})
        async with stdio_session(params) as session:
            listed = await session.list_tools()
            assert len(listed.tools) == 17
            result = await call(session, "sandbox_list")
            assert result.is_error and "127.0.0.1:9" in text_of(result)

    run(main)


def test_streamable_http(gateway: Gateway) -> None:  # noqa: F811
    def owned_by_alice(sandbox_id: str) -> None:
        assert gateway.request("GET", f"/v1/sandboxes/{sandbox_id}")[0] == 200

    async def main() -> None:
        async with http_session(gateway.url, gateway.token) as session:
            await scenario(session, owned_by_alice)
            await sessions_and_async(session)

    run(main)


def test_streamable_http_runs_as_the_callers_tenant(gateway: Gateway) -> None:  # noqa: F811
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


def test_streamable_http_modern_protocol_and_query_token(gateway: Gateway) -> None:  # noqa: F811
    """The SDK's default client negotiates the 2026-07-28 protocol (one request per exchange); the key may
    come as ``?token=`` as on every other route."""

    async def main() -> None:
        async with Client(f"{gateway.url}/mcp?token={gateway.token}") as client:
            assert len((await client.list_tools()).tools) == 17
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
def test_streamable_http_needs_a_key(gateway: Gateway, token: str | None) -> None:  # noqa: F811
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
