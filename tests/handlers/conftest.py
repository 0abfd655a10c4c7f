"""Fixtures for the REST and websocket surfaces: one real gateway for the session (``gateway``), sandboxes
shared by the tests of a module where the assertions allow it, and small clients for NDJSON streams.

Every sandbox made through :func:`sandboxes` is deleted when its module ends.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kernelhub.testing import Gateway, gateway  # noqa: F401  (the session-scoped fixture)

SandboxMaker = Callable[..., dict[str, Any]]


@pytest.fixture(scope="module")
def sandboxes(gateway: Gateway) -> Iterator[SandboxMaker]:  # noqa: F811
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
def execute(gateway: Gateway) -> Callable[..., dict[str, Any]]:  # noqa: F811
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
def ndjson(gateway: Gateway) -> Iterator[Callable[..., NdjsonStream]]:  # noqa: F811
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
