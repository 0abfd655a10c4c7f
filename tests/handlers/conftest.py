"""Fixtures for the REST and websocket surfaces: one real gateway for the session (``gateway``), sandboxes
shared by the tests of a module where the assertions allow it, and small clients for NDJSON streams. The fuzz
tests get a gateway of their own (``fuzz``) with a raw HTTP client and a check of its log.

Every sandbox made through :func:`sandboxes` is deleted when its module ends.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import re
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kernelhub.testing import Gateway

SandboxMaker = Callable[..., dict[str, Any]]


@pytest.fixture(scope="module")
def gw(request: pytest.FixtureRequest) -> Iterator[Gateway]:
    """A gateway of the module's own, started with the module's ``GATEWAY_ARGS`` (options, if any), so that its
    log, its memory and its bounds are that module's alone."""
    own = Gateway(extra_args=list(getattr(request.module, "GATEWAY_ARGS", [])))
    try:
        yield own
    finally:
        own.stop()


@pytest.fixture(scope="module")
def sandboxes(gateway: Gateway) -> Iterator[SandboxMaker]:
    """``make(template="python", **fields)`` creates a sandbox through REST; all are deleted at module end."""
    made: list[str] = []

    def make(template: str = "python", **fields: Any) -> dict[str, Any]:
        status, body = gateway.request("POST", "/v1/sandboxes", {"template": template, **fields})
        assert status == 201, body
        made.append(body["id"])
        return body

    yield make
    for sandbox_id in made:
        gateway.request("DELETE", f"/v1/sandboxes/{sandbox_id}")


@pytest.fixture(scope="module")
def python_sandbox(sandboxes: SandboxMaker) -> dict[str, Any]:
    """A python sandbox shared by a module's tests that do not care what ran before them."""
    return sandboxes("python")


@pytest.fixture
def execute(gateway: Gateway) -> Callable[..., dict[str, Any]]:
    """``execute(sandbox_id, code, **fields)``: code_execute through REST, asserting a 200."""

    def run(sandbox_id: str, code: str, **fields: Any) -> dict[str, Any]:
        status, body = gateway.request("POST", f"/v1/sandboxes/{sandbox_id}/execute", {"code": code, **fields})
        assert status == 200, body
        return body

    return run


class NdjsonStream:
    """One request answered as NDJSON, read line by line with http.client."""

    def __init__(self, gw: Gateway, method: str, path: str, body: Any, token: str | None, timeout: float) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=timeout)
        self.conn.request(method, path, json.dumps(body).encode(), {
            "Authorization": f"Bearer {token or gw.token}",
            "Accept": "application/x-ndjson",
            "Content-Type": "application/json",
        })
        self.response = self.conn.getresponse()

    def events(self) -> Iterator[dict[str, Any]]:
        """The events, one parsed JSON object per line, until the stream ends."""
        while True:
            line = self.response.readline()
            if not line:
                return
            assert line.endswith(b"\n"), line
            yield json.loads(line)

    def close(self) -> None:
        self.response.close()
        self.conn.close()


@pytest.fixture
def ndjson(gateway: Gateway) -> Iterator[Callable[..., NdjsonStream]]:
    """``ndjson(method, path, body, token=None, timeout=60)``: a streamed request; closed after the test."""
    opened: list[NdjsonStream] = []

    def open_stream(method: str, path: str, body: Any, token: str | None = None,
                    timeout: float = 60) -> NdjsonStream:
        stream = NdjsonStream(gateway, method, path, body, token, timeout)
        opened.append(stream)
        return stream

    yield open_stream
    for stream in opened:
        stream.close()


# -- fuzzing -------------------------------------------------------------------------------------------------

#: What an error body's ``error`` looks like (API.md: snake_case).
ERROR_CODE = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")
#: What a gateway log must never hold: a traceback, or tornado's words for an exception no handler took.
LOG_FAULTS = re.compile(r"Traceback \(most recent call last\)|Uncaught exception|Exception in exception handler|"
                        r"Exception in callback|Task exception was never retrieved|^5\d\d [A-Z]+ /", re.MULTILINE)


def _assert_error_body(body: Any, where: str = "") -> None:
    """``body`` is ``{"error": <snake_case>, "message": <a sentence>}`` and shows no traceback."""
    assert isinstance(body, dict) and set(body) == {"error", "message"}, (where, body)
    assert isinstance(body["error"], str) and ERROR_CODE.fullmatch(body["error"]), (where, body)
    message = body["message"]
    assert isinstance(message, str) and " " in message and message.rstrip().endswith("."), (where, body)
    assert "Traceback" not in message and len(message) < 2000, (where, body)


