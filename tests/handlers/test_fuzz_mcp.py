"""Fuzzing MCP (issue 7, item 8) over both transports: streamable HTTP at ``/mcp`` (tools on the gateway's own
hub) and stdio (``kernelhub mcp --url``, tools through the REST API).

What is not JSON-RPC gets a JSON-RPC error (stdio: -32700 or -32600 with a null id, one answer per line;
HTTP: the transport's 4xx); a ``tools/call`` with arguments of the wrong types, out of range, nested too deep,
huge or not finite gets a tool error whose structured content is ``{"error", "message"}``; nothing is a 5xx,
nothing shows a traceback, and both servers keep serving. Hypothesis draws the calls (derandomized, bounded)
from each tool's own schema.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from kernelhub.mcp.tools import TOOLS

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups]

SETTINGS = settings(derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                    phases=[Phase.explicit, Phase.generate, Phase.shrink], max_examples=60)
HEADERS = [(b"Content-Type", b"application/json"), (b"Accept", b"application/json, text/event-stream")]
NOT_JSON_RPC = [b"", b"not json", b"null", b"[]", b"{}", b"[" * 100_000, b'{"a":' * 3000, b"\xff\xfe",
                b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": ' + b"[" * 5000 + b"}",
                b'{"jsonrpc": "2.0", "id": 1}', b'{"jsonrpc": "2.0", "method": 5, "id": 1}', b'{"id": 1}',
                b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "\\ud800"}}']
WRONG = [None, True, -1, 0, 2**62, 2**70, 1.5, 1e308, float("inf"), float("nan"), "", "x" * 20_000, "\x00",
         "\u202e", [], [1], {}, {"a": {"b": {}}}, {"memory_mb": "x"}, {"A": 1}, {"BAD NAME": "x"}, {"cpu": 1e308},
         "../../etc/passwd", "/abs", "a\x00b", "%FF", "sbnope"]
DESTRUCTIVE = {"sandbox_delete", "sandbox_pause", "session_close"}


def plausible(fuzz: Any, tool: str) -> dict[str, Any]:
    """A value for each argument that makes a harmless call (never of the objects the fuzzing aims at)."""
    destructive = tool in DESTRUCTIVE
    return {"sandbox_id": "sbnope" if destructive else fuzz.sandbox,
            "session_id": "senope" if destructive else fuzz.jupyter_session, "execution_id": fuzz.execution,
            "code": "1", "command": "true", "path": "mcp-fuzz.txt", "content": "hi", "content_base64": "aGk=",
            "template": "python", "limits": {"memory_mb": 256}, "env": {"A": "b"}, "metadata": {"k": "v"},
            "network": "none", "type": "terminal", "language": "python", "lines": 3, "timeout_s": 5,
            "format": "text", "cwd": "/workspace", "stdin": "", "input": "1"}


@st.composite
def tool_calls(draw: st.DrawFn, fuzz: Any) -> dict[str, Any]:
    """``params`` of a tools/call: a tool (or no such tool), its arguments plausible or wrong, maybe more."""
    spec = draw(st.sampled_from(TOOLS))
    name = draw(st.sampled_from([spec.name] * 8 + ["no_such_tool", "", "sandbox_create\x00"]))
    values = plausible(fuzz, spec.name)
    arguments: dict[str, Any] = {}
    for field in spec.schema["properties"]:
        choice = draw(st.sampled_from(["plausible", "wrong", "wrong", "absent"]))
        if choice == "plausible" and field in values:
            arguments[field] = values[field]
        elif choice == "wrong":
            arguments[field] = draw(st.sampled_from(WRONG))
    if draw(st.integers(0, 4)) == 0:
        arguments[draw(st.sampled_from(["surprise", "", "sandbox", "x" * 300]))] = draw(st.sampled_from(WRONG))
    return {"name": name, "arguments": arguments}


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, allow_nan=True).encode()


def check_rpc(message: Any, assert_error_body: Any, where: str) -> None:
    """A JSON-RPC answer: an error with an integer code and a message, or a result; a tool's error result
    carries ``{"error", "message"}`` unless it is a failed execution or command (which carry their record)."""
    assert isinstance(message, dict) and message.get("jsonrpc") == "2.0", (where, message)
    if "error" in message:
        error = message["error"]
        assert isinstance(error.get("code"), int) and isinstance(error.get("message"), str) and error["message"]
        assert "Traceback" not in json.dumps(message), (where, message)
        return
    result = message["result"]
    assert "Traceback" not in json.dumps(result.get("structuredContent") or {}).replace("traceback", ""), where
    structured = result.get("structuredContent")
    if result.get("isError") and isinstance(structured, dict) and not {"status", "exit_code"} & set(structured):
        assert_error_body(structured, where)


def sse_messages(body: bytes) -> list[Any]:
    """The JSON-RPC messages of an answer: server-sent events' data lines, or one JSON body."""
    text = body.decode()
    if text.lstrip().startswith("{"):
        return [json.loads(text)]
    return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]


def clean_up(fuzz: Any) -> None:
    """Remove what calls that happened to be valid made: sandboxes (sandbox_create) and sessions."""
    _, listing = fuzz.gw.request("GET", "/v1/sandboxes")
    for sandbox in listing["sandboxes"]:
        if sandbox["id"] not in fuzz.initial_sandboxes:
            fuzz.gw.request("DELETE", f"/v1/sandboxes/{sandbox['id']}")
        elif sandbox["id"] == fuzz.sandbox:
            for session in sandbox["sessions"]:
                if session["id"] not in (fuzz.jupyter_session, fuzz.terminal):
                    fuzz.gw.request("DELETE", f"/v1/sessions/{session['id']}")