@dataclasses.dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class FuzzTarget:
    """A gateway of its own for the fuzz tests (so that its whole log can be read for tracebacks), with one
    object of each kind to aim at: a python sandbox, a terminal and a jupyter session in it, an ended
    execution, and a kernel of the Jupyter API (a sandbox of its own)."""

    def __init__(self) -> None:
        self.gw = Gateway()
        try:
            status, sandbox = self.gw.request("POST", "/v1/sandboxes", {"template": "python"})
            assert status == 201, sandbox
            self.sandbox: str = sandbox["id"]
            self.jupyter_session: str = sandbox["sessions"][0]["id"]
            status, terminal = self.gw.request("POST", f"/v1/sandboxes/{self.sandbox}/sessions",
                                               {"type": "terminal"})
            assert status == 201, terminal
            self.terminal: str = terminal["id"]
            status, ex = self.gw.request("POST", f"/v1/sandboxes/{self.sandbox}/execute", {"code": "6 * 7"})
            assert status == 200 and ex["status"] == "ok", ex
            self.execution: str = ex["id"]
            status, kernel = self.gw.request("POST", "/api/kernels", {"name": "kernelhub-python"})
            assert status == 201, kernel
            self.kernel: str = kernel["id"]
            self.initial_sandboxes = {s["id"] for s in self.gw.request("GET", "/v1/sandboxes")[1]["sandboxes"]}
        except BaseException:
            self.gw.stop()
            raise

    @property
    def token(self) -> str:
        return self.gw.token

    def raw(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes | None = None,
            *, chunked: bool = False, timeout: float = 60) -> RawResponse:
        """One request written byte for byte (any method, any bytes in the target and header values), on a
        connection of its own (``Connection: close``); the answer read whole. A 101 ends the read at once."""
        lines = [method + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1:%d" % self.gw.port, b"Connection: close"]
        lines += [name + b": " + value for name, value in headers]
        payload = b""
        if body is not None and chunked:
            lines.append(b"Transfer-Encoding: chunked")
            half = len(body) // 2
            for part in (body[:half], body[half:]):
                if part:
                    payload += b"%x\r\n%s\r\n" % (len(part), part)
            payload += b"0\r\n\r\n"
        elif body is not None:
            lines.append(b"Content-Length: %d" % len(body))
            payload = body
        with socket.create_connection(("127.0.0.1", self.gw.port), timeout=timeout) as sock:
            sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + payload)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                assert chunk, f"the gateway closed the connection without an answer: {data[:200]!r}"
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            status = int(status_line.split()[1])
            answer_headers = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                answer_headers[name.strip().lower()] = value.strip()
            if status == 101 or method == b"HEAD" or status in (204, 304):
                return RawResponse(status, answer_headers, b"")
            length = answer_headers.get("content-length")
            while length is None or len(rest) < int(length):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                rest += chunk
        if answer_headers.get("transfer-encoding", "").lower() == "chunked":
            rest = _dechunk(rest)
        return RawResponse(status, answer_headers, rest)

    def log(self) -> str:
        with open(self.gw.log_path, errors="replace") as f:
            return f.read()

    def assert_log_clean(self, since: int = 0) -> None:
        """No traceback, uncaught exception or 5xx in the gateway's log from character ``since`` on."""
        text = self.log()[since:]
        fault = LOG_FAULTS.search(text)
        assert fault is None, text[max(0, fault.start() - 2000): fault.start() + 3000]

    def assert_serving(self) -> None:
        """The gateway still answers, and the sandbox aimed at still runs code."""
        status, ex = self.gw.request("POST", f"/v1/sandboxes/{self.sandbox}/execute", {"code": "1 + 1"})
        assert status == 200 and ex["status"] == "ok", ex


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2:]
    return out


@pytest.fixture(scope="session")
def assert_error_body() -> Callable[..., None]:
    """``assert_error_body(body, where="")``: an error body of the API's shape, a sentence, no traceback."""
    return _assert_error_body


@pytest.fixture(scope="session")
def fuzz() -> Iterator[FuzzTarget]:
    target = FuzzTarget()
    try:
        yield target
    finally:
        target.gw.stop()