def fuzz_then_check(fuzz: Any, run: Any, since: int) -> None:
    """Run a hypothesis test, remove what it made, and check the gateway's log from ``since`` and that it
    still serves."""
    try:
        run()
    finally:
        clean_up(fuzz)
    fuzz.assert_log_clean(since)
    fuzz.assert_serving()


# -- streamable HTTP -------------------------------------------------------------------------------------------


def test_http_refuses_what_is_not_json_rpc(fuzz: Any, assert_error_body: Any) -> None:
    since = len(fuzz.log())
    auth = [(b"Authorization", f"Bearer {fuzz.token}".encode())]
    for body in NOT_JSON_RPC:
        answer = fuzz.raw(b"POST", b"/mcp", auth + HEADERS, body)
        assert 400 <= answer.status < 500, (body[:80], answer.status, answer.body[:500])
        check_rpc(answer.json(), assert_error_body, repr(body[:80]))
    # The transport's own refusals (no Content-Type, an Accept without both types) are JSON too: a JSON-RPC
    # error, or this gateway's shape where the SDK answers plain text.
    for headers in ([], [(b"Content-Type", b"application/json")], [(b"Content-Type", b"text/plain"), HEADERS[1]]):
        answer = fuzz.raw(b"POST", b"/mcp", auth + headers, b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}')
        assert 400 <= answer.status < 500, (headers, answer.status, answer.body)
        body = answer.json()
        if "jsonrpc" in body:
            check_rpc(body, assert_error_body, repr(headers))
        else:
            assert_error_body(body, repr(headers))
    fuzz.assert_log_clean(since)


def test_http_tool_calls(fuzz: Any, assert_error_body: Any) -> None:
    since = len(fuzz.log())
    headers = [(b"Authorization", f"Bearer {fuzz.token}".encode()), *HEADERS]

    @SETTINGS
    @given(params=tool_calls(fuzz), envelope=st.sampled_from(["call"] * 6 + ["odd id", "odd method", "odd params"]))
    def run(params: dict[str, Any], envelope: str) -> None:
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}
        if envelope == "odd id":
            message["id"] = 1.5
        elif envelope == "odd method":
            message["method"] = "tools/nope"
        elif envelope == "odd params":
            message["params"] = [params]
        answer = fuzz.raw(b"POST", b"/mcp", headers, encode(message), timeout=120)
        where = json.dumps(message, allow_nan=True)[:300]
        assert answer.status < 500 and b"Traceback" not in answer.body, (where, answer.status, answer.body[:1000])
        if answer.status == 202:
            return  # the transport took it for a notification
        for reply in sse_messages(answer.body):
            check_rpc(reply, assert_error_body, where)

    fuzz_then_check(fuzz, run, since)


# -- stdio -----------------------------------------------------------------------------------------------------


class StdioServer:
    """``kernelhub mcp --url`` as a host runs it: lines in, lines out, each answer awaited with a timeout."""

    def __init__(self, fuzz: Any) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kernelhub.cli", "mcp", "--url", fuzz.gw.url],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "KERNELHUB_TOKEN": fuzz.token})
        self.lines: queue.Queue[bytes] = queue.Queue()
        self.stderr: list[bytes] = []
        self.pumps = [threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines.put), daemon=True),
                      threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr.append), daemon=True)]
        for pump in self.pumps:
            pump.start()

    @staticmethod
    def _pump(stream: Any, put: Any) -> None:
        for line in iter(stream.readline, b""):
            put(line)

    def send(self, line: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + b"\n")
        self.proc.stdin.flush()

    def answer(self, timeout: float = 120) -> Any:
        try:
            return json.loads(self.lines.get(timeout=timeout))
        except queue.Empty:
            raise AssertionError(f"no answer; stderr: {b''.join(self.stderr)[-3000:]!r}") from None

    def close(self) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pump in self.pumps:
            pump.join(30)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return b"".join(self.stderr).decode(errors="replace")


@pytest.fixture
def stdio(fuzz: Any) -> Iterator[StdioServer]:
    server = StdioServer(fuzz)
    server.send(encode({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "fuzz", "version": "1"}}}))
    assert server.answer()["id"] == 0
    server.send(encode({"jsonrpc": "2.0", "method": "notifications/initialized"}))
    yield server
    stderr = server.close()
    assert "Traceback" not in stderr, stderr[-5000:]


def test_stdio_answers_every_line_that_is_not_json_rpc(stdio: StdioServer, assert_error_body: Any) -> None:
    for line in NOT_JSON_RPC[1:]:
        stdio.send(line)
        answer = stdio.answer()
        check_rpc(answer, assert_error_body, repr(line[:80]))
        assert "error" in answer and answer["error"]["code"] in (-32700, -32600, -32601, -32602), answer
        assert answer["error"]["message"].endswith("."), answer
    # A request after all of it is served.
    stdio.send(encode({"jsonrpc": "2.0", "id": 99, "method": "tools/list"}))
    listed = stdio.answer()
    assert listed["id"] == 99 and len(listed["result"]["tools"]) == len(TOOLS)


def test_stdio_tool_calls(fuzz: Any, stdio: StdioServer, assert_error_body: Any) -> None:
    since = len(fuzz.log())
    ids = iter(range(1000, 10**6))

    @settings(SETTINGS, max_examples=40)
    @given(params=tool_calls(fuzz))
    def run(params: dict[str, Any]) -> None:
        call_id = next(ids)
        line = encode({"jsonrpc": "2.0", "id": call_id, "method": "tools/call", "params": params})
        stdio.send(line)
        answer = stdio.answer()
        assert answer.get("id") == call_id, (line[:300], answer)
        check_rpc(answer, assert_error_body, line[:300].decode(errors="replace"))

    fuzz_then_check(fuzz, run, since)
